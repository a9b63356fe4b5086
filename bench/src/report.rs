//! Output: the table printed after a run, and RESULTS.md rendered from the
//! JSON summaries of a whole `scripts/bench.sh` session — figures, QuckChat ÷
//! Socket.IO ratios for cases run against both, the targets hit or missed,
//! each case's exact command, and the machine.

use std::fmt::Write as _;

use anyhow::Context;

use crate::cli::{ReportArgs, Target};
use crate::layout::Scenario;
use crate::orchestrate::{
    target_name, CallFigures, HuddleFigures, MemoryFigures, Percentiles, Summary,
};
use crate::push::PushFigures;

fn kib(bytes: f64) -> String {
    format!("{:.2} KiB", bytes / 1024.0)
}

fn rate(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn errors(s: &Summary) -> u64 {
    let c = &s.counts;
    c.connect_errors
        + c.join_errors
        + c.acks_error
        + c.closed
        + s.huddle.as_ref().map_or(0, |h| h.violations)
        + s.push.as_ref().map_or(0, |p| {
            p.duplicates + p.rejections + u64::try_from(p.missing).unwrap_or(0)
        })
}

/// The human-readable table of one run (stderr, so stdout stays JSON).
pub fn print_table(s: &Summary) {
    let c = &s.counts;
    let server = s.server.first();
    let rows: Vec<(&str, String)> = vec![
        (
            "case",
            format!(
                "{} ({} vs {})",
                s.case,
                s.scenario.name(),
                target_name(s.target)
            ),
        ),
        (
            "connections held",
            format!(
                "{} of {} (connect errors {}, join errors {}, closed {})",
                s.held, s.params.connections, c.connect_errors, c.join_errors, c.closed
            ),
        ),
        (
            "connect + join",
            format!(
                "{:.1} s over {} worker(s)",
                s.connect_secs, s.params.workers
            ),
        ),
        (
            "server RSS",
            server.map_or("-".into(), |v| {
                format!(
                    "{} MiB held (before {} MiB, peak {} MiB)",
                    v.rss_held_kib / 1024,
                    v.rss_before_kib / 1024,
                    v.rss_peak_kib / 1024
                )
            }),
        ),
        (
            "RSS per connection",
            s.rss_per_connection_bytes.map_or("-".into(), kib),
        ),
        (
            "gateways",
            s.gateways
                .as_ref()
                .filter(|g| g.count > 1)
                .map_or("-".into(), |g| {
                    format!(
                        "{} processes hold {} sockets (max {} in one); RSS {} MiB in all, max {} MiB \
                         (peak {} MiB), max {} per connection; CPU {:.0}% in all, max {:.0}%",
                        g.count,
                        g.connections,
                        g.connections_max,
                        g.rss_held_kib_sum / 1024,
                        g.rss_held_kib_max / 1024,
                        g.rss_peak_kib_max / 1024,
                        g.rss_per_connection_max_bytes.map_or("-".into(), kib),
                        g.cpu_percent_sum,
                        g.cpu_percent_max
                    )
                }),
        ),
        (
            "setup",
            format!("{:.1} s ({} conversations)", s.setup_secs, s.params.conversations),
        ),
        (
            "server CPU",
            s.server
                .iter()
                .map(|v| format!("{} {:.0}%", v.name, v.cpu_percent))
                .chain(std::iter::once(format!(
                    "(bench client {:.0}%{})",
                    s.client_cpu_percent,
                    s.machine_cpu_percent
                        .map_or(String::new(), |m| format!(", whole machine {m:.0}%"))
                )))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "sends",
            format!(
                "{} due, {} skipped, {} ok ({}/s), {} error replies",
                c.sends,
                c.send_skipped,
                c.acks_ok,
                rate(s.acked_per_sec),
                c.acks_error
            ),
        ),
        (
            "deliveries",
            format!(
                "{} ({}/s), expected {}, drops {}",
                c.deliveries,
                rate(s.deliveries_per_sec),
                c.expected_deliveries,
                s.drops
            ),
        ),
        (
            "latency end-to-end",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
                s.latency_ms.p50, s.latency_ms.p99, s.latency_ms.p999, s.latency_ms.max
            ),
        ),
        (
            "latency send→ack",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
                s.ack_latency_ms.p50, s.ack_latency_ms.p99, s.ack_latency_ms.p999
            ),
        ),
        (
            "errors",
            if s.error_reasons.is_empty() {
                "none".into()
            } else {
                s.error_reasons
                    .iter()
                    .take(5)
                    .map(|(r, n)| format!("{r} ×{n}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ),
    ];
    let mut rows = rows;
    if let Some(calls) = &s.calls {
        // Sends and deliveries are pushes and call events here.
        for (k, v) in rows.iter_mut() {
            match *k {
                "sends" => {
                    *k = "pushes";
                    *v = format!(
                        "{} ok ({}/s), {} error replies",
                        c.acks_ok,
                        rate(s.acked_per_sec),
                        c.acks_error
                    );
                }
                "deliveries" => *k = "call events",
                "latency end-to-end" => *k = "event latency",
                "latency send→ack" => *k = "push→reply",
                _ => {}
            }
        }
        // Before "errors": what the calls scenario measures itself.
        let at = rows.len().saturating_sub(1);
        rows.splice(at..at, call_rows(calls));
    }
    if let Some(huddle) = &s.huddle {
        for (k, v) in rows.iter_mut() {
            match *k {
                "sends" => {
                    *k = "pushes";
                    *v = format!(
                        "{} due, {} skipped, {} ok ({}/s), {} error replies",
                        c.sends,
                        c.send_skipped,
                        c.acks_ok,
                        rate(s.acked_per_sec),
                        c.acks_error
                    );
                }
                "deliveries" => *k = "events received",
                "latency end-to-end" => *k = "event latency",
                "latency send→ack" => *k = "push→reply",
                _ => {}
            }
        }
        let at = rows.len().saturating_sub(1);
        rows.splice(at..at, huddle_rows(huddle));
    }
    if let Some(push) = &s.push {
        let at = rows.len().saturating_sub(1);
        rows.splice(at..at, push_rows(push));
    }
    let loud = loud_errors(s);
    for (k, v) in rows {
        eprintln!("{k:>20}  {v}");
    }
    if let Some(loud) = loud {
        eprintln!("{loud}");
    }
}

/// A banner for a run with errors (every error reason is in the JSON).
fn loud_errors(s: &Summary) -> Option<String> {
    if errors(s) == 0 && s.error_reasons.is_empty() {
        return None;
    }
    let bar = "!".repeat(78);
    let what = match s.huddle.as_ref().map_or(0, |h| h.violations) {
        0 => "THIS RUN HAD ERRORS (see errors above and error_reasons in the JSON)".to_owned(),
        n => format!("{n} CORRECTNESS VIOLATIONS (VIOLATION … in errors): THIS RUN FAILED"),
    };
    Some(format!("{bar}\n!!! {what}\n{bar}"))
}

fn percentiles(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({})",
        p.p50, p.p99, p.p999, p.max, p.count
    )
}

/// The table rows of the `calls` scenario.
fn call_rows(c: &CallFigures) -> Vec<(&'static str, String)> {
    vec![
        (
            "calls",
            format!(
                "{} pairs, {} with {} ICE candidates each way: {} due, {} skipped, {} started",
                c.pairs,
                c.call_type.as_str(),
                c.ice_candidates,
                c.due,
                c.skipped,
                c.started
            ),
        ),
        (
            "call setups",
            format!(
                "{} ({}/s), completed {} ({}/s), failed {}",
                c.setups,
                rate(c.setups_per_sec),
                c.completed,
                rate(c.completed_per_sec),
                c.failed
            ),
        ),
        ("ring", percentiles(&c.ring_ms)),
        ("answer→answered", percentiles(&c.answered_ms)),
        ("initiate→answered", percentiles(&c.setup_ms)),
        ("relay", percentiles(&c.relay_ms)),
        ("end→ended", percentiles(&c.ended_ms)),
        ("call start lag", percentiles(&c.start_lag_ms)),
    ]
}

/// The table rows of the `push` scenario.
fn push_rows(p: &PushFigures) -> Vec<(&'static str, String)> {
    vec![
        (
            "notifications",
            format!(
                "{} ({}/s): FCM {}, APNS {}; expected {} ({} offline members × acked), \
                 missing {}, duplicates {}, refused {}",
                p.notifications,
                rate(p.per_sec),
                p.fcm,
                p.apns,
                p.expected,
                p.recipients,
                p.missing,
                p.duplicates,
                p.rejections
            ),
        ),
        ("send→provider", percentiles(&p.latency_ms)),
        (
            "provider sockets",
            format!("{} (for {} devices)", p.provider_connections, p.devices),
        ),
    ]
}

/// The table rows of the `huddle` scenario.
fn huddle_rows(h: &HuddleFigures) -> Vec<(&'static str, String)> {
    vec![
        (
            "huddles",
            format!(
                "{} rooms of {}: {} toggles, {} relays pushed ({:.0}% toggles)",
                h.rooms,
                h.participants,
                h.toggles,
                h.relays_sent,
                h.toggle_share * 100.0
            ),
        ),
        (
            "events delivered",
            format!(
                "{}/s: participant:updated {} ({}/s, {} unmatched), relays {} ({}/s)",
                rate(h.events_per_sec),
                h.updates,
                rate(h.updates_per_sec),
                h.unmatched,
                h.relays,
                rate(h.relays_per_sec)
            ),
        ),
        ("toggle→reply", percentiles(&h.toggle_reply_ms)),
        ("relay→reply", percentiles(&h.relay_reply_ms)),
        ("toggle→broadcast", percentiles(&h.broadcast_ms)),
        ("relay→received", percentiles(&h.relay_ms)),
        ("toggle lag", percentiles(&h.toggle_lag_ms)),
        (
            "version checks",
            if h.violations == 0 {
                format!(
                    "ok: every receiver saw gap-free increasing versions ({} stale from before \
                     its join, dropped)",
                    h.stale
                )
            } else {
                format!("{} VIOLATIONS ({} stale, dropped)", h.violations, h.stale)
            },
        ),
    ]
}

/// Connections held, counted only when spread over more than one gateway.
fn held_over_gateways(s: &Summary) -> Option<f64> {
    let several = s.gateways.as_ref().map_or(s.params.gateways, |g| g.count) > 1;
    Some(if several { s.held as f64 } else { 0.0 })
}

/// One target of the issue, checked against the case that measures it.
struct Goal {
    text: &'static str,
    case: &'static str,
    /// Measured against the distributed processes (`--spawn distributed`).
    distributed: bool,
    measure: fn(&Summary) -> Option<f64>,
    unit: &'static str,
    hit: fn(f64) -> bool,
}

const GOALS: &[Goal] = &[
    Goal {
        text: "RSS ≤ 4 KiB per idle joined connection",
        case: "idle",
        distributed: false,
        measure: |s| s.rss_per_connection_bytes.map(|b| b / 1024.0),
        unit: "KiB",
        hit: |v| v <= 4.0,
    },
    Goal {
        text: "≥ 19k connections held in one gateway process",
        case: "idle",
        distributed: false,
        measure: |s| Some(s.held as f64),
        unit: "connections",
        hit: |v| v >= 19_000.0,
    },
    Goal {
        text: "≥ 100k connections across several gateway processes over NATS",
        case: "idle-distributed",
        distributed: true,
        measure: held_over_gateways,
        unit: "connections",
        hit: |v| v >= 100_000.0,
    },
    Goal {
        text: "500,000 idle joined connections on this machine, gateways over NATS",
        case: "idle-500k",
        distributed: true,
        measure: held_over_gateways,
        unit: "connections",
        hit: |v| v >= 500_000.0,
    },
    Goal {
        text: "fan-out ≥ 400k deliveries/s sustained, every message persisted",
        case: "fanout",
        distributed: false,
        measure: |s| Some(s.deliveries_per_sec),
        unit: "deliveries/s",
        hit: |v| v >= 400_000.0,
    },
    Goal {
        text: "fan-out p99 < 250 ms (same run)",
        case: "fanout",
        distributed: false,
        measure: |s| Some(s.latency_ms.p99),
        unit: "ms",
        hit: |v| v < 250.0,
    },
    Goal {
        text: "point-to-point p99 < 5 ms at 1,000 msg/s, persisting",
        case: "p2p",
        distributed: false,
        measure: |s| Some(s.latency_ms.p99),
        unit: "ms",
        hit: |v| v < 5.0,
    },
    Goal {
        text: "≥ 1,000 call setups/s all-in-one",
        case: "calls",
        distributed: false,
        measure: |s| s.calls.as_ref().map(|c| c.setups_per_sec),
        unit: "setups/s",
        hit: |v| v >= 1_000.0,
    },
    Goal {
        text: "p99 ring latency < 20 ms (same run)",
        case: "calls",
        distributed: false,
        measure: |s| s.calls.as_ref().map(|c| c.ring_ms.p99),
        unit: "ms",
        hit: |v| v < 20.0,
    },
    Goal {
        text: "≥ 5,000 push notifications/s from one push-svc",
        case: "push",
        distributed: false,
        measure: |s| s.push.as_ref().map(|p| p.per_sec),
        unit: "notifications/s",
        hit: |v| v >= 5_000.0,
    },
    Goal {
        text: "10,000 members of one conversation all joined within 10 s",
        case: "bigroom",
        distributed: false,
        measure: |s| (s.held >= 10_000).then_some(s.connect_secs),
        unit: "s",
        hit: |v| v <= 10.0,
    },
    Goal {
        text: "a message to all 10,000 delivered with p99 < 500 ms (same run)",
        case: "bigroom",
        distributed: false,
        measure: |s| (s.held >= 10_000).then_some(s.latency_ms.p99),
        unit: "ms",
        hit: |v| v < 500.0,
    },
    Goal {
        text: "persisted chat ≥ 25k messages/s all-in-one",
        case: "chat-max",
        distributed: false,
        measure: |s| Some(s.acked_per_sec),
        unit: "messages/s",
        hit: |v| v >= 25_000.0,
    },
];

/// CPU time of every server process over the send window and drain, per
/// 1,000 acknowledged sends ("-" when nothing was sent).
fn cpu_per_1k_sends(s: &Summary) -> String {
    let sends = s.acked_per_sec * s.params.duration_secs;
    if sends < 1.0 {
        return "-".into();
    }
    let window = s.params.duration_secs + s.params.drain_secs;
    let cpu_secs: f64 = s
        .server
        .iter()
        .map(|v| v.cpu_percent / 100.0 * window)
        .sum();
    format!("{:.0} ms", cpu_secs / sends * 1000.0 * 1000.0)
}

pub fn write(args: &ReportArgs) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for path in &args.inputs {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let summary: Summary =
            serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
        results.push(summary);
    }
    let analysis = match &args.analysis {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?),
        None => None,
    };
    let md = render(&results, &args.note, analysis.as_deref());
    std::fs::write(&args.out, md).with_context(|| format!("{}", args.out.display()))?;
    eprintln!("bench: wrote {}", args.out.display());
    Ok(())
}

