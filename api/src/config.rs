//! Configuration from the environment. Every variable has a working default, so that a plain
//! `cargo run` serves on SQLite in `./data`; secrets that are not given are generated on first
//! start and kept in the data directory, with a warning.
//!
//! Guarantees: a value that is set but invalid stops the start with a message naming the variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use rand::RngCore;

/// Which browser origins may call `/graphql`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// Same origin only: no CORS headers are sent.
    None,
    Any,
    List(Vec<String>),
}

/// Limits that protect the GraphQL endpoint.
#[derive(Debug, Clone)]
pub struct GraphqlLimits {
    /// Deepest allowed selection nesting (`CDP_GRAPHQL_MAX_DEPTH`, default 16).
    pub max_depth: usize,
    /// Highest allowed query complexity (`CDP_GRAPHQL_MAX_COMPLEXITY`, default 5000).
    pub max_complexity: usize,
    /// Largest accepted request body in bytes (`CDP_GRAPHQL_MAX_BODY_BYTES`, default 1 MiB).
    pub max_body_bytes: usize,
    /// Most operations in one batched request (`CDP_GRAPHQL_MAX_BATCH`, default 10).
    pub max_batch: usize,
    /// Automatic persisted queries remembered per process (`CDP_GRAPHQL_APQ_CAPACITY`, default
    /// 1000; 0 turns them off).
    pub apq_capacity: usize,
    /// `Cache-Control: private, max-age=…` of a successful GET query
    /// (`CDP_GRAPHQL_GET_MAX_AGE_SECS`, default 5; 0: `no-cache`).
    pub get_max_age: Duration,
    /// Whether the hottest read shapes are answered by compiled plans instead of the schema's
    /// executor (`CDP_GRAPHQL_COMPILED_PLANS`, default true; ADR 0016).
    pub compiled_plans: bool,
}

/// Protections against abuse (`docs/configuration.md`, "Abuse limits"): request rates per client
/// address and per tenant, the password hashing slots, request timeouts, the WebSocket message
/// size, per-operation field limits, and whether the schema explains itself to strangers.
#[derive(Debug, Clone)]
pub struct AbuseLimits {
    /// GraphQL operations per minute from one client address: each operation of an HTTP request
    /// and each WebSocket connect (`CDP_RATE_LIMIT_GRAPHQL_PER_IP`, default 1200; 0: no limit).
    pub graphql_per_ip_per_minute: u32,
    /// GraphQL operations per minute of one tenant, from its principal: each operation of an HTTP
    /// request, each `connection_init` and each operation over a WebSocket
    /// (`CDP_RATE_LIMIT_GRAPHQL_PER_TENANT`, default 6000; 0: no limit).
    pub graphql_per_tenant_per_minute: u32,
    /// Collection API requests per minute from one client address, counted before the write key
    /// is checked (`CDP_RATE_LIMIT_INGEST_PER_IP`, default 12000; 0: no limit).
    pub ingest_per_ip_per_minute: u32,
    /// How many seconds' worth of each rate may be spent at once (`CDP_RATE_LIMIT_BURST_SECS`,
    /// default 10; at least one request).
    pub burst_secs: u32,
    /// Proxies whose `X-Forwarded-For` is believed (`CDP_TRUSTED_PROXIES`: addresses or CIDR
    /// blocks, comma-separated; default none, so the client is the peer address).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Password hashes (argon2id) computed at once (`CDP_PASSWORD_HASH_CONCURRENCY`; default 0,
    /// which means one per CPU core).
    pub password_hash_concurrency: usize,
    /// Logins, activations and resets that may wait for a hashing slot; more are refused at once
    /// with RATE_LIMITED (`CDP_PASSWORD_HASH_QUEUE`, default 256).
    pub password_hash_queue: usize,
    /// How long an HTTP request may take before it is stopped with 503; WebSocket connections
    /// are not limited (`CDP_REQUEST_TIMEOUT_SECS`, default 30; 0: no limit).
    pub request_timeout: Duration,
    /// Largest WebSocket message (and frame) a client may send on `/graphql/ws`; a larger one
    /// closes the socket with 1009 (`CDP_WS_MAX_MESSAGE_BYTES`, default 65536).
    pub ws_max_message_bytes: usize,
    /// Most root fields (aliases included) in one GraphQL operation
    /// (`CDP_GRAPHQL_MAX_ROOT_FIELDS`, default 30).
    pub graphql_max_root_fields: usize,
    /// Most account mutations that need no principal (`signUp`, `activateAccount`, `login`,
    /// `refreshSession`, `requestPasswordReset`, `resetPassword`) in one operation, and in one
    /// batched request (`CDP_GRAPHQL_MAX_ACCOUNT_FIELDS`, default 1).
    pub graphql_max_account_fields: usize,
    /// Whether `__schema` and `__type` are answered (`CDP_GRAPHQL_INTROSPECTION`, default true).
    pub graphql_introspection: bool,
    /// Whether errors suggest similar names ("Did you mean …?") (`CDP_GRAPHQL_SUGGESTIONS`,
    /// default true).
    pub graphql_suggestions: bool,
}

