//! `quckchat`: the all-in-one server and the commands people and scripts use
//! with it.
//!
//! - `quckchat` (or `quckchat serve`): gateway + chat service in one process,
//!   in-process bus, embedded store under `DATA_DIR`; nothing else to install.
//! - `quckchat token <userId> [--ttl 1h]`: prints a JWT signed with `JWT_SECRET`.
//! - `quckchat conversation put <id> --members u1,u2`: upserts membership
//!   through the server's gRPC API, presenting `GRPC_AUTH_TOKEN` from the
//!   environment (`authorization: Bearer <token>`).
//! - `quckchat device add <userId> --platform fcm --token <t> [--app <app>]`,
//!   `quckchat device list <userId>`, `quckchat device remove <token>`: the
//!   push device registry, the same way.

use std::time::Duration;

use clap::{Parser, Subcommand};
use quckchat::{serve, ServeConfig};
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::{GetConversationRequest, UpsertConversationRequest};
use quckchat_runtime::auth::{mint_token, DEV_JWT_SECRET};
use quckchat_runtime::config::{GRPC_AUTH_TOKEN, JWT_SECRET};
use quckchat_runtime::grpc::{AuthChannel, GrpcToken};
use quckchat_runtime::process;

/// jemalloc, not the system allocator: a message's path allocates a lot, and
/// glibc's malloc cost ~1.35× in throughput (bench/ANALYSIS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "quckchat",
    version,
    about = "QuckChat Realtime: Phoenix-compatible chat, calls and presence"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the all-in-one server (the default).
    Serve,
    /// Print a JWT for a user, signed with JWT_SECRET (or the development secret).
    Token {
        user_id: String,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Manage conversations through the chat service's gRPC API.
    Conversation {
        #[command(subcommand)]
        action: ConversationAction,
    },
    /// Manage push devices through the push service's gRPC API.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
}

#[derive(Subcommand)]
enum DeviceAction {
    /// Register a device token for a user (moves it if another user had it).
    Add {
        user_id: String,
        /// fcm, apns or apns-voip.
        #[arg(long)]
        platform: String,
        #[arg(long)]
        token: String,
        /// Which configured app's credentials push to it (default: the default app).
        #[arg(long, default_value = "")]
        app: String,
        #[arg(long, default_value = "")]
        locale: String,
        /// gRPC address of the server (all-in-one) or of push-svc.
        #[arg(long, env = "QUCKCHAT_ADDR", default_value = "http://127.0.0.1:4000")]
        addr: String,
    },
    /// List a user's devices.
    List {
        user_id: String,
        #[arg(long, env = "QUCKCHAT_ADDR", default_value = "http://127.0.0.1:4000")]
        addr: String,
    },
    /// Remove a device token.
    Remove {
        token: String,
        #[arg(long, env = "QUCKCHAT_ADDR", default_value = "http://127.0.0.1:4000")]
        addr: String,
    },
}

#[derive(Subcommand)]
enum ConversationAction {
    /// Create a conversation or replace its members.
    Put {
        conversation_id: String,
        /// Member user ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
        /// gRPC address of the server (all-in-one) or of chat-svc.
        #[arg(long, env = "QUCKCHAT_ADDR", default_value = "http://127.0.0.1:4000")]
        addr: String,
    },
    /// Show a conversation's members and last seq.
    Get {
        conversation_id: String,
        #[arg(long, env = "QUCKCHAT_ADDR", default_value = "http://127.0.0.1:4000")]
        addr: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => run_server(),
        Command::Token { user_id, ttl } => {
            let secret = std::env::var(JWT_SECRET)
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| {
                    eprintln!(
                        "quckchat: JWT_SECRET is not set; signing with the development secret"
                    );
                    DEV_JWT_SECRET.to_owned()
                });
            println!("{}", mint_token(&secret, &user_id, ttl));
            0
        }
        Command::Conversation { action } => run_client(action),
        Command::Device { action } => run_devices(action),
    };
    std::process::exit(code);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("quckchat: cannot start the async runtime: {e}");
            std::process::exit(1)
        })
}

fn run_server() -> i32 {
    let runtime = runtime();
    // Inside the runtime: the trace exporter (if any) starts its client.
    let config = {
        let _in_runtime = runtime.enter();
        process::start("quckchat", ServeConfig::read)
    };
    if config.gateway.jwt_secret == DEV_JWT_SECRET {
        tracing::warn!(
            "JWT_SECRET is not set: using the DEVELOPMENT secret. Anyone can mint tokens for this server. \
             Set JWT_SECRET to the backend's HS256 secret before exposing it."
        );
    }
    let served = runtime.block_on(async { serve(config, quckchat::shutdown_on_signal()).await });
    {
        let _in_runtime = runtime.enter();
        process::finish("quckchat", served);
    }
    0
}