fn find<'a>(results: &'a [Summary], case: &str, target: Target) -> Option<&'a Summary> {
    results.iter().find(|s| {
        s.case == case
            && s.target == target
            && s.spawn != Some(crate::servers::SpawnKind::Distributed)
    })
}

/// The distributed run of `case`.
fn find_distributed<'a>(results: &'a [Summary], case: &str) -> Option<&'a Summary> {
    results
        .iter()
        .find(|s| s.case == case && s.spawn == Some(crate::servers::SpawnKind::Distributed))
}

/// CPU of each server process ("a + b + c"), or their sum when there are
/// too many to list.
fn server_cpu(s: &Summary) -> String {
    if s.server.len() > 8 {
        let sum: f64 = s.server.iter().map(|v| v.cpu_percent).sum();
        return format!("{sum:.0}% over {} processes", s.server.len());
    }
    s.server
        .iter()
        .map(|v| format!("{:.0}%", v.cpu_percent))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// The idle cases' memory per connection on every side of the socket:
/// server, load generator, kernel.
fn render_memory(md: &mut String, results: &[Summary]) {
    let runs: Vec<(&Summary, &MemoryFigures)> = results
        .iter()
        .filter(|s| s.scenario == Scenario::Idle)
        .filter_map(|s| s.memory.as_ref().map(|m| (s, m)))
        .collect();
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## Memory per idle connection
"
    );
    let _ = writeln!(
        md,
        "| case | server | conns held | tries retried | connect+join s | joins/s | server RSS/conn | load generator RSS/conn | kernel/conn (slab + TCP buffers) | machine total/conn |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (s, m) in runs {
        let server = s.rss_per_connection_bytes.unwrap_or(0.0);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |",
            s.case,
            target_name(s.target),
            s.held,
            s.counts.retried,
            s.connect_secs,
            rate(s.held as f64 / s.connect_secs.max(1e-9)),
            kib(server),
            kib(m.client_rss_per_connection_bytes),
            kib(m.kernel_per_connection_bytes),
            kib(server + m.client_rss_per_connection_bytes + m.kernel_per_connection_bytes),
        );
    }
    let _ = writeln!(
        md,
        "\nLoad generator = RSS of all worker processes with every connection joined ÷ \
         connections (their runtime included); kernel = growth of the machine's slab \
         (`/proc/meminfo`) and TCP buffer pages (`/proc/net/sockstat`) from before connecting, \
         both ends of each loopback connection, ÷ connections (machine-wide: other work on the \
         box moves it). Joins/s = connections ÷ the time from the first connect to the last \
         join reply. Tries retried: connects or joins that failed and were tried again on a \
         fresh socket 1 s, 2 s, then 5 s later (`--connect-attempts`, as the Phoenix client \
         rejoins); their reasons are in the run's JSON (`error_reasons`, `retried: …`).\n"
    );
}

