//! Starting and stopping the server under test, so one command runs a whole
//! scenario (`--spawn allinone|distributed|socketio`).
//!
//! - `allinone`: `target/<profile>/quckchat` beside the bench binary, with a
//!   fresh `DATA_DIR`, per-socket rate limit raised for load.
//! - `distributed`: one `chat-svc` + `--gateways` `gateway` processes (each
//!   its own port and `NODE_NAME`, one subject prefix and JWT secret) over the
//!   NATS at `--nats-url`, chat-svc storing in `--mongodb-url` (a fresh
//!   database per run, dropped when the run stops).
//! - `socketio`: `node bench/socketio-peer/server.js`.
//!
//! Each process logs to a file in the run's temporary directory; it is
//! stopped with SIGTERM (then SIGKILL after a grace period) when the
//! [`Spawned`] is stopped or dropped, and the run's MongoDB database with it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::mongo;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SpawnKind {
    Allinone,
    Distributed,
    Socketio,
}

/// chat-svc's store in --spawn distributed (`CHAT_STORE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ChatStore {
    Mongodb,
    Embedded,
}

/// Where the spawned server listens and what the bench needs to reach it.
pub struct Spawned {
    /// WebSocket server addresses (one per gateway in distributed mode).
    pub ws: Vec<SocketAddr>,
    /// gRPC address for conversation setup (`None` for Socket.IO).
    pub grpc: Option<String>,
    /// Processes to sample: `(name, pid)`, the WebSocket server(s) first.
    pub pids: Vec<(String, u32)>,
    children: Vec<Child>,
    /// The MongoDB database chat-svc was given, dropped on stop.
    mongo_db: Option<(String, String)>,
    pub dir: tempfile::TempDir,
}

/// Settings of a spawned QuckChat server.
pub struct ServerEnv<'a> {
    pub jwt_secret: &'a str,
    pub nats_url: &'a str,
    pub mongodb_url: &'a str,
    pub chat_store: ChatStore,
    pub run_id: &'a str,
    /// Gateway processes (distributed only).
    pub gateways: u16,
    /// More environment for the all-in-one server (push: provider credentials).
    pub extra: Vec<(String, String)>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The directory of the running bench binary (`target/release`).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .context("bench binary has no directory")?
        .to_owned())
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p bench -p quckchat -p quckchat-gateway -p quckchat-chat)",
            path.display()
        );
    }
    Ok(path)
}

fn start(cmd: &mut Command, dir: &Path, log: &str) -> anyhow::Result<Child> {
    let out = std::fs::File::create(dir.join(log))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("start {cmd:?}"))
}

