//! One scenario run, end to end: start the server if asked, create the
//! memberships, start the worker processes, sample the server while they
//! hold or send, collect their reports and sum everything into a
//! [`Summary`].
//!
//! Every wait is bounded: workers get `30 s + connections / 200 s` in all to
//! connect and join (distributed: `60 s + connections / 200 s`, every join
//! reads MongoDB), and `duration + drain + 60 s` to report; a worker that
//! misses either is killed and the run fails.
//!
//! With `--spawn distributed --gateways N`, connection `i` goes to gateway
//! `i % N`; every gateway is sampled (RSS, CPU, sockets from `/proc`) and
//! summed in [`GatewayFigures`].

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::time::timeout;

use crate::cli::{CallType, RunArgs, Target};
use crate::layout::{Layout, Scenario};
use crate::procfs::{self, Machine};
use crate::push::{self, Providers, PushFigures};
use crate::servers::{self, ServerEnv, SpawnKind};
use crate::setup;
use crate::stats::{Counts, Totals, WorkerReport};
use crate::worker::{now_ns, Plan};

/// Everything one run measured; the JSON the `report` command reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Summary {
    pub case: String,
    pub scenario: Scenario,
    pub target: Target,
    pub spawn: Option<SpawnKind>,
    /// The command that produced this, runnable from the workspace root.
    pub command: String,
    pub machine: Machine,
    pub params: Params,
    pub setup_secs: f64,
    pub connect_secs: f64,
    pub counts: Counts,
    pub error_reasons: std::collections::BTreeMap<String, u64>,
    /// Connections open at the end: connected minus closed during the run.
    pub held: u64,
    /// Server processes, the WebSocket server(s) first.
    pub server: Vec<ServerFigures>,
    /// The WebSocket server processes together (all gateways); absent in
    /// summaries written before `--gateways`.
    #[serde(default)]
    pub gateways: Option<GatewayFigures>,
    /// CPU of the load generator's worker processes (100 = one core): on
    /// this shared box, what the client took from the server.
    pub client_cpu_percent: f64,
    /// CPU of the whole machine over the same window (100 = one core): what
    /// is left after the server and the client was taken by other work on
    /// the box. Absent in summaries written before it.
    #[serde(default)]
    pub machine_cpu_percent: Option<f64>,
    /// (RSS with every connection joined − RSS before) ÷ connections held,
    /// RSS summed over the WebSocket server processes (gateways).
    pub rss_per_connection_bytes: Option<f64>,
    pub acked_per_sec: f64,
    pub deliveries_per_sec: f64,
    /// Expected deliveries (members × acknowledged sends) not received.
    pub drops: i64,
    pub latency_ms: Percentiles,
    pub ack_latency_ms: Percentiles,
    /// The load generator's and the kernel's memory with every connection
    /// joined; absent in summaries written before it.
    #[serde(default)]
    pub memory: Option<MemoryFigures>,
    /// The `calls` scenario's figures; absent for the other scenarios and in
    /// summaries written before it.
    #[serde(default)]
    pub calls: Option<CallFigures>,
    /// The `huddle` scenario's figures; absent for the other scenarios and
    /// in summaries written before it.
    #[serde(default)]
    pub huddle: Option<HuddleFigures>,
    /// The `push` scenario's figures; absent for the other scenarios and in
    /// summaries written before it.
    #[serde(default)]
    pub push: Option<PushFigures>,
}

