//! The `ingest` scenario: how many events per second the collection API stores, end to end, next
//! to the same rows written by plain multi-row INSERTs into the same schema.
//!
//! The CDP side posts the workload to `POST /v1/batch` (100 messages a request, HTTP Basic with
//! a server-side write key) from C concurrent clients over loopback, checks that every answer is
//! `200 {"success":true}`, and afterwards that the tenant holds one `events` row per accepted
//! message. The clock runs from the first request sent to the last answer received; the server
//! answers only after the commit.
//!
//! The baseline writes, for a second tenant of the same database, what the CDP must write at
//! least: one `profiles` row per distinct person and one `events` row per message, as one
//! transaction per 100 messages holding two multi-row `INSERT … ON CONFLICT DO NOTHING`
//! statements (profiles, then events) with bound parameters, from C concurrent tasks over a pool
//! of 10 connections. The clock runs from the first statement to the last commit.
//!
//! Both sides run in rounds (`--rounds`, default 4): each round sends its slice of the requests
//! through the CDP and writes the same messages through the baseline, the side that goes first
//! alternating, so that the machine's speed drifting during the run weighs on both alike; each
//! side's rate is all its messages over the sum of its rounds' clocks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use api::store::{JsonText, STATEMENT_BYTES};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, InsertStatement, OnConflict, Query};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, SqliteTransactionMode, Statement,
    TransactionOptions, TransactionTrait,
};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, BackendArgs, BenchDb, Server};
use crate::workload::{Kind, Message, Workload};

/// Messages per request (and per baseline transaction).
const BATCH: usize = 100;
/// Connections of the baseline's pool, as many as the server's.
const BASELINE_POOL: u32 = 10;

const INGEST_SETTINGS: &str = r#"mutation { updateIngestSettings(input: {
    maxMessageBytes: 32768, maxRequestBytes: 4194304, maxBatchMessages: 2500,
    rateLimitPerSecond: 0, defaultRegion: null, blockedIdentityValues: [],
    identityRules: [
      {kind: "user_id", priority: 100, limit: 1},
      {kind: "email", priority: 80, limit: 5},
      {kind: "phone", priority: 70, limit: 5},
      {kind: "anonymous_id", priority: 10, limit: 100}
    ] }) { rateLimitPerSecond } }"#;

/// `cdp-bench ingest`: collection API throughput against a plain-INSERT baseline.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Small sizes (20,000 messages unless --messages says otherwise).
    #[arg(long)]
    pub quick: bool,
    /// Messages to send (default 200,000; 20,000 with --quick).
    #[arg(long, value_name = "N")]
    pub messages: Option<usize>,
    /// Concurrent clients (and concurrent baseline writers).
    #[arg(long, value_name = "C", default_value_t = 8)]
    pub concurrency: usize,
    /// Seed of the generated workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Rounds: the workload cut into this many consecutive slices, each sent through the CDP
    /// and written by the baseline in turn (alternating which goes first), so that a machine
    /// whose speed drifts during the run slows both sides alike. 1 runs the whole workload
    /// through the CDP, then through the baseline.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    #[command(flatten)]
    pub backends: BackendArgs,
}

/// The JSON line of one backend.
#[derive(Debug, Serialize)]
struct IngestResult {
    scenario: &'static str,
    backend: &'static str,
    /// What `value` and `baseline` measure.
    figure: &'static str,
    value: u64,
    baseline: u64,
    messages: usize,
    requests: usize,
    concurrency: usize,
    rounds: usize,
    events_per_s: u64,
    baseline_per_s: u64,
    ratio: f64,
    failed_requests: usize,
    lost: u64,
}

pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    let count = args
        .messages
        .unwrap_or(if args.quick { 20_000 } else { 200_000 });
    if count == 0 || args.concurrency == 0 || args.rounds == 0 {
        bail!("--messages, --concurrency and --rounds must be at least 1");
    }
    let started = Instant::now();
    let workload = Arc::new(Workload::generate(args.seed, count));
    let bodies = Arc::new(workload.request_bodies(BATCH)?);
    let bytes: usize = bodies.iter().map(|(_, body)| body.len()).sum();
    let identifies = workload
        .messages
        .iter()
        .filter(|message| message.kind == Kind::Identify)
        .count();
    let anonymous = workload
        .messages
        .iter()
        .filter(|message| !message.with_user_id)
        .count();
    eprintln!(
        "workload: {count} messages from {} people (seed {}): {:.1} % anonymous tracks, {:.1} % identify; \
         {} requests, {:.1} MB, {} bytes a message on average; generated in {:.1} s",
        workload.people.len(),
        args.seed,
        100.0 * anonymous as f64 / count as f64,
        100.0 * identifies as f64 / count as f64,
        bodies.len(),
        bytes as f64 / 1e6,
        bytes / count,
        started.elapsed().as_secs_f64()
    );
    let (concurrency, rounds) = (args.concurrency, args.rounds.min(bodies.len()));
    harness::on_each_backend(&args.backends, |db| {
        let workload = workload.clone();
        let bodies = bodies.clone();
        async move { run_on(db, workload, bodies, concurrency, rounds).await }
    })
    .await
}

