//! The HMAC headers of a signed source (`X-Timestamp`, `X-Signature: sha256=<hex>`):
//! `Source::authenticate` over headers and payload made from the input. Whatever they
//! hold: an answer, never a panic; accepted only if the signature is the right one
//! (its hex in either case).
#![no_main]
use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use s2s_ingest::source::{sign, Source};

const SECRET: &str = "fuzz-secret-0123456789abcdef";

fn source() -> &'static Source {
    static SOURCE: OnceLock<std::sync::Arc<Source>> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let config = format!(
            "[sources.default]\nauth = \"none\"\n[sources.signed]\nauth = \"hmac\"\nhmac_secret = \"{SECRET}\"\n"
        );
        let c = s2s_fuzz::ingest_config(&config).expect("the config loads");
        c.validate().expect("the config is valid").sources["signed"].clone()
    })
}

fuzz_target!(|data: &[u8]| {
    // timestamp \n signature \n payload
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (Some(ts), Some(sig), payload) =
        (parts.next(), parts.next(), parts.next().unwrap_or_default())
    else {
        return;
    };
    let now_s = s2s_fuzz::NOW_MS / 1000;
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(ts) {
        headers.insert("x-timestamp", v);
    }
    if let Ok(v) = HeaderValue::from_bytes(sig) {
        headers.insert("x-signature", v);
    }
    let accepted = source()
        .authenticate(&headers, None, payload, now_s)
        .is_ok();
    if accepted {
        let ts: i64 = std::str::from_utf8(ts)
            .expect("accepted: UTF-8")
            .parse()
            .expect("accepted: a number");
        // Hex in either case names the same bytes (and the replay memory keys the bytes).
        assert_eq!(
            sig.to_ascii_lowercase(),
            sign(SECRET, ts, payload).as_bytes(),
            "accepted a wrong signature"
        );
    }
});