/// The `calls` cases, if any: setups and the latency of each step.
fn render_calls(md: &mut String, results: &[Summary]) {
    let calls: Vec<(&Summary, &CallFigures)> = results
        .iter()
        .filter_map(|s| s.calls.as_ref().map(|c| (s, c)))
        .collect();
    if calls.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Call signaling\n");
    let _ = writeln!(
        md,
        "| case | server | pairs | calls due | setups/s | completed/s | failed | ring p50 ms | ring p99 ms | answer→answered p99 ms | relay p50 ms | relay p99 ms | setup p99 ms | start lag p99 ms |"
    );
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (s, c) in calls {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.case,
            target_name(s.target),
            c.pairs,
            c.due,
            rate(c.setups_per_sec),
            rate(c.completed_per_sec),
            c.failed,
            c.ring_ms.p50,
            c.ring_ms.p99,
            c.answered_ms.p99,
            c.relay_ms.p50,
            c.relay_ms.p99,
            c.setup_ms.p99,
            c.start_lag_ms.p99,
        );
    }
    let _ = writeln!(
        md,
        "\nConnection 2k calls 2k+1 on `webrtc:lobby`, one call at a time per pair: initiate → \
         the callee answers on `call:incoming` → the caller sends an offer and the callee an \
         answer, each with N ICE candidates → the caller ends it once both have every relay → \
         both get `call:ended`. Calls are offered open-loop at `--rate` (round-robin over the \
         pairs); a call due while its pair is busy waits (start lag) or, beyond 4 waiting, is \
         skipped. setups/s = calls whose caller got `call:answered`, ÷ the send window. Ring = \
         `call:initiate` sent → `call:incoming` at the callee; answer→answered at the caller; \
         relay = offer/answer/candidate pushed → received by the other party; setup = initiate \
         sent → `call:answered`. In the figures table, a calls case's sends ok/s are push \
         replies and its deliveries are call events received. Error reasons are in the run's \
         JSON (`error_reasons`).\n"
    );
}

