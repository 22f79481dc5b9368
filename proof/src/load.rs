//! The load generator: plays a plan's stories through ingest's real HTTP API, many at a
//! time, each story's steps in order (a step is sent once the previous one was answered),
//! and records in a [`Ledger`] every postback ingest accepted, with what it must get.
//!
//! Like a well-behaved operator, it retries a `503` (after its `Retry-After`) and a
//! request that got no answer. Such an attempt may have been stored anyway (the answer
//! was lost, or the broker wrote the record and its acknowledgement was lost), so the
//! ledger counts them: the verifier then allows that many extra `duplicate` rejections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::plan::{Expect, Step, Story};

/// One postback ingest accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub story: usize,
    pub postback_id: String,
    pub click_id: String,
    pub event: String,
    pub txn_id: String,
    pub status: String,
    pub expect: Expect,
    /// Attempts before the accepted one that may have been stored all the same.
    pub ambiguous: u32,
    /// When ingest accepted it (ms since the epoch).
    pub accepted_at_ms: i64,
    /// The affiliate the click was first registered to, when the story knows it before
    /// this postback: a conversion must go to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aff: Option<String>,
    /// The `event_time` sent, if any: a new conversion must carry it as its event time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time_ms: Option<i64>,
    /// Ingest accepted a conflicting registration of the click before this postback:
    /// exactly one `click_conflict` rejection must name the click.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub click_conflict: bool,
    /// Sent through the pixel: the conversion must say `trust: "pixel"`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pixel: bool,
}

/// What the load generator sent and ingest accepted.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: Mutex<Vec<Entry>>,
}

impl Ledger {
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn push(&self, e: Entry) {
        if let Ok(mut v) = self.entries.lock() {
            v.push(e);
        }
    }

    /// One JSON object per line.
    pub fn to_jsonl(&self) -> String {
        self.entries()
            .iter()
            .filter_map(|e| serde_json::to_string(e).ok())
            .map(|l| l + "\n")
            .collect()
    }

    pub fn from_jsonl(text: &str) -> Result<Self, serde_json::Error> {
        let entries = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<Vec<Entry>, _>>()?;
        Ok(Ledger {
            entries: Mutex::new(entries),
        })
    }
}

/// Counters the caller can watch while the load runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub stories_done: AtomicU64,
    pub stories_failed: AtomicU64,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub postbacks_accepted: AtomicU64,
}