async fn run_on(
    db: Arc<BenchDb>,
    workload: Arc<Workload>,
    bodies: Arc<Vec<(usize, Vec<u8>)>>,
    concurrency: usize,
    rounds: usize,
) -> anyhow::Result<IngestResult> {
    let label = db.backend.name();
    let messages = workload.messages.len();

    // The CDP, through its HTTP API.
    let server = Server::start(&db).await?;
    let owner = server.sign_up("bench").await?;
    let key = server.write_key(&owner).await?;
    server
        .graphql(&owner.access_token, INGEST_SETTINGS, json!({}))
        .await
        .context("cannot set the ingestion settings")?;
    // The baseline, on the same database, as the service's role (the read and segments
    // baselines do the same): on PostgreSQL under the same row-level security, so it binds its
    // tenant in each transaction as the service does.
    let pool = db.owner_pool(BASELINE_POOL).await?;
    let tenant = insert_tenant(&pool).await?;
    let writer = harness::service_pool(&db, BASELINE_POOL).await?;
    let set_tenant = !harness::bypasses_rls(&writer).await?;
    eprintln!(
        "[{label}] {messages} messages in {} requests of {BATCH}, in {rounds} round(s): the CDP from \
         {concurrency} concurrent clients, the baseline as plain INSERTs from {concurrency} \
         concurrent writers over a pool of {BASELINE_POOL}",
        bodies.len()
    );
    let mut sent = Sent {
        elapsed: Duration::ZERO,
        failed_requests: 0,
        accepted_messages: 0,
    };
    let mut baseline_elapsed = Duration::ZERO;
    for round in 0..rounds {
        // Requests [from, to) of this round; request i holds messages from i × BATCH on.
        let (from, to) = (
            round * bodies.len() / rounds,
            (round + 1) * bodies.len() / rounds,
        );
        let slice = (from * BATCH)..(to * BATCH).min(messages);
        // Each side starts after a checkpoint, and the side that goes first alternates, so
        // that neither always meets the other's dirty pages or the larger tables.
        for cdp_turn in [round % 2 == 0, round % 2 == 1] {
            db.checkpoint().await?;
            if cdp_turn {
                let part =
                    send_all(&server, &key, bodies.clone(), from..to, concurrency, label).await?;
                eprintln!(
                    "[{label}] round {}: CDP {:.2} s for {} messages",
                    round + 1,
                    part.elapsed.as_secs_f64(),
                    slice.len()
                );
                sent.elapsed += part.elapsed;
                sent.failed_requests += part.failed_requests;
                sent.accepted_messages += part.accepted_messages;
            } else {
                let elapsed = baseline(
                    &writer,
                    workload.clone(),
                    slice.clone(),
                    tenant,
                    concurrency,
                    set_tenant,
                    label,
                )
                .await?;
                eprintln!(
                    "[{label}] round {}: baseline {:.2} s for {} messages",
                    round + 1,
                    elapsed.as_secs_f64(),
                    slice.len()
                );
                baseline_elapsed += elapsed;
            }
        }
    }
    let cdp_rate = messages as f64 / sent.elapsed.as_secs_f64();
    eprintln!(
        "[{label}] CDP: {:.2} s, {cdp_rate:.0} events/s, {} requests failed",
        sent.elapsed.as_secs_f64(),
        sent.failed_requests
    );
    use api::metrics::IngestRetry;
    let metrics = &server.app.state().metrics;
    eprintln!(
        "[{label}] CDP: transactions begun again: {} to look up stored messages, {} after a concurrent merge, {} after a concurrent write, {} transient",
        metrics.ingest_retry_count(IngestRetry::StoredMessage),
        metrics.ingest_retry_count(IngestRetry::ProfileMerged),
        metrics.ingest_retry_count(IngestRetry::Conflict),
        metrics.ingest_retry_count(IngestRetry::Transient)
    );
    server.stop().await?;

    let stored = count_rows(&pool, "events", owner.tenant_id, "").await?;
    let live = count_rows(
        &pool,
        "profiles",
        owner.tenant_id,
        " AND merged_into IS NULL",
    )
    .await?;
    let merged = count_rows(
        &pool,
        "profiles",
        owner.tenant_id,
        " AND merged_into IS NOT NULL",
    )
    .await?;
    let lost = sent.accepted_messages.saturating_sub(stored);
    eprintln!(
        "[{label}] CDP stored {stored} events for {} accepted messages ({lost} lost); {live} live profiles \
         ({merged} merged away) for {} people",
        sent.accepted_messages,
        workload.people.len()
    );
    if stored > sent.accepted_messages {
        eprintln!(
            "[{label}] warning: {} more events stored than acknowledged (a failed request committed?)",
            stored - sent.accepted_messages
        );
    }

    let baseline_rate = messages as f64 / baseline_elapsed.as_secs_f64();
    let baseline_events = count_rows(&pool, "events", tenant, "").await?;
    let baseline_profiles = count_rows(&pool, "profiles", tenant, "").await?;
    eprintln!(
        "[{label}] baseline: {:.2} s, {baseline_rate:.0} events/s; stored {baseline_events} events, {baseline_profiles} profiles",
        baseline_elapsed.as_secs_f64()
    );
    if baseline_events != messages as u64 {
        bail!("the baseline stored {baseline_events} events for {messages} messages");
    }
    writer.close().await?;
    pool.close().await?;

    Ok(IngestResult {
        scenario: "ingest",
        backend: label,
        figure: "events/s, CDP over plain INSERTs",
        value: cdp_rate.round() as u64,
        baseline: baseline_rate.round() as u64,
        messages,
        requests: bodies.len(),
        concurrency,
        rounds,
        events_per_s: cdp_rate.round() as u64,
        baseline_per_s: baseline_rate.round() as u64,
        ratio: harness::round(cdp_rate / baseline_rate, 3),
        failed_requests: sent.failed_requests,
        lost,
    })
}

