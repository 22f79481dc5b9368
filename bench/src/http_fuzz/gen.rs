//! The requests of the HTTP-level fuzz run, as bytes, from an instance's OpenAPI document:
//! request `n` of seed `s` is always the same bytes (its own generator, seeded by both),
//! so a finding is replayed with `--seed s --only n`.
//!
//! Three kinds, by share:
//! - **schema** (55 %): an operation of the document with its parameters and body made
//!   from their schemas, signed or given the token its source needs, sometimes in the
//!   source's aliases and values;
//! - **mutated** (25 %): one of those with one or two changes a broken or hostile client
//!   makes (a field dropped or given twice, a bad percent-escape, a wrong type, a wrong
//!   content type, a huge or empty value, too many records, a wrong signature…);
//! - **raw** (20 %): one of those as bytes, then bytes flipped, inserted, cut or doubled,
//!   the request line or framing broken.
//!
//! Every storing request carries a marker, `<tag><n>x<i>k<check>` (its record `i`), in
//! its click ID (a click's in `sub1`), letters and digits only so that no encoding changes
//! it: the run finds on the topics what each request stored. The four check letters
//! keep a marker that a byte-level mutation changed (a digit flipped, one cut) from
//! being taken for another request's.

use fastrand::Rng;
use serde_json::Value;

use super::schema::{pick, Schemas};

/// What an operation stores when it answers 2xx (or a click's 302).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stores {
    /// One postback or click, the marker in `click_id` (`sub1` for `/click`).
    One,
    /// A batch: the marker of record `i` in its `click_id`; the answer says which.
    Batch,
    /// Nothing to check: `/pixel` and `/iframe` answer 200 whatever they did (a
    /// browser's image), the document route stores nothing.
    Unchecked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Schema,
    Mutated,
    Raw,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Schema, Kind::Mutated, Kind::Raw];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Schema => "schema",
            Kind::Mutated => "mutated",
            Kind::Raw => "raw",
        }
    }
}

struct Param {
    name: String,
    in_path: bool,
    required: bool,
    schema: Value,
}

pub struct Operation {
    pub method: String,
    pub path: String,
    params: Vec<Param>,
    /// Content type and schema of each body the operation takes.
    bodies: Vec<(String, Value)>,
    pub stores: Stores,
}

/// The sources the run's ingest has (see `http_fuzz::ingest_config`).
pub const TOKEN: &str = "fuzz-token-0123456789";
pub const SECRET: &str = "fuzz-secret-0123456789abcdef";
const SOURCES: [&str; 4] = ["default", "tok", "sig", "limited"];

/// One request, ready to send.
pub struct Request {
    pub bytes: Vec<u8>,
    pub op: usize,
    pub kind: Kind,
    /// The records whose markers it carries (a mutation may have dropped some).
    pub markers: Vec<u32>,
    /// Close the write side after sending (the server sees the end at once instead of
    /// waiting for more of a cut request).
    pub half_close: bool,
}

pub struct Generator {
    doc: Value,
    ops: Vec<Operation>,
    tag: String,
    seed: u64,
}

impl Generator {
    /// The operations of `doc` (GET and POST); `tag` starts every marker.
    pub fn new(doc: Value, tag: &str, seed: u64) -> Self {
        let ops = operations(&doc);
        Generator {
            doc,
            ops,
            tag: tag.to_string(),
            seed,
        }
    }

    pub fn operations(&self) -> &[Operation] {
        &self.ops
    }

    /// The marker of record `i` of request `n`.
    pub fn marker(&self, n: u64, i: u32) -> String {
        marker(&self.tag, n, i)
    }

