//! A source's parameter aliases and value map (`Source::apply_aliases`) over parsed
//! query strings, then the records built from them: an alias and its name both given
//! must be refused, never one of them silently kept.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use s2s_ingest::source::Source;

const CONFIG: &str = r#"
[sources.default]
auth = "none"
[sources.op]
auth = "none"
[sources.op.aliases]
clickid = "click_id"
goal = "event"
payout = "amount"
[sources.op.values.event]
dep = "ftd"
reg = "registration"
"#;

fn source() -> &'static Source {
    static SOURCE: OnceLock<std::sync::Arc<Source>> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let c = s2s_fuzz::ingest_config(CONFIG).expect("the config loads");
        c.validate().expect("the config is valid").sources["op"].clone()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut pairs) = s2s_ingest::params::parse_urlencoded(data) else {
        return;
    };
    let given_both =
        pairs.iter().any(|(n, _)| n == "clickid") && pairs.iter().any(|(n, _)| n == "click_id");
    source().apply_aliases(&mut pairs);
    assert!(pairs
        .iter()
        .all(|(n, _)| n != "clickid" && n != "goal" && n != "payout"));
    let built = s2s_ingest::records::build_postback(
        pairs.clone(),
        s2s_fuzz::rules(),
        Some("op"),
        s2s_ingest::records::RequestMeta {
            ip: None,
            user_agent: None,
            referrer: None,
        },
        "pb".into(),
        s2s_fuzz::NOW_MS,
    );
    if given_both {
        assert!(
            built.is_err(),
            "click_id given as itself and its alias was accepted"
        );
    }
    s2s_fuzz::records(&pairs);
});
