//! A recording affiliate endpoint: answers postbacks from a script of statuses (then a
//! default status that can be changed while it runs: down, then back), optionally slowly,
//! and records every request — in memory for tests, and as JSON lines in a file for the
//! verifier of a live run (`s2s-proof endpoint`). Also a silent endpoint that accepts
//! connections and never answers. The local run's demo affiliate is one of these.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// One request an endpoint received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Received {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
struct EndpointState {
    received: Mutex<Vec<Received>>,
    /// Statuses to answer with, in order; `status` once used up.
    script: Mutex<std::collections::VecDeque<u16>>,
    /// The answer when the script is used up (200 unless changed).
    status: std::sync::atomic::AtomicU16,
    /// Wait before answering, in ms (0: at once).
    delay_ms: std::sync::atomic::AtomicU64,
    echo: bool,
    /// Sent as `Retry-After` with every scripted non-2xx answer.
    retry_after: Option<String>,
    /// Every request appended as a JSON line.
    log: Option<Mutex<std::fs::File>>,
}

/// An HTTP server that records every request on any path and answers from a script.
#[derive(Debug)]
pub struct TestEndpoint {
    addr: SocketAddr,
    state: Arc<EndpointState>,
    shutdown: CancellationToken,
}

impl TestEndpoint {
    /// Binds `127.0.0.1:0` and answers `script` statuses in order, then 200.
    pub async fn start(script: &[u16]) -> Self {
        Self::bind("127.0.0.1:0".parse().expect("addr"), script, false, None)
            .await
            .expect("bind test endpoint")
    }

    /// Like [`TestEndpoint::start`], with `Retry-After: <value>` on the scripted errors.
    pub async fn start_with_retry_after(script: &[u16], retry_after: &str) -> Self {
        Self::bind(
            "127.0.0.1:0".parse().expect("addr"),
            script,
            false,
            Some(retry_after.to_string()),
        )
        .await
        .expect("bind test endpoint")
    }

    /// Binds `addr`; with `echo`, prints each request to stdout (the demo affiliate).
    pub async fn bind(
        addr: SocketAddr,
        script: &[u16],
        echo: bool,
        retry_after: Option<String>,
    ) -> std::io::Result<Self> {
        Self::serve(addr, script, echo, retry_after, None).await
    }

    /// Binds `addr` and appends every request to `log` as a JSON line ([`Received`]);
    /// with `echo`, prints each one too.
    pub async fn bind_logged(addr: SocketAddr, log: &Path, echo: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Self::serve(addr, &[], echo, None, Some(file)).await
    }

    async fn serve(
        addr: SocketAddr,
        script: &[u16],
        echo: bool,
        retry_after: Option<String>,
        log: Option<std::fs::File>,
    ) -> std::io::Result<Self> {
        let state = Arc::new(EndpointState {
            received: Mutex::new(Vec::new()),
            script: Mutex::new(script.iter().copied().collect()),
            status: std::sync::atomic::AtomicU16::new(200),
            delay_ms: std::sync::atomic::AtomicU64::new(0),
            echo,
            retry_after,
            log: log.map(Mutex::new),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let app = axum::Router::new()
            .fallback(record)
            .with_state(state.clone());
        let s = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await;
        });
        Ok(TestEndpoint {
            addr,
            state,
            shutdown,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` followed by `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Requests received per `webhook-id` (what the verifier needs).
    pub fn by_webhook_id(&self) -> HashMap<String, usize> {
        by_webhook_id(&self.received())
    }

    /// From now on answers `status` once the script is used up (503: the endpoint is
    /// down; 200: it is back).
    pub fn set_status(&self, status: u16) {
        self.state
            .status
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    /// From now on waits `delay` before each answer (past the client's timeout: the
    /// endpoint times out).
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

/// A TCP listener that accepts connections and never answers: a hung endpoint.
#[derive(Debug)]
pub struct SilentEndpoint {
    addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    shutdown: CancellationToken,
}

impl SilentEndpoint {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let (count, stop) = (accepted.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    conn = listener.accept() => if let Ok((socket, _)) = conn {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        held.push(socket);
                    },
                }
            }
        });
        SilentEndpoint {
            addr,
            accepted,
            shutdown,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SilentEndpoint {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestEndpoint {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn record(
    State(state): State<Arc<EndpointState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, &'static str) {
    let r = Received {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    if state.echo {
        println!("demo-affiliate received: {} {}", r.method, uri);
    }
    if let Some(Ok(mut f)) = state.log.as_ref().map(|l| l.lock()) {
        if let Ok(line) = serde_json::to_string(&r) {
            // The verifier reads what was written; a failed write shows up as missing.
            let _ = writeln!(f, "{line}");
        }
    }
    if let Ok(mut v) = state.received.lock() {
        v.push(r);
    }
    let delay = state.delay_ms.load(std::sync::atomic::Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await; // the endpoint is slow
    }
    let status = state
        .script
        .lock()
        .ok()
        .and_then(|mut s| s.pop_front())
        .unwrap_or_else(|| state.status.load(std::sync::atomic::Ordering::SeqCst));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut headers = HeaderMap::new();
    if let (false, Some(ra)) = (status.is_success(), &state.retry_after) {
        if let Ok(v) = ra.parse() {
            headers.insert("retry-after", v);
        }
    }
    (status, headers, "ok\n")
}

/// Requests per `webhook-id`.
pub fn by_webhook_id(received: &[Received]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in received {
        if let Some(id) = r.header("webhook-id") {
            *m.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// Reads a log written by [`TestEndpoint::bind_logged`].
pub fn read_log(path: &Path) -> std::io::Result<Vec<Received>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}