/// What the clients saw.
struct Sent {
    elapsed: Duration,
    failed_requests: usize,
    accepted_messages: u64,
}

/// Prints progress on stderr every two seconds until aborted.
fn progress(
    label: &'static str,
    what: &'static str,
    done: Arc<AtomicU64>,
    total: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_secs(2));
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let done = done.load(Ordering::Relaxed);
            eprintln!(
                "[{label}] {what}: {done}/{total} messages, {:.0}/s",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    })
}

/// Posts the bodies of `range` from `concurrency` clients; every answer must be exactly
/// `200 {"success":true}`.
async fn send_all(
    server: &Server,
    key: &str,
    bodies: Arc<Vec<(usize, Vec<u8>)>>,
    range: std::ops::Range<usize>,
    concurrency: usize,
    label: &'static str,
) -> anyhow::Result<Sent> {
    let total: usize = bodies[range.clone()].iter().map(|(count, _)| count).sum();
    let next = Arc::new(AtomicUsize::new(range.start));
    let done = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let url = server.url("/v1/batch");
    let started = Instant::now();
    let reporter = progress(label, "CDP", done.clone(), total);
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, url, key) = (server.client.clone(), url.clone(), key.to_owned());
        let (bodies, next, done, failures) =
            (bodies.clone(), next.clone(), done.clone(), failures.clone());
        let end = range.end;
        workers.push(tokio::spawn(async move {
            let (mut failed, mut accepted) = (0usize, 0u64);
            while let Some((count, body)) = bodies[..end].get(next.fetch_add(1, Ordering::Relaxed))
            {
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
                done.fetch_add(*count as u64, Ordering::Relaxed);
            }
            (failed, accepted)
        }));
    }
    let mut sent = Sent {
        elapsed: Duration::ZERO,
        failed_requests: 0,
        accepted_messages: 0,
    };
    for worker in workers {
        let (failed, accepted) = worker.await?;
        sent.failed_requests += failed;
        sent.accepted_messages += accepted;
    }
    sent.elapsed = started.elapsed();
    reporter.abort();
    if let Ok(failures) = failures.lock() {
        for reason in failures.iter() {
            eprintln!("[{label}] failed request: {reason}");
        }
    }
    Ok(sent)
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
    match serde_json::from_str::<Value>(&text) {
        Ok(value) if value == json!({"success": true}) => Ok(()),
        _ => Err(format!("{status} but the body is {shown}")),
    }
}