/// The `push` cases, if any: notifications the providers accepted.
fn render_push(md: &mut String, results: &[Summary]) {
    let runs: Vec<(&Summary, &PushFigures)> = results
        .iter()
        .filter_map(|s| s.push.as_ref().map(|p| (s, p)))
        .collect();
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Push notifications\n");
    let _ = writeln!(
        md,
        "| case | senders × offline members | messages ok/s | notifications/s | send→provider p50 ms | p99 ms | p99.9 ms | server CPU | client CPU | machine CPU | missing | duplicates | refused |"
    );
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (s, p) in runs {
        let _ = writeln!(
            md,
            "| {} | {} × {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.0}% | {} | {} | {} | {} |",
            s.case,
            s.params.connections,
            p.recipients,
            rate(s.acked_per_sec),
            rate(p.per_sec),
            p.latency_ms.p50,
            p.latency_ms.p99,
            p.latency_ms.p999,
            server_cpu(s),
            s.client_cpu_percent,
            s.machine_cpu_percent
                .map_or("-".into(), |m| format!("{m:.0}%")),
            p.missing,
            p.duplicates,
            p.rejections,
        );
    }
    let _ = writeln!(
        md,
        "\nEach sender is the one connected member of its own conversation; the other members \
         never connect and have one device each, FCM and APNS alternately. The bench runs \
         push-svc's provider stand-ins (FCM with its OAuth2 token endpoint, APNS over HTTP/2; \
         they verify tokens, signatures, topics and bodies as the real services do) and gives \
         the all-in-one server their credentials. notifications/s = requests the providers \
         accepted ÷ the send window; send→provider = the send's due time (open-loop pacer) → \
         the provider accepting the request, read from the preview in the body. Missing = \
         offline members × acknowledged sends − distinct (device, message) pushes by the end \
         of the drain; duplicates = a device pushed the same message again. Server CPU \
         includes the whole all-in-one server (chat, presence, push); the provider stand-ins \
         run in the bench process, not counted in client CPU.\n"
    );
}