impl AbuseLimits {
    fn from_env() -> anyhow::Result<AbuseLimits> {
        Ok(AbuseLimits {
            graphql_per_ip_per_minute: parse_var("CDP_RATE_LIMIT_GRAPHQL_PER_IP", "1200")?,
            graphql_per_tenant_per_minute: parse_var("CDP_RATE_LIMIT_GRAPHQL_PER_TENANT", "6000")?,
            ingest_per_ip_per_minute: parse_var("CDP_RATE_LIMIT_INGEST_PER_IP", "12000")?,
            burst_secs: parse_var("CDP_RATE_LIMIT_BURST_SECS", "10")?,
            trusted_proxies: parse_networks(
                "CDP_TRUSTED_PROXIES",
                var("CDP_TRUSTED_PROXIES").as_deref().unwrap_or(""),
            )?,
            password_hash_concurrency: parse_var("CDP_PASSWORD_HASH_CONCURRENCY", "0")?,
            password_hash_queue: parse_var("CDP_PASSWORD_HASH_QUEUE", "256")?,
            request_timeout: Duration::from_secs(parse_var("CDP_REQUEST_TIMEOUT_SECS", "30")?),
            ws_max_message_bytes: parse_var("CDP_WS_MAX_MESSAGE_BYTES", "65536")?,
            graphql_max_root_fields: parse_var("CDP_GRAPHQL_MAX_ROOT_FIELDS", "30")?,
            graphql_max_account_fields: parse_var("CDP_GRAPHQL_MAX_ACCOUNT_FIELDS", "1")?,
            graphql_introspection: parse_var("CDP_GRAPHQL_INTROSPECTION", "true")?,
            graphql_suggestions: parse_var("CDP_GRAPHQL_SUGGESTIONS", "true")?,
        })
    }

    /// The limits of `Config::for_tests`: production's, except that the rate limits are off
    /// (tests send many requests from one address; `tests/suite/abuse.rs` turns them on) and the
    /// request timeout is long enough for slow test machines.
    fn for_tests() -> AbuseLimits {
        AbuseLimits {
            graphql_per_ip_per_minute: 0,
            graphql_per_tenant_per_minute: 0,
            ingest_per_ip_per_minute: 0,
            burst_secs: 10,
            trusted_proxies: Vec::new(),
            password_hash_concurrency: 0,
            password_hash_queue: 256,
            request_timeout: Duration::from_secs(120),
            ws_max_message_bytes: 65536,
            graphql_max_root_fields: 30,
            graphql_max_account_fields: 1,
            graphql_introspection: true,
            graphql_suggestions: true,
        }
    }
}