    /// Request `n`; `now_s` signs it (Unix seconds).
    pub fn request(&self, n: u64, now_s: i64) -> Request {
        let mut rng = Rng::with_seed(self.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let op = rng.usize(..self.ops.len());
        let kind = match rng.u8(..20) {
            0..=10 => Kind::Schema,
            11..=15 => Kind::Mutated,
            _ => Kind::Raw,
        };
        let mut draft = self.draft(&mut rng, op, n);
        if kind == Kind::Mutated {
            for _ in 0..rng.usize(1..=2) {
                super::mutate::structure(&mut rng, &mut draft);
            }
        }
        draft.sign(&mut rng, now_s);
        let mut bytes = draft.to_bytes();
        let mut half_close = false;
        if kind == Kind::Raw {
            for _ in 0..rng.usize(1..=3) {
                super::mutate::bytes(&mut rng, &mut bytes);
            }
            half_close = rng.bool();
        }
        let markers = (0..draft.records)
            .filter(|i| holds_marker(&bytes, self.marker(n, *i).as_bytes()))
            .collect();
        Request {
            bytes,
            op,
            kind,
            markers,
            half_close,
        }
    }

    fn draft(&self, rng: &mut Rng, op_index: usize, n: u64) -> Draft {
        let op = &self.ops[op_index];
        let mut schemas = Schemas::new(&self.doc);
        let source = SOURCES[rng.usize(..SOURCES.len())];
        let mut path = op.path.clone();
        let mut query = Vec::new();
        for p in &op.params {
            if p.in_path {
                // Mostly a configured source; else whatever the pattern allows.
                let v = if rng.u8(..10) < 8 {
                    source.to_string()
                } else {
                    schemas.string(rng, &p.schema)
                };
                path = path.replace(&format!("{{{}}}", p.name), &v);
            } else if p.required || rng.bool() {
                let v = schemas.value(rng, &p.schema);
                query.push((p.name.clone(), text(&v)));
            }
        }
        let signed_source = if op.path.contains("{source}") {
            path.rsplit('/').next().unwrap_or_default().to_string()
        } else {
            "default".to_string()
        };
        let mut draft = Draft {
            method: op.method.clone(),
            path,
            query,
            raw_query: String::new(),
            headers: Vec::new(),
            body: None,
            records: 0,
            source: signed_source,
        };
        let marker = |i| self.marker(n, i);
        match op.stores {
            Stores::One | Stores::Unchecked if op.bodies.is_empty() => {
                let field = if op.path == "/click" {
                    "sub1"
                } else {
                    "click_id"
                };
                if op.params.iter().any(|p| p.name == field) {
                    set(&mut draft.query, field, marker(0));
                    draft.records = 1;
                }
            }
            _ => {}
        }
        if let Some((ctype, schema)) = pick(rng, &op.bodies) {
            let mut value = schemas.value(rng, schema);
            let record_schema = if op.path.starts_with("/v1/clicks") {
                Some("#/components/schemas/OperatorClick")
            } else if op.path.starts_with("/v1/postbacks") {
                Some("#/components/schemas/PostbackFields")
            } else {
                None
            };
            if let Some(r) = record_schema {
                // The batch schema leaves its records to the server (each is judged on its
                // own, 207); they are made from the record's schema here.
                let r = serde_json::json!({ "$ref": r });
                let count = match &value {
                    Value::Array(a) => a.len().max(1),
                    _ => 1,
                };
                let mut records: Vec<Value> = (0..count)
                    .map(|i| {
                        let mut v = schemas.value(rng, &r);
                        if let Value::Object(m) = &mut v {
                            m.insert("click_id".into(), Value::String(marker(i as u32)));
                        }
                        v
                    })
                    .collect();
                draft.records = count as u32;
                value = if count == 1 && rng.bool() {
                    records.remove(0)
                } else {
                    Value::Array(records)
                };
            } else if let Value::Object(m) = &mut value {
                m.insert("click_id".into(), Value::String(marker(0)));
                draft.records = 1;
            }
            let bytes = match ctype.as_str() {
                "application/x-www-form-urlencoded" => form(&value),
                "application/x-ndjson" => match &value {
                    Value::Array(a) => a
                        .iter()
                        .map(|v| format!("{v}\n"))
                        .collect::<String>()
                        .into_bytes(),
                    v => format!("{v}\n").into_bytes(),
                },
                // `application/x-ndjson` described as a string: its records, a line each.
                _ => serde_json::to_vec(&value).unwrap_or_default(),
            };
            draft.body = Some((ctype.clone(), bytes));
        }
        draft.alias(rng);
        draft.auth(rng);
        draft
    }
}

/// A request before it is bytes, for the structured mutations.
pub struct Draft {
    pub method: String,
    pub path: String,
    /// Decoded pairs, percent-encoded when written.
    pub query: Vec<(String, String)>,
    /// Written after the pairs as it is (a malformed escape, a stray `&`).
    pub raw_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<(String, Vec<u8>)>,
    pub records: u32,
    /// The source the path names (or `default`), whose credentials it gets.
    pub source: String,
}

impl Draft {
    /// The source `tok` takes `cid` for `click_id` and `sale` for `ftd` half the time.
    fn alias(&mut self, rng: &mut Rng) {
        if self.source != "tok" || rng.bool() {
            return;
        }
        for (k, v) in &mut self.query {
            if k == "click_id" {
                *k = "cid".into();
            } else if k == "event" && v == "ftd" {
                *v = "sale".into();
            }
        }
    }

