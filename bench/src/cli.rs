//! Command line: one subcommand per scenario (sharing [`RunArgs`]), `report`
//! to regenerate RESULTS.md, and the hidden `--worker` mode the orchestrator
//! re-executes itself with.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::dialect::Dialect;
use crate::servers::{ChatStore, SpawnKind};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Load generator for QuckChat (Phoenix Channels) and its Socket.IO peer",
    arg_required_else_help = true
)]
pub struct Cli {
    /// Internal: run as a worker process (plan as one JSON line on stdin).
    #[arg(long, hide = true)]
    pub worker: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// N connections, each joined to a chat topic, heartbeats on, no traffic.
    Idle(RunArgs),
    /// One topic with --connections subscribers; one of them publishes at --rate.
    Fanout(RunArgs),
    /// Conversations of --group-min..=--group-max members; all send, --rate in total.
    Chat(RunArgs),
    /// Call signaling on webrtc:lobby: connection 2k calls 2k+1 (initiate,
    /// answer, offer/answer, --ice-candidates each, end); --rate call setups
    /// per second in total.
    Calls(RunArgs),
    /// Huddles: --rooms rooms of --participants (each a user with its own
    /// socket and deviceId), created on huddle:lobby and joined by all; then
    /// --rate pushes per second in total, spread over the participants:
    /// huddle:toggle-audio (a --toggle-share of them) and webrtc:ice-candidate
    /// relays to a random other participant. Checks huddle versions at every
    /// receiver. Ignores --connections (= rooms × participants).
    Huddle(RunArgs),
    /// Push notifications (needs --spawn allinone): --connections senders,
    /// each in a conversation of its own with --recipients offline members
    /// with a device each (FCM and APNS alternately, provider stand-ins run
    /// by the bench); --rate messages per second in total. Measures
    /// notifications/s and message:send → provider request.
    Push(RunArgs),
    /// Regenerate RESULTS.md from the JSON results of earlier runs.
    Report(ReportArgs),
}

/// The server the load generator talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Phoenix Channels protocol (QuckChat all-in-one or gateway).
    Quckchat,
    /// Engine.IO v4 / Socket.IO v5 (bench/socketio-peer).
    Socketio,
}

impl Target {
    pub fn dialect(self) -> Dialect {
        match self {
            Target::Quckchat => Dialect::Phoenix,
            Target::Socketio => Dialect::SocketIo,
        }
    }
}

/// `callType` of `call:initiate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CallType {
    Audio,
    Video,
}

impl CallType {
    pub fn as_str(self) -> &'static str {
        match self {
            CallType::Audio => "audio",
            CallType::Video => "video",
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Protocol to speak; defaults to what --spawn starts, else quckchat.
    #[arg(long, value_enum)]
    pub target: Option<Target>,
    /// Start the server for this run and stop it afterwards.
    #[arg(long, value_enum)]
    pub spawn: Option<SpawnKind>,
    /// Server to load when not spawning one (scheme, host and port only).
    #[arg(long, default_value = "ws://127.0.0.1:4000")]
    pub url: String,
    /// gRPC address for conversation setup; defaults to --url's host:port.
    #[arg(long)]
    pub grpc: Option<String>,
    /// Server process to sample; default: the spawned one, else found by port.
    #[arg(long)]
    pub server_pid: Option<u32>,
    #[arg(
        long,
        env = "JWT_SECRET",
        default_value = "bench-secret-not-for-production"
    )]
    pub jwt_secret: String,
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Sends per second, whole run (fanout: the publisher's rate).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// How long to send (idle: hold) once every connection has joined.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Wait after the last send for deliveries still in flight.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Phoenix client heartbeat period.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    #[arg(long, default_value_t = 2)]
    pub group_min: usize,
    /// Conversation size: chat cycles group-min..=group-max; idle uses group-max.
    #[arg(long, default_value_t = 10)]
    pub group_max: usize,
    /// Extra bytes of content per message (beyond the ~25-byte timestamp).
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// Source addresses 127.0.0.1..=127.0.0.<n>, round-robin per connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub sources: u8,
    /// Connections per worker process (each process may hold 20,000 files).
    #[arg(long, default_value_t = 9000)]
    pub per_worker: usize,
    /// Tries per connection: after a failed connect or join, connect and
    /// join again 1 s, 2 s, then 5 s later, as the Phoenix client does;
    /// retried tries are counted apart from errors.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub connect_attempts: u32,
    /// Connections being opened at once, per worker.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Gateway processes for --spawn distributed (one chat-svc behind them);
    /// connection i goes to gateway i % N. Each holds < 18,000 sockets.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub gateways: u16,
    /// NATS for --spawn distributed.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// MongoDB for --spawn distributed's chat-svc; `{run}` becomes the run id.
    #[arg(
        long,
        default_value = "mongodb://127.0.0.1:27018/bench_{run}?directConnection=true"
    )]
    pub mongodb_url: String,
    /// Store of --spawn distributed's chat-svc: `mongodb` (--mongodb-url) or
    /// `embedded` (its SQLite store: joins not bounded by the test MongoDB).
    #[arg(long, value_enum, default_value_t = ChatStore::Mongodb)]
    pub chat_store: ChatStore,
    /// calls: ICE candidates each party sends per call.
    #[arg(long, default_value_t = 3)]
    pub ice_candidates: u32,
    /// calls: the `callType` of every call.
    #[arg(long, value_enum, default_value_t = CallType::Audio)]
    pub call_type: CallType,
    /// huddle: rooms (huddles), each in its own conversation.
    #[arg(long, default_value_t = 50)]
    pub rooms: usize,
    /// huddle: participants per room (the server allows 8 by default).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(2..=64))]
    pub participants: u16,
    /// huddle: the share of pushes that are toggles (the rest are relays).
    #[arg(long, default_value_t = 0.5)]
    pub toggle_share: f64,
    /// push: offline members per conversation, one device each.
    #[arg(long, default_value_t = 4)]
    pub recipients: usize,
    /// Conversations already exist: skip the gRPC membership setup.
    #[arg(long)]
    pub no_setup: bool,
    /// Name of this case in RESULTS.md (default: the scenario's name).
    #[arg(long)]
    pub case: Option<String>,
    /// Also write the JSON summary to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct ReportArgs {
    /// JSON summaries written by --json.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Hand-written analysis (profiling, bottlenecks) to include.
    #[arg(long)]
    pub analysis: Option<PathBuf>,
    /// Free-form notes on the run (e.g. what was raised), one per --note.
    #[arg(long)]
    pub note: Vec<String>,
    #[arg(long, default_value = "bench/RESULTS.md")]
    pub out: PathBuf,
}
