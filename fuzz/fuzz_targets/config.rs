//! Config files: the input as a file over a service's defaults (the first byte picks
//! ingest's or the pipeline's), then its validation. Whatever the file holds: a config
//! or an error that says what to fix, never a panic. (Delivery's file is left out: the
//! delivery crate brings RocksDB, a second C++ build in the fuzz profile; its templates
//! are the template target's.)
#![no_main]
use libfuzzer_sys::fuzz_target;
use s2s_common::pipeline::PipelineConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(file) = std::str::from_utf8(rest) else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(c) = s2s_fuzz::ingest_config(file) {
            if let Err(e) = c.validate() {
                assert!(!e.is_empty());
            }
        }
    } else {
        let loaded: Result<PipelineConfig, _> =
            s2s_common::config::load_str(s2s_common::pipeline::DEFAULT_TOML, file);
        if let Ok(c) = loaded {
            if let Err(e) = c.validate() {
                assert!(!e.is_empty());
            }
        }
    }
});
