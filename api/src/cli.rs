//! Operator commands of the `cdp` binary that do more than call one use case: `cdp import`,
//! `cdp events partition`, and the progress bars of `cdp backup` and `cdp restore`; the account
//! commands (`cdp tenant`, `cdp user`, `cdp apikey`) are in `accounts`.

pub mod accounts;

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::service::backup;
use crate::service::ingest::{self, Batch, Outcome, Source};
use crate::service::{settings, AppState};
use crate::store;

/// Migrates the database if needed, then converts its events table into a table partitioned by
/// event time (ADR 0011). Connects with `CDP_DATABASE_URL`, which must name the owner of the
/// tables here, as for `cdp migrate`.
pub async fn partition_events(
    config: &crate::config::Config,
    interval: &str,
) -> anyhow::Result<store::partitions::Conversion> {
    let interval = store::partitions::Interval::parse(interval)
        .with_context(|| format!("unknown interval {interval:?}: day, week or month"))?;
    let store = store::Store::connect(&store::StoreOptions {
        url: config.database_url.clone(),
        max_connections: 2,
        min_connections: 1,
    })
    .await?;
    store.migrate().await?;
    Ok(store::partitions::convert(&store, interval).await?)
}

/// Messages sent to the write path at once.
const IMPORT_BATCH: usize = 500;

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub rejected_file: Option<PathBuf>,
}

/// Loads Segment-format messages (one JSON object a line; `-` reads standard input) into a tenant
/// through the same write path as `/v1/batch`, in batches, with a progress bar. Rejected lines
/// go to `rejected_path` with their line number and reason.
pub async fn import(
    state: &AppState,
    tenant_slug: &str,
    file: &str,
    rejected_path: Option<PathBuf>,
    show_progress: bool,
) -> anyhow::Result<ImportSummary> {
    let tenant = store::tenants::find_by_slug(&state.store, tenant_slug)
        .await?
        .with_context(|| format!("there is no tenant with the slug {tenant_slug:?}"))?;
    let tenant_id = domain::TenantId(tenant.id);
    let settings = settings::load(state, tenant_id)
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;

    let (reader, total_bytes): (Box<dyn BufRead>, Option<u64>) = if file == "-" {
        (Box::new(std::io::BufReader::new(std::io::stdin())), None)
    } else {
        let handle = std::fs::File::open(file).with_context(|| format!("cannot open {file}"))?;
        let size = handle.metadata().ok().map(|meta| meta.len());
        (Box::new(std::io::BufReader::new(handle)), size)
    };
    let progress = if !show_progress {
        ProgressBar::hidden()
    } else if let Some(size) = total_bytes {
        let bar = ProgressBar::new(size);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::new_spinner()
    };

    let rejected_path = rejected_path.unwrap_or_else(|| {
        if file == "-" {
            PathBuf::from("import.rejected.jsonl")
        } else {
            PathBuf::from(format!("{file}.rejected.jsonl"))
        }
    });
    let mut rejected_out: Option<std::io::BufWriter<std::fs::File>> = None;
    let mut summary = ImportSummary::default();
    let source = Source {
        key_id: None,
        channel: domain::ingest::Channel::Other,
    };

    let mut pending: Vec<(usize, Value)> = Vec::with_capacity(IMPORT_BATCH);
    let mut write_rejection = |summary: &mut ImportSummary,
                               line: usize,
                               reason: &str,
                               original: Value|
     -> anyhow::Result<()> {
        summary.rejected += 1;
        if rejected_out.is_none() {
            let file = std::fs::File::create(&rejected_path)
                .with_context(|| format!("cannot create {}", rejected_path.display()))?;
            rejected_out = Some(std::io::BufWriter::new(file));
            summary.rejected_file = Some(rejected_path.clone());
        }
        if let Some(out) = rejected_out.as_mut() {
            writeln!(
                out,
                "{}",
                json!({"line": line, "reason": reason, "message": original})
            )?;
        }
        Ok(())
    };

    let mut lines = reader.lines().enumerate();
    loop {
        let next = lines.next();
        let done = next.is_none();
        if let Some((index, line)) = next {
            let line = line.with_context(|| format!("cannot read line {}", index + 1))?;
            progress.inc(line.len() as u64 + 1);
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(&line) {
                Ok(value) => pending.push((index + 1, value)),
                Err(error) => write_rejection(
                    &mut summary,
                    index + 1,
                    &format!("invalid_json: {error}"),
                    Value::String(line),
                )?,
            }
        }
        if pending.len() >= IMPORT_BATCH.min(settings.max_batch_messages)
            || (done && !pending.is_empty())
        {
            let chunk = std::mem::take(&mut pending);
            let batch = Batch {
                messages: chunk.iter().map(|(_, value)| value.clone()).collect(),
                sent_at: None,
                context: None,
                received_at: state.now(),
            };
            let report = ingest::ingest_with(state, tenant_id, &source, batch, &settings)
                .await
                .map_err(|error| anyhow::anyhow!("the import stopped: {error}"))?;
            for message in report.messages {
                match message.outcome {
                    Outcome::Accepted { .. } => summary.accepted += 1,
                    Outcome::Duplicate => summary.duplicates += 1,
                    Outcome::Rejected(rejection) => {
                        let (line, original) = chunk[message.index].clone();
                        write_rejection(&mut summary, line, &rejection.to_string(), original)?;
                    }
                }
            }
            progress.set_message(format!(
                "{} accepted, {} duplicate, {} rejected",
                summary.accepted, summary.duplicates, summary.rejected
            ));
        }
        if done {
            break;
        }
    }
    if let Some(mut out) = rejected_out {
        out.flush()?;
    }
    progress.finish_and_clear();
    Ok(summary)
}

/// A progress bar on standard error for the phases of a backup or a restore.
struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn new(show: bool) -> Bar {
        Bar {
            bar: if show {
                ProgressBar::new(0)
            } else {
                ProgressBar::hidden()
            },
        }
    }
}

impl backup::Progress for Bar {
    fn start(&self, phase: backup::Phase, total: u64) {
        let (template, message) = match phase {
            backup::Phase::Reading => (
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ({eta}) {msg}",
                "reading",
            ),
            backup::Phase::Verifying => (
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta}) {msg}",
                "verifying",
            ),
            backup::Phase::Restoring => (
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ({eta}) {msg}",
                "restoring",
            ),
        };
        self.bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(message);
    }

    fn set(&self, done: u64) {
        self.bar.set_position(done);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `cdp backup`: writes the tenant's data file (and key file) with a progress bar.
pub async fn backup(
    state: &AppState,
    command: backup::BackupCommand<'_>,
    show_progress: bool,
) -> anyhow::Result<backup::BackupSummary> {
    let bar = Bar::new(show_progress);
    let result = backup::backup(state, command, &bar).await;
    bar.bar.finish_and_clear();
    Ok(result?)
}

/// `cdp restore`: checks the files, then replaces the tenant's data, with a progress bar.
pub async fn restore(
    state: &AppState,
    command: backup::RestoreCommand<'_>,
    show_progress: bool,
) -> anyhow::Result<backup::RestoreSummary> {
    let bar = Bar::new(show_progress);
    let result = backup::restore(state, command, &bar).await;
    bar.bar.finish_and_clear();
    Ok(result?)
}
