//! `cdp`: the command line of the CDP. With no arguments it serves.

use std::sync::Arc;

use anyhow::Context;
use api::config::Config;
use api::service::{accounts, RequestMeta, SystemClock};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cdp", version, about = "An open-source customer data platform")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate the database if needed, then serve (the default).
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Manage tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Load Segment-format messages (JSON lines) into a tenant, through the same write path as
    /// /v1/batch, with a progress bar; rejected lines go to a side file with their reasons.
    Import {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The file to load; `-` reads standard input.
        file: String,
        /// Where to write rejected lines (default: FILE.rejected.jsonl).
        #[arg(long)]
        rejected: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant and its owner; prints the owner's activation link.
    Create {
        #[arg(long)]
        slug: String,
        #[arg(long)]
        name: String,
        #[arg(long = "owner-email")]
        owner_email: String,
    },
}

/// Logs go to standard error, filtered by `CDP_LOG` (default `info`), as text or, with
/// `CDP_LOG_FORMAT=json`, JSON lines. Set up before the configuration is read, so that its
/// warnings (a generated secret, for example) are seen.
fn init_tracing() {
    let filter = std::env::var("CDP_LOG")
        .ok()
        .filter(|value| !value.trim().is_empty())
        .unwrap_or_else(|| "info".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("CDP_LOG_FORMAT").is_ok_and(|format| format == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Schema) = cli.command {
        // Needs neither configuration nor database.
        print!("{}", api::graphql::sdl());
        return Ok(());
    }
    init_tracing();
    let config = Config::from_env()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let application = api::startup::build(config).await?;
            tracing::info!("GraphiQL at http://{}/graphql", application.address());
            application.run_until_signal().await
        }
        Command::Migrate => {
            api::startup::state(config, Arc::new(SystemClock)).await?;
            eprintln!("database is up to date");
            Ok(())
        }
        Command::Tenant {
            command:
                TenantCommand::Create {
                    slug,
                    name,
                    owner_email,
                },
        } => {
            let public_url = config.public_url.clone();
            let state = api::startup::state(config, Arc::new(SystemClock)).await?;
            let (tenant, user, token) = accounts::sign_up(
                &state,
                &RequestMeta::default(),
                accounts::SignUpCommand {
                    tenant_name: name,
                    tenant_slug: slug,
                    email: owner_email,
                },
            )
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))
            .context("cannot create the tenant")?;
            println!(
                "tenant {} ({}) created; owner {} is pending",
                tenant.slug, tenant.id, user.email
            );
            println!("activation link: {public_url}/activate?token={token}");
            Ok(())
        }
        Command::Import {
            tenant,
            file,
            rejected,
        } => {
            let state = api::startup::state(config, Arc::new(SystemClock)).await?;
            let summary = api::cli::import(
                &state,
                &tenant,
                &file,
                rejected,
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
            )
            .await?;
            println!(
                "{} accepted, {} duplicate, {} rejected",
                summary.accepted, summary.duplicates, summary.rejected
            );
            if let Some(path) = summary.rejected_file {
                println!("rejected lines and their reasons: {}", path.display());
            }
            Ok(())
        }
        Command::Schema => Ok(()),
    }
}
