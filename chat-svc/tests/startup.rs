//! chat-svc refuses a dead MongoDB, or a missing GRPC_AUTH_TOKEN, with one
//! clear line, in bounded time.

use std::path::Path;

use quckchat_runtime::testkit::{assert_start_fails, nats_url};

#[test]
fn dead_mongodb_exits_naming_it() {
    let nats = nats_url();
    let env = [
        ("BIND_ADDRESS", "127.0.0.1"),
        ("PORT", "0"),
        ("NATS_URL", nats.as_str()),
        ("GRPC_AUTH_TOKEN", "startup-test-token-0123456789"),
        (
            "MONGODB_URL",
            "mongodb://127.0.0.1:1/x?directConnection=true",
        ),
    ];
    assert_start_fails(
        Path::new(env!("CARGO_BIN_EXE_chat-svc")),
        &env,
        1,
        "MONGODB_URL",
    );
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
        Path::new(env!("CARGO_BIN_EXE_chat-svc")),
        &env,
        64,
        "GRPC_AUTH_TOKEN",
    );
}
