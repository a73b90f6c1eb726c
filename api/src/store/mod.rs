//! Persistence: the only module that names `sea_orm`.
//!
//! Guarantees: tenant data is reachable only through a [`TenantTx`], which on PostgreSQL sets the
//! transaction-local `app.tenant_id` that row-level security checks; every store function takes the
//! transaction first and still filters by `tenant_id` itself, and inserts take `tenant_id` from the
//! transaction, never from input. Cross-tenant work goes through [`Store::begin_system`], which is
//! explicit and logged.

mod entity;

pub mod analytics;
pub mod api_keys;
pub mod audit;
pub mod backup;
pub mod campaigns;
pub mod conditions;
mod conn;
pub mod events;
pub mod facts;
pub mod fanout;
pub mod ingest;
mod keyed;
pub mod keys;
pub mod lifecycle;
pub mod nodelay;
pub mod outbox;
pub mod partitions;
pub mod privacy;
pub mod profiles;
pub mod roles;
pub mod scheduler;
pub mod segments;
pub mod sessions;
pub mod tenants;
pub mod tokens;
pub mod users;
pub mod webhooks;
mod wire;

pub use wire::{JsonText, STATEMENT_BYTES};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::TenantId;
use migration::MigratorTrait;
use sea_orm::{
    AccessMode, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, RuntimeErr, SqlErr, SqliteTransactionMode, Statement, TransactionOptions,
    TransactionTrait,
};

/// What can go wrong in the store. Raw database messages never reach a client: `Db` is mapped to
/// an opaque internal error at the edge.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    /// A row of the write path that a concurrent transaction wrote first, or changed under it:
    /// the caller begins the batch again, in a way that depends on which ([`ingest::Race`]).
    #[error("conflict: {0}")]
    Raced(ingest::Race),
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

impl StoreError {
    /// Stored data that breaks an invariant the application keeps (it was valid when written).
    pub fn corrupt(what: impl Into<String>) -> StoreError {
        StoreError::Db(DbErr::Custom(what.into()))
    }

    /// Maps a unique-constraint violation to `Conflict` with the caller's explanation.
    pub fn unique_as_conflict(error: DbErr, what: impl Into<String>) -> StoreError {
        match error.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => StoreError::Conflict(what.into()),
            _ => StoreError::Db(error),
        }
    }

    /// Maps a unique-constraint violation to the write path's `race`.
    pub fn unique_as_race(error: DbErr, race: ingest::Race) -> StoreError {
        match error.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => StoreError::Raced(race),
            _ => StoreError::Db(error),
        }
    }

    /// True when the database reports a transient failure worth retrying: a serialization
    /// failure or deadlock on PostgreSQL, or a busy database on SQLite.
    pub fn is_retryable(&self) -> bool {
        let StoreError::Db(error) = self else {
            return false;
        };
        let text = match error {
            DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
                e.to_string()
            }
            other => other.to_string(),
        };
        text.contains("40001")
            || text.contains("40P01")
            || text.contains("deadlock")
            || text.contains("database is locked")
            || text.contains("could not serialize")
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Which database engine the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One PostgreSQL array parameter of `kind` holding `values`. The driver binds no `NULL` inside
/// an array: every value must be present.
pub(crate) fn array_of<V: Into<sea_orm::Value>>(
    kind: sea_orm::sea_query::ArrayType,
    values: impl IntoIterator<Item = V>,
) -> sea_orm::Value {
    let values: Vec<sea_orm::Value> = values.into_iter().map(Into::into).collect();
    sea_orm::Value::Array(kind, Some(Box::new(values)))
}

/// `column IN (values)` written so that the statement's text does not depend on how many values
/// there are: on PostgreSQL `column = ANY($n)` with the values as one array parameter (PostgreSQL
/// turns an `IN` list into the same `= ANY` of an array, and plans each execution with the
/// actual values either way). sqlx keeps a bounded cache of prepared statements per connection;
/// an `IN` list of each length was a statement of its own, and the write path's lists of a few
/// hundred lengths evicted each other, so that one statement in seven was prepared again (an
/// extra round trip, parsed and analyzed again). SQLite, which has no arrays, keeps the list.
pub(crate) fn any_of<C, V>(
    backend: Backend,
    column: C,
    kind: sea_orm::sea_query::ArrayType,
    values: impl IntoIterator<Item = V>,
) -> sea_orm::sea_query::SimpleExpr
where
    C: sea_orm::ColumnTrait,
    V: Into<sea_orm::Value>,
{
    use sea_orm::sea_query::extension::postgres::PgFunc;
    use sea_orm::sea_query::{Expr, ExprTrait};
    match backend {
        Backend::Postgres => {
            Expr::col(column.as_column_ref()).eq(PgFunc::any(Expr::val(array_of(kind, values))))
        }
        Backend::Sqlite => column.is_in(values),
    }
}

/// `query` with every column of its entity but the JSON column `skipped`, which is answered as
/// the JSON literal `json` (of the column's type) without being read or decoded: for reads that
/// do not answer a large JSON column. A row read so must never be written back.
fn without_json_column<E: sea_orm::EntityTrait>(
    query: sea_orm::Select<E>,
    skipped: E::Column,
    json: &str,
    backend: Backend,
) -> sea_orm::Select<E> {
    use sea_orm::sea_query::Expr;
    use sea_orm::{IdenStatic, Iterable, QuerySelect};
    query
        .select_only()
        .columns(E::Column::iter().filter(|column| column.as_str() != skipped.as_str()))
        .column_as(Expr::cust(json_literal(json, backend)), skipped.as_str())
}

