//! Batches: a JSON array or object, or NDJSON (the first byte picks the content type),
//! split by `batch::parse_batch`, each record then built.
#![no_main]
use libfuzzer_sys::fuzz_target;
use s2s_ingest::batch::{parse_batch, MAX_BATCH_RECORDS};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let content_type = match kind % 3 {
        0 => "application/json",
        1 => "application/x-ndjson",
        _ => "text/plain",
    };
    if let Ok(records) = parse_batch(content_type, body) {
        assert!(
            records.len() <= MAX_BATCH_RECORDS + 1,
            "{} records",
            records.len()
        );
        for pairs in records.iter().flatten() {
            s2s_fuzz::records(pairs);
        }
    }
});