fn print_device(d: &quckchat_proto::push::Device) {
    println!(
        "{} {} {} app={} locale={}",
        d.user_id,
        d.platform,
        d.token,
        if d.app.is_empty() { "default" } else { &d.app },
        if d.locale.is_empty() { "-" } else { &d.locale },
    );
}

fn run_devices(action: DeviceAction) -> i32 {
    use quckchat_proto::push::push_service_client::PushServiceClient;
    use quckchat_proto::push::{
        ListDevicesRequest, RegisterDeviceRequest, UnregisterDeviceRequest,
    };
    let result = runtime().block_on(async {
        match action {
            DeviceAction::Add {
                user_id,
                platform,
                token,
                app,
                locale,
                addr,
            } => {
                let (channel, bearer) = channel(&addr).await?;
                let device = PushServiceClient::with_interceptor(channel, bearer)
                    .register_device(RegisterDeviceRequest {
                        user_id,
                        platform,
                        token,
                        app,
                        locale,
                    })
                    .await?
                    .into_inner();
                print_device(&device);
            }
            DeviceAction::List { user_id, addr } => {
                let (channel, bearer) = channel(&addr).await?;
                let devices = PushServiceClient::with_interceptor(channel, bearer)
                    .list_devices(ListDevicesRequest { user_id })
                    .await?
                    .into_inner()
                    .devices;
                for d in &devices {
                    print_device(d);
                }
            }
            DeviceAction::Remove { token, addr } => {
                let (channel, bearer) = channel(&addr).await?;
                PushServiceClient::with_interceptor(channel, bearer)
                    .unregister_device(UnregisterDeviceRequest { token })
                    .await?;
                println!("removed");
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    report(result)
}

fn run_client(action: ConversationAction) -> i32 {
    let result = runtime().block_on(async {
        match action {
            ConversationAction::Put {
                conversation_id,
                members,
                addr,
            } => {
                let mut client = connect(&addr).await?;
                let conv = client
                    .upsert_conversation(UpsertConversationRequest {
                        conversation_id,
                        member_ids: members,
                    })
                    .await?
                    .into_inner();
                println!(
                    "{} members={} lastSeq={}",
                    conv.conversation_id,
                    conv.member_ids.join(","),
                    conv.last_seq
                );
            }
            ConversationAction::Get {
                conversation_id,
                addr,
            } => {
                let mut client = connect(&addr).await?;
                let conv = client
                    .get_conversation(GetConversationRequest { conversation_id })
                    .await?
                    .into_inner();
                println!(
                    "{} members={} lastSeq={}",
                    conv.conversation_id,
                    conv.member_ids.join(","),
                    conv.last_seq
                );
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    report(result)
}

/// Exit code 0, or 1 with the error on stderr (naming the token variable
/// when the server refused the credential).
fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(err) => {
            match err.downcast_ref::<tonic::Status>() {
                Some(status) if status.code() == tonic::Code::Unauthenticated => eprintln!(
                    "quckchat: {:?}: {} — set {GRPC_AUTH_TOKEN} to the server's token",
                    status.code(),
                    status.message()
                ),
                Some(status) => eprintln!("quckchat: {:?}: {}", status.code(), status.message()),
                None => eprintln!("quckchat: {err:#}"),
            }
            1
        }
    }
}

/// A client of the chat API at `addr` (see [`channel`]).
async fn connect(addr: &str) -> anyhow::Result<ChatServiceClient<AuthChannel>> {
    let (channel, bearer) = channel(addr).await?;
    Ok(ChatServiceClient::with_interceptor(channel, bearer))
}

/// A channel to `addr` and the credential to present: `GRPC_AUTH_TOKEN`
/// (from the environment, never the command line, so it stays out of
/// `ps`). Unset: no credential is sent, and the server refuses the call.
async fn channel(
    addr: &str,
) -> anyhow::Result<(tonic::transport::Channel, quckchat_runtime::grpc::Bearer)> {
    let token = match std::env::var(GRPC_AUTH_TOKEN) {
        Ok(t) if !t.trim().is_empty() => {
            Some(GrpcToken::new(&t).map_err(|e| anyhow::anyhow!("{GRPC_AUTH_TOKEN}: {e}"))?)
        }
        _ => None,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .map_err(|e| anyhow::anyhow!("--addr {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {addr}: {e}"))?;
    let bearer = match &token {
        Some(token) => token.bearer(),
        None => quckchat_runtime::grpc::Bearer::none(),
    };
    Ok((channel, bearer))
}
