//! Test helpers every crate shares (feature `testsuite`): build a client
//! command, decode a service's reply, and isolate a test on the shared test
//! servers (its own subject prefix, database, key prefix), so tests run in
//! parallel and leave nothing behind that another could see.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed step is a failed test"
)]

use prost::Message as _;
use quckchat_proto::bus::{command_reply, ClientCommand, CommandReply};
use serde_json::Value;

/// A client command as a gateway sends it: `user` on device `d-<user>`,
/// connection `k-<user>` on gateway node `gw-test`.
pub fn command(topic: &str, event: &str, user: &str, payload: &Value) -> ClientCommand {
    ClientCommand {
        conn_id: format!("k-{user}"),
        user_id: user.to_owned(),
        device_id: format!("d-{user}"),
        topic: topic.to_owned(),
        event: event.to_owned(),
        payload: payload.to_string().into_bytes(),
        node_id: "gw-test".to_owned(),
    }
}

/// A service's reply, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub ok: bool,
    pub response: Value,
    pub followups: Vec<(String, Value)>,
}

/// Decodes a reply; panics (this is a test) on anything that is not JSON.
pub fn decode(reply: &CommandReply) -> Decoded {
    Decoded {
        ok: reply.status == command_reply::Status::Ok as i32,
        response: serde_json::from_slice(&reply.response).expect("reply response is JSON"),
        followups: reply
            .followups
            .iter()
            .map(|f| {
                let payload = serde_json::from_slice(&f.payload).expect("followup is JSON");
                (f.event.clone(), payload)
            })
            .collect(),
    }
}

/// Decodes a reply as it came over the bus.
pub fn decode_bytes(bytes: &[u8]) -> Decoded {
    decode(&CommandReply::decode(bytes).expect("a CommandReply"))
}

/// A name no other test run uses: subject prefixes, databases, key prefixes.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// `line` without ANSI colour sequences (CSI: ESC [ params final-letter),
/// as a process's log reads in a terminal.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The test NATS (`NATS_URL`, default the local one).
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The test Redis (`REDIS_URL`, default the local one).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The MongoDB-wire test server with a fresh database of its own
/// (`TEST_MONGODB_URL`, started by `scripts/deps.sh`).
pub fn mongodb_url() -> String {
    let base = std::env::var("TEST_MONGODB_URL").expect(
        "TEST_MONGODB_URL must name a MongoDB-wire server (scripts/test.sh starts SecantusDB and sets it)",
    );
    with_database(&base, &unique("qc_test_"))
}

/// `url` with `db` as its path, keeping the query.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Runs a built binary with `env` and waits for it to exit within
/// `timeout`: its exit code and its combined output (start-up failure
/// tests: missing config exits 64, a dead dependency exits 1 naming it).
pub fn run_to_exit(
    binary: &std::path::Path,
    env: &[(&str, &str)],
    timeout: std::time::Duration,
) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(binary)
        .env_clear()
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the binary");
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{} did not exit within {timeout:?}", binary.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut out);
    }
    (status.code(), out)
}

/// Asserts a binary refuses to start with `env`: it exits with `code`
/// within 20 s (bad config: 64; a dead dependency: 1), its output names
/// `names` (the variable at fault), and it did not panic.
pub fn assert_start_fails(binary: &std::path::Path, env: &[(&str, &str)], code: i32, names: &str) {
    let (exit, out) = run_to_exit(binary, env, std::time::Duration::from_secs(20));
    assert_eq!(exit, Some(code), "{out}");
    assert!(
        out.contains(names),
        "the output does not name {names}: {out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_goes_into_the_path_and_the_query_stays() {
        assert_eq!(
            with_database("mongodb://h:1/?directConnection=true", "d"),
            "mongodb://h:1/d?directConnection=true"
        );
        assert_eq!(with_database("mongodb://h:1/old", "d"), "mongodb://h:1/d");
        assert_eq!(with_database("mongodb://h:1", "d"), "mongodb://h:1/d");
    }
}
