//! The `drover` command line (contract §1).

mod admin_client;
mod drain_cli;
mod suppression_cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use drover::config::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

// mimalloc instead of glibc malloc: with a message's buffers allocated on one thread and freed
// on another, glibc's arenas spent about a fifth of the runtime threads' CPU in
// malloc/free/consolidate in the relay benchmark.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Drover: a high-throughput outbound bulk mailer"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the engine (embedded defaults without --config).
    Serve {
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a programmable SMTP sink that accepts and counts mail.
    Sink(SinkArgs),
    /// Validate a configuration file: exit 0 if good, 2 naming the bad key otherwise.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// View and control the queues of a running engine through its admin API.
    Queue(QueueArgs),
    /// List, add, remove, export or import the suppression list through the admin API.
    Suppression(suppression_cli::SuppressionArgs),
    /// Scale-down: move every queued message of an engine to another engine, until done.
    Drain(drain_cli::DrainArgs),
    /// Print the DNS TXT records the `[[dkim]]` keys of a configuration file need.
    DkimRecords {
        /// The configuration file.
        file: PathBuf,
    },
    /// Read a password (one line) from stdin and print its Argon2id hash for
    /// `smtp_listener.auth_users` `password_hash`.
    HashPassword,
}

#[derive(clap::Args)]
struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2526")]
    listen: SocketAddr,
    /// Serve the counters as JSON over HTTP on this address.
    #[arg(long)]
    status: Option<SocketAddr>,
    /// Greylist: the first attempt per sender/recipient gets 450 4.2.0; a retry after SECS is accepted.
    #[arg(long, value_name = "SECS")]
    greylist: Option<f64>,
    /// Share of recipients answered 451 4.3.0 (random).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    tempfail_percent: u8,
    /// Share of recipients answered 550 5.1.1 (stable per address).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    reject_percent: u8,
    /// After N messages on a connection answer CODE TEXT (421 also closes), e.g. `--reply-after-messages 100 421 "4.7.0 Too many messages"`.
    #[arg(long, num_args = 3, value_names = ["N", "CODE", "TEXT"])]
    reply_after_messages: Option<Vec<String>>,
    /// Delay before every reply, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    latency: u64,
    /// Do not advertise PIPELINING.
    #[arg(long)]
    no_pipelining: bool,
    /// Stop answering (but keep the connection) after N messages on a connection.
    #[arg(long, value_name = "N")]
    stall_after_messages: Option<u32>,
    /// Share of messages after whose final dot the connection is dropped without a reply.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    drop_after_data_percent: u8,
    /// Delay before the 220 greeting, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    banner_delay: u64,
    /// Advertised SIZE; larger messages get 552.
    #[arg(long, default_value_t = 50 * 1024 * 1024)]
    max_message_size: u64,
    /// Host name in the greeting.
    #[arg(long, default_value = "sink.drover.test")]
    hostname: String,
    /// Offer STARTTLS with a self-signed certificate for the host name.
    #[arg(long)]
    tls: bool,
    /// Do not advertise SMTPUTF8.
    #[arg(long)]
    no_smtputf8: bool,
    /// Do not advertise 8BITMIME.
    #[arg(long = "no-8bitmime")]
    no_8bitmime: bool,
}

#[derive(clap::Args)]
struct QueueArgs {
    /// The engine's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8025", env = "DROVER_API")]
    api: String,
    /// Bearer token for the admin API.
    #[arg(long, env = "DROVER_API_TOKEN")]
    token: Option<String>,
    #[command(subcommand)]
    action: QueueAction,
}

