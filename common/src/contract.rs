//! The wire contract: the records that cross Kafka between the services.
//!
//! Every record is JSON with a `schema_version` field. A consumer accepts versions up to
//! [`SCHEMA_VERSION`]; additive changes (new optional fields) keep the version, anything a
//! reader could misinterpret bumps it. Money is a decimal string (`"12.50"`), never a float.
//! Timestamps are milliseconds since the Unix epoch (`*_ms`). Each record type's JSON
//! Schema is checked in under `schemas/` ([`schemas`]), and every record the pipeline
//! produces carries Kafka headers naming its version and kind ([`header`],
//! [`WireRecord`]).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The schema version this build writes and the highest one it reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Sub IDs are `sub1` … `sub10`, the affiliate's own tracking parameters.
pub const SUB_ID_KEYS: [&str; 10] = [
    "sub1", "sub2", "sub3", "sub4", "sub5", "sub6", "sub7", "sub8", "sub9", "sub10",
];

/// How money appears on the wire, for the JSON Schemas: a decimal string (`"50.00"`,
/// `"-50.00"`), never a number, so that no reader parses it into a float.
struct Money;

impl JsonSchema for Money {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Money".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A decimal amount as a string, e.g. \"50.00\"; never a number.",
            "type": "string",
            "pattern": "^-?[0-9]+(\\.[0-9]+)?$"
        })
    }
}

/// Free-form parameters carried through verbatim (sub IDs, extra query parameters).
pub type Params = BTreeMap<String, String>;

/// A click: one visit through an affiliate link, published by ingest before the redirect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Postback {
    pub schema_version: u32,
    /// Assigned by ingest when the postback is accepted; the input identity of every outcome.
    pub postback_id: String,
    pub click_id: String,
    /// `registration`, `ftd`, `deposit`, `purchase`, … (configured at ingest).
    pub event: String,
    /// The operator's transaction ID, the deduplication key of repeated events.
    pub txn_id: Option<String>,
    #[schemars(with = "Option<Money>")]
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
    /// When ingest received it.
    pub ts_ms: i64,
    /// When the conversion happened, as the operator reported it (`event_time`), checked
    /// by ingest against `ts_ms`. Absent when the operator did not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time_ms: Option<i64>,
    /// How it reached us: server to server, or from a browser (pixel, iframe).
    #[serde(default)]
    pub trust: Trust,
}

/// How a postback reached ingest: how far its word can be trusted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trust {
    /// The operator's server called a postback route (authenticated as its source says).
    #[default]
    S2s,
    /// A browser loaded the pixel or the iframe: anyone can forge one.
    Pixel,
}

impl Trust {
    pub fn as_str(self) -> &'static str {
        match self {
            Trust::S2s => "s2s",
            Trust::Pixel => "pixel",
        }
    }
}

impl Postback {
    /// The time the attribution window is judged on: the operator's event time when it
    /// gave one, else when ingest received the postback.
    pub fn event_ts_ms(&self) -> i64 {
        self.event_time_ms.unwrap_or(self.ts_ms)
    }
}

/// An attributed conversion, published by the attributor and delivered to affiliates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
    #[schemars(with = "Option<Money>")]
    pub amount: Option<Decimal>,
    pub currency: Option<String>,
    /// What the affiliate is owed for this conversion at this version: `priced_payout`
    /// while the status pays, 0 in a status that pays nothing (rejected, reversed).
    #[schemars(with = "Money")]
    pub payout: Decimal,
    pub payout_currency: String,
    /// The change of `payout` against the previous version (on version 1, the payout):
    /// summing the deltas per affiliate and currency gives the balance.
    #[serde(default)]
    #[schemars(with = "Money")]
    pub payout_delta: Decimal,
    /// What the pricing rule gives this conversion, whatever its status.
    #[serde(default)]
    #[schemars(with = "Money")]
    pub priced_payout: Decimal,
    /// Which pricing rule set `priced_payout`.
    #[serde(default)]
    pub payout_rule: PayoutRule,
    pub click_ts_ms: i64,
    /// When the conversion happened: the operator's `event_time` when it gave one, else
    /// when ingest received the first postback. The same in every version.
    pub event_ts_ms: i64,
    /// When ingest received the postback behind this version (for an automatic change, the
    /// one behind the version it changed).
    #[serde(default)]
    pub received_ts_ms: i64,
    /// When this version was decided (processing time; the only field a replay may change).
    pub attributed_at_ms: i64,
    /// The status of the previous version, on a status update (version > 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_status: Option<String>,
    /// Why the status is what it is when no postback asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<StatusReason>,
    /// How the postback behind this version reached us.
    #[serde(default)]
    pub trust: Trust,
    /// The conversion came sooner after its click than the offer's minimum
    /// (`min_click_to_conversion`): flagged for review (and held, if the offer says so).
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspicious: bool,
    /// The catalog the conversion was priced with: the revision of the catalog's last
    /// change then (the offer's document as of that revision is in the offer's history).
    /// Status updates keep version 1's, as they keep its `priced_payout`. Absent on
    /// records from before the catalog, or priced with an empty one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_revision: Option<i64>,
}

