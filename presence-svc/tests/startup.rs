//! presence-svc refuses a bad or dead Redis, or a missing GRPC_AUTH_TOKEN,
//! with one clear line.

use std::path::Path;

use quckchat_runtime::testkit::{assert_start_fails, nats_url};

fn refuses(redis_url: &str, code: i32) {
    let nats = nats_url();
    let env = [
        ("BIND_ADDRESS", "127.0.0.1"),
        ("PORT", "0"),
        ("NATS_URL", nats.as_str()),
        ("REDIS_URL", redis_url),
        ("GRPC_AUTH_TOKEN", "startup-test-token-0123456789"),
    ];
    assert_start_fails(
        Path::new(env!("CARGO_BIN_EXE_presence-svc")),
        &env,
        code,
        "REDIS_URL",
    );
}

#[test]
fn bad_redis_url_exits_64() {
    refuses("http://nope", 64);
}

#[test]
fn dead_redis_exits_naming_it() {
    refuses("redis://127.0.0.1:1", 1);
}

#[test]
fn missing_grpc_auth_token_exits_64_naming_it() {
    let nats = nats_url();
    let env = [
        ("BIND_ADDRESS", "127.0.0.1"),
        ("PORT", "0"),
        ("NATS_URL", nats.as_str()),
    ];
    assert_start_fails(
        Path::new(env!("CARGO_BIN_EXE_presence-svc")),
        &env,
        64,
        "GRPC_AUTH_TOKEN",
    );
}
