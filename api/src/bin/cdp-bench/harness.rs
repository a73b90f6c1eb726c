//! What every scenario needs: the backends to run on, a fresh database per backend (dropped at
//! the end), the real server started in-process, a signed-up tenant with a write key, and the
//! one-JSON-line-per-result output.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use api::config::Config;
use api::service::{accounts, RequestMeta};
use api::startup::Application;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

/// Options shared by every scenario: which backends to run on.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// Admin URL of a PostgreSQL server (a role that may create databases and roles); a fresh
    /// database `cdp_bench_<random>` is created there and dropped at the end. Defaults to
    /// CDP_BENCH_POSTGRES_URL, else CDP_TEST_POSTGRES_URL; without either, PostgreSQL is skipped.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Run on SQLite only, even when a PostgreSQL URL is known.
    #[arg(long, conflicts_with = "postgres_only")]
    pub sqlite_only: bool,
    /// Run on PostgreSQL only (a URL must be known).
    #[arg(long)]
    pub postgres_only: bool,
}

impl BackendArgs {
    fn postgres_url(&self) -> Option<String> {
        self.postgres
            .clone()
            .or_else(|| std::env::var("CDP_BENCH_POSTGRES_URL").ok())
            .or_else(|| std::env::var("CDP_TEST_POSTGRES_URL").ok())
            .filter(|url| !url.trim().is_empty())
    }

    /// SQLite unless `--postgres-only`; PostgreSQL unless `--sqlite-only` or no URL is known
    /// (said on stderr; an error with `--postgres-only`).
    pub fn backends(&self) -> anyhow::Result<Vec<Backend>> {
        let mut backends = Vec::new();
        if !self.postgres_only {
            backends.push(Backend::Sqlite);
        }
        if self.sqlite_only {
            return Ok(backends);
        }
        match self.postgres_url() {
            Some(url) => backends.push(Backend::Postgres { admin_url: url }),
            None if self.postgres_only => anyhow::bail!(
                "--postgres-only needs --postgres, CDP_BENCH_POSTGRES_URL or CDP_TEST_POSTGRES_URL"
            ),
            None => eprintln!(
                "note: PostgreSQL skipped (set --postgres, CDP_BENCH_POSTGRES_URL or CDP_TEST_POSTGRES_URL)"
            ),
        }
        Ok(backends)
    }
}

#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres { admin_url: String },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }
}

/// A fresh database for one backend. On PostgreSQL the service runs as a per-run login role that
/// is a member of `cdp_app` (row-level security in force, as in production); the owner URL is the
/// admin user on the fresh database.
pub struct BenchDb {
    pub backend: Backend,
    pub db_backend: DbBackend,
    /// What the server connects with.
    pub service_url: String,
    /// The owner of the schema (on SQLite the same file).
    pub owner_url: String,
    pub data_dir: PathBuf,
    /// (admin URL, database, login role) to drop at the end.
    postgres: Option<(String, String, String)>,
    _dir: tempfile::TempDir,
}

fn with_credentials(
    url: &str,
    user: Option<&str>,
    password: Option<&str>,
    db: &str,
) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).context("the PostgreSQL URL is not a URL")?;
    if let Some(user) = user {
        parsed
            .set_username(user)
            .map_err(|()| anyhow!("cannot set the user of the PostgreSQL URL"))?;
        parsed
            .set_password(password)
            .map_err(|()| anyhow!("cannot set the password of the PostgreSQL URL"))?;
    }
    parsed.set_path(&format!("/{db}"));
    Ok(parsed.to_string())
}