/// The `huddle` cases, if any: events delivered, latencies, checks.
fn render_huddles(md: &mut String, results: &[Summary]) {
    let huddles: Vec<(&Summary, &HuddleFigures)> = results
        .iter()
        .filter_map(|s| s.huddle.as_ref().map(|h| (s, h)))
        .collect();
    if huddles.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Huddles\n");
    let _ = writeln!(
        md,
        "| case | rooms × participants | pushes due/s | pushes ok/s | events/s | reply p50 ms | reply p99 ms | broadcast p50 ms | broadcast p99 ms | relay p50 ms | relay p99 ms | server CPU | client CPU | machine CPU | drops | errors | violations | stale |"
    );
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (s, h) in huddles {
        let _ = writeln!(
            md,
            "| {} | {} × {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.0}% | {} | {} | {} | {} | {} |",
            s.case,
            h.rooms,
            h.participants,
            rate(s.params.rate),
            rate(s.acked_per_sec),
            rate(h.events_per_sec),
            h.reply_ms.p50,
            h.reply_ms.p99,
            h.broadcast_ms.p50,
            h.broadcast_ms.p99,
            h.relay_ms.p50,
            h.relay_ms.p99,
            server_cpu(s),
            s.client_cpu_percent,
            s.machine_cpu_percent
                .map_or("-".into(), |m| format!("{m:.0}%")),
            s.drops,
            errors(s),
            h.violations,
            h.stale,
        );
    }
    let _ = writeln!(
        md,
        "\nEach room is a huddle of its own conversation: its creator creates it on \
         `huddle:lobby`, every participant (a user with its own socket and `deviceId`) joins \
         `huddle:<id>`, one at a time. Pushes are offered open-loop at `--rate` in all, \
         round-robin over the participants, each alternating `huddle:toggle-audio` (its audio \
         flipped) and `webrtc:ice-candidate` to a random other participant. events/s = \
         `participant:updated` received at every participant (the toggler included) + relays \
         received, ÷ the send window. Reply = push sent → its reply (toggles and relays). \
         Broadcast = toggle sent → that toggle's `participant:updated` at each participant: a \
         participant has one toggle in flight at most, so the first `updated` of its device \
         with the new audio value is that toggle's, and fixes its version (the reply's version \
         must agree); later receipts match by version. Relay = candidate sent → received by its \
         target (the send time is the candidate's foundation). Violations: a version gap or \
         regression at any receiver (each `huddle:participant:*` event must be the version \
         after the last one it saw, from its join reply), a toggle reply whose version is not \
         its broadcast's, a relay at the wrong socket; counted at each receiver, so one pair of \
         events delivered out of order to a room of 8 counts 16 (a gap and a regression at \
         each). Stale: events of versions before the receiver's own join, delivered after it \
         (the protocol has clients drop them; not a violation). Machine CPU: the whole box \
         over the same window, so machine − server − client is what other work took. Drops = \
         participants × toggles acked + relays acked − events received.\n"
    );
}