/// Rows of `table` of one tenant, counted in a transaction bound to the tenant (so that it works
/// under row-level security too).
async fn count_rows(
    pool: &DatabaseConnection,
    table: &str,
    tenant: Uuid,
    condition: &str,
) -> anyhow::Result<u64> {
    let backend = pool.get_database_backend();
    let tx = pool.begin().await?;
    let placeholder = if backend == DbBackend::Postgres {
        tx.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT set_config('app.tenant_id', $1, true)",
            [tenant.to_string().into()],
        ))
        .await?;
        "$1"
    } else {
        "?"
    };
    let row = tx
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!("SELECT COUNT(*) FROM {table} WHERE tenant_id = {placeholder}{condition}"),
            [tenant.into()],
        ))
        .await?
        .context("COUNT returned no row")?;
    let count: i64 = row.try_get_by_index(0)?;
    tx.commit().await?;
    Ok(u64::try_from(count)?)
}

/// The baseline's tenant: a `tenants` row, inserted directly.
async fn insert_tenant(pool: &DatabaseConnection) -> anyhow::Result<Uuid> {
    let id = Uuid::now_v7();
    let slug = format!("baseline-{}", &id.simple().to_string()[24..]);
    let mut insert = Query::insert();
    insert
        .into_table("tenants")
        .columns(["id", "slug", "name", "settings", "created_at"])
        .values([
            id.into(),
            slug.clone().into(),
            format!("{slug} Inc").into(),
            json!({}).into(),
            Utc::now().into(),
        ])?;
    pool.execute(&insert)
        .await
        .context("cannot insert the baseline tenant")?;
    Ok(id)
}

