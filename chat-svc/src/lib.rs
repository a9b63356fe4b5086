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
