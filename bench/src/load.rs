//! The HTTP load generator of `compare`: a fixed set of HTTP/1.1 keep-alive connections,
//! each driven by its own task over hyper's per-connection client (no pool, no task per
//! request), so the generator spends as little of the shared CPU as possible.
//!
//! - Closed loop (throughput): each connection sends its next request as soon as the
//!   last one was answered.
//! - Open loop (latency), as wrk2 does it: the rate is split evenly over the connections,
//!   each connection has its own fixed schedule, and latency is measured from each
//!   request's *scheduled* send time. A request that cannot go out on time (the server or
//!   the connection is still busy) carries its wait into its latency, so a stall counts
//!   against the server instead of silently lowering the rate (no coordinated omission).
//!   The generator's own lateness (scheduled → sent while the connection was free) is
//!   recorded apart, so a slow generator is visible.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::Run;

/// One keep-alive connection to `authority` (host:port).
pub(crate) struct Conn {
    authority: String,
    /// `authority` as the Host header, built once.
    host: HeaderValue,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Conn {
    pub(crate) fn new(base: &str) -> anyhow::Result<Self> {
        let authority = base
            .strip_prefix("http://")
            .context("the load generator speaks plain http:// only")?
            .trim_end_matches('/')
            .to_string();
        Ok(Self {
            host: HeaderValue::from_str(&authority).context("host")?,
            authority,
            sender: None,
        })
    }

    pub(crate) async fn connect(&mut self) -> anyhow::Result<&mut SendRequest<Empty<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .with_context(|| format!("connect {}", self.authority))?;
            stream.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .context("handshake")?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        self.sender.as_mut().context("no connection")
    }

    /// Sends one GET and reads the whole answer: Ok(true) for a 2xx or 3xx.
    async fn get(&mut self, path: &str) -> anyhow::Result<bool> {
        // A redirect is the answer a click wants.
        let status = self.status(path).await?;
        Ok(status.is_success() || status.is_redirection())
    }

    /// Sends one GET, reads the whole answer and gives its status.
    pub(crate) async fn status(&mut self, path: &str) -> anyhow::Result<hyper::StatusCode> {
        let host = self.host.clone();
        let sender = self.connect().await?;
        sender.ready().await.context("connection")?;
        let req = Request::get(path)
            .header(hyper::header::HOST, host)
            .body(Empty::new())
            .context("request")?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e).context("send");
            }
        };
        let status = resp.status();
        resp.into_body().collect().await.context("body")?;
        Ok(status)
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// `path` with `{n}` replaced by a number unique within this process, and `{n%K}` by
/// that number modulo K (requests spread over K entities).
fn numbered(path: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut out = path.replace("{n}", &n.to_string());
    while let Some(start) = out.find("{n%") {
        let Some(len) = out[start..].find('}') else {
            break;
        };
        let k: u64 = out[start + 3..start + len].parse().unwrap_or(1).max(1);
        out.replace_range(start..=start + len, &(n % k).to_string());
    }
    out
}

/// The connections' runs as one, timed from `start`.
async fn merge(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Run>>>,
    start: Instant,
    open: bool,
    base: &str,
) -> anyhow::Result<Run> {
    let mut run = Run::empty(open)?;
    for t in tasks {
        run.absorb(t.await??)?;
    }
    run.elapsed = start.elapsed();
    if run.ok == 0 {
        bail!("no request to {base} succeeded");
    }
    Ok(run)
}

/// `connections` open connections, made one after another before a run's clock starts,
/// so that connection set-up is not charged to the run. Connecting hundreds at once inside
/// the run made a few first requests wait about a second (in half the rounds of the 256-
/// and 512-connection runs; most likely a SYN the listener dropped, which TCP retries
/// after one second), which idled those connections for a tenth of a 10 s round.
pub(crate) async fn connect_all(base: &str, connections: usize) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut conn = Conn::new(base)?;
        conn.connect().await?;
        conns.push(conn);
    }
    Ok(conns)
}

