//! `cdp-bench`: measures the CDP end to end, in-process, on fresh databases.
//!
//! Each scenario starts the real server (`api::startup::build`) on a fresh database per backend
//! (SQLite in a temporary directory always; PostgreSQL when an admin URL is given, in a new
//! database `cdp_bench_<random>` dropped at the end), drives it over loopback as clients would,
//! and prints one JSON line per backend on stdout; progress goes to stderr.
//!
//! Scenarios:
//! - `ingest`: events per second through `POST /v1/batch`, with a check that no accepted event
//!   was lost, against a baseline of plain multi-row INSERTs of the same rows into the same
//!   schema (see `ingest.rs`).
//! - `segments`: segment builds and selects on a large generated tenant against hand-written SQL,
//!   and ingestion throughput with 50 segments against none (see `segments.rs`).
//! - `email`: campaign email throughput through the outbox to an SMTP listener in the bench
//!   process, with a check that none is lost or sent twice (see `email.rs`).
//! - `realtime`: latency from an ingest request's commit to each of 1,000 WebSocket subscribers
//!   (see `realtime.rs`).
//! - `read`: GraphQL `profile(id)` and `profiles` pages under load against a plain JSON handler
//!   reading the same database (see `read.rs`).
//! - `growth`: ingest events/s and `profile(id)` requests/s and p99 at 10,000, 100,000 and
//!   1,000,000 profiles, each compared with the first size (see `growth.rs`).
//! - `all`: every scenario above but `growth` in turn, each in a process of its own with its
//!   own sizes (`--quick`: each one's quick sizes), each against its baseline measured in the
//!   same run.
//!
//! Every JSON line carries `scenario`, `backend`, `figure` (what `value` measures), `value`,
//! `baseline` (the same figure of the baseline, measured in the same run) and `ratio`
//! (`value / baseline`), next to the scenario's own fields.
//!
//! Run it in release mode:
//!
//! ```text
//! cargo run --release --bin cdp-bench -- all --quick
//! cargo run --release --bin cdp-bench -- ingest --quick
//! CDP_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --bin cdp-bench -- ingest --messages 200000 --concurrency 8
//! ```
//!
//! Adding a scenario: a module with an `Args` struct (flattening `harness::BackendArgs`) and a
//! `run`, one variant in [`Scenario`], one arm in [`Scenario::run`].

/// mimalloc instead of glibc malloc: the read path spent a quarter of its CPU in malloc and
/// free (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod email;
mod growth;
mod harness;
mod ingest;
mod load;
mod read;
mod realtime;
mod segments;
mod workload;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cdp-bench",
    about = "Benchmarks of the CDP: one JSON line per backend on stdout"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

/// What to measure.
#[derive(Debug, Subcommand)]
enum Scenario {
    /// Every scenario in turn (ingest, segments, realtime, email, read), each with its baseline.
    All(AllArgs),
    /// Ingest and read costs at 10,000, 100,000 and 1,000,000 profiles (one line per size).
    Growth(growth::GrowthArgs),
    /// Campaign email throughput through the outbox with several workers, lost and duplicates.
    Email(email::EmailArgs),
    /// Collection API throughput (POST /v1/batch) against plain multi-row INSERTs.
    Ingest(ingest::IngestArgs),
    /// GraphQL profile(id) and profiles pages under load against a plain JSON handler.
    Read(read::ReadArgs),
    /// Commit-to-subscriber latency with 1,000 WebSocket subscribers (p50, p99).
    Realtime(realtime::RealtimeArgs),
    /// Segment builds against hand-written SQL on a large tenant, and ingestion with 50 segments.
    Segments(segments::SegmentsArgs),
}

impl Scenario {
    async fn run(self) -> anyhow::Result<()> {
        match self {
            Scenario::All(args) => all(args).await,
            Scenario::Email(args) => email::run(args).await,
            Scenario::Growth(args) => growth::run(args).await,
            Scenario::Ingest(args) => ingest::run(args).await,
            Scenario::Read(args) => read::run(args).await,
            Scenario::Realtime(args) => realtime::run(args).await,
            Scenario::Segments(args) => segments::run(args).await,
        }
    }
}

/// `cdp-bench all`: the performance suite.
#[derive(Debug, Clone, clap::Args)]
struct AllArgs {
    /// Each scenario's quick sizes (about two minutes in release mode on 2 cores).
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    backends: harness::BackendArgs,
}

/// The command line of one scenario as `all` runs it: its name, then the suite's options.
fn command_line(name: &str, all: &AllArgs) -> Vec<String> {
    let mut line = vec![name.to_owned()];
    if all.quick {
        line.push("--quick".to_owned());
    }
    if all.backends.sqlite_only {
        line.push("--sqlite-only".to_owned());
    }
    if all.backends.postgres_only {
        line.push("--postgres-only".to_owned());
    }
    if let Some(url) = &all.backends.postgres {
        line.extend(["--postgres".to_owned(), url.clone()]);
    }
    line
}

/// The scenarios of `all`, in the order they run.
const SUITE: [&str; 5] = ["ingest", "segments", "realtime", "email", "read"];

/// Runs every scenario, each in a process of its own (this executable, with the scenario's
/// command line), goes on after a failure, and fails at the end if one did.
///
/// A process of its own, so that a scenario in the suite starts as its own command starts it:
/// nothing left by the scenarios before it (their allocator heap, their pools' connection threads,
/// a panic) reaches it, and its figures are those of `cdp-bench <scenario>` run alone. (Measured
/// in the twelfth session: the read scenario's SQLite ratio was as low in its own process as in
/// the shared one, so the shared process was not what lowered it; docs/PERFORMANCE.md.) Each
/// scenario's lines go to stdout as the scenario prints them.
async fn all(args: AllArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let executable = std::env::current_exe().context("cannot find this executable")?;
    // Every scenario parses its options before any runs, so that a bad option fails at once.
    for name in SUITE {
        Cli::try_parse_from(
            std::iter::once("cdp-bench".to_owned()).chain(command_line(name, &args)),
        )?;
    }
    let mut failed = Vec::new();
    for name in SUITE {
        let began = std::time::Instant::now();
        eprintln!("=== {name} ===");
        let mut command = std::process::Command::new(&executable);
        command.args(command_line(name, &args));
        let status = tokio::task::spawn_blocking(move || command.status())
            .await?
            .with_context(|| format!("cannot start the {name} scenario"))?;
        eprintln!(
            "=== {name}: {} in {:.1} s ===",
            if status.success() { "done" } else { "FAILED" },
            began.elapsed().as_secs_f64()
        );
        if !status.success() {
            eprintln!("{name} failed: {status}");
            failed.push(name);
        }
    }
    eprintln!("all: {:.1} s", started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        anyhow::bail!("failed scenarios: {}", failed.join(", "));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    harness::init_logs();
    cli.scenario.run().await
}