/// The PEM files the HTTP listener serves TLS with (`CDP_TLS_CERT`, `CDP_TLS_KEY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate, followed by any intermediate certificates.
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The whole configuration of one process.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub database_max_connections: u32,
    /// Connections the pool opens at start and keeps (`CDP_DATABASE_MIN_CONNECTIONS`, by
    /// default the pool's size).
    pub database_min_connections: u32,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// HTTPS and WSS on the listener when set; plain HTTP otherwise (behind a TLS-terminating
    /// proxy, for example).
    pub tls: Option<TlsFiles>,
    /// The address people and mail links use to reach the service, without a trailing slash.
    pub public_url: String,
    pub jwt_secret: Vec<u8>,
    pub encryption_key: [u8; 32],
    /// Earlier master keys (`CDP_ENCRYPTION_KEY_PREVIOUS`, comma-separated base64), accepted for
    /// unwrapping tenant keys while a master-key rotation is under way.
    pub encryption_keys_previous: Vec<[u8; 32]>,
    pub smtp_url: Option<String>,
    /// A PEM file of CA certificates that SMTP servers' certificates may chain to, besides the
    /// public roots (`CDP_SMTP_CA_CERT`): for a relay with a private CA.
    pub smtp_ca_cert: Option<PathBuf>,
    pub mail_from: String,
    pub cors_origins: CorsOrigins,
    pub log_filter: String,
    pub log_json: bool,
    pub graphql: GraphqlLimits,
    /// Hard cap on a collection API body, compressed or not (`CDP_INGEST_MAX_BODY_BYTES`, default
    /// 16 MiB). Each tenant's own limit (4 MB by default) applies below it.
    pub ingest_max_body_bytes: usize,
    /// Whether a tenant's concurrent ingestion requests are written in one transaction by one
    /// writer task (`CDP_INGEST_GROUP_COMMIT` = on | off | auto). `None` is auto: on for SQLite,
    /// which has one writer at a time anyway, off for PostgreSQL, where concurrent transactions
    /// use more cores (measured in docs/PERFORMANCE.md).
    pub ingest_group_commit: Option<bool>,
    /// Writer tasks per tenant and process when group commit is on (`CDP_INGEST_WRITERS`); each
    /// groups what reaches it, and they write concurrently.
    pub ingest_writers_per_tenant: usize,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    pub activation_token_ttl: Duration,
    pub reset_token_ttl: Duration,
    /// Failed logins for one account within `login_throttle_window` before further attempts are
    /// refused with RATE_LIMITED.
    pub login_max_failures: u32,
    pub login_throttle_window: Duration,
    /// Outbox workers in this process; 0 disables sending (another process sends).
    pub outbox_workers: usize,
    pub outbox_poll_interval: Duration,
    pub outbox_max_attempts: i32,
    /// How long a claimed email stays claimed before another worker may retry it.
    pub outbox_lease: Duration,
    /// First retry delay; doubles with each attempt, with jitter.
    pub outbox_backoff_base: Duration,
    /// How often the scheduler re-evaluates time-dependent segments and stages and recomputes
    /// customer attributes; zero turns the scheduler off in this process.
    pub scheduler_tick: Duration,
    /// Profiles the scheduler changes per transaction.
    pub scheduler_batch: u64,
    /// The platform-wide longest retention of events in days (`CDP_EVENTS_RETENTION_DAYS`;
    /// unset keeps events forever). With a partitioned events table the scheduler drops each
    /// partition whose whole range is older than this; tenants' own `eventRetentionDays` keep
    /// deleting rows for tenants that retain less.
    pub events_retention_days: Option<u32>,
    /// How long `createSegment`/`updateSegment` wait for the build before answering with the
    /// segment still building (the build goes on).
    pub segment_build_wait: Duration,
    /// Authenticated `/graphql/ws` sockets per tenant in this process; more are refused.
    pub ws_max_sockets_per_tenant: usize,
    /// Active subscriptions per tenant in this process, over all its sockets; more are refused.
    pub ws_max_subscriptions_per_tenant: usize,
    /// Webhook workers in this process; 0 disables webhook sending (another process sends).
    pub webhook_workers: usize,
    pub webhook_poll_interval: Duration,
    /// Attempts of one webhook delivery before it is FAILED.
    pub webhook_max_attempts: i32,
    /// First retry delay of a webhook delivery; doubles with each attempt, with jitter.
    pub webhook_backoff_base: Duration,
    /// How long one webhook request may take.
    pub webhook_timeout: Duration,
    /// Accept `http://` webhook URLs to localhost and 127.0.0.1 (development and tests only).
    pub webhook_allow_http: bool,
    pub abuse: AbuseLimits,
    /// With a value, `/metrics` answers only `Authorization: Bearer <value>`.
    pub metrics_token: Option<String>,
    /// After SIGTERM: how long readiness answers 503 while requests are still served, so that
    /// load balancers stop routing to the process before it stops accepting.
    pub drain_delay: Duration,
    /// After that: how long in-flight requests, the email being sent and open WebSockets get to
    /// finish before the process exits anyway.
    pub shutdown_timeout: Duration,
}

