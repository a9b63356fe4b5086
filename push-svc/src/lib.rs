//! The push service: FCM and APNS notifications for users with no live
//! connection — new messages, incoming and missed calls, and the backend's
//! own notifications.
//!
//! Reads top-down: [`jobs`] (what arrives: chat's and signaling's notices,
//! `Notify`) → [`service`] (who gets what) → [`deliver`] (each device once,
//! retries, dead tokens) → [`providers`] (FCM, APNS) and [`devices`] (the
//! registry); [`queue`] holds jobs (JetStream work queue distributed, in
//! memory all-in-one); [`sent`] remembers what was sent.

pub mod apps;
pub mod clients;
pub mod config;
pub mod deliver;
pub mod devices;
pub mod grpc;
pub mod jobs;
pub mod providers;
pub mod queue;
pub mod sent;
pub mod service;