impl Conversion {
    /// The stable ID of this version's delivery to `endpoint` (the postback's name): the
    /// `delivery_id` of its attempts and dead letter, and the idempotency key
    /// (`webhook-id`) the affiliate receives, the same on every retry and re-fire.
    pub fn delivery_id(&self, endpoint: &str) -> String {
        crate::ids::derived(
            "delivery",
            &[&self.conversion_id, &self.version.to_string(), endpoint],
        )
    }
}

/// Which rule priced a conversion. Label values of metrics: keep the set small.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PayoutRule {
    /// The offer's payout for the event.
    #[default]
    OfferEvent,
    /// The offer is known but names no payout for the event: 0.
    NoPayoutForEvent,
    /// The attributor knows no such offer: 0, in the default currency.
    UnknownOffer,
}

impl PayoutRule {
    pub fn as_str(self) -> &'static str {
        match self {
            PayoutRule::OfferEvent => "offer_event",
            PayoutRule::NoPayoutForEvent => "no_payout_for_event",
            PayoutRule::UnknownOffer => "unknown_offer",
        }
    }
}

/// Why a conversion has its status when the pipeline, not a postback, decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusReason {
    /// Too fast after its click, on an offer that holds such conversions: `pending` until
    /// the operator decides, never approved automatically.
    Suspicious,
    /// Approved automatically when the offer's hold ended with the conversion `pending`.
    HoldEnded,
}

impl StatusReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusReason::Suspicious => "suspicious",
            StatusReason::HoldEnded => "hold_ended",
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Why a postback did not become a conversion. Label values of metrics: keep the set small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// No click with this ID arrived within the grace period.
    UnknownClick,
    /// The postback came after the attribution window of its click closed.
    OutsideWindow,
    /// The same conversion, with the same status, was already attributed; or a second
    /// conversion of an event that counts once per click (FTD).
    Duplicate,
    /// The status change the postback asks for is not in the transition table.
    InvalidTransition,
    /// Sooner after its click than the offer's minimum, on an offer that rejects such
    /// conversions.
    TooFast,
    /// A click registration whose ID is already registered to another affiliate, offer or
    /// sub IDs: the first registration stays (the rejection carries the refused click).
    ClickConflict,
    /// A pixel (browser) conversion for an offer that accepts server-to-server ones only.
    PixelNotAllowed,
    /// A new conversion of an affiliate the catalog has blocked (status updates of its
    /// earlier conversions still apply).
    AffiliateBlocked,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        RejectReason::UnknownClick,
        RejectReason::OutsideWindow,
        RejectReason::Duplicate,
        RejectReason::InvalidTransition,
        RejectReason::TooFast,
        RejectReason::ClickConflict,
        RejectReason::PixelNotAllowed,
        RejectReason::AffiliateBlocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownClick => "unknown_click",
            RejectReason::OutsideWindow => "outside_window",
            RejectReason::Duplicate => "duplicate",
            RejectReason::InvalidTransition => "invalid_transition",
            RejectReason::TooFast => "too_fast",
            RejectReason::ClickConflict => "click_conflict",
            RejectReason::PixelNotAllowed => "pixel_not_allowed",
            RejectReason::AffiliateBlocked => "affiliate_blocked",
        }
    }
}

