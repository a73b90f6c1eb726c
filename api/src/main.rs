//! `cdp`: the command line of the CDP. With no arguments it serves.

/// mimalloc instead of glibc malloc: the read path spent a quarter of its CPU in malloc and
/// free (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use anyhow::Context;
use api::config::Config;
use api::service::{backup, privacy, RequestMeta, SystemClock};
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
    #[command(flatten)]
    Accounts(api::cli::accounts::AccountCommand),
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Print the reference of every environment variable, with its default and meaning (the
    /// tables of docs/configuration.md, which are generated from it).
    Config,
    /// Export or erase a person's data (GDPR access and erasure).
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
    },
    /// Manage the master key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
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
    /// Manage the events table (PostgreSQL).
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Write a tenant's data to a portable file (JSON lines with a checksum; gzipped when the
    /// name ends in .gz) that `cdp restore` loads into SQLite or PostgreSQL.
    Backup {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The data file to write.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Also write the tenant's encryption keys to this separate file (keep it apart from the
        /// data file).
        #[arg(long = "keys-out")]
        keys_out: Option<std::path::PathBuf>,
    },
    /// Replace a tenant's data with a backup's, creating the tenant if needed. The files are
    /// checked completely first; a damaged file changes nothing.
    Restore {
        /// The tenant's slug, which must be the backup's.
        #[arg(long)]
        tenant: String,
        /// The data file written by `cdp backup`.
        file: std::path::PathBuf,
        /// The key file written with it (`--keys-out`).
        #[arg(long)]
        keys: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Convert the events table, in one transaction, into a table partitioned by event time
    /// (PostgreSQL only; run as the owner of the tables, like `cdp migrate`). The scheduler then
    /// creates partitions ahead and drops those past CDP_EVENTS_RETENTION_DAYS.
    Partition {
        /// The width of one partition: day, week or month.
        #[arg(long, default_value = "month")]
        interval: String,
    },
}