    /// The token of `tok` (header, bearer or query), mostly the right one.
    fn auth(&mut self, rng: &mut Rng) {
        if self.source != "tok" {
            return;
        }
        let token = if rng.u8(..10) == 0 {
            "wrong-token"
        } else {
            TOKEN
        };
        match rng.u8(..3) {
            0 => self.headers.push(("X-Postback-Token".into(), token.into())),
            1 => self
                .headers
                .push(("Authorization".into(), format!("Bearer {token}"))),
            _ => self.query.push(("token".into(), token.into())),
        }
    }

    /// The HMAC headers of `sig` over the query string or body as written (last, after
    /// the mutations: a mutation that should break the signature is a byte-level one).
    fn sign(&mut self, rng: &mut Rng, now_s: i64) {
        if self.source != "sig" {
            return;
        }
        let ts = match rng.u8(..20) {
            0 => now_s - 3600,
            1 => now_s + 3600,
            _ => now_s,
        };
        let payload = match &self.body {
            Some((_, b)) if self.method == "POST" => b.clone(),
            _ => self.query_string().into_bytes(),
        };
        let mut sig = s2s_ingest::source::sign(SECRET, ts, &payload);
        if rng.u8(..20) == 0 {
            sig = s2s_ingest::source::sign("not-the-secret", ts, &payload);
        }
        self.headers.push(("X-Timestamp".into(), ts.to_string()));
        self.headers.push(("X-Signature".into(), sig));
    }

