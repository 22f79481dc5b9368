//! The public listener, with what overload looks like designed in:
//!
//! - **Connections** are bounded (`max_connections`): one over the bound gets a canned
//!   503 with `Retry-After` and is closed, at once, without its request being read.
//! - **Requests in flight** are bounded (`max_requests_in_flight`, tower's concurrency
//!   limit): one more is shed at once with 503 `overloaded` + `Retry-After` (tower's
//!   load-shed), before routing — it reads no body and publishes nothing. Admitted
//!   requests keep their latency: their number, and so their wait, is bounded.
//! - **Slow clients** are cut off: a connection has `header_read_timeout` from when it is
//!   ready for a request (just opened, or its previous answer sent) to its request's last
//!   header byte — the keep-alive idle timeout too (hyper runs one clock for both);
//!   the body then has `body_read_timeout` (`api`, 408).
//!
//! - hyper's own answers to heads it cannot parse (400, 414, 431) get the API's JSON
//!   error body ([`JsonErrors`]).
//!
//! Each event is counted once here: `ingest_connections_refused_total`,
//! `ingest_requests_shed_total`, `ingest_connections_closed_total{reason}`, and the
//! gauge `ingest_connections`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::{BoxError, ServiceBuilder, ServiceExt};

use crate::error::ApiError;

mod json_errors;
pub use json_errors::JsonErrors;

/// The bounds, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_requests_in_flight: usize,
    pub header_read_timeout: Duration,
    /// How long shutdown waits for requests in flight before closing their connections.
    pub shutdown_grace: Duration,
}

/// Largest request head (request line and headers) hyper buffers; more is 431 (hyper
/// reads in growing chunks, so a connection holds at most about twice this). It bounds
/// memory per connection: max_connections x this, for clients that all send a
/// near-limit head slowly. The router's tighter bounds ([`crate::api::MAX_URI_BYTES`],
/// 414, and [`crate::api::MAX_HEADER_BYTES`], 431) apply to what fits; a URI too long
/// for this buffer is told 431 (hyper's own 414 starts at 65 534 bytes).
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Connections being refused (answered the canned 503) at once at most; beyond, an
/// excess connection is closed without an answer.
const MAX_REFUSING: usize = 1024;
/// How long a refused connection is given to take its 503 before it is closed.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// File descriptors kept besides the public connections: the listeners, librdkafka's
/// sockets and pipes, the admin server's connections, logs.
const OTHER_DESCRIPTORS: u64 = 512;

/// Raises this process's soft limit on open files to its hard limit (as servers commonly
/// do: the soft default, often 1024, is far below what `max_connections` asks), and
/// refuses to start when `max_connections` still does not fit, saying what to change.
pub fn ensure_descriptors(max_connections: usize) -> Result<u64, String> {
    let need = max_connections as u64 + OTHER_DESCRIPTORS;
    let have = rlimit::increase_nofile_limit(need)
        .map_err(|e| format!("cannot read or raise the open-files limit: {e}"))?;
    if have < need {
        return Err(format!(
            "max_connections = {max_connections} needs {need} open files, and this process \
             may open {have} (its hard limit, `ulimit -Hn`): raise the limit \
             (systemd LimitNOFILE, docker --ulimit nofile) or lower max_connections"
        ));
    }
    Ok(have)
}

/// Why a connection ended, as counted (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client closed it, or keep-alive was off: the normal end.
    Done,
    /// `header_read_timeout` passed without a whole request head.
    HeaderTimeout,
    /// The request head could not be parsed (answered 400, 414 or 431 by hyper).
    BadRequest,
    /// The connection failed (reset, broken pipe) or a body was cut short.
    Error,
}

impl Closed {
    pub const ALL: [Closed; 4] = [
        Closed::Done,
        Closed::HeaderTimeout,
        Closed::BadRequest,
        Closed::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Done => "done",
            Closed::HeaderTimeout => "header_timeout",
            Closed::BadRequest => "bad_request",
            Closed::Error => "error",
        }
    }

    fn of(result: &Result<(), hyper::Error>) -> Closed {
        match result {
            Ok(()) => Closed::Done,
            Err(e) if e.is_timeout() => Closed::HeaderTimeout,
            Err(e) if e.is_parse() || e.is_parse_too_large() => Closed::BadRequest,
            Err(_) => Closed::Error,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServeMetrics {
    pub connections: IntGauge,
    pub refused: IntCounter,
    pub shed: IntCounter,
    pub closed: IntCounterVec,
}

impl ServeMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = ServeMetrics {
            connections: IntGauge::new("ingest_connections", "Open public connections.")?,
            refused: IntCounter::new(
                "ingest_connections_refused_total",
                "Connections answered 503 and closed at once: max_connections were open.",
            )?,
            shed: IntCounter::new(
                "ingest_requests_shed_total",
                "Requests answered 503 overloaded at once: max_requests_in_flight were in flight.",
            )?,
            closed: IntCounterVec::new(
                Opts::new(
                    "ingest_connections_closed_total",
                    "Public connections closed, by reason: done, header_timeout, bad_request, error.",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.shed.clone()))?;
        registry.register(Box::new(m.closed.clone()))?;
        for c in Closed::ALL {
            m.closed.with_label_values(&[c.as_str()]);
        }
        Ok(m)
    }

    fn close(&self, why: Closed, peer: SocketAddr) {
        match why {
            Closed::Done => {}
            Closed::HeaderTimeout | Closed::BadRequest | Closed::Error => {
                tracing::debug!(%peer, reason = why.as_str(), "connection closed");
            }
        }
        self.closed.with_label_values(&[why.as_str()]).inc();
    }
}

/// The answer to a request shed for overload.
pub fn overloaded() -> ApiError {
    ApiError {
        retry_after_s: Some(1),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "ingest has as many requests in flight as it admits; retry after a second",
        )
    }
}