/// Call signaling (`calls`): pairs calling, setups, and the latencies of
/// each step. For this scenario the generic figures count pushes (sends,
/// acks) and call events received (deliveries, `latency_ms`).
#[derive(Debug, Serialize, Deserialize)]
pub struct CallFigures {
    /// Caller/callee pairs that joined.
    pub pairs: u64,
    pub call_type: CallType,
    /// ICE candidates each party sent per call.
    pub ice_candidates: u32,
    /// Calls the pacer offered (`--rate` × `--duration`), and those skipped
    /// because the pair's queue was full.
    pub due: u64,
    pub skipped: u64,
    /// `call:initiate` sent.
    pub started: u64,
    /// The caller got `call:answered`.
    pub setups: u64,
    /// Every step done and both parties got `call:ended`.
    pub completed: u64,
    /// Error reply, unexpected `call:ended` or stall (see `error_reasons`).
    pub failed: u64,
    /// Over the send window (`--duration`).
    pub setups_per_sec: f64,
    pub completed_per_sec: f64,
    /// `call:initiate` sent → `call:incoming` at the callee.
    pub ring_ms: Percentiles,
    /// `call:answer` sent → `call:answered` at the caller.
    pub answered_ms: Percentiles,
    /// `call:initiate` sent → `call:answered` at the caller.
    pub setup_ms: Percentiles,
    /// `webrtc:offer` / `webrtc:answer` / `webrtc:ice-candidate` pushed →
    /// received by the other party.
    pub relay_ms: Percentiles,
    /// `call:end` sent → `call:ended` at each party.
    pub ended_ms: Percentiles,
    /// Call due (pacer) → `call:initiate` sent: waiting for the pair's
    /// previous call.
    pub start_lag_ms: Percentiles,
}

