//! The `read` scenario: the GraphQL read path under load, next to a plain poem JSON handler that
//! answers the same data from the same database in the same process.
//!
//! Seeding goes through the real collection API (`POST /v1/batch` with a server write key): each
//! profile gets one `identify` with ten (non-personal) traits and [`TRACKS`] `track` calls, so it
//! holds 25 events, written, sealed and evaluated as production writes them.
//!
//! Measured, on each backend:
//! - `profile(id)` with its traits and `events(first: 20)`, closed loop (C connections for a
//!   fixed time, each side's time cut into segments run in rounds of plain, GraphQL, GraphQL,
//!   plain: [`closed_pair`]): requests per second of GraphQL against the plain handler (target:
//!   a ratio of at least 0.70);
//! - `profiles(first: 50, after: …)` pages (id, traits, eventCount, lastSeenAt), closed loop, the
//!   same ratio;
//! - `profile(id)` in an open loop at a fixed rate (default 500 requests a second), latency from
//!   each request's scheduled start: p50 and p99 (target: p99 under 10 ms).
//!
//! The plain handler (`GET /plain/profile/{id}`, `GET /plain/profiles?after=`) runs on its own
//! poem server in the bench process and reads with hand-written SQL over its own pool of the
//! same size as the server's (10), connected as the service connects (on PostgreSQL a member of
//! `cdp_app`, `app.tenant_id` set in each transaction, so row-level security applies to both).
//! It does no authentication, no GraphQL and no decryption: what it costs is the floor.
//!
//! Every answer is checked (status, JSON, shape, and GraphQL `errors`); any error fails the run
//! after its line is printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use poem::web::{Data, Json, Path, Query};
use poem::{get, EndpointExt, Route};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, BackendArgs, BenchDb, Loopback, Server};
use crate::load::{self, Figures, Target};

/// Track calls per profile (plus one identify).
const TRACKS: usize = 24;
/// Messages per seeding request.
const BATCH: usize = 100;
const TARGET_RATIO: f64 = 0.70;
const TARGET_P99_MS: f64 = 10.0;

pub const INGEST_SETTINGS: &str = r#"mutation { updateIngestSettings(input: {
    maxMessageBytes: 32768, maxRequestBytes: 4194304, maxBatchMessages: 2500,
    rateLimitPerSecond: 0, defaultRegion: null, blockedIdentityValues: [],
    identityRules: [
      {kind: "user_id", priority: 100, limit: 1},
      {kind: "email", priority: 80, limit: 5},
      {kind: "phone", priority: 70, limit: 5},
      {kind: "anonymous_id", priority: 10, limit: 100}
    ] }) { rateLimitPerSecond } }"#;

pub const PROFILE_QUERY: &str = "query Profile($id: ID!) { profile(id: $id) { id traits \
    firstSeenAt lastSeenAt eventCount events(first: 20) { edges { node { id type name \
    properties timestamp } } } } }";

const PROFILES_QUERY: &str = "query Profiles($after: String) { profiles(first: 50, after: $after) \
    { edges { node { id traits eventCount lastSeenAt } } pageInfo { hasNextPage endCursor } } }";

/// `cdp-bench read`: the GraphQL read path against a plain JSON handler.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    /// Small sizes: 300 profiles, 3 s per measurement.
    #[arg(long)]
    pub quick: bool,
    /// Profiles to seed through the collection API (default 2,000; 300 with --quick).
    #[arg(long, value_name = "N")]
    pub profiles: Option<usize>,
    /// Concurrent connections of the closed loops.
    #[arg(long, value_name = "C", default_value_t = 16)]
    pub connections: usize,
    /// Seconds of each measurement (default 10; 3 with --quick).
    #[arg(long, value_name = "S")]
    pub seconds: Option<u64>,
    /// Requests per second of the open loop.
    #[arg(long, value_name = "R", default_value_t = 500)]
    pub rate: u32,
    #[command(flatten)]
    pub backends: BackendArgs,
}