impl BenchDb {
    pub async fn create(backend: &Backend) -> anyhow::Result<BenchDb> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let data_dir = dir.path().to_path_buf();
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}?mode=rwc", data_dir.join("cdp.db").display());
                Ok(BenchDb {
                    backend: backend.clone(),
                    db_backend: DbBackend::Sqlite,
                    service_url: url.clone(),
                    owner_url: url,
                    data_dir,
                    postgres: None,
                    _dir: dir,
                })
            }
            Backend::Postgres { admin_url } => {
                let suffix = Uuid::new_v4().simple().to_string();
                let name = format!("cdp_bench_{suffix}");
                let role = format!("cdp_bench_svc_{}", &suffix[..12]);
                let password = Uuid::new_v4().simple().to_string();
                let admin = Database::connect(admin_url.as_str())
                    .await
                    .context("cannot connect to PostgreSQL with the admin URL")?;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("cannot create database {name}"))?;
                let db = BenchDb {
                    backend: backend.clone(),
                    db_backend: DbBackend::Postgres,
                    service_url: with_credentials(admin_url, Some(&role), Some(&password), &name)?,
                    owner_url: with_credentials(admin_url, None, None, &name)?,
                    data_dir,
                    postgres: Some((admin_url.clone(), name, role.clone())),
                    _dir: dir,
                };
                // From here on, `destroy` cleans up whatever was made.
                if let Err(error) = db.prepare_postgres(&admin, &role, &password).await {
                    db.destroy().await;
                    return Err(error);
                }
                Ok(db)
            }
        }
    }

    /// Migrates as the owner (which also creates `cdp_app`), then makes the login role the
    /// service uses: a member of `cdp_app`, neither superuser nor able to bypass row-level
    /// security.
    async fn prepare_postgres(
        &self,
        admin: &DatabaseConnection,
        role: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        let store = api::store::Store::connect(&api::store::StoreOptions {
            url: self.owner_url.clone(),
            max_connections: 2,
            min_connections: 1,
        })
        .await
        .context("cannot connect to the bench database as its owner")?;
        store
            .migrate()
            .await
            .context("cannot migrate the bench database")?;
        drop(store);
        admin
            .execute_unprepared(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD '{password}' NOSUPERUSER NOBYPASSRLS;
                 GRANT cdp_app TO {role};"
            ))
            .await
            .context("cannot create the service login role")?;
        Ok(())
    }

    /// Drops the PostgreSQL database (WITH (FORCE)) and the login role; the SQLite file goes with
    /// the temporary directory. Failures are reported on stderr, never hidden.
    pub async fn destroy(&self) {
        let Some((admin_url, name, role)) = &self.postgres else {
            return;
        };
        let admin = match Database::connect(admin_url.as_str()).await {
            Ok(admin) => admin,
            Err(error) => {
                eprintln!("warning: cannot connect to drop database {name}: {error}");
                return;
            }
        };
        if let Err(error) = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
        {
            eprintln!("warning: cannot drop database {name}: {error}");
        }
        if let Err(error) = admin
            .execute_unprepared(&format!("DROP ROLE IF EXISTS {role}"))
            .await
        {
            eprintln!("warning: cannot drop role {role}: {error}");
        }
    }

    /// A pool on the owner URL, set up as the service's store sets up its own.
    pub async fn owner_pool(&self, max_connections: u32) -> anyhow::Result<DatabaseConnection> {
        Database::connect(baseline_options(&self.owner_url, max_connections))
            .await
            .context("cannot connect to the bench database as its owner")
    }

    /// On PostgreSQL, a `CHECKPOINT` before a measured phase, so that each phase starts with the
    /// WAL of the phases before it written out: otherwise a checkpoint that their WAL made due
    /// (every `max_wal_size / 2` or so, 500 MB with the default of 1 GB, about one per full
    /// ingest run) falls into whichever phase runs then, which then also writes a full image of
    /// every page it touches first. A role that may not (neither superuser nor
    /// `pg_checkpoint`) gets a note, and the phase runs as it would have.
    pub async fn checkpoint(&self) -> anyhow::Result<()> {
        if !matches!(self.backend, Backend::Postgres { .. }) {
            return Ok(());
        }
        let owner = self.owner_pool(1).await?;
        if let Err(error) = owner.execute_unprepared("CHECKPOINT").await {
            eprintln!(
                "note: no CHECKPOINT before the phase ({error}); a checkpoint may fall into it"
            );
        }
        owner.close().await?;
        Ok(())
    }
}

/// True when the connection's role skips row-level security (superuser or BYPASSRLS); SQLite
/// has none.
pub async fn bypasses_rls(db: &DatabaseConnection) -> anyhow::Result<bool> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(true);
    }
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT (rolsuper OR rolbypassrls) FROM pg_roles WHERE rolname = current_user",
        ))
        .await?
        .context("the current role is not in pg_roles")?;
    Ok(row.try_get_by_index::<bool>(0)?)
}

