//! What a broken or hostile client does to a request: [`structure`] changes its fields
//! before it is written, [`bytes`] its bytes after.

use fastrand::Rng;
use serde_json::{Map, Value};

use super::gen::Draft;

/// Values that trip parsers: empty, blank, number grammars, escapes, encodings, sizes.
const NASTY: &[&str] = &[
    "",
    " ",
    "1e3",
    "+5",
    ".5",
    "-1",
    "5 ",
    "0x10",
    "NaN",
    "99999999999999999999999999999999",
    "12.123456789",
    "null",
    "true",
    "[]",
    "{}",
    "\u{0}",
    "a\r\nX-Injected: 1",
    "é日🎉",
    "\u{202e}",
    "%",
    "%%",
    "../../etc/passwd",
    "{click_id}",
    "2026-06-31T00:00:00Z",
    "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59+23:59",
];

/// One change to the fields, headers or body of `d`.
pub fn structure(rng: &mut Rng, d: &mut Draft) {
    match rng.u8(..14) {
        // A field dropped.
        0 if !d.query.is_empty() => {
            let i = rng.usize(..d.query.len());
            d.query.remove(i);
        }
        // A field given twice, with another value.
        1 if !d.query.is_empty() => {
            let (k, _) = d.query[rng.usize(..d.query.len())].clone();
            d.query.push((k, nasty(rng)));
        }
        // A name and its alias both.
        2 => d.query.push(("cid".into(), nasty(rng))),
        // A value replaced by a nasty one.
        3 | 4 if !d.query.is_empty() => {
            let i = rng.usize(..d.query.len());
            d.query[i].1 = nasty(rng);
        }
        // A malformed or odd escape, or stray separators, as written.
        5 => {
            const RAW: &[&str] = &[
                "&amount=%G1",
                "&click_id=%",
                "&event=%f",
                "&&&",
                "&=x",
                "&amount",
                "&%00=1",
                "&sub1=%FF%FE",
                "&amount=1%2E5",
                "&a[b]=c",
                "&;",
            ];
            d.raw_query.push_str(RAW[rng.usize(..RAW.len())]);
        }
        // A huge value, or very many fields.
        6 => {
            let len = [1000, 8000, 20_000, 70_000][rng.usize(..4)];
            d.query.push(("sub2".into(), "A".repeat(len)));
        }
        7 => {
            for i in 0..rng.usize(50..3000) {
                d.query.push((format!("p{i}"), "v".into()));
            }
        }
        // The body's content type wrong or missing, or the body given to a GET.
        8 => match &mut d.body {
            Some((ctype, _)) => {
                const TYPES: &[&str] = &[
                    "text/plain",
                    "application/json; charset=latin1",
                    "application/x-www-form-urlencoded",
                    "application/json",
                    "multipart/form-data; boundary=x",
                    "",
                ];
                *ctype = TYPES[rng.usize(..TYPES.len())].to_string();
            }
            None => d.body = Some(("application/json".into(), b"{\"click_id\":1}".to_vec())),
        },
        // A JSON body changed: a field's type, nesting, size, or its shape.
        9 | 10 => json_body(rng, d),
        // A body cut short or made invalid UTF-8.
        11 => {
            if let Some((_, b)) = &mut d.body {
                if rng.bool() {
                    let at = rng.usize(..=b.len());
                    b.truncate(at);
                } else {
                    b.extend_from_slice(&[0xff, 0xfe, 0xc3]);
                }
            }
        }
        // An odd header: a bad timestamp or signature, a huge one, an unknown encoding.
        12 => {
            const HEADERS: &[(&str, &str)] = &[
                ("X-Timestamp", "not-a-number"),
                ("X-Timestamp", "99999999999999999999"),
                ("X-Signature", "sha256=zz"),
                ("X-Signature", "md5=00"),
                ("Authorization", "Bearer"),
                ("Authorization", "Basic Zm9vOmJhcg=="),
                ("X-Forwarded-For", "1.2.3.4, not-an-ip"),
                ("Content-Encoding", "gzip"),
                ("Expect", "100-continue"),
                ("Cookie", "s2s_click=../../x"),
            ];
            let (k, v) = HEADERS[rng.usize(..HEADERS.len())];
            d.headers.push((k.into(), v.into()));
        }
        // The method changed.
        _ => {
            const METHODS: &[&str] = &["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "GET", "POST"];
            d.method = METHODS[rng.usize(..METHODS.len())].to_string();
        }
    }
}

fn nasty(rng: &mut Rng) -> String {
    NASTY[rng.usize(..NASTY.len())].to_string()
}

fn json_body(rng: &mut Rng, d: &mut Draft) {
    let Some((ctype, body)) = &mut d.body else {
        return;
    };
    if !ctype.starts_with("application/json") {
        return;
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    match rng.u8(..6) {
        0 => {
            if let Some(m) = object_mut(&mut v) {
                let keys: Vec<String> = m.keys().cloned().collect();
                if let Some(k) = keys.get(rng.usize(..keys.len().max(1))) {
                    const VALUES: &[&str] = &[
                        "null",
                        "[1,2]",
                        "{\"a\":1}",
                        "1e400",
                        "-0",
                        "true",
                        "\"\"",
                        "1.0e3",
                    ];
                    let raw = VALUES[rng.usize(..VALUES.len())];
                    m.insert(k.clone(), serde_json::from_str(raw).unwrap_or(Value::Null));
                }
            }
        }
        1 => {
            // Deep nesting.
            let depth = rng.usize(10..400);
            let text = format!("{}{}{}", "[".repeat(depth), 1, "]".repeat(depth));
            *body = text.into_bytes();
            return;
        }
        2 => {
            // More records than a batch takes, or none.
            let one = object_mut(&mut v).map(|m| Value::Object(m.clone()));
            v = Value::Array(match one {
                Some(o) if rng.bool() => vec![o; 1001],
                _ => Vec::new(),
            });
        }
        3 => v = Value::String("not an object".into()),
        4 => {
            // A duplicate key, which JSON allows and ingest refuses.
            let mut text = serde_json::to_string(&v).unwrap_or_default();
            if let Some(at) = text.find('{') {
                text.insert_str(at + 1, "\"event\":\"ftd\",\"event\":\"registration\",");
            }
            *body = text.into_bytes();
            return;
        }
        _ => {
            if let Some(m) = object_mut(&mut v) {
                m.insert(
                    "x".repeat(rng.usize(60..80)),
                    Value::String("long name".into()),
                );
            }
        }
    }
    *body = serde_json::to_vec(&v).unwrap_or_default();
}

/// One change to the bytes of a written request.
pub fn bytes(rng: &mut Rng, b: &mut Vec<u8>) {
    if b.is_empty() {
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    }
    let at = rng.usize(..b.len());
    match rng.u8(..12) {
        0 => {
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..b.len());
                b[i] ^= 1 << rng.u8(..8);
            }
        }
        1 => {
            let n = rng.usize(1..16);
            let junk: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            b.splice(at..at, junk);
        }
        2 => b.truncate(at),
        3 => {
            let end = (at + rng.usize(1..64)).min(b.len());
            b.drain(at..end);
        }
        // The request twice (pipelined), or its head twice.
        4 => {
            let copy = b.clone();
            b.extend_from_slice(&copy);
        }
        // Line ends as bare LF, or bare CR.
        5 => {
            let to: &[u8] = if rng.bool() { b"\n" } else { b"\r" };
            *b = replace(b, b"\r\n", to);
        }
        // A broken request line.
        6 => {
            const LINES: &[&[u8]] = &[
                b"GET",
                b"GET  /postback HTTP/1.1",
                b"\x00\x01\x02",
                b"GET /postback HTTP/9.9",
                b"GET /postback HTTP/1.0",
                b"GET http://evil.test/postback HTTP/1.1",
                b"GET * HTTP/1.1",
                b"BREW /postback HTTP/1.1",
                b"GET /postback?\xff\xfe HTTP/1.1",
            ];
            let end = b.iter().position(|c| *c == b'\r').unwrap_or(b.len());
            b.splice(..end, LINES[rng.usize(..LINES.len())].iter().copied());
        }
        // Framing: two lengths, a wrong one, chunked with bad sizes.
        7 => insert_header(b, b"Content-Length: 5\r\n"),
        8 => insert_header(b, b"Content-Length: 99999999999999999999\r\n"),
        9 => {
            insert_header(b, b"Transfer-Encoding: chunked\r\n");
            b.extend_from_slice(b"zz\r\nabc\r\n0\r\n");
        }
        // Many or huge headers.
        10 => {
            let mut h = Vec::new();
            for i in 0..rng.usize(90..130) {
                h.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
            }
            insert_header(b, &h);
        }
        _ => {
            let mut h = b"X-Big: ".to_vec();
            h.resize(rng.usize(8_000..70_000), b'a');
            h.extend_from_slice(b"\r\n");
            insert_header(b, &h);
        }
    }
}

/// `header` after the request line.
fn insert_header(b: &mut Vec<u8>, header: &[u8]) {
    let at = b
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(b.len(), |i| i + 2);
    b.splice(at..at, header.iter().copied());
}

fn replace(b: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The fields of a JSON body's object (of its first record, for a batch).
fn object_mut(v: &mut Value) -> Option<&mut Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        Value::Array(a) => a.first_mut().and_then(object_mut),
        _ => None,
    }
}
