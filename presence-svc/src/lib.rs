//! The presence service: who is online, across devices and gateway nodes.
//!
//! Gateways report every socket's open and close (`<prefix>.gateway.connection`)
//! and a periodic node heartbeat (`<prefix>.gateway.heartbeat`). From these the
//! service keeps [`state`] (Redis, or memory all-in-one) and tells the user's
//! conversations (`chat:<id>` topics, membership from chat-svc over gRPC):
//! `user:online` / `user:offline` when the first device comes / the last one
//! goes, and Phoenix Presence `presence_diff`s per device. A device that
//! reconnects within the grace window shows nothing; a gateway that dies is
//! noticed when its heartbeats stop, and its users leave. A gateway heard
//! from while unknown (presence restarted empty, or gave it up for dead) is
//! asked to report its open sockets again.
//!
//! Reads top-down: [`service`] (events in, events out) → [`state`] → [`grpc`]
//! (`GetPresence`, for push, chat's `presence_state` and the backend) →
//! [`config`].

pub mod config;
pub mod grpc;
pub mod service;
pub mod state;
