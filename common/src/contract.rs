//! The wire contract: the records that cross Kafka between the services.
//!
//! Every record is JSON with a `schema_version` field. A consumer accepts versions up to
//! [`SCHEMA_VERSION`]; additive changes (new optional fields) keep the version, anything a
//! reader could misinterpret bumps it. Money is a decimal string (`"12.50"`), never a float.
//! Timestamps are milliseconds since the Unix epoch (`*_ms`).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The schema version this build writes and the highest one it reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Sub IDs are `sub1` … `sub10`, the affiliate's own tracking parameters.
pub const SUB_ID_KEYS: [&str; 10] = [
    "sub1", "sub2", "sub3", "sub4", "sub5", "sub6", "sub7", "sub8", "sub9", "sub10",
];

/// Free-form parameters carried through verbatim (sub IDs, extra query parameters).
pub type Params = BTreeMap<String, String>;

/// A click: one visit through an affiliate link, published by ingest before the redirect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Click {
    pub schema_version: u32,
    /// Unique, URL-safe, time-sortable (ULID) unless the operator minted its own.
    pub click_id: String,
    pub offer_id: String,
    pub aff_id: String,
    /// `sub1` … `sub10` that were present.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: Params,
    /// Any other query parameters, verbatim.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: Params,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub referrer: Option<String>,
    pub ts_ms: i64,
}

/// A postback: the operator's server telling us a click converted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Postback {
    pub schema_version: u32,
    /// Assigned by ingest when the postback is accepted; the input identity of every outcome.
    pub postback_id: String,
    pub click_id: String,
    /// `registration`, `ftd`, `deposit`, `purchase`, … (configured at ingest).
    pub event: String,
    /// The operator's transaction ID, the deduplication key of repeated events.
    pub txn_id: Option<String>,
    pub amount: Option<Decimal>,
    /// ISO 4217 code, upper case.
    pub currency: Option<String>,
    /// `pending`, `approved`, `rejected`, `reversed` (configured at ingest).
    pub status: String,
    /// The operator integration it came through, when known.
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: Params,
    pub ip: Option<String>,
    /// When ingest received it: the event time used for the attribution window.
    pub ts_ms: i64,
}

/// An attributed conversion, published by the attributor and delivered to affiliates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversion {
    pub schema_version: u32,
    /// Stable across status updates of the same conversion.
    pub conversion_id: String,
    /// 1 for the first attribution, increasing with each status update.
    pub version: u32,
    /// Deterministic ID of this outcome, derived from the postback that caused it.
    pub outcome_id: String,
    pub postback_id: String,
    pub click_id: String,
    pub offer_id: String,
    pub aff_id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: Params,
    pub event: String,
    pub txn_id: Option<String>,
    pub status: String,
    /// What the operator reported (deposit size, order value), if anything.
    pub amount: Option<Decimal>,
    pub currency: Option<String>,
    /// What the affiliate earns for this event (CPA), from the attributor's offer config.
    pub payout: Decimal,
    pub payout_currency: String,
    pub click_ts_ms: i64,
    pub event_ts_ms: i64,
    /// When this version was decided (processing time; the only field a replay may change).
    pub attributed_at_ms: i64,
    /// The status of the previous version, on a status update (version > 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_status: Option<String>,
    /// The conversion came sooner after its click than the offer's minimum
    /// (`min_click_to_conversion_seconds`): flagged for review, not dropped.
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspicious: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Why a postback did not become a conversion. Label values of metrics: keep the set small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// No click with this ID arrived within the grace period.
    UnknownClick,
    /// The postback came after the attribution window of its click closed.
    OutsideWindow,
    /// The same conversion, with the same status, was already attributed; or a second
    /// conversion of an event that counts once per click (FTD).
    Duplicate,
}

impl RejectReason {
    pub const ALL: [RejectReason; 3] = [
        RejectReason::UnknownClick,
        RejectReason::OutsideWindow,
        RejectReason::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownClick => "unknown_click",
            RejectReason::OutsideWindow => "outside_window",
            RejectReason::Duplicate => "duplicate",
        }
    }
}

/// A reason-coded rejection: the outcome of a postback that was not attributed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub schema_version: u32,
    /// Deterministic ID of this outcome, derived from its input.
    pub outcome_id: String,
    pub reason: RejectReason,
    /// Human-readable explanation.
    pub detail: String,
    /// The postback that was rejected.
    pub postback: Option<Postback>,
    pub rejected_at_ms: i64,
}

/// How one HTTP attempt to an affiliate endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// A 2xx answer.
    Delivered,
    /// Network error, timeout, 408, 429 or 5xx: worth another attempt.
    Retryable,
    /// Any other answer (other 4xx, a redirect): retrying will not help.
    Permanent,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retryable => "retryable",
            AttemptOutcome::Permanent => "permanent",
        }
    }
}

