//! Reads of the read model over the partition stores an instance owns: a click's whole
//! story (one prefix read per store, never a scan of history), newest-first lists with
//! filters and cursor pagination (merged across stores by their time-ordered index keys),
//! and totals per hour or day.
//!
//! A list cursor is the position after the last row returned (its index key without the
//! list's prefix, hex-encoded): the next page starts below it in every store. Filters the
//! index does not cover are applied while reading, within a budget of rows per page; a
//! page cut short by the budget still returns a cursor, so nothing is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use s2s_common::contract::{Conversion, DeadLetter, DeliveryCommand, Refusal};
use s2s_state::StoreError;
use serde::{Deserialize, Serialize};

use crate::schema::{
    decode, parse_totals_key, prefix, story_kind, timed, totals_range, Cf, ConversionRow,
    DeliveryRow, EndpointRow, Granularity, Kind, RejectionRow, Store, Totals,
};

/// Rows examined per page at most, when filters the index does not cover drop many.
const BUDGET: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cursor is not one this API returned")]
    BadCursor,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent at the end.
    pub next_cursor: Option<String>,
}

/// A time range and a page: `from` inclusive, `to` exclusive, ms since the epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Window {
    #[serde(default, deserialize_with = "number_or_text")]
    pub from: Option<i64>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub to: Option<i64>,
    pub cursor: Option<String>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub limit: Option<usize>,
}

/// A number given either as a number or as text. Query strings carry only text, and
/// serde's `flatten` (which the API's query types use to share [`Window`]) hands the
/// fields over as text instead of letting them be parsed as numbers.
fn number_or_text<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr + serde::Deserialize<'de>,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Number(T),
        Text(String),
    }
    match Option::<Either<T>>::deserialize(d)? {
        None => Ok(None),
        Some(Either::Number(n)) => Ok(Some(n)),
        Some(Either::Text(t)) => t
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{t:?} is not a number: {e}"))),
    }
}

impl Window {
    fn limit(&self) -> usize {
        self.limit.unwrap_or(50).clamp(1, 500)
    }

    fn cursor(&self) -> Result<Option<Vec<u8>>, QueryError> {
        self.cursor
            .as_deref()
            .map(|c| hex::decode(c).map_err(|_| QueryError::BadCursor))
            .transpose()
    }
}

/// One entry of a click's story.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub kind: Kind,
    pub ts_ms: i64,
    pub record: serde_json::Value,
}

/// Everything about one click.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Story {
    pub click_id: String,
    pub click: Option<serde_json::Value>,
    /// Postbacks, outcomes, attempts, dead letters and commands, in time order.
    pub entries: Vec<Entry>,
    /// Where each delivery of the click's conversions is now.
    pub deliveries: Vec<DeliveryRow>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConversionFilter {
    pub aff_id: Option<String>,
    pub offer_id: Option<String>,
    pub event: Option<String>,
    pub status: Option<String>,
    /// Only conversions flagged suspicious (`true`) or only the others (`false`).
    #[serde(default, deserialize_with = "bool_or_text")]
    pub suspicious: Option<bool>,
}

/// A boolean given as a boolean or as the text `true` / `false` (see [`number_or_text`]).
fn bool_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Bool(bool),
        Text(String),
    }
    match Option::<Either>::deserialize(d)? {
        None => Ok(None),
        Some(Either::Bool(b)) => Ok(Some(b)),
        Some(Either::Text(t)) => match t.as_str() {
            "" => Ok(None),
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(serde::de::Error::custom(format!(
                "{t:?} is not true or false"
            ))),
        },
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TotalsRow {
    pub bucket_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aff_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offer_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(flatten)]
    pub totals: Totals,
    /// Conversions ÷ clicks, where there were clicks.
    pub conversion_rate: Option<f64>,
    /// Delivered ÷ (delivered + dead-lettered), where there were any.
    pub delivery_success_rate: Option<f64>,
}

/// Which parts of the key totals are grouped by (the others are summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct GroupBy {
    #[serde(default)]
    pub aff: bool,
    #[serde(default)]
    pub offer: bool,
    #[serde(default)]
    pub event: bool,
}

/// Reads over the stores of the partitions an instance owns.
#[derive(Debug)]
pub struct Reader<'a> {
    stores: &'a [Arc<Store>],
}

/// A source of one list: a store and the index prefix read in it.
type Source<'s> = (&'s Store, Vec<u8>);

impl<'a> Reader<'a> {
    pub fn new(stores: &'a [Arc<Store>]) -> Self {
        Reader { stores }
    }

