//! The `segments` scenario: what segments cost on a large tenant, next to hand-written SQL doing
//! the same work on the same data in the same run, and what defined segments cost ingestion.
//!
//! Data: one tenant with P profiles, E events and consents, generated in the database itself
//! (PostgreSQL `generate_series`, SQLite a recursive CTE) straight into the real tables: traits
//! with email, name, plan and country; `track` events over the last 120 days (half "Page Viewed"
//! with a path, a quarter "Product Viewed", "Product Added", "Checkout Started" and a tenth
//! "Order Completed" with a revenue), spread unevenly over the profiles (a few heavy users, some
//! profiles with none); `event_count`, `first_seen_at`, `last_seen_at`, `order_count` and
//! `total_revenue` of each profile computed from its events; an `email_marketing` consent for half
//! of the profiles (granted for four in five of them) and an `sms_marketing` one for a third. Then
//! `VACUUM ANALYZE` (PostgreSQL) or `ANALYZE` (SQLite).
//!
//! Builds: for each of three segments, the product's build (`store::segments::rebuild` in a tenant
//! transaction holding the tenant's barrier, as `createSegment` runs it, commit included) against
//! one hand-written `INSERT INTO segment_members … SELECT` (commit included), alternating which
//! goes first, the median of `--runs`; members are deleted (and the table vacuumed) between runs,
//! outside the clock. Both member sets must be equal (count, and `EXCEPT` both ways), else the run
//! fails. Selects: the product's query (`store::conditions::matching_profiles`, every id in id
//! order) against the hand-written SELECT with `ORDER BY id`, both fetching every id; the two id
//! lists must be equal. On PostgreSQL both sides connect as a member of `cdp_app`, so row-level
//! security is in force for both.
//!
//! Real time: the ingest workload (see `workload.rs`, its timestamps moved so that the stream ends
//! now) goes through `POST /v1/batch` of the in-process server for a fresh tenant with no segment,
//! then for a fresh tenant with `--segments` ready segments (trait, event-count-within-window,
//! attribute and mixed conditions on what the workload sends); events per second of both.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use api::store::{self, Store, StoreOptions};
use chrono::{DateTime, SubsecRound, Utc};
use domain::condition::Condition;
use domain::TenantId;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, SqliteTransactionMode,
    Statement, TransactionOptions, TransactionTrait, Value,
};
use serde_json::{json, Value as Json};
use uuid::Uuid;

use crate::harness::{self, Backend, BackendArgs, BenchDb, Server};
use crate::workload::Workload;

/// Messages per request of the real-time part.
const BATCH: usize = 100;
/// Length of the generated history.
const HISTORY_DAYS: i64 = 120;
/// Rows a data-generating statement inserts at most.
const CHUNK: u64 = 1_000_000;
/// Targets of issue 4, item 7.
const TARGET_RATIO: f64 = 1.3;
const TARGET_SECONDS: f64 = 3.0;
const TARGET_REALTIME: f64 = 0.7;

const INGEST_SETTINGS: &str = r#"mutation { updateIngestSettings(input: {
    maxMessageBytes: 32768, maxRequestBytes: 4194304, maxBatchMessages: 2500,
    rateLimitPerSecond: 0, defaultRegion: null, blockedIdentityValues: [],
    identityRules: [
      {kind: "user_id", priority: 100, limit: 1},
      {kind: "email", priority: 80, limit: 5},
      {kind: "phone", priority: 70, limit: 5},
      {kind: "anonymous_id", priority: 10, limit: 100}
    ] }) { rateLimitPerSecond } }"#;

/// `cdp-bench segments`: segment builds against hand-written SQL, and the cost of segments for
/// ingestion.
#[derive(Debug, Clone, clap::Args)]
pub struct SegmentsArgs {
    /// Small sizes: 20,000 profiles and 100,000 events, 5,000 messages for the real-time part.
    #[arg(long)]
    pub quick: bool,
    /// Profiles of the large tenant (default 1,000,000 on PostgreSQL, 100,000 on SQLite).
    #[arg(long, value_name = "N")]
    pub profiles: Option<u64>,
    /// Events of the large tenant (default five per profile).
    #[arg(long, value_name = "N")]
    pub events: Option<u64>,
    /// Timed runs of each build and select; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Messages of the real-time part (default 20,000; 5,000 with --quick).
    #[arg(long, value_name = "N")]
    pub messages: Option<usize>,
    /// Concurrent clients of the real-time part.
    #[arg(long, value_name = "C", default_value_t = 8)]
    pub concurrency: usize,
    /// Segments defined for the second real-time run.
    #[arg(long, default_value_t = 50)]
    pub segments: usize,
    /// Print EXPLAIN (ANALYZE, BUFFERS) of both selects on stderr (PostgreSQL).
    #[arg(long)]
    pub explain: bool,
    /// Skip the real-time part.
    #[arg(long)]
    pub no_realtime: bool,
    /// Seed of the real-time workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub backends: BackendArgs,
}

impl SegmentsArgs {
    fn sizes(&self, backend: &Backend) -> (u64, u64) {
        let default = match (self.quick, backend) {
            (true, _) => 20_000,
            (false, Backend::Postgres { .. }) => 1_000_000,
            (false, Backend::Sqlite) => 100_000,
        };
        let profiles = self.profiles.unwrap_or(default);
        (profiles, self.events.unwrap_or(profiles * 5))
    }
}

