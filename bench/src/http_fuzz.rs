//! The HTTP-level fuzz run (`scripts/fuzz --http`): a million requests made from the
//! OpenAPI document the running ingest serves, a quarter of them broken on purpose and a
//! fifth as mangled bytes (see `http_fuzz/gen.rs`), against the release binary on the
//! broker, each on its own connection, `--concurrency` at a time. Then, for every one:
//!
//! - ingest is still running and logged no panic (a crash ends the run at once);
//! - no answer 5xx other than 503 (overload or the broker), and every request that is
//!   well-formed HTTP got an answer;
//! - the broker holds exactly what was acknowledged: the clicks and postbacks topics are
//!   read from the beginning and every marker on them is matched to its request. A
//!   request answered 2xx (a click's 302) must be there — for a batch, each record its
//!   answer calls accepted —, one answered otherwise must not, nor a batch record the
//!   answer calls rejected; and a request that was acknowledged has no refusal event.
//!
//! Each failure's request is written to `<dir>/findings/<n>.http` and named with the
//! command that sends it again.

mod gen;
mod mutate;
mod schema;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use s2s_common::pipeline::PipelineConfig;
use s2s_common::topics::{TopicConfig, TopicsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::e2e::{free_port, Service};
use gen::{Generator, Kind, Stores};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    #[arg(long, default_value_t = 1_000_000)]
    pub requests: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Send only request N of the seed (a finding, again).
    #[arg(long)]
    pub only: Option<u64>,
    /// Requests in flight, each on its own connection.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

/// What one request got.
struct Outcome {
    n: u64,
    kind: Kind,
    op: u16,
    statuses: Vec<u16>,
    /// Markers of the records it carried.
    markers: Vec<u32>,
    /// Markers the answer acknowledged (a 2xx for one record; the accepted ones of a
    /// batch), when it can be told; `None`: the answer does not say (several answers, a
    /// body that is not the batch result).
    acked: Option<Vec<u32>>,
    /// No answer at all within the client's limit, or bytes that are no response.
    error: Option<&'static str>,
    /// The client closed its side after sending: ingest may have stopped a request in
    /// the middle of it (hyper ends a connection whose client left), after its record
    /// was handed to the producer but before the answer.
    half_closed: bool,
}

impl Outcome {
    fn any_success(&self) -> bool {
        self.statuses.iter().any(|s| (200..400).contains(s))
    }
}

/// The client waits this long for ingest to answer and close (its timeouts are 2 s).
const CLIENT_LIMIT: Duration = Duration::from_secs(20);

pub async fn run(brokers: &str, bins: &Path, dir: &Path, opts: Options) -> anyhow::Result<()> {
    rlimit::increase_nofile_limit(opts.concurrency as u64 * 2 + 1024)
        .context("raising the open-files limit")?;
    let run = format!("hf-{}", ulid::Ulid::new().to_string().to_lowercase());
    let mut pipeline = PipelineConfig::defaults();
    pipeline.kafka.bootstrap_servers = brokers.to_string();
    pipeline.topics = TopicsConfig::named(&run, 3);
    s2s_common::kafka::ensure_topics(&pipeline.kafka, &pipeline.topics, Duration::from_secs(30))
        .await?;
    seed_offers(&pipeline).await?;
    let (port, admin) = (free_port()?, free_port()?);
    std::fs::write(dir.join("pipeline.toml"), pipeline.to_toml())?;
    let config = dir.join("ingest.toml");
    std::fs::write(&config, ingest_config(port, admin))?;
    let log = dir.join("ingest.log");
    let mut ingest = Service::spawn("ingest", &bins.join("ingest"), &config, &log)?;
    crate::catalog::ready(
        &format!("http://127.0.0.1:{admin}"),
        Duration::from_secs(60),
    )
    .await?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let doc = reqwest::get(format!("http://{addr}/openapi.json"))
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let doc: serde_json::Value =
        serde_json::from_slice(&doc).context("ingest's OpenAPI document")?;
    // Letters only, so that a marker is one token in any encoding.
    let tag: String = {
        let mut rng = fastrand::Rng::with_seed(opts.seed ^ 0x5eed);
        (0..6).map(|_| rng.lowercase()).collect::<String>() + "q"
    };
    let generator = Arc::new(Generator::new(doc, &tag, opts.seed));
    println!(
        "http fuzz: {} operations from the served document, seed {}, marker tag {tag}, ingest log {}",
        generator.operations().len(),
        opts.seed,
        log.display()
    );

    let (first, total) = match opts.only {
        Some(n) => (n, 1),
        None => (0, opts.requests),
    };
    let next = Arc::new(AtomicU64::new(first));
    let end = first + total;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.min(total as usize).max(1) {
        let (generator, next) = (generator.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= end {
                    break;
                }
                outcomes.push(send(&generator, addr, n).await);
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::with_capacity(total as usize);
    let mut last_report = Instant::now();
    while workers.iter().any(|w| !w.is_finished()) {
        tokio::time::sleep(Duration::from_millis(200)).await; // the watch's resolution
        if let Some(status) = ingest.exited() {
            bail!(
                "ingest exited during the run ({status}) near request {}: see {}",
                next.load(Ordering::Relaxed),
                log.display()
            );
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let sent = next.load(Ordering::Relaxed).min(end) - first;
            println!(
                "  {sent} sent, {:.0}/s",
                sent as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    for w in workers {
        outcomes.extend(w.await?);
    }
    let elapsed = started.elapsed();
    if let Some(status) = ingest.exited() {
        bail!(
            "ingest exited at the end of the run ({status}): see {}",
            log.display()
        );
    }
    crate::catalog::ready(
        &format!("http://127.0.0.1:{admin}"),
        Duration::from_secs(10),
    )
    .await
    .context("ingest is not ready after the run")?;

    let expected: usize = outcomes
        .iter()
        .filter_map(|o| o.acked.as_ref().map(Vec::len))
        .sum();
    let stored = read_markers(
        &pipeline,
        &[&pipeline.topics.clicks, &pipeline.topics.postbacks],
        &tag,
        expected,
        Duration::from_secs(300),
    )?;
    let refusals = read_markers(
        &pipeline,
        &[&pipeline.topics.refusals],
        &tag,
        0,
        Duration::from_secs(60),
    )?;
    drop(ingest);
    let panics = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("panicked"))
        .count();

    let stores: Vec<Stores> = generator.operations().iter().map(|o| o.stores).collect();
    let verdict = judge(&outcomes, &stores, &stored, &refusals);
    report(
        &generator,
        &outcomes,
        &verdict,
        elapsed,
        stored.len(),
        panics,
    );
    let findings = dir.join("findings");
    for (n, why) in verdict.findings.iter().take(50) {
        std::fs::create_dir_all(&findings)?;
        let path = findings.join(format!("{n}.http"));
        // The same bytes as sent, but a signed one is signed anew (its timestamp moved).
        std::fs::write(&path, &generator.request(*n, now_s()).bytes)?;
        println!(
            "  finding: request {n}: {why} ({}; again: scripts/fuzz --http --seed {} --only {n})",
            path.display(),
            opts.seed
        );
    }
    let failed = verdict.findings.len() + panics;
    println!(
        "http-fuzz: {} requests, {} findings, {} panics logged, ingest up at the end{}",
        outcomes.len(),
        verdict.findings.len(),
        panics,
        if failed == 0 { "" } else { " NOT MET" }
    );
    if failed > 0 {
        bail!("the HTTP fuzz run found {failed} problems");
    }
    Ok(())
}

/// Sends request `n` on a connection of its own and reads until ingest closes it.
async fn send(generator: &Generator, addr: std::net::SocketAddr, n: u64) -> Outcome {
    let req = generator.request(n, now_s());
    let op = &generator.operations()[req.op];
    let mut outcome = Outcome {
        n,
        kind: req.kind,
        op: req.op as u16,
        statuses: Vec::new(),
        markers: req.markers.clone(),
        acked: None,
        error: None,
        half_closed: req.half_close,
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        // Ingest may answer (and close) before the whole request is written (a head too
        // large): what it wrote is read either way.
        let written = s.write_all(&req.bytes).await;
        if written.is_ok() && req.half_close {
            let _ = s.shutdown().await;
        }
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = match tokio::time::timeout(CLIENT_LIMIT, exchange).await {
        Ok(Ok(buf)) => buf,
        Ok(Err(_)) => {
            outcome.error = Some("could not connect");
            return outcome;
        }
        Err(_) => {
            outcome.error = Some("no close within the client's limit");
            return outcome;
        }
    };
    let head = req.bytes.starts_with(b"HEAD ");
    let answers = wire::parse(&buf, head);
    if answers.statuses.is_empty() {
        outcome.error = Some(if buf.is_empty() {
            "closed without an answer"
        } else {
            "bytes that are no HTTP response"
        });
    }
    // A raw request may hold several (a copy, a cut one): which answer is whose is not
    // known, so only "nothing acknowledged, nothing stored" is checked for it.
    let one = req.kind != Kind::Raw;
    if let ([status], Some(body), true) = (answers.statuses.as_slice(), &answers.body, one) {
        let success = (200..400).contains(status);
        outcome.acked = match op.stores {
            Stores::One if success => Some(req.markers.clone()),
            Stores::One => Some(Vec::new()),
            Stores::Batch if success => batch_accepted(body).map(|accepted| {
                req.markers
                    .iter()
                    .copied()
                    .filter(|i| accepted.contains(i))
                    .collect()
            }),
            Stores::Batch => Some(Vec::new()),
            Stores::Unchecked => None,
        };
    }
    outcome.statuses = answers.statuses;
    outcome
}

/// The record indexes a batch answer calls accepted.
fn batch_accepted(body: &[u8]) -> Option<HashSet<u32>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(
        v.get("results")?
            .as_array()?
            .iter()
            .filter(|r| r.get("status").and_then(|s| s.as_str()) == Some("accepted"))
            .filter_map(|r| r.get("index")?.as_u64())
            .map(|i| i as u32)
            .collect(),
    )
}

#[derive(Default)]
struct Verdict {
    /// Request number and what was wrong, in request order.
    findings: BTreeMap<u64, String>,
    /// Requests whose storage was checked, and records found stored.
    checked: u64,
    acked_records: u64,
}

/// The checks of the module header over every outcome; `stored` and `refusals` are the
/// markers (request → records) found on the topics.
fn judge(
    outcomes: &[Outcome],
    stores: &[Stores],
    stored: &HashMap<u64, HashSet<u32>>,
    refusals: &HashMap<u64, HashSet<u32>>,
) -> Verdict {
    let mut v = Verdict::default();
    let mut sent = HashSet::with_capacity(outcomes.len());
    for o in outcomes {
        sent.insert(o.n);
        let mut find = |why: String| {
            v.findings.entry(o.n).or_insert(why);
        };
        if let Some(s) = o.statuses.iter().find(|s| **s >= 500 && **s != 503) {
            find(format!("answered {s}"));
        }
        match o.error {
            Some(e) if o.kind != Kind::Raw => find(format!("{e} ({})", o.kind.name())),
            _ => {}
        }
        if stores[o.op as usize] == Stores::Unchecked {
            continue;
        }
        let here = stored.get(&o.n);
        if !o.any_success() && o.error.is_none() && !o.half_closed {
            if let Some(records) = here {
                find(format!(
                    "answered {:?}, yet records {records:?} are stored",
                    o.statuses
                ));
            }
        }
        if let Some(acked) = &o.acked {
            v.checked += 1;
            v.acked_records += acked.len() as u64;
            for i in &o.markers {
                let is_stored = here.is_some_and(|h| h.contains(i));
                if acked.contains(i) && !is_stored {
                    find(format!(
                        "record {i} acknowledged ({:?}) but not stored",
                        o.statuses
                    ));
                } else if !acked.contains(i) && is_stored {
                    find(format!("record {i} refused ({:?}) but stored", o.statuses));
                }
                if acked.contains(i) && refusals.get(&o.n).is_some_and(|r| r.contains(i)) {
                    find(format!(
                        "record {i} acknowledged, yet a refusal event names it"
                    ));
                }
            }
        }
    }
    for n in stored.keys().filter(|n| !sent.contains(n)) {
        v.findings
            .insert(*n, "stored, but no such request was answered".into());
    }
    v
}

fn report(
    generator: &Generator,
    outcomes: &[Outcome],
    verdict: &Verdict,
    elapsed: Duration,
    stored_requests: usize,
    panics: usize,
) {
    println!(
        "{} requests in {:.0} s ({:.0}/s); {} requests' storage checked: {} records acknowledged, stored requests found {stored_requests}; {panics} panics logged",
        outcomes.len(),
        elapsed.as_secs_f64(),
        outcomes.len() as f64 / elapsed.as_secs_f64(),
        verdict.checked,
        verdict.acked_records,
    );
    for kind in Kind::ALL {
        let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
        for o in outcomes.iter().filter(|o| o.kind == kind) {
            let key = match (o.statuses.first(), o.error) {
                (Some(s), _) => s.to_string(),
                (None, Some(e)) => e.to_string(),
                (None, None) => "?".into(),
            };
            *by_status.entry(key).or_default() += 1;
        }
        println!("  {:8} {by_status:?}", kind.name());
    }
    for (i, op) in generator.operations().iter().enumerate() {
        let of_op = || {
            outcomes
                .iter()
                .filter(move |o| o.op as usize == i && o.kind == Kind::Schema)
        };
        let success = of_op().filter(|o| o.any_success()).count();
        println!(
            "  {:5} {:24} schema-made: {} sent, {success} answered 2xx/3xx",
            op.method,
            op.path,
            of_op().count()
        );
    }
}

/// Markers found on `topics` (from their beginning): request → its records. Reads until
/// `expected` records are found and nothing came for 3 s, or `within` passed.
fn read_markers(
    pipeline: &PipelineConfig,
    topics: &[&TopicConfig],
    tag: &str,
    expected: usize,
    within: Duration,
) -> anyhow::Result<HashMap<u64, HashSet<u32>>> {
    let mut found: HashMap<u64, HashSet<u32>> = HashMap::new();
    let bootstrap = &pipeline.kafka.bootstrap_servers;
    crate::e2e::read_back(bootstrap, topics, expected, within, |payload| {
        markers_in(payload, tag.as_bytes())
            .into_iter()
            .filter(|(n, i)| found.entry(*n).or_default().insert(*i))
            .count()
    })?;
    Ok(found)
}

/// Every `<tag><n>x<i>k<check>` in `bytes` whose check letters are right.
fn markers_in(bytes: &[u8], tag: &[u8]) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(pos) = bytes[at..].windows(tag.len()).position(|w| w == tag) {
        at += pos + tag.len();
        let digits = |from: usize| {
            let len = bytes[from..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let text = std::str::from_utf8(&bytes[from..from + len]).unwrap_or_default();
            (text.parse::<u64>().ok(), from + len)
        };
        let (Some(n), after) = digits(at) else {
            continue;
        };
        if bytes.get(after) != Some(&b'x') {
            continue;
        }
        let (Some(i), after) = digits(after + 1) else {
            continue;
        };
        let Ok(i) = u32::try_from(i) else {
            continue;
        };
        // A marker a mutation changed fails its check letters: no request's.
        if bytes.get(after) == Some(&b'k')
            && bytes.get(after + 1..after + 5) == Some(&gen::check(n, i)[..])
        {
            out.push((n, i));
        }
    }
    out
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Ingest for the run: every kind of source (open, token with aliases and values, HMAC,
/// rate-limited), the pixel on, no per-client click limit to speak of, short read
/// timeouts (a cut request costs its connection 2 s).
fn ingest_config(port: u16, admin: u16) -> String {
    format!(
        r#"listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
header_read_timeout = "2s"
body_read_timeout = "2s"

[click]
rate_limit_per_client = 1000000

[pixel]
enabled = true
cookie = "s2s_click"

[sources.default]
auth = "none"

[sources.tok]
auth = "token"
token = "{token}"
[sources.tok.aliases]
cid = "click_id"
[sources.tok.values.event]
sale = "ftd"

[sources.sig]
auth = "hmac"
hmac_secret = "{secret}"

[sources.limited]
auth = "none"
rate_limit_per_second = 50
"#,
        token = gen::TOKEN,
        secret = gen::SECRET,
    )
}

/// Offers 1 and 2 in the catalog, so that clicks on them are taken.
async fn seed_offers(pipeline: &PipelineConfig) -> anyhow::Result<()> {
    let offer = s2s_common::pipeline::OfferConfig {
        url: "https://offer.example/land?cid={click_id}".into(),
        ..Default::default()
    };
    let file = s2s_catalog::file::CatalogFile {
        offers: [("1".to_string(), offer.clone()), ("2".to_string(), offer)].into(),
        ..Default::default()
    };
    let checks = s2s_console::catalog_checks(&pipeline.postbacks)?;
    let key = s2s_catalog::secrets::SecretKey::of(pipeline)?;
    s2s_catalog::file::import_unelected(
        &pipeline.kafka,
        &pipeline.topics,
        &checks,
        key.as_ref(),
        &file,
        "http-fuzz",
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(n: u64, statuses: &[u16], markers: &[u32], acked: Option<&[u32]>) -> Outcome {
        Outcome {
            n,
            kind: Kind::Schema,
            op: 0,
            statuses: statuses.to_vec(),
            markers: markers.to_vec(),
            acked: acked.map(<[u32]>::to_vec),
            error: None,
            half_closed: false,
        }
    }

    fn set(pairs: &[(u64, &[u32])]) -> HashMap<u64, HashSet<u32>> {
        pairs
            .iter()
            .map(|(n, i)| (*n, i.iter().copied().collect()))
            .collect()
    }

    #[test]
    fn the_broker_must_hold_exactly_what_was_acknowledged() {
        let outcomes = [
            outcome(0, &[200], &[0], Some(&[0])),    // stored: fine
            outcome(1, &[200], &[0], Some(&[0])),    // lost
            outcome(2, &[400], &[0], Some(&[])),     // refused, stored
            outcome(3, &[207], &[0, 1], Some(&[1])), // batch: 0 rejected, stored
            outcome(4, &[500], &[], None),           // a 5xx
            outcome(5, &[503], &[0], Some(&[])),     // refused, nothing stored: fine
            outcome(6, &[200, 400], &[0], None),     // two answers: stored is fine
            outcome(7, &[200], &[0], Some(&[0])),    // stored, and a refusal event
        ];
        let stored = set(&[
            (0, &[0]),
            (2, &[0]),
            (3, &[0, 1]),
            (6, &[0]),
            (7, &[0]),
            (9, &[0]),
        ]);
        let refusals = set(&[(7, &[0])]);
        let v = judge(&outcomes, &[Stores::One], &stored, &refusals);
        let found: Vec<u64> = v.findings.keys().copied().collect();
        assert_eq!(found, vec![1, 2, 3, 4, 7, 9], "{:?}", v.findings);
        assert!(v.findings[&1].contains("not stored"));
        assert!(v.findings[&9].contains("no such request"));
    }

    #[test]
    fn markers_are_found_whole_in_any_payload() {
        let (a, b) = (gen::marker("abcq", 12, 0), gen::marker("abcq", 7, 10));
        // 13 for 12: a digit changed by a mutation, its check letters no longer fit.
        let changed = a.replace("abcq12", "abcq13");
        let payload = format!(
            r#"{{"click_id":"{a}","sub1":"zz{b}","raw":"abcq9","t":"abcq3xz","m":"{changed}"}}"#
        );
        assert_eq!(
            markers_in(payload.as_bytes(), b"abcq"),
            vec![(12, 0), (7, 10)]
        );
    }

    #[test]
    fn a_request_is_the_same_bytes_for_the_same_seed_and_number() {
        let doc: serde_json::Value =
            serde_json::from_str(s2s_ingest::api::OPENAPI).expect("the document");
        let g = Generator::new(doc.clone(), "tagq", 42);
        let h = Generator::new(doc, "tagq", 42);
        for n in 0..200 {
            assert_eq!(
                g.request(n, 1_800_000_000).bytes,
                h.request(n, 1_800_000_000).bytes
            );
        }
    }
}
