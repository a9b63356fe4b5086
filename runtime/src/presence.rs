//! The shape of Phoenix Presence metas, shared by the presence service
//! (`presence_diff`) and the chat service (`presence_state` after a join), so
//! the JS client's `Presence` class sees one consistent meta per device.

use serde_json::{json, Value};

/// The presence service's notice (`<prefix>.svc.presence.offline`, payload:
/// the user id) when a user's last device is gone (after the grace window,
/// or once their gateway is found dead). Signaling ends that user's call.
pub const OFFLINE_NOTICE: &str = "offline";

/// Most connection ids one `ConnectionAudit` request lists (presence asks a
/// gateway which of them are closed; ~33 KB, far under the bus's limit).
pub const MAX_AUDITED_CONNECTIONS: usize = 1_000;

/// Largest conversation whose topic carries per-member presence. A bigger
/// one gets an empty `presence_state` at join and no `presence_diff`,
/// `user:online` or `user:offline` on its topic: each member's coming and
/// going told to every other member costs the room O(members²) deliveries
/// (10,000 members: 50 million at their morning connect). Its members ask
/// for the presence of the people they show (`presence:get`).
pub const MAX_PRESENCE_MEMBERS: usize = 1_000;

/// One device's meta: `{phx_ref, deviceId, onlineAt}`.
pub fn meta(device_id: &str, phx_ref: &str, online_at_ms: i64) -> Value {
    let online_at = chrono::DateTime::from_timestamp_millis(online_at_ms).unwrap_or_default();
    json!({
        "phx_ref": phx_ref,
        "deviceId": device_id,
        "onlineAt": crate::time::iso(online_at),
    })
}

/// `{userId: {metas: [...]}}`, the body of `presence_state` and of a diff's
/// `joins` / `leaves`.
pub fn entries<'a>(users: impl IntoIterator<Item = (&'a str, Vec<Value>)>) -> Value {
    let map: serde_json::Map<String, Value> = users
        .into_iter()
        .filter(|(_, metas)| !metas.is_empty())
        .map(|(user, metas)| (user.to_owned(), json!({ "metas": metas })))
        .collect();
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let m = meta("phone", "k1", 0);
        assert_eq!(
            m,
            json!({"phx_ref": "k1", "deviceId": "phone", "onlineAt": "1970-01-01T00:00:00.000Z"})
        );
        let e = entries([("u1", vec![m.clone()]), ("u2", vec![])]);
        assert_eq!(e, json!({"u1": {"metas": [m]}}));
    }
}