fn render(results: &[Summary], notes: &[String], analysis: Option<&str>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Bench results\n");
    let _ = writeln!(
        md,
        "Generated by `scripts/bench.sh` (`bench report`) from the JSON of one session: every \
         figure below comes from the command listed with it, on the machine described at the end. \
         Regenerate with `scripts/bench.sh`.\n"
    );

    let _ = writeln!(md, "## Figures\n");
    let _ = writeln!(
        md,
        "| case | server | conns held | RSS/conn | server RSS held | server CPU | client CPU | sends ok/s | server CPU per 1k sends | deliveries/s | p50 ms | p99 ms | p99.9 ms | errors | drops |"
    );
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in results {
        let mode = match s.spawn {
            Some(crate::servers::SpawnKind::Distributed) if s.params.gateways > 1 => {
                format!(" (distributed, {} gateways)", s.params.gateways)
            }
            Some(crate::servers::SpawnKind::Distributed) => " (distributed)".into(),
            Some(crate::servers::SpawnKind::Allinone) => " (all-in-one)".into(),
            _ => String::new(),
        };
        // WebSocket server RSS: the sum over the gateways (and the largest).
        let rss_held = match &s.gateways {
            Some(g) if g.count > 1 => format!(
                "{} MiB (max {} MiB/gateway)",
                g.rss_held_kib_sum / 1024,
                g.rss_held_kib_max / 1024
            ),
            _ => format!(
                "{} MiB",
                s.server.first().map_or(0, |v| v.rss_held_kib / 1024)
            ),
        };
        let _ = writeln!(
            md,
            "| {} | {}{} | {} / {} | {} | {} | {} | {:.0}% | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} |",
            s.case,
            target_name(s.target),
            mode,
            s.held,
            s.params.connections,
            s.rss_per_connection_bytes.map_or("-".into(), kib),
            rss_held,
            server_cpu(s),
            s.client_cpu_percent,
            rate(s.acked_per_sec),
            cpu_per_1k_sends(s),
            rate(s.deliveries_per_sec),
            s.latency_ms.p50,
            s.latency_ms.p99,
            s.latency_ms.p999,
            errors(s),
            s.drops,
        );
    }
    let _ = writeln!(
        md,
        "\nRSS/conn = (server RSS with every connection joined − RSS before connecting) ÷ \
         connections; with several gateways, RSS is summed over them (server RSS held: the sum, \
         and the largest gateway); chat-svc is not counted. CPU: 100% = one core, over the send window plus drain; server CPU per 1k sends = the server processes' CPU time over that window ÷ thousands of acknowledged sends. Latency: from the \
         moment a send was *due* (open-loop pacer) to its `message:new` / `message` arriving at \
         each member, sender included. Drops = members × acknowledged sends − deliveries \
         received by the end of the drain. Errors = connect/join failures + error replies + \
         sockets closed during the run.\n"
    );

    render_memory(&mut md, results);
    render_calls(&mut md, results);
    render_huddles(&mut md, results);
    render_push(&mut md, results);

    let _ = writeln!(md, "## QuckChat ÷ Socket.IO (same session, same client)\n");
    let _ = writeln!(
        md,
        "| case | RSS/conn | deliveries/s | p50 | p99 | server CPU |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let mut any = false;
    for q in results.iter().filter(|s| s.target == Target::Quckchat) {
        let Some(io) = find(results, &q.case, Target::Socketio) else {
            continue;
        };
        if find(results, &q.case, Target::Quckchat).map(|f| std::ptr::eq(f, q)) != Some(true) {
            continue;
        }
        any = true;
        let ratio = |a: f64, b: f64| {
            if b.abs() > f64::EPSILON {
                format!("{:.2}×", a / b)
            } else {
                "-".into()
            }
        };
        let cpu = |s: &Summary| s.server.iter().map(|v| v.cpu_percent).sum::<f64>();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            q.case,
            match (q.rss_per_connection_bytes, io.rss_per_connection_bytes) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "-".into(),
            },
            ratio(q.deliveries_per_sec, io.deliveries_per_sec),
            ratio(q.latency_ms.p50, io.latency_ms.p50),
            ratio(q.latency_ms.p99, io.latency_ms.p99),
            ratio(cpu(q), cpu(io)),
        );
    }
    if !any {
        let _ = writeln!(md, "| (no case was run against both) | | | | | |");
    }
    let _ = writeln!(
        md,
        "\nBelow 1× is better for RSS, latency and CPU; above 1× is better for deliveries/s. \
         Semantics differ: QuckChat verifies a JWT per connection, checks membership at join and \
         **persists every message** (SQLite, WAL) before fanning it out; the Socket.IO peer \
         (`bench/socketio-peer/server.js`) keeps rooms in memory only, no auth, no storage.\n"
    );

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | measured | case | result |");
    let _ = writeln!(md, "|---|---:|---|---|");
    for goal in GOALS {
        let run = if goal.distributed {
            find_distributed(results, goal.case)
        } else {
            find(results, goal.case, Target::Quckchat)
        };
        let measured = run.and_then(|s| (goal.measure)(s));
        let (value, verdict) = match measured {
            Some(v) => (
                format!("{v:.2} {}", goal.unit),
                if (goal.hit)(v) {
                    "**hit**"
                } else {
                    "**missed**"
                },
            ),
            None => ("-".into(), "not measured"),
        };
        let _ = writeln!(
            md,
            "| {} | {value} | `{}` | {verdict} |",
            goal.text, goal.case
        );
    }

    let _ = writeln!(md, "\n## Commands\n");
    let _ = writeln!(md, "Each case, exactly as run (from the workspace root):\n");
    for s in results {
        let _ = writeln!(
            md,
            "- `{}` / {}: `{}`",
            s.case,
            target_name(s.target),
            s.command
        );
    }
    let _ = writeln!(
        md,
        "\n`fanout` is M subscribers joined to one conversation plus one publisher (one of \
         them) sending `message:send` at the rate given: QuckChat has no server-side event that \
         broadcasts without persisting, so each send is stored once and delivered M times \
         (sender included). `chat` runs conversations of {{group-min..=group-max}} members where \
         every connection sends; `p2p` is `chat` with 2-member conversations at a moderate rate; \
         `chat-max` offers more than the server can take, so its sends-ok/s is the throughput; \
         `calls` is call signaling between pairs of users, `huddle` huddle rooms, `push` push \
         notifications (see above); `bigroom` is `fanout` with 10,000 members of one \
         conversation: its connect time is the time for all of them to join."
    );

    if let Some(m) = results.first().map(|s| &s.machine) {
        let _ = writeln!(md, "\n## Machine\n");
        let _ = writeln!(
            md,
            "- {} cores ({}), {} GiB RAM, kernel {}\n- open files (`ulimit -n`): {} — a hard \
             limit on every process here, not raised; the bench spreads connections over worker \
             processes and source addresses 127.0.0.1..=127.0.0.N instead\n- ephemeral ports: {}",
            m.cores, m.cpu_model, m.memory_gib, m.kernel, m.open_files_limit, m.ip_local_port_range
        );
        for note in notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    if let Some(text) = analysis {
        let _ = writeln!(md, "\n{}", text.trim_end());
    }
    md
}