/// [`without_json_column`] as a select list for a raw statement (`store::keyed`): every column of
/// `E` by name, `skipped` (when given) answered as the JSON literal `json`.
fn select_list<E: sea_orm::EntityTrait>(
    skipped: Option<E::Column>,
    json: &str,
    backend: Backend,
) -> String {
    use sea_orm::{IdenStatic, Iterable};
    E::Column::iter()
        .map(|column| match skipped {
            Some(skipped) if skipped.as_str() == column.as_str() => {
                format!("{} AS {}", json_literal(json, backend), column.as_str())
            }
            _ => column.as_str().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The JSON literal `json` (without quotes inside) as an expression of a JSON column's type.
fn json_literal(json: &str, backend: Backend) -> String {
    match backend {
        Backend::Postgres => format!("'{json}'::jsonb"),
        Backend::Sqlite => format!("'{json}'"),
    }
}

/// The connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    backend: Backend,
    /// A random id of this pool, which tells this process's notifications from other
    /// processes' (see `fanout`).
    origin: uuid::Uuid,
    /// Whether `events` was a partitioned table when the pool connected (PostgreSQL only; see
    /// `partitions`). Read once: converting the table while the service runs is safe (duplicate
    /// detection then still reads `events`, only slower) and picked up at the next start.
    events_partitioned: bool,
    /// Statements this pool has executed (transaction control included), for tests that prove
    /// a request's statement count does not grow with its page size.
    statements: Arc<AtomicU64>,
    /// Tenant transactions this pool has begun (system transactions, which the queue workers
    /// poll with, are not counted), for tests that prove a read-only request runs in one.
    transactions: Arc<AtomicU64>,
}

/// Options for opening the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub url: String,
    pub max_connections: u32,
    /// Connections opened when the pool starts and kept open (at most `max_connections`).
    /// A connection opened while a request waits for it costs that request the opening: on
    /// PostgreSQL over TCP with TLS about 90 ms here (the handshake runs before `nodelay` can
    /// turn Nagle's algorithm off), so a service keeps its whole pool open.
    pub min_connections: u32,
}

/// The most page cache each SQLite connection may keep, in KiB (`PRAGMA cache_size`), filled
/// only as pages are read. SQLite's default is 2,000 KiB, and this build's SQLite keeps the
/// caches of all connections of the process in one group with one budget (the sum of theirs):
/// with that default, a pool that had just read much held the group's pages while another
/// pool's connections, finding the group full, freed each page as soon as they released it and
/// read even the tables' root pages from the file again for every request (22 reads a
/// `profile(id)` against 0.16; docs/PERFORMANCE.md, "SQLite's shared page cache").
pub const SQLITE_CACHE_KIB: u32 = 16 * 1024;

impl StoreOptions {
    /// The pool's settings, for every pool on the database (the store's, and the bench's
    /// baselines, which must run as the service runs). On SQLite every connection runs in WAL
    /// mode with `synchronous=NORMAL`, so that readers never block the writer and a commit does
    /// not wait for a disk flush (a power cut may lose the last commits, never corrupt the file).
    /// On PostgreSQL every connection plans each execution of a prepared statement with its
    /// actual parameters (see below), and has Nagle's algorithm off (`nodelay`); a connection to
    /// this host's loopback address whose URL does not set `sslmode` runs without TLS.
    pub fn connect_options(&self) -> ConnectOptions {
        use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
        let pgsslmode_set = std::env::var_os("PGSSLMODE").is_some();
        let url = self.url.clone();
        let mut connect = ConnectOptions::new(self.url.clone());
        connect
            .max_connections(self.max_connections)
            .min_connections(self.min_connections.clamp(1, self.max_connections.max(1)))
            .acquire_timeout(Duration::from_secs(10))
            .sqlx_logging(false)
            // SQLite has one writer at a time: a writer waits up to 30 s for the lock instead of
            // failing after sqlx's default of 5 s under a burst of concurrent batches.
            // `synchronous` is a per-connection setting, so it must be set on every connection of
            // the pool, not once after connecting.
            .map_sqlx_sqlite_opts(|options| {
                options
                    .busy_timeout(Duration::from_secs(30))
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    // Deleted and overwritten content is zeroed in the file, not left in free
                    // pages: erasure and re-sealing leave no readable remains on disk.
                    .pragma("secure_delete", "ON")
                    // See SQLITE_CACHE_KIB.
                    .pragma("cache_size", format!("-{SQLITE_CACHE_KIB}"))
            })
            // sqlx prepares every statement once per connection. After five executions
            // PostgreSQL may switch a prepared statement to a generic plan, chosen with the
            // statistics of that moment: on a fresh database, the statistics of empty tables,
            // which pick the wrong index for the duplicate check, the identity lookups and the
            // foreign-key checks once the tables grow. Custom plans cost a little planning per
            // execution and always see the real parameters and the current statistics.
            .map_sqlx_postgres_opts(move |options| {
                let options = options.options([("plan_cache_mode", "force_custom_plan")]);
                // A database on this host, and nobody asked for TLS: plain text (ADR 0014).
                if plain_on_loopback(&url, &options, pgsslmode_set) {
                    options.ssl_mode(sea_orm::sqlx::postgres::PgSslMode::Disable)
                } else {
                    options
                }
            });
        nodelay::on_every_connection(&mut connect, &self.url);
        connect
    }
}

/// Whether the URL says how to protect a PostgreSQL connection (`sslmode`, or sqlx's
/// `ssl-mode`).
fn sslmode_in_url(url: &str) -> bool {
    let query = url.split_once('?').map_or("", |(_, query)| query);
    query.split('&').any(|pair| {
        let key = pair.split_once('=').map_or(pair, |(key, _)| key);
        key.eq_ignore_ascii_case("sslmode") || key.eq_ignore_ascii_case("ssl-mode")
    })
}

/// Whether a connection to `url` (parsed into `options`) runs in plain text by default: neither
/// the URL nor `PGSSLMODE` says how to protect it (so the driver would use `prefer`), and it goes
/// over TCP to this host's loopback interface, where TLS protects nothing: whoever can read
/// loopback traffic can read the process's memory too. There it costs about a tenth of the ingest
/// rate (docs/PERFORMANCE.md), so such a connection runs in plain text, as a Unix socket does.
fn plain_on_loopback(
    url: &str,
    options: &sea_orm::sqlx::postgres::PgConnectOptions,
    pgsslmode_set: bool,
) -> bool {
    !pgsslmode_set
        && !sslmode_in_url(url)
        && options.get_socket().is_none()
        && is_loopback_host(options.get_host())
}

/// Whether `host` (a name, an address, or a bracketed IPv6 address as URLs write it) is this
/// host's loopback: `localhost`, `127.0.0.0/8` or `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

impl Store {
    /// Connects, with the pool settings of [`StoreOptions::connect_options`].
    pub async fn connect(options: &StoreOptions) -> StoreResult<Store> {
        let connect = options.connect_options();
        // The pool reports an unreachable server only as "pool timed out" after its acquire
        // timeout: one plain connection first says why (refused, unknown host, bad password,
        // no such database), at once.
        if options.url.starts_with("postgres") {
            use sea_orm::sqlx::Connection;
            let probe = tokio::time::timeout(
                Duration::from_secs(10),
                sea_orm::sqlx::PgConnection::connect(&options.url),
            )
            .await;
            match probe {
                Err(_) => {
                    return Err(StoreError::Db(DbErr::Custom(
                        "the database did not answer within 10 s".to_owned(),
                    )))
                }
                Ok(Err(error)) => return Err(StoreError::Db(DbErr::Custom(error.to_string()))),
                Ok(Ok(connection)) => {
                    let _ = connection.close().await;
                }
            }
        }
        let mut db = Database::connect(connect).await?;
        // The connection is not shared yet, so the callback covers every statement it runs.
        let statements = Arc::new(AtomicU64::new(0));
        let counter = statements.clone();
        db.set_metric_callback(move |_info| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        let backend = match db.get_database_backend() {
            DbBackend::Postgres => Backend::Postgres,
            DbBackend::Sqlite => Backend::Sqlite,
            other => {
                return Err(StoreError::Db(DbErr::Custom(format!(
                    "unsupported database backend {other:?}"
                ))))
            }
        };
        let events_partitioned = migration::partitions::is_partitioned(&db).await?;
        Ok(Store {
            db,
            backend,
            origin: uuid::Uuid::new_v4(),
            events_partitioned,
            statements,
            transactions: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How many statements this pool has executed since it was opened.
    pub fn statements_executed(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// How many tenant transactions this pool has begun since it was opened (a read scope's
    /// shared transaction counts once; system transactions are not counted).
    pub fn transactions_begun(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    fn count_transaction(&self) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// True when `events` is partitioned by time (seen when the pool connected).
    pub fn events_partitioned(&self) -> bool {
        self.events_partitioned
    }

    /// On SQLite, copies the write-ahead log into the database file and truncates it, so that
    /// no earlier version of an erased row survives in the log. Best effort: a reader holding an
    /// old snapshot makes it wait for the next checkpoint. Nothing on PostgreSQL, whose dead
    /// tuples `VACUUM` reclaims.
    pub async fn truncate_wal(&self) {
        if self.backend != Backend::Sqlite {
            return;
        }
        if let Err(error) = self
            .db
            .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
            .await
        {
            tracing::warn!(%error, "cannot checkpoint the SQLite write-ahead log");
        }
    }

    /// The random id of this pool (one per process in production), carried by notifications.
    pub fn origin(&self) -> uuid::Uuid {
        self.origin
    }

    /// Applies every pending migration. On a database where the schema is current this changes
    /// nothing, so a service running as the non-owner role can call it safely.
    pub async fn migrate(&self) -> StoreResult<()> {
        // Look first without writing: a role without DDL rights may not even run
        // `CREATE TABLE IF NOT EXISTS` on the migrations table.
        let pending = migration::Migrator::get_pending_migrations_read_only(&self.db).await;
        if matches!(pending, Ok(ref pending) if pending.is_empty()) {
            return Ok(());
        }
        migration::Migrator::up(&self.db, None).await?;
        Ok(())
    }

    /// True when the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        self.db.ping().await.is_ok()
    }

    /// Opens a read-write transaction bound to one tenant. On SQLite the write lock is taken at
    /// once (`BEGIN IMMEDIATE`), so that two writers queue instead of failing on lock upgrade.
    /// Inside a [`ReadScope`], the scope's later reads open transactions of their own, so that
    /// they see what this one commits.
    pub async fn begin(&self, tenant_id: TenantId) -> StoreResult<TenantTx> {
        self.open_write(tenant_id, false).await
    }

    /// [`Store::begin`] for the write path of customer data: the transaction also holds the
    /// tenant's segment barrier shared (`segments::barrier`), taken on PostgreSQL in the
    /// statement that binds the tenant instead of one of its own. Whatever the caller reads
    /// afterwards is read in statements that start after the barrier was granted: under read
    /// committed a statement's snapshot is taken when it starts, so a read folded into the
    /// waiting statement would miss a build or a key change that held the barrier and committed
    /// meanwhile (ADR 0005, ADR 0015).
    pub async fn begin_writing(&self, tenant_id: TenantId) -> StoreResult<TenantTx> {
        self.open_write(tenant_id, true).await
    }

    async fn open_write(&self, tenant_id: TenantId, barrier: bool) -> StoreResult<TenantTx> {
        ReadScope::note_write();
        self.count_transaction();
        let tx = self
            .db
            .begin_with_options(TransactionOptions {
                isolation_level: None,
                access_mode: None,
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            })
            .await?;
        let held = self.bind_tenant(&tx, tenant_id, barrier).await?;
        let tx = TenantTx::new(tx, tenant_id, self.origin);
        if held {
            tx.note_barrier(BARRIER_SHARED);
        }
        Ok(tx)
    }

    /// Opens a read-only transaction bound to one tenant. Inside a [`ReadScope`] every read of
    /// the same tenant shares the scope's one transaction instead.
    pub async fn read(&self, tenant_id: TenantId) -> StoreResult<TenantTx> {
        if let Some(scope) = ReadScope::current() {
            if let Some(shared) = scope.shared(self, tenant_id).await? {
                return Ok(shared);
            }
        }
        let (tx, auth_version) = self.open_read(tenant_id).await?;
        Ok(TenantTx::handle(
            Arc::new(conn::Conn::new(tx)),
            false,
            tenant_id,
            self.origin,
            auth_version,
        ))
    }

    /// A read-only transaction bound to `tenant_id`, and on PostgreSQL the tenant's
    /// `auth_version` as the binding statement read it.
    async fn open_read(
        &self,
        tenant_id: TenantId,
    ) -> StoreResult<(DatabaseTransaction, Option<i64>)> {
        // Plain `BEGIN` on both: SQLite's deferred transactions are read transactions until they
        // write; PostgreSQL's is made read-only by the tenant binding's statement (one round
        // trip instead of a `SET TRANSACTION READ ONLY` of its own).
        self.count_transaction();
        let tx = self.db.begin().await?;
        if self.backend != Backend::Postgres {
            return Ok((tx, None));
        }
        // Transaction-local settings and bound parameters (see `bind_tenant`). The same statement reads
        // the tenant's `auth_version`, which authenticating an access token compares with its
        // cached standings (`auth::standing`, ADR 0017): no round trip of its own. `tenants` is
        // the registry, outside row-level security.
        let row = tx
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT set_config('app.tenant_id', $1, true), \
                        set_config('transaction_read_only', 'on', true), \
                        (SELECT auth_version FROM tenants WHERE id = $2)",
                [tenant_id.to_string().into(), tenant_id.as_uuid().into()],
            ))
            .await?;
        let auth_version = match row {
            Some(row) => row.try_get_by_index::<Option<i64>>(2)?,
            None => None,
        };
        Ok((tx, auth_version))
    }

    /// Binds the transaction to the tenant, and with `barrier` takes the tenant's segment
    /// barrier shared in the same statement; returns whether it did (PostgreSQL only: SQLite
    /// serializes writers and has no barrier).
    async fn bind_tenant(
        &self,
        tx: &DatabaseTransaction,
        tenant_id: TenantId,
        barrier: bool,
    ) -> StoreResult<bool> {
        if self.backend != Backend::Postgres {
            return Ok(false);
        }
        // Transaction-local and a bound parameter: the setting ends with the transaction and can
        // never be injected into.
        let statement = if barrier {
            let (class, key) = segments::barrier_key(tenant_id);
            Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT set_config('app.tenant_id', $1, true), pg_advisory_xact_lock_shared($2, $3)",
                [tenant_id.to_string().into(), class.into(), key.into()],
            )
        } else {
            Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT set_config('app.tenant_id', $1, true)",
                [tenant_id.to_string().into()],
            )
        };
        tx.execute_raw(statement).await?;
        Ok(barrier)
    }

    /// Opens a transaction that may see every tenant's rows of the tables that allow system scans
    /// (the email outbox). Every use names its reason, which is logged.
    pub async fn begin_system(&self, reason: &'static str) -> StoreResult<SystemTx> {
        self.system(reason, false).await
    }

    /// [`Store::begin_system`] for reading only: read-only on PostgreSQL, and on SQLite without
    /// the write lock, so that a reader (a metrics scrape) never queues behind or blocks writers.
    pub async fn read_system(&self, reason: &'static str) -> StoreResult<SystemTx> {
        self.system(reason, true).await
    }

    async fn system(&self, reason: &'static str, read_only: bool) -> StoreResult<SystemTx> {
        if !read_only {
            ReadScope::note_write();
        }
        tracing::debug!(reason, read_only, "system transaction");
        let (access_mode, sqlite_transaction_mode) = match (read_only, self.backend) {
            (false, _) => (None, Some(SqliteTransactionMode::Immediate)),
            (true, Backend::Postgres) => (Some(AccessMode::ReadOnly), None),
            // SQLite's deferred transactions are read transactions until they write.
            (true, Backend::Sqlite) => (None, None),
        };
        let tx = self
            .db
            .begin_with_options(TransactionOptions {
                isolation_level: None,
                access_mode,
                sqlite_transaction_mode,
            })
            .await?;
        if self.backend == Backend::Postgres {
            // A nil tenant makes the tenant policy match nothing; `app.system` opens only the
            // tables that carry the system_scan policy.
            tx.execute_unprepared(
                "SELECT set_config('app.tenant_id', '00000000-0000-0000-0000-000000000000', true),
                        set_config('app.system', 'on', true)",
            )
            .await?;
        }
        Ok(SystemTx { tx })
    }

    /// Work on the tenant registry (which has no row-level security): creating a tenant and
    /// resolving a slug at login.
    pub(crate) fn registry(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The PostgreSQL pool, for the connection that `LISTEN`s for other replicas' notices
    /// (`fanout`): it reads no table. Only on PostgreSQL (the caller checks the backend).
    pub(crate) fn notification_pool(&self) -> Option<&sea_orm::sqlx::PgPool> {
        (self.backend == Backend::Postgres).then(|| self.db.get_postgres_connection_pool())
    }
}

/// A transaction bound to one tenant. The only way to reach tenant data.
pub struct TenantTx {
    tx: Arc<conn::Conn>,
    /// A [`ReadScope`]'s transaction, which the scope ends: committing this handle does nothing.
    shared: bool,
    tenant_id: TenantId,
    origin: uuid::Uuid,
    /// The tenant's `auth_version` as this transaction read it when it was opened (PostgreSQL's
    /// read transactions), else `None`; see [`tenants::auth_version`].
    auth_version: Option<i64>,
    /// The tenant's segment barrier this transaction holds (`segments::barrier`): held until the
    /// transaction ends, so asking again for as much is a no-op.
    barrier: std::sync::atomic::AtomicU8,
}

pub(crate) const BARRIER_NONE: u8 = 0;
pub(crate) const BARRIER_SHARED: u8 = 1;
pub(crate) const BARRIER_EXCLUSIVE: u8 = 2;

impl TenantTx {
    /// A transaction already bound to `tenant_id` (see `Store::bind_tenant`).
    pub(crate) fn new(
        tx: DatabaseTransaction,
        tenant_id: TenantId,
        origin: uuid::Uuid,
    ) -> TenantTx {
        TenantTx::handle(
            Arc::new(conn::Conn::new(tx)),
            false,
            tenant_id,
            origin,
            None,
        )
    }

    fn handle(
        tx: Arc<conn::Conn>,
        shared: bool,
        tenant_id: TenantId,
        origin: uuid::Uuid,
        auth_version: Option<i64>,
    ) -> TenantTx {
        TenantTx {
            tx,
            shared,
            tenant_id,
            origin,
            auth_version,
            barrier: std::sync::atomic::AtomicU8::new(BARRIER_NONE),
        }
    }

    pub fn tenant_id(&self) -> TenantId {
        self.tenant_id
    }

    /// The segment barrier this transaction holds: `BARRIER_NONE`, `_SHARED` or `_EXCLUSIVE`.
    pub(crate) fn barrier_held(&self) -> u8 {
        self.barrier.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn note_barrier(&self, level: u8) {
        self.barrier
            .fetch_max(level, std::sync::atomic::Ordering::Relaxed);
    }

    /// The origin of the store that opened this transaction (see [`Store::origin`]).
    pub fn origin(&self) -> uuid::Uuid {
        self.origin
    }

    pub(crate) fn conn(&self) -> &conn::Conn {
        &self.tx
    }

    /// The tenant's `auth_version` if this transaction read it when it was opened.
    pub(crate) fn auth_version_read(&self) -> Option<i64> {
        self.auth_version
    }

    /// The engine this transaction runs on.
    pub(crate) fn backend(&self) -> Backend {
        match self.tx.get_database_backend() {
            DbBackend::Postgres => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }

    pub async fn commit(self) -> StoreResult<()> {
        if self.shared {
            return Ok(());
        }
        match Arc::try_unwrap(self.tx) {
            Ok(tx) => tx.commit().await?,
            Err(_) => return Err(StoreError::corrupt("a transaction of its own was shared")),
        }
        Ok(())
    }

    /// Runs a raw SQL query in this transaction and returns the first column of every row as
    /// text. Tests use it to prove that row-level security holds even when a query forgets its
    /// tenant filter; the service never builds SQL from strings.
    pub async fn raw_query_strings(&self, sql: &str) -> StoreResult<Vec<String>> {
        let rows = self
            .tx
            .query_all_raw(Statement::from_string(self.tx.get_database_backend(), sql))
            .await?;
        rows.into_iter()
            .map(|row| {
                row.try_get_by_index::<String>(0)
                    .or_else(|_| row.try_get_by_index::<uuid::Uuid>(0).map(|u| u.to_string()))
                    .map_err(StoreError::from)
            })
            .collect()
    }
}

tokio::task_local! {
    static READ_SCOPE: ReadScope;
}

/// One read transaction for everything a read-only request reads (ADR 0012): inside
/// [`ReadScope::run`], [`Store::read`] hands out the scope's transaction, opened by the first read
/// and bound to that read's tenant, instead of opening one per resolver. A GraphQL request made
/// only of queries runs in one, its authentication included; on PostgreSQL that saves
/// `BEGIN`, the tenant binding and `COMMIT` per read, on both backends a pooled connection per
/// read, and the request reads one consistent state of the tenant on SQLite.
///
/// Guarantees: a read of another tenant or another store opens its own transaction; once the
/// scope begins a write transaction ([`Store::begin`], a writing system transaction), later reads
/// open their own, so that they see what it committed; the shared transaction only reads
/// (read-only on PostgreSQL) and ends when the scope and every handle to it are dropped: it is
/// rolled back, which ends a transaction that only read as a commit would, without the request
/// waiting for it (the rollback is queued on the connection and sent by the pool with the check
/// it runs on every returned connection; a commit was one more round trip before the answer, on
/// SQLite a hand-over to the connection's thread and back). Work spawned from the scope (a
/// DataLoader's batch) joins it through [`ReadScope::run`] too.
#[derive(Clone, Default)]
pub struct ReadScope(Arc<ReadScopeInner>);

#[derive(Default)]
struct ReadScopeInner {
    tx: tokio::sync::OnceCell<SharedRead>,
    wrote: std::sync::atomic::AtomicBool,
}

struct SharedRead {
    tenant_id: TenantId,
    origin: uuid::Uuid,
    auth_version: Option<i64>,
    tx: Arc<conn::Conn>,
}

impl ReadScope {
    pub fn new() -> ReadScope {
        ReadScope::default()
    }

    /// The scope the current task runs in, if any.
    pub fn current() -> Option<ReadScope> {
        READ_SCOPE.try_with(Clone::clone).ok()
    }

    /// Runs `work` inside this scope.
    pub async fn run<F: std::future::Future>(&self, work: F) -> F::Output {
        READ_SCOPE.scope(self.clone(), work).await
    }

    fn note_write() {
        let _ = READ_SCOPE.try_with(|scope| {
            scope
                .0
                .wrote
                .store(true, std::sync::atomic::Ordering::Relaxed)
        });
    }

    /// The shared transaction for a read of `tenant_id` on `store`, opened by the first caller
    /// (concurrent first callers wait for it); `None` when this read must have its own.
    async fn shared(&self, store: &Store, tenant_id: TenantId) -> StoreResult<Option<TenantTx>> {
        if self.0.wrote.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let shared = self
            .0
            .tx
            .get_or_try_init(|| async {
                let (tx, auth_version) = store.open_read(tenant_id).await?;
                Ok::<_, StoreError>(SharedRead {
                    tenant_id,
                    origin: store.origin,
                    auth_version,
                    tx: Arc::new(conn::Conn::new(tx)),
                })
            })
            .await?;
        if shared.tenant_id != tenant_id || shared.origin != store.origin {
            return Ok(None);
        }
        Ok(Some(TenantTx::handle(
            shared.tx.clone(),
            true,
            tenant_id,
            shared.origin,
            shared.auth_version,
        )))
    }
}

/// A transaction that may scan across tenants; see [`Store::begin_system`].
pub struct SystemTx {
    tx: DatabaseTransaction,
}

impl SystemTx {
    pub(crate) fn conn(&self) -> &DatabaseTransaction {
        &self.tx
    }

    pub async fn commit(self) -> StoreResult<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

/// Retries a unit of work when the database reports a transient conflict.
pub async fn with_retry<T, F, Fut>(mut attempt: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(error) if error.is_retryable() && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10 * (1 << tries))).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The read scope on SQLite, where a deferred transaction keeps the snapshot of its first
    //! read: what a read sees tells whether it shared the scope's transaction.

    use super::scratch::add_tenant;
    use super::*;

    async fn open(dir: &std::path::Path) -> Store {
        super::scratch::on_sqlite(dir, 4).await
    }

    async fn tenants_seen(tx: &TenantTx) -> usize {
        tx.raw_query_strings("SELECT slug FROM tenants")
            .await
            .expect("the tenants")
            .len()
    }

    #[tokio::test]
    async fn every_sqlite_connection_keeps_the_large_page_cache() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = open(dir.path()).await;
        let tenant = add_tenant(&store, "cache").await;
        // Four read transactions at once hold the pool's four connections.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(store.read(tenant).await.expect("a read"));
        }
        for tx in &held {
            let rows = tx
                .conn()
                .query_all_raw(Statement::from_string(
                    DbBackend::Sqlite,
                    "PRAGMA cache_size",
                ))
                .await
                .expect("the cache size");
            let kib: i64 = rows[0].try_get_by_index(0).expect("an integer");
            assert_eq!(kib, -i64::from(SQLITE_CACHE_KIB));
        }
    }

    #[tokio::test]
    async fn reads_in_a_scope_share_one_transaction_until_the_scope_writes() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = open(dir.path()).await;
        let tenant = add_tenant(&store, "first").await;
        let scope = ReadScope::new();
        let other = store.clone();
        scope
            .run(async {
                let first = store.read(tenant).await.expect("a read");
                assert_eq!(tenants_seen(&first).await, 1);
                first
                    .commit()
                    .await
                    .expect("a shared handle commits nothing");
                // Committed by work outside the scope (its own task).
                tokio::spawn(async move { add_tenant(&other, "second").await })
                    .await
                    .expect("the writer");
                let second = store.read(tenant).await.expect("a second read");
                assert_eq!(
                    tenants_seen(&second).await,
                    1,
                    "a second read of the scope sees the scope's snapshot"
                );
                drop(second);
                // A read of another tenant opens its own transaction, with a fresh snapshot.
                let elsewhere = store.read(TenantId(uuid::Uuid::new_v4())).await.unwrap();
                assert_eq!(tenants_seen(&elsewhere).await, 2);
                drop(elsewhere);
                // Once the scope writes, its reads are its own again and see the write.
                add_tenant(&store, "third").await;
                let after = store.read(tenant).await.expect("a read after the write");
                assert_eq!(tenants_seen(&after).await, 3);
            })
            .await;
        drop(scope);
        // Outside any scope every read is its own.
        let outside = store.read(tenant).await.expect("a read");
        assert_eq!(tenants_seen(&outside).await, 3);
    }

    /// sqlx 0.9.0 leaves Nagle's algorithm on (see `nodelay`); every connection the pool opens
    /// over TCP has it off, seen on the socket whose local port PostgreSQL reports for it.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn every_pooled_connection_over_tcp_has_nagles_algorithm_off() {
        let Ok(url) = std::env::var("CDP_TEST_POSTGRES_URL") else {
            eprintln!("CDP_TEST_POSTGRES_URL not set; skipped");
            return;
        };
        if nodelay::tcp_port(&url).is_none() {
            eprintln!("CDP_TEST_POSTGRES_URL is a Unix socket; skipped");
            return;
        }
        let store = Store::connect(&StoreOptions {
            url,
            max_connections: 3,
            min_connections: 1,
        })
        .await
        .unwrap();
        // Three transactions at once hold three connections of the pool (read-write ones: a
        // read transaction also reads the tenant registry, which this unmigrated database lacks).
        let tenant = TenantId(uuid::Uuid::new_v4());
        let mut open = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let tx = store.begin(tenant).await.unwrap();
            let port = tx
                .raw_query_strings(
                    "SELECT client_port::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                )
                .await
                .unwrap();
            ports.push(port[0].parse::<u16>().unwrap());
            open.push(tx);
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 3, "three connections: {ports:?}");
        for port in ports {
            assert_eq!(
                nodelay::nodelay_of_local_port(port).unwrap(),
                Some(true),
                "the connection from local port {port}"
            );
        }
    }

    #[tokio::test]
    async fn a_read_transaction_is_read_only_and_bound_to_its_tenant_on_postgres() {
        let outcome = scratch::on_postgres("cdp_scope", 2, |store| async move {
            let tenant = TenantId(uuid::Uuid::new_v4());
            let settings = "SELECT current_setting('transaction_read_only') || ' ' || \
                            current_setting('app.tenant_id')";
            let read = store.read(tenant).await.unwrap();
            let seen = read.raw_query_strings(settings).await.unwrap();
            drop(read);
            let scope = ReadScope::new();
            let shared = scope
                .run(async {
                    let shared = store.read(tenant).await.unwrap();
                    shared.raw_query_strings(settings).await.unwrap()
                })
                .await;
            drop(scope);
            let write = store.begin(tenant).await.unwrap();
            let written = write.raw_query_strings(settings).await.unwrap();
            (seen, shared, written)
        })
        .await;
        let Some((seen, shared, written)) = outcome else {
            return;
        };
        let tenant_of = |lines: &[String]| lines[0].split(' ').nth(1).map(str::to_owned);
        assert!(seen[0].starts_with("on "), "{seen:?}");
        assert!(shared[0].starts_with("on "), "{shared:?}");
        assert!(written[0].starts_with("off "), "{written:?}");
        assert_eq!(tenant_of(&seen), tenant_of(&written));
    }

    /// The write path's start as ingestion makes it: a transaction bound to the tenant in one
    /// statement with the tenant's segment barrier, held shared until it ends (a full build's
    /// exclusive lock cannot be had meanwhile), then the tenant's row.
    async fn writing(
        store: &Store,
        tenant: TenantId,
    ) -> StoreResult<(TenantTx, tenants::TenantRow)> {
        let tx = store.begin_writing(tenant).await?;
        let row = tenants::get(&tx).await?;
        Ok((tx, row))
    }

    /// [`writing`]: bound, holding the barrier, with the tenant's row as of the barrier's grant;
    /// an unknown tenant is `NotFound`.
    #[tokio::test]
    async fn a_writing_transaction_is_bound_holds_the_barrier_and_has_the_tenant_on_postgres() {
        let outcome = scratch::on_postgres("cdp_writing", 3, |store| async move {
            let tenant = add_tenant(&store, "writing").await;
            let (class, key) = segments::barrier_key(tenant);
            let exclusive = format!("SELECT pg_try_advisory_xact_lock({class}, {key})::text");
            let (tx, row) = writing(&store, tenant).await.unwrap();
            let bound = tx
                .raw_query_strings("SELECT current_setting('app.tenant_id')")
                .await
                .unwrap();
            let other = store.begin(TenantId(uuid::Uuid::new_v4())).await.unwrap();
            let while_held = other.raw_query_strings(&exclusive).await.unwrap();
            drop(other);
            tx.commit().await.unwrap();
            let other = store.begin(TenantId(uuid::Uuid::new_v4())).await.unwrap();
            let after = other.raw_query_strings(&exclusive).await.unwrap();
            drop(other);
            let unknown = writing(&store, TenantId(uuid::Uuid::new_v4())).await.err();
            // A change made under the exclusive barrier (as a segment build or a key change
            // makes one) and committed while the writer waits for the barrier is what the
            // writer reads.
            let holder = store.begin(tenant).await.unwrap();
            segments::barrier(&holder, Backend::Postgres, true)
                .await
                .unwrap();
            let waiting = tokio::spawn({
                let store = store.clone();
                async move { writing(&store, tenant).await.map(|(_, row)| row.name) }
            });
            let waits = "SELECT count(*)::text FROM pg_stat_activity \
                         WHERE datname = current_database() \
                         AND wait_event_type = 'Lock' AND wait_event = 'advisory'";
            let observer = store.begin(TenantId(uuid::Uuid::new_v4())).await.unwrap();
            while observer.raw_query_strings(waits).await.unwrap() != vec!["1".to_owned()] {
                tokio::task::yield_now().await;
            }
            drop(observer);
            holder
                .raw_query_strings("UPDATE tenants SET name = 'Renamed' RETURNING name")
                .await
                .unwrap();
            holder.commit().await.unwrap();
            let seen_after_wait = waiting.await.unwrap().unwrap();
            (
                tenant,
                row,
                bound,
                while_held,
                after,
                unknown,
                seen_after_wait,
            )
        })
        .await;
        let Some((tenant, row, bound, while_held, after, unknown, seen_after_wait)) = outcome
        else {
            return;
        };
        assert_eq!(
            seen_after_wait, "Renamed",
            "the row as of the barrier's grant"
        );
        assert_eq!(row.id, tenant.as_uuid());
        assert_eq!(row.slug, "writing");
        assert_eq!(bound, vec![tenant.to_string()]);
        assert_eq!(while_held, vec!["false".to_owned()], "the barrier is held");
        assert_eq!(after, vec!["true".to_owned()], "and released at the end");
        assert!(matches!(unknown, Some(StoreError::NotFound)), "{unknown:?}");
    }
}