/// Runs `scenario` on every backend, each on a fresh database that is destroyed afterwards (also
/// on failure and on Ctrl-C), and prints each result as one JSON line on stdout.
pub async fn on_each_backend<F, Fut, R>(args: &BackendArgs, mut scenario: F) -> anyhow::Result<()>
where
    F: FnMut(Arc<BenchDb>) -> Fut,
    Fut: Future<Output = anyhow::Result<R>>,
    R: Serialize,
{
    for backend in args.backends()? {
        eprintln!("== {} ==", backend.name());
        let db = Arc::new(BenchDb::create(&backend).await?);
        let outcome = tokio::select! {
            outcome = scenario(db.clone()) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        db.destroy().await;
        let result = outcome.with_context(|| format!("the {} run failed", backend.name()))?;
        println!("{}", serde_json::to_string(&result)?);
    }
    Ok(())
}

/// Log output of the server (warnings and errors) on stderr; `CDP_BENCH_LOG` overrides.
pub fn init_logs() {
    let filter = std::env::var("CDP_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// The real server, started in-process on a free loopback port.
pub struct Server {
    pub app: Application,
    pub base: String,
    pub client: reqwest::Client,
}

/// A signed-in tenant owner.
pub struct Owner {
    pub tenant_id: Uuid,
    pub access_token: String,
}

pub const PASSWORD: &str = "correct horse battery staple";

impl Server {
    /// Starts the server as production does, with no outbox workers and a pool of 10.
    pub async fn start(db: &BenchDb) -> anyhow::Result<Server> {
        let mut config = Config::for_tests(&db.data_dir, &db.service_url);
        // The write path's tuning, as the server reads it, so that runs can compare settings.
        config.ingest_group_commit = match std::env::var("CDP_INGEST_GROUP_COMMIT").as_deref() {
            Ok("on") => Some(true),
            Ok("off") => Some(false),
            _ => None,
        };
        if let Some(writers) = std::env::var("CDP_INGEST_WRITERS")
            .ok()
            .and_then(|value| value.parse().ok())
        {
            config.ingest_writers_per_tenant = writers;
        }
        // Compiled read plans (ADR 0016) on unless switched off, to compare the executors.
        config.graphql.compiled_plans =
            std::env::var("CDP_GRAPHQL_COMPILED_PLANS").map_or(true, |value| value != "false");
        config.outbox_workers = 0;
        config.database_max_connections = 10;
        config.database_min_connections = 10;
        config.log_filter = "warn".to_owned();
        let app = api::startup::build(config)
            .await
            .context("the server does not start")?;
        let base = format!("http://{}", app.address());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Server { app, base, client })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Signs up a tenant and activates its owner through the service layer.
    pub async fn sign_up(&self, slug_prefix: &str) -> anyhow::Result<Owner> {
        let state = self.app.state();
        let meta = RequestMeta::default();
        let slug = format!(
            "{slug_prefix}-{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let (tenant, _user, token) = accounts::sign_up(
            state,
            &meta,
            accounts::SignUpCommand {
                tenant_name: format!("{slug} Inc"),
                tenant_slug: slug.clone(),
                email: format!("owner@{slug}.example"),
            },
        )
        .await
        .map_err(|error| anyhow!("sign-up failed: {error}"))?;
        let session = accounts::activate_account(state, &meta, &token, PASSWORD)
            .await
            .map_err(|error| anyhow!("activation failed: {error}"))?;
        Ok(Owner {
            tenant_id: tenant.id.as_uuid(),
            access_token: session.access_token,
        })
    }

    /// Posts one GraphQL operation; any error in the answer is an error.
    pub async fn graphql(
        &self,
        token: &str,
        query: &str,
        variables: Value,
    ) -> anyhow::Result<Value> {
        let response: Value = self
            .client
            .post(self.url("/graphql"))
            .bearer_auth(token)
            .json(&json!({"query": query, "variables": variables}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if let Some(errors) = response.get("errors") {
            bail!("GraphQL errors: {errors}");
        }
        Ok(response.get("data").cloned().unwrap_or(Value::Null))
    }

    /// Creates a server-side write key and returns its secret.
    pub async fn write_key(&self, owner: &Owner) -> anyhow::Result<String> {
        let data = self
            .graphql(
                &owner.access_token,
                r#"mutation { createApiKey(name: "bench", scope: WRITE, channel: SERVER) { secret } }"#,
                json!({}),
            )
            .await?;
        data.pointer("/createApiKey/secret")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .context("createApiKey returned no secret")
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.app.stop().await
    }
}

/// Rounds to `digits` decimals.
pub fn round(value: f64, digits: i32) -> f64 {
    let factor = 10f64.powi(digits);
    (value * factor).round() / factor
}

/// A pool of `connections` on the service's URL, set up as the store sets up the server's: for
/// the baselines that read and write the same database.
pub async fn service_pool(db: &BenchDb, connections: u32) -> anyhow::Result<DatabaseConnection> {
    Database::connect(baseline_options(&db.service_url, connections))
        .await
        .context("cannot connect as the service role")
}

/// The store's pool settings ([`api::store::StoreOptions::connect_options`]: WAL and
/// `synchronous=NORMAL` on every SQLite connection, custom plans and `TCP_NODELAY` on
/// PostgreSQL), every connection opened at start, and a longer wait for one under the bench's
/// load.
fn baseline_options(url: &str, connections: u32) -> ConnectOptions {
    let mut options = api::store::StoreOptions {
        url: url.to_owned(),
        max_connections: connections,
        min_connections: connections,
    }
    .connect_options();
    options.acquire_timeout(Duration::from_secs(30));
    options
}

/// A baseline HTTP server on a free loopback port, serving until [`Loopback::stop`].
pub struct Loopback {
    pub address: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Loopback {
    pub async fn start(app: impl poem::Endpoint + 'static) -> anyhow::Result<Loopback> {
        use poem::listener::{Acceptor, Listener, TcpListener};
        let acceptor = TcpListener::bind("127.0.0.1:0").into_acceptor().await?;
        let address = acceptor
            .local_addr()
            .first()
            .and_then(|address| address.as_socket_addr().copied())
            .context("the baseline listener has no address")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app,
                    async move {
                        let _ = stopped.await;
                    },
                    Some(Duration::from_secs(5)),
                )
                .await
        });
        Ok(Loopback {
            address,
            stop,
            task,
        })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
