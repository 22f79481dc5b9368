//! The attributor's own Prometheus metrics (the runtime's are `stream_*{service="attributor"}`),
//! each updated in one place: `lib.rs`, after the cycle that produced the event was
//! committed.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use s2s_common::contract::PayoutRule;

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `attributor_outcomes_total{outcome, reason}`: attributed (reason "none"), updated
    /// (reason "none" when a postback asked for it, "hold_ended" for an automatic approval)
    /// or rejected (the [`RejectReason`](s2s_common::contract::RejectReason)s).
    pub outcomes: IntCounterVec,
    /// `attributor_unpriced_conversions_total{rule}`: new conversions priced at 0 because
    /// no payout is configured (no_payout_for_event, unknown_offer).
    pub unpriced: IntCounterVec,
    /// `attributor_suspicious_conversions_total`: sooner after the click than the offer's
    /// minimum.
    pub suspicious: IntCounter,
    /// `attributor_postback_latency_seconds`: from ingest accepting a postback to its
    /// outcome being committed (includes the wait of postbacks held for their click).
    pub postback_latency: Histogram,
    /// `attributor_click_to_conversion_seconds`: event time minus click time of new
    /// conversions.
    pub click_to_conversion: Histogram,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            outcomes: IntCounterVec::new(
                Opts::new(
                    "attributor_outcomes_total",
                    "Postback outcomes: attributed, updated, or rejected with a reason.",
                ),
                &["outcome", "reason"],
            )?,
            unpriced: IntCounterVec::new(
                Opts::new(
                    "attributor_unpriced_conversions_total",
                    "New conversions priced at 0 because no payout is configured, by rule.",
                ),
                &["rule"],
            )?,
            suspicious: IntCounter::new(
                "attributor_suspicious_conversions_total",
                "Conversions flagged as sooner after their click than the offer's minimum.",
            )?,
            postback_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "attributor_postback_latency_seconds",
                    "From ingest accepting a postback to its committed outcome.",
                )
                .buckets(prometheus::exponential_buckets(0.005, 2.0, 16)?),
            )?,
            click_to_conversion: Histogram::with_opts(
                HistogramOpts::new(
                    "attributor_click_to_conversion_seconds",
                    "Time from click to conversion event of new conversions.",
                )
                .buckets(vec![
                    1.0, 10.0, 60.0, 600.0, 3600.0, 21600.0, 86400.0, 259200.0, 604800.0,
                    1209600.0, 2592000.0, 7776000.0,
                ]),
            )?,
        };
        // Every bounded label value starts at 0, so that rate() sees the first event and
        // dashboards show a zero rather than no data.
        m.outcomes.with_label_values(&["attributed", "none"]);
        m.outcomes.with_label_values(&["updated", "none"]);
        m.outcomes.with_label_values(&["updated", "hold_ended"]);
        for rule in [PayoutRule::NoPayoutForEvent, PayoutRule::UnknownOffer] {
            m.unpriced.with_label_values(&[rule.as_str()]);
        }
        for reason in s2s_common::contract::RejectReason::ALL {
            m.outcomes.with_label_values(&["rejected", reason.as_str()]);
        }
        registry.register(Box::new(m.outcomes.clone()))?;
        registry.register(Box::new(m.suspicious.clone()))?;
        registry.register(Box::new(m.unpriced.clone()))?;
        registry.register(Box::new(m.postback_latency.clone()))?;
        registry.register(Box::new(m.click_to_conversion.clone()))?;
        Ok(m)
    }
}
