//! Who is who in a scenario: which user each connection is, which
//! conversation (topic / room) it joins, and whether it sends.
//!
//! The layout is a pure function of the scenario's parameters, so the
//! orchestrator (which creates the memberships) and every worker process
//! (which owns a slice of the connections) compute the same one without
//! passing thousands of names around.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// The workloads of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N connections, each joined to a chat topic, heartbeats on, no traffic.
    Idle,
    /// One topic, M subscribers; connection 0 publishes at the target rate.
    Fanout,
    /// Many conversations of 2–10 members; every connection sends.
    Chat,
    /// Pairs of users on `webrtc:lobby`: connection 2k calls 2k+1.
    Calls,
    /// Huddle rooms of `group_max` participants, one room per conversation.
    Huddle,
    /// One connected sender per conversation; its other members are offline
    /// with a device each, so every message becomes push notifications.
    Push,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Chat => "chat",
            Scenario::Calls => "calls",
            Scenario::Huddle => "huddle",
            Scenario::Push => "push",
        }
    }

    /// Whether the connections join conversations that must exist first
    /// (memberships created over gRPC before connecting).
    pub fn needs_memberships(self) -> bool {
        self != Scenario::Calls
    }
}

/// One conversation: connections `first .. first + size` are its members.
#[derive(Clone, Debug)]
pub struct Conversation {
    pub id: String,
    pub first: usize,
    pub size: usize,
}

impl Conversation {
    pub fn topic(&self) -> String {
        format!("chat:{}", self.id)
    }
}

/// The call-signaling channel every `calls` connection joins.
pub const CALLS_TOPIC: &str = "webrtc:lobby";

/// The channel a `huddle` room's creator creates it on.
pub const HUDDLE_LOBBY: &str = "huddle:lobby";

#[derive(Clone, Debug)]
pub struct Layout {
    pub scenario: Scenario,
    run_id: String,
    pub conversations: Vec<Conversation>,
    /// Index into `conversations` for every connection.
    conversation_of: Vec<u32>,
}

impl Layout {
    /// `idle` groups connections into conversations of `group_max`; `fanout`
    /// puts all of them in one; `chat` cycles sizes `group_min..=group_max`;
    /// `calls` pairs them (each pair a caller and a callee, no conversation
    /// is created); `huddle` groups them by `group_max`, one room each;
    /// `push` gives each its own conversation (its offline members are
    /// not connections: see `push::recipients`).
    pub fn new(
        scenario: Scenario,
        run_id: &str,
        connections: usize,
        group_min: usize,
        group_max: usize,
    ) -> Layout {
        let group_min = group_min.max(1);
        let group_max = group_max.max(group_min);
        let mut sizes = Vec::new();
        let mut placed = 0;
        let mut k = 0;
        while placed < connections {
            let want = match scenario {
                Scenario::Idle => group_max,
                Scenario::Fanout => connections,
                Scenario::Chat => group_min + k % (group_max - group_min + 1),
                Scenario::Calls => 2,
                Scenario::Huddle => group_max,
                Scenario::Push => 1,
            };
            let size = want.min(connections - placed);
            sizes.push(size);
            placed += size;
            k += 1;
        }
        // A trailing conversation smaller than group_min joins the one before.
        if scenario != Scenario::Push && sizes.len() > 1 && sizes[sizes.len() - 1] < group_min {
            let last = sizes.pop().unwrap_or(0);
            if let Some(prev) = sizes.last_mut() {
                *prev += last;
            }
        }
        let mut conversations = Vec::with_capacity(sizes.len());
        let mut conversation_of = Vec::with_capacity(connections);
        let mut first = 0;
        for (k, size) in sizes.into_iter().enumerate() {
            conversations.push(Conversation {
                id: format!("{run_id}-{}-c{k}", scenario.name()),
                first,
                size,
            });
            conversation_of.extend(std::iter::repeat_n(k as u32, size));
            first += size;
        }
        Layout {
            scenario,
            run_id: run_id.to_owned(),
            conversations,
            conversation_of,
        }
    }

