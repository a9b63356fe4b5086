//! The signaling service: 1:1 voice and video calls on `webrtc:lobby`.

pub mod call;
pub mod calls;
pub mod chat;
pub mod config;
pub mod grpc;
pub mod huddles;
pub mod ice;
pub mod log;
pub mod service;
pub mod state;