/// One HTTP attempt, published to the delivery-log topic for troubleshooting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    pub schema_version: u32,
    /// Stable per (conversion, version, endpoint): the idempotency key sent to the affiliate.
    pub delivery_id: String,
    pub conversion_id: String,
    pub conversion_version: u32,
    pub click_id: String,
    pub endpoint: String,
    /// 1-based.
    pub attempt: u32,
    pub url: String,
    pub status_code: Option<u16>,
    pub latency_ms: u64,
    pub outcome: AttemptOutcome,
    pub error: Option<String>,
    pub ts_ms: i64,
    /// When the next attempt is scheduled, if this one is retried; absent when the
    /// delivery is done (delivered, or dead-lettered: see the dead-letter topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at_ms: Option<i64>,
}

/// A delivery that exhausted its attempts, published to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema_version: u32,
    pub delivery_id: String,
    pub endpoint: String,
    pub conversion: Conversion,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub dead_lettered_at_ms: i64,
}

/// What an operator asks the delivery worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandAction {
    /// Send a dead-lettered delivery again with a fresh retry schedule (or, if it is still
    /// waiting for a retry, now). A delivered one is left alone: it was paid.
    Redeliver,
}

impl CommandAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandAction::Redeliver => "redeliver",
        }
    }
}

/// A command to the delivery worker, on the delivery-commands topic keyed by click ID (so
/// it reaches the instance that owns the conversion's deliveries). The topic is also the
/// record of who asked for what, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCommand {
    pub schema_version: u32,
    /// Unique per command (ULID).
    pub command_id: String,
    pub action: CommandAction,
    /// The postback (endpoint name) to deliver to.
    pub endpoint: String,
    /// The conversion to deliver; with `endpoint` it names the delivery, whose stable ID
    /// (`webhook-id`) does not change.
    pub conversion: Conversion,
    /// Who asked (an operator, a tool).
    pub requested_by: String,
    pub requested_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Failure to read a record from the wire.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("record is not valid JSON for this type: {0}")]
    Json(#[from] serde_json::Error),
    #[error("record has schema_version {found}, this build reads up to {SCHEMA_VERSION}")]
    UnsupportedVersion { found: u32 },
}

/// Implemented by every record type: its schema version, for [`decode`] to check.
pub trait Versioned {
    fn schema_version(&self) -> u32;
}

macro_rules! versioned {
    ($($t:ty),*) => {$(
        impl Versioned for $t {
            fn schema_version(&self) -> u32 { self.schema_version }
        }
    )*};
}
versioned!(
    Click,
    Postback,
    Conversion,
    Rejection,
    DeliveryAttempt,
    DeadLetter,
    DeliveryCommand
);

/// Serialises a record for a Kafka payload.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Sized for a typical record, so that it is written without growing the buffer.
    let mut out = Vec::with_capacity(512);
    // Serialising these plain structs cannot fail: no maps with non-string keys, no
    // custom serialisers that error.
    match serde_json::to_writer(&mut out, record) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

/// Parses a Kafka payload and checks its schema version.
pub fn decode<T: DeserializeOwned + Versioned>(payload: &[u8]) -> Result<T, ContractError> {
    let record: T = serde_json::from_slice(payload)?;
    let found = record.schema_version();
    if found == 0 || found > SCHEMA_VERSION {
        return Err(ContractError::UnsupportedVersion { found });
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click() -> Click {
        Click {
            schema_version: SCHEMA_VERSION,
            click_id: "01J0000000000000000000000A".into(),
            offer_id: "7".into(),
            aff_id: "42".into(),
            subs: [("sub1".to_string(), "x y".to_string())].into(),
            params: Params::new(),
            ip: Some("203.0.113.9".into()),
            user_agent: None,
            referrer: None,
            ts_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trips_and_checks_version() {
        let c = click();
        let bytes = encode(&c);
        assert_eq!(decode::<Click>(&bytes).ok(), Some(c.clone()));

        let mut newer = c;
        newer.schema_version = SCHEMA_VERSION + 1;
        let err = decode::<Click>(&encode(&newer)).err();
        assert!(matches!(
            err,
            Some(ContractError::UnsupportedVersion { found }) if found == SCHEMA_VERSION + 1
        ));
    }

    #[test]
    fn money_is_a_decimal_string() {
        let json = r#"{"schema_version":1,"postback_id":"p","click_id":"c","event":"ftd",
            "txn_id":null,"amount":"12.50","currency":"EUR","status":"approved","source":null,
            "ip":null,"ts_ms":1}"#;
        let pb: Postback = decode(json.as_bytes()).expect("valid postback");
        assert_eq!(pb.amount, Some(Decimal::new(1250, 2)));
        let back = String::from_utf8(encode(&pb)).expect("utf-8");
        assert!(back.contains(r#""amount":"12.50""#), "{back}");
    }

    #[test]
    fn reject_reasons_serialise_as_their_label() {
        for r in RejectReason::ALL {
            assert_eq!(
                serde_json::to_string(&r).ok(),
                Some(format!("\"{}\"", r.as_str()))
            );
        }
    }
}