#[derive(Subcommand)]
enum QueueAction {
    /// List destinations: ready, scheduled, in flight, oldest, and the holds in force.
    List {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Also show each destination's ready mail by tenant, campaign and priority.
        #[arg(long)]
        groups: bool,
    },
    /// Hold a domain or campaign: its messages stay queued but are not delivered.
    Suspend {
        #[command(flatten)]
        target: Target,
        /// How long (e.g. "2h"); without it, until resumed.
        #[arg(long)]
        duration: Option<String>,
    },
    /// Lift a hold.
    Resume {
        #[command(flatten)]
        target: Target,
    },
    /// Make deferred messages of a domain or campaign due now.
    Retry {
        #[command(flatten)]
        target: Target,
    },
    /// Remove the queued messages of a domain or campaign (each gets an AdminBounce record).
    Purge {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// A destination domain.
    #[arg(long)]
    domain: Option<String>,
    /// A campaign.
    #[arg(long)]
    campaign: Option<String>,
}

impl Target {
    fn json(&self, duration: Option<&String>) -> serde_json::Value {
        let mut v = serde_json::json!({});
        if let Some(d) = &self.domain {
            v["domain"] = d.clone().into();
        }
        if let Some(c) = &self.campaign {
            v["campaign"] = c.clone().into();
        }
        if let Some(d) = duration {
            v["duration"] = d.clone().into();
        }
        v
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    drover::allocator::tune();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Cmd) -> ExitCode {
    match command {
        Cmd::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        Cmd::Serve { config: path } => {
            let config = match &path {
                Some(path) => match Config::load(path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                },
                None => Config::default(),
            };
            exit(serve(config, path).await)
        }
        Cmd::Sink(args) => exit(sink(args).await),
        Cmd::DkimRecords { file } => match Config::load(&file).and_then(|c| c.dkim_signers()) {
            Ok(signers) => {
                for (name, value) in signers.dns_records() {
                    println!("{}", zone_txt(&name, &value));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        Cmd::HashPassword => exit(hash_password()),
        Cmd::Queue(args) => exit(queue(args).await),
        Cmd::Suppression(args) => exit(suppression_cli::run(args).await),
        Cmd::Drain(args) => exit(drain_cli::run(args).await),
    }
}

/// A zone-file TXT line; values over 255 bytes are split into several strings, as DNS
/// character-strings cannot be longer (a 2048-bit RSA key needs two).
fn zone_txt(name: &str, value: &str) -> String {
    let chunks: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!("{name}. IN TXT ( {} )", chunks.join(" "))
}

fn hash_password() -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Password (shown as typed): ");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    anyhow::ensure!(!password.is_empty(), "empty password");
    println!("{}", drover::listener::hash_password(password)?);
    Ok(())
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            // Without signal handlers the process can still be stopped; it just cannot drain.
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn serve(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let running = drover::serve::start(config).await.context("cannot start")?;
    let engine = std::sync::Arc::clone(&running.engine);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let Some(path) = &path else {
                tracing::warn!("SIGHUP: running on embedded defaults, nothing to reload");
                continue;
            };
            // A bad file leaves the running rules in place.
            match Config::load(path)
                .map_err(|e| e.to_string())
                .and_then(|c| engine.reload_policy(&c).map_err(|e| e.to_string()))
            {
                Ok(()) => tracing::info!(path = %path.display(), "configuration reloaded"),
                Err(e) => tracing::error!(path = %path.display(), error = %e, "reload refused"),
            }
        }
    });
    shutdown_signal().await;
    if let Some(to) = running.engine.config().drain.on_shutdown_to.clone() {
        // A second signal stops the wait; the drain is stored and resumes at the next start.
        tokio::select! {
            moved = running.engine.drain_on_shutdown(&to) => match moved {
                Ok(true) => tracing::info!(%to, "drained the queue"),
                Ok(false) => tracing::error!(%to, "the drain stopped; what is left stays spooled"),
                Err(e) => tracing::error!(%to, error = %e, "cannot drain"),
            },
            _ = shutdown_signal() => tracing::warn!("second signal: stopping before the drain is done; it resumes at the next start"),
        }
    }
    tracing::info!("shutting down: finishing in-flight deliveries");
    running.shutdown(Duration::from_secs(30)).await;
    tracing::info!("stopped");
    Ok(())
}

async fn sink(args: SinkArgs) -> anyhow::Result<()> {
    let reply_after_messages = match args.reply_after_messages {
        Some(v) => {
            let [n, code, text] = <[String; 3]>::try_from(v)
                .map_err(|_| anyhow::anyhow!("--reply-after-messages takes N CODE TEXT"))?;
            Some((
                n.parse().context("--reply-after-messages N")?,
                code.parse().context("--reply-after-messages CODE")?,
                text,
            ))
        }
        None => None,
    };
    let tls = if args.tls {
        Some(
            sink::SinkTls::self_signed(&[args.hostname.as_str(), "localhost"])
                .context("TLS setup")?,
        )
    } else {
        None
    };
    let config = sink::SinkConfig {
        tls,
        hostname: args.hostname,
        greylist: args.greylist.map(Duration::from_secs_f64),
        tempfail_percent: args.tempfail_percent,
        reject_percent: args.reject_percent,
        reply_after_messages,
        latency: Duration::from_millis(args.latency),
        pipelining: !args.no_pipelining,
        stall_after_messages: args.stall_after_messages,
        drop_after_data_percent: args.drop_after_data_percent,
        banner_delay: Duration::from_millis(args.banner_delay),
        max_message_size: args.max_message_size,
        capture: false,
        smtputf8: !args.no_smtputf8,
        eight_bit_mime: !args.no_8bitmime,
    };
    let handle = sink::Sink::bind(args.listen, config)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("drover sink listening on {}", handle.local_addr());
    let handle = std::sync::Arc::new(handle);
    if let Some(status) = args.status {
        let listener = tokio::net::TcpListener::bind(status)
            .await
            .with_context(|| format!("cannot listen on {status}"))?;
        let h = std::sync::Arc::clone(&handle);
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                let h = std::sync::Arc::clone(&h);
                async move { axum::Json(h.stats()) }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    shutdown_signal().await;
    let stats = match std::sync::Arc::try_unwrap(handle) {
        Ok(h) => h.shutdown().await,
        Err(h) => h.stats(),
    };
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

async fn queue(args: QueueArgs) -> anyhow::Result<()> {
    let api = admin_client::Api::new(&args.api, args.token.clone());
    let body = match &args.action {
        QueueAction::List { json, groups } => {
            let body = api
                .get(if *groups {
                    "queues?groups=true"
                } else {
                    "queues"
                })
                .await?;
            let holds = api.get("suspensions").await?;
            if *json {
                let both = serde_json::json!({"queues": body, "suspensions": holds["suspensions"]});
                println!("{}", serde_json::to_string_pretty(&both)?);
            } else {
                print_queues(&body, &holds);
            }
            return Ok(());
        }
        QueueAction::Suspend { target, duration } => {
            api.post("suspend", target.json(duration.as_ref())).await?
        }
        QueueAction::Resume { target } => api.post("resume", target.json(None)).await?,
        QueueAction::Retry { target } => api.post("retry", target.json(None)).await?,
        QueueAction::Purge { target } => api.post("purge", target.json(None)).await?,
    };
    println!("{}", serde_json::to_string(&body)?);
    Ok(())
}

fn print_queues(body: &serde_json::Value, holds: &serde_json::Value) {
    println!(
        "{:<40} {:>8} {:>10} {:>10} {:>8} {:>12}",
        "DESTINATION", "READY", "SCHEDULED", "IN_FLIGHT", "PARKED", "OLDEST"
    );
    for d in body["destinations"].as_array().into_iter().flatten() {
        let oldest = d["oldest_age_seconds"]
            .as_u64()
            .map(|s| humantime::format_duration(Duration::from_secs(s)).to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<40} {:>8} {:>10} {:>10} {:>8} {:>12}",
            d["destination"].as_str().unwrap_or("?"),
            d["ready"],
            d["scheduled"],
            d["in_flight"],
            d["parked"],
            oldest
        );
        for g in d["groups"].as_array().into_iter().flatten() {
            println!(
                "    tenant {:<20} campaign {:<20} {:<7} {:>8} ready",
                g["tenant"].as_str().unwrap_or("-"),
                g["campaign"].as_str().unwrap_or("-"),
                g["priority"].as_str().unwrap_or("?"),
                g["ready"]
            );
        }
    }
    let hooks = body["webhooks"].as_array().cloned().unwrap_or_default();
    if !hooks.is_empty() {
        println!(
            "{:<40} {:>10} {:>10} {:>9} {:>8}  LAST ERROR",
            "WEBHOOK", "LAG", "LAG_SECS", "SENT", "FAILURES"
        );
    }
    for w in &hooks {
        println!(
            "{:<40} {:>10} {:>10.0} {:>9} {:>8}  {}",
            w["name"].as_str().unwrap_or("?"),
            w["lag_records"],
            w["lag_seconds"].as_f64().unwrap_or(0.0),
            w["sent_records"],
            w["consecutive_failures"],
            w["last_error"].as_str().unwrap_or("-")
        );
    }
    for h in holds["suspensions"].as_array().into_iter().flatten() {
        let what = h["domain"]
            .as_str()
            .map(|d| format!("domain {d}"))
            .or_else(|| h["campaign"].as_str().map(|c| format!("campaign {c}")))
            .unwrap_or_default();
        let until = h["suspended_until"].as_str().unwrap_or("resumed by hand");
        println!("suspended: {what} until {until}");
    }
    for b in holds["backoff"].as_array().into_iter().flatten() {
        println!("backing off: {}", b.as_str().unwrap_or("?"));
    }
}