/// Huddles (`huddle`): rooms, pushes, events delivered and their latencies,
/// and the correctness checks. For this scenario the generic figures count
/// pushes (sends, acks; expected deliveries: participants per toggle, one
/// per relay) and events received (deliveries, `latency_ms`: broadcasts and
/// relays together).
#[derive(Debug, Serialize, Deserialize)]
pub struct HuddleFigures {
    /// Rooms created and joined by every participant.
    pub rooms: u64,
    pub participants: usize,
    pub toggle_share: f64,
    /// Pushes the pacer offered (`--rate` × `--duration`), and those skipped
    /// (a room's queue full, a participant with 4 toggles waiting).
    pub due: u64,
    pub skipped: u64,
    /// `huddle:toggle-audio` and `webrtc:ice-candidate` pushed.
    pub toggles: u64,
    pub relays_sent: u64,
    /// `huddle:participant:updated` received (at every participant, the
    /// toggler included) and matched to a toggle; relays received.
    pub updates: u64,
    pub relays: u64,
    /// `participant:updated` that matched no toggle of ours.
    pub unmatched: u64,
    /// `huddle:participant:*` events of versions before the receiver's own
    /// join, delivered after it (the protocol has clients drop them).
    #[serde(default)]
    pub stale: u64,
    /// Over the send window (`--duration`): updates + relays received.
    pub events_per_sec: f64,
    pub updates_per_sec: f64,
    pub relays_per_sec: f64,
    /// Every push → its reply (toggles and relays).
    pub reply_ms: Percentiles,
    pub toggle_reply_ms: Percentiles,
    pub relay_reply_ms: Percentiles,
    /// Toggle pushed → `participant:updated` of that version at each
    /// participant.
    pub broadcast_ms: Percentiles,
    /// `webrtc:ice-candidate` pushed → received by its target (send time in
    /// the candidate).
    pub relay_ms: Percentiles,
    /// Toggle due → pushed (waiting for the participant's previous toggle).
    pub toggle_lag_ms: Percentiles,
    /// Version gaps or regressions at a receiver, toggle replies whose
    /// version is not their broadcast's, relays at the wrong socket: the
    /// run failed its correctness check when this is not 0.
    pub violations: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub connections: usize,
    pub rate: f64,
    pub duration_secs: f64,
    pub drain_secs: f64,
    pub group_min: usize,
    pub group_max: usize,
    pub payload_bytes: usize,
    pub workers: usize,
    pub sources: u8,
    pub conversations: usize,
    /// Gateway processes the connections were spread over.
    #[serde(default = "one")]
    pub gateways: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServerFigures {
    pub name: String,
    pub pid: u32,
    pub rss_before_kib: u64,
    pub rss_held_kib: u64,
    pub rss_peak_kib: u64,
    /// CPU over the send window plus drain, 100 = one core.
    pub cpu_percent: f64,
    /// Socket descriptors open before connecting and with every connection
    /// joined (so the difference is the connections this process holds).
    #[serde(default)]
    pub sockets_before: u64,
    #[serde(default)]
    pub sockets_held: u64,
}

/// All WebSocket server processes of a run (the gateways) together, and the
/// largest single one: no gateway may come near its 20,000 open files.
#[derive(Debug, Serialize, Deserialize)]
pub struct GatewayFigures {
    pub count: usize,
    /// Connections the gateways hold by their own sockets (held − before).
    pub connections: u64,
    pub connections_max: u64,
    pub rss_held_kib_sum: u64,
    pub rss_held_kib_max: u64,
    pub rss_peak_kib_max: u64,
    /// Largest (RSS held − before) ÷ own connections of a single gateway.
    pub rss_per_connection_max_bytes: Option<f64>,
    pub cpu_percent_sum: f64,
    pub cpu_percent_max: f64,
}

/// Memory outside the server with every connection joined: the load
/// generator (it must be as lean as the server to hold as many sockets on
/// the same box) and the kernel (each loopback connection is two sockets).
#[derive(Debug, Serialize, Deserialize)]
pub struct MemoryFigures {
    /// RSS of all worker processes together.
    pub client_rss_held_kib: u64,
    /// That ÷ connections held (each worker's few MiB of runtime included).
    pub client_rss_per_connection_bytes: f64,
    /// Growth of the machine's slab (`/proc/meminfo`) from before the
    /// workers started: socket, file, epoll objects of both ends.
    pub kernel_slab_kib: i64,
    /// Growth of TCP buffer pages (`/proc/net/sockstat`), in KiB.
    pub kernel_tcp_buffers_kib: i64,
    /// (slab + TCP buffer growth) ÷ connections held. Machine-wide: other
    /// work on the box moves it too.
    pub kernel_per_connection_bytes: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// A worker process and the two ends of its stdio.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    async fn start(plan: &Plan) -> anyhow::Result<Worker> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start worker process")?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        stdin
            .write_all(format!("{}\n", serde_json::to_string(plan)?).as_bytes())
            .await?;
        stdin.flush().await?;
        Ok(Worker {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    async fn line(&mut self, within: Duration) -> anyhow::Result<serde_json::Value> {
        let line = timeout(within, self.lines.next_line())
            .await
            .context("worker did not answer in time")??
            .context("worker exited early")?;
        serde_json::from_str(&line).with_context(|| format!("worker said {line:?}"))
    }
}

fn host_port(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .parse()
        .with_context(|| format!("--url {url:?}: want ws://<ip>:<port>"))
}

/// Most connections one gateway process is given (its limit is 20,000 open
/// files, and it needs some for NATS, its listener and the runtime).
const MAX_PER_GATEWAY: usize = 18_000;

pub async fn run(scenario: Scenario, args: &RunArgs, command: String) -> anyhow::Result<Summary> {
    let run_id = format!("{:x}", now_ns() / 1_000_000 % 0xff_ffff);
    let target = args.target.unwrap_or(match args.spawn {
        Some(SpawnKind::Socketio) => Target::Socketio,
        _ => Target::Quckchat,
    });

    // huddle: the connections are the rooms' participants, the
    // conversations the rooms.
    let (connections, group_min, group_max) = if scenario == Scenario::Huddle {
        let n = usize::from(args.participants);
        (args.rooms * n, n, n)
    } else {
        (args.connections, args.group_min, args.group_max)
    };
    if scenario == Scenario::Huddle {
        if target != Target::Quckchat {
            bail!("huddle: only QuckChat (Phoenix Channels, huddle:<id>) has huddles");
        }
        if args.rooms == 0 {
            bail!("huddle: --rooms must be at least 1");
        }
        if !(0.0..=1.0).contains(&args.toggle_share) {
            bail!(
                "huddle: --toggle-share {} is not in 0..=1",
                args.toggle_share
            );
        }
    }
    if scenario == Scenario::Calls {
        if target != Target::Quckchat {
            bail!("calls: only QuckChat (Phoenix Channels, webrtc:lobby) has call signaling");
        }
        if args.connections < 2 || !args.connections.is_multiple_of(2) {
            bail!(
                "calls: --connections {} must be even (caller 2k calls 2k+1)",
                args.connections
            );
        }
    }

    // push: the providers run here, so the server must be ours to configure.
    let providers = if scenario == Scenario::Push {
        if args.spawn != Some(SpawnKind::Allinone) {
            bail!(
                "push: needs --spawn allinone (the bench runs the FCM and APNS stand-ins and \
                 gives the server their credentials)"
            );
        }
        if args.recipients == 0 {
            bail!("push: --recipients must be at least 1");
        }
        Some(Providers::start().context("start the provider stand-ins")?)
    } else {
        None
    };

    // The server: spawned for this run, or the one at --url.
    let distributed = args.spawn == Some(SpawnKind::Distributed);
    let gateways = if distributed {
        usize::from(args.gateways.max(1))
    } else {
        1
    };
    let per_gateway = connections.div_ceil(gateways);
    if distributed && per_gateway > MAX_PER_GATEWAY {
        bail!(
            "{per_gateway} connections per gateway: more than {MAX_PER_GATEWAY} (each process may \
             open 20,000 files and a gateway retries EMFILE only after 1 s): raise --gateways"
        );
    }
    let mut spawned = match args.spawn {
        Some(kind) => Some(servers::spawn(
            kind,
            &ServerEnv {
                jwt_secret: &args.jwt_secret,
                nats_url: &args.nats_url,
                mongodb_url: &args.mongodb_url,
                chat_store: args.chat_store,
                run_id: &run_id,
                gateways: gateways as u16,
                extra: providers
                    .as_ref()
                    .map(Providers::server_env)
                    .unwrap_or_default(),
            },
        )?),
        None => None,
    };
    let servers_ws: Vec<SocketAddr> = match &spawned {
        Some(s) => s.ws.clone(),
        None => vec![host_port(&args.url)?],
    };
    let server = servers_ws[0];
    let grpc = args
        .grpc
        .clone()
        .or_else(|| spawned.as_ref().and_then(|s| s.grpc.clone()))
        .unwrap_or_else(|| format!("http://{server}"));
    let pids: Vec<(String, u32)> = match (&spawned, args.server_pid) {
        (_, Some(pid)) => vec![("server".to_owned(), pid)],
        (Some(s), None) => s.pids.clone(),
        (None, None) => match procfs::pid_listening_on(server.port()) {
            Ok(pid) => vec![("server".to_owned(), pid)],
            Err(err) => {
                eprintln!("bench: not sampling the server: {err:#}");
                Vec::new()
            }
        },
    };

    // Memberships (QuckChat joins only members).
    let layout = Layout::new(scenario, &run_id, connections, group_min, group_max);
    let setup_started = Instant::now();
    if target == Target::Quckchat && scenario.needs_memberships() && !args.no_setup {
        eprintln!(
            "bench: creating {} conversations at {grpc}",
            layout.conversations.len()
        );
        let offline = if scenario == Scenario::Push {
            args.recipients
        } else {
            0
        };
        setup::memberships(&grpc, &layout, offline).await?;
    }
    let devices = if providers.is_some() {
        push::register_devices(&grpc, &layout, args.recipients).await?
    } else {
        0
    };
    let setup_secs = setup_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before: Vec<u64> = pids.iter().map(|(_, p)| rss(*p)).collect();
    let sockets_before: Vec<u64> = pids.iter().map(|(_, p)| sockets(*p)).collect();
    let kernel_before = procfs::kernel_kib().ok();
    // The first `ws_processes` sampled processes are the WebSocket servers.
    let ws_processes = servers_ws.len().min(pids.len());

    // Workers, each with a slice of the connections (calls: whole pairs;
    // huddle: whole rooms).
    let per_worker = match scenario {
        Scenario::Calls => (args.per_worker / 2 * 2).max(2),
        Scenario::Huddle => (args.per_worker / group_max * group_max).max(group_max),
        _ => args.per_worker.max(1),
    };
    let workers_n = connections.div_ceil(per_worker).max(1);
    let mut workers = Vec::with_capacity(workers_n);
    for w in 0..workers_n {
        let plan = Plan {
            run_id: run_id.clone(),
            scenario,
            dialect: target.dialect(),
            servers: servers_ws.clone(),
            jwt_secret: args.jwt_secret.clone(),
            connections,
            start: w * per_worker,
            end: ((w + 1) * per_worker).min(connections),
            group_min,
            group_max,
            rate: args.rate,
            duration_ms: args.duration.as_millis() as u64,
            drain_ms: args.drain.as_millis() as u64,
            heartbeat_ms: args.heartbeat.as_millis() as u64,
            payload_bytes: args.payload_bytes,
            sources: args.sources,
            connect_concurrency: args.connect_concurrency,
            ice_candidates: args.ice_candidates,
            call_type: args.call_type,
            toggle_share: args.toggle_share,
            connect_attempts: args.connect_attempts,
        };
        workers.push(Worker::start(&plan).await?);
    }
    let to = if servers_ws.len() == 1 {
        server.to_string()
    } else {
        format!("{} gateways ({server}…)", servers_ws.len())
    };
    eprintln!(
        "bench: {} {} connections to {to} from {workers_n} worker(s)",
        connections,
        target_name(target)
    );
    let connect_within = if distributed {
        Duration::from_secs(60 + connections as u64 / 200)
    } else {
        Duration::from_secs(30 + connections as u64 / 200)
    };
    let connect_deadline = Instant::now() + connect_within;
    let mut connect_secs: f64 = 0.0;
    for w in &mut workers {
        let left = connect_deadline.saturating_duration_since(Instant::now());
        let ready = w.line(left.max(Duration::from_secs(1))).await?;
        connect_secs = connect_secs.max(ready["ready"]["connect_secs"].as_f64().unwrap_or(0.0));
    }
    eprintln!(
        "bench: all joined in {connect_secs:.1} s; running for {:?}",
        args.duration
    );

    // Settle, then measure the held state and start the clock.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_held: Vec<u64> = pids.iter().map(|(_, p)| rss(*p)).collect();
    let sockets_held: Vec<u64> = pids.iter().map(|(_, p)| sockets(*p)).collect();
    let cpu_start: Vec<f64> = pids.iter().map(|(_, p)| cpu(*p)).collect();
    let worker_pids: Vec<u32> = workers.iter().filter_map(|w| w.child.id()).collect();
    let client_rss_held: u64 = worker_pids.iter().map(|p| rss(*p)).sum();
    let kernel_held = procfs::kernel_kib().ok();
    let client_cpu_start: f64 = worker_pids.iter().map(|p| cpu(*p)).sum();
    let machine_start = procfs::machine_cpu_secs().ok();
    let started = Instant::now();
    for w in &mut workers {
        w.stdin.write_all(b"go\n").await?;
        w.stdin.flush().await?;
    }
    let mut rss_peak = rss_held.clone();
    let window = args.duration + args.drain;
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(500).min(window - started.elapsed().min(window)))
            .await;
        for (peak, (_, pid)) in rss_peak.iter_mut().zip(&pids) {
            *peak = (*peak).max(rss(*pid));
        }
    }
    let client_cpu = (worker_pids.iter().map(|p| cpu(*p)).sum::<f64>() - client_cpu_start)
        / started.elapsed().as_secs_f64()
        * 100.0;
    let mut reports = Vec::with_capacity(workers.len());
    for w in &mut workers {
        let value = w.line(Duration::from_secs(60)).await?;
        let report: WorkerReport = serde_json::from_value(value)?;
        reports.push(report);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_end: Vec<f64> = pids.iter().map(|(_, p)| cpu(*p)).collect();
    let machine_cpu_percent = match (machine_start, procfs::machine_cpu_secs().ok()) {
        // Busy CPU seconds over all cores per second: 100 = one core.
        (Some((busy0, _)), Some((busy1, _))) => Some((busy1 - busy0) / elapsed * 100.0),
        _ => None,
    };
    for w in &mut workers {
        if timeout(Duration::from_secs(10), w.child.wait())
            .await
            .is_err()
        {
            let _ = w.child.kill().await;
        }
    }
    // What the providers got by the end of the drain (before the server
    // stops: a stopping server may still push what it had queued).
    let push = providers.as_ref().map(|p| {
        let acked: u64 = reports.iter().map(|r| r.counts.acks_ok).sum();
        p.figures(args.recipients, devices, acked, args.duration.as_secs_f64())
    });
    let push = push.transpose()?;
    if let Some(s) = spawned.as_mut() {
        s.stop();
    }

    let totals = Totals::merge(&reports)?;
    let counts = totals.counts.clone();
    let held = counts.connected.saturating_sub(counts.closed);
    let server_figures: Vec<ServerFigures> = pids
        .iter()
        .enumerate()
        .map(|(i, (name, pid))| ServerFigures {
            name: name.clone(),
            pid: *pid,
            rss_before_kib: rss_before[i],
            rss_held_kib: rss_held[i],
            rss_peak_kib: rss_peak[i],
            cpu_percent: (cpu_end[i] - cpu_start[i]) / elapsed * 100.0,
            sockets_before: sockets_before[i],
            sockets_held: sockets_held[i],
        })
        .collect();
    let ws_figures = &server_figures[..ws_processes];
    let grown = |s: &ServerFigures| s.rss_held_kib as f64 - s.rss_before_kib as f64;
    let rss_per_connection_bytes = (!ws_figures.is_empty() && counts.connected > 0)
        .then(|| ws_figures.iter().map(grown).sum::<f64>() * 1024.0 / counts.connected as f64);
    let own = |s: &ServerFigures| s.sockets_held.saturating_sub(s.sockets_before);
    let gateway_figures = (!ws_figures.is_empty()).then(|| GatewayFigures {
        count: ws_figures.len(),
        connections: ws_figures.iter().map(own).sum(),
        connections_max: ws_figures.iter().map(own).max().unwrap_or(0),
        rss_held_kib_sum: ws_figures.iter().map(|s| s.rss_held_kib).sum(),
        rss_held_kib_max: ws_figures.iter().map(|s| s.rss_held_kib).max().unwrap_or(0),
        rss_peak_kib_max: ws_figures.iter().map(|s| s.rss_peak_kib).max().unwrap_or(0),
        rss_per_connection_max_bytes: ws_figures
            .iter()
            .filter(|s| own(s) > 0)
            .map(|s| grown(s) * 1024.0 / own(s) as f64)
            .reduce(f64::max),
        cpu_percent_sum: ws_figures.iter().map(|s| s.cpu_percent).sum(),
        cpu_percent_max: ws_figures.iter().map(|s| s.cpu_percent).fold(0.0, f64::max),
    });
    let kernel = kernel_before.zip(kernel_held).filter(|_| held > 0);
    let memory = kernel.map(|((slab0, tcp0), (slab1, tcp1))| {
        let kernel_slab_kib = slab1 as i64 - slab0 as i64;
        let kernel_tcp_buffers_kib = tcp1 as i64 - tcp0 as i64;
        MemoryFigures {
            client_rss_held_kib: client_rss_held,
            client_rss_per_connection_bytes: client_rss_held as f64 * 1024.0 / held as f64,
            kernel_slab_kib,
            kernel_tcp_buffers_kib,
            kernel_per_connection_bytes: (kernel_slab_kib + kernel_tcp_buffers_kib) as f64 * 1024.0
                / held as f64,
        }
    });
    let send_secs = args.duration.as_secs_f64().max(1e-9);
    if counts.connected == 0 {
        bail!(
            "no connection joined: {:?}",
            totals.error_reasons.keys().take(3).collect::<Vec<_>>()
        );
    }
    let calls = (scenario == Scenario::Calls).then(|| {
        let c = &totals.calls;
        CallFigures {
            pairs: counts.connected / 2,
            call_type: args.call_type,
            ice_candidates: args.ice_candidates,
            due: counts.sends,
            skipped: counts.send_skipped,
            started: c.counts.started,
            setups: c.counts.setups,
            completed: c.counts.completed,
            failed: c.counts.failed,
            setups_per_sec: c.counts.setups as f64 / send_secs,
            completed_per_sec: c.counts.completed as f64 / send_secs,
            ring_ms: Percentiles::of(&c.ring),
            answered_ms: Percentiles::of(&c.answered),
            setup_ms: Percentiles::of(&c.setup),
            relay_ms: Percentiles::of(&c.relay),
            ended_ms: Percentiles::of(&c.ended),
            start_lag_ms: Percentiles::of(&c.start_lag),
        }
    });
    let huddle = (scenario == Scenario::Huddle).then(|| {
        let h = &totals.huddle;
        HuddleFigures {
            rooms: h.counts.rooms,
            participants: group_max,
            toggle_share: args.toggle_share,
            due: counts.sends,
            skipped: counts.send_skipped,
            toggles: h.counts.toggles,
            relays_sent: h.counts.relays_sent,
            updates: h.counts.updates,
            relays: h.counts.relays,
            unmatched: h.counts.unmatched,
            stale: h.counts.stale,
            events_per_sec: (h.counts.updates + h.counts.relays) as f64 / send_secs,
            updates_per_sec: h.counts.updates as f64 / send_secs,
            relays_per_sec: h.counts.relays as f64 / send_secs,
            reply_ms: Percentiles::of(&totals.ack_latency),
            toggle_reply_ms: Percentiles::of(&h.toggle_reply),
            relay_reply_ms: Percentiles::of(&h.relay_reply),
            broadcast_ms: Percentiles::of(&h.broadcast),
            relay_ms: Percentiles::of(&h.relay),
            toggle_lag_ms: Percentiles::of(&h.toggle_lag),
            violations: h.counts.violations,
        }
    });
    Ok(Summary {
        case: args
            .case
            .clone()
            .unwrap_or_else(|| scenario.name().to_owned()),
        scenario,
        target,
        spawn: args.spawn,
        command,
        machine: procfs::machine(),
        params: Params {
            connections,
            rate: args.rate,
            duration_secs: args.duration.as_secs_f64(),
            drain_secs: args.drain.as_secs_f64(),
            group_min,
            group_max,
            payload_bytes: args.payload_bytes,
            workers: workers_n,
            sources: args.sources,
            // calls: pairs, but no conversation is created; huddle: one
            // conversation per room.
            conversations: if scenario.needs_memberships() {
                layout.conversations.len()
            } else {
                0
            },
            gateways: servers_ws.len(),
        },
        setup_secs,
        connect_secs,
        held,
        server: server_figures,
        gateways: gateway_figures,
        client_cpu_percent: client_cpu,
        machine_cpu_percent,
        rss_per_connection_bytes,
        memory,
        acked_per_sec: counts.acks_ok as f64 / send_secs,
        deliveries_per_sec: counts.deliveries as f64 / send_secs,
        drops: counts.expected_deliveries as i64 - counts.deliveries as i64,
        latency_ms: Percentiles::of(&totals.delivery_latency),
        ack_latency_ms: Percentiles::of(&totals.ack_latency),
        error_reasons: totals.error_reasons,
        counts,
        calls,
        huddle,
        push,
    })
}

pub fn target_name(target: Target) -> &'static str {
    match target {
        Target::Quckchat => "QuckChat",
        Target::Socketio => "Socket.IO",
    }
}

fn rss(pid: u32) -> u64 {
    procfs::rss_kib(pid).unwrap_or(0)
}

fn sockets(pid: u32) -> u64 {
    procfs::open_fds(pid).map_or(0, |(_, sockets)| sockets)
}

fn cpu(pid: u32) -> f64 {
    procfs::cpu_secs(pid).unwrap_or(0.0)
}
