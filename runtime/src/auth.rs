//! JWT authentication of sockets.
//!
//! Tokens are minted by the NestJS backend: HS256 with `JWT_SECRET`. The user
//! id comes from `sub`, else `userId`, else `id` (strings or numbers); `exp` is
//! required and enforced with a small leeway; `nbf`, when present, is enforced
//! with the same leeway (a token valid from tomorrow is refused until then); an
//! `iat` further in the future than the leeway is refused; an optional
//! `deviceId` claim names the device.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const EXP_LEEWAY_SECS: u64 = 5;

/// The development secret used by the all-in-one server when `JWT_SECRET` is
/// not set. Never use it in production: anyone can mint tokens with it.
pub const DEV_JWT_SECRET: &str = "quckchat-development-secret-do-not-use-in-production";

/// Who a token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub device_id: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway), or not a number.
    #[error("token issued in the future")]
    IssuedInFuture,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token names no user (sub, userId or id)")]
    NoUser,
}

/// Verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtVerifier(HS256)")
    }
}

impl JwtVerifier {
    pub fn hs256(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = EXP_LEEWAY_SECS;
        validation.validate_aud = false;
        // `nbf` is checked when present, with the same leeway as `exp`.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        Self {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = decode::<Map<String, Value>>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        let claims = data.claims;
        check_iat(&claims, now_secs())?;
        let user_id = ["sub", "userId", "id"]
            .iter()
            .find_map(|k| claim_string(&claims, k))
            .ok_or(AuthError::NoUser)?;
        Ok(Identity {
            user_id,
            device_id: claim_string(&claims, "deviceId"),
        })
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// An `iat` (when present) must be a number no later than now plus the
/// leeway: a token "issued" in the future was minted with a wrong clock or
/// forged to outlive its intended lifetime.
fn check_iat(claims: &Map<String, Value>, now: u64) -> Result<(), AuthError> {
    let Some(iat) = claims.get("iat") else {
        return Ok(());
    };
    let Some(iat) = iat.as_f64() else {
        return Err(AuthError::Invalid("iat is not a number".into()));
    };
    #[allow(
        clippy::cast_precision_loss,
        reason = "seconds since 1970 fit an f64 exactly"
    )]
    let latest = (now + EXP_LEEWAY_SECS) as f64;
    if iat > latest {
        return Err(AuthError::IssuedInFuture);
    }
    Ok(())
}

fn claim_string(claims: &Map<String, Value>, key: &str) -> Option<String> {
    match claims.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Mints an HS256 token for `user_id` valid for `ttl` (for the `quckchat
/// token` command and tests).
#[allow(
    clippy::expect_used,
    reason = "encoding a JSON object with an HMAC key has no failure case"
)]
pub fn mint_token(secret: &str, user_id: &str, ttl: Duration) -> String {
    let now = now_secs();
    let claims = serde_json::json!({
        "sub": user_id,
        "iat": now,
        "exp": now + ttl.as_secs(),
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of a JSON object cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_with(secret: &str, claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn minted_token_verifies() {
        let v = JwtVerifier::hs256("s3cret");
        let id = v
            .verify(&mint_token("s3cret", "u1", Duration::from_secs(60)))
            .unwrap();
        assert_eq!(id.user_id, "u1");
        assert_eq!(id.device_id, None);
    }

    #[test]
    fn user_id_fallbacks_and_device() {
        let v = JwtVerifier::hs256("k");
        let exp = now() + 60;
        let t = token_with(
            "k",
            serde_json::json!({"userId": "u2", "exp": exp, "deviceId": "d9"}),
        );
        assert_eq!(
            v.verify(&t).unwrap(),
            Identity {
                user_id: "u2".into(),
                device_id: Some("d9".into())
            }
        );
        let t = token_with("k", serde_json::json!({"id": 42, "exp": exp}));
        assert_eq!(v.verify(&t).unwrap().user_id, "42");
        let t = token_with("k", serde_json::json!({"name": "x", "exp": exp}));
        assert_eq!(v.verify(&t).unwrap_err(), AuthError::NoUser);
    }

    #[test]
    fn refuses_wrong_secret_expired_missing_exp_and_garbage() {
        let v = JwtVerifier::hs256("right");
        let wrong = mint_token("wrong", "u", Duration::from_secs(60));
        assert!(matches!(v.verify(&wrong), Err(AuthError::Invalid(_))));
        let expired = token_with("right", serde_json::json!({"sub": "u", "exp": now() - 120}));
        assert_eq!(v.verify(&expired).unwrap_err(), AuthError::Expired);
        let no_exp = token_with("right", serde_json::json!({"sub": "u"}));
        assert!(matches!(v.verify(&no_exp), Err(AuthError::Invalid(_))));
        assert!(matches!(v.verify("not.a.jwt"), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn nbf_in_the_future_is_refused_and_honoured_with_the_leeway() {
        let v = JwtVerifier::hs256("k");
        let exp = now() + 3 * 86_400;
        let tomorrow = token_with(
            "k",
            serde_json::json!({"sub": "u", "exp": exp, "nbf": now() + 86_400}),
        );
        assert_eq!(v.verify(&tomorrow).unwrap_err(), AuthError::NotYetValid);
        let within_leeway = token_with(
            "k",
            serde_json::json!({"sub": "u", "exp": exp, "nbf": now() + EXP_LEEWAY_SECS - 2}),
        );
        assert_eq!(v.verify(&within_leeway).unwrap().user_id, "u");
        let past = token_with(
            "k",
            serde_json::json!({"sub": "u", "exp": exp, "nbf": now() - 60}),
        );
        assert_eq!(v.verify(&past).unwrap().user_id, "u");
    }

    #[test]
    fn iat_in_the_future_beyond_the_leeway_is_refused() {
        let v = JwtVerifier::hs256("k");
        let exp = now() + 3 * 86_400;
        let future = token_with(
            "k",
            serde_json::json!({"sub": "u", "exp": exp, "iat": now() + 3600}),
        );
        assert_eq!(v.verify(&future).unwrap_err(), AuthError::IssuedInFuture);
        let skewed = token_with(
            "k",
            serde_json::json!({"sub": "u", "exp": exp, "iat": now() + EXP_LEEWAY_SECS - 2}),
        );
        assert_eq!(v.verify(&skewed).unwrap().user_id, "u");
        let text = token_with(
            "k",
            serde_json::json!({"sub": "u", "exp": exp, "iat": "yesterday"}),
        );
        assert!(matches!(v.verify(&text), Err(AuthError::Invalid(_))));
    }
}