/// A fresh, migrated PostgreSQL database for one test, dropped afterwards.
#[cfg(test)]
pub(crate) mod scratch {
    use super::{tenants, Store, StoreOptions};
    use domain::{TenantId, TenantName, TenantSlug};
    use sea_orm::ConnectionTrait;
    use std::future::Future;

    /// A store on a new SQLite file in `dir`, migrated.
    pub(crate) async fn on_sqlite(dir: &std::path::Path, max_connections: u32) -> Store {
        let store = Store::connect(&StoreOptions {
            url: format!("sqlite://{}?mode=rwc", dir.join("store.db").display()),
            max_connections,
            min_connections: 1,
        })
        .await
        .expect("a store");
        store.migrate().await.expect("migrations");
        store
    }

    /// A new tenant of `store`, committed.
    pub(crate) async fn add_tenant(store: &Store, slug: &str) -> TenantId {
        let tenant_id = TenantId(uuid::Uuid::new_v4());
        let tx = store.begin(tenant_id).await.expect("a write transaction");
        tenants::create(
            &tx,
            &TenantSlug::parse(slug).expect("a slug"),
            &TenantName::parse("Test tenant").expect("a name"),
            chrono::Utc::now(),
        )
        .await
        .expect("a tenant");
        tx.commit().await.expect("committed");
        tenant_id
    }

