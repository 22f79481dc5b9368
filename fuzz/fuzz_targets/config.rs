//! Config files: the input as a file over a service's defaults, then its validation
//! (which compiles delivery's postbacks: templates, headers, secrets). The first byte
//! picks the service: even, ingest; 1 mod 4, the pipeline's; 3 mod 4, delivery's.
//! Whatever the file holds: a config or an error that says what to fix, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use s2s_common::pipeline::{PipelineConfig, ServiceConfig};
use s2s_delivery::config::DeliveryConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(file) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 | 2 => {
            if let Ok(c) = s2s_fuzz::ingest_config(file) {
                if let Err(e) = c.validate() {
                    assert!(!e.is_empty());
                }
            }
        }
        1 => {
            let loaded: Result<PipelineConfig, _> =
                s2s_common::config::load_str(s2s_common::pipeline::DEFAULT_TOML, file);
            if let Ok(c) = loaded {
                if let Err(e) = c.validate() {
                    assert!(!e.is_empty());
                }
            }
        }
        _ => {
            let loaded: Result<DeliveryConfig, _> =
                s2s_common::config::load_str(DeliveryConfig::DEFAULT_TOML, file);
            if let Ok(c) = loaded {
                let c = c.with_pipeline(PipelineConfig::defaults());
                match c.validate() {
                    // Valid: every postback of the file compiled to its endpoint.
                    Ok(endpoints) => assert_eq!(endpoints.len(), c.postbacks.len()),
                    Err(e) => assert!(!e.is_empty()),
                }
            }
        }
    }
});
