//! Macro templates: `https://aff.example/pb?cid={click_id}&payout={payout}`.
//!
//! A macro is `{name}` where name is `[A-Za-z0-9_]+`; any other brace is literal text, so
//! JSON body templates such as `{"id":"{click_id}"}` work as written. Templates are parsed
//! once at start-up against the list of macros the caller supports, so an unknown macro
//! (a typo like `{clickid}`) is a configuration error, not an empty value at send time.
//! Values are encoded for where they land: URL component, JSON string, or raw.

use std::borrow::Cow;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// RFC 3986 unreserved characters stay as they are; everything else is percent-encoded.
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How substituted values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Percent-encoded as a URL query or path component.
    UrlComponent,
    /// Escaped as the inside of a JSON string (the template supplies the quotes).
    JsonString,
    /// Inserted as is (headers, plain text).
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Macro(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown macro {{{name}}} in template '{template}'; known macros: {known}")]
    UnknownMacro {
        name: String,
        template: String,
        known: String,
    },
}

impl Template {
    /// Parses `source`, accepting only macros named in `known`.
    pub fn parse(source: &str, known: &[&str]) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let name_len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if name_len > 0 && after[name_len..].starts_with('}') {
                let name = &after[..name_len];
                if !known.contains(&name) {
                    return Err(TemplateError::UnknownMacro {
                        name: name.to_string(),
                        template: source.to_string(),
                        known: known
                            .iter()
                            .map(|k| format!("{{{k}}}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(Part::Macro(name.to_string()));
                rest = &after[name_len + 1..];
            } else {
                literal.push('{');
                rest = after;
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The macros this template uses, in order of appearance.
    pub fn macros(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Macro(m) => Some(m.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Substitutes each macro with `value(name)` encoded as `encoding`; a macro without
    /// a value becomes the empty string.
    pub fn render<'v>(
        &self,
        value: impl Fn(&str) -> Option<Cow<'v, str>>,
        encoding: Encoding,
    ) -> String {
        let mut out = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Macro(m) => {
                    if let Some(v) = value(m) {
                        encode_into(&mut out, &v, encoding);
                    }
                }
            }
        }
        out
    }
}

fn encode_into(out: &mut String, v: &str, encoding: Encoding) {
    match encoding {
        Encoding::UrlComponent => out.extend(utf8_percent_encode(v, URL_COMPONENT)),
        Encoding::Raw => out.push_str(v),
        Encoding::JsonString => {
            let quoted = serde_json::Value::String(v.to_string()).to_string();
            out.push_str(&quoted[1..quoted.len() - 1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["click_id", "payout", "sub1"];

    fn vals(name: &str) -> Option<Cow<'static, str>> {
        match name {
            "click_id" => Some(Cow::Borrowed("01ABC")),
            "payout" => Some(Cow::Borrowed("12.50")),
            "sub1" => Some(Cow::Borrowed("a b&c=d/é\"")),
            _ => None,
        }
    }

    #[test]
    fn substitutes_and_url_encodes() {
        let t = Template::parse("https://x/pb?cid={click_id}&p={payout}&s={sub1}", KNOWN)
            .expect("valid");
        assert_eq!(
            t.render(vals, Encoding::UrlComponent),
            "https://x/pb?cid=01ABC&p=12.50&s=a%20b%26c%3Dd%2F%C3%A9%22"
        );
        assert_eq!(
            t.macros().collect::<Vec<_>>(),
            ["click_id", "payout", "sub1"]
        );
    }

    #[test]
    fn json_bodies_keep_their_braces_and_escape_values() {
        let t =
            Template::parse(r#"{"id":"{click_id}","s":"{sub1}","n":{}}"#, KNOWN).expect("valid");
        let body = t.render(vals, Encoding::JsonString);
        assert_eq!(body, r#"{"id":"01ABC","s":"a b&c=d/é\"","n":{}}"#);
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("still JSON");
        assert_eq!(parsed["s"], "a b&c=d/é\"");
    }

    #[test]
    fn unknown_macro_is_an_error_naming_it() {
        let err = Template::parse("https://x/?c={clickid}", KNOWN).err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("{clickid}") && msg.contains("{click_id}"),
            "{msg}"
        );
    }

    #[test]
    fn missing_values_render_empty_and_odd_braces_stay() {
        let t = Template::parse("a{b-c}{sub1}{}{", &["sub1"]).expect("valid");
        assert_eq!(t.render(|_| None, Encoding::Raw), "a{b-c}{}{");
    }
}
