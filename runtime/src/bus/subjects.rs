//! Subject names on the bus, all under the configured prefix (`qc` by default)
//! so environments and test runs can share one NATS.

/// Builds subjects under one prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Client commands and joins for one service (`chat`, `signaling`, …):
    /// request/reply, one queue group per service.
    pub fn command(&self, service: &str) -> String {
        format!("{}.cmd.{service}", self.prefix)
    }

    /// Events for every subscriber of a channel topic `kind:id`.
    /// `chat:c1` → `<prefix>.topic.chat.c1`. The id must already be valid
    /// (`[A-Za-z0-9_-]{1,64}`), which makes it a single subject token.
    pub fn topic(&self, topic: &str) -> String {
        match topic.split_once(':') {
            Some((kind, id)) => format!("{}.topic.{kind}.{id}", self.prefix),
            None => format!("{}.topic.{topic}", self.prefix),
        }
    }

    /// Events for every connection of one user.
    pub fn user(&self, user_id: &str) -> String {
        format!("{}.user.{user_id}", self.prefix)
    }

    /// Every user's subject (a wildcard): what [`Self::user`] names for
    /// any user id.
    pub fn all_users(&self) -> String {
        format!("{}.user.*", self.prefix)
    }

    /// Events for one connection.
    pub fn connection(&self, conn_id: &str) -> String {
        format!("{}.conn.{conn_id}", self.prefix)
    }

    /// A service's own notices to all of its replicas (no queue group), e.g.
    /// `chat` / `membership` when a conversation's members change.
    pub fn service_event(&self, service: &str, name: &str) -> String {
        format!("{}.svc.{service}.{name}", self.prefix)
    }

    /// Gateway connection open/close reports (presence).
    pub fn connection_lifecycle(&self) -> String {
        format!("{}.gateway.connection", self.prefix)
    }

    /// Periodic gateway liveness reports (presence).
    pub fn node_heartbeat(&self) -> String {
        format!("{}.gateway.heartbeat", self.prefix)
    }

    /// Asks one gateway to report its open sockets again (presence lost
    /// them: it restarted empty, or it had given the node up for dead).
    pub fn gateway_resync(&self, node_id: &str) -> String {
        format!("{}.gateway.resync.{}", self.prefix, node_token(node_id))
    }

    /// Asks one gateway which of a list of its connections are closed
    /// (presence missed their closes).
    pub fn gateway_audit(&self, node_id: &str) -> String {
        format!("{}.gateway.audit.{}", self.prefix, node_token(node_id))
    }
}

/// A node name as one subject token: characters that cannot be in a token
/// become `_`.
fn node_token(node_id: &str) -> String {
    node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let s = Subjects::new("qc");
        assert_eq!(s.command("chat"), "qc.cmd.chat");
        assert_eq!(s.topic("chat:c1"), "qc.topic.chat.c1");
        assert_eq!(s.user("u1"), "qc.user.u1");
        assert_eq!(s.all_users(), "qc.user.*");
        assert_eq!(s.connection("k"), "qc.conn.k");
        assert_eq!(
            s.gateway_resync("realtime@gw-1.local"),
            "qc.gateway.resync.realtime_gw-1_local"
        );
        assert_eq!(
            s.gateway_audit("realtime@gw-1.local"),
            "qc.gateway.audit.realtime_gw-1_local"
        );
    }
}