#[derive(Subcommand)]
enum PrivacyCommand {
    /// Print everything stored about a person as one JSON document (right of access).
    Export {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The profile id (a merged id resolves to its survivor).
        #[arg(long)]
        profile: String,
        /// Write the document here instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Erase a person: every row, and the data key that makes every copy unreadable.
    Erase {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The profile id (a merged id resolves to its survivor).
        #[arg(long)]
        profile: String,
        /// Keep the person's identifiers as blind indexes so that they never create a profile
        /// again.
        #[arg(long)]
        suppress: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Rewrap every tenant key under CDP_ENCRYPTION_KEY; the old master key must be in
    /// CDP_ENCRYPTION_KEY_PREVIOUS. Running servers keep serving (see docs/operations.md).
    Rotate,
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
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let registry = tracing_subscriber::Registry::default().with(filter);
    // With the `otel` feature, spans are exported too when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[cfg(feature = "otel")]
    let registry = registry.with(api::telemetry::layer());
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if std::env::var("CDP_LOG_FORMAT").is_ok_and(|format| format == "json") {
        registry.with(lines.json()).init();
    } else {
        registry.with(lines).init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // These two need neither configuration nor database.
    match cli.command {
        Some(Command::Schema) => {
            print!("{}", api::graphql::sdl());
            return Ok(());
        }
        Some(Command::Config) => {
            print!("{}", api::config_reference::markdown());
            return Ok(());
        }
        _ => {}
    }
    init_tracing();
    let config = Config::from_env()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let application = api::startup::build(config).await?;
            tracing::info!(
                "GraphiQL at {}://{}/graphql",
                application.scheme(),
                application.address()
            );
            let stopped = application.run_until_signal().await;
            #[cfg(feature = "otel")]
            api::telemetry::shutdown();
            stopped
        }
        Command::Migrate => {
            api::startup::state(config, Arc::new(SystemClock)).await?;
            eprintln!("database is up to date");
            Ok(())
        }
        Command::Accounts(command) => {
            let state = api::startup::state(config, Arc::new(SystemClock)).await?;
            let invocation = api::cli::accounts::Invocation::from_env();
            let mut out = std::io::stdout().lock();
            api::cli::accounts::run(&state, &invocation, command, &mut out).await
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
        Command::Events {
            command: EventsCommand::Partition { interval },
        } => {
            let conversion = api::cli::partition_events(&config, &interval).await?;
            println!(
                "events partitioned by {interval}: {} events in {} partitions",
                conversion.events, conversion.partitions
            );
            Ok(())
        }
        Command::Privacy { command } => {
            let state = api::startup::state(config, Arc::new(SystemClock)).await?;
            let (slug, profile) = match &command {
                PrivacyCommand::Export {
                    tenant, profile, ..
                }
                | PrivacyCommand::Erase {
                    tenant, profile, ..
                } => (tenant.clone(), profile.clone()),
            };
            let tenant = api::store::tenants::find_by_slug(&state.store, &slug)
                .await?
                .with_context(|| format!("there is no tenant with the slug {slug:?}"))?;
            let tenant_id = domain::TenantId(tenant.id);
            let profile_id = uuid::Uuid::parse_str(profile.trim())
                .with_context(|| format!("{profile:?} is not a profile id"))?;
            let operator = format!("operator:{}", api::cli::accounts::operator_name());
            match command {
                PrivacyCommand::Export { out, .. } => {
                    let document = privacy::export_as(
                        &state,
                        tenant_id,
                        &operator,
                        &RequestMeta::default(),
                        profile_id,
                    )
                    .await
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                    let text = serde_json::to_string_pretty(&document)?;
                    match out {
                        Some(path) => {
                            std::fs::write(&path, text)
                                .with_context(|| format!("cannot write {}", path.display()))?;
                            eprintln!("export written to {}", path.display());
                        }
                        None => println!("{text}"),
                    }
                }
                PrivacyCommand::Erase { suppress, .. } => {
                    let receipt = privacy::erase_as(
                        &state,
                        tenant_id,
                        &operator,
                        &RequestMeta::default(),
                        profile_id,
                        suppress,
                    )
                    .await
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                    println!(
                        "erased profile {} ({} ids): {} events, {} identities, {} rows deleted; {} data keys destroyed; {} identifiers suppressed; at {}",
                        receipt.profile_id,
                        receipt.profile_ids.len(),
                        receipt.events_deleted,
                        receipt.identities_deleted,
                        receipt.rows_deleted,
                        receipt.keys_destroyed,
                        receipt.identifiers_suppressed,
                        receipt.erased_at.to_rfc3339()
                    );
                }
            }
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Rotate,
        } => {
            let state = api::startup::state(config, Arc::new(SystemClock)).await?;
            let rotation = privacy::rotate_master_key(&state)
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            println!(
                "{} tenants, {} tenant keys rewrapped under master key {}",
                rotation.tenants,
                rotation.rewrapped,
                state.vault.master_id()
            );
            Ok(())
        }
        Command::Backup {
            tenant,
            out,
            keys_out,
        } => {
            let state = api::startup::state(config, Arc::new(SystemClock)).await?;
            let summary = api::cli::backup(
                &state,
                backup::BackupCommand {
                    tenant_slug: &tenant,
                    out: &out,
                    keys_out: keys_out.as_deref(),
                },
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
            )
            .await?;
            println!(
                "{} rows of {} tables written to {} (sha256 {})",
                summary.rows,
                summary.tables.len(),
                out.display(),
                summary.sha256
            );
            if let Some(keys_out) = &keys_out {
                println!(
                    "{} key rows written to {}",
                    summary.key_rows,
                    keys_out.display()
                );
            }
            if summary.unsaved_key_rows > 0 {
                eprintln!(
                    "warning: the tenant's {} key rows were not saved (no --keys-out); restored \
                     into another database, its personal data cannot be read",
                    summary.unsaved_key_rows
                );
            }
            Ok(())
        }
        Command::Restore { tenant, file, keys } => {
            let state = api::startup::state(config, Arc::new(SystemClock)).await?;
            let operator = format!("operator:{}", api::cli::accounts::operator_name());
            let summary = api::cli::restore(
                &state,
                backup::RestoreCommand {
                    tenant_slug: &tenant,
                    file: &file,
                    keys: keys.as_deref(),
                    actor: &operator,
                },
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
            )
            .await?;
            println!(
                "tenant {tenant} ({}) {}: {} rows restored, {} rows of erased profiles left out",
                summary.tenant_id,
                if summary.created_tenant {
                    "created"
                } else {
                    "replaced"
                },
                summary.rows,
                summary.skipped_erased
            );
            if keys.is_some() {
                println!(
                    "{} key rows added, {} left out (already present, or their profile is not restored)",
                    summary.key_rows_inserted, summary.key_rows_left_out
                );
            }
            Ok(())
        }
        Command::Schema | Command::Config => Ok(()),
    }
}