impl Config {
    /// Reads the configuration from the environment, creating the data directory and any missing
    /// generated secret.
    pub fn from_env() -> anyhow::Result<Config> {
        let data_dir = PathBuf::from(var("CDP_DATA_DIR").unwrap_or_else(|| "./data".to_owned()));
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("CDP_DATA_DIR: cannot create {}", data_dir.display()))?;
        let listen: SocketAddr = parse_var("CDP_LISTEN", "127.0.0.1:8080")?;
        let tls = tls_files(var("CDP_TLS_CERT"), var("CDP_TLS_KEY"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let public_url = var("CDP_PUBLIC_URL")
            .unwrap_or_else(|| format!("{scheme}://{listen}"))
            .trim_end_matches('/')
            .to_owned();
        let database_url = var("CDP_DATABASE_URL").unwrap_or_else(|| default_sqlite_url(&data_dir));
        let jwt_secret = match var("CDP_JWT_SECRET") {
            Some(secret) if secret.len() < 32 => {
                bail!("CDP_JWT_SECRET must be at least 32 characters long")
            }
            Some(secret) => secret.into_bytes(),
            None => generated_secret(&data_dir, "jwt-secret", 64)?,
        };
        let encryption_key = match var("CDP_ENCRYPTION_KEY") {
            Some(key) => decode_key(&key).context("CDP_ENCRYPTION_KEY")?,
            None => {
                let bytes = generated_secret(&data_dir, "encryption-key", 32)?;
                let mut key = [0u8; 32];
                key.copy_from_slice(&bytes);
                key
            }
        };
        let encryption_keys_previous = match var("CDP_ENCRYPTION_KEY_PREVIOUS") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(decode_key)
                .collect::<anyhow::Result<Vec<_>>>()
                .context("CDP_ENCRYPTION_KEY_PREVIOUS")?,
        };
        let cors_origins = match var("CDP_CORS_ORIGINS") {
            None => CorsOrigins::None,
            Some(value) if value.trim() == "*" => CorsOrigins::Any,
            Some(value) => CorsOrigins::List(
                value
                    .split(',')
                    .map(|origin| origin.trim().trim_end_matches('/').to_owned())
                    .filter(|origin| !origin.is_empty())
                    .collect(),
            ),
        };
        let smtp_url = var("CDP_SMTP_URL");
        if let Some(url) = &smtp_url {
            crate::mail::parse_smtp_url(url).context("CDP_SMTP_URL")?;
        }
        let smtp_ca_cert = var("CDP_SMTP_CA_CERT").map(PathBuf::from);
        if let Some(path) = &smtp_ca_cert {
            crate::mail::read_ca_certificates(path).context("CDP_SMTP_CA_CERT")?;
        }
        let database_max_connections: u32 = parse_var("CDP_DATABASE_MAX_CONNECTIONS", "10")?;
        let database_min_connections = min_connections(
            database_max_connections,
            var("CDP_DATABASE_MIN_CONNECTIONS")
                .map(|_| parse_var::<u32>("CDP_DATABASE_MIN_CONNECTIONS", ""))
                .transpose()?,
        )?;
        Ok(Config {
            database_url,
            database_max_connections,
            database_min_connections,
            events_retention_days: var("CDP_EVENTS_RETENTION_DAYS")
                .map(|_| parse_var::<u32>("CDP_EVENTS_RETENTION_DAYS", ""))
                .transpose()?,
            data_dir,
            listen,
            tls,
            public_url,
            jwt_secret,
            encryption_key,
            encryption_keys_previous,
            smtp_url,
            smtp_ca_cert,
            mail_from: var("CDP_MAIL_FROM")
                .unwrap_or_else(|| "CDP <no-reply@localhost>".to_owned()),
            cors_origins,
            log_filter: var("CDP_LOG").unwrap_or_else(|| "info".to_owned()),
            log_json: var("CDP_LOG_FORMAT").is_some_and(|format| format == "json"),
            graphql: GraphqlLimits {
                max_depth: parse_var("CDP_GRAPHQL_MAX_DEPTH", "16")?,
                max_complexity: parse_var("CDP_GRAPHQL_MAX_COMPLEXITY", "5000")?,
                max_body_bytes: parse_var("CDP_GRAPHQL_MAX_BODY_BYTES", "1048576")?,
                max_batch: parse_var("CDP_GRAPHQL_MAX_BATCH", "10")?,
                apq_capacity: parse_var("CDP_GRAPHQL_APQ_CAPACITY", "1000")?,
                get_max_age: Duration::from_secs(parse_var("CDP_GRAPHQL_GET_MAX_AGE_SECS", "5")?),
                compiled_plans: parse_var("CDP_GRAPHQL_COMPILED_PLANS", "true")?,
            },
            ingest_max_body_bytes: parse_var("CDP_INGEST_MAX_BODY_BYTES", "16777216")?,
            ingest_group_commit: match var("CDP_INGEST_GROUP_COMMIT").as_deref() {
                None | Some("auto") => None,
                Some("on") => Some(true),
                Some("off") => Some(false),
                Some(other) => {
                    anyhow::bail!("CDP_INGEST_GROUP_COMMIT must be on, off or auto, not {other:?}")
                }
            },
            ingest_writers_per_tenant: parse_var("CDP_INGEST_WRITERS", "1")?,
            access_token_ttl: Duration::from_secs(parse_var("CDP_ACCESS_TOKEN_TTL_SECS", "900")?),
            refresh_token_ttl: Duration::from_secs(parse_var(
                "CDP_REFRESH_TOKEN_TTL_SECS",
                "2592000",
            )?),
            activation_token_ttl: Duration::from_secs(parse_var(
                "CDP_ACTIVATION_TOKEN_TTL_SECS",
                "259200",
            )?),
            reset_token_ttl: Duration::from_secs(parse_var("CDP_RESET_TOKEN_TTL_SECS", "3600")?),
            login_max_failures: parse_var("CDP_LOGIN_MAX_FAILURES", "5")?,
            login_throttle_window: Duration::from_secs(parse_var(
                "CDP_LOGIN_THROTTLE_WINDOW_SECS",
                "900",
            )?),
            outbox_workers: parse_var("CDP_OUTBOX_WORKERS", "1")?,
            outbox_poll_interval: Duration::from_millis(parse_var("CDP_OUTBOX_POLL_MS", "1000")?),
            outbox_max_attempts: parse_var("CDP_OUTBOX_MAX_ATTEMPTS", "8")?,
            outbox_lease: Duration::from_secs(parse_var("CDP_OUTBOX_LEASE_SECS", "120")?),
            outbox_backoff_base: Duration::from_millis(parse_var(
                "CDP_OUTBOX_BACKOFF_MS",
                "30000",
            )?),
            scheduler_tick: Duration::from_secs(parse_var("CDP_SCHEDULER_TICK_SECS", "300")?),
            scheduler_batch: parse_var("CDP_SCHEDULER_BATCH", "500")?,
            segment_build_wait: Duration::from_secs(parse_var(
                "CDP_SEGMENT_BUILD_WAIT_SECS",
                "10",
            )?),
            ws_max_sockets_per_tenant: parse_var("CDP_WS_MAX_SOCKETS_PER_TENANT", "1000")?,
            ws_max_subscriptions_per_tenant: parse_var(
                "CDP_WS_MAX_SUBSCRIPTIONS_PER_TENANT",
                "5000",
            )?,
            webhook_workers: parse_var("CDP_WEBHOOK_WORKERS", "1")?,
            webhook_poll_interval: Duration::from_millis(parse_var("CDP_WEBHOOK_POLL_MS", "1000")?),
            webhook_max_attempts: parse_var("CDP_WEBHOOK_MAX_ATTEMPTS", "8")?,
            webhook_backoff_base: Duration::from_millis(parse_var(
                "CDP_WEBHOOK_BACKOFF_MS",
                "30000",
            )?),
            webhook_timeout: Duration::from_secs(parse_var("CDP_WEBHOOK_TIMEOUT_SECS", "10")?),
            metrics_token: var("CDP_METRICS_TOKEN").filter(|token| !token.is_empty()),
            drain_delay: Duration::from_secs(parse_var("CDP_DRAIN_DELAY_SECS", "0")?),
            shutdown_timeout: Duration::from_secs(parse_var("CDP_SHUTDOWN_TIMEOUT_SECS", "20")?),
            webhook_allow_http: parse_var("CDP_WEBHOOK_ALLOW_HTTP", "false")?,
            abuse: AbuseLimits::from_env()?,
        })
    }

