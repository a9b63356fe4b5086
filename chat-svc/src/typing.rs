//! Typing indicators: not stored, sent to the others only, throttled, and
//! ended by the service when the client does not (after [`TYPING_EXPIRY`]).
//! Kept per replica: a `typing:stop` handled by another replica only makes
//! this one's expiry send a second, harmless stop.
//!
//! Time is tokio's clock, so tests can move it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quckchat_runtime::publish::Publisher;
use serde_json::json;
use tokio::time::Instant;

/// A typing indicator without `typing:stop` ends by itself after this.
pub const TYPING_EXPIRY: Duration = Duration::from_secs(8);
/// Repeated `typing:start` within this window is not re-broadcast.
pub const TYPING_THROTTLE: Duration = Duration::from_secs(3);

pub(crate) struct Typing {
    publisher: Publisher,
    active: Arc<Mutex<HashMap<(String, String), TypingState>>>,
}

struct TypingState {
    last_broadcast: Option<Instant>,
    generation: u64,
}

impl Typing {
    pub(crate) fn new(publisher: Publisher) -> Self {
        Self {
            publisher,
            active: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub(crate) async fn start(&self, conversation_id: &str, user_id: &str) {
        let key = (conversation_id.to_owned(), user_id.to_owned());
        let (announce, generation) = {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let state = active.entry(key.clone()).or_insert(TypingState {
                last_broadcast: None,
                generation: 0,
            });
            state.generation += 1;
            let announce = state
                .last_broadcast
                .is_none_or(|last| now.duration_since(last) >= TYPING_THROTTLE);
            if announce {
                state.last_broadcast = Some(now);
            }
            (announce, state.generation)
        };
        if announce {
            publish(&self.publisher, conversation_id, user_id, "typing:start").await;
        }
        let (active, publisher) = (self.active.clone(), self.publisher.clone());
        tokio::spawn(async move {
            tokio::time::sleep(TYPING_EXPIRY).await;
            let expired = {
                let mut active = active.lock().unwrap_or_else(|e| e.into_inner());
                let current = active.get(&key).is_some_and(|s| s.generation == generation);
                if current {
                    active.remove(&key);
                }
                current
            };
            if expired {
                publish(&publisher, &key.0, &key.1, "typing:stop").await;
            }
        });
    }

    pub(crate) async fn stop(&self, conversation_id: &str, user_id: &str) {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(conversation_id.to_owned(), user_id.to_owned()));
        publish(&self.publisher, conversation_id, user_id, "typing:stop").await;
    }
}

async fn publish(publisher: &Publisher, conversation_id: &str, user_id: &str, event: &str) {
    let payload = json!({ "userId": user_id, "conversationId": conversation_id });
    let topic = format!("chat:{conversation_id}");
    if let Err(err) = publisher
        .to_topic(&topic, event, &payload, Some(user_id))
        .await
    {
        tracing::warn!(%err, event, "typing indicator not published");
    }
}
