//! `funcatron call` and `funcatron dlq`: asynchronous calls and dead-letter
//! queues through a Tron's management API (`/v1/calls`, `/v1/funcs/{name}/dlq`).

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::client::{answer, Remote};

/// `funcatron call ...`.
#[derive(Subcommand)]
pub enum CallCmd {
    /// One call: state, attempts, reason, answer and callback deliveries.
    Show(CallArgs),
    /// The key that signs callbacks (`x-funcatron-signature`), for the
    /// receiver to verify them with (admin token).
    CallbackKey(KeyArgs),
}

/// Whose callback key.
#[derive(Args)]
pub struct KeyArgs {
    /// The Func whose callbacks it signs (keys are per Func unless the
    /// Tron runs with `--callback-key-scope cluster`).
    #[arg(long)]
    func: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

/// A call id.
#[derive(Args)]
pub struct CallArgs {
    /// The call id (`X-Call-Id` of the 202).
    id: String,
    #[command(flatten)]
    remote: Remote,
}

/// `funcatron dlq ...`.
#[derive(Subcommand)]
pub enum DlqCmd {
    /// A Func's dead-lettered calls.
    List(DlqList),
    /// One dead-lettered call (as `call show`).
    Show(CallArgs),
    /// Queue dead-lettered calls again from their first attempt.
    Redrive(DlqSelect),
    /// Delete dead-lettered calls' records.
    Purge(DlqSelect),
}

/// A Func and a page.
#[derive(Args)]
pub struct DlqList {
    /// The Func.
    func: String,
    /// Calls after this id (the last of the previous page).
    #[arg(long)]
    after: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    remote: Remote,
}

/// A Func and which of its dead-lettered calls.
#[derive(Args)]
pub struct DlqSelect {
    /// The Func.
    func: String,
    /// These calls (repeatable).
    #[arg(long = "id", required_unless_present = "all")]
    ids: Vec<String>,
    /// All of them.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    #[command(flatten)]
    remote: Remote,
}

fn pretty(v: &Value) -> String {
    format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
}

async fn show(a: CallArgs) -> Result<String> {
    let http = reqwest::Client::new();
    let v: Value = answer(
        a.remote
            .get(&http, &format!("/v1/calls/{}", a.id))?
            .send()
            .await?,
    )
    .await?;
    Ok(pretty(&v))
}

/// Run a `call` command; returns what to print.
pub async fn call(cmd: CallCmd) -> Result<String> {
    match cmd {
        CallCmd::Show(a) => show(a).await,
        CallCmd::CallbackKey(a) => {
            let http = reqwest::Client::new();
            let mut path = "/v1/callback-key".to_owned();
            if let Some(f) = &a.func {
                path.push_str(&format!("?func={f}"));
            }
            // Admin only: sent with the management token, as POSTs are.
            let rb = a.remote.get(&http, &path)?;
            let v: Value = answer(rb.send().await?).await?;
            Ok(format!("{}\n", v["key"].as_str().unwrap_or_default()))
        }
    }
}

/// Run a `dlq` command; returns what to print.
pub async fn dlq(cmd: DlqCmd) -> Result<String> {
    let http = reqwest::Client::new();
    match cmd {
        DlqCmd::List(a) => {
            let mut path = format!("/v1/funcs/{}/dlq?limit={}", a.func, a.limit);
            if let Some(after) = &a.after {
                path.push_str(&format!("&after={after}"));
            }
            let v: Value = answer(a.remote.get(&http, &path)?.send().await?).await?;
            let mut out = String::new();
            for c in v["calls"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{}  attempts {}  {}\n",
                    c["id"].as_str().unwrap_or_default(),
                    c["attempts"].as_array().map_or(0, Vec::len),
                    c["reason"].as_str().unwrap_or_default()
                ));
            }
            Ok(out)
        }
        DlqCmd::Show(a) => show(a).await,
        DlqCmd::Redrive(a) | DlqCmd::Purge(a) if a.ids.is_empty() && !a.all => {
            anyhow::bail!("name the calls (--id) or --all")
        }
        DlqCmd::Redrive(a) => act(&http, "redrive", a).await,
        DlqCmd::Purge(a) => act(&http, "purge", a).await,
    }
}

async fn act(http: &reqwest::Client, what: &str, a: DlqSelect) -> Result<String> {
    let body = serde_json::json!({"ids": a.ids, "all": a.all});
    let v: Value = answer(
        a.remote
            .post(http, &format!("/v1/funcs/{}/dlq/{what}", a.func))?
            .json(&body)
            .send()
            .await?,
    )
    .await?;
    Ok(pretty(&v))
}