    /// A configuration for tests and tools: fixed secrets, an ephemeral port, fast timers.
    pub fn for_tests(data_dir: &Path, database_url: &str) -> Config {
        Config {
            database_url: database_url.to_owned(),
            database_max_connections: 5,
            // Tests open many short-lived servers: connections are opened as they are needed.
            database_min_connections: 1,
            events_retention_days: None,
            data_dir: data_dir.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            public_url: "http://cdp.test".to_owned(),
            jwt_secret: b"test-secret-test-secret-test-secret-0123456789".to_vec(),
            encryption_key: [7u8; 32],
            encryption_keys_previous: Vec::new(),
            smtp_url: None,
            smtp_ca_cert: None,
            mail_from: "CDP <no-reply@cdp.test>".to_owned(),
            cors_origins: CorsOrigins::None,
            log_filter: "warn".to_owned(),
            log_json: false,
            graphql: GraphqlLimits {
                max_depth: 16,
                max_complexity: 5000,
                max_body_bytes: 1024 * 1024,
                max_batch: 10,
                apq_capacity: 1000,
                get_max_age: Duration::from_secs(5),
                compiled_plans: true,
            },
            ingest_max_body_bytes: 16 * 1024 * 1024,
            ingest_group_commit: None,
            ingest_writers_per_tenant: 1,
            access_token_ttl: Duration::from_secs(900),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            activation_token_ttl: Duration::from_secs(72 * 3600),
            reset_token_ttl: Duration::from_secs(3600),
            login_max_failures: 5,
            login_throttle_window: Duration::from_secs(900),
            outbox_workers: 1,
            outbox_poll_interval: Duration::from_millis(50),
            outbox_max_attempts: 3,
            outbox_lease: Duration::from_secs(60),
            outbox_backoff_base: Duration::from_millis(50),
            // Tests run the scheduler's ticks themselves, with a manual clock.
            scheduler_tick: Duration::ZERO,
            scheduler_batch: 500,
            segment_build_wait: Duration::from_secs(60),
            ws_max_sockets_per_tenant: 1000,
            ws_max_subscriptions_per_tenant: 5000,
            webhook_workers: 1,
            webhook_poll_interval: Duration::from_millis(50),
            webhook_max_attempts: 3,
            webhook_backoff_base: Duration::from_millis(50),
            webhook_timeout: Duration::from_secs(10),
            webhook_allow_http: false,
            abuse: AbuseLimits::for_tests(),
            metrics_token: None,
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(10),
        }
    }

