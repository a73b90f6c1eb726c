//! The `growth` scenario: does the cost of an operation stay flat as a tenant grows?
//!
//! On one fresh database per backend, for each size N (default 10,000, 100,000 and 1,000,000
//! profiles), a new tenant is filled in the database itself with N profiles and 5 N events (the
//! generator of `segments.rs`: `generate_series` on PostgreSQL, a recursive CTE on SQLite,
//! timed), then measured:
//! - ingest: a fixed workload (default 5,000 messages, 100 a request, 8 clients) through
//!   `POST /v1/batch` into that tenant: events per second;
//! - read: GraphQL `profile(id)` with its traits and `events(first: 20)` for random profiles of
//!   that tenant, closed loop (16 connections): requests per second; and an open loop at a fixed
//!   rate (default 500 a second): p50 and p99 from the scheduled start.
//!
//! The tenants stay, so the tables hold every earlier size too (10,000, then 110,000, then
//! 1,110,000 profiles): the indexes grow as a single large tenant's would. Each JSON line
//! compares the size's figure with the same figure at the first size of the run (`baseline`,
//! `ratio`): flat is a ratio near 1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use uuid::Uuid;

use crate::harness::{self, BackendArgs, BenchDb, Server};
use crate::load;
use crate::workload::Workload;

/// `cdp-bench growth`: ingest and read costs at growing tenant sizes.
#[derive(Debug, Clone, clap::Args)]
pub struct GrowthArgs {
    /// Tenant sizes in profiles, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub sizes: Vec<u64>,
    /// Sizes for SQLite when they differ (default: --sizes).
    #[arg(long, value_delimiter = ',')]
    pub sqlite_sizes: Option<Vec<u64>>,
    /// Messages of the fixed ingest workload at each size.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Seconds of each read measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Connections of the closed read loop.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Requests per second of the open read loop.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// On SQLite, checkpoint and truncate the write-ahead log after each seed (the seed's large
    /// transactions leave it hundreds of megabytes long), to tell its effect on the measurements.
    #[arg(long)]
    pub sqlite_checkpoint: bool,
    #[command(flatten)]
    pub backends: BackendArgs,
}

/// The first size's figures, which later sizes are compared with.
struct Reference {
    ingest_per_s: f64,
    read_per_s: f64,
}

pub async fn run(args: GrowthArgs) -> anyhow::Result<()> {
    if args.sizes.is_empty() || args.messages == 0 || args.seconds == 0 || args.rate == 0 {
        bail!("--sizes, --messages, --seconds and --rate must not be empty or zero");
    }
    for backend in args.backends.backends()? {
        let label = backend.name();
        eprintln!("== {label} ==");
        let db = Arc::new(BenchDb::create(&backend).await?);
        let sizes = match (&backend, &args.sqlite_sizes) {
            (harness::Backend::Sqlite, Some(sizes)) => sizes.clone(),
            _ => args.sizes.clone(),
        };
        let outcome = tokio::select! {
            outcome = run_on(db.clone(), &args, &sizes) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        db.destroy().await;
        outcome.with_context(|| format!("the {label} run failed"))?;
    }
    Ok(())
}

async fn run_on(db: Arc<BenchDb>, args: &GrowthArgs, sizes: &[u64]) -> anyhow::Result<()> {
    let label = db.backend.name();
    let server = Server::start(&db).await?;
    let admin = db.owner_pool(1).await?;
    let mut reference: Option<Reference> = None;
    let mut in_tables = 0;
    for (index, &size) in sizes.iter().enumerate() {
        let owner = server.sign_up("growth").await?;
        let key = server.write_key(&owner).await?;
        server
            .graphql(&owner.access_token, crate::read::INGEST_SETTINGS, json!({}))
            .await
            .context("cannot set the ingestion settings")?;

        let started = Instant::now();
        crate::segments::generate(&admin, label, owner.tenant_id, size, size * 5).await?;
        if args.sqlite_checkpoint && matches!(db.backend, harness::Backend::Sqlite) {
            use sea_orm::ConnectionTrait;
            admin
                .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
                .await
                .context("cannot checkpoint the write-ahead log")?;
        }
        let seed_seconds = started.elapsed().as_secs_f64();
        in_tables += size;
        eprintln!(
            "[{label}] {size} profiles, {} events seeded in {seed_seconds:.1} s",
            size * 5
        );

        // Ingest: a fixed workload of new people into the grown tenant.
        let workload = Workload::generate(42 + index as u64, args.messages);
        let bodies: Vec<Vec<u8>> = workload
            .request_bodies(100)?
            .into_iter()
            .map(|(_, body)| body)
            .collect();
        let started = Instant::now();
        crate::read::post_bodies(&server, &key, bodies, 8).await?;
        let ingest_per_s = args.messages as f64 / started.elapsed().as_secs_f64();
        eprintln!("[{label}] ingest at {size}: {ingest_per_s:.0} events/s");

        // Read: random generated profiles (ids as the generator makes them).
        let ids: Vec<Uuid> = (0..2000u64)
            .map(|n| 1 + (n * 7_919 + n * n * 104_729) % size)
            .map(generated_profile_id)
            .collect();
        let target =
            crate::read::graphql_profile_target(&server, &owner.access_token, Arc::new(ids), 0);
        let duration = Duration::from_secs(args.seconds);
        let closed = load::closed(&target, args.connections, duration).await;
        let open = load::open(&target, args.rate, duration).await;
        eprintln!(
            "[{label}] read at {size}: {:.0}/s closed loop; at {}/s p50 {:.2} ms, p99 {:.2} ms",
            closed.per_second(),
            args.rate,
            open.quantile_ms(0.5),
            open.quantile_ms(0.99)
        );
        let errors = closed.graphql_errors + open.graphql_errors;
        let failures = closed.failures + open.failures;
        let reference = reference.get_or_insert(Reference {
            ingest_per_s,
            read_per_s: closed.per_second(),
        });
        println!(
            "{}",
            json!({
                "scenario": "growth",
                "backend": label,
                "profiles": size,
                "events": size * 5,
                "profiles_in_tables": in_tables,
                "seed_seconds": harness::round(seed_seconds, 1),
                "figure": "profile(id) requests/s at this size over the first size",
                "value": harness::round(closed.per_second(), 1),
                "baseline": harness::round(reference.read_per_s, 1),
                "ratio": harness::round(closed.per_second() / reference.read_per_s, 3),
                "ingest_events_per_s": ingest_per_s.round(),
                "ingest_ratio": harness::round(ingest_per_s / reference.ingest_per_s, 3),
                "read": closed.figures(),
                "read_at_rate": {"rate_per_s": args.rate, "figures": open.figures()},
                "graphql_errors": errors,
                "failures": failures,
            })
        );
        if errors > 0 || failures > 0 {
            bail!(
                "reads at {size} saw {errors} GraphQL errors and {failures} failed answers ({})",
                closed
                    .first_failure
                    .or(open.first_failure)
                    .unwrap_or_default()
            );
        }
    }
    admin.close().await?;
    server.stop().await
}

/// The id the generator gives profile number `n` (see `segments.rs`).
fn generated_profile_id(n: u64) -> Uuid {
    Uuid::from_u128((0x0190_0000_0000_7000_8000u128 << 48) | u128::from(n))
}
