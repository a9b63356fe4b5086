//! Protobuf types of QuckChat, generated from `proto/quckchat/**`.
//!
//! - [`bus`]: envelopes between the gateway and the services on the bus.
//! - [`chat`]: the chat service's gRPC API.
//! - [`presence`]: the presence service's gRPC API.
//! - [`signaling`]: the signaling service's gRPC API.
//! - [`huddle`]: the huddle service's gRPC API.
//! - [`push`]: the push service's gRPC API.

#![allow(clippy::all, clippy::pedantic)]

pub mod bus {
    pub mod v1 {
        tonic::include_proto!("quckchat.bus.v1");
    }
    pub use v1::*;
}

pub mod chat {
    pub mod v1 {
        tonic::include_proto!("quckchat.chat.v1");
    }
    pub use v1::*;
}

pub mod presence {
    pub mod v1 {
        tonic::include_proto!("quckchat.presence.v1");
    }
    pub use v1::*;
}

pub mod signaling {
    pub mod v1 {
        tonic::include_proto!("quckchat.signaling.v1");
    }
    pub use v1::*;
}

pub mod huddle {
    pub mod v1 {
        tonic::include_proto!("quckchat.huddle.v1");
    }
    pub use v1::*;
}

pub mod push {
    pub mod v1 {
        tonic::include_proto!("quckchat.push.v1");
    }
    pub use v1::*;
}
