//! `drover drain --to URL`: scale-down. Asks the engine at `--api` to move every queued
//! message to the engine at `--to`, then follows its progress until it is done. The drain
//! runs in the engine: it goes on if this command is stopped, and after a restart.

use crate::admin_client::Api;
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct DrainArgs {
    /// The draining engine's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8025", env = "DROVER_API")]
    api: String,
    /// Bearer token for its admin API.
    #[arg(long, env = "DROVER_API_TOKEN")]
    token: Option<String>,
    /// The peer engine's base URL, which takes the messages.
    #[arg(long)]
    to: String,
    /// Bearer token for the peer's API (default: the engine's `[drain] peer_token_file`).
    #[arg(long, env = "DROVER_PEER_TOKEN")]
    to_token: Option<String>,
    /// Why, written into each message's `Transfer` record.
    #[arg(long)]
    reason: Option<String>,
    /// Start the drain and return without following it.
    #[arg(long)]
    no_wait: bool,
}

pub(crate) async fn run(args: DrainArgs) -> anyhow::Result<()> {
    drover::config::peer_url(&args.to).map_err(|e| anyhow::anyhow!("--to {e}"))?;
    let api = Api::new(&args.api, args.token.clone());
    let mut body = serde_json::json!({ "to": args.to });
    if let Some(t) = &args.to_token {
        body["token"] = t.clone().into();
    }
    if let Some(r) = &args.reason {
        body["reason"] = r.clone().into();
    }
    let mut status = api.post("drain", body.clone()).await?;
    if args.no_wait {
        println!("{}", serde_json::to_string(&status)?);
        return Ok(());
    }
    let mut shown = String::new();
    loop {
        let line = format!(
            "{}: moved {}, left {}{}",
            status["state"].as_str().unwrap_or("?"),
            status["moved"],
            status["left"],
            status["last_error"]
                .as_str()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        );
        if line != shown {
            eprintln!("{line}");
            shown = line;
        }
        match status["state"].as_str() {
            Some("done") => {
                println!("{}", serde_json::to_string(&status)?);
                return Ok(());
            }
            Some("running") => {}
            // Restarted after it finished, or before it was stored: asking again is
            // harmless (what is no longer here is not sent twice) and shows where it stands.
            Some("idle") => {
                status = api.post("drain", body.clone()).await?;
                continue;
            }
            _ => anyhow::bail!(
                "the drain stopped: {}",
                status["last_error"].as_str().unwrap_or("cancelled")
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The engine may restart meanwhile (it resumes the drain): keep asking.
        status = match api.get("drain").await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot read the drain's progress ({e:#}); asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
    }
}
