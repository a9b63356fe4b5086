//! The chat service: conversations, messages and their order.
//!
//! Reads top-down: [`service`] (what each event does) → [`store`] (the
//! `ChatStore` trait, its MongoDB and embedded implementations and their
//! conformance suite) → [`grpc`] (the API for internal callers) →
//! [`presence`] (who is online, for `presence_state` after a join) →
//! `turns` (seq order of publications without a lock across the commit) →
//! [`commands`] (taking client commands off the bus). [`config`] is for the
//! `chat-svc` binary; the all-in-one server wires the same pieces with the
//! embedded store.
//!
//! A `message:send` travels: gateway → `<prefix>.cmd.chat` → [`commands`] →
//! [`service::ChatService::handle`] → validated, membership checked, stored
//! with the next `seq` → `message:new` published on
//! `<prefix>.topic.chat.<id>` → reply `{message}`.

pub mod commands;
pub mod config;
pub mod grpc;
pub mod payload;
pub mod presence;
pub mod service;
pub mod store;
mod turns;
mod typing;

use std::sync::Arc;

use async_trait::async_trait;
use quckchat_runtime::admin::HealthCheck;

/// The store as a readiness dependency.
pub struct StoreHealth(pub Arc<dyn store::ChatStore>);

#[async_trait]
impl HealthCheck for StoreHealth {
    fn name(&self) -> &'static str {
        "store"
    }

    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}
