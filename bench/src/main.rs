//! `bench`: the QuckChat load generator.
//!
//! `cargo run --release -p bench -- <idle|fanout|chat|calls|huddle|push> [options]` runs one
//! scenario end to end and prints a table (stderr) and a JSON summary
//! (stdout); `bench report <json…>` turns a session's summaries into
//! `bench/RESULTS.md`.
//!
//! How the modules fit:
//! - [`cli`]: the command line;
//! - [`orchestrate`]: one run — server, setup, workers, sampling, summary;
//! - [`servers`]: `--spawn allinone|distributed|socketio` (distributed:
//!   `--gateways` gateway processes and one chat-svc over NATS);
//! - [`mongo`]: drops the per-run MongoDB database of a distributed run;
//! - [`setup`]: conversation memberships over gRPC;
//! - [`layout`]: which connection is which user, in which conversation;
//! - [`worker`]: a load-generating process (`--worker`), re-executed from
//!   this binary so no process needs more than its 20,000 open files;
//!   `worker::calls` drives the `calls` scenario's caller/callee pairs,
//!   `worker::huddle` the `huddle` scenario's rooms;
//! - [`push`]: the `push` scenario's FCM and APNS stand-ins, devices and
//!   figures;
//! - [`dialect`]: Phoenix Channels and Socket.IO framing;
//! - [`stats`]: counters and HDR histograms, merged across workers;
//! - [`procfs`]: RSS and CPU of the server from `/proc`;
//! - [`report`]: the table and RESULTS.md.

mod cli;
mod dialect;
mod layout;
mod mongo;
mod orchestrate;
mod procfs;
mod push;
mod report;
mod servers;
mod setup;
mod stats;
mod worker;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, RunArgs};
use crate::layout::Scenario;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.worker {
        return worker::main();
    }
    let result = match cli.command {
        Some(Command::Idle(args)) => run(Scenario::Idle, &args),
        Some(Command::Fanout(args)) => run(Scenario::Fanout, &args),
        Some(Command::Chat(args)) => run(Scenario::Chat, &args),
        Some(Command::Calls(args)) => run(Scenario::Calls, &args),
        Some(Command::Huddle(args)) => run(Scenario::Huddle, &args),
        Some(Command::Push(args)) => run(Scenario::Push, &args),
        Some(Command::Report(args)) => report::write(&args),
        None => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one scenario and prints its table and JSON summary.
fn run(scenario: Scenario, args: &RunArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // SIGTERM/SIGINT (e.g. from `timeout` in bench.sh) drops the run, which
    // stops the spawned servers, kills the workers and drops the database.
    let summary = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            summary = orchestrate::run(scenario, args, command_line()) => summary,
            _ = term.recv() => anyhow::bail!("terminated: servers stopped"),
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: servers stopped"),
        }
    })?;
    report::print_table(&summary);
    let json = serde_json::to_string_pretty(&summary)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{json}\n"))?;
    }
    if let Some(n) = summary
        .huddle
        .as_ref()
        .map(|h| h.violations)
        .filter(|&n| n > 0)
    {
        anyhow::bail!("huddle: {n} correctness violations (see error_reasons)");
    }
    Ok(())
}

/// This invocation as a `cargo run` command, for RESULTS.md.
fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect();
    format!("cargo run --release -p bench -- {}", args.join(" "))
}
