//! Query strings and forms: `params::parse_urlencoded`, then the records built from it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = s2s_ingest::params::parse_urlencoded(data) {
        s2s_fuzz::records(&pairs);
    }
});
