//! Random values from the JSON Schemas of an OpenAPI document: `$ref` (local pointers),
//! `oneOf`/`anyOf`, `example` (a third of the time), `enum`, type lists, objects (required and optional properties, extra
//! ones where `additionalProperties` allows, names within `propertyNames`), arrays within
//! `minItems`/`maxItems`, and strings from their `pattern` (a regular expression walked
//! through regex-syntax's parse tree) within `minLength`/`maxLength`.
//!
//! A value that fits the schema is the aim, not a promise: the run's checks hold
//! whatever the server makes of it, and the tests here measure how often it fits.

use std::collections::HashMap;

use fastrand::Rng;
use regex_syntax::hir::{Class, Hir, HirKind};
use serde_json::{Map, Number, Value};

/// Repetitions beyond a quantifier's minimum, at most (`+`, `*`, `{1,16}`).
const EXTRA_REPEATS: u32 = 8;
/// Nesting followed at most (objects in arrays in objects…).
const MAX_DEPTH: u32 = 4;

/// An OpenAPI document and the patterns parsed so far.
pub struct Schemas<'a> {
    root: &'a Value,
    patterns: HashMap<String, Option<Hir>>,
}

impl<'a> Schemas<'a> {
    pub fn new(root: &'a Value) -> Self {
        Schemas {
            root,
            patterns: HashMap::new(),
        }
    }

    /// `schema` with `$ref`s followed (local JSON pointers; a dangling one is kept).
    pub fn resolve(&self, mut schema: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(target) = schema
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix('#'))
                .and_then(|p| self.root.pointer(p))
            else {
                break;
            };
            schema = target;
        }
        schema
    }

    /// A value for `schema`.
    pub fn value(&mut self, rng: &mut Rng, schema: &'a Value) -> Value {
        self.value_at(rng, schema, 0)
    }

    fn value_at(&mut self, rng: &mut Rng, schema: &'a Value, depth: u32) -> Value {
        let s = self.resolve(schema);
        if let Some(alts) = s
            .get("oneOf")
            .or_else(|| s.get("anyOf"))
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
        {
            let pick = rng.usize(..alts.len());
            return self.value_at(rng, &alts[pick], depth);
        }
        // The document's own example a third of the time (an offer that exists, say).
        if let Some(example) = s.get("example").filter(|_| rng.u8(..3) == 0) {
            return example.clone();
        }
        if let Some(values) = s
            .get("enum")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
        {
            return values[rng.usize(..values.len())].clone();
        }
        let ty = match s.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(Value::Array(ts)) if !ts.is_empty() => {
                ts[rng.usize(..ts.len())].as_str().unwrap_or("string")
            }
            _ if s.get("properties").is_some() => "object",
            _ => "string",
        };
        match ty {
            "object" if depth < MAX_DEPTH => self.object(rng, s, depth),
            "array" if depth < MAX_DEPTH => self.array(rng, s, depth),
            "integer" => Value::Number(integer(rng, s).into()),
            "number" => number(rng),
            "boolean" => Value::Bool(rng.bool()),
            "null" => Value::Null,
            _ => Value::String(self.string(rng, s)),
        }
    }

    fn object(&mut self, rng: &mut Rng, s: &'a Value, depth: u32) -> Value {
        let required: Vec<&str> = s
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut out = Map::new();
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (name, sub) in props {
                if required.contains(&name.as_str()) || rng.bool() {
                    out.insert(name.clone(), self.value_at(rng, sub, depth + 1));
                }
            }
        }
        if let Some(extra @ Value::Object(_)) = s.get("additionalProperties") {
            if rng.u8(..5) == 0 {
                let names = s.get("propertyNames").unwrap_or(&Value::Null);
                for _ in 0..rng.usize(1..=3) {
                    let name = self.string(rng, names);
                    if !name.is_empty() && !out.contains_key(&name) {
                        let v = self.value_at(rng, extra, depth + 1);
                        out.insert(name, v);
                    }
                }
            }
        }
        Value::Object(out)
    }

    fn array(&mut self, rng: &mut Rng, s: &'a Value, depth: u32) -> Value {
        let min = s.get("minItems").and_then(Value::as_u64).unwrap_or(0);
        let max = s.get("maxItems").and_then(Value::as_u64).unwrap_or(min + 4);
        // Mostly a few items; now and then the most allowed.
        let len = if rng.u8(..50) == 0 {
            max
        } else {
            rng.u64(min..=max.min(min + 4))
        };
        let items = s.get("items").unwrap_or(&Value::Null);
        Value::Array(
            (0..len)
                .map(|_| self.value_at(rng, items, depth + 1))
                .collect(),
        )
    }

    /// A string for `s`: from its pattern if it has one (a few tries for one within its
    /// length bounds), else of mixed characters within them.
    pub fn string(&mut self, rng: &mut Rng, s: &Value) -> String {
        let min = s.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
        let max = s
            .get("maxLength")
            .and_then(Value::as_u64)
            .map(|m| m as usize);
        if s.get("format").and_then(Value::as_str) == Some("uri") {
            return format!("https://example.com/{}", rng.u32(..));
        }
        if let Some(pattern) = s.get("pattern").and_then(Value::as_str) {
            let hir = self
                .patterns
                .entry(pattern.to_string())
                .or_insert_with(|| regex_syntax::parse(pattern).ok());
            if let Some(hir) = hir {
                let mut out = String::new();
                for _ in 0..8 {
                    out.clear();
                    from_hir(rng, hir, &mut out);
                    let len = out.chars().count();
                    if len >= min && max.is_none_or(|m| len <= m) {
                        break;
                    }
                }
                return out;
            }
        }
        let top = max.unwrap_or(min + 24).min(min + 24);
        (0..rng.usize(min..=top.max(min)))
            .map(|_| mixed_char(rng))
            .collect()
    }
}