pub async fn run(args: SegmentsArgs) -> anyhow::Result<()> {
    if args.runs == 0 || args.concurrency == 0 {
        bail!("--runs and --concurrency must be at least 1");
    }
    for backend in args.backends.backends()? {
        let label = backend.name();
        eprintln!("== {label} ==");
        let db = Arc::new(BenchDb::create(&backend).await?);
        let outcome = tokio::select! {
            outcome = run_on(db.clone(), &args) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        db.destroy().await;
        outcome.with_context(|| format!("the {label} run failed"))?;
    }
    Ok(())
}

/// One JSON line on stdout.
fn emit(line: Json) {
    println!("{line}");
}

async fn run_on(db: Arc<BenchDb>, args: &SegmentsArgs) -> anyhow::Result<()> {
    let label = db.backend.name();
    let (profiles, events) = args.sizes(&db.backend);
    let server = Server::start(&db).await?;
    let owner = server.sign_up("segments").await?;
    let tenant = owner.tenant_id;

    let started = Instant::now();
    let admin = db.owner_pool(1).await?;
    generate(&admin, label, tenant, profiles, events).await?;
    eprintln!(
        "[{label}] data: {profiles} profiles, {events} events generated and analyzed in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Both sides as the service connects: on PostgreSQL a member of cdp_app, under row-level
    // security.
    let store = Store::connect(&StoreOptions {
        url: db.service_url.clone(),
        max_connections: 2,
        min_connections: 1,
    })
    .await
    .context("cannot connect the store")?;
    let raw = harness::service_pool(&db, 2).await?;
    if db.db_backend == DbBackend::Postgres && harness::bypasses_rls(&raw).await? {
        bail!("the service role bypasses row-level security");
    }
    let sizes = Sizes { profiles, events };
    for segment in &SEGMENTS {
        measure_segment(&db, &admin, &store, &raw, tenant, segment, sizes, args).await?;
    }
    raw.close().await?;
    drop(store);

    if !args.no_realtime {
        realtime(&db, &admin, &server, args).await?;
    }
    admin.close().await?;
    server.stop().await?;
    Ok(())
}

#[derive(Clone, Copy)]
struct Sizes {
    profiles: u64,
    events: u64,
}

/// A transaction bound to `tenant` (as the store binds its own), writing when `write`.
async fn tenant_tx(
    pool: &DatabaseConnection,
    tenant: Uuid,
    write: bool,
) -> anyhow::Result<DatabaseTransaction> {
    let tx = pool
        .begin_with_options(TransactionOptions {
            isolation_level: None,
            access_mode: None,
            sqlite_transaction_mode: write.then_some(SqliteTransactionMode::Immediate),
        })
        .await?;
    if pool.get_database_backend() == DbBackend::Postgres {
        tx.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT set_config('app.tenant_id', $1, true)",
            [tenant.to_string().into()],
        ))
        .await?;
    }
    Ok(tx)
}

fn stmt(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(backend, sql, values)
}

// ---------------------------------------------------------------------------------------------
// Data.

/// The events as rows of (j, profile number pn, kind k, seconds since the epoch, microseconds):
/// profile numbers skewed to the low ones (the square of a uniform number), kinds 0 to 19 (0-9
/// page views, 10-14 product views, 15-16 cart additions, 17 checkouts, 18-19 orders),
/// timestamps uniform over the 120 days before `now`. `$3` = profiles, `$5` = now in seconds,
/// `$6`/`$7` the range of j.
const PG_EVENT_ROWS: &str = "SELECT j, \
     1 + ((((j * 48271) % 1000003) * ((j * 48271) % 1000003) / 1000003) * $3 / 1000003) AS pn, \
     (j * 13) % 20 AS k, \
     to_timestamp($5 - (j * 16807) % 10368000 - 1) + ((j * 7919) % 1000000) * interval '1 microsecond' AS ts \
     FROM generate_series($6::bigint, $7::bigint) AS j";

const SQLITE_EVENT_ROWS: &str = "WITH RECURSIVE g(j) AS (SELECT $6 UNION ALL SELECT j + 1 FROM g WHERE j < $7) \
     SELECT j, \
     1 + ((((j * 48271) % 1000003) * ((j * 48271) % 1000003) / 1000003) * $3 / 1000003) AS pn, \
     (j * 13) % 20 AS k, \
     strftime('%Y-%m-%dT%H:%M:%S', $5 - (j * 16807) % 10368000 - 1, 'unixepoch') || '.' || printf('%06d', (j * 7919) % 1000000) || '+00:00' AS ts \
     FROM g";

const PG_PROFILE_ID: &str = "CAST('01900000-0000-7000-8000-' || lpad(to_hex(X), 12, '0') AS uuid)";
const SQLITE_PROFILE_ID: &str = "unhex('01900000000070008000' || printf('%012x', X))";

fn profile_id_sql(backend: DbBackend, of: &str) -> String {
    match backend {
        DbBackend::Postgres => PG_PROFILE_ID.replace('X', of),
        _ => SQLITE_PROFILE_ID.replace('X', of),
    }
}

/// The values bound to every generating statement: $1 tenant, $2 now, $3 profiles, $4 the
/// instant of profiles without events, $5 now in seconds, $6/$7 the range.
fn gen_values(
    backend: DbBackend,
    tenant: Uuid,
    now: DateTime<Utc>,
    profiles: u64,
    range: (u64, u64),
) -> Vec<Value> {
    let oldest = now - chrono::Duration::days(HISTORY_DAYS);
    let (now_value, oldest_value): (Value, Value) = match backend {
        DbBackend::Postgres => (now.into(), oldest.into()),
        _ => (sqlite_instant(now).into(), sqlite_instant(oldest).into()),
    };
    vec![
        tenant.into(),
        now_value,
        (profiles as i64).into(),
        oldest_value,
        now.timestamp().into(),
        (range.0 as i64).into(),
        (range.1 as i64).into(),
    ]
}

