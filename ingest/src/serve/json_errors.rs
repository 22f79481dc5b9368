//! JSON bodies for the answers hyper writes itself.
//!
//! A request head hyper cannot parse never reaches the router: hyper answers it 400 (a
//! bad byte in the request line or a header), 414 (a URI over 65 534 bytes) or 431 (a
//! head over its buffer, or more than 100 headers) with an empty body, and closes the
//! connection. hyper has no hook for that answer, so this wrapper of the connection's
//! stream recognises it on its way out — a head with one of those statuses, an empty
//! body and no `content-type`, which no answer of ours has (each carries the JSON error
//! body) — and writes the same status with the API's error body instead.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ApiError;

/// A connection's stream; answers pass through unchanged but for hyper's own.
#[derive(Debug)]
pub struct JsonErrors<S> {
    inner: S,
    /// The replacement answer, and how much of it is written.
    pending: Vec<u8>,
    written: usize,
}

impl<S> JsonErrors<S> {
    pub fn new(inner: S) -> Self {
        JsonErrors {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

/// The error hyper's answer stands for, by its status.
fn error_for(status: &[u8]) -> Option<ApiError> {
    let (status, code, message) = match status {
        b"400" => (
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request line or a header is malformed",
        ),
        b"414" => (
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            "the request's URI is too long",
        ),
        b"431" => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            "the request's head is too large or has too many headers",
        ),
        _ => return None,
    };
    Some(ApiError::new(status, code, message))
}

/// The answer to write instead of `buf`, when `buf` is exactly one of hyper's own.
pub fn replacement(buf: &[u8]) -> Option<Vec<u8>> {
    const EMPTY: &[u8] = b"\r\ncontent-length: 0\r\n";
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    let error = error_for(rest.get(..3)?)?;
    // The whole answer is its head: nothing after the blank line.
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if head_end != buf.len() {
        return None;
    }
    let head = &buf[..head_end];
    let lower = head.to_ascii_lowercase();
    if lower.windows(13).any(|w| w == b"content-type:") {
        return None;
    }
    let at = lower.windows(EMPTY.len()).position(|w| w == EMPTY)?;
    let body = serde_json::json!({ "error": error.body() }).to_string();
    let mut out = Vec::with_capacity(head.len() + body.len() + 48);
    out.extend_from_slice(&head[..at]);
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&head[at + EMPTY.len()..]);
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

impl<S: AsyncWrite + Unpin> JsonErrors<S> {
    /// Writes what is left of a replacement answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(answer) = replacement(buf) {
            self.pending = answer;
            self.written = 0;
            // Written as far as the socket takes it now; flush writes the rest. hyper
            // is told its bytes went out.
            if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 18:38:06 GMT\r\n\r\n";

    fn body_of(answer: &[u8]) -> serde_json::Value {
        let text = std::str::from_utf8(answer).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("content-length")
            .parse()
            .expect("a number");
        assert_eq!(len, body.len(), "{text}");
        serde_json::from_str(body).expect("JSON")
    }

    #[test]
    fn hypers_own_answers_get_the_error_body() {
        let out = replacement(HYPER_400).expect("replaced");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
        assert!(
            text.contains("\r\ncontent-type: application/json\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\ndate: Thu, 03 Dec 2026 18:38:06 GMT\r\n"),
            "{text}"
        );
        assert_eq!(body_of(&out)["error"]["code"], "bad_request");
        for (status, code) in [
            ("414 URI Too Long", "uri_too_long"),
            ("431 Request Header Fields Too Large", "headers_too_large"),
        ] {
            let hyper = format!(
                "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n"
            );
            let out = replacement(hyper.as_bytes()).expect("replaced");
            assert_eq!(body_of(&out)["error"]["code"], code);
            assert!(out.starts_with(format!("HTTP/1.1 {status}\r\n").as_bytes()));
        }
    }

    #[test]
    fn our_answers_pass_unchanged() {
        for ours in [
            // Ours carry their body and content-type.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            // Another status, even empty.
            b"HTTP/1.1 302 Found\r\nlocation: https://x/\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            // A head with a body after it, a head cut short, no head at all.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"{\"error\":1}",
            b"",
        ] {
            assert_eq!(replacement(ours), None, "{}", String::from_utf8_lossy(ours));
        }
    }

    #[tokio::test]
    async fn the_replacement_is_written_whole_through_a_slow_stream() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A pipe of 7 bytes: every write is partial.
        let (client, server) = tokio::io::duplex(7);
        let mut wrapped = JsonErrors::new(server);
        let writer = tokio::spawn(async move {
            let n = wrapped.write(HYPER_400).await.expect("write");
            assert_eq!(n, HYPER_400.len(), "hyper is told its bytes went out");
            wrapped.flush().await.expect("flush");
            wrapped.shutdown().await.expect("shutdown");
        });
        let mut client = client;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        writer.await.expect("writer");
        assert_eq!(got, replacement(HYPER_400).expect("replaced"));
    }
}
