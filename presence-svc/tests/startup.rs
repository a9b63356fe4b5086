//! presence-svc refuses a bad or dead Redis with one clear line.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::process::Command;

fn presence() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presence-svc"));
    let nats = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    cmd.env_clear()
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0")
        .env("NATS_URL", nats);
    cmd
}

#[test]
fn bad_redis_url_exits_64() {
    let out = presence().env("REDIS_URL", "http://nope").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("REDIS_URL"));
}

#[test]
fn dead_redis_exits_naming_it() {
    let out = presence()
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("REDIS_URL"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
