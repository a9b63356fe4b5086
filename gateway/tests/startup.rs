//! The gateway binary refuses bad configuration and a dead NATS with one
//! clear line, never a panic, in bounded time.

use std::path::Path;

use quckchat_runtime::testkit::assert_start_fails;

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");
const LISTEN: [(&str, &str); 2] = [("BIND_ADDRESS", "127.0.0.1"), ("PORT", "0")];

#[test]
fn missing_jwt_secret_exits_64_naming_it() {
    assert_start_fails(Path::new(GATEWAY), &LISTEN, 64, "JWT_SECRET");
}

#[test]
fn unreachable_nats_exits_naming_it() {
    let env = [
        LISTEN[0],
        LISTEN[1],
        ("JWT_SECRET", "k"),
        ("NATS_URL", "nats://127.0.0.1:1"),
    ];
    assert_start_fails(Path::new(GATEWAY), &env, 1, "NATS_URL");
}
