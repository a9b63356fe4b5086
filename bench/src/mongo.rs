//! Just enough of the MongoDB wire protocol to drop the per-run database
//! `--spawn distributed` gave chat-svc: one `OP_MSG` `dropDatabase` over a
//! plain TCP connection (no TLS, no auth), so the bench needs no driver.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};

/// `(host:port, database)` of a `mongodb://host:port/db?…` URL: the first
/// host, and the database only if the URL names one.
pub fn database_of(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("mongodb://")?;
    let (authority, path) = rest.split_once('/')?;
    if authority.contains('@') {
        return None;
    }
    let host = authority.split(',').next()?;
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:27017")
    };
    let db = path.split('?').next()?;
    (!db.is_empty()).then(|| (host, db.to_owned()))
}

/// A BSON document of `{dropDatabase: 1, $db: <db>}`.
fn drop_command(db: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.push(0x10); // int32
    body.extend_from_slice(b"dropDatabase\0");
    body.extend_from_slice(&1i32.to_le_bytes());
    body.push(0x02); // string
    body.extend_from_slice(b"$db\0");
    body.extend_from_slice(&(db.len() as i32 + 1).to_le_bytes());
    body.extend_from_slice(db.as_bytes());
    body.push(0);
    body.push(0); // end of document
    let mut doc = ((body.len() + 4) as i32).to_le_bytes().to_vec();
    doc.extend_from_slice(&body);
    doc
}

/// An `OP_MSG` (opcode 2013) carrying `doc` as its body section.
fn op_msg(request_id: i32, doc: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + 1 + doc.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as i32).to_le_bytes());
    msg.extend_from_slice(&request_id.to_le_bytes());
    msg.extend_from_slice(&0i32.to_le_bytes());
    msg.extend_from_slice(&2013i32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes()); // flagBits
    msg.push(0); // section kind 0: body
    msg.extend_from_slice(doc);
    msg
}

/// The `ok` field of a reply document (a double, or an int32).
fn reply_ok(reply: &[u8]) -> Option<f64> {
    if let Some(at) = find(reply, b"\x01ok\0") {
        let v = reply.get(at + 4..at + 12)?;
        return Some(f64::from_le_bytes(v.try_into().ok()?));
    }
    let at = find(reply, b"\x10ok\0")?;
    let v = reply.get(at + 4..at + 8)?;
    Some(i32::from_le_bytes(v.try_into().ok()?) as f64)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Drops `db` on the server at `addr` (`host:port`).
pub fn drop_database(addr: &str, db: &str) -> anyhow::Result<()> {
    let sock = addr
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("{addr}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(&op_msg(1, &drop_command(db)))?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head)?;
    let len = i32::from_le_bytes(head) as usize;
    if !(16..=16 << 20).contains(&len) {
        bail!("reply of {len} bytes");
    }
    let mut reply = vec![0u8; len - 4];
    stream.read_exact(&mut reply)?;
    if reply_ok(&reply) != Some(1.0) {
        bail!("dropDatabase not ok");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_per_run_url() {
        assert_eq!(
            database_of("mongodb://127.0.0.1:27018/bench_ab12?directConnection=true"),
            Some(("127.0.0.1:27018".into(), "bench_ab12".into()))
        );
        assert_eq!(database_of("mongodb://127.0.0.1:27018/?x=1"), None);
        assert_eq!(database_of("mongodb://u:p@h:1/db"), None);
    }

    #[test]
    fn encodes_drop_database() {
        let doc = drop_command("d");
        assert_eq!(
            doc.len() as i32,
            i32::from_le_bytes(doc[..4].try_into().unwrap())
        );
        assert_eq!(*doc.last().unwrap(), 0);
        let msg = op_msg(7, &doc);
        assert_eq!(msg.len(), 21 + doc.len());
        let mut reply = b"\x01ok\0".to_vec();
        reply.extend_from_slice(&1.0f64.to_le_bytes());
        assert_eq!(reply_ok(&reply), Some(1.0));
    }
}