    /// The run's id (hex digits), in every user and conversation name.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn user(&self, connection: usize) -> String {
        format!("{}-u{connection}", self.run_id)
    }

    /// The device id connection `i` gives as its `deviceId` (huddle).
    pub fn device(&self, connection: usize) -> String {
        format!("{}-d{connection}", self.run_id)
    }

    /// The topic connection `i` joins (huddle: the room's creator creates
    /// it there; each participant then joins `huddle:<id>`).
    pub fn topic(&self, connection: usize) -> String {
        match self.scenario {
            Scenario::Calls => CALLS_TOPIC.to_owned(),
            Scenario::Huddle => HUDDLE_LOBBY.to_owned(),
            _ => self.conversation_of(connection).topic(),
        }
    }

    pub fn conversation_of(&self, connection: usize) -> &Conversation {
        &self.conversations[self.conversation_of[connection] as usize]
    }

    pub fn members(&self, conversation: &Conversation) -> Vec<String> {
        (conversation.first..conversation.first + conversation.size)
            .map(|i| self.user(i))
            .collect()
    }

    pub fn is_sender(&self, connection: usize) -> bool {
        match self.scenario {
            Scenario::Idle => false,
            Scenario::Fanout => connection == 0,
            Scenario::Chat | Scenario::Push => true,
            // The caller of each pair: the pacer hands it the calls to start.
            Scenario::Calls => {
                connection.is_multiple_of(2) && connection + 1 < self.conversation_of.len()
            }
            // One per room (its first participant): the pacer hands the
            // room its due pushes, which the room spreads over everyone.
            Scenario::Huddle => self.conversation_of(connection).first == connection,
        }
    }

    pub fn senders(&self) -> usize {
        (0..self.conversation_of.len())
            .filter(|&i| self.is_sender(i))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_sizes_cycle_and_cover_every_connection() {
        let layout = Layout::new(Scenario::Chat, "r", 100, 2, 10);
        let total: usize = layout.conversations.iter().map(|c| c.size).sum();
        assert_eq!(total, 100);
        assert!(layout.conversations.iter().all(|c| c.size >= 2));
        assert_eq!(layout.conversations[0].size, 2);
        assert_eq!(layout.conversations[8].size, 10);
        assert_eq!(
            layout.conversation_of(99).id,
            layout.conversations.last().unwrap().id
        );
        assert_eq!(layout.senders(), 100);
    }

    #[test]
    fn fanout_is_one_topic_with_one_publisher() {
        let layout = Layout::new(Scenario::Fanout, "r", 50, 2, 10);
        assert_eq!(layout.conversations.len(), 1);
        assert_eq!(layout.conversations[0].size, 50);
        assert_eq!(layout.senders(), 1);
        assert!(layout.is_sender(0) && !layout.is_sender(1));
    }

    #[test]
    fn calls_pair_callers_with_callees_on_the_lobby() {
        let layout = Layout::new(Scenario::Calls, "r", 10, 2, 10);
        assert_eq!(layout.conversations.len(), 5);
        assert!(layout.conversations.iter().all(|c| c.size == 2));
        assert_eq!(layout.senders(), 5);
        assert!(layout.is_sender(4) && !layout.is_sender(5));
        assert_eq!(layout.topic(7), "webrtc:lobby");
        assert!(!Scenario::Calls.needs_memberships());
        assert!(Scenario::Chat.needs_memberships());
    }

    #[test]
    fn huddle_rooms_are_conversations_with_one_sender_each() {
        let layout = Layout::new(Scenario::Huddle, "r", 24, 8, 8);
        assert_eq!(layout.conversations.len(), 3);
        assert!(layout.conversations.iter().all(|c| c.size == 8));
        assert_eq!(layout.senders(), 3);
        assert!(layout.is_sender(8) && !layout.is_sender(9));
        assert_eq!(layout.topic(3), "huddle:lobby");
        assert_eq!(layout.device(5), "r-d5");
        assert!(Scenario::Huddle.needs_memberships());
    }

    #[test]
    fn push_gives_every_sender_a_conversation_of_its_own() {
        let layout = Layout::new(Scenario::Push, "r", 5, 2, 10);
        assert_eq!(layout.conversations.len(), 5);
        assert!(layout.conversations.iter().all(|c| c.size == 1));
        assert_eq!(layout.senders(), 5);
        assert_eq!(layout.topic(3), "chat:r-push-c3");
    }
}
