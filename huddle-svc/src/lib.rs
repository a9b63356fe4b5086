//! The huddle service: persistent group audio/video rooms on `huddle:*`.

pub mod config;
pub mod grpc;
pub mod huddle;
pub mod room;
pub mod service;
pub mod state;
pub mod store;
