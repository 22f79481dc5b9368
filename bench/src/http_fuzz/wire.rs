//! Reading back what ingest wrote on a connection: every response in it (a pipelined
//! request gets its own), their statuses, and the first final one's body.

/// What came back on one connection.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answers {
    /// Statuses of the final responses, in order (interim 1xx ones left out).
    pub statuses: Vec<u16>,
    /// The first final response's body, when its length was known.
    pub body: Option<Vec<u8>>,
    /// Bytes left that are not a response (none from a well-behaved server).
    pub garbage: bool,
}

/// Parses `buf`, everything read until the server closed. `head`: the request was a HEAD
/// (its responses have no body whatever their length says).
pub fn parse(buf: &[u8], head: bool) -> Answers {
    let mut out = Answers::default();
    let mut at = 0;
    while at < buf.len() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(&buf[at..]) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) | Err(_) => {
                out.garbage = true;
                break;
            }
        };
        let status = resp.code.unwrap_or(0);
        at += len;
        if (100..200).contains(&status) {
            continue;
        }
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        };
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length: Option<usize> = if head || status == 204 || status == 304 {
            Some(0)
        } else if chunked {
            None
        } else {
            header("content-length")
                .and_then(|v| v.parse().ok())
                .or(Some(buf.len() - at))
        };
        out.statuses.push(status);
        let Some(length) = length.filter(|l| at + l <= buf.len()) else {
            // A chunked or cut body: its status counts, what follows is not read.
            break;
        };
        if out.body.is_none() {
            out.body = Some(buf[at..at + length].to_vec());
        }
        at += length;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_responses_and_interim_ones() {
        let buf = b"HTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}\
            HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nabc";
        let a = parse(buf, false);
        assert_eq!(a.statuses, vec![200, 400]);
        assert_eq!(a.body.as_deref(), Some(&b"{}"[..]));
        assert!(!a.garbage);
    }

    #[test]
    fn a_cut_response_or_garbage_is_said() {
        let a = parse(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 10\r\n\r\nab",
            false,
        );
        assert_eq!(a.statuses, vec![503]);
        assert_eq!(a.body, None);
        let a = parse(b"not http", false);
        assert!(a.statuses.is_empty() && a.garbage);
        let a = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n", true);
        assert_eq!((a.statuses, a.body), (vec![200], Some(Vec::new())));
    }
}