    /// Runs `test` on a store over a new database named after `prefix`, migrated, on the server
    /// of `CDP_TEST_POSTGRES_URL`; drops the database whatever the outcome, then gives the
    /// outcome back (a panic inside `test` panics here, after the drop). `None` when the
    /// variable is not set.
    pub(crate) async fn on_postgres<T, F, Fut>(
        prefix: &str,
        max_connections: u32,
        test: F,
    ) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce(Store) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let Ok(admin_url) = std::env::var("CDP_TEST_POSTGRES_URL") else {
            eprintln!("CDP_TEST_POSTGRES_URL not set; skipped");
            return None;
        };
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let admin = sea_orm::Database::connect(&admin_url).await.unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let base = admin_url.rsplit_once('/').map(|(base, _)| base).unwrap();
        let store = Store::connect(&StoreOptions {
            url: format!("{base}/{name}"),
            max_connections,
            min_connections: 1,
        })
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let outcome = tokio::spawn(test(store)).await;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
        Some(outcome.expect("the test's checks"))
    }
}

#[cfg(test)]
mod any_of_tests {
    //! The text of an `any_of` filter does not depend on how many values it holds on PostgreSQL,
    //! so that sqlx prepares it once per connection.

    use super::{any_of, entity::consents, Backend};
    use sea_orm::sea_query::ArrayType;
    use sea_orm::{DbBackend, EntityTrait, QueryFilter, QueryTrait};

