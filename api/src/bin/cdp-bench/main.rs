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
//!
//! Run it in release mode:
//!
//! ```text
//! cargo run --release --bin cdp-bench -- ingest --quick
//! CDP_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --bin cdp-bench -- ingest --messages 200000 --concurrency 8
//! ```
//!
//! Adding a scenario: a module with an `Args` struct (flattening `harness::BackendArgs`) and a
//! `run`, one variant in [`Scenario`], one arm in [`Scenario::run`].

mod email;
mod harness;
mod ingest;
mod realtime;
mod segments;
mod workload;

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
    /// Campaign email throughput through the outbox with several workers, lost and duplicates.
    Email(email::EmailArgs),
    /// Collection API throughput (POST /v1/batch) against plain multi-row INSERTs.
    Ingest(ingest::IngestArgs),
    /// Commit-to-subscriber latency with 1,000 WebSocket subscribers (p50, p99).
    Realtime(realtime::RealtimeArgs),
    /// Segment builds against hand-written SQL on a large tenant, and ingestion with 50 segments.
    Segments(segments::SegmentsArgs),
}

impl Scenario {
    async fn run(self) -> anyhow::Result<()> {
        match self {
            Scenario::Email(args) => email::run(args).await,
            Scenario::Ingest(args) => ingest::run(args).await,
            Scenario::Realtime(args) => realtime::run(args).await,
            Scenario::Segments(args) => segments::run(args).await,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    harness::init_logs();
    cli.scenario.run().await
}