/// Appends a string `hir` matches.
fn from_hir(rng: &mut Rng, hir: &Hir, out: &mut String) {
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => {}
        HirKind::Literal(l) => out.push_str(&String::from_utf8_lossy(&l.0)),
        HirKind::Class(Class::Unicode(c)) => {
            if let Some(r) = pick(rng, c.ranges()) {
                let (a, b) = (u32::from(r.start()), u32::from(r.end()));
                out.push(char::from_u32(rng.u32(a..=b)).unwrap_or(r.start()));
            }
        }
        HirKind::Class(Class::Bytes(c)) => {
            if let Some(r) = pick(rng, c.ranges()) {
                out.push(char::from(rng.u8(r.start()..=r.end())));
            }
        }
        HirKind::Repetition(rep) => {
            let top = rep
                .max
                .unwrap_or(rep.min + EXTRA_REPEATS)
                .min(rep.min + EXTRA_REPEATS);
            for _ in 0..rng.u32(rep.min..=top) {
                from_hir(rng, &rep.sub, out);
            }
        }
        HirKind::Capture(c) => from_hir(rng, &c.sub, out),
        HirKind::Concat(parts) => {
            for h in parts {
                from_hir(rng, h, out);
            }
        }
        HirKind::Alternation(alts) => {
            if let Some(h) = pick(rng, alts) {
                from_hir(rng, h, out);
            }
        }
    }
}

pub(super) fn pick<'t, T>(rng: &mut Rng, items: &'t [T]) -> Option<&'t T> {
    (!items.is_empty()).then(|| &items[rng.usize(..items.len())])
}

/// Mostly letters and digits; then URL-significant punctuation, non-ASCII text, and now
/// and then a control character.
fn mixed_char(rng: &mut Rng) -> char {
    const PUNCT: &[char] = &[
        ' ', '-', '_', '.', '~', '%', '&', '=', '+', '/', '?', '#', ';', ',', '"', '\\', '\'',
    ];
    const WIDE: &[char] = &[
        'é', 'ß', '日', '本', 'Ж', '🎉', '\u{202e}', '\u{feff}', '\u{fffd}',
    ];
    match rng.u8(..20) {
        0..=13 => rng.alphanumeric(),
        14..=16 => PUNCT[rng.usize(..PUNCT.len())],
        17..=18 => WIDE[rng.usize(..WIDE.len())],
        _ => char::from(rng.u8(..0x20)),
    }
}

fn integer(rng: &mut Rng, s: &Value) -> i64 {
    let min = s.get("minimum").and_then(Value::as_i64);
    let now_ms = 1_790_000_000_000i64;
    let v = match rng.u8(..8) {
        0 => 0,
        1 => 1,
        2 => -1,
        3 => i64::MAX,
        4 => i64::MIN,
        5 => now_ms + rng.i64(-86_400_000..86_400_000),
        _ => rng.i64(-1_000_000..1_000_000),
    };
    min.map_or(v, |m| v.max(m))
}

fn number(rng: &mut Rng) -> Value {
    let v = match rng.u8(..7) {
        0 => 0.0,
        1 => 0.5,
        2 => 12.5,
        3 => 1e-9,
        4 => 1e21,
        5 => -1.0,
        _ => f64::from(rng.u32(..100_000)) / 100.0,
    };
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pattern of ingest's document: the strings made from it match it.
    #[test]
    fn strings_from_a_pattern_match_it() {
        let doc: Value = serde_json::from_str(s2s_ingest::api::OPENAPI).expect("the document");
        let mut patterns = Vec::new();
        collect_patterns(&doc, &mut patterns);
        assert!(patterns.len() >= 5, "patterns found: {patterns:?}");
        let mut schemas = Schemas::new(&doc);
        let mut rng = Rng::with_seed(7);
        for p in patterns {
            let re = regex::Regex::new(&p).expect("the pattern compiles");
            for _ in 0..500 {
                let s = schemas.string(&mut rng, &serde_json::json!({ "pattern": p }));
                assert!(re.is_match(&s), "{s:?} does not match {p}");
            }
        }
    }

    fn collect_patterns(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(p)) = m.get("pattern") {
                    if !out.contains(p) {
                        out.push(p.clone());
                    }
                }
                m.values().for_each(|v| collect_patterns(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| collect_patterns(v, out)),
            _ => {}
        }
    }

    #[test]
    fn objects_have_their_required_properties_and_arrays_their_bounds() {
        let doc = serde_json::json!({
            "components": {"schemas": {"Item": {
                "type": "object", "required": ["a"],
                "properties": {"a": {"type": "string", "minLength": 2, "maxLength": 3},
                               "b": {"enum": ["x", "y"]}}
            }}},
            "list": {"type": "array", "minItems": 1, "maxItems": 3,
                     "items": {"$ref": "#/components/schemas/Item"}}
        });
        let mut schemas = Schemas::new(&doc);
        let mut rng = Rng::with_seed(1);
        let mut saw_b = false;
        for _ in 0..300 {
            let v = schemas.value(&mut rng, &doc["list"]);
            let items = v.as_array().expect("an array");
            assert!((1..=3).contains(&items.len()), "{v}");
            for item in items {
                let a = item["a"].as_str().expect("a is required");
                assert!((2..=3).contains(&a.chars().count()), "{a:?}");
                if let Some(b) = item.get("b") {
                    assert!(b == "x" || b == "y", "{b}");
                    saw_b = true;
                }
            }
        }
        assert!(saw_b, "optional properties are sometimes there");
    }
}