    pub fn story(&self, click_id: &str) -> Result<Option<Story>, QueryError> {
        let mut click = None;
        let mut entries = Vec::new();
        let mut delivery_ids = BTreeSet::new();
        let p = prefix(click_id);
        for s in self.stores {
            if let Some(v) = s.get(Cf::Clicks, click_id.as_bytes())? {
                click = Some(decode::<serde_json::Value>(Cf::Clicks, &v)?);
            }
            for (k, v) in s.scan(Cf::Story, &p, |k| k.starts_with(&p), usize::MAX)? {
                let Some(kind) = story_kind(&k, p.len()) else {
                    continue;
                };
                let record: serde_json::Value = decode(Cf::Story, &v)?;
                let (ts, delivery) = match kind {
                    Kind::Postback => (record["ts_ms"].as_i64(), None),
                    Kind::Conversion => (record["attributed_at_ms"].as_i64(), None),
                    Kind::Rejection => (record["rejected_at_ms"].as_i64(), None),
                    Kind::Attempt => (
                        record["ts_ms"].as_i64(),
                        record["delivery_id"].as_str().map(str::to_string),
                    ),
                    Kind::DeadLetter => (
                        record["dead_lettered_at_ms"].as_i64(),
                        record["delivery_id"].as_str().map(str::to_string),
                    ),
                    Kind::Command => {
                        let c: DeliveryCommand = decode(Cf::Story, &v)?;
                        let id = c.conversion.delivery_id(&c.endpoint);
                        (Some(c.requested_at_ms), Some(id))
                    }
                };
                delivery_ids.extend(delivery);
                entries.push(Entry {
                    kind,
                    ts_ms: ts.unwrap_or(0),
                    record,
                });
            }
        }
        if click.is_none() && entries.is_empty() {
            return Ok(None);
        }
        entries.sort_by_key(|e| (e.ts_ms, e.kind));
        let mut deliveries = Vec::new();
        for id in delivery_ids {
            if let Some(d) = self.delivery(&id)? {
                deliveries.push(d);
            }
        }
        Ok(Some(Story {
            click_id: click_id.to_string(),
            click,
            entries,
            deliveries,
        }))
    }

    pub fn delivery(&self, id: &str) -> Result<Option<DeliveryRow>, QueryError> {
        for s in self.stores {
            if let Some(v) = s.get(Cf::Deliveries, id.as_bytes())? {
                return Ok(Some(decode(Cf::Deliveries, &v)?));
            }
        }
        Ok(None)
    }

    /// The conversion and endpoint to re-deliver `delivery_id` with: from its dead letter,
    /// else from the conversion in its click's story.
    pub fn refire_source(
        &self,
        delivery_id: &str,
    ) -> Result<Option<(Conversion, DeliveryRow)>, QueryError> {
        let Some(row) = self.delivery(delivery_id)? else {
            return Ok(None);
        };
        let Some(story) = self.story(&row.click_id)? else {
            return Ok(None);
        };
        let mut found = None;
        for e in &story.entries {
            match e.kind {
                Kind::DeadLetter if e.record["delivery_id"] == delivery_id => {
                    let dl: DeadLetter = serde_json::from_value(e.record.clone())
                        .map_err(|e| StoreError::corrupt(Cf::Story, e))?;
                    found = Some(dl.conversion);
                }
                Kind::Conversion
                    if found.is_none()
                        && e.record["conversion_id"] == row.conversion_id.as_str()
                        && e.record["version"] == row.version =>
                {
                    found = Some(
                        serde_json::from_value(e.record.clone())
                            .map_err(|e| StoreError::corrupt(Cf::Story, e))?,
                    );
                }
                _ => {}
            }
        }
        Ok(found.map(|c| (c, row)))
    }

    pub fn conversions(
        &self,
        f: &ConversionFilter,
        w: &Window,
    ) -> Result<Page<ConversionRow>, QueryError> {
        let (cf, p) = match &f.aff_id {
            Some(aff) => (Cf::ConversionsByAff, prefix(aff)),
            None => (Cf::Conversions, Vec::new()),
        };
        let sources = self.stores.iter().map(|s| (&**s, p.clone())).collect();
        list(cf, sources, w, |_, _, v| {
            let row: ConversionRow = decode(cf, v)?;
            let keep = f.offer_id.as_ref().is_none_or(|o| *o == row.offer_id)
                && f.event.as_ref().is_none_or(|e| *e == row.event)
                && f.status.as_ref().is_none_or(|s| *s == row.status)
                && f.suspicious.is_none_or(|s| s == row.suspicious);
            Ok(keep.then_some(row))
        })
    }

    /// Refused postbacks and batch records, newest first: of one source (its index) or
    /// all, of one reason (filtered while reading) or any.
    pub fn refusals(
        &self,
        source: Option<&str>,
        reason: Option<&str>,
        w: &Window,
    ) -> Result<Page<Refusal>, QueryError> {
        let (cf, p) = match source {
            Some(s) => (Cf::RefusalsBySource, prefix(s)),
            None => (Cf::Refusals, Vec::new()),
        };
        let sources = self.stores.iter().map(|s| (&**s, p.clone())).collect();
        list(cf, sources, w, |_, _, v| {
            let r: Refusal = decode(cf, v)?;
            Ok(reason.is_none_or(|x| x == r.reason).then_some(r))
        })
    }

    pub fn rejections(
        &self,
        reason: Option<&str>,
        w: &Window,
    ) -> Result<Page<RejectionRow>, QueryError> {
        let reasons: Vec<&str> = match reason {
            Some(r) => vec![r],
            None => s2s_common::contract::RejectReason::ALL
                .iter()
                .map(|r| r.as_str())
                .collect(),
        };
        let sources = self
            .stores
            .iter()
            .flat_map(|s| reasons.iter().map(move |r| (&**s, prefix(r))))
            .collect();
        list(Cf::Rejections, sources, w, |_, _, v| {
            Ok(Some(decode(Cf::Rejections, v)?))
        })
    }

