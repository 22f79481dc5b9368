//! Ingest's and the console's OpenAPI documents: valid by a standard validator
//! (openapi-spec-validator, from scripts/requirements.txt), every operation named
//! (`operationId`) and shown by an example (of its answer, a header of it, or its
//! request), and every example valid by its schema (tests/openapi_examples.py). That each
//! documented route is the router's: ingest/tests/router.rs and the console's route test.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn documents() -> [PathBuf; 2] {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        root.join("ingest/openapi.json"),
        root.join("console/openapi.json"),
    ]
}

#[test]
fn both_documents_pass_a_standard_validator() {
    let out = Command::new("openapi-spec-validator")
        .args(documents())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "openapi-spec-validator: {e}; scripts/test installs it (scripts/requirements.txt)"
            )
        });
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report.matches(": OK").count(), 2, "{report}");
}

/// Runs tests/openapi_examples.py on `paths`: (it passed, its report).
fn check_examples(paths: &[PathBuf]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi_examples.py");
    let out = Command::new("python3")
        .arg(script)
        .args(paths)
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

#[test]
fn every_example_is_valid_by_its_schema() {
    let (ok, report) = check_examples(&documents());
    assert!(
        ok,
        "{report}\n(scripts/test installs the checker's Python packages)"
    );
    assert_eq!(report.matches("examples OK").count(), 2, "{report}");
    // The checker finds what it is for: a media type's example and a property's example,
    // each wrong against a referenced schema.
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.json");
    let doc = serde_json::json!({
        "openapi": "3.1.0",
        "info": { "title": "t", "version": "1" },
        "paths": { "/a": { "get": { "responses": { "200": {
            "description": "d",
            "content": { "application/json": {
                "schema": { "$ref": "#/components/schemas/A" },
                "example": { "n": "one" },
            } },
        } } } } },
        "components": { "schemas": { "A": {
            "type": "object",
            "required": ["n"],
            "properties": { "n": { "type": "integer", "example": 1.5 } },
        } } },
    });
    std::fs::write(&bad, doc.to_string()).expect("write");
    let (ok, report) = check_examples(&[bad]);
    assert!(!ok, "{report}");
    assert!(report.contains("2 examples, 2 invalid"), "{report}");
}

/// Whether `v` holds an `example` anywhere.
fn has_example(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.contains_key("example") || m.values().any(has_example),
        Value::Array(a) => a.iter().any(has_example),
        _ => false,
    }
}

#[test]
fn every_operation_has_an_id_and_an_example() {
    for path in documents() {
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
        let mut ids = std::collections::BTreeSet::new();
        let mut operations = 0;
        for (route, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("operations") {
                operations += 1;
                let what = format!("{}: {method} {route}", path.display());
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: no operationId"));
                assert!(ids.insert(id.to_string()), "{what}: operationId {id} twice");
                let answers = op["responses"]
                    .as_object()
                    .expect("responses")
                    .iter()
                    .filter(|(status, _)| status.starts_with('2') || status.starts_with('3'));
                let shown = answers.into_iter().any(|(_, r)| has_example(r))
                    || has_example(&op["requestBody"]);
                assert!(shown, "{what}: no example");
            }
        }
        assert!(
            operations >= 12,
            "{}: {operations} operations",
            path.display()
        );
    }
}

#[test]
fn the_console_feed_is_an_event_stream_and_ingest_declares_its_security() {
    let [ingest, console] = documents().map(|p| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("JSON")
    });
    let feed = &console["paths"]["/api/v1/feed"]["get"]["responses"]["200"]["content"];
    assert!(feed["text/event-stream"].is_object(), "{feed}");
    let schemes = ingest["components"]["securitySchemes"]
        .as_object()
        .expect("securitySchemes");
    for scheme in [
        "bearerToken",
        "postbackTokenHeader",
        "postbackTokenQuery",
        "hmacSignature",
    ] {
        assert!(schemes.contains_key(scheme), "{scheme}");
    }
    for (route, item) in ingest["paths"].as_object().expect("paths") {
        if route.starts_with("/postback") || route.starts_with("/v1/") {
            for (method, op) in item.as_object().expect("operations") {
                assert!(op["security"].is_array(), "{method} {route}: no security");
            }
        }
    }
}

/// Ingest's document says what it enforces, so that a schema-driven client or fuzzer and
/// the server agree: a required string is never empty (empty reads as missing: 400), a
/// batch holds 1 to `MAX_BATCH_RECORDS` records, an amount follows one decimal grammar.
#[test]
fn ingest_says_what_it_enforces() {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&documents()[0]).expect("ingest's document"))
            .expect("JSON");
    let max = s2s_ingest::batch::MAX_BATCH_RECORDS as u64;
    let non_empty =
        |s: &Value| s["minLength"].as_u64() >= Some(1) || s["pattern"].as_str().is_some();
    let mut checked = 0;
    for (route, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("operations") {
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["required"] == true && p["in"] == "query" && p["schema"]["type"] == "string" {
                    assert!(non_empty(&p["schema"]), "{method} {route}: {}", p["name"]);
                    checked += 1;
                }
            }
            for c in op["requestBody"]["content"]
                .as_object()
                .into_iter()
                .flatten()
            {
                for alt in c.1["schema"]["oneOf"].as_array().into_iter().flatten() {
                    if alt["type"] == "array" {
                        assert_eq!(
                            (alt["minItems"].as_u64(), alt["maxItems"].as_u64()),
                            (Some(1), Some(max)),
                            "{method} {route} {}",
                            c.0
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    for name in ["PostbackFields", "PostbackForm", "OperatorClick"] {
        let s = &doc["components"]["schemas"][name];
        for r in s["required"].as_array().expect("required") {
            let field = r.as_str().expect("a name");
            assert!(non_empty(&s["properties"][field]), "{name}.{field}");
            checked += 1;
        }
    }
    assert!(
        doc["components"]["schemas"]["PostbackFields"]["properties"]["amount"]["pattern"]
            .is_string()
    );
    assert!(checked >= 16, "{checked} constraints checked");
}