    /// The folder where emails are written when no SMTP server is configured.
    pub fn mailbox_dir(&self) -> PathBuf {
        self.data_dir.join("mail")
    }
}

/// The connections the pool keeps open: by default the whole pool, never more than it.
fn min_connections(max: u32, min: Option<u32>) -> anyhow::Result<u32> {
    match min {
        None => Ok(max),
        Some(min) if min > max => bail!(
            "CDP_DATABASE_MIN_CONNECTIONS ({min}) is larger than CDP_DATABASE_MAX_CONNECTIONS ({max})"
        ),
        Some(min) => Ok(min),
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

fn parse_var<T>(name: &str, default: &str) -> anyhow::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let raw = var(name).unwrap_or_else(|| default.to_owned());
    raw.trim()
        .parse()
        .map_err(|error| anyhow::anyhow!("{name}: cannot use {raw:?}: {error}"))
}

/// A comma-separated list of IP addresses and CIDR blocks (`10.0.0.0/8`, `::1`).
fn parse_networks(name: &str, value: &str) -> anyhow::Result<Vec<ipnet::IpNet>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    anyhow::anyhow!("{name}: {item:?} is neither an IP address nor a CIDR block")
                })
        })
        .collect()
}

/// TLS on the listener needs both files; one without the other is a mistake, not plain HTTP.
/// The files are read and checked now, so that a bad one stops the start.
fn tls_files(cert: Option<String>, key: Option<String>) -> anyhow::Result<Option<TlsFiles>> {
    let files = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        },
        (Some(_), None) => {
            bail!("CDP_TLS_CERT is set but CDP_TLS_KEY is not: set both to serve HTTPS, or neither")
        }
        (None, Some(_)) => {
            bail!("CDP_TLS_KEY is set but CDP_TLS_CERT is not: set both to serve HTTPS, or neither")
        }
    };
    crate::http::tls::server_config(&files)?;
    Ok(Some(files))
}