/// The JSON line of one backend.
#[derive(Debug, Serialize)]
struct ReadResult {
    scenario: &'static str,
    backend: &'static str,
    figure: &'static str,
    value: f64,
    baseline: f64,
    ratio: f64,
    target: String,
    met: bool,
    profiles: usize,
    events_per_profile: usize,
    connections: usize,
    profile: Pair,
    profiles_page: Pair,
    at_rate: AtRate,
    graphql_errors: u64,
    failures: u64,
}

#[derive(Debug, Serialize)]
struct Pair {
    graphql: Figures,
    plain: Figures,
    ratio: f64,
    /// SQL statements the server ran per GraphQL request, authentication included.
    statements_per_request: f64,
}

#[derive(Debug, Serialize)]
struct AtRate {
    rate_per_s: u32,
    graphql: Figures,
    plain: Figures,
    target: String,
    met: bool,
}

pub async fn run(args: ReadArgs) -> anyhow::Result<()> {
    let profiles = args.profiles.unwrap_or(if args.quick { 300 } else { 2000 });
    let seconds = args.seconds.unwrap_or(if args.quick { 3 } else { 10 });
    if profiles == 0 || args.connections == 0 || seconds == 0 || args.rate == 0 {
        bail!("--profiles, --connections, --seconds and --rate must be at least 1");
    }
    let settings = Settings {
        profiles,
        connections: args.connections,
        duration: Duration::from_secs(seconds),
        rate: args.rate,
    };
    for backend in args.backends.backends()? {
        let label = backend.name();
        eprintln!("== {label} ==");
        let db = Arc::new(BenchDb::create(&backend).await?);
        let outcome = tokio::select! {
            outcome = run_on(db.clone(), &settings) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        db.destroy().await;
        let result = outcome.with_context(|| format!("the {label} run failed"))?;
        println!("{}", serde_json::to_string(&result)?);
        if result.graphql_errors > 0 || result.failures > 0 {
            bail!(
                "the {label} run saw {} GraphQL errors and {} failed answers",
                result.graphql_errors,
                result.failures
            );
        }
    }
    Ok(())
}

pub struct Settings {
    profiles: usize,
    connections: usize,
    duration: Duration,
    rate: u32,
}

async fn run_on(db: Arc<BenchDb>, settings: &Settings) -> anyhow::Result<ReadResult> {
    let label = db.backend.name();
    let server = Server::start(&db).await?;
    let owner = server.sign_up("read").await?;
    let key = server.write_key(&owner).await?;
    server
        .graphql(&owner.access_token, INGEST_SETTINGS, json!({}))
        .await
        .context("cannot set the ingestion settings")?;
    let started = Instant::now();
    seed(&server, &key, settings.profiles).await?;
    eprintln!(
        "[{label}] seeded {} profiles with {} events each through POST /v1/batch in {:.1} s",
        settings.profiles,
        TRACKS + 1,
        started.elapsed().as_secs_f64()
    );

    let plain = PlainServer::start(&db, owner.tenant_id).await?;
    let ids = plain.profile_ids().await?;
    if ids.len() != settings.profiles {
        bail!(
            "the tenant holds {} profiles, {} were seeded",
            ids.len(),
            settings.profiles
        );
    }
    let ids = Arc::new(ids);
    let measured = measure(&server, &owner.access_token, &plain, ids, settings, label).await?;
    plain.stop().await;
    server.stop().await?;
    Ok(measured.into_result(label, settings))
}

/// What [`measure`] found.
pub struct Measured {
    pub profile: (load::Outcome, load::Outcome),
    pub page: (load::Outcome, load::Outcome),
    pub at_rate: (load::Outcome, load::Outcome),
    /// Statements the server ran per GraphQL request: profile, page.
    pub statements: (f64, f64),
}

impl Measured {
    fn into_result(self, label: &'static str, settings: &Settings) -> ReadResult {
        let pair = |(graphql, plain): &(load::Outcome, load::Outcome), statements: f64| Pair {
            statements_per_request: statements,
            ratio: harness::round(graphql.per_second() / plain.per_second().max(1e-9), 3),
            graphql: graphql.figures(),
            plain: plain.figures(),
        };
        let profile = pair(&self.profile, self.statements.0);
        let page = pair(&self.page, self.statements.1);
        let at_rate = AtRate {
            rate_per_s: settings.rate,
            graphql: self.at_rate.0.figures(),
            plain: self.at_rate.1.figures(),
            target: format!("graphql p99 < {TARGET_P99_MS} ms"),
            met: self.at_rate.0.quantile_ms(0.99) < TARGET_P99_MS,
        };
        let graphql_errors = self.errors();
        let failures = self.failures();
        ReadResult {
            scenario: "read",
            backend: label,
            figure: "profile(id) requests/s, GraphQL over plain handler",
            value: profile.graphql.per_s,
            baseline: profile.plain.per_s,
            ratio: profile.ratio,
            target: format!(
                "ratio >= {TARGET_RATIO} (profile and page) and p99 < {TARGET_P99_MS} ms at {} requests/s",
                settings.rate
            ),
            met: profile.ratio >= TARGET_RATIO && page.ratio >= TARGET_RATIO && at_rate.met,
            profiles: settings.profiles,
            events_per_profile: TRACKS + 1,
            connections: settings.connections,
            profile,
            profiles_page: page,
            at_rate,
            graphql_errors,
            failures,
        }
    }

    fn outcomes(&self) -> Vec<&load::Outcome> {
        vec![
            &self.profile.0,
            &self.profile.1,
            &self.page.0,
            &self.page.1,
            &self.at_rate.0,
            &self.at_rate.1,
        ]
    }

    pub fn errors(&self) -> u64 {
        self.outcomes().iter().map(|o| o.graphql_errors).sum()
    }

    pub fn failures(&self) -> u64 {
        self.outcomes().iter().map(|o| o.failures).sum()
    }
}

/// Runs the three measurements; `ids` are the profiles to read (pages start at every 50th).
pub async fn measure(
    server: &Server,
    token: &str,
    plain: &PlainServer,
    ids: Arc<Vec<Uuid>>,
    settings: &Settings,
    label: &str,
) -> anyhow::Result<Measured> {
    let graphql_profile = graphql_profile_target(server, token, ids.clone(), 20);
    let plain_profile = plain.profile_target(ids.clone());

    let timed = |what: &str, outcome: &load::Outcome| {
        eprintln!(
            "[{label}] {what}: {} requests, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} GraphQL errors, {} failures{}",
            outcome.requests,
            outcome.per_second(),
            outcome.quantile_ms(0.5),
            outcome.quantile_ms(0.99),
            outcome.graphql_errors,
            outcome.failures,
            outcome
                .first_failure
                .as_deref()
                .map(|reason| format!(" (first: {reason})"))
                .unwrap_or_default()
        );
    };

    let c = settings.connections;
    let store = &server.app.state().store;
    let (graphql_closed, plain_closed, statements) = closed_pair(
        &graphql_profile,
        &plain_profile,
        c,
        settings.duration,
        store,
        label,
    )
    .await;
    let profile_statements = per_request(statements, &graphql_closed);
    timed("plain profile, closed loop", &plain_closed);
    timed("GraphQL profile, closed loop", &graphql_closed);

    let starts: Vec<Uuid> = ids.iter().step_by(50).copied().collect();
    let starts = Arc::new(starts);
    let (graphql_pages, plain_pages, statements) = closed_pair(
        &graphql_page_target(server, token, starts.clone()),
        &plain.page_target(starts.clone()),
        c,
        settings.duration,
        store,
        label,
    )
    .await;
    let page_statements = per_request(statements, &graphql_pages);
    timed("plain profiles page, closed loop", &plain_pages);
    timed("GraphQL profiles page, closed loop", &graphql_pages);
    eprintln!(
        "[{label}] statements per GraphQL request (authentication included): profile {profile_statements}, page {page_statements}"
    );

    let plain_open = load::open(&plain_profile, settings.rate, settings.duration).await;
    timed("plain profile, open loop", &plain_open);
    let graphql_open = load::open(&graphql_profile, settings.rate, settings.duration).await;
    timed("GraphQL profile, open loop", &graphql_open);

    Ok(Measured {
        profile: (graphql_closed, plain_closed),
        page: (graphql_pages, plain_pages),
        at_rate: (graphql_open, plain_open),
        statements: (profile_statements, page_statements),
    })
}

/// Rounds of [`closed_pair`]: each side's measurement is cut into `2 * ROUNDS` segments.
const ROUNDS: u32 = 4;

/// Closed loops of GraphQL and of the plain handler, each `duration` long in all, run in
/// [`ROUNDS`] rounds of plain, GraphQL, GraphQL, plain: a machine that speeds up or slows down
/// during the measurement (another process's work, a neighbour on the host, a cache warming)
/// weighs on both sides alike instead of on whichever ran at that moment. Returns (GraphQL,
/// plain, statements the server ran during the GraphQL segments).
async fn closed_pair(
    graphql: &Target,
    plain: &Target,
    connections: usize,
    duration: Duration,
    store: &api::store::Store,
    label: &str,
) -> (load::Outcome, load::Outcome, u64) {
    let segment = duration / (2 * ROUNDS);
    let (mut graphql_all, mut plain_all) = (load::Outcome::default(), load::Outcome::default());
    let mut statements = 0;
    let mut rates = Vec::new();
    // For profiling one side alone (`perf` attached to the process): `CDP_BENCH_READ_SIDE=graphql`
    // or `plain` runs only that side's segments; the other's figures are then empty.
    let side = std::env::var("CDP_BENCH_READ_SIDE").unwrap_or_default();
    let plain = (side != "graphql").then_some(plain);
    let graphql = (side != "plain").then_some(graphql);
    for _ in 0..ROUNDS {
        let plain_first = closed_if(plain, connections, segment).await;
        let before = store.statements_executed();
        let graphql_first = closed_if(graphql, connections, segment).await;
        let graphql_second = closed_if(graphql, connections, segment).await;
        statements += store.statements_executed() - before;
        let plain_second = closed_if(plain, connections, segment).await;
        rates.push(format!(
            "{:.0}/{:.0}/{:.0}/{:.0}",
            plain_first.per_second(),
            graphql_first.per_second(),
            graphql_second.per_second(),
            plain_second.per_second()
        ));
        graphql_all = graphql_all.joined(graphql_first).joined(graphql_second);
        plain_all = plain_all.joined(plain_first).joined(plain_second);
    }
    eprintln!(
        "[{label}] rounds, requests/s plain/GraphQL/GraphQL/plain: {}",
        rates.join(", ")
    );
    (graphql_all, plain_all, statements)
}

/// A closed loop of `target`, or an empty outcome without one.
async fn closed_if(
    target: Option<&Target>,
    connections: usize,
    duration: Duration,
) -> load::Outcome {
    match target {
        Some(target) => load::closed(target, connections, duration).await,
        None => load::Outcome::default(),
    }
}

/// Statements the server ran per request of a closed loop (its warm-up requests included).
fn per_request(statements: u64, outcome: &load::Outcome) -> f64 {
    let requests = outcome.requests + outcome.warmups;
    harness::round(statements as f64 / requests.max(1) as f64, 1)
}

/// The `n`-th id of a run: a fixed pseudo-random walk over the list.
fn pick(ids: &[Uuid], n: u64) -> Uuid {
    ids[((n.wrapping_mul(7919) + n / 3) % ids.len() as u64) as usize]
}

/// `profile(id)` with its traits and `events(first: 20)`; an answer must hold the profile with
/// `min_events` events (at most 20).
pub fn graphql_profile_target(
    server: &Server,
    token: &str,
    ids: Arc<Vec<Uuid>>,
    min_events: usize,
) -> Target {
    let url = server.url("/graphql");
    let token = token.to_owned();
    Target {
        make: Arc::new(move |client, n| {
            client.post(&url).bearer_auth(&token).json(
                &json!({"query": PROFILE_QUERY, "variables": {"id": pick(&ids, n).to_string()}}),
            )
        }),
        check: Arc::new(move |body| {
            let profile = body
                .pointer("/data/profile")
                .filter(|profile| !profile.is_null())
                .ok_or("no profile in the answer")?;
            let events = profile
                .pointer("/events/edges")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            if events < min_events.min(20) || events > 20 {
                return Err(format!("{events} events in the answer"));
            }
            Ok(())
        }),
    }
}

fn graphql_page_target(server: &Server, token: &str, starts: Arc<Vec<Uuid>>) -> Target {
    let url = server.url("/graphql");
    let token = token.to_owned();
    Target {
        make: Arc::new(move |client, n| {
            // The first page has no cursor; the others start after a profile id.
            let index = (n % starts.len() as u64) as usize;
            let after =
                (index > 0).then(|| api::service::pagination::encode_cursor(starts[index - 1]));
            client
                .post(&url)
                .bearer_auth(&token)
                .json(&json!({"query": PROFILES_QUERY, "variables": {"after": after}}))
        }),
        check: Arc::new(|body| {
            let edges = body
                .pointer("/data/profiles/edges")
                .and_then(Value::as_array)
                .ok_or("no profiles in the answer")?;
            if edges.is_empty() || edges.len() > 50 {
                return Err(format!("{} profiles in a page", edges.len()));
            }
            Ok(())
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Seeding.

/// One identify with ten traits and [`TRACKS`] track calls per profile, 100 messages a request,
/// from 8 concurrent clients.
async fn seed(server: &Server, key: &str, profiles: usize) -> anyhow::Result<()> {
    let base = Utc::now() - chrono::Duration::days(30);
    let mut messages = Vec::with_capacity(profiles * (TRACKS + 1));
    for person in 0..profiles {
        messages.extend(person_messages(person, base));
    }
    let bodies: Vec<Vec<u8>> = messages
        .chunks(BATCH)
        .map(|chunk| serde_json::to_vec(&json!({ "batch": chunk })))
        .collect::<Result<_, _>>()?;
    post_bodies(server, key, bodies, 8).await
}

/// The messages of person `n`: an identify with ten traits, then track calls an hour apart.
pub fn person_messages(n: usize, base: DateTime<Utc>) -> Vec<Value> {
    const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
    const COUNTRIES: [&str; 6] = ["US", "DE", "FR", "GB", "ES", "IT"];
    const EVENTS: [&str; 4] = [
        "Page Viewed",
        "Product Viewed",
        "Product Added",
        "Order Completed",
    ];
    let user_id = format!("reader-{n}");
    let mut messages = Vec::with_capacity(TRACKS + 1);
    messages.push(json!({
        "type": "identify",
        "userId": user_id,
        "messageId": format!("read-{n}-identify"),
        "timestamp": base.to_rfc3339(),
        "traits": {
            "plan": PLANS[n % 3],
            "country": COUNTRIES[n % 6],
            "company": format!("Company {}", n % 97),
            "industry": "retail",
            "score": n % 100,
            "lifetime_value": (n % 1000) as f64 * 1.5,
            "signup_source": "bench",
            "language": "en",
            "timezone": "Europe/Berlin",
            "newsletter": n.is_multiple_of(2),
        },
    }));
    for k in 0..TRACKS {
        messages.push(json!({
            "type": "track",
            "userId": user_id,
            "event": EVENTS[k % 4],
            "messageId": format!("read-{n}-{k}"),
            "timestamp": (base + chrono::Duration::hours(k as i64 + 1)).to_rfc3339(),
            "properties": {"path": format!("/page/{k}"), "step": k, "sku": format!("SKU-{}", (n + k) % 200)},
        }));
    }
    messages
}

/// Posts every body from `concurrency` clients; every answer must be `200 {"success":true}`.
pub async fn post_bodies(
    server: &Server,
    key: &str,
    bodies: Vec<Vec<u8>>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let bodies = Arc::new(bodies);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, key) = (
            server.client.clone(),
            server.url("/v1/batch"),
            key.to_owned(),
        );
        let (bodies, next) = (bodies.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while let Some(body) =
                bodies.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                let response = client
                    .post(&url)
                    .basic_auth(&key, Some(""))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = response.status();
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                if status != reqwest::StatusCode::OK || answer != json!({"success": true}) {
                    bail!("a seeding batch was refused: {status} {answer}");
                }
            }
            anyhow::Ok(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The plain handler.

/// A poem server in the bench process answering the same reads with hand-written SQL.
pub struct PlainServer {
    base: String,
    state: PlainState,
    server: Loopback,
}

#[derive(Clone)]
struct PlainState {
    pool: DatabaseConnection,
    tenant: Uuid,
}

impl PlainServer {
    /// Starts it on a free loopback port with a pool of 10 on the service's URL.
    pub async fn start(db: &BenchDb, tenant: Uuid) -> anyhow::Result<PlainServer> {
        let pool = harness::service_pool(db, 10)
            .await
            .context("the plain handler cannot connect")?;
        let state = PlainState { pool, tenant };
        let app = Route::new()
            .at("/plain/profile/:id", get(plain_profile_handler))
            .at("/plain/profiles", get(plain_profiles_handler))
            .data(state.clone());
        let server = Loopback::start(app).await?;
        Ok(PlainServer {
            base: format!("http://{}", server.address),
            state,
            server,
        })
    }

    pub async fn stop(self) {
        self.server.stop().await;
        let _ = self.state.pool.close().await;
    }

    /// The tenant's live profiles, in id order.
    pub async fn profile_ids(&self) -> anyhow::Result<Vec<Uuid>> {
        let tx = self.state.begin().await?;
        let rows = tx
            .query_all_raw(Statement::from_sql_and_values(
                tx.get_database_backend(),
                "SELECT id FROM profiles WHERE tenant_id = $1 AND merged_into IS NULL ORDER BY id",
                [self.state.tenant.into()],
            ))
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| Ok(row.try_get_by_index::<Uuid>(0)?))
            .collect()
    }

    pub fn profile_target(&self, ids: Arc<Vec<Uuid>>) -> Target {
        let base = self.base.clone();
        Target {
            make: Arc::new(move |client, n| {
                client.get(format!("{base}/plain/profile/{}", pick(&ids, n)))
            }),
            check: Arc::new(|body| {
                let events = body
                    .pointer("/profile/events")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                if events != 20 {
                    return Err(format!("{events} events in the plain answer"));
                }
                Ok(())
            }),
        }
    }

    fn page_target(&self, starts: Arc<Vec<Uuid>>) -> Target {
        let base = self.base.clone();
        Target {
            make: Arc::new(move |client, n| {
                let index = (n % starts.len() as u64) as usize;
                let url = match index {
                    0 => format!("{base}/plain/profiles"),
                    _ => format!("{base}/plain/profiles?after={}", starts[index - 1]),
                };
                client.get(url)
            }),
            check: Arc::new(|body| {
                let edges = body
                    .pointer("/profiles/edges")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                if edges == 0 || edges > 50 {
                    return Err(format!("{edges} profiles in a plain page"));
                }
                Ok(())
            }),
        }
    }
}

impl PlainState {
    /// A read transaction bound to the tenant, as the store binds its own.
    async fn begin(&self) -> Result<sea_orm::DatabaseTransaction, sea_orm::DbErr> {
        let tx = self.pool.begin().await?;
        if self.pool.get_database_backend() == DbBackend::Postgres {
            tx.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT set_config('app.tenant_id', $1, true)",
                [self.tenant.to_string().into()],
            ))
            .await?;
        }
        Ok(tx)
    }
}

fn internal(error: impl std::fmt::Display) -> poem::Error {
    poem::Error::from_string(
        error.to_string(),
        poem::http::StatusCode::INTERNAL_SERVER_ERROR,
    )
}

#[poem::handler]
async fn plain_profile_handler(
    Path(id): Path<Uuid>,
    Data(state): Data<&PlainState>,
) -> poem::Result<Json<Value>> {
    let tx = state.begin().await.map_err(internal)?;
    let backend = tx.get_database_backend();
    let row = tx
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            "SELECT id, traits, first_seen_at, last_seen_at, event_count FROM profiles \
             WHERE tenant_id = $1 AND id = $2",
            [state.tenant.into(), id.into()],
        ))
        .await
        .map_err(internal)?;
    let Some(row) = row else {
        return Ok(Json(json!({ "profile": null })));
    };
    let events = tx
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            "SELECT id, type, name, properties, \"timestamp\" FROM events \
             WHERE tenant_id = $1 AND profile_id = $2 ORDER BY \"timestamp\" DESC, id DESC LIMIT 20",
            [state.tenant.into(), id.into()],
        ))
        .await
        .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    let events = events
        .iter()
        .map(|event| {
            Ok(json!({
                "id": event.try_get_by_index::<Uuid>(0)?,
                "type": event.try_get_by_index::<String>(1)?,
                "name": event.try_get_by_index::<Option<String>>(2)?,
                "properties": event.try_get_by_index::<Value>(3)?,
                "timestamp": event.try_get_by_index::<DateTime<Utc>>(4)?,
            }))
        })
        .collect::<Result<Vec<Value>, sea_orm::DbErr>>()
        .map_err(internal)?;
    let profile = (|| {
        Ok::<_, sea_orm::DbErr>(json!({
            "id": row.try_get_by_index::<Uuid>(0)?,
            "traits": row.try_get_by_index::<Value>(1)?,
            "firstSeenAt": row.try_get_by_index::<DateTime<Utc>>(2)?,
            "lastSeenAt": row.try_get_by_index::<DateTime<Utc>>(3)?,
            "eventCount": row.try_get_by_index::<i64>(4)?,
            "events": events,
        }))
    })()
    .map_err(internal)?;
    Ok(Json(json!({ "profile": profile })))
}