/// An instant as the bench stores it on SQLite (the format sqlx writes, six fractional digits).
fn sqlite_instant(instant: DateTime<Utc>) -> String {
    instant.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

pub async fn generate(
    admin: &DatabaseConnection,
    label: &str,
    tenant: Uuid,
    profiles: u64,
    events: u64,
) -> anyhow::Result<()> {
    let backend = admin.get_database_backend();
    let pg = backend == DbBackend::Postgres;
    let now = Utc::now().trunc_subsecs(6);
    if pg {
        admin
            .execute_unprepared(
                "SET synchronous_commit = off; SET work_mem = '256MB'; \
                 SET maintenance_work_mem = '512MB'",
            )
            .await?;
    }
    let event_rows = if pg { PG_EVENT_ROWS } else { SQLITE_EVENT_ROWS };

    // Profiles first, with what their events will add up to (the same generator, aggregated).
    let started = Instant::now();
    let profile_sql = if pg {
        format!(
            "INSERT INTO profiles (tenant_id, id, traits, trait_clock, channels, first_seen_at, \
             last_seen_at, event_count, created_at, updated_at, total_revenue, order_count) \
             SELECT $1, {id}, jsonb_build_object('email', 'user' || g || '@example.com', \
             'name', 'User ' || g, 'plan', CASE WHEN g % 10 < 6 THEN 'free' WHEN g % 10 < 9 \
             THEN 'pro' ELSE 'enterprise' END, 'country', substr('USDEFRGBESITNLSE', \
             CAST(1 + 2 * ((g * 31) % 8) AS integer), 2)), '{{}}'::jsonb, '[\"server\"]'::jsonb, \
             COALESCE(a.first_ts, $4), COALESCE(a.last_ts, $4), COALESCE(a.n, 0), \
             COALESCE(a.first_ts, $4), $2, COALESCE(a.revenue, 0), COALESCE(a.orders, 0) \
             FROM generate_series(1::bigint, $3::bigint) AS g LEFT JOIN (SELECT pn, \
             min(ts) AS first_ts, max(ts) AS last_ts, count(*) AS n, \
             sum(CAST(round(10 + ((j * 37) % 40000) / 100.0, 2) AS double precision)) \
             FILTER (WHERE k >= 18) AS revenue, count(*) FILTER (WHERE k >= 18) AS orders \
             FROM ({event_rows}) AS x GROUP BY pn) AS a ON a.pn = g",
            id = profile_id_sql(backend, "g"),
        )
    } else {
        format!(
            "INSERT INTO profiles (tenant_id, id, traits, trait_clock, channels, first_seen_at, \
             last_seen_at, event_count, created_at, updated_at, total_revenue, order_count) \
             WITH RECURSIVE p(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM p WHERE g < $3), \
             a AS (SELECT pn, min(ts) AS first_ts, max(ts) AS last_ts, count(*) AS n, \
             sum(CASE WHEN k >= 18 THEN round(10 + ((j * 37) % 40000) / 100.0, 2) ELSE 0 END) \
             AS revenue, sum(k >= 18) AS orders FROM ({event_rows}) GROUP BY pn) \
             SELECT $1, {id}, json_object('email', 'user' || g || '@example.com', \
             'name', 'User ' || g, 'plan', CASE WHEN g % 10 < 6 THEN 'free' WHEN g % 10 < 9 \
             THEN 'pro' ELSE 'enterprise' END, 'country', substr('USDEFRGBESITNLSE', \
             1 + 2 * ((g * 31) % 8), 2)), '{{}}', '[\"server\"]', \
             COALESCE(a.first_ts, $4), COALESCE(a.last_ts, $4), COALESCE(a.n, 0), \
             COALESCE(a.first_ts, $4), $2, COALESCE(a.revenue, 0.0), COALESCE(a.orders, 0) \
             FROM p LEFT JOIN a ON a.pn = p.g",
            id = profile_id_sql(backend, "g"),
        )
    };
    admin
        .execute_raw(stmt(
            backend,
            &profile_sql,
            gen_values(backend, tenant, now, profiles, (1, events)),
        ))
        .await
        .context("cannot generate the profiles")?;
    eprintln!(
        "[{label}] data: {profiles} profiles in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Consents of some profiles.
    let consent_sql = if pg {
        format!(
            "INSERT INTO consents (tenant_id, profile_id, purpose, granted, updated_at, source) \
             SELECT $1, {id}, 'email_marketing', g % 10 <> 0, $2, 'bench' \
             FROM generate_series(2::bigint, $3::bigint, 2) AS g \
             UNION ALL SELECT $1, {id}, 'sms_marketing', TRUE, $2, 'bench' \
             FROM generate_series(3::bigint, $3::bigint, 3) AS g",
            id = profile_id_sql(backend, "g"),
        )
    } else {
        format!(
            "INSERT INTO consents (tenant_id, profile_id, purpose, granted, updated_at, source) \
             WITH RECURSIVE p(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM p WHERE g < $3) \
             SELECT $1, {id}, 'email_marketing', g % 10 <> 0, $2, 'bench' FROM p WHERE g % 2 = 0 \
             UNION ALL SELECT $1, {id}, 'sms_marketing', 1, $2, 'bench' FROM p WHERE g % 3 = 0",
            id = profile_id_sql(backend, "g"),
        )
    };
    let mut values = gen_values(backend, tenant, now, profiles, (1, events));
    values.truncate(3);
    admin
        .execute_raw(stmt(backend, &consent_sql, values))
        .await
        .context("cannot generate the consents")?;

    // Events, by chunks. On PostgreSQL the foreign-key triggers are skipped when the admin may
    // (every profile exists by construction).
    if pg
        && admin
            .execute_unprepared("SET session_replication_role = replica")
            .await
            .is_err()
    {
        eprintln!("[{label}] note: foreign keys checked while generating (not a superuser)");
    }
    let event_sql = if pg {
        format!(
            "INSERT INTO events (tenant_id, id, profile_id, message_id, type, name, properties, \
             context, \"timestamp\", received_at, channel, user_id) \
             SELECT $1, CAST('01900000-0000-7000-9000-' || lpad(to_hex(j), 12, '0') AS uuid), \
             {profile}, 'm-' || j, 'track', \
             CASE WHEN k < 10 THEN 'Page Viewed' WHEN k < 15 THEN 'Product Viewed' \
             WHEN k < 17 THEN 'Product Added' WHEN k = 17 THEN 'Checkout Started' \
             ELSE 'Order Completed' END, \
             CASE WHEN k < 10 THEN jsonb_build_object('path', x.path, 'url', \
             'https://shop.example' || x.path, 'title', 'Shop Example') \
             WHEN k < 17 THEN jsonb_build_object('sku', 'SKU-' || lpad(CAST((j * 7) % 200 AS text), 5, '0'), \
             'price', 5 + j % 300) \
             WHEN k = 17 THEN jsonb_build_object('step', 1) \
             ELSE jsonb_build_object('order_id', 'o-' || j, 'revenue', \
             round(10 + ((j * 37) % 40000) / 100.0, 2), 'currency', 'USD') END, \
             '{{}}'::jsonb, ts, ts, 'server', 'user-' || pn \
             FROM (SELECT r.*, (ARRAY['/', '/sale', '/new', '/pricing', '/pricing/enterprise', \
             '/search', '/help/shipping', '/blog/fall-lookbook'])[CAST(1 + (j / 20) % 8 AS integer)] AS path \
             FROM ({event_rows}) AS r) AS x",
            profile = profile_id_sql(backend, "pn"),
        )
    } else {
        format!(
            "INSERT INTO events (tenant_id, id, profile_id, message_id, type, name, properties, \
             context, \"timestamp\", received_at, channel, user_id) \
             SELECT $1, unhex('01900000000070009000' || printf('%012x', j)), \
             {profile}, 'm-' || j, 'track', \
             CASE WHEN k < 10 THEN 'Page Viewed' WHEN k < 15 THEN 'Product Viewed' \
             WHEN k < 17 THEN 'Product Added' WHEN k = 17 THEN 'Checkout Started' \
             ELSE 'Order Completed' END, \
             CASE WHEN k < 10 THEN json_object('path', path, 'url', \
             'https://shop.example' || path, 'title', 'Shop Example') \
             WHEN k < 17 THEN json_object('sku', 'SKU-' || printf('%05d', (j * 7) % 200), \
             'price', 5 + j % 300) \
             WHEN k = 17 THEN json_object('step', 1) \
             ELSE json_object('order_id', 'o-' || j, 'revenue', \
             round(10 + ((j * 37) % 40000) / 100.0, 2), 'currency', 'USD') END, \
             '{{}}', ts, ts, 'server', 'user-' || pn \
             FROM (SELECT r.*, CASE (j / 20) % 8 WHEN 0 THEN '/' WHEN 1 THEN '/sale' \
             WHEN 2 THEN '/new' WHEN 3 THEN '/pricing' WHEN 4 THEN '/pricing/enterprise' \
             WHEN 5 THEN '/search' WHEN 6 THEN '/help/shipping' ELSE '/blog/fall-lookbook' END AS path \
             FROM ({event_rows}) AS r)",
            profile = profile_id_sql(backend, "pn"),
        )
    };
    let started = Instant::now();
    let mut low = 1;
    while low <= events {
        let high = (low + CHUNK - 1).min(events);
        admin
            .execute_raw(stmt(
                backend,
                &event_sql,
                gen_values(backend, tenant, now, profiles, (low, high)),
            ))
            .await
            .context("cannot generate the events")?;
        eprintln!(
            "[{label}] data: {high}/{events} events, {:.1} s",
            started.elapsed().as_secs_f64()
        );
        low = high + 1;
    }
    let started = Instant::now();
    if pg {
        admin
            .execute_unprepared("SET session_replication_role = DEFAULT")
            .await
            .ok();
        admin
            .execute_unprepared("VACUUM (ANALYZE) profiles, events, consents")
            .await?;
    } else {
        admin.execute_unprepared("ANALYZE").await?;
    }
    eprintln!(
        "[{label}] data: analyzed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Builds and selects.

/// One segment of the build benchmark: its condition and the best SQL we could write by hand
/// for it (`$1` tenant, `$2` start of the window, `$3` now), per backend, selecting `id`.
struct SegmentCase {
    name: &'static str,
    condition: &'static str,
    window_days: i64,
    /// The segment the absolute target (3 s on PostgreSQL at 1,000,000 profiles) is about: the
    /// three-condition one.
    timed: bool,
    postgres: &'static str,
    sqlite: &'static str,
}

const SEGMENTS: [SegmentCase; 3] = [
    SegmentCase {
        name: "a: pro plan, 2+ orders in 30 days, email consent",
        condition: r#"{"all":[{"trait":"plan","op":"eq","value":"pro"},{"event":"Order Completed","count":{"gte":2},"within":"30d"},{"consent":"email_marketing"}]}"#,
        window_days: 30,
        timed: true,
        postgres: "SELECT p.id FROM profiles p \
             JOIN (SELECT e.profile_id FROM events e WHERE e.tenant_id = $1 \
             AND e.name = 'Order Completed' AND e.\"timestamp\" >= $2 AND e.\"timestamp\" <= $3 \
             GROUP BY e.profile_id HAVING COUNT(*) >= 2) o ON o.profile_id = p.id \
             WHERE p.tenant_id = $1 AND p.merged_into IS NULL AND p.traits ->> 'plan' = 'pro' \
             AND EXISTS (SELECT 1 FROM consents c WHERE c.tenant_id = $1 AND c.profile_id = p.id \
             AND c.purpose = 'email_marketing' AND c.granted)",
        sqlite: "SELECT p.id FROM profiles p \
             JOIN (SELECT e.profile_id FROM events e WHERE e.tenant_id = $1 \
             AND e.name = 'Order Completed' AND e.\"timestamp\" >= $2 AND e.\"timestamp\" <= $3 \
             GROUP BY e.profile_id HAVING COUNT(*) >= 2) o ON o.profile_id = p.id \
             WHERE p.tenant_id = $1 AND p.merged_into IS NULL \
             AND json_extract(p.traits, '$.plan') = 'pro' \
             AND EXISTS (SELECT 1 FROM consents c WHERE c.tenant_id = $1 AND c.profile_id = p.id \
             AND c.purpose = 'email_marketing' AND c.granted = 1)",
    },
    SegmentCase {
        name: "b: revenue 500+ or a pricing page in 7 days",
        condition: r#"{"any":[{"attribute":"total_revenue","op":"gte","value":500},{"event":"Page Viewed","where":[{"property":"path","op":"starts_with","value":"/pricing"}],"within":"7d"}]}"#,
        window_days: 7,
        timed: false,
        postgres: "SELECT p.id FROM profiles p WHERE p.tenant_id = $1 AND p.merged_into IS NULL \
             AND (p.total_revenue >= 500 OR p.id IN (SELECT e.profile_id FROM events e \
             WHERE e.tenant_id = $1 AND e.name = 'Page Viewed' AND e.\"timestamp\" >= $2 \
             AND e.\"timestamp\" <= $3 AND starts_with(e.properties ->> 'path', '/pricing')))",
        sqlite: "SELECT p.id FROM profiles p WHERE p.tenant_id = $1 AND p.merged_into IS NULL \
             AND (p.total_revenue >= 500 OR p.id IN (SELECT e.profile_id FROM events e \
             WHERE e.tenant_id = $1 AND e.name = 'Page Viewed' AND e.\"timestamp\" >= $2 \
             AND e.\"timestamp\" <= $3 \
             AND substr(json_extract(e.properties, '$.path'), 1, 8) = '/pricing'))",
    },
    SegmentCase {
        name: "c: Germany or France, no event in 14 days",
        condition: r#"{"all":[{"trait":"country","op":"in","value":["DE","FR"]},{"not":{"event":"$any","within":"14d"}}]}"#,
        window_days: 14,
        timed: false,
        postgres: "SELECT p.id FROM profiles p WHERE p.tenant_id = $1 AND p.merged_into IS NULL \
             AND p.traits ->> 'country' IN ('DE', 'FR') \
             AND NOT EXISTS (SELECT 1 FROM events e WHERE e.tenant_id = $1 \
             AND e.profile_id = p.id AND e.\"timestamp\" >= $2 AND e.\"timestamp\" <= $3)",
        sqlite: "SELECT p.id FROM profiles p WHERE p.tenant_id = $1 AND p.merged_into IS NULL \
             AND json_extract(p.traits, '$.country') IN ('DE', 'FR') \
             AND NOT EXISTS (SELECT 1 FROM events e WHERE e.tenant_id = $1 \
             AND e.profile_id = p.id AND e.\"timestamp\" >= $2 AND e.\"timestamp\" <= $3)",
    },
];

impl SegmentCase {
    fn key(&self) -> &'static str {
        &self.name[..1]
    }

    fn sql(&self, backend: DbBackend) -> &'static str {
        match backend {
            DbBackend::Postgres => self.postgres,
            _ => self.sqlite,
        }
    }

    /// $1 tenant, $2 start of the window, $3 now, as the compiler computes them.
    fn values(&self, backend: DbBackend, tenant: Uuid, now: DateTime<Utc>) -> Vec<Value> {
        let now = now.trunc_subsecs(6);
        let since = now - chrono::Duration::days(self.window_days);
        match backend {
            DbBackend::Postgres => vec![tenant.into(), since.into(), now.into()],
            _ => vec![
                tenant.into(),
                sqlite_instant(since).into(),
                sqlite_instant(now).into(),
            ],
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[allow(clippy::too_many_arguments)]
async fn measure_segment(
    db: &BenchDb,
    admin: &DatabaseConnection,
    store: &Store,
    raw: &DatabaseConnection,
    tenant: Uuid,
    case: &SegmentCase,
    sizes: Sizes,
    args: &SegmentsArgs,
) -> anyhow::Result<()> {
    let label = db.backend.name();
    let backend = db.db_backend;
    let condition: Condition = domain::condition::parse(&serde_json::from_str(case.condition)?)
        .map_err(|error| anyhow!("segment {}: {error:?}", case.key()))?;
    let tenant_id = TenantId::from(tenant);
    let now = Utc::now();
    let hand_sql = case.sql(backend);

    // The two segments the builds fill, as createSegment stores them.
    let (compiled_id, hand_id) = (Uuid::now_v7(), Uuid::now_v7());
    let tx = store.begin(tenant_id).await?;
    for (id, side) in [(compiled_id, "compiled"), (hand_id, "hand-written")] {
        store::segments::insert(
            &tx,
            id,
            store::segments::SegmentDraft {
                name: format!("bench {} ({side})", case.key()),
                description: None,
                condition: condition.to_json(),
                // The bench conditions name no personal trait: evaluated as written.
                evaluated: condition.to_json(),
                time_dependent: condition.dependencies().time_dependent,
            },
            now,
        )
        .await?;
    }
    tx.commit().await?;

    eprintln!("[{label}] segment {}", case.name);
    let (mut compiled_times, mut hand_times) = (Vec::new(), Vec::new());
    let (mut compiled_members, mut hand_members) = (0, 0);
    for run in 0..args.runs {
        let last = run + 1 == args.runs;
        for compiled_side in [run % 2 == 0, run % 2 == 1] {
            if compiled_side {
                let started = Instant::now();
                let tx = store.begin(tenant_id).await?;
                store::segments::barrier(&tx, store.backend(), true).await?;
                let (entered, _) = store::segments::rebuild(
                    &tx,
                    store.backend(),
                    compiled_id,
                    &condition,
                    now,
                    None,
                )
                .await?;
                tx.commit().await?;
                compiled_times.push(started.elapsed().as_secs_f64());
                compiled_members = entered;
            } else {
                let started = Instant::now();
                let tx = tenant_tx(raw, tenant, true).await?;
                let mut values = case.values(backend, tenant, now);
                values.push(hand_id.into());
                values.push(time_value(backend, now));
                let insert = format!(
                    "INSERT INTO segment_members (tenant_id, segment_id, profile_id, since) \
                     SELECT $1, $4, s.id, $5 FROM ({hand_sql}) s"
                );
                let result = tx.execute_raw(stmt(backend, &insert, values)).await?;
                tx.commit().await?;
                hand_times.push(started.elapsed().as_secs_f64());
                hand_members = result.rows_affected();
            }
        }
        if last {
            break;
        }
        clear_members(admin, raw, tenant, &[compiled_id, hand_id]).await?;
    }
    verify_members(
        raw,
        tenant,
        compiled_id,
        hand_id,
        compiled_members,
        hand_members,
    )
    .await
    .with_context(|| format!("segment {}", case.key()))?;
    let (compiled_build, hand_build) = (median(compiled_times), median(hand_times));
    let ratio = compiled_build / hand_build;
    let absolute_applies =
        case.timed && backend == DbBackend::Postgres && sizes.profiles >= 1_000_000;
    let met = ratio <= TARGET_RATIO && (!absolute_applies || compiled_build <= TARGET_SECONDS);
    eprintln!(
        "[{label}] segment {}: {compiled_members} members; build {compiled_build:.3} s compiled, \
         {hand_build:.3} s hand-written, ratio {ratio:.2}",
        case.key()
    );
    emit(json!({
        "scenario": "segments",
        "backend": label,
        "measurement": "build",
        "figure": "segment build seconds, compiled over hand-written SQL",
        "value": harness::round(compiled_build, 3),
        "baseline": harness::round(hand_build, 3),
        "segment": case.key(),
        "condition": serde_json::from_str::<Json>(case.condition)?,
        "profiles": sizes.profiles,
        "events": sizes.events,
        "members": compiled_members,
        "runs": args.runs,
        "seconds": harness::round(compiled_build, 3),
        "hand_written_seconds": harness::round(hand_build, 3),
        "ratio": harness::round(ratio, 3),
        "target": if absolute_applies {
            format!("ratio <= {TARGET_RATIO} and seconds <= {TARGET_SECONDS}")
        } else {
            format!("ratio <= {TARGET_RATIO}")
        },
        "met": met,
    }));
    clear_members(admin, raw, tenant, &[compiled_id, hand_id]).await?;

    // The selects alone, every id fetched in id order.
    let (mut compiled_times, mut hand_times) = (Vec::new(), Vec::new());
    let (mut compiled_ids, mut hand_ids) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        for compiled_side in [run % 2 == 0, run % 2 == 1] {
            if compiled_side {
                let started = Instant::now();
                let tx = store.read(tenant_id).await?;
                compiled_ids = store::conditions::matching_profiles(
                    &tx,
                    store.backend(),
                    &condition,
                    now,
                    None,
                    None,
                )
                .await?;
                tx.commit().await?;
                compiled_times.push(started.elapsed().as_secs_f64());
            } else {
                let started = Instant::now();
                let tx = tenant_tx(raw, tenant, false).await?;
                let rows = tx
                    .query_all_raw(stmt(
                        backend,
                        &format!("{hand_sql} ORDER BY p.id"),
                        case.values(backend, tenant, now),
                    ))
                    .await?;
                hand_ids = rows
                    .iter()
                    .map(|row| row.try_get_by_index::<Uuid>(0))
                    .collect::<Result<Vec<_>, _>>()?;
                tx.commit().await?;
                hand_times.push(started.elapsed().as_secs_f64());
            }
        }
    }
    if compiled_ids != hand_ids {
        bail!(
            "segment {}: the compiled select found {} profiles, the hand-written one {} (or other ones)",
            case.key(),
            compiled_ids.len(),
            hand_ids.len()
        );
    }
    if compiled_ids.len() as u64 != compiled_members {
        bail!(
            "segment {}: the select found {} profiles, the build {compiled_members}",
            case.key(),
            compiled_ids.len()
        );
    }
    let (compiled_select, hand_select) = (median(compiled_times), median(hand_times));
    let ratio = compiled_select / hand_select;
    eprintln!(
        "[{label}] segment {}: select {compiled_select:.3} s compiled, {hand_select:.3} s \
         hand-written, ratio {ratio:.2}",
        case.key()
    );
    emit(json!({
        "scenario": "segments",
        "backend": label,
        "measurement": "select",
        "figure": "segment select seconds, compiled over hand-written SQL",
        "value": harness::round(compiled_select, 3),
        "baseline": harness::round(hand_select, 3),
        "segment": case.key(),
        "profiles": sizes.profiles,
        "events": sizes.events,
        "members": compiled_ids.len(),
        "runs": args.runs,
        "seconds": harness::round(compiled_select, 3),
        "hand_written_seconds": harness::round(hand_select, 3),
        "ratio": harness::round(ratio, 3),
        "target": format!("ratio <= {TARGET_RATIO}"),
        "met": ratio <= TARGET_RATIO,
    }));

    if args.explain && backend == DbBackend::Postgres {
        let (compiled_sql, compiled_values) =
            store::conditions::compile(store.backend(), tenant, &condition, now);
        for (side, sql, values) in [
            ("compiled", compiled_sql, compiled_values),
            (
                "hand-written",
                format!("{hand_sql} ORDER BY p.id"),
                case.values(backend, tenant, now),
            ),
        ] {
            let tx = tenant_tx(raw, tenant, false).await?;
            let rows = tx
                .query_all_raw(stmt(
                    backend,
                    &format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"),
                    values,
                ))
                .await?;
            tx.commit().await?;
            eprintln!("[{label}] segment {} {side}: {sql}", case.key());
            for row in rows {
                eprintln!("    {}", row.try_get_by_index::<String>(0)?);
            }
        }
    }
    Ok(())
}

fn time_value(backend: DbBackend, instant: DateTime<Utc>) -> Value {
    match backend {
        DbBackend::Postgres => instant.into(),
        _ => sqlite_instant(instant).into(),
    }
}

/// Empties the segments (outside the clock) and, on PostgreSQL, vacuums the members table, so
/// that every run starts from the same state.
async fn clear_members(
    admin: &DatabaseConnection,
    raw: &DatabaseConnection,
    tenant: Uuid,
    segments: &[Uuid],
) -> anyhow::Result<()> {
    let backend = raw.get_database_backend();
    let tx = tenant_tx(raw, tenant, true).await?;
    for segment in segments {
        tx.execute_raw(stmt(
            backend,
            "DELETE FROM segment_members WHERE tenant_id = $1 AND segment_id = $2",
            vec![tenant.into(), (*segment).into()],
        ))
        .await?;
    }
    tx.commit().await?;
    if backend == DbBackend::Postgres {
        admin.execute_unprepared("VACUUM segment_members").await?;
    }
    Ok(())
}

/// The two builds stored the same members: same count, nothing in one that is not in the other.
async fn verify_members(
    raw: &DatabaseConnection,
    tenant: Uuid,
    compiled: Uuid,
    hand: Uuid,
    compiled_count: u64,
    hand_count: u64,
) -> anyhow::Result<()> {
    if compiled_count != hand_count {
        bail!(
            "the compiled build stored {compiled_count} members, the hand-written one {hand_count}"
        );
    }
    let backend = raw.get_database_backend();
    let tx = tenant_tx(raw, tenant, false).await?;
    let sql = "SELECT \
        (SELECT COUNT(*) FROM segment_members WHERE tenant_id = $1 AND segment_id = $2), \
        (SELECT COUNT(*) FROM (SELECT profile_id FROM segment_members WHERE tenant_id = $1 AND segment_id = $2 \
         EXCEPT SELECT profile_id FROM segment_members WHERE tenant_id = $1 AND segment_id = $3) AS x), \
        (SELECT COUNT(*) FROM (SELECT profile_id FROM segment_members WHERE tenant_id = $1 AND segment_id = $3 \
         EXCEPT SELECT profile_id FROM segment_members WHERE tenant_id = $1 AND segment_id = $2) AS y)";
    let row = tx
        .query_one_raw(stmt(
            backend,
            sql,
            vec![tenant.into(), compiled.into(), hand.into()],
        ))
        .await?
        .context("the comparison returned no row")?;
    let stored: i64 = row.try_get_by_index(0)?;
    let only_compiled: i64 = row.try_get_by_index(1)?;
    let only_hand: i64 = row.try_get_by_index(2)?;
    tx.commit().await?;
    if u64::try_from(stored)? != compiled_count || only_compiled != 0 || only_hand != 0 {
        bail!(
            "the member sets differ: {stored} stored, {only_compiled} only compiled, {only_hand} only hand-written"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Real time.

/// The segments defined for the second real-time run: a mix of trait, event count within a
/// window, attribute and mixed conditions on what the workload sends.
fn realtime_conditions(count: usize) -> Vec<Json> {
    const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
    const EVENTS: [&str; 5] = [
        "Order Completed",
        "Product Viewed",
        "Page Viewed",
        "Product Added",
        "Checkout Started",
    ];
    (0..count)
        .map(|i| {
            let plan = PLANS[i % PLANS.len()];
            let event = EVENTS[i % EVENTS.len()];
            let days = 7 + (i % 4) * 7;
            match i % 5 {
                0 => json!({"trait": "plan", "op": "eq", "value": plan}),
                1 => json!({"event": event, "count": {"gte": 1 + i % 3}, "within": format!("{days}d")}),
                2 => json!({"attribute": "total_revenue", "op": "gte", "value": 50 * (1 + i % 8)}),
                3 => json!({"all": [
                    {"trait": "plan", "op": "in", "value": [plan, "enterprise"]},
                    {"event": event, "count": {"gte": 2}, "within": format!("{days}d")}
                ]}),
                _ => json!({"any": [
                    {"attribute": "order_count", "op": "gte", "value": 1 + i % 4},
                    {"attribute": "event_count", "op": "gte", "value": 10 + i}
                ]}),
            }
        })
        .collect()
}

async fn realtime(
    db: &BenchDb,
    admin: &DatabaseConnection,
    server: &Server,
    args: &SegmentsArgs,
) -> anyhow::Result<()> {
    let label = db.backend.name();
    let count = args
        .messages
        .unwrap_or(if args.quick { 5_000 } else { 20_000 });
    let mut workload = Workload::generate(args.seed, count);
    // A live feed: move the stream so that it ends now, inside the segments' windows.
    if let Some(last) = workload
        .messages
        .iter()
        .map(|message| message.timestamp)
        .max()
    {
        let shift = Utc::now() - chrono::Duration::minutes(1) - last;
        for message in &mut workload.messages {
            message.timestamp += shift;
        }
    }
    let bodies = Arc::new(workload.request_bodies(BATCH)?);
    let conditions = realtime_conditions(args.segments);
    let batches = workload.messages.chunks(BATCH).count().max(1);
    let people_per_batch = workload
        .messages
        .chunks(BATCH)
        .map(|chunk| {
            let mut people: Vec<u32> = chunk.iter().map(|message| message.person).collect();
            people.sort_unstable();
            people.dedup();
            people.len()
        })
        .sum::<usize>()
        / batches;
    let store = Store::connect(&StoreOptions {
        url: db.service_url.clone(),
        max_connections: 2,
        min_connections: 1,
    })
    .await
    .context("cannot connect the store")?;
    let mut breakdowns = Vec::new();

    let mut rates = Vec::new();
    for with_segments in [false, true] {
        let owner = server.sign_up("realtime").await?;
        let key = server.write_key(&owner).await?;
        server
            .graphql(&owner.access_token, INGEST_SETTINGS, json!({}))
            .await
            .context("cannot set the ingestion settings")?;
        let defined = if with_segments { conditions.len() } else { 0 };
        for (i, condition) in conditions.iter().take(defined).enumerate() {
            let data = server
                .graphql(
                    &owner.access_token,
                    "mutation($input: SegmentInput!) { createSegment(input: $input) { id status } }",
                    json!({"input": {"name": format!("realtime {i}"), "condition": condition}}),
                )
                .await
                .with_context(|| format!("cannot create segment {i}"))?;
            let status = data
                .pointer("/createSegment/status")
                .and_then(Json::as_str)
                .unwrap_or("");
            if status != "READY" {
                bail!("segment {i} is {status}, not READY");
            }
        }
        eprintln!(
            "[{label}] real time: {count} messages, {defined} segments, {} concurrent clients",
            args.concurrency
        );
        let (elapsed, failed, accepted) =
            send_all(server, &key, bodies.clone(), args.concurrency, label).await?;
        let stored = count_events(admin, owner.tenant_id).await?;
        let rate = count as f64 / elapsed.as_secs_f64();
        eprintln!(
            "[{label}] real time with {defined} segments: {:.2} s, {rate:.0} events/s, \
             {failed} requests failed, {stored} events stored for {accepted} accepted",
            elapsed.as_secs_f64()
        );
        if failed > 0 || stored != accepted {
            bail!("{failed} requests failed, {stored} events stored for {accepted} accepted");
        }
        rates.push(rate);
        let breakdown =
            breakdown(&store, owner.tenant_id, people_per_batch.max(1), args.runs).await?;
        eprintln!("[{label}] real time with {defined} segments, one batch's work: {breakdown}");
        breakdowns.push(breakdown);
    }
    drop(store);
    let ratio = rates[1] / rates[0];
    emit(json!({
        "scenario": "segments",
        "backend": label,
        "measurement": "realtime",
        "figure": "ingest events/s with segments over without",
        "value": rates[1].round() as u64,
        "baseline": rates[0].round() as u64,
        "messages": count,
        "concurrency": args.concurrency,
        "segments": conditions.len(),
        "events_per_s_without_segments": rates[0].round() as u64,
        "events_per_s_with_segments": rates[1].round() as u64,
        "ratio": harness::round(ratio, 3),
        "target": format!("ratio >= {TARGET_REALTIME}"),
        "met": ratio >= TARGET_REALTIME,
        "people_per_batch": people_per_batch,
        "batch_work_without_segments": breakdowns[0],
        "batch_work_with_segments": breakdowns[1],
    }));
    Ok(())
}

/// Where the real-time evaluation of one batch goes: each step of `understand::after_write`
/// timed on its own (median of `runs`, in milliseconds) for the `people` most recently seen
/// profiles of the tenant (as many as a batch touches on average), then `after_write` itself
/// for them with a delta of new events of every name (what a batch of track calls reports).
async fn breakdown(
    store: &Store,
    tenant: Uuid,
    people: usize,
    runs: usize,
) -> anyhow::Result<Json> {
    use api::service::understand;
    let tenant_id = TenantId::from(tenant);
    let now = Utc::now();
    let tx = store.read(tenant_id).await?;
    // Only ids and numbers reach this text, none of them from outside.
    let tenant_literal = match store.backend() {
        store::Backend::Postgres => format!("'{tenant}'"),
        store::Backend::Sqlite => format!("X'{}'", tenant.simple()),
    };
    let recent = tx
        .raw_query_strings(&format!(
            "SELECT id FROM profiles WHERE tenant_id = {tenant_literal} AND merged_into IS NULL \
             ORDER BY last_seen_at DESC LIMIT {people}"
        ))
        .await?;
    let ids: Vec<Uuid> = recent
        .iter()
        .map(|id| Uuid::parse_str(id))
        .collect::<Result<_, _>>()?;
    let mut times: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    let mut time = |step: &'static str, started: Instant| {
        times
            .entry(step)
            .or_default()
            .push(started.elapsed().as_secs_f64() * 1000.0);
    };
    let (mut events_loaded, mut segments_count) = (0, 0);
    for _ in 0..runs.max(5) {
        let started = Instant::now();
        let segments = understand::ready_segments(&tx).await?;
        time("ready_segments_ms", started);
        segments_count = segments.len();
        let started = Instant::now();
        understand::lifecycle_model(&tx).await?;
        time("lifecycle_model_ms", started);
        let mut needs = store::facts::EventNeeds {
            consents: true,
            ..Default::default()
        };
        let mut longest = None;
        let mut all_time = false;
        for segment in &segments {
            needs.any |= segment.deps.any_event;
            needs.names.extend(segment.deps.event_names.iter().cloned());
            all_time |= segment.deps.all_time_events;
            longest = longest.max(segment.deps.longest_window.map(|window| window.duration()));
        }
        if !all_time {
            needs.since = longest.map(|window| now - window - chrono::Duration::seconds(1));
        }
        let started = Instant::now();
        let without_events = store::facts::EventNeeds {
            consents: true,
            ..Default::default()
        };
        store::facts::load(&tx, &ids, &without_events).await?;
        time("facts_without_events_ms", started);
        let started = Instant::now();
        let facts = store::facts::load(&tx, &ids, &needs).await?;
        time("facts_ms", started);
        events_loaded = facts
            .values()
            .map(|profile| profile.events.len())
            .sum::<usize>();
        let started = Instant::now();
        store::segments::memberships_of(&tx, &ids).await?;
        time("memberships_ms", started);
        let started = Instant::now();
        let mut holds = 0usize;
        for profile in facts.values() {
            for segment in &segments {
                holds += usize::from(segment.condition.evaluate(profile, now));
            }
        }
        std::hint::black_box(holds);
        time("evaluate_ms", started);
    }
    tx.commit().await?;
    let deltas: std::collections::BTreeMap<Uuid, understand::Delta> = ids
        .iter()
        .map(|id| {
            (
                *id,
                understand::Delta {
                    events: true,
                    event_names: [
                        "Order Completed",
                        "Product Viewed",
                        "Page Viewed",
                        "Product Added",
                        "Checkout Started",
                    ]
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                    ..understand::Delta::default()
                },
            )
        })
        .collect();
    for _ in 0..runs.max(5) {
        let started = Instant::now();
        let tx = store.begin(tenant_id).await?;
        understand::after_write(&tx, store.backend(), None, &deltas, &[], Utc::now()).await?;
        tx.commit().await?;
        time("after_write_ms", started);
    }
    let mut out = serde_json::Map::new();
    out.insert("profiles".into(), json!(ids.len()));
    out.insert("segments".into(), json!(segments_count));
    out.insert("events_loaded".into(), json!(events_loaded));
    for (step, values) in times {
        out.insert(step.into(), json!(harness::round(median(values), 2)));
    }
    Ok(Json::Object(out))
}

/// Events stored for a tenant (the owner bypasses row-level security, or binds the tenant).
async fn count_events(admin: &DatabaseConnection, tenant: Uuid) -> anyhow::Result<u64> {
    let tx = tenant_tx(admin, tenant, false).await?;
    let row = tx
        .query_one_raw(stmt(
            admin.get_database_backend(),
            "SELECT COUNT(*) FROM events WHERE tenant_id = $1",
            vec![tenant.into()],
        ))
        .await?
        .context("COUNT returned no row")?;
    let count: i64 = row.try_get_by_index(0)?;
    tx.commit().await?;
    Ok(u64::try_from(count)?)
}

/// Posts every body from `concurrency` clients; returns (elapsed, failed requests, accepted
/// messages). An answer other than `200 {"success":true}` is a failure.
async fn send_all(
    server: &Server,
    key: &str,
    bodies: Arc<Vec<(usize, Vec<u8>)>>,
    concurrency: usize,
    label: &'static str,
) -> anyhow::Result<(Duration, usize, u64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let url = server.url("/v1/batch");
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, url, key) = (server.client.clone(), url.clone(), key.to_owned());
        let (bodies, next, failures) = (bodies.clone(), next.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            let (mut failed, mut accepted) = (0usize, 0u64);
            while let Some((count, body)) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) {
                match post(&client, &url, &key, body.clone()).await {
                    Ok(()) => accepted += *count as u64,
                    Err(reason) => {
                        failed += 1;
                        if let Ok(mut failures) = failures.lock() {
                            if failures.len() < 5 {
                                failures.push(reason);
                            }
                        }
                    }
                }
            }
            (failed, accepted)
        }));
    }
    let (mut failed, mut accepted) = (0, 0);
    for worker in workers {
        let (worker_failed, worker_accepted) = worker.await?;
        failed += worker_failed;
        accepted += worker_accepted;
    }
    let elapsed = started.elapsed();
    if let Ok(failures) = failures.lock() {
        for reason in failures.iter() {
            eprintln!("[{label}] failed request: {reason}");
        }
    }
    Ok((elapsed, failed, accepted))
}

async fn post(client: &reqwest::Client, url: &str, key: &str, body: Vec<u8>) -> Result<(), String> {
    let response = client
        .post(url)
        .basic_auth(key, Some(""))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|error| format!("not sent: {error}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|error| format!("{status} with an unreadable body: {error}"))?;
    let shown: String = text.chars().take(300).collect();
    if status != reqwest::StatusCode::OK {
        return Err(format!("{status}: {shown}"));
    }
    match serde_json::from_str::<Json>(&text) {
        Ok(value) if value == json!({"success": true}) => Ok(()),
        _ => Err(format!("{status} but the body is {shown}")),
    }
}
