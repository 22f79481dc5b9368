//! Ingest's Prometheus metrics, registered on the service's own registry.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `ingest_http_requests_total{route, status}`.
    pub requests: IntCounterVec,
    /// `ingest_http_request_duration_seconds{route}`.
    pub request_seconds: HistogramVec,
    /// `ingest_produce_duration_seconds{kind}`: send to broker acknowledgement.
    pub produce_seconds: HistogramVec,
    /// `ingest_records_total{kind, outcome}`: accepted, invalid, unavailable.
    pub records: IntCounterVec,
    /// `ingest_clicks_not_issued_total{reason}`: clicks answered without a click ID (the
    /// affiliate is blocked, paused, or unknown where those are refused).
    pub clicks_not_issued: IntCounterVec,
    /// `ingest_unauthenticated_sources`: sources configured with `auth = "none"`.
    pub unauthenticated_sources: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "ingest_http_requests_total",
                    "HTTP requests by route and status.",
                ),
                &["route", "status"],
            )?,
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "ingest_http_request_duration_seconds",
                    "HTTP request latency, including the wait for the Kafka acknowledgement.",
                )
                .buckets(buckets.clone()),
                &["route"],
            )?,
            produce_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "ingest_produce_duration_seconds",
                    "Time from handing a record to the producer to the broker's acknowledgement.",
                )
                .buckets(buckets),
                &["kind"],
            )?,
            records: IntCounterVec::new(
                Opts::new(
                    "ingest_records_total",
                    "Clicks and postbacks by outcome: accepted, invalid, unavailable.",
                ),
                &["kind", "outcome"],
            )?,
            clicks_not_issued: IntCounterVec::new(
                Opts::new(
                    "ingest_clicks_not_issued_total",
                    "Clicks answered without a click ID, by reason: affiliate_blocked, affiliate_paused, unknown_affiliate.",
                ),
                &["reason"],
            )?,
            unauthenticated_sources: IntGauge::new(
                "ingest_unauthenticated_sources",
                "Sources configured with auth = \"none\": anyone who can reach ingest may post through them.",
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_seconds.clone()))?;
        registry.register(Box::new(m.produce_seconds.clone()))?;
        registry.register(Box::new(m.records.clone()))?;
        registry.register(Box::new(m.unauthenticated_sources.clone()))?;
        registry.register(Box::new(m.clicks_not_issued.clone()))?;
        for why in crate::catalog::NotIssued::ALL {
            m.clicks_not_issued.with_label_values(&[why.as_str()]);
        }
        Ok(m)
    }
}