/// Common environment of the QuckChat processes.
fn quckchat_env(cmd: &mut Command, port: u16, env: &ServerEnv) {
    cmd.env("PORT", port.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("JWT_SECRET", env.jwt_secret)
        .env("GRPC_AUTH_TOKEN", crate::setup::grpc_token())
        .env("SOCKET_RATE_LIMIT_PER_SEC", "100000")
        // The load generator opens thousands of sockets per loopback address.
        .env("MAX_CONNECTIONS_PER_IP", "0")
        .env("MAX_SOCKETS_PER_USER", "0")
        .env("SOCKET_IDLE_TIMEOUT_SECS", "120")
        .env("SHUTDOWN_DRAIN_SECS", "1")
        .env("RUST_LOG", "warn");
}

pub fn spawn(kind: SpawnKind, env: &ServerEnv) -> anyhow::Result<Spawned> {
    let dir = tempfile::Builder::new()
        .prefix("quckchat-bench-")
        .tempdir()?;
    let port = free_port()?;
    let ws = SocketAddr::from(([127, 0, 0, 1], port));
    let mut spawned = Spawned {
        ws: vec![ws],
        grpc: None,
        pids: Vec::new(),
        children: Vec::new(),
        mongo_db: None,
        dir,
    };
    match kind {
        SpawnKind::Allinone => {
            let mut cmd = Command::new(binary("quckchat")?);
            quckchat_env(&mut cmd, port, env);
            cmd.env("DATA_DIR", spawned.dir.path().join("data"))
                .envs(env.extra.iter().map(|(k, v)| (k, v)));
            spawned.add(
                "quckchat",
                start(&mut cmd, spawned.dir.path(), "quckchat.log")?,
            );
            spawned.grpc = Some(format!("http://{ws}"));
            wait_ready(ws, "/health/ready", &mut spawned)?;
        }
        SpawnKind::Distributed => {
            let chat_port = free_port()?;
            let prefix = format!("bench{}", env.run_id);
            let mut chat = Command::new(binary("chat-svc")?);
            quckchat_env(&mut chat, chat_port, env);
            chat.env("NATS_URL", env.nats_url)
                .env("NATS_SUBJECT_PREFIX", &prefix);
            match env.chat_store {
                ChatStore::Mongodb => {
                    let mongodb_url = env.mongodb_url.replace("{run}", env.run_id);
                    // Only a per-run database (`{run}` in the URL) is ours to drop.
                    if env.mongodb_url.contains("{run}") {
                        spawned.mongo_db = mongo::database_of(&mongodb_url);
                    }
                    chat.env("MONGODB_URL", &mongodb_url);
                }
                ChatStore::Embedded => {
                    chat.env("CHAT_STORE", "embedded")
                        .env("DATA_DIR", spawned.dir.path().join("chat-data"));
                }
            }
            // The WebSocket servers are sampled first.
            let gateways = env.gateways.max(1);
            for g in 0..gateways {
                let port = if g == 0 { port } else { free_port()? };
                if g > 0 {
                    spawned.ws.push(SocketAddr::from(([127, 0, 0, 1], port)));
                }
                let mut gateway = Command::new(binary("gateway")?);
                quckchat_env(&mut gateway, port, env);
                gateway
                    .env("NATS_URL", env.nats_url)
                    .env("NATS_SUBJECT_PREFIX", &prefix)
                    .env("NODE_NAME", format!("bench{}-gw{g}", env.run_id));
                let name = if gateways == 1 {
                    "gateway".to_owned()
                } else {
                    format!("gateway-{g}")
                };
                let log = format!("{name}.log");
                spawned.add(&name, start(&mut gateway, spawned.dir.path(), &log)?);
            }
            spawned.add(
                "chat-svc",
                start(&mut chat, spawned.dir.path(), "chat-svc.log")?,
            );
            let chat_addr = SocketAddr::from(([127, 0, 0, 1], chat_port));
            spawned.grpc = Some(format!("http://{chat_addr}"));
            wait_ready(chat_addr, "/health/ready", &mut spawned)?;
            for ws in spawned.ws.clone() {
                wait_ready(ws, "/health/ready", &mut spawned)?;
            }
        }
        SpawnKind::Socketio => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("socketio-peer/server.js");
            if !script.with_file_name("node_modules").exists() {
                bail!(
                    "{}: run `npm ci` there first",
                    script.parent().unwrap_or(&script).display()
                );
            }
            let mut cmd = Command::new("node");
            cmd.arg(&script)
                .env("PORT", port.to_string())
                .env("BIND_ADDRESS", "127.0.0.1");
            spawned.add("node", start(&mut cmd, spawned.dir.path(), "socketio.log")?);
            wait_ready(ws, "/health", &mut spawned)?;
        }
    }
    Ok(spawned)
}

impl Spawned {
    fn add(&mut self, name: &str, child: Child) {
        self.pids.push((name.to_owned(), child.id()));
        self.children.push(child);
    }

    /// SIGTERM every process, wait up to 10 s, then SIGKILL what is left.
    pub fn stop(&mut self) {
        for child in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.children {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
        if let Some((addr, db)) = self.mongo_db.take() {
            match mongo::drop_database(&addr, &db) {
                Ok(()) => eprintln!("bench: dropped MongoDB database {db}"),
                Err(err) => eprintln!("bench: could not drop MongoDB database {db}: {err:#}"),
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `GET path` until it answers 200 (30 s at most); fails early if a
/// spawned process exits, showing its log.
fn wait_ready(addr: SocketAddr, path: &str, spawned: &mut Spawned) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http_status(addr, path).ok() == Some(200) {
            return Ok(());
        }
        for (i, child) in spawned.children.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                let name = &spawned.pids[i].0;
                let log = std::fs::read_dir(spawned.dir.path())?
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n");
                bail!("{name} exited ({status}) before it was ready:\n{log}");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("server at {addr} not ready after 30 s")
}

/// A minimal HTTP/1.0 GET, enough for a health check.
pub fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let text = std::str::from_utf8(&head)?;
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .context("not an HTTP response")
}
