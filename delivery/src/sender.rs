//! Sends one postback request over HTTP/1.1 (TLS via the platform's library), with
//! connection pooling, the endpoint's timeout (connect to last body byte) and no redirects
//! followed: a redirect is an answer like any other (a permanent failure).

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderName, HeaderValue, RETRY_AFTER};

use crate::endpoint::Request;
use crate::policy::parse_retry_after;

/// At most this much of an error answer's body is kept for the delivery log.
const SNIPPET_BYTES: usize = 200;
/// Answer bodies are read (so the connection can be reused) up to this size.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why an attempt got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Connect,
    /// Any other transport error (reset, TLS, protocol).
    Network,
    /// The request could not be built (a header value with a line break, say): retrying
    /// will not help.
    InvalidRequest,
    /// Not sent: the endpoint's circuit is open.
    CircuitOpen,
    /// Not sent: no endpoint of that name is configured any more.
    Unconfigured,
}

impl Failure {
    /// A bounded metric label, in the place of a status class.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Connect => "connect_error",
            Failure::Network => "network_error",
            Failure::InvalidRequest => "invalid_request",
            Failure::CircuitOpen => "circuit_open",
            Failure::Unconfigured => "unconfigured",
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub status: Option<u16>,
    pub failure: Option<Failure>,
    /// What went wrong, for people: the transport error, or the start of an error body.
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
    pub latency: Duration,
}

impl Sent {
    /// An answer with `status` after `latency` (tests of the rules that read it).
    #[cfg(test)]
    pub(crate) fn answered(status: u16, latency: Duration) -> Self {
        Sent {
            status: Some(status),
            failure: None,
            error: None,
            retry_after: None,
            latency,
        }
    }

    /// An attempt that was not made.
    pub fn not_sent(failure: Failure, error: String) -> Self {
        Sent {
            status: None,
            failure: Some(failure),
            error: Some(error),
            retry_after: None,
            latency: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
}

impl Sender {
    pub fn new(connect_timeout: Duration, idle_per_host: usize) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(idle_per_host)
            .tcp_nodelay(true)
            .user_agent(concat!("s2s-postback-delivery/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender { client })
    }

    pub async fn send(&self, req: &Request, timeout: Duration) -> Sent {
        let started = Instant::now();
        let built = self.build(req, timeout);
        let mut sent = match built {
            Err(e) => Sent::not_sent(Failure::InvalidRequest, e),
            Ok(rb) => match rb.send().await {
                Err(e) => Sent::not_sent(transport_failure(&e), error_chain(&e)),
                Ok(resp) => answered(resp).await,
            },
        };
        sent.latency = started.elapsed();
        sent
    }

    fn build(&self, req: &Request, timeout: Duration) -> Result<reqwest::RequestBuilder, String> {
        let method = reqwest::Method::from_bytes(req.method.as_str().as_bytes())
            .map_err(|e| e.to_string())?;
        let mut rb = self.client.request(method, &req.url).timeout(timeout);
        for (name, value) in &req.headers {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("header name '{name}' is not valid"))?;
            let v = HeaderValue::from_str(value)
                .map_err(|_| format!("header '{name}' has a value that is not valid in HTTP"))?;
            rb = rb.header(n, v);
        }
        if !req.body.is_empty() {
            rb = rb.body(req.body.clone());
        }
        Ok(rb)
    }
}

async fn answered(mut resp: reqwest::Response) -> Sent {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    // Read the body so that the connection goes back to the pool; keep the start of an
    // error answer for the delivery log.
    let mut body = Vec::new();
    let mut read_error = None;
    while body.len() < MAX_BODY_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => {
                read_error = Some(error_chain(&e));
                break;
            }
        }
    }
    let error = if (200..300).contains(&status) {
        None
    } else {
        let snippet = String::from_utf8_lossy(&body[..body.len().min(SNIPPET_BYTES)])
            .trim()
            .to_string();
        Some(match (snippet.is_empty(), read_error) {
            (_, Some(e)) => format!("HTTP {status}; reading the body failed: {e}"),
            (true, None) => format!("HTTP {status}"),
            (false, None) => format!("HTTP {status}: {snippet}"),
        })
    };
    Sent {
        status: Some(status),
        failure: None,
        error,
        retry_after,
        latency: Duration::ZERO,
    }
}

fn transport_failure(e: &reqwest::Error) -> Failure {
    if e.is_timeout() {
        Failure::Timeout
    } else if e.is_connect() {
        Failure::Connect
    } else if e.is_builder() {
        Failure::InvalidRequest
    } else {
        Failure::Network
    }
}

/// The error with its causes, which reqwest keeps in `source()`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_labels() {
        assert_eq!(Failure::CircuitOpen.label(), "circuit_open");
        assert_eq!(Failure::Connect.label(), "connect_error");
    }
}
