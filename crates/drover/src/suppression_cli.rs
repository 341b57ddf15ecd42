//! `drover suppression …`: the suppression list of a running engine, through its admin API.

use crate::admin_client::Api;
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct SuppressionArgs {
    /// The engine's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8025", env = "DROVER_API")]
    api: String,
    /// Bearer token for the admin API.
    #[arg(long, env = "DROVER_API_TOKEN")]
    token: Option<String>,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Show a tenant's entries (or every tenant's with --all).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        all: bool,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put addresses on a tenant's list.
    Add {
        #[arg(long)]
        tenant: Option<String>,
        /// Why (kept with the entry).
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Take addresses off a tenant's list.
    Remove {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Write entries as CSV (tenant,address,source,reason,at,message_id) to standard output.
    Export {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Add the entries of a CSV file (tenant,address[,reason]; a header line is skipped).
    Import {
        /// The file ("-" for standard input).
        file: PathBuf,
    },
}

/// Entries per admin request when importing.
const IMPORT_BATCH: usize = 10_000;

/// Every entry, page by page, handed to `each`.
async fn walk(
    api: &Api,
    tenant: Option<&str>,
    all: bool,
    mut each: impl FnMut(&serde_json::Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut after: Option<String> = None;
    loop {
        let mut query: Vec<(&str, String)> = vec![("limit", "10000".into())];
        if let Some(t) = tenant {
            query.push(("tenant", t.into()));
        }
        if all {
            query.push(("all", "true".into()));
        }
        if let Some(a) = &after {
            query.push(("after", a.clone()));
        }
        let page = api.get_query("suppressions", &query).await?;
        for e in page["entries"].as_array().into_iter().flatten() {
            each(e)?;
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Ok(()),
        }
    }
}

fn entries(tenant: Option<&str>, addresses: &[String], reason: &str) -> serde_json::Value {
    serde_json::json!({
        "entries": addresses
            .iter()
            .map(|a| serde_json::json!({"tenant": tenant, "address": a, "reason": reason}))
            .collect::<Vec<_>>()
    })
}

fn text(v: &serde_json::Value) -> String {
    v.as_str().map(str::to_owned).unwrap_or_default()
}

pub(crate) async fn run(args: SuppressionArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.api, args.token);
    match args.action {
        Action::List { tenant, all, json } => {
            walk(&api, tenant.as_deref(), all, |e| {
                if json {
                    println!("{e}");
                } else {
                    println!(
                        "{:<20} {:<40} {:<12} {:<20} {}",
                        text(&e["tenant"]),
                        text(&e["address"]),
                        text(&e["source"]),
                        text(&e["reason"]),
                        text(&e["at"])
                    );
                }
                Ok(())
            })
            .await?;
        }
        Action::Add {
            tenant,
            reason,
            addresses,
        } => {
            let reply = api
                .post(
                    "suppressions",
                    entries(tenant.as_deref(), &addresses, &reason),
                )
                .await?;
            println!("{reply}");
        }
        Action::Remove { tenant, addresses } => {
            let reply = api
                .post(
                    "suppressions/remove",
                    entries(tenant.as_deref(), &addresses, ""),
                )
                .await?;
            println!("{reply}");
        }
        Action::Export { tenant, all } => {
            let mut out = csv::Writer::from_writer(std::io::stdout().lock());
            out.write_record(["tenant", "address", "source", "reason", "at", "message_id"])?;
            walk(&api, tenant.as_deref(), all, |e| {
                out.write_record([
                    text(&e["tenant"]),
                    text(&e["address"]),
                    text(&e["source"]),
                    text(&e["reason"]),
                    text(&e["at"]),
                    text(&e["message_id"]),
                ])?;
                Ok(())
            })
            .await?;
            out.flush()?;
        }
        Action::Import { file } => {
            let input: Box<dyn std::io::Read> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(
                    std::fs::File::open(&file)
                        .with_context(|| format!("cannot open {}", file.display()))?,
                )
            };
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(input);
            let mut batch = Vec::new();
            let mut added = 0u64;
            for (line, row) in reader.records().enumerate() {
                let row = row.with_context(|| format!("line {}", line + 1))?;
                let tenant = row.get(0).unwrap_or("").trim();
                let address = row.get(1).unwrap_or("").trim();
                if line == 0 && address.eq_ignore_ascii_case("address") {
                    continue;
                }
                if address.is_empty() {
                    anyhow::bail!("line {}: no address", line + 1);
                }
                batch.push(serde_json::json!({
                    "tenant": (!tenant.is_empty()).then_some(tenant),
                    "address": address,
                    "reason": row.get(2).unwrap_or("").trim(),
                }));
                if batch.len() == IMPORT_BATCH {
                    let body = serde_json::json!({ "entries": std::mem::take(&mut batch) });
                    added += api.post("suppressions", body).await?["added"]
                        .as_u64()
                        .unwrap_or(0);
                }
            }
            if !batch.is_empty() {
                let body = serde_json::json!({ "entries": batch });
                added += api.post("suppressions", body).await?["added"]
                    .as_u64()
                    .unwrap_or(0);
            }
            println!("{}", serde_json::json!({ "added": added }));
        }
    }
    Ok(())
}