/// Writes the workload's messages of `slice` as plain INSERTs, `BATCH` a transaction; returns
/// the time from the first statement to the last commit.
async fn baseline(
    pool: &DatabaseConnection,
    workload: Arc<Workload>,
    slice: std::ops::Range<usize>,
    tenant: Uuid,
    concurrency: usize,
    set_tenant: bool,
    label: &'static str,
) -> anyhow::Result<Duration> {
    let total = slice.len();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let reporter = progress(label, "baseline", done.clone(), total);
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (pool, workload, next, done, retries, slice) = (
            pool.clone(),
            workload.clone(),
            next.clone(),
            done.clone(),
            retries.clone(),
            slice.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let start = slice.start + next.fetch_add(1, Ordering::Relaxed) * BATCH;
                let Some(chunk) = workload
                    .messages
                    .get(start.min(slice.end)..(start + BATCH).min(slice.end))
                    .filter(|chunk| !chunk.is_empty())
                else {
                    return anyhow::Ok(());
                };
                let mut attempt = 0;
                loop {
                    match write_batch(&pool, &workload, chunk, tenant, set_tenant).await {
                        Ok(()) => break,
                        Err(error) if attempt < 5 && is_transient(&error) => {
                            attempt += 1;
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
                        }
                        Err(error) => return Err(error),
                    }
                }
                done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    let mut outcome = Ok(());
    for worker in workers {
        if let Err(error) = worker.await? {
            outcome = Err(error);
        }
    }
    let elapsed = started.elapsed();
    reporter.abort();
    let retries = retries.load(Ordering::Relaxed);
    if retries > 0 {
        eprintln!("[{label}] baseline: {retries} transactions retried after a transient error");
    }
    outcome.map(|()| elapsed)
}

fn is_transient(error: &anyhow::Error) -> bool {
    let text = format!("{error:#}");
    ["40001", "40P01", "deadlock", "database is locked"]
        .iter()
        .any(|marker| text.contains(marker))
}

/// One person's rows within a batch.
struct Seen {
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    count: i64,
    traits: Option<Value>,
}

/// One transaction: the batch's profiles, then its events, as multi-row statements (one each on
/// SQLite; as few as fit `STATEMENT_BYTES` on PostgreSQL).
async fn write_batch(
    pool: &DatabaseConnection,
    workload: &Workload,
    chunk: &[Message],
    tenant: Uuid,
    set_tenant: bool,
) -> anyhow::Result<()> {
    let now = Utc::now();
    // Sorted by id, so that concurrent batches lock shared profiles in the same order.
    let mut people: BTreeMap<Uuid, Seen> = BTreeMap::new();
    for message in chunk {
        let person = workload.person(message);
        let seen = people.entry(person.profile_id).or_insert(Seen {
            first: message.timestamp,
            last: message.timestamp,
            count: 0,
            traits: None,
        });
        seen.first = seen.first.min(message.timestamp);
        seen.last = seen.last.max(message.timestamp);
        seen.count += 1;
        if message.kind == Kind::Identify {
            seen.traits = Some(message.payload.clone());
        }
    }
    // On PostgreSQL each statement carries at most STATEMENT_BYTES of values, as the service's
    // writes do: the driver leaves Nagle's algorithm on, and a larger statement would wait 40 ms
    // for a delayed acknowledgement (docs/PERFORMANCE.md), which would slow the baseline down
    // for a reason that has nothing to do with the work it does.
    let bound = if pool.get_database_backend() == DbBackend::Postgres {
        STATEMENT_BYTES
    } else {
        usize::MAX
    };
    let mut profiles = Bounded::new(bound, || {
        let mut profiles = Query::insert();
        profiles
            .into_table("profiles")
            .columns([
                "tenant_id",
                "id",
                "traits",
                "trait_clock",
                "channels",
                "first_seen_at",
                "last_seen_at",
                "event_count",
                "created_at",
                "updated_at",
            ])
            .on_conflict(
                OnConflict::columns(["tenant_id", "id"])
                    .do_nothing()
                    .to_owned(),
            );
        profiles
    });
    // JSON bound as its text, as the service binds it (`api::store::JsonText`).
    let backend = pool.get_database_backend();
    let (no_trait_clock, channels) = (JsonText::of(&json!({})), JsonText::of(&json!(["server"])));
    for (id, seen) in people {
        let traits = JsonText::of(&seen.traits.unwrap_or_else(|| json!({})));
        let size = traits.bytes() + 10 * 20;
        profiles.push(
            size,
            [
                tenant.into(),
                id.into(),
                traits.into_expr(backend),
                no_trait_clock.clone().into_expr(backend),
                channels.clone().into_expr(backend),
                seen.first.into(),
                seen.last.into(),
                seen.count.into(),
                now.into(),
                now.into(),
            ],
        )?;
    }

    let mut events = Bounded::new(bound, || {
        let mut events = Query::insert();
        events
            .into_table("events")
            .columns([
                "tenant_id",
                "id",
                "profile_id",
                "message_id",
                "type",
                "name",
                "properties",
                "context",
                "timestamp",
                "received_at",
                "channel",
                "user_id",
                "anonymous_id",
            ])
            .on_conflict(
                OnConflict::columns(["tenant_id", "message_id"])
                    .do_nothing()
                    .to_owned(),
            );
        events
    });
    for message in chunk {
        let person = workload.person(message);
        let properties = JsonText::of(&message.payload);
        let context = JsonText::of(&Workload::context(message));
        let size = properties.bytes()
            + context.bytes()
            + message.message_id.len()
            + person.user_id.len()
            + person.anonymous_id.len()
            + 13 * 20;
        events.push(
            size,
            [
                tenant.into(),
                Uuid::now_v7().into(),
                person.profile_id.into(),
                message.message_id.clone().into(),
                message.kind.as_str().into(),
                message.event.map(str::to_owned).into(),
                properties.into_expr(backend),
                context.into_expr(backend),
                message.timestamp.into(),
                now.into(),
                "server".into(),
                message.with_user_id.then(|| person.user_id.clone()).into(),
                message
                    .with_anonymous_id
                    .then(|| person.anonymous_id.clone())
                    .into(),
            ],
        )?;
    }

    let tx = pool
        .begin_with_options(TransactionOptions {
            isolation_level: None,
            access_mode: None,
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        })
        .await?;
    if set_tenant {
        tx.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT set_config('app.tenant_id', $1, true)",
            [tenant.to_string().into()],
        ))
        .await?;
    }
    for statement in profiles.statements.iter().chain(&events.statements) {
        tx.execute(statement).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Multi-row inserts into one table: a new statement whenever the next row would take the
/// current one past `bound` bytes of values.
struct Bounded<F: Fn() -> InsertStatement> {
    new: F,
    bound: usize,
    bytes: usize,
    statements: Vec<InsertStatement>,
}

impl<F: Fn() -> InsertStatement> Bounded<F> {
    fn new(bound: usize, new: F) -> Self {
        Bounded {
            new,
            bound,
            bytes: 0,
            statements: Vec::new(),
        }
    }

    /// Adds a row of about `size` bytes.
    fn push<const N: usize>(&mut self, size: usize, values: [Expr; N]) -> anyhow::Result<()> {
        let full = self.bytes > 0 && self.bytes.saturating_add(size) > self.bound;
        if self.statements.is_empty() || full {
            self.statements.push((self.new)());
            self.bytes = 0;
        }
        self.bytes = self.bytes.saturating_add(size);
        if let Some(statement) = self.statements.last_mut() {
            statement.values(values)?;
        }
        Ok(())
    }
}
