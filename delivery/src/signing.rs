//! Request signing per Standard Webhooks v1 (<https://www.standardwebhooks.com>), so that
//! an affiliate can verify with any of its reference libraries that a postback came from
//! us and was not altered or replayed:
//! `webhook-signature: v1,<base64(HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>"))>`.
//! The key is the secret's base64 part after `whsec_`. Every attempt gets a fresh timestamp
//! and signature; `webhook-id` stays the same across attempts.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A signing key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>` (the prefix is optional, as in the reference libraries).
    /// The error never repeats the value.
    pub fn parse(value: &str) -> Result<Self, String> {
        let b64 = value.trim().strip_prefix("whsec_").unwrap_or(value.trim());
        let key = STANDARD
            .decode(b64)
            .map_err(|_| "must be whsec_ followed by base64".to_string())?;
        if key.len() < 16 {
            return Err(format!(
                "decodes to {} bytes; use at least 16 (24–64 recommended)",
                key.len()
            ));
        }
        Ok(Secret(key))
    }
}

/// The `webhook-signature` value for one request.
pub fn sign(secret: &Secret, id: &str, timestamp_s: i64, body: &[u8]) -> String {
    // new_from_slice accepts keys of any length for HMAC.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&secret.0) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_the_published_test_vector() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        assert_eq!(
            sign(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let unprefixed = Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        assert_eq!(
            sign(&unprefixed, "a", 1, b""),
            sign(&secret, "a", 1, b""),
            "the prefix is optional"
        );
        assert_ne!(sign(&secret, "a", 1, b""), sign(&secret, "a", 2, b""));
    }

    #[test]
    fn bad_secrets_are_refused_without_echoing_them() {
        let e = Secret::parse("whsec_not base64!").expect_err("not base64");
        assert!(!e.contains("not base64!"), "{e}");
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err(), "too short");
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }
}
