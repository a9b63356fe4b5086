//! The gateway binary refuses bad configuration and a dead NATS with one
//! clear line, never a panic.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::process::Command;
use std::time::{Duration, Instant};

fn gateway() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.env_clear()
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0");
    cmd
}

#[test]
fn missing_jwt_secret_exits_64_naming_it() {
    let out = gateway().output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("JWT_SECRET"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unreachable_nats_exits_naming_it() {
    let started = Instant::now();
    let out = gateway()
        .env("JWT_SECRET", "k")
        .env("NATS_URL", "nats://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NATS_URL"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "gives up in bounded time"
    );
}