    fn sql(backend: Backend, count: usize) -> String {
        let ids = (0..count).map(|_| uuid::Uuid::new_v4());
        let db = match backend {
            Backend::Postgres => DbBackend::Postgres,
            Backend::Sqlite => DbBackend::Sqlite,
        };
        consents::Entity::find()
            .filter(any_of(
                backend,
                consents::Column::ProfileId,
                ArrayType::Uuid,
                ids,
            ))
            .build(db)
            .sql
    }

    #[test]
    fn one_statement_text_for_any_number_of_values_on_postgres() {
        let one = sql(Backend::Postgres, 1);
        assert_eq!(one, sql(Backend::Postgres, 7));
        assert!(one.contains("= ANY($1)"), "{one}");
        // SQLite has no arrays: an IN list, whose text grows with the values.
        assert_ne!(sql(Backend::Sqlite, 1), sql(Backend::Sqlite, 7));
    }
}

#[cfg(test)]
mod tls_by_default {
    //! Which PostgreSQL connections run without TLS by default (ADR 0014).

    use super::{plain_on_loopback, sslmode_in_url};
    use sea_orm::sqlx::postgres::PgConnectOptions;
    use std::str::FromStr;

    #[test]
    fn a_url_that_names_an_sslmode_is_taken_as_it_is() {
        assert!(sslmode_in_url("postgres://u@127.0.0.1/cdp?sslmode=prefer"));
        assert!(sslmode_in_url(
            "postgres://u@db/cdp?application_name=x&SSLMODE=require"
        ));
        assert!(sslmode_in_url("postgres://u@db/cdp?ssl-mode=disable"));
        assert!(!sslmode_in_url("postgres://u@127.0.0.1/cdp"));
        assert!(!sslmode_in_url("postgres://u@db/cdp?sslrootcert=/ca.pem"));
    }