fn default_sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("cdp.db").display())
}

fn decode_key(value: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .context("must be base64")?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("must decode to exactly 32 bytes"))
}

/// Reads a generated secret from the data directory, creating it on first start.
fn generated_secret(data_dir: &Path, file_name: &str, len: usize) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join(file_name);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .with_context(|| format!("{} is damaged (not base64)", path.display()))?;
        if bytes.len() != len {
            bail!("{} is damaged (expected {len} bytes)", path.display());
        }
        return Ok(bytes);
    }
    let mut bytes = vec![0u8; len];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    write_private(
        &path,
        &base64::engine::general_purpose::STANDARD.encode(&bytes),
    )?;
    tracing::warn!(
        path = %path.display(),
        "generated a new secret and stored it in the data directory; set it through the environment in production and keep it safe"
    );
    Ok(bytes)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_are_addresses_or_cidr_blocks() {
        let networks =
            parse_networks("CDP_TRUSTED_PROXIES", " 10.0.0.0/8, ::1 ,192.0.2.7,").unwrap();
        let expected: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
            "192.0.2.7/32".parse().unwrap(),
        ];
        assert_eq!(networks, expected);
        assert!(parse_networks("CDP_TRUSTED_PROXIES", "")
            .unwrap()
            .is_empty());
        let error = parse_networks("CDP_TRUSTED_PROXIES", "10.0.0.0/8, proxy.local")
            .unwrap_err()
            .to_string();
        assert!(error.contains("CDP_TRUSTED_PROXIES") && error.contains("proxy.local"));
    }

    fn message(result: anyhow::Result<Option<TlsFiles>>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn the_pool_keeps_all_its_connections_unless_told_fewer() {
        assert_eq!(min_connections(10, None).unwrap(), 10);
        assert_eq!(min_connections(10, Some(2)).unwrap(), 2);
        assert_eq!(min_connections(10, Some(10)).unwrap(), 10);
        let error = min_connections(4, Some(5)).unwrap_err().to_string();
        assert!(
            error.contains("CDP_DATABASE_MIN_CONNECTIONS (5)")
                && error.contains("CDP_DATABASE_MAX_CONNECTIONS (4)"),
            "{error}"
        );
    }

    #[test]
    fn tls_is_off_when_neither_file_is_set() {
        assert_eq!(tls_files(None, None).unwrap(), None);
    }

    #[test]
    fn one_tls_file_without_the_other_names_the_missing_variable() {
        let error = message(tls_files(Some("cert.pem".to_owned()), None));
        assert!(
            error.starts_with("CDP_TLS_CERT is set but CDP_TLS_KEY is not"),
            "{error}"
        );
        let error = message(tls_files(None, Some("key.pem".to_owned())));
        assert!(
            error.starts_with("CDP_TLS_KEY is set but CDP_TLS_CERT is not"),
            "{error}"
        );
    }

    #[test]
    fn unreadable_or_empty_tls_files_name_their_variable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem").display().to_string();
        let error = message(tls_files(Some(missing.clone()), Some(missing.clone())));
        assert!(error.starts_with("CDP_TLS_CERT: cannot read"), "{error}");

        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let not_pem = not_pem.display().to_string();
        let error = message(tls_files(Some(not_pem.clone()), Some(missing)));
        assert!(
            error.starts_with("CDP_TLS_CERT:") && error.contains("no PEM CERTIFICATE"),
            "{error}"
        );
    }
}