/// Sends item `i` of `0..total`, due at `start + i × interval`, to `senders[i mod n]`,
/// from one thread with the operating system's precise sleep (tokio's timer ticks in
/// whole milliseconds). A closed channel means its task failed; the caller's join says
/// why. Dropping the senders at the end ends each task once its queue is empty.
pub(crate) fn dispatch<T: Send + 'static>(
    total: u64,
    interval: Duration,
    start: Instant,
    senders: Vec<tokio::sync::mpsc::UnboundedSender<T>>,
    item: impl Fn(u64, Instant) -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("open-loop".into())
        .spawn(move || {
            let mut i = 0u64;
            while i < total {
                let now = Instant::now();
                let mut due = start + interval.mul_f64(i as f64);
                while due <= now && i < total {
                    let _ = senders[(i % senders.len() as u64) as usize].send(item(i, due));
                    i += 1;
                    due = start + interval.mul_f64(i as f64);
                }
                if i < total {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
            }
        })
}

/// `connections` connections, each sending the next request as soon as the last answered.
pub async fn closed_loop(
    base: &str,
    path: &str,
    connections: usize,
    d: Duration,
) -> anyhow::Result<Run> {
    let conns = connect_all(base, connections).await?;
    let start = Instant::now();
    let deadline = start + d;
    let mut tasks = Vec::with_capacity(connections);
    for mut conn in conns {
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut r = Run::empty(false)?;
            while Instant::now() < deadline {
                let t = Instant::now();
                r.record(conn.get(&numbered(&path)).await, t);
            }
            anyhow::Ok(r)
        }));
    }
    merge(tasks, start, false, base).await
}

/// Sends `rate` requests per second in total for `d` over `connections` connections,
/// measuring from each request's scheduled send time.
///
/// The schedule is kept by one dispatcher thread with the operating system's precise
/// sleep (tokio's timer ticks in whole milliseconds, which alone would add up to 1 ms of
/// lateness to every request): request i is due at `start + i / rate` and goes to
/// connection `i mod connections`, whose task sends it as soon as that connection is free.
pub async fn open_loop(
    base: &str,
    path: &str,
    rate: f64,
    connections: usize,
    d: Duration,
) -> anyhow::Result<Run> {
    let total = (d.as_secs_f64() * rate) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let conns = connect_all(base, connections).await?;
    let mut senders = Vec::with_capacity(connections);
    let mut tasks = Vec::with_capacity(connections);
    for mut conn in conns {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut r = Run::empty(true)?;
            let mut free_at = Instant::now();
            while let Some(scheduled) = rx.recv().await {
                // Late because the generator was not scheduled in time, as opposed to late
                // because this connection's previous request was still being answered.
                let lag = Instant::now().saturating_duration_since(scheduled.max(free_at));
                if let Some(l) = r.lag_us.as_mut() {
                    l.saturating_record(lag.as_micros() as u64);
                }
                r.record(conn.get(&numbered(&path)).await, scheduled);
                free_at = Instant::now();
            }
            anyhow::Ok(r)
        }));
    }
    let start = Instant::now() + Duration::from_millis(20);
    let dispatcher = dispatch(total, interval, start, senders, |_, due| due)?;
    let run = merge(tasks, start, true, base).await;
    dispatcher
        .join()
        .map_err(|_| anyhow::anyhow!("the dispatcher thread panicked"))?;
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn noop_server() -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(crate::serve(listener, None));
        Ok(base)
    }

    #[tokio::test]
    async fn open_loop_sends_exactly_the_schedule() -> anyhow::Result<()> {
        let base = noop_server().await?;
        let run = open_loop(&base, "/x?n={n}", 2000.0, 8, Duration::from_millis(500)).await?;
        assert_eq!(run.ok, 1000, "rate × duration requests, all answered");
        assert_eq!(run.errors, 0);
        assert_eq!(run.latency_us.len(), 1000);
        assert_eq!(run.lag_us.as_ref().map(|l| l.len()), Some(1000));
        // Measured from the schedule: the run cannot end before the last request was due.
        assert!(
            run.elapsed >= Duration::from_millis(499),
            "{:?}",
            run.elapsed
        );
        Ok(())
    }

    #[tokio::test]
    async fn closed_loop_counts_answers_and_failures() -> anyhow::Result<()> {
        let base = noop_server().await?;
        let run = closed_loop(&base, "/", 4, Duration::from_millis(200)).await?;
        assert!(
            run.ok > 0 && run.errors == 0,
            "{} ok, {} errors",
            run.ok,
            run.errors
        );
        assert_eq!(run.latency_us.len(), run.ok);
        // Nobody listening: the connections cannot be opened and the run says so.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            format!("http://{}", l.local_addr()?)
        };
        assert!(closed_loop(&gone, "/", 2, Duration::from_millis(50))
            .await
            .is_err());
        Ok(())
    }
}