    pub fn query_string(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.query {
            q.append_pair(k, v);
        }
        let mut q = q.finish();
        q.push_str(&self.raw_query);
        q
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let q = self.query_string();
        let mut out = format!("{} {}", self.method, self.path);
        if !q.is_empty() {
            out.push('?');
            out.push_str(&q);
        }
        out.push_str(" HTTP/1.1\r\nHost: ingest.test\r\nConnection: close\r\n");
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        let mut bytes = match &self.body {
            Some((ctype, body)) => {
                out.push_str(&format!(
                    "Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                ));
                let mut b = out.into_bytes();
                b.extend_from_slice(body);
                b
            }
            None => {
                out.push_str("\r\n");
                out.into_bytes()
            }
        };
        bytes.shrink_to_fit();
        bytes
    }
}

/// The GET and POST operations of `doc`.
fn operations(doc: &Value) -> Vec<Operation> {
    let schemas = Schemas::new(doc);
    let mut ops = Vec::new();
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return ops;
    };
    for (path, item) in paths {
        for method in ["get", "post"] {
            let Some(op) = item.get(method) else {
                continue;
            };
            let params = op
                .get("parameters")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| schemas.resolve(p))
                .filter_map(|p| {
                    Some(Param {
                        name: p.get("name")?.as_str()?.to_string(),
                        in_path: p.get("in")?.as_str()? == "path",
                        required: p.get("required").and_then(Value::as_bool) == Some(true),
                        schema: with_example(p),
                    })
                })
                .collect();
            let bodies = op
                .pointer("/requestBody/content")
                .and_then(Value::as_object)
                .map(|c| {
                    c.iter()
                        .map(|(t, m)| (t.clone(), m.get("schema").cloned().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            let stores = if path.starts_with("/v1/") {
                Stores::Batch
            } else if path.starts_with("/postback") || path == "/click" {
                Stores::One
            } else {
                Stores::Unchecked
            };
            ops.push(Operation {
                method: method.to_uppercase(),
                path: path.clone(),
                params,
                bodies,
                stores,
            });
        }
    }
    ops
}

/// `<tag><n>x<i>k<check>`.
pub fn marker(tag: &str, n: u64, i: u32) -> String {
    let c = check(n, i);
    format!("{tag}{n}x{i}k{}", String::from_utf8_lossy(&c))
}

/// Four letters from `n` and `i` (SplitMix64's finaliser): a changed marker keeps its
/// old ones once in 26^4.
pub fn check(n: u64, i: u32) -> [u8; 4] {
    let mut z =
        n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(i).wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let mut out = [0u8; 4];
    for (k, c) in out.iter_mut().enumerate() {
        *c = b'a' + ((z >> (k * 8)) % 26) as u8;
    }
    out
}

/// A parameter's schema, with the parameter's `example` (if any) as the schema's.
fn with_example(param: &Value) -> Value {
    let mut schema = param.get("schema").cloned().unwrap_or(Value::Null);
    if let (Some(example), Value::Object(s)) = (param.get("example"), &mut schema) {
        s.insert("example".into(), example.clone());
    }
    schema
}

/// A value as a query parameter's text.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

fn form(v: &Value) -> Vec<u8> {
    let mut f = form_urlencoded::Serializer::new(String::new());
    if let Value::Object(m) = v {
        for (k, v) in m {
            f.append_pair(k, &text(v));
        }
    }
    f.finish().into_bytes()
}

fn set(pairs: &mut Vec<(String, String)>, name: &str, value: String) {
    pairs.retain(|(k, _)| k != name);
    pairs.push((name.to_string(), value));
}

/// Whether `marker` is in `bytes` as a whole (`…x1` is not in `…x10`).
pub fn holds_marker(bytes: &[u8], marker: &[u8]) -> bool {
    bytes
        .windows(marker.len())
        .enumerate()
        .any(|(at, w)| w == marker && !bytes.get(at + marker.len()).is_some_and(u8::is_ascii_digit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator() -> Generator {
        let doc = serde_json::from_str(s2s_ingest::api::OPENAPI).expect("the document");
        Generator::new(doc, "tagq", 3)
    }

    /// Schema-made requests are well-formed HTTP/1.1, framed by their length, and carry
    /// the markers of their records; every operation is made.
    #[test]
    fn schema_made_requests_are_well_formed_and_marked() {
        let g = generator();
        let mut seen = vec![0usize; g.operations().len()];
        let mut marked = 0;
        for n in 0..3000 {
            let r = g.request(n, 1_800_000_000);
            if r.kind != Kind::Schema {
                continue;
            }
            seen[r.op] += 1;
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            let head = match req.parse(&r.bytes) {
                Ok(httparse::Status::Complete(len)) => len,
                other => panic!(
                    "request {n}: {other:?} {:?}",
                    String::from_utf8_lossy(&r.bytes)
                ),
            };
            let length = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| {
                    let v = std::str::from_utf8(h.value).expect("a length is ASCII");
                    v.parse().expect("a length is a number")
                });
            assert_eq!(
                r.bytes.len(),
                head + length,
                "request {n} is framed by its length"
            );
            let op = &g.operations()[r.op];
            if op.stores != Stores::Unchecked {
                assert!(
                    !r.markers.is_empty(),
                    "request {n} to {} has no marker",
                    op.path
                );
                marked += 1;
            }
        }
        assert!(seen.iter().all(|s| *s > 0), "operations made: {seen:?}");
        assert!(marked > 1000, "{marked}");
    }

    #[test]
    fn a_marker_is_found_whole() {
        assert!(holds_marker(b"a=tagq5x1&b", b"tagq5x1"));
        assert!(!holds_marker(b"a=tagq5x10", b"tagq5x1"));
        assert!(holds_marker(b"tagq5x1", b"tagq5x1"));
        let m = marker("tagq", 5, 1);
        assert!(
            m.starts_with("tagq5x1k") && m.len() == "tagq5x1k".len() + 4,
            "{m}"
        );
        assert_ne!(check(5, 1), check(6, 1));
        assert_ne!(check(5, 1), check(5, 2));
    }
}