/// The canned answer to a connection over `max_connections`, written before its request
/// is read (so it cannot go through the router).
fn refusal_bytes() -> Vec<u8> {
    let body = serde_json::json!({ "error": ApiError {
        retry_after_s: Some(1),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "ingest has as many connections open as it admits; retry after a second",
        )
    }.body() })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` within `limits` until `shutdown`; then stops accepting,
/// closes idle connections, lets requests in flight finish for `shutdown_grace`, and
/// returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: ServeMetrics,
    shutdown: CancellationToken,
) {
    let shed = metrics.shed.clone();
    let service = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(move |e: BoxError| {
            let shed = shed.clone();
            async move {
                if e.is::<tower::load_shed::error::Overloaded>() {
                    tracing::debug!("request shed: max_requests_in_flight in flight");
                    shed.inc();
                    overloaded()
                } else {
                    // The router's error type is Infallible: only the load shedder errs.
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                }
            }
        }))
        .load_shed()
        .concurrency_limit(limits.max_requests_in_flight)
        .service(router);
    // Boxed: the layered service's future is Send for every lifetime only once erased
    // (rustc's "Send is not general enough" otherwise).
    let service = tower::util::BoxCloneSyncService::new(service);

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let http = Arc::new(http);

    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let refusal = Arc::<[u8]>::from(refusal_bytes());
    let graceful = GracefulShutdown::new();

    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of file descriptors or a connection reset before it was
                    // accepted: the listener stays; back off so as not to spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics.refused.inc();
            tracing::debug!(%peer, "connection refused: max_connections open");
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                let refusal = refusal.clone();
                tokio::spawn(async move {
                    refuse(stream, &refusal).await;
                    drop(p);
                });
            }
            continue;
        };
        // Answers leave at once: with Nagle's algorithm an answer written while an
        // earlier segment is unacknowledged waits for that ACK, which the client may
        // delay by up to 40 ms.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
        }
        let service = service.clone();
        let hyper_service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let service = service.clone();
            async move {
                let resp = service.oneshot(req).await.into_response();
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = graceful
            .watch(http.serve_connection(TokioIo::new(JsonErrors::new(stream)), hyper_service));
        let metrics = metrics.clone();
        metrics.connections.inc();
        tokio::spawn(async move {
            let result = conn.await;
            metrics.connections.dec();
            metrics.close(Closed::of(&result), peer);
            drop(permit);
        });
    }

    // No more connections; idle ones close now, busy ones after their answer.
    let open = graceful.count();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(open_at_shutdown = open, grace = ?limits.shutdown_grace, "shutdown grace over with connections open");
        }
    }
}

/// Writes the canned 503, half-closes, and reads what the client sent until it closes
/// (closing with its request unread would reset the connection, and a reset can make
/// the client lose the answer); all within [`REFUSE_TIMEOUT`].
async fn refuse(mut stream: TcpStream, answer: &[u8]) {
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
        stream.write_all(answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;

    const DEADLINE: Duration = Duration::from_secs(10);

    struct Server {
        addr: SocketAddr,
        metrics: ServeMetrics,
        shutdown: CancellationToken,
        served: tokio::task::JoinHandle<()>,
    }

    impl Server {
        async fn start(router: Router, limits: Limits) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let metrics = ServeMetrics::new(&Registry::new()).expect("metrics");
            let shutdown = CancellationToken::new();
            let served = tokio::spawn(serve(
                listener,
                router,
                limits,
                metrics.clone(),
                shutdown.clone(),
            ));
            Server {
                addr,
                metrics,
                shutdown,
                served,
            }
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(DEADLINE, self.served)
                .await
                .expect("serve returns after shutdown")
                .expect("serve task");
        }

        fn closed(&self, why: Closed) -> u64 {
            self.metrics.closed.with_label_values(&[why.as_str()]).get()
        }
    }

    fn limits() -> Limits {
        Limits {
            max_connections: 100,
            max_requests_in_flight: 100,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(1),
        }
    }

    fn hello() -> Router {
        Router::new().route("/", get(|| async { "hello" }))
    }

    /// Sends `bytes` and reads until the server closes, within the deadline.
    async fn exchange(stream: &mut TcpStream, bytes: &[u8]) -> String {
        stream.write_all(bytes).await.expect("write");
        read_to_close(stream).await
    }

    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection within the deadline")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    }

    async fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !f() {
            assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await; // poll
        }
    }

    #[tokio::test]
    async fn a_connection_over_the_bound_gets_a_503_at_once() {
        let server = Server::start(
            hello(),
            Limits {
                max_connections: 2,
                ..limits()
            },
        )
        .await;
        let _a = connect(server.addr).await;
        let _b = connect(server.addr).await;
        eventually("two connections open", || {
            server.metrics.connections.get() == 2
        })
        .await;
        let mut c = connect(server.addr).await;
        let answer = exchange(&mut c, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("\r\nretry-after: 1\r\n"), "{answer}");
        assert!(answer.contains("\"too_many_connections\""), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).expect("a body");
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(json["error"]["code"], "too_many_connections");
        assert_eq!(server.metrics.refused.get(), 1);
        // A freed slot is taken again.
        drop(_a);
        eventually("a slot freed", || server.metrics.connections.get() == 1).await;
        let mut d = connect(server.addr).await;
        let answer = exchange(
            &mut d,
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_request_over_the_bound_is_shed_without_being_handled() {
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
        let release = Arc::new(tokio::sync::Notify::new());
        let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let router = Router::new().route(
            "/hold",
            get({
                let (release, handled) = (release.clone(), handled.clone());
                move || async move {
                    handled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = entered_tx.send(());
                    release.notified().await;
                    "done"
                }
            }),
        );
        let server = Server::start(
            router,
            Limits {
                max_requests_in_flight: 1,
                ..limits()
            },
        )
        .await;
        let mut first = connect(server.addr).await;
        first
            .write_all(b"GET /hold HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        tokio::time::timeout(DEADLINE, entered.recv())
            .await
            .expect("the first request is handled");
        let started = Instant::now();
        let mut second = connect(server.addr).await;
        let answer = exchange(
            &mut second,
            b"GET /hold HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("\r\nretry-after: 1\r\n"), "{answer}");
        assert!(answer.contains("\"overloaded\""), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "shed at once, not after waiting: {:?}",
            started.elapsed()
        );
        assert_eq!(server.metrics.shed.get(), 1);
        assert_eq!(handled.load(std::sync::atomic::Ordering::SeqCst), 1);
        release.notify_one();
        let answer = read_to_close(&mut first).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        server.stop().await;
    }

    #[tokio::test]
    async fn slow_headers_and_idle_keep_alive_are_cut_off() {
        let server = Server::start(
            hello(),
            Limits {
                header_read_timeout: Duration::from_millis(200),
                ..limits()
            },
        )
        .await;
        // Half a request head, then nothing.
        let mut slow = connect(server.addr).await;
        let answer = exchange(&mut slow, b"GET / HTTP/1.1\r\nhost: x\r\nx-a: ").await;
        assert!(!answer.contains("200"), "{answer}");
        eventually("counted", || server.closed(Closed::HeaderTimeout) == 1).await;
        // A whole request is answered; the connection then idles past the timeout.
        let mut idle = connect(server.addr).await;
        let answer = exchange(&mut idle, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");
        eventually("counted", || server.closed(Closed::HeaderTimeout) == 2).await;
        server.stop().await;
    }

    #[tokio::test]
    async fn heads_hyper_refuses_get_the_json_error_body() {
        let server = Server::start(hello(), limits()).await;
        let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
        let many_headers = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(101));
        for (request, status, code) in [
            (b"GET /\x01 HTTP/1.1\r\n\r\n".to_vec(), "400", "bad_request"),
            (
                b"GET / HTTP/1.1\r\nbad header\r\n\r\n".to_vec(),
                "400",
                "bad_request",
            ),
            (long_uri.into_bytes(), "431", "headers_too_large"),
            (many_headers.into_bytes(), "431", "headers_too_large"),
        ] {
            let mut c = connect(server.addr).await;
            let answer = exchange(&mut c, &request).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{answer}"
            );
            let body = answer.split("\r\n\r\n").nth(1).expect("a body");
            let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
            assert_eq!(json["error"]["code"], code, "{answer}");
        }
        assert_eq!(server.closed(Closed::BadRequest), 4);
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections() {
        let server = Server::start(hello(), limits()).await;
        let mut idle = connect(server.addr).await;
        idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut first = [0u8; 17];
        idle.read_exact(&mut first).await.expect("answer");
        assert_eq!(&first, b"HTTP/1.1 200 OK\r\n");
        server.shutdown.cancel();
        read_to_close(&mut idle).await;
        tokio::time::timeout(DEADLINE, server.served)
            .await
            .expect("serve returns")
            .expect("task");
    }
}