    /// The decision of `StoreOptions::connect_options` for `url`, with `PGSSLMODE` unset or set.
    fn without_tls(url: &str, pgsslmode_set: bool) -> bool {
        plain_on_loopback(
            url,
            &PgConnectOptions::from_str(url).expect("a URL"),
            pgsslmode_set,
        )
    }

    #[test]
    fn only_loopback_over_tcp_at_the_default_mode_goes_without_tls() {
        for url in [
            "postgres://u@127.0.0.1:5432/cdp",
            "postgres://u@127.0.0.2/cdp",
            "postgres://u@localhost/cdp",
            "postgres://u@[::1]:5432/cdp",
        ] {
            assert!(without_tls(url, false), "{url}");
            assert!(!without_tls(url, true), "{url} with PGSSLMODE set");
        }
        for url in [
            "postgres://u@db.internal/cdp",
            "postgres://u@10.0.0.5/cdp",
            "postgres://u@localhost/cdp?host=/var/run/postgresql",
            "postgres://u@127.0.0.1/cdp?sslmode=prefer",
            "postgres://u@127.0.0.1/cdp?sslmode=require",
            "postgres://u@127.0.0.1/cdp?sslmode=disable",
        ] {
            assert!(!without_tls(url, false), "{url}");
        }
    }
}
