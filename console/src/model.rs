//! How each record the console reads changes the read model (see [`crate::schema`]), as
//! staged writes. Applying a record twice (an at-least-once replay upstream, or after a
//! crash here) changes nothing the second time: entries are keyed by IDs, and counters
//! move only when a record's story entry is new.

use s2s_common::contract::{
    AttemptOutcome, Click, CommandAction, Conversion, DeadLetter, DeliveryAttempt, DeliveryCommand,
    Postback, Refusal, Rejection,
};
use s2s_state::StoreError;
use serde::Serialize;

use crate::schema::{
    conversion_id_key, decode, encode, prefix, story_key, timed, totals_key, value, Cf,
    ConversionRow, DeliveryRow, DeliveryState, EndpointRow, Granularity, Kind, RejectionRow, Stage,
    Totals,
};

/// A decoded input record, with its bytes as published (kept as they are in the story).
#[derive(Debug)]
pub enum Input<'a> {
    Click(&'a [u8], Box<Click>),
    Postback(&'a [u8], Box<Postback>),
    Conversion(&'a [u8], Box<Conversion>),
    Rejection(&'a [u8], Box<Rejection>),
    Attempt(&'a [u8], Box<DeliveryAttempt>),
    DeadLetter(&'a [u8], Box<DeadLetter>),
    Command(&'a [u8], Box<DeliveryCommand>),
    Refusal(&'a [u8], Box<Refusal>),
}

/// A line of the live feed: something new that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveEvent {
    pub kind: Kind,
    pub ts_ms: i64,
    pub click_id: String,
    /// One line for people.
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<String>,
}

/// Stages `input`'s changes; returns the live event if the record was new.
pub fn apply(st: &mut Stage<'_>, input: &Input<'_>) -> Result<Option<LiveEvent>, StoreError> {
    match input {
        Input::Click(raw, c) => {
            let key = c.click_id.as_bytes().to_vec();
            let new = st.get(Cf::Clicks, &key)?.is_none();
            put(st, Cf::Clicks, key, raw.to_vec());
            if new {
                add_totals(st, c.ts_ms, &c.aff_id, &c.offer_id, "", |t| t.clicks += 1)?;
            }
            Ok(None)
        }
        Input::Postback(raw, p) => {
            let new = put_story(st, &p.click_id, Kind::Postback, &p.postback_id, raw)?;
            Ok(new.then(|| LiveEvent {
                kind: Kind::Postback,
                ts_ms: p.ts_ms,
                click_id: p.click_id.clone(),
                summary: format!("postback {} {}", p.event, p.status),
                endpoint: None,
                delivery_id: None,
            }))
        }
        Input::Conversion(raw, c) => {
            let new = put_story(st, &c.click_id, Kind::Conversion, &c.outcome_id, raw)?;
            let row = ConversionRow {
                conversion_id: c.conversion_id.clone(),
                version: c.version,
                click_id: c.click_id.clone(),
                aff_id: c.aff_id.clone(),
                offer_id: c.offer_id.clone(),
                event: c.event.clone(),
                status: c.status.clone(),
                payout: c.payout,
                currency: c.payout_currency.clone(),
                suspicious: c.suspicious,
                event_ts_ms: c.event_ts_ms,
            };
            let id = conversion_id_key(&c.conversion_id, c.version);
            put(
                st,
                Cf::Conversions,
                timed(&[], c.event_ts_ms, &id),
                encode(&row),
            );
            put(
                st,
                Cf::ConversionsByAff,
                timed(&prefix(&c.aff_id), c.event_ts_ms, &id),
                encode(&row),
            );
            if new {
                // Every version counts once, under the conversion's event time (the same in
                // every version): the net payout moves by its delta, and the conversion
                // moves from its previous status to its new one.
                add_totals(st, c.event_ts_ms, &c.aff_id, &c.offer_id, &c.event, |t| {
                    t.count_version(c)
                })?;
            }
            if new {
                // Delivered attempts read before their conversion (the delivery log and
                // the conversions are two topics) found nothing to count under: count
                // them now. An attempt read later counts itself.
                let p = uncounted_key(&c.click_id, &c.conversion_id, c.version, "");
                for (k, v) in st.scan_prefix(Cf::Uncounted, &p)? {
                    let ts: i64 = decode(Cf::Uncounted, &v)?;
                    add_totals(st, ts, &c.aff_id, &c.offer_id, &c.event, |t| {
                        t.deliveries_ok += 1
                    })?;
                    st.delete(Cf::Uncounted, k);
                }
            }
            Ok(new.then(|| LiveEvent {
                kind: Kind::Conversion,
                ts_ms: c.attributed_at_ms,
                click_id: c.click_id.clone(),
                summary: if c.version == 1 {
                    format!(
                        "conversion {} of affiliate {} on offer {}: {} {}, payout {} {}",
                        c.event,
                        c.aff_id,
                        c.offer_id,
                        c.event,
                        c.status,
                        c.payout,
                        c.payout_currency
                    )
                } else {
                    format!(
                        "conversion {} updated to {} (version {})",
                        c.conversion_id, c.status, c.version
                    )
                },
                endpoint: None,
                delivery_id: None,
            }))
        }
        Input::Refusal(raw, r) => {
            // Keyed by its unique ID: a replay lands on itself.
            let id = r.refusal_id.as_bytes();
            put(st, Cf::Refusals, timed(&[], r.ts_ms, id), raw.to_vec());
            put(
                st,
                Cf::RefusalsBySource,
                timed(&prefix(&r.source), r.ts_ms, id),
                raw.to_vec(),
            );
            Ok(None)
        }
        Input::Rejection(raw, r) => {
            let (click_id, postback_id, event, ts) = r.postback.as_ref().map_or(
                (
                    r.click_id().to_string(),
                    String::new(),
                    String::new(),
                    r.click.as_ref().map_or(r.rejected_at_ms, |c| c.ts_ms),
                ),
                |p| {
                    (
                        p.click_id.clone(),
                        p.postback_id.clone(),
                        p.event.clone(),
                        p.ts_ms,
                    )
                },
            );
            let new = put_story(st, &click_id, Kind::Rejection, &r.outcome_id, raw)?;
            let row = RejectionRow {
                outcome_id: r.outcome_id.clone(),
                reason: r.reason.as_str().to_string(),
                detail: r.detail.clone(),
                click_id: click_id.clone(),
                postback_id,
                event,
                ts_ms: ts,
            };
            put(
                st,
                Cf::Rejections,
                timed(&prefix(r.reason.as_str()), ts, r.outcome_id.as_bytes()),
                encode(&row),
            );
            Ok(new.then(|| LiveEvent {
                kind: Kind::Rejection,
                ts_ms: r.rejected_at_ms,
                click_id,
                summary: format!("rejected: {} ({})", r.reason.as_str(), r.detail),
                endpoint: None,
                delivery_id: None,
            }))
        }
        Input::Attempt(raw, a) => attempt(st, raw, a),
        Input::DeadLetter(raw, d) => dead_letter(st, raw, d),
        Input::Command(raw, c) => command(st, raw, c),
    }
}

/// Stages `body` under `key` in `cf`, with its write time where the family expires.
fn put(st: &mut Stage<'_>, cf: Cf, key: Vec<u8>, body: Vec<u8>) {
    st.put(cf, key, value(cf, s2s_common::now_ms(), &body));
}

/// Puts a story entry; whether it is new.
fn put_story(
    st: &mut Stage<'_>,
    click_id: &str,
    kind: Kind,
    id: &str,
    raw: &[u8],
) -> Result<bool, StoreError> {
    let key = story_key(click_id, kind, id);
    let new = st.get(Cf::Story, &key)?.is_none();
    put(st, Cf::Story, key, raw.to_vec());
    Ok(new)
}

/// Adds to the hourly and daily totals of (aff, offer, event) at `ts_ms`.
fn add_totals(
    st: &mut Stage<'_>,
    ts_ms: i64,
    aff: &str,
    offer: &str,
    event: &str,
    f: impl Fn(&mut Totals),
) -> Result<(), StoreError> {
    for g in Granularity::ALL {
        let key = totals_key(g, g.bucket(ts_ms), aff, offer, event);
        let mut t: Totals = match st.get(Cf::Totals, &key)? {
            Some(v) => decode(Cf::Totals, &v)?,
            None => Totals::default(),
        };
        f(&mut t);
        put(st, Cf::Totals, key, encode(&t));
    }
    Ok(())
}

/// The records of one kind in `click_id`'s story, decoded: one prefix read.
fn story_records<T: serde::de::DeserializeOwned>(
    st: &Stage<'_>,
    click_id: &str,
    kind: Kind,
) -> Result<Vec<T>, StoreError> {
    st.scan_prefix(Cf::Story, &story_key(click_id, kind, ""))?
        .iter()
        .map(|(_, v)| decode(Cf::Story, v))
        .collect()
}

/// The conversion `conversion_id` v`version` of `click_id`, if the story has it.
fn conversion_of(
    st: &Stage<'_>,
    click_id: &str,
    conversion_id: &str,
    version: u32,
) -> Result<Option<Conversion>, StoreError> {
    Ok(story_records::<Conversion>(st, click_id, Kind::Conversion)?
        .into_iter()
        .find(|c| c.conversion_id == conversion_id && c.version == version))
}

/// What a delivery record says happened after its attempt number `attempts`: the attempt
/// itself, the dead letter that follows a final failed attempt, or an operator's re-fire
/// of that dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Attempt,
    DeadLetter,
    Refire,
}

impl Step {
    /// The step that put a delivery in `state`.
    fn of(state: DeliveryState) -> Step {
        match state {
            DeliveryState::Delivered | DeliveryState::Retrying | DeliveryState::Failed => {
                Step::Attempt
            }
            DeliveryState::DeadLettered => Step::DeadLetter,
            DeliveryState::Refired => Step::Refire,
        }
    }
}

/// Whether a record of `step` after attempt `attempts` is at least as recent as what the
/// delivery's row shows, and so replaces it. Attempts, dead letters and commands come on
/// three topics, so they may be read in any order: the last attempt of a delivery may come
/// after its dead letter, and a dead letter published again (at least once, upstream) after
/// the re-fire that followed it. Order is (attempt number, step); a replay of the record
/// that wrote the row replaces it with itself.
fn supersedes(old: Option<&DeliveryRow>, attempts: u32, step: Step) -> bool {
    old.is_none_or(|o| (attempts, step) >= (o.attempts, Step::of(o.state)))
}

/// Where a delivered attempt waits for its conversion to be counted under.
fn uncounted_key(click_id: &str, conversion_id: &str, version: u32, attempt_id: &str) -> Vec<u8> {
    [
        prefix(click_id).as_slice(),
        &conversion_id_key(conversion_id, version),
        attempt_id.as_bytes(),
    ]
    .concat()
}

/// When the latest re-fire of `delivery_id` asked at or after `since_ms` was asked, if the
/// click's story has one: a command that came after a dead letter re-fires it.
fn refired_since(
    st: &Stage<'_>,
    click_id: &str,
    delivery_id: &str,
    since_ms: i64,
) -> Result<Option<i64>, StoreError> {
    Ok(
        story_records::<DeliveryCommand>(st, click_id, Kind::Command)?
            .into_iter()
            .filter(|c| {
                c.action == CommandAction::Redeliver
                    && c.requested_at_ms >= since_ms
                    && c.conversion.delivery_id(&c.endpoint) == delivery_id
            })
            .map(|c| c.requested_at_ms)
            .max(),
    )
}

fn load_delivery(st: &Stage<'_>, id: &str) -> Result<Option<DeliveryRow>, StoreError> {
    st.get(Cf::Deliveries, id.as_bytes())?
        .map(|v| decode(Cf::Deliveries, &v))
        .transpose()
}

/// Writes `row` in place of `old`, moving its index entries.
fn write_delivery(st: &mut Stage<'_>, old: Option<&DeliveryRow>, row: &DeliveryRow) {
    let id = row.delivery_id.as_bytes();
    if let Some(o) = old {
        st.delete(
            Cf::DeliveriesByEndpoint,
            timed(&prefix(&o.endpoint), o.updated_ms, id),
        );
        if let Some(dead) = o.dead_at_ms {
            st.delete(Cf::DeadLetters, timed(&[], dead, id));
            st.delete(Cf::DeadByEndpoint, timed(&prefix(&o.endpoint), dead, id));
        }
    }
    put(
        st,
        Cf::DeliveriesByEndpoint,
        timed(&prefix(&row.endpoint), row.updated_ms, id),
        Vec::new(),
    );
    if let Some(dead) = row.dead_at_ms {
        put(st, Cf::DeadLetters, timed(&[], dead, id), Vec::new());
        put(
            st,
            Cf::DeadByEndpoint,
            timed(&prefix(&row.endpoint), dead, id),
            Vec::new(),
        );
    }
    put(st, Cf::Deliveries, id.to_vec(), encode(row));
}

fn update_endpoint(
    st: &mut Stage<'_>,
    endpoint: &str,
    f: impl FnOnce(&mut EndpointRow),
) -> Result<(), StoreError> {
    let key = endpoint.as_bytes().to_vec();
    let mut row: EndpointRow = match st.get(Cf::Endpoints, &key)? {
        Some(v) => decode(Cf::Endpoints, &v)?,
        None => EndpointRow {
            endpoint: endpoint.to_string(),
            ..EndpointRow::default()
        },
    };
    f(&mut row);
    put(st, Cf::Endpoints, key, encode(&row));
    Ok(())
}

fn attempt(
    st: &mut Stage<'_>,
    raw: &[u8],
    a: &DeliveryAttempt,
) -> Result<Option<LiveEvent>, StoreError> {
    let id = format!("{}/{:010}", a.delivery_id, a.attempt);
    let new = put_story(st, &a.click_id, Kind::Attempt, &id, raw)?;
    let old = load_delivery(st, &a.delivery_id)?;
    if supersedes(old.as_ref(), a.attempt, Step::Attempt) {
        let state = match (a.outcome, a.next_attempt_at_ms) {
            (AttemptOutcome::Delivered, _) => DeliveryState::Delivered,
            (_, Some(_)) => DeliveryState::Retrying,
            (_, None) => DeliveryState::Failed,
        };
        let row = DeliveryRow {
            delivery_id: a.delivery_id.clone(),
            click_id: a.click_id.clone(),
            conversion_id: a.conversion_id.clone(),
            version: a.conversion_version,
            endpoint: a.endpoint.clone(),
            state,
            attempts: a.attempt,
            last_status: a.status_code,
            last_error: a.error.clone(),
            next_attempt_at_ms: a.next_attempt_at_ms,
            updated_ms: a.ts_ms,
            dead_at_ms: None,
        };
        write_delivery(st, old.as_ref(), &row);
    }
    if !new {
        return Ok(None);
    }
    let delivered = a.outcome == AttemptOutcome::Delivered;
    update_endpoint(st, &a.endpoint, |e| {
        e.attempts += 1;
        e.last_attempt_ms = Some(a.ts_ms);
        if delivered {
            e.delivered += 1;
        } else {
            e.failed_attempts += 1;
            e.last_error = a
                .error
                .clone()
                .or_else(|| a.status_code.map(|s| format!("HTTP {s}")));
            e.last_error_status = a.status_code;
            e.last_error_ms = Some(a.ts_ms);
            e.last_error_delivery_id = Some(a.delivery_id.clone());
        }
    })?;
    if delivered {
        match conversion_of(st, &a.click_id, &a.conversion_id, a.conversion_version)? {
            Some(c) => add_totals(st, a.ts_ms, &c.aff_id, &c.offer_id, &c.event, |t| {
                t.deliveries_ok += 1
            })?,
            None => put(
                st,
                Cf::Uncounted,
                uncounted_key(&a.click_id, &a.conversion_id, a.conversion_version, &id),
                encode(&a.ts_ms),
            ),
        }
    }
    Ok(Some(LiveEvent {
        kind: Kind::Attempt,
        ts_ms: a.ts_ms,
        click_id: a.click_id.clone(),
        summary: format!(
            "delivery to {} attempt {}: {}{}",
            a.endpoint,
            a.attempt,
            a.outcome.as_str(),
            a.status_code.map_or_else(
                || a.error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" ({e})")),
                |s| format!(" (HTTP {s})")
            )
        ),
        endpoint: Some(a.endpoint.clone()),
        delivery_id: Some(a.delivery_id.clone()),
    }))
}

fn dead_letter(
    st: &mut Stage<'_>,
    raw: &[u8],
    d: &DeadLetter,
) -> Result<Option<LiveEvent>, StoreError> {
    let c = &d.conversion;
    let id = format!("{}/{:010}", d.delivery_id, d.attempts);
    let new = put_story(st, &c.click_id, Kind::DeadLetter, &id, raw)?;
    let old = load_delivery(st, &d.delivery_id)?;
    if supersedes(old.as_ref(), d.attempts, Step::DeadLetter) {
        let mut row = DeliveryRow {
            delivery_id: d.delivery_id.clone(),
            click_id: c.click_id.clone(),
            conversion_id: c.conversion_id.clone(),
            version: c.version,
            endpoint: d.endpoint.clone(),
            state: DeliveryState::DeadLettered,
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error.clone(),
            next_attempt_at_ms: None,
            updated_ms: d.dead_lettered_at_ms,
            dead_at_ms: Some(d.dead_lettered_at_ms),
        };
        // A re-fire of this dead letter read before it (commands are a third topic).
        if let Some(at) = refired_since(st, &c.click_id, &d.delivery_id, d.dead_lettered_at_ms)? {
            row.state = DeliveryState::Refired;
            row.dead_at_ms = None;
            row.updated_ms = at;
        }
        write_delivery(st, old.as_ref(), &row);
    }
    if !new {
        return Ok(None);
    }
    update_endpoint(st, &d.endpoint, |e| e.dead_lettered += 1)?;
    add_totals(
        st,
        d.dead_lettered_at_ms,
        &c.aff_id,
        &c.offer_id,
        &c.event,
        |t| t.deliveries_dead += 1,
    )?;
    Ok(Some(LiveEvent {
        kind: Kind::DeadLetter,
        ts_ms: d.dead_lettered_at_ms,
        click_id: c.click_id.clone(),
        summary: format!(
            "dead-lettered for {} after {} attempts: {}",
            d.endpoint,
            d.attempts,
            d.last_error.clone().unwrap_or_else(|| d
                .last_status
                .map_or_else(String::new, |s| format!("HTTP {s}")))
        ),
        endpoint: Some(d.endpoint.clone()),
        delivery_id: Some(d.delivery_id.clone()),
    }))
}

fn command(
    st: &mut Stage<'_>,
    raw: &[u8],
    c: &DeliveryCommand,
) -> Result<Option<LiveEvent>, StoreError> {
    let conv = &c.conversion;
    let new = put_story(st, &conv.click_id, Kind::Command, &c.command_id, raw)?;
    let delivery_id = conv.delivery_id(&c.endpoint);
    if new && c.action == CommandAction::Redeliver {
        if let Some(old) = load_delivery(st, &delivery_id)? {
            if old.state != DeliveryState::Delivered {
                let mut row = old.clone();
                row.state = DeliveryState::Refired;
                row.dead_at_ms = None;
                row.updated_ms = c.requested_at_ms;
                write_delivery(st, Some(&old), &row);
            }
        }
    }
    Ok(new.then(|| LiveEvent {
        kind: Kind::Command,
        ts_ms: c.requested_at_ms,
        click_id: conv.click_id.clone(),
        summary: format!(
            "{} to {} asked by {}",
            c.action.as_str(),
            c.endpoint,
            c.requested_by
        ),
        endpoint: Some(c.endpoint.clone()),
        delivery_id: Some(delivery_id),
    }))
}
