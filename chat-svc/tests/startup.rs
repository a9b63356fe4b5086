//! chat-svc refuses a dead MongoDB with one clear line, in bounded time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn dead_mongodb_exits_naming_it() {
    let nats = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_chat-svc"))
        .env_clear()
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0")
        .env("NATS_URL", nats)
        .env(
            "MONGODB_URL",
            "mongodb://127.0.0.1:1/x?directConnection=true",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MONGODB_URL"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20));
}
