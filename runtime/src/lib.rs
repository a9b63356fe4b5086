//! What every QuckChat process needs, in one place so the gateway, each
//! service and the all-in-one binary do it the same way:
//!
//! - [`config`] — typed configuration from the environment (exit code 64 on a
//!   bad value, secrets masked in the start-up log);
//! - [`auth`] — JWT verification of sockets (HS256, `JWT_SECRET`);
//! - [`ids`] — the id format shared by topics and services;
//! - [`bus`] — the bus trait with its NATS and in-process implementations and
//!   their shared conformance suite;
//! - [`routes`] — the table of channel kinds and the services that own them;
//! - [`service`] — the service kit: the [`service::Service`] trait a service
//!   implements and the bus consumer that runs it;
//! - [`errors`] — every reason a client can be refused, once;
//! - [`publish`] — typed publishing to topics, users and connections;
//! - [`queue`] — the bounded queue of a socket's deliveries and of an
//!   in-process bus subscription, free while empty;
//! - [`grpc`] — clients of other services' gRPC APIs;
//! - [`admin`] — `/health`, `/health/live`, `/health/ready`, `/metrics`;
//! - [`dashboard`] — `/dev/dashboard`, a live page of the process's figures;
//! - [`ephemeral`] — short-lived shared state in Redis (pool, key prefix,
//!   scripts, safe reply decoding, one error type) for presence and the like;
//! - [`telemetry`] — logging;
//! - [`presence`] — the Phoenix Presence meta shape shared by services;
//! - [`process`] — the start and end of every binary;
//! - [`server`] — binding and serving HTTP on one port;
//! - [`shutdown`] — SIGTERM/SIGINT handling;
//! - [`time`] — timestamps as clients see them;
//! - `testkit` (feature `testsuite`) — test helpers every crate shares.

pub mod admin;
pub mod auth;
pub mod bus;
pub mod config;
pub mod dashboard;
pub mod ephemeral;
pub mod errors;
pub mod grpc;
pub mod ids;
#[cfg(feature = "mongo")]
pub mod mongo;
pub mod presence;
pub mod process;
pub mod publish;
pub mod push;
pub mod queue;
pub mod routes;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;
#[cfg(any(test, feature = "testsuite"))]
pub mod testkit;
pub mod time;