    /// Deliveries by when they last changed, of one endpoint or all, in one state or any.
    pub fn deliveries(
        &self,
        endpoint: Option<&str>,
        state: Option<&str>,
        w: &Window,
    ) -> Result<Page<DeliveryRow>, QueryError> {
        let endpoints: Vec<String> = match endpoint {
            Some(e) => vec![e.to_string()],
            None => self.endpoints()?.into_iter().map(|e| e.endpoint).collect(),
        };
        let sources = self
            .stores
            .iter()
            .flat_map(|s| endpoints.iter().map(move |e| (&**s, prefix(e))))
            .collect();
        list(Cf::DeliveriesByEndpoint, sources, w, |store, suffix, _| {
            let id = suffix.get(8..).unwrap_or_default();
            let Some(v) = store.get(Cf::Deliveries, id)? else {
                return Ok(None);
            };
            let row: DeliveryRow = decode(Cf::Deliveries, &v)?;
            Ok(state.is_none_or(|s| s == row.state.as_str()).then_some(row))
        })
    }

    /// The deliveries dead-lettered now, newest first, of one endpoint or all.
    pub fn dead_letters(
        &self,
        endpoint: Option<&str>,
        w: &Window,
    ) -> Result<Page<DeliveryRow>, QueryError> {
        let (cf, p) = match endpoint {
            Some(e) => (Cf::DeadByEndpoint, prefix(e)),
            None => (Cf::DeadLetters, Vec::new()),
        };
        let sources = self.stores.iter().map(|s| (&**s, p.clone())).collect();
        list(cf, sources, w, |store, suffix, _| {
            let id = suffix.get(8..).unwrap_or_default();
            store
                .get(Cf::Deliveries, id)?
                .map(|v| decode(Cf::Deliveries, &v))
                .transpose()
        })
    }

    /// Every endpoint seen, with its counts and last error (summed over the stores).
    pub fn endpoints(&self) -> Result<Vec<EndpointRow>, QueryError> {
        let mut all: BTreeMap<String, EndpointRow> = BTreeMap::new();
        for s in self.stores {
            for (_, v) in s.scan(Cf::Endpoints, &[], |_| true, usize::MAX)? {
                let e: EndpointRow = decode(Cf::Endpoints, &v)?;
                merge_endpoint(all.entry(e.endpoint.clone()).or_default(), &e);
            }
        }
        Ok(all.into_values().collect())
    }

    pub fn totals(
        &self,
        g: Granularity,
        from: i64,
        to: i64,
        by: GroupBy,
        aff: Option<&str>,
    ) -> Result<Vec<TotalsRow>, QueryError> {
        let start = totals_range(g, g.bucket(from));
        let end = totals_range(g, to);
        let mut groups: BTreeMap<(i64, String, String, String), Totals> = BTreeMap::new();
        for s in self.stores {
            for (k, v) in s.scan(Cf::Totals, &start, |k| k < end.as_slice(), usize::MAX)? {
                let Some((bucket, a, o, e)) = parse_totals_key(&k) else {
                    continue;
                };
                if aff.is_some_and(|x| x != a) {
                    continue;
                }
                let t: Totals = decode(Cf::Totals, &v)?;
                let key = (
                    bucket,
                    if by.aff { a } else { String::new() },
                    if by.offer { o } else { String::new() },
                    if by.event { e } else { String::new() },
                );
                groups.entry(key).or_default().add(&t);
            }
        }
        Ok(groups
            .into_iter()
            .map(|((bucket, a, o, e), totals)| TotalsRow {
                bucket_ms: bucket,
                aff_id: by.aff.then_some(a),
                offer_id: by.offer.then_some(o),
                event: by.event.then_some(e),
                conversion_rate: (totals.clicks > 0)
                    .then(|| totals.conversions as f64 / totals.clicks as f64),
                delivery_success_rate: (totals.deliveries_ok + totals.deliveries_dead > 0).then(
                    || {
                        totals.deliveries_ok as f64
                            / (totals.deliveries_ok + totals.deliveries_dead) as f64
                    },
                ),
                totals,
            })
            .collect())
    }
}

/// Adds `o`'s counts to `into` and keeps the latest error.
pub fn merge_endpoint(into: &mut EndpointRow, o: &EndpointRow) {
    into.endpoint.clone_from(&o.endpoint);
    into.attempts += o.attempts;
    into.delivered += o.delivered;
    into.failed_attempts += o.failed_attempts;
    into.dead_lettered += o.dead_lettered;
    into.last_attempt_ms = into.last_attempt_ms.max(o.last_attempt_ms);
    if o.last_error_ms > into.last_error_ms {
        into.last_error.clone_from(&o.last_error);
        into.last_error_status = o.last_error_status;
        into.last_error_ms = o.last_error_ms;
        into.last_error_delivery_id
            .clone_from(&o.last_error_delivery_id);
    }
}