/// A reason-coded rejection: the outcome of a postback that was not attributed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Rejection {
    pub schema_version: u32,
    /// Deterministic ID of this outcome, derived from its input.
    pub outcome_id: String,
    pub reason: RejectReason,
    /// Human-readable explanation.
    pub detail: String,
    /// The postback that was rejected.
    pub postback: Option<Postback>,
    /// The click registration that was rejected (`click_conflict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub click: Option<Click>,
    pub rejected_at_ms: i64,
    /// The catalog the rejection was decided with (see [`Conversion::catalog_revision`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_revision: Option<i64>,
}

impl Rejection {
    /// The click ID the rejection is about: its Kafka key.
    pub fn click_id(&self) -> &str {
        match (&self.postback, &self.click) {
            (Some(p), _) => &p.click_id,
            (None, Some(c)) => &c.click_id,
            (None, None) => "",
        }
    }
}

/// How one HTTP attempt to an affiliate endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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

/// Why a delivery was given up. Label values of metrics: keep the set small.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// Every attempt of the retry schedule failed with a retryable error.
    #[default]
    AttemptsExhausted,
    /// The endpoint answered in a way retrying will not change (a 4xx, a redirect), or the
    /// request could not be built.
    PermanentFailure,
    /// The postback (endpoint) was removed from the configuration while the delivery
    /// waited.
    PostbackRemoved,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 3] = [
        DeadLetterReason::AttemptsExhausted,
        DeadLetterReason::PermanentFailure,
        DeadLetterReason::PostbackRemoved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::AttemptsExhausted => "attempts_exhausted",
            DeadLetterReason::PermanentFailure => "permanent_failure",
            DeadLetterReason::PostbackRemoved => "postback_removed",
        }
    }
}

/// A delivery that was given up, published to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    pub schema_version: u32,
    pub delivery_id: String,
    pub endpoint: String,
    pub conversion: Conversion,
    #[serde(default)]
    pub reason: DeadLetterReason,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub dead_lettered_at_ms: i64,
}

/// What an operator asks the delivery worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandAction {
    /// Send a dead-lettered delivery again with a fresh retry schedule (or, if it is still
    /// waiting for a retry, now). A delivered one is left alone: it was paid.
    Redeliver,
    /// Deliver a conversion to a postback it was never delivered to (a backfill, asked
    /// when the postback is created): scheduled like a new conversion if the postback
    /// wants it; a delivery that already exists, in any state, is left alone.
    Backfill,
}

impl CommandAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandAction::Redeliver => "redeliver",
            CommandAction::Backfill => "backfill",
        }
    }
}

/// A command to the delivery worker, on the delivery-commands topic keyed by click ID (so
/// it reaches the instance that owns the conversion's deliveries). The topic is also the
/// record of who asked for what, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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

impl DeliveryCommand {
    /// A new command (its own ID) asked at `requested_at_ms`.
    pub fn new(
        action: CommandAction,
        endpoint: String,
        conversion: Conversion,
        requested_by: String,
        requested_at_ms: i64,
        reason: Option<String>,
    ) -> Self {
        DeliveryCommand {
            schema_version: SCHEMA_VERSION,
            command_id: crate::ids::new_ulid(),
            action,
            endpoint,
            conversion,
            requested_by,
            requested_at_ms,
            reason,
        }
    }
}

/// A postback or batch record ingest refused with a 4xx, published to the refusals topic
/// (keyed by source) so that an operator's engineer can see why postbacks do not arrive.
/// Secrets are removed from `params` and every field is bounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Refusal {
    pub schema_version: u32,
    /// Unique (ULID).
    pub refusal_id: String,
    /// `postback` or `click`.
    pub kind: String,
    /// The source the request named (`default` for the plain routes).
    pub source: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The error code of the answer (`missing_field`, `unauthorized`, …).
    pub reason: String,
    /// The field the error is about, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
    pub client_ip: Option<String>,
    pub path: String,
    /// The request's parameters (a batch record's own fields), secrets replaced by
    /// `[redacted]`, truncated.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: Params,
    pub ts_ms: i64,
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
    Refusal,
    Conversion,
    Rejection,
    DeliveryAttempt,
    DeadLetter,
    DeliveryCommand
);

