//! The ICE servers a client is given on joining `webrtc:lobby` (and a
//! huddle): STUN, and TURN with either static credentials or, when
//! `TURN_SECRET` is set, time-limited ones in coturn's REST scheme
//! (`use-auth-secret`): `username = "<expiry unix seconds>:<userId>"`,
//! `credential = base64(HMAC-SHA1(TURN_SECRET, username))`. coturn checks
//! them with the same secret, and refuses them after the expiry.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Sha1;

/// TURN credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum TurnAuth {
    /// `TURN_USERNAME` / `TURN_CREDENTIAL`, the same for everyone.
    Static {
        username: String,
        credential: String,
    },
    /// `TURN_SECRET`: per user, valid for `lifetime`.
    Rest { secret: String, lifetime: Duration },
}

impl std::fmt::Debug for TurnAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static { username, .. } => f
                .debug_struct("Static")
                .field("username", username)
                .field("credential", &"******")
                .finish(),
            Self::Rest { lifetime, .. } => f
                .debug_struct("Rest")
                .field("secret", &"******")
                .field("lifetime", lifetime)
                .finish(),
        }
    }
}

/// What clients are told to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceConfig {
    /// `STUN_SERVER_URL` (seed default `stun:stun.l.google.com:19302`);
    /// empty: none.
    pub stun_urls: Vec<String>,
    /// `TURN_SERVER_URL`; empty: no TURN.
    pub turn_urls: Vec<String>,
    pub turn_auth: Option<TurnAuth>,
}

/// A comma-separated list of URLs.
pub fn url_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The coturn REST credential for `username`.
pub fn rest_credential(secret: &str, username: &str) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

impl IceConfig {
    /// `iceServers` for `user_id`, in the shape of `RTCConfiguration`.
    pub fn servers_for(&self, user_id: &str, now_unix_secs: i64) -> Value {
        let mut servers = Vec::new();
        if !self.stun_urls.is_empty() {
            servers.push(json!({ "urls": self.stun_urls }));
        }
        if !self.turn_urls.is_empty() {
            match &self.turn_auth {
                Some(TurnAuth::Static {
                    username,
                    credential,
                }) => servers.push(json!({
                    "urls": self.turn_urls,
                    "username": username,
                    "credential": credential,
                })),
                Some(TurnAuth::Rest { secret, lifetime }) => {
                    let expiry = now_unix_secs
                        .saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX));
                    let username = format!("{expiry}:{user_id}");
                    servers.push(json!({
                        "urls": self.turn_urls,
                        "credential": rest_credential(secret, &username),
                        "username": username,
                        "credentialType": "password",
                    }));
                }
                None => servers.push(json!({ "urls": self.turn_urls })),
            }
        }
        Value::Array(servers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_credentials_follow_the_coturn_formula() {
        // Reference value computed independently:
        // printf '%s' '1700000000:alice' | openssl dgst -sha1 -hmac 'north' -binary | base64
        assert_eq!(
            rest_credential("north", "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
        let ice = IceConfig {
            stun_urls: vec!["stun:stun.example.org:3478".into()],
            turn_urls: url_list("turn:t.example.org:3478?transport=udp, turns:t.example.org:5349"),
            turn_auth: Some(TurnAuth::Rest {
                secret: "north".into(),
                lifetime: Duration::from_secs(3600),
            }),
        };
        let servers = ice.servers_for("alice", 1_699_996_400);
        assert_eq!(servers[0], json!({"urls": ["stun:stun.example.org:3478"]}));
        assert_eq!(servers[1]["username"], "1700000000:alice");
        assert_eq!(servers[1]["credential"], "Cd/49soE35ICqcJF/bCTn8Z4OyE=");
        assert_eq!(servers[1]["urls"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn static_turn_and_none() {
        let ice = IceConfig {
            stun_urls: Vec::new(),
            turn_urls: vec!["turn:t:3478".into()],
            turn_auth: Some(TurnAuth::Static {
                username: "u".into(),
                credential: "p".into(),
            }),
        };
        assert_eq!(
            ice.servers_for("bob", 0),
            json!([{"urls": ["turn:t:3478"], "username": "u", "credential": "p"}])
        );
        let none = IceConfig {
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            turn_auth: None,
        };
        assert_eq!(none.servers_for("bob", 0), json!([]));
        let debug = format!("{:?}", ice.turn_auth);
        assert!(!debug.contains("\"p\""), "{debug}");
    }
}