impl Progress {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Ingest's base URL, `http://host:port`.
    pub ingest: String,
    /// The query parameter of the offer URL that carries the click ID.
    pub click_param: String,
    /// Stories in flight at once.
    pub concurrency: usize,
    /// Stories started per second at most (`None`: as fast as they complete).
    pub rate: Option<f64>,
    /// A story whose step is still refused after this long is abandoned.
    pub give_up_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Plays `stories`; returns the ledger when all are done or abandoned.
pub async fn run(
    stories: Vec<Story>,
    opts: &Options,
    progress: Arc<Progress>,
) -> Result<Ledger, LoadError> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(opts.concurrency)
        .build()?;
    let ledger = Ledger::default();
    let started = Instant::now();
    let stories = futures::stream::iter(stories.into_iter().enumerate()).map(|(i, story)| {
        let (client, ledger, progress) = (&client, &ledger, &progress);
        async move {
            if let Some(rate) = opts.rate {
                // Open loop: story i starts at i / rate, whatever the others are doing.
                let at = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
            }
            let ok = play(client, opts, &story, ledger, progress).await;
            let counter = if ok {
                &progress.stories_done
            } else {
                &progress.stories_failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    stories
        .buffer_unordered(opts.concurrency.max(1))
        .collect::<Vec<()>>()
        .await;
    Ok(ledger)
}

/// How a request ended.
enum Answer {
    Done(reqwest::Response),
    /// Not stored for sure (a 4xx): a generator bug or a config mismatch.
    Refused(String),
    GaveUp,
}

async fn play(
    client: &reqwest::Client,
    opts: &Options,
    story: &Story,
    ledger: &Ledger,
    progress: &Progress,
) -> bool {
    let mut click_id = String::new();
    // The affiliate the click is registered to, and whether a conflicting registration
    // was accepted (to be refused by the attributor).
    let mut owner: Option<String> = None;
    let mut conflicted = false;
    // `name=value` of the click cookie the redirect set, if it set one.
    let mut cookie: Option<String> = None;
    // When the story's minted click happened.
    let mut click_ts: Option<i64> = None;
    for step in &story.steps {
        match step {
            Step::Click { offer, aff, sub1 } => {
                owner = Some(aff.clone());
                let url = format!(
                    "{}/click?offer_id={offer}&aff_id={aff}&sub1={sub1}",
                    opts.ingest
                );
                let (answer, _) = send(opts, progress, || client.get(&url)).await;
                let Answer::Done(resp) = answer else {
                    return refused(story, answer);
                };
                cookie = resp
                    .headers()
                    .get(reqwest::header::SET_COOKIE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split(';').next())
                    .map(str::to_string);
                let location = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let found = location
                    .split_once('?')
                    .map(|(_, q)| q)
                    .into_iter()
                    .flat_map(|q| form_urlencoded::parse(q.as_bytes()))
                    .find(|(k, _)| *k == opts.click_param)
                    .map(|(_, v)| v.into_owned());
                match found {
                    Some(id) => click_id = id,
                    None => {
                        tracing::error!(location, param = %opts.click_param, "no click ID in the redirect");
                        return false;
                    }
                }
            }
            Step::MintedClick {
                click_id: id,
                offer,
                aff,
                ago_ms,
                conflict,
            } => {
                click_id.clone_from(id);
                let ts_ms = s2s_common::now_ms() - ago_ms;
                if !*conflict {
                    click_ts = Some(ts_ms);
                }
                let body = serde_json::json!({
                    "click_id": id, "offer_id": offer, "aff_id": aff, "ts_ms": ts_ms,
                });
                let url = format!("{}/v1/clicks", opts.ingest);
                let (answer, _) = send(opts, progress, || client.post(&url).json(&body)).await;
                if !matches!(answer, Answer::Done(_)) {
                    return refused(story, answer);
                }
                if *conflict {
                    conflicted = true;
                } else {
                    owner = Some(aff.clone());
                }
            }
            Step::Postback {
                click_id: target,
                event,
                txn_id,
                status,
                expect,
                event_after_click_ms,
            } => {
                let click = target.clone().unwrap_or_else(|| click_id.clone());
                let event_time_ms = match (event_after_click_ms, click_ts) {
                    (Some(after), Some(ts)) => Some(ts + after),
                    (Some(_), None) => {
                        tracing::error!(
                            story = story.id,
                            "an event time needs a minted click first"
                        );
                        return false;
                    }
                    (None, _) => None,
                };
                let mut query = form_urlencoded::Serializer::new(String::new());
                query
                    .append_pair("click_id", &click)
                    .append_pair("event", event)
                    .append_pair("txn_id", txn_id)
                    .append_pair("status", status)
                    .append_pair("amount", "100")
                    .append_pair("currency", "EUR");
                if let Some(t) = event_time_ms {
                    query.append_pair("event_time", &t.to_string());
                }
                let query = query.finish();
                let url = format!("{}/postback?{query}", opts.ingest);
                let (answer, ambiguous) = send(opts, progress, || client.get(&url)).await;
                let Answer::Done(resp) = answer else {
                    return refused(story, answer);
                };
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                let Some(postback_id) = body["postback_id"].as_str() else {
                    tracing::error!(%body, "accepted postback without a postback_id");
                    return false;
                };
                progress.postbacks_accepted.fetch_add(1, Ordering::Relaxed);
                ledger.push(Entry {
                    story: story.id,
                    postback_id: postback_id.to_string(),
                    click_id: click,
                    event: event.clone(),
                    txn_id: txn_id.clone(),
                    status: status.clone(),
                    expect: *expect,
                    ambiguous,
                    accepted_at_ms: s2s_common::now_ms(),
                    aff: owner.clone(),
                    event_time_ms,
                    click_conflict: conflicted,
                    pixel: false,
                });
            }
            Step::Pixel {
                event,
                txn_id,
                status,
                expect,
            } => {
                let Some(cookie) = cookie.clone() else {
                    tracing::error!(
                        story = story.id,
                        "the click set no cookie: a pixel story needs ingest's [pixel] with a \
                         cookie (or --pixel 0)"
                    );
                    return false;
                };
                let query: String = form_urlencoded::Serializer::new(String::new())
                    .append_pair("event", event)
                    .append_pair("txn_id", txn_id)
                    .append_pair("status", status)
                    .finish();
                let url = format!("{}/pixel?{query}", opts.ingest);
                let request = || {
                    client
                        .get(&url)
                        .header(reqwest::header::COOKIE, cookie.as_str())
                };
                let Some((postback_id, ambiguous)) = send_pixel(opts, progress, request).await
                else {
                    return refused(story, Answer::GaveUp);
                };
                progress.postbacks_accepted.fetch_add(1, Ordering::Relaxed);
                ledger.push(Entry {
                    story: story.id,
                    postback_id,
                    click_id: click_id.clone(),
                    event: event.clone(),
                    txn_id: txn_id.clone(),
                    status: status.clone(),
                    expect: *expect,
                    ambiguous,
                    accepted_at_ms: s2s_common::now_ms(),
                    aff: owner.clone(),
                    event_time_ms: None,
                    click_conflict: conflicted,
                    pixel: true,
                });
            }
        }
    }
    true
}

/// Loads the pixel until ingest says it stored the postback (`X-Postback-Id`: the GIF comes
/// whatever happened), or `give_up_after`. Returns the postback ID and how many attempts
/// before it may have been stored.
async fn send_pixel(
    opts: &Options,
    progress: &Progress,
    request: impl Fn() -> reqwest::RequestBuilder,
) -> Option<(String, u32)> {
    let deadline = Instant::now() + opts.give_up_after;
    let mut ambiguous = 0;
    loop {
        let (answer, before) = send(opts, progress, &request).await;
        ambiguous += before;
        let Answer::Done(resp) = answer else {
            return None;
        };
        let id = resp
            .headers()
            .get("x-postback-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(id) = id {
            return Some((id, ambiguous));
        }
        // Not stored (the broker did not acknowledge in time): maybe stored all the same.
        ambiguous += 1;
        progress.retries.fetch_add(1, Ordering::Relaxed);
        if Instant::now() + Duration::from_millis(200) > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // poll: the operator's retry wait
    }
}

fn refused(story: &Story, answer: Answer) -> bool {
    match answer {
        Answer::Refused(why) => {
            tracing::error!(story = story.id, %why, "a step was refused; story abandoned")
        }
        Answer::GaveUp => tracing::warn!(
            story = story.id,
            "a step was not accepted in time; story abandoned"
        ),
        Answer::Done(_) => {}
    }
    false
}

/// Sends until a 2xx/3xx, a 4xx, or `give_up_after`; returns the answer and how many
/// attempts before it may have been stored (no answer, or a 503).
async fn send(
    opts: &Options,
    progress: &Progress,
    request: impl Fn() -> reqwest::RequestBuilder,
) -> (Answer, u32) {
    let deadline = Instant::now() + opts.give_up_after;
    let mut ambiguous = 0;
    loop {
        progress.requests.fetch_add(1, Ordering::Relaxed);
        let wait = match request().send().await {
            Ok(resp) if resp.status().is_success() || resp.status().is_redirection() => {
                return (Answer::Done(resp), ambiguous)
            }
            Ok(resp) if resp.status().as_u16() == 503 || resp.status().as_u16() == 429 => {
                ambiguous += u32::from(resp.status().as_u16() == 503);
                resp.headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or(Duration::from_millis(200), Duration::from_secs)
            }
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                return (Answer::Refused(format!("{status}: {body}")), ambiguous);
            }
            Err(_) => {
                ambiguous += 1;
                Duration::from_millis(200)
            }
        };
        progress.retries.fetch_add(1, Ordering::Relaxed);
        if Instant::now() + wait > deadline {
            return (Answer::GaveUp, ambiguous);
        }
        tokio::time::sleep(wait.min(Duration::from_secs(2))).await; // poll: the operator's retry wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_round_trips_through_jsonl() {
        let ledger = Ledger::default();
        ledger.push(Entry {
            story: 3,
            postback_id: "p".into(),
            click_id: "c".into(),
            event: "ftd".into(),
            txn_id: "T3-1".into(),
            status: "approved".into(),
            expect: Expect::Updated { version: 2 },
            ambiguous: 1,
            accepted_at_ms: 5,
            aff: Some("42".into()),
            event_time_ms: Some(4),
            click_conflict: true,
            pixel: true,
        });
        let back = Ledger::from_jsonl(&ledger.to_jsonl()).expect("parses");
        assert_eq!(back.entries(), ledger.entries());
    }
}
