//! `funcatron bundle ...`: work with bundles on the developer's machine.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use funcatron_bundle::Bundle;

/// Bundle commands.
#[derive(Subcommand)]
pub enum BundleCmd {
    /// Validate a bundle and print its effective routes (for an environment).
    Show(ShowArgs),
    /// Validate a bundle directory and pack it into an archive (prints its SHA-256).
    Build(BuildArgs),
    /// Upload an archive (or a directory, built first) to a Tron.
    Push(PushArgs),
}

/// `funcatron bundle build`.
#[derive(Args)]
pub struct BuildArgs {
    /// The bundle directory.
    dir: PathBuf,
    /// Archive to write (default `<name>-<sha12>.tar.gz`).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

/// `funcatron bundle push`.
#[derive(Args)]
pub struct PushArgs {
    /// An archive from `bundle build`, or a bundle directory.
    path: PathBuf,
    /// Enable it at once.
    #[arg(long)]
    enable: bool,
    #[command(flatten)]
    remote: crate::client::Remote,
}

/// `funcatron bundle show`.
#[derive(Args)]
pub struct ShowArgs {
    /// The bundle directory.
    dir: PathBuf,
    /// Apply the bundle's rewrite rules for this environment first.
    #[arg(long, env = "FUNCATRON_ENVIRONMENT")]
    environment: Option<String>,
}

/// Run a bundle command.
pub async fn run(cmd: BundleCmd) -> Result<()> {
    match cmd {
        BundleCmd::Show(a) => {
            print!("{}", show(&a.dir, a.environment.as_deref())?);
            Ok(())
        }
        BundleCmd::Build(a) => {
            let (sha, path, name) = crate::client::build(&a.dir, a.output.as_deref())?;
            println!("{name} {sha} {}", path.display());
            Ok(())
        }
        BundleCmd::Push(a) => {
            let v = crate::client::push(&a.remote, &a.path, a.enable).await?;
            println!(
                "{} {} {}",
                v.name,
                v.sha,
                if v.enabled { "enabled" } else { "uploaded" }
            );
            Ok(())
        }
    }
}

/// The effective routes of the bundle in `dir`, as printed: the primary
/// host and base path, every base the document is served on, and each
/// operation at the primary base (or at its own servers).
pub fn show(dir: &std::path::Path, environment: Option<&str>) -> Result<String> {
    use std::fmt::Write;
    let b = Bundle::load_in(dir, environment)?;
    let host = b.host.as_deref().unwrap_or("*");
    let mut out = String::new();
    writeln!(
        out,
        "Func {} ({}, handler {}) from {}",
        b.name,
        b.runtime.as_str(),
        b.handler.display(),
        b.spec_file.display()
    )?;
    writeln!(
        out,
        "environment: {}",
        environment.unwrap_or("(none: the document as written)")
    )?;
    writeln!(out, "host: {host}  basePath: {}", b.base_path)?;
    let bases: Vec<String> = b.bases.iter().map(ToString::to_string).collect();
    writeln!(out, "served on: {}", bases.join(", "))?;
    for op in &b.operations {
        let at: Vec<String> = match &op.bases {
            None => vec![format!("{host}{}", joined(&b.base_path, &op.path))],
            Some(own) => own
                .iter()
                .map(|base| {
                    let h = base.host.as_deref().unwrap_or("*");
                    format!("{h}{}", joined(&base.path, &op.path))
                })
                .collect(),
        };
        let default = if op.has_operation_id {
            ""
        } else {
            "  (no operationId: default name)"
        };
        for a in at {
            writeln!(
                out,
                "{:<7} {a}  ->  {}{default}",
                op.method, op.operation_id
            )?;
        }
    }
    Ok(out)
}

/// A base path and an operation's path as one path.
fn joined(base: &str, path: &str) -> String {
    if base == "/" {
        path.to_owned()
    } else if path == "/" {
        base.to_owned()
    } else {
        format!("{base}{path}")
    }
}