/// A newest-first page over time-ordered index entries `[prefix][ts][id]` of several
/// sources, merged by `[ts][id]`. `resolve` turns an entry (store, key suffix, value) into
/// a row, or drops it (a filter).
fn list<T>(
    cf: Cf,
    sources: Vec<Source<'_>>,
    w: &Window,
    resolve: impl Fn(&Store, &[u8], &[u8]) -> Result<Option<T>, StoreError>,
) -> Result<Page<T>, QueryError> {
    let limit = w.limit();
    let cursor = w.cursor()?;
    // Keys hold timestamps as big-endian i64, which sort right for non-negative values
    // only (all timestamps here are).
    let to = w.to.unwrap_or(i64::MAX).max(0);
    let from = w.from.unwrap_or(0).max(0);
    let budget = (BUDGET / sources.len().max(1)).max(limit);
    let mut found: Vec<(Vec<u8>, T)> = Vec::new();
    // The highest position at which a source stopped early: below it, rows may be missing.
    let mut floor: Option<Vec<u8>> = None;
    for (store, p) in &sources {
        let start = match &cursor {
            Some(c) => [p.as_slice(), c].concat(),
            None => timed(p, to, &[]),
        };
        let lowest = timed(p, from, &[]);
        let mut pos = start;
        let (mut matched, mut examined) = (0usize, 0usize);
        'scan: loop {
            let chunk = store.scan_rev(
                cf,
                &pos,
                |k| k.starts_with(p) && k >= lowest.as_slice(),
                limit + 1,
            )?;
            if chunk.is_empty() {
                break;
            }
            let exhausted = chunk.len() <= limit;
            for (k, v) in &chunk {
                if *k == pos {
                    continue; // the cursor itself, or the previous chunk's last row
                }
                examined += 1;
                let suffix = &k[p.len()..];
                if let Some(row) = resolve(store, suffix, v)? {
                    found.push((suffix.to_vec(), row));
                    matched += 1;
                }
                if matched >= limit {
                    break 'scan;
                }
                if examined >= budget {
                    let f = suffix.to_vec();
                    if floor.as_ref().is_none_or(|x| f > *x) {
                        floor = Some(f);
                    }
                    break 'scan;
                }
            }
            match chunk.last() {
                Some((k, _)) if !exhausted => pos = k.clone(),
                _ => break,
            }
        }
    }
    found.sort_by(|a, b| b.0.cmp(&a.0));
    if let Some(f) = &floor {
        found.retain(|(k, _)| k >= f);
    }
    found.truncate(limit);
    let next_cursor = if found.len() == limit {
        found.last().map(|(k, _)| hex::encode(k))
    } else {
        floor.map(hex::encode)
    };
    Ok(Page {
        items: found.into_iter().map(|(_, r)| r).collect(),
        next_cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{apply, Input};
    use crate::schema::{DeliveryState, StoreSet};
    use rust_decimal::Decimal;
    use s2s_common::contract::{
        self, AttemptOutcome, Click, Conversion, DeadLetter, DeliveryAttempt, DeliveryCommand,
        Postback, RejectReason, Rejection,
    };
    use s2s_common::fixtures;
    use s2s_state::Limits;

    fn stores(dir: &std::path::Path, n: i32) -> Vec<Arc<Store>> {
        let set = StoreSet::new(
            dir,
            Limits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                retention_ms: vec![],
            },
        );
        (0..n)
            .map(|p| Arc::new(set.open(p).expect("open")))
            .collect()
    }

    fn click(id: &str, aff: &str, ts: i64) -> Click {
        Click {
            offer_id: "7".into(),
            aff_id: aff.into(),
            ts_ms: ts,
            ..fixtures::click(id)
        }
    }

    fn conversion(click: &str, aff: &str, n: u32, version: u32, ts: i64) -> Conversion {
        Conversion {
            version,
            outcome_id: format!("o-{click}-{n}-{version}"),
            postback_id: format!("p-{click}-{n}-{version}"),
            offer_id: "7".into(),
            aff_id: aff.into(),
            status: if version == 1 { "pending" } else { "approved" }.into(),
            click_ts_ms: ts,
            event_ts_ms: ts,
            received_ts_ms: ts,
            attributed_at_ms: ts + 5,
            ..fixtures::conversion(&format!("cv-{click}-{n}"), click)
        }
    }

    fn attempt(
        c: &Conversion,
        n: u32,
        outcome: AttemptOutcome,
        next: Option<i64>,
        ts: i64,
    ) -> DeliveryAttempt {
        DeliveryAttempt {
            ts_ms: ts,
            next_attempt_at_ms: next,
            ..fixtures::attempt(c, "aff", n, outcome)
        }
    }

    /// The dead letter of `c`'s delivery to "aff" after `attempts` failed attempts.
    fn dead_letter(c: &Conversion, attempts: u32, ts: i64) -> DeadLetter {
        DeadLetter {
            attempts,
            dead_lettered_at_ms: ts,
            ..fixtures::dead_letter(c, "aff")
        }
    }

    /// Alice's re-fire of `c`'s delivery to "aff".
    fn redeliver(c: &Conversion, command_id: &str, ts: i64) -> DeliveryCommand {
        DeliveryCommand {
            requested_at_ms: ts,
            reason: None,
            ..fixtures::redeliver(c, "aff", command_id)
        }
    }

    /// Delivery `id`'s state and attempts, and how many dead letters "aff" has now.
    fn where_is(r: &Reader<'_>, id: &str) -> (Option<(DeliveryState, u32)>, usize) {
        let row = r.delivery(id).expect("read").map(|d| (d.state, d.attempts));
        let dead = r
            .dead_letters(Some("aff"), &Window::default())
            .expect("list")
            .items
            .len();
        (row, dead)
    }

    /// Applies records to the store of their click (by a stand-in partitioner).
    fn feed(stores: &[Arc<Store>], inputs: Vec<(String, Input<'_>)>) {
        for (click, input) in inputs {
            let s = &stores[click.len() % stores.len()];
            let mut st = s.stage();
            apply(&mut st, &input).expect("apply");
            s.commit(st, None).expect("commit");
        }
    }

    #[test]
    fn refusals_newest_first_per_source_and_reason_across_stores() {
        let dir = tempfile::tempdir().expect("dir");
        let st = stores(dir.path(), 2);
        let refusal = |id: &str, source: &str, reason: &str, ts: i64| Refusal {
            source: source.into(),
            reason: reason.into(),
            ts_ms: ts,
            ..fixtures::refusal(id)
        };
        let all = [
            refusal("r1", "acme", "unauthorized", 10),
            refusal("r2", "bingo", "missing_field", 20),
            refusal("r3", "acme", "missing_field", 30),
            refusal("r4", "acme", "unauthorized", 40),
        ];
        let raws: Vec<Vec<u8>> = all.iter().map(s2s_common::contract::encode).collect();
        let inputs = all
            .iter()
            .zip(&raws)
            .map(|(r, raw)| {
                (
                    r.refusal_id.clone() + &r.source,
                    Input::Refusal(raw, Box::new(r.clone())),
                )
            })
            .collect();
        feed(&st, inputs);
        // The same again: a replay changes nothing.
        feed(
            &st,
            vec![(
                "r1acme".into(),
                Input::Refusal(&raws[0], Box::new(all[0].clone())),
            )],
        );
        let r = Reader::new(&st);
        let ids = |p: Page<Refusal>| -> Vec<String> {
            p.items.into_iter().map(|r| r.refusal_id).collect()
        };
        let w = Window::default();
        assert_eq!(
            ids(r.refusals(None, None, &w).expect("read")),
            ["r4", "r3", "r2", "r1"]
        );
        assert_eq!(
            ids(r.refusals(Some("acme"), None, &w).expect("read")),
            ["r4", "r3", "r1"]
        );
        assert_eq!(
            ids(r
                .refusals(Some("acme"), Some("unauthorized"), &w)
                .expect("read")),
            ["r4", "r1"]
        );
        assert_eq!(
            ids(r.refusals(None, Some("missing_field"), &w).expect("read")),
            ["r3", "r2"]
        );
        let first = r
            .refusals(
                Some("acme"),
                None,
                &Window {
                    limit: Some(1),
                    ..Window::default()
                },
            )
            .expect("read");
        let next = Window {
            cursor: first.next_cursor.clone(),
            limit: Some(5),
            ..Window::default()
        };
        assert_eq!(ids(first), ["r4"]);
        assert_eq!(
            ids(r.refusals(Some("acme"), None, &next).expect("read")),
            ["r3", "r1"]
        );
    }

    #[test]
    fn a_clicks_story_and_where_its_delivery_is_now() {
        let dir = tempfile::tempdir().expect("dir");
        let st = stores(dir.path(), 2);
        let ck = click("c1", "42", 1_000);
        let pb = Postback {
            status: "pending".into(),
            ts_ms: 2_000,
            ..fixtures::postback("p-c1-1-1", "c1")
        };
        let cv = conversion("c1", "42", 1, 1, 2_000);
        let a1 = attempt(&cv, 1, AttemptOutcome::Retryable, Some(9_000), 3_000);
        let a2 = attempt(&cv, 2, AttemptOutcome::Retryable, None, 9_000);
        let dl = dead_letter(&cv, 2, 9_001);
        let raw: Vec<Vec<u8>> = vec![
            contract::encode(&ck),
            contract::encode(&pb),
            contract::encode(&cv),
            contract::encode(&a1),
            contract::encode(&a2),
            contract::encode(&dl),
        ];
        feed(
            &st,
            vec![
                ("c1".into(), Input::Click(&raw[0], Box::new(ck))),
                ("c1".into(), Input::Postback(&raw[1], Box::new(pb))),
                (
                    "c1".into(),
                    Input::Conversion(&raw[2], Box::new(cv.clone())),
                ),
                ("c1".into(), Input::Attempt(&raw[3], Box::new(a1.clone()))),
            ],
        );
        let r = Reader::new(&st);
        let d = r
            .delivery(&a1.delivery_id)
            .expect("read")
            .expect("a delivery");
        assert_eq!(
            (d.state, d.attempts, d.next_attempt_at_ms),
            (DeliveryState::Retrying, 1, Some(9_000))
        );
        feed(
            &st,
            vec![
                ("c1".into(), Input::Attempt(&raw[4], Box::new(a2))),
                ("c1".into(), Input::DeadLetter(&raw[5], Box::new(dl))),
            ],
        );
        let story = r.story("c1").expect("read").expect("known click");
        let kinds: Vec<Kind> = story.entries.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::Postback,
                Kind::Conversion,
                Kind::Attempt,
                Kind::Attempt,
                Kind::DeadLetter
            ],
            "in time order"
        );
        assert_eq!(
            story.click.as_ref().map(|c| c["aff_id"].clone()),
            Some("42".into())
        );
        assert_eq!(story.deliveries.len(), 1);
        assert_eq!(story.deliveries[0].state, DeliveryState::DeadLettered);
        let dead = r
            .dead_letters(Some("aff"), &Window::default())
            .expect("list");
        assert_eq!(dead.items.len(), 1);
        let ep = r.endpoints().expect("endpoints");
        assert_eq!(
            (ep[0].attempts, ep[0].failed_attempts, ep[0].dead_lettered),
            (2, 2, 1)
        );
        assert_eq!(ep[0].last_error.as_deref(), Some("HTTP 503: busy"));

        // An operator re-fires it: out of the dead letters, its story says who asked.
        let (conv, row) = r
            .refire_source(&a1.delivery_id)
            .expect("read")
            .expect("source");
        assert_eq!((conv, row.endpoint.as_str()), (cv.clone(), "aff"));
        let cmd = redeliver(&cv, "cmd1", 10_000);
        let a3 = attempt(&cv, 3, AttemptOutcome::Delivered, None, 10_500);
        let raw2 = [contract::encode(&cmd), contract::encode(&a3)];
        feed(
            &st,
            vec![("c1".into(), Input::Command(&raw2[0], Box::new(cmd)))],
        );
        assert_eq!(
            r.delivery(&a1.delivery_id).expect("r").map(|d| d.state),
            Some(DeliveryState::Refired)
        );
        assert!(r
            .dead_letters(None, &Window::default())
            .expect("list")
            .items
            .is_empty());
        feed(
            &st,
            vec![("c1".into(), Input::Attempt(&raw2[1], Box::new(a3)))],
        );
        let story = r.story("c1").expect("read").expect("known");
        assert_eq!(story.deliveries[0].state, DeliveryState::Delivered);
        assert_eq!(
            story
                .entries
                .iter()
                .filter(|e| e.kind == Kind::Command)
                .count(),
            1
        );
        assert!(r.story("nobody").expect("read").is_none());
    }

    /// A re-fire read before the dead letter it re-fires (or before the attempt that led
    /// to it) still takes the delivery out of the dead letters; a later dead-lettering
    /// of the re-fired delivery puts it back.
    #[test]
    fn a_refire_read_before_its_dead_letter_still_refires_it() {
        let dir = tempfile::tempdir().expect("dir");
        let st = stores(dir.path(), 1);
        let r = Reader::new(&st);
        let cv = conversion("c1", "42", 1, 1, 2_000);
        let a2 = attempt(&cv, 2, AttemptOutcome::Retryable, None, 9_000);
        let dl = dead_letter(&cv, 2, 9_001);
        let cmd = redeliver(&cv, "cmd1", 10_000);
        let a4 = attempt(&cv, 4, AttemptOutcome::Retryable, None, 12_000);
        let dl2 = dead_letter(&cv, 4, 12_001);
        let raw = [
            contract::encode(&a2),
            contract::encode(&dl),
            contract::encode(&cmd),
            contract::encode(&a4),
            contract::encode(&dl2),
        ];
        let id = dl.delivery_id.clone();
        feed(
            &st,
            vec![
                ("c1".into(), Input::Command(&raw[2], Box::new(cmd))),
                ("c1".into(), Input::Attempt(&raw[0], Box::new(a2))),
                ("c1".into(), Input::DeadLetter(&raw[1], Box::new(dl))),
            ],
        );
        assert_eq!(
            where_is(&r, &id),
            (Some((DeliveryState::Refired, 2)), 0),
            "re-fired already"
        );
        // The re-fired delivery failed again: a dead letter after the command.
        feed(
            &st,
            vec![
                ("c1".into(), Input::DeadLetter(&raw[4], Box::new(dl2))),
                ("c1".into(), Input::Attempt(&raw[3], Box::new(a4))),
            ],
        );
        assert_eq!(
            where_is(&r, &id),
            (Some((DeliveryState::DeadLettered, 4)), 1)
        );
    }

    /// A delivered attempt counts in the totals once, whether it is read before or after
    /// its conversion (two topics), and a replay of either counts nothing more.
    #[test]
    fn a_delivery_counts_once_in_the_totals_whatever_the_reading_order() {
        for attempt_first in [true, false] {
            let dir = tempfile::tempdir().expect("dir");
            let st = stores(dir.path(), 1);
            let r = Reader::new(&st);
            let cv = conversion("c1", "42", 1, 1, 2_000);
            let ok = attempt(&cv, 1, AttemptOutcome::Delivered, None, 3_000);
            let raw = [contract::encode(&cv), contract::encode(&ok)];
            let conv = || {
                (
                    "c1".to_string(),
                    Input::Conversion(&raw[0], Box::new(cv.clone())),
                )
            };
            let att = || {
                (
                    "c1".to_string(),
                    Input::Attempt(&raw[1], Box::new(ok.clone())),
                )
            };
            let inputs = if attempt_first {
                vec![att(), conv(), att(), conv()]
            } else {
                vec![conv(), att(), conv(), att()]
            };
            feed(&st, inputs);
            let totals = r
                .totals(Granularity::Hour, 0, 10_000, GroupBy::default(), None)
                .expect("totals");
            assert_eq!(
                (
                    totals.iter().map(|t| t.totals.conversions).sum::<u64>(),
                    totals.iter().map(|t| t.totals.deliveries_ok).sum::<u64>(),
                    totals[0].delivery_success_rate,
                ),
                (1, 1, Some(1.0)),
                "attempt read first: {attempt_first}"
            );
            assert!(
                st[0]
                    .scan(Cf::Uncounted, &[], |_| true, 10)
                    .expect("scan")
                    .is_empty(),
                "nothing left waiting for its conversion"
            );
        }
    }

    /// Attempts, dead letters and commands come on three topics: whatever order they are
    /// read in, the delivery ends where its records say it is.
    #[test]
    fn a_delivery_is_where_its_latest_step_says_whatever_the_reading_order() {
        let dir = tempfile::tempdir().expect("dir");
        let st = stores(dir.path(), 1);
        let r = Reader::new(&st);
        let cv = conversion("c1", "42", 1, 1, 2_000);
        let a1 = attempt(&cv, 1, AttemptOutcome::Retryable, Some(9_000), 3_000);
        let a2 = attempt(&cv, 2, AttemptOutcome::Retryable, None, 9_000);
        let dl = dead_letter(&cv, 2, 9_001);
        let cmd = redeliver(&cv, "cmd1", 10_000);
        let a3 = attempt(&cv, 3, AttemptOutcome::Delivered, None, 10_500);
        let raw = [
            contract::encode(&a1),
            contract::encode(&a2),
            contract::encode(&dl),
            contract::encode(&cmd),
            contract::encode(&a3),
        ];
        let id = a1.delivery_id.clone();

        // The dead letter before the final attempt it follows.
        feed(
            &st,
            vec![
                (
                    "c1".into(),
                    Input::DeadLetter(&raw[2], Box::new(dl.clone())),
                ),
                ("c1".into(), Input::Attempt(&raw[1], Box::new(a2))),
                ("c1".into(), Input::Attempt(&raw[0], Box::new(a1))),
            ],
        );
        assert_eq!(
            where_is(&r, &id),
            (Some((DeliveryState::DeadLettered, 2)), 1),
            "still a dead letter to re-fire"
        );

        // Re-fired; then the dead letter again (published twice upstream): still re-fired.
        feed(
            &st,
            vec![
                ("c1".into(), Input::Command(&raw[3], Box::new(cmd))),
                ("c1".into(), Input::DeadLetter(&raw[2], Box::new(dl))),
            ],
        );
        assert_eq!(where_is(&r, &id), (Some((DeliveryState::Refired, 2)), 0));

        // The re-fired attempt moves it on.
        feed(
            &st,
            vec![("c1".into(), Input::Attempt(&raw[4], Box::new(a3)))],
        );
        assert_eq!(where_is(&r, &id), (Some((DeliveryState::Delivered, 3)), 0));
    }

    #[test]
    fn lists_page_newest_first_across_stores_without_gaps_or_repeats() {
        let dir = tempfile::tempdir().expect("dir");
        let st = stores(dir.path(), 3);
        let convs: Vec<Conversion> = (0..120)
            .map(|i| {
                conversion(
                    &format!("c{i}"),
                    if i % 3 == 0 { "7" } else { "8" },
                    i,
                    1,
                    1_000 + i64::from(i),
                )
            })
            .collect();
        let raws: Vec<Vec<u8>> = convs.iter().map(contract::encode).collect();
        feed(
            &st,
            convs
                .iter()
                .zip(&raws)
                .map(|(c, r)| {
                    (
                        c.click_id.clone(),
                        Input::Conversion(r, Box::new(c.clone())),
                    )
                })
                .collect(),
        );
        let r = Reader::new(&st);
        let mut seen = Vec::new();
        let mut w = Window {
            limit: Some(50),
            ..Window::default()
        };
        loop {
            let page = r
                .conversions(&ConversionFilter::default(), &w)
                .expect("page");
            seen.extend(page.items.iter().map(|c| c.event_ts_ms));
            match page.next_cursor {
                Some(c) => w.cursor = Some(c),
                None => break,
            }
        }
        let mut expected: Vec<i64> = (0..120).map(|i| 1_000 + i).rev().collect();
        assert_eq!(seen, expected, "newest first, each once");
        let f = ConversionFilter {
            aff_id: Some("7".into()),
            ..ConversionFilter::default()
        };
        let window = Window {
            from: Some(1_030),
            to: Some(1_060),
            ..Window::default()
        };
        let page = r.conversions(&f, &window).expect("page");
        expected = (1_030..1_060)
            .filter(|t| (t - 1_000) % 3 == 0)
            .rev()
            .collect();
        assert_eq!(
            page.items.iter().map(|c| c.event_ts_ms).collect::<Vec<_>>(),
            expected
        );
        let flagged = ConversionFilter {
            suspicious: Some(true),
            ..ConversionFilter::default()
        };
        assert!(
            r.conversions(&flagged, &Window::default())
                .expect("read")
                .items
                .is_empty(),
            "none flagged"
        );
        let unflagged = ConversionFilter {
            suspicious: Some(false),
            ..ConversionFilter::default()
        };
        assert!(!r
            .conversions(&unflagged, &Window::default())
            .expect("read")
            .items
            .is_empty());
        let by_status = ConversionFilter {
            status: Some("approved".into()),
            ..ConversionFilter::default()
        };
        assert!(r
            .conversions(&by_status, &Window::default())
            .expect("page")
            .items
            .is_empty());
        let bad = Window {
            cursor: Some("zz".into()),
            ..Window::default()
        };
        assert!(matches!(
            r.conversions(&f, &bad),
            Err(QueryError::BadCursor)
        ));
    }

    #[test]
    fn replays_change_nothing_and_totals_add_up() {
        let dir = tempfile::tempdir().expect("dir");
        let st = stores(dir.path(), 1);
        let hour = 3_600_000;
        let clicks: Vec<Click> = (0..4)
            .map(|i| click(&format!("k{i}"), "42", hour + i))
            .collect();
        let cv = conversion("k0", "42", 1, 1, hour + 10);
        let mut replay = cv.clone();
        replay.attributed_at_ms += 999; // only processing time differs
        let rej = Rejection {
            outcome_id: "r1".into(),
            postback: None,
            rejected_at_ms: hour + 20,
            ..fixtures::rejection(fixtures::postback("p", "k0"), RejectReason::Duplicate)
        };
        let raws: Vec<Vec<u8>> = clicks.iter().map(contract::encode).collect();
        let (rc, rr, rj) = (
            contract::encode(&cv),
            contract::encode(&replay),
            contract::encode(&rej),
        );
        let mut inputs: Vec<(String, Input<'_>)> = clicks
            .iter()
            .zip(&raws)
            .map(|(c, r)| (c.click_id.clone(), Input::Click(r, Box::new(c.clone()))))
            .collect();
        inputs.push((
            "k0".into(),
            Input::Click(&raws[0], Box::new(clicks[0].clone())),
        ));
        inputs.push(("k0".into(), Input::Conversion(&rc, Box::new(cv))));
        inputs.push(("k0".into(), Input::Conversion(&rr, Box::new(replay))));
        inputs.push(("k0".into(), Input::Rejection(&rj, Box::new(rej))));
        feed(&st, inputs);
        let r = Reader::new(&st);
        let rows = r
            .totals(Granularity::Hour, 0, 10 * hour, GroupBy::default(), None)
            .expect("totals");
        assert_eq!(rows.len(), 1, "one hour bucket");
        let t = &rows[0];
        assert_eq!(
            (t.bucket_ms, t.totals.clicks, t.totals.conversions),
            (hour, 4, 1)
        );
        assert_eq!(t.totals.payout.get("USD"), Some(&Decimal::new(5000, 2)));
        assert_eq!(t.conversion_rate, Some(0.25));
        let story = r.story("k0").expect("read").expect("story");
        assert_eq!(
            story
                .entries
                .iter()
                .filter(|e| e.kind == Kind::Conversion)
                .count(),
            1,
            "the replay landed on itself"
        );
        assert_eq!(
            r.conversions(&ConversionFilter::default(), &Window::default())
                .expect("p")
                .items
                .len(),
            1
        );
        let rejections = r
            .rejections(Some("duplicate"), &Window::default())
            .expect("p");
        assert_eq!(rejections.items.len(), 1);
        assert!(r
            .rejections(Some("unknown_click"), &Window::default())
            .expect("p")
            .items
            .is_empty());
        let by_day = r
            .totals(
                Granularity::Day,
                0,
                10 * hour,
                GroupBy {
                    aff: true,
                    offer: true,
                    event: true,
                },
                None,
            )
            .expect("totals");
        assert_eq!(by_day.len(), 2, "clicks (no event) and ftd conversions");
    }

    /// History expires (by the stores' compaction filter, at compaction) once past
    /// `retention`; totals by their own retention; endpoint rows never.
    #[test]
    fn history_expires_at_compaction_and_totals_and_endpoints_stay() {
        let dir = tempfile::tempdir().expect("dir");
        let set = StoreSet::new(
            dir.path(),
            Limits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                retention_ms: crate::schema::retention_ms(1, 24 * 3_600_000),
            },
        );
        let st = vec![Arc::new(set.open(0).expect("open"))];
        let ck = click("c1", "42", 1_000);
        let cv = conversion("c1", "42", 1, 1, 2_000);
        let a1 = attempt(&cv, 1, AttemptOutcome::Retryable, Some(9_000), 3_000);
        let raw = [
            contract::encode(&ck),
            contract::encode(&cv),
            contract::encode(&a1),
        ];
        let written = s2s_common::now_ms();
        feed(
            &st,
            vec![
                ("c1".into(), Input::Click(&raw[0], Box::new(ck))),
                ("c1".into(), Input::Conversion(&raw[1], Box::new(cv))),
                ("c1".into(), Input::Attempt(&raw[2], Box::new(a1))),
            ],
        );
        let r = Reader::new(&st);
        assert!(
            r.story("c1").expect("read").is_some(),
            "kept until compaction"
        );
        // Past the 1 ms retention: wait for the clock, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while s2s_common::now_ms() <= written + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock stands still"
            );
            std::thread::yield_now(); // poll: the wall clock
        }
        st[0].flush().expect("flush");
        for cf in <Cf as s2s_state::Family>::ALL {
            st[0].compact(*cf).expect("compact");
        }
        assert!(r.story("c1").expect("read").is_none(), "the story expired");
        let w = Window::default();
        assert!(r
            .conversions(&ConversionFilter::default(), &w)
            .expect("list")
            .items
            .is_empty());
        assert!(r.deliveries(None, None, &w).expect("list").items.is_empty());
        let totals = r
            .totals(Granularity::Hour, 0, 10_000, GroupBy::default(), None)
            .expect("totals");
        assert_eq!(
            totals.iter().map(|t| t.totals.conversions).sum::<u64>(),
            1,
            "totals are kept longer"
        );
        let ep = r.endpoints().expect("endpoints");
        assert_eq!((ep.len(), ep[0].attempts), (1, 1), "endpoint rows are kept");
    }
}