#[derive(Deserialize)]
struct PageQuery {
    after: Option<Uuid>,
}

#[poem::handler]
async fn plain_profiles_handler(
    Query(page): Query<PageQuery>,
    Data(state): Data<&PlainState>,
) -> poem::Result<Json<Value>> {
    let tx = state.begin().await.map_err(internal)?;
    let backend = tx.get_database_backend();
    let after = page.after.unwrap_or(Uuid::nil());
    let rows = tx
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            "SELECT id, traits, event_count, last_seen_at FROM profiles \
             WHERE tenant_id = $1 AND merged_into IS NULL AND id > $2 ORDER BY id LIMIT 51",
            [state.tenant.into(), after.into()],
        ))
        .await
        .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    let has_next_page = rows.len() > 50;
    let edges = rows
        .iter()
        .take(50)
        .map(|row| {
            Ok(json!({ "node": {
                "id": row.try_get_by_index::<Uuid>(0)?,
                "traits": row.try_get_by_index::<Value>(1)?,
                "eventCount": row.try_get_by_index::<i64>(2)?,
                "lastSeenAt": row.try_get_by_index::<DateTime<Utc>>(3)?,
            }}))
        })
        .collect::<Result<Vec<Value>, sea_orm::DbErr>>()
        .map_err(internal)?;
    let end_cursor = edges.last().map(|edge| edge["node"]["id"].clone());
    Ok(Json(json!({ "profiles": {
        "edges": edges,
        "pageInfo": { "hasNextPage": has_next_page, "endCursor": end_cursor },
    }})))
}
