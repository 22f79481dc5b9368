//! Macro templates (offer URLs, postback URLs and bodies): `Template::parse` accepts
//! only known macros; rendering never panics; a template without macros renders as
//! itself; URL encoding keeps a value's `&`, `=`, `?`, `#` and `/` from adding to the
//! URL's structure, and JSON encoding gives a string that reads back as the value.
#![no_main]
use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use s2s_common::pipeline::offer_macros;
use s2s_common::template::{Encoding, Template};

fn count(s: &str, chars: &[char]) -> usize {
    s.chars().filter(|c| chars.contains(c)).count()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // template \0 value
    let (source, value) = text.split_once('\0').unwrap_or((text, "v&a=b?c#d/é\"\\"));
    let Ok(t) = Template::parse(source, &offer_macros()) else {
        return;
    };
    let known = offer_macros();
    for m in t.macros() {
        assert!(known.contains(&m), "unknown macro {m} accepted");
    }
    let render = |v: &str, e| t.render(|_| Some(Cow::Owned(v.to_string())), e);
    for encoding in [Encoding::UrlComponent, Encoding::JsonString, Encoding::Raw] {
        let out = render(value, encoding);
        if t.macros().next().is_none() {
            assert_eq!(out, t.source());
        }
    }
    let structure = ['&', '=', '?', '#', '/'];
    assert_eq!(
        count(&render(value, Encoding::UrlComponent), &structure),
        count(&render("", Encoding::UrlComponent), &structure),
        "a value changed the URL's structure"
    );
    // One macro alone: JSON encoding gives the inside of a JSON string that reads back
    // as the value, whatever the value holds.
    let alone = Template::parse("{click_id}", &known).expect("a known macro");
    let inside = alone.render(|_| Some(Cow::Borrowed(value)), Encoding::JsonString);
    let back: String = serde_json::from_str(&format!("\"{inside}\"")).expect("a JSON string");
    assert_eq!(back, value, "JSON encoding changed the value");
});