/// Names of the Kafka headers on every record the pipeline writes, so that a consumer can
/// route and deduplicate without decoding the value.
pub mod header {
    /// The record's `schema_version`, as decimal text.
    pub const SCHEMA_VERSION: &str = "s2s-schema-version";
    /// The record type: [`super::WireRecord::KIND`].
    pub const KIND: &str = "s2s-kind";
    /// On conversions and rejections: the record's `outcome_id`.
    pub const OUTCOME_ID: &str = "s2s-outcome-id";
}

/// A record type of the wire contract, with what its Kafka headers say.
pub trait WireRecord: Serialize + Versioned {
    /// The `s2s-kind` header: `click`, `postback`, `refusal`, `conversion`, `rejection`,
    /// `delivery_attempt`, `dead_letter` or `delivery_command`.
    const KIND: &'static str;

    /// The `s2s-outcome-id` header, on outcomes.
    fn outcome_id(&self) -> Option<&str> {
        None
    }

    /// The headers of this record, in the order they are written.
    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            (header::SCHEMA_VERSION, self.schema_version().to_string()),
            (header::KIND, Self::KIND.to_string()),
        ];
        if let Some(id) = self.outcome_id() {
            h.push((header::OUTCOME_ID, id.to_string()));
        }
        h
    }
}

macro_rules! wire_record {
    ($($t:ty => $kind:literal),*) => {$(
        impl WireRecord for $t {
            const KIND: &'static str = $kind;
        }
    )*};
}
wire_record!(
    Click => "click",
    Postback => "postback",
    Refusal => "refusal",
    DeliveryAttempt => "delivery_attempt",
    DeadLetter => "dead_letter",
    DeliveryCommand => "delivery_command"
);

impl WireRecord for Conversion {
    const KIND: &'static str = "conversion";
    fn outcome_id(&self) -> Option<&str> {
        Some(&self.outcome_id)
    }
}

impl WireRecord for Rejection {
    const KIND: &'static str = "rejection";
    fn outcome_id(&self) -> Option<&str> {
        Some(&self.outcome_id)
    }
}

/// The JSON Schema of every record type, by the name of its file under `schemas/`
/// (`<name>.schema.json`), checked in and compared with these in the tests.
pub fn schemas() -> Vec<(&'static str, schemars::Schema)> {
    vec![
        ("click", schemars::schema_for!(Click)),
        ("postback", schemars::schema_for!(Postback)),
        ("refusal", schemars::schema_for!(Refusal)),
        ("conversion", schemars::schema_for!(Conversion)),
        ("rejection", schemars::schema_for!(Rejection)),
        ("delivery-attempt", schemars::schema_for!(DeliveryAttempt)),
        ("dead-letter", schemars::schema_for!(DeadLetter)),
        ("delivery-command", schemars::schema_for!(DeliveryCommand)),
    ]
}

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

    #[test]
    fn round_trips_and_checks_version() {
        let c = crate::fixtures::click("01J0000000000000000000000A");
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
    fn delivery_id_is_stable_per_conversion_version_and_endpoint() {
        let mut c = crate::fixtures::conversion("cv", "c1");
        let first = c.delivery_id("e");
        assert_eq!(first, c.delivery_id("e"));
        assert_ne!(first, c.delivery_id("f"));
        c.version = 2;
        assert_ne!(first, c.delivery_id("e"));
    }

    /// `schemas/*.schema.json` are what the types say; `S2S_REGENERATE=1 cargo test
    /// --workspace -- schemas_are` rewrites them after a contract change.
    #[test]
    fn schemas_are_the_types_schemas() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        let regenerate = std::env::var_os("S2S_REGENERATE").is_some();
        let mut stale = Vec::new();
        for (name, schema) in schemas() {
            let path = dir.join(format!("{name}.schema.json"));
            let want = serde_json::to_string_pretty(&schema).expect("a schema is JSON") + "\n";
            if regenerate {
                std::fs::write(&path, &want).expect("write the schema");
            }
            if std::fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "{stale:?} differ from the contract's types: regenerate them with \
             S2S_REGENERATE=1 cargo test --workspace -- schemas_are, and review the diff"
        );
        let files = std::fs::read_dir(&dir).expect("schemas/").count();
        assert_eq!(
            files,
            schemas().len() + 1,
            "one file per record type, and README.md"
        );
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
