//! The test harness: fresh databases, the real server on an ephemeral port, a GraphQL client and
//! an SMTP sink.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod smtp;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use api::config::Config;
pub use api::service::{Clock, ManualClock, SystemClock};
use api::startup::Application;
use sea_orm::{ConnectionTrait, Database};
use serde_json::{json, Value};

pub use smtp::{ReceivedMail, SmtpSink};

/// How long a test waits for something asynchronous (an email) before failing.
pub const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// SQLite always; PostgreSQL as well when `CDP_TEST_POSTGRES_URL` is set.
pub fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Sqlite];
    if postgres_admin_url().is_some() {
        backends.push(Backend::Postgres);
    }
    backends
}

pub fn postgres_admin_url() -> Option<String> {
    std::env::var("CDP_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

/// The login role the service runs as in PostgreSQL tests: a member of `cdp_app`, owning
/// nothing and unable to bypass row-level security, exactly as operators are told to run it.
pub const PG_SERVICE_LOGIN: &str = "cdp_test_service";

/// A fresh database, dropped when the last handle goes.
pub struct TestDb {
    pub backend: Backend,
    /// The URL the service uses (on PostgreSQL: the non-owner login role).
    pub service_url: String,
    /// The URL of the owner (on SQLite the same file).
    pub owner_url: String,
    pub data_dir: PathBuf,
    postgres: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

fn with_user_and_db(url: &str, user: &str, db: &str) -> String {
    let mut parsed = reqwest::Url::parse(url).expect("CDP_TEST_POSTGRES_URL is a URL");
    parsed.set_username(user).expect("url takes a user");
    parsed.set_password(None).expect("url takes no password");
    parsed.set_path(&format!("/{db}"));
    parsed.to_string()
}

impl TestDb {
    pub async fn create(backend: Backend) -> Arc<TestDb> {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().to_path_buf();
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}?mode=rwc", data_dir.join("cdp.db").display());
                Arc::new(TestDb {
                    backend,
                    service_url: url.clone(),
                    owner_url: url,
                    data_dir,
                    postgres: None,
                    _dir: dir,
                })
            }
            Backend::Postgres => {
                let admin_url = postgres_admin_url().expect("postgres configured");
                let name = format!("cdp_t_{}", uuid::Uuid::new_v4().simple());
                let admin = Database::connect(&admin_url)
                    .await
                    .expect("connect to postgres");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                let owner_user = reqwest::Url::parse(&admin_url)
                    .unwrap()
                    .username()
                    .to_owned();
                let owner_url = with_user_and_db(&admin_url, &owner_user, &name);
                // Migrate as the owner, which also creates the cdp_app role.
                let store = api::store::Store::connect(&api::store::StoreOptions {
                    url: owner_url.clone(),
                    max_connections: 2,
                    min_connections: 1,
                })
                .await
                .expect("connect as owner");
                store.migrate().await.expect("migrate");
                // `CDP_TEST_PARTITION_EVENTS=month` (or week, day) runs the suite on a
                // partitioned events table, as `cdp events partition` makes it.
                if let Some(interval) = std::env::var("CDP_TEST_PARTITION_EVENTS")
                    .ok()
                    .filter(|value| !value.is_empty())
                {
                    let interval = api::store::partitions::Interval::parse(&interval)
                        .expect("CDP_TEST_PARTITION_EVENTS is day, week or month");
                    api::store::partitions::convert(&store, interval)
                        .await
                        .expect("partition the events table");
                }
                admin
                    .execute_unprepared(&format!(
                        "DO $$ BEGIN
                           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{PG_SERVICE_LOGIN}') THEN
                             CREATE ROLE {PG_SERVICE_LOGIN} LOGIN NOSUPERUSER NOBYPASSRLS;
                           END IF;
                         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
                         END $$;
                         GRANT cdp_app TO {PG_SERVICE_LOGIN};"
                    ))
                    .await
                    .expect("create the service login role");
                Arc::new(TestDb {
                    backend,
                    service_url: with_user_and_db(&admin_url, PG_SERVICE_LOGIN, &name),
                    owner_url,
                    data_dir,
                    postgres: Some((admin_url, name)),
                    _dir: dir,
                })
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs inside the test's runtime; use a separate thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(admin) = Database::connect(&admin_url).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Server logs go to the test's captured output (shown when a test fails); `CDP_TEST_LOG` sets
/// the filter (default `warn`).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("CDP_TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}

/// A running server with its own database and SMTP sink.
pub struct TestServer {
    pub app: Option<Application>,
    pub base: String,
    pub client: reqwest::Client,
    pub db: Arc<TestDb>,
    pub backend: Backend,
}

impl TestServer {
    /// A server on a fresh database, sending mail to `smtp`.
    pub async fn start(backend: Backend, smtp: &SmtpSink) -> TestServer {
        let db = TestDb::create(backend).await;
        TestServer::start_on(db, Some(smtp), |_| {}).await
    }

    /// A server on an existing database, with a chance to adjust the configuration.
    pub async fn start_on(
        db: Arc<TestDb>,
        smtp: Option<&SmtpSink>,
        configure: impl FnOnce(&mut Config),
    ) -> TestServer {
        TestServer::start_with_clock(db, smtp, configure, Arc::new(SystemClock)).await
    }

    /// A server whose time comes from `clock` (a [`ManualClock`] in tests of time windows).
    pub async fn start_with_clock(
        db: Arc<TestDb>,
        smtp: Option<&SmtpSink>,
        configure: impl FnOnce(&mut Config),
        clock: Arc<dyn Clock>,
    ) -> TestServer {
        let mut config = Config::for_tests(&db.data_dir, &db.service_url);
        config.smtp_url = smtp.map(SmtpSink::url);
        configure(&mut config);
        let app = api::startup::build_with_clock(config, clock)
            .await
            .expect("server starts");
        let base = format!("http://{}", app.address());
        TestServer {
            app: Some(app),
            base,
            client: reqwest::Client::new(),
            backend: db.backend,
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Posts one GraphQL operation and returns the whole JSON response.
    pub async fn gql(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let mut request = self
            .client
            .post(self.url("/graphql"))
            .json(&json!({"query": query, "variables": variables}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request sent");
        response.json().await.expect("JSON response")
    }

    /// Posts one operation and returns `data`, failing the test on any error.
    pub async fn gql_ok(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let response = self.gql(token, query, variables).await;
        assert!(
            response.get("errors").is_none(),
            "[{:?}] unexpected errors: {response:#}",
            self.backend
        );
        response["data"].clone()
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await.expect("server stops cleanly");
        }
    }
}

/// The error code of the first error of a response, failing the test when there is none.
pub fn error_code(response: &Value) -> String {
    response["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error with a code, got {response:#}"))
        .to_owned()
}

/// Extracts `TOKEN` from a `…?token=TOKEN` link in a text.
pub fn token_from_link(text: &str, path: &str) -> String {
    let marker = format!("{path}?token=");
    let start = text
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker} link in {text}"))
        + marker.len();
    text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

/// The last email received for `to` (waiting until `count` emails arrived in total).
pub async fn mail_to(smtp: &SmtpSink, count: usize, to: &str) -> ReceivedMail {
    let mails = smtp.wait_for(count, WAIT).await;
    mails
        .into_iter()
        .rev()
        .find(|mail| mail.to.iter().any(|address| address == to))
        .unwrap_or_else(|| panic!("no email to {to} among the first {count}"))
}

/// A signed-in user.
#[derive(Debug, Clone)]
pub struct Session {
    pub access_token: String,
    pub refresh_token: String,
    pub user_id: String,
    pub tenant_id: String,
}

pub const SIGN_UP: &str = "mutation($input: SignUpInput!) { signUp(input: $input) { tenant { id slug name } user { id email status roles } } }";
pub const ACTIVATE: &str = "mutation($token: String!, $password: String!) { activateAccount(token: $token, password: $password) { accessToken refreshToken expiresAt user { id email status roles } } }";
pub const LOGIN: &str = "mutation($slug: String!, $email: String!, $password: String!) { login(tenantSlug: $slug, email: $email, password: $password) { accessToken refreshToken expiresAt user { id status } } }";
pub const PASSWORD: &str = "correct horse battery staple";

/// Signs up a tenant, activates its owner through the emailed link, and returns the session.
/// `mails_before` is the number of emails the sink already holds.
pub async fn new_tenant(server: &TestServer, smtp: &SmtpSink, slug: &str, email: &str) -> Session {
    let before = smtp.received().len();
    let data = server
        .gql_ok(
            None,
            SIGN_UP,
            json!({"input": {"tenantName": format!("{slug} Inc"), "tenantSlug": slug, "email": email}}),
        )
        .await;
    let tenant_id = data["signUp"]["tenant"]["id"].as_str().unwrap().to_owned();
    let mail = mail_to(smtp, before + 1, email).await;
    let token = token_from_link(&mail.text(), "/activate");
    let data = server
        .gql_ok(
            None,
            ACTIVATE,
            json!({"token": token, "password": PASSWORD}),
        )
        .await;
    let payload = &data["activateAccount"];
    Session {
        access_token: payload["accessToken"].as_str().unwrap().to_owned(),
        refresh_token: payload["refreshToken"].as_str().unwrap().to_owned(),
        user_id: payload["user"]["id"].as_str().unwrap().to_owned(),
        tenant_id,
    }
}

/// Invites a user with roles and activates them through the emailed link.
pub async fn invited_user(
    server: &TestServer,
    smtp: &SmtpSink,
    admin: &Session,
    email: &str,
    roles: &[&str],
) -> Session {
    let before = smtp.received().len();
    let data = server
        .gql_ok(
            Some(&admin.access_token),
            "mutation($email: String!, $roles: [String!]!) { inviteUser(email: $email, roles: $roles) { id status roles } }",
            json!({"email": email, "roles": roles}),
        )
        .await;
    assert_eq!(data["inviteUser"]["status"], "PENDING");
    let mail = mail_to(smtp, before + 1, email).await;
    let token = token_from_link(&mail.text(), "/activate");
    let data = server
        .gql_ok(
            None,
            ACTIVATE,
            json!({"token": token, "password": PASSWORD}),
        )
        .await;
    let payload = &data["activateAccount"];
    Session {
        access_token: payload["accessToken"].as_str().unwrap().to_owned(),
        refresh_token: payload["refreshToken"].as_str().unwrap().to_owned(),
        user_id: payload["user"]["id"].as_str().unwrap().to_owned(),
        tenant_id: admin.tenant_id.clone(),
    }
}

/// A unique tenant slug for a test.
pub fn slug(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Creates a WRITE key (a source) with a channel and returns its secret.
pub async fn write_key(server: &TestServer, admin: &Session, name: &str, channel: &str) -> String {
    let data = server
        .gql_ok(
            Some(&admin.access_token),
            "mutation($n: String!, $c: SourceChannel!) { createApiKey(name: $n, scope: WRITE, channel: $c) { secret } }",
            json!({"n": name, "c": channel}),
        )
        .await;
    data["createApiKey"]["secret"].as_str().unwrap().to_owned()
}

/// Posts to the collection API with HTTP Basic auth; returns the status and the JSON body.
pub async fn collect(server: &TestServer, path: &str, key: &str, body: &Value) -> (u16, Value) {
    let response = server
        .client
        .post(server.url(path))
        .basic_auth(key, Some(""))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The profile holding an identity, with the fields most tests look at.
pub async fn profile_by(server: &TestServer, token: &str, kind: &str, value: &str) -> Value {
    let data = server
        .gql_ok(
            Some(token),
            "query($k: String!, $v: String!) { profileByIdentity(kind: $k, value: $v) {
                id traits channels eventCount firstSeenAt lastSeenAt mergedIds
                identities { kind value } consents { purpose granted }
                groups { groupId traits }
                mergeLedger { action rule identityKind identityValue otherProfileId messageId }
                events(first: 100) { totalCount edges { node { type name properties messageId channel } } }
            } }",
            json!({"k": kind, "v": value}),
        )
        .await;
    data["profileByIdentity"].clone()
}

/// The accepted-message count of the tenant's sources, from the data-quality view.
pub async fn data_quality(server: &TestServer, token: &str) -> Value {
    server
        .gql_ok(
            Some(token),
            "{ dataQuality { sourceId name channel accepted duplicates rejected { reason count } warnings { reason count } } }",
            json!({}),
        )
        .await["dataQuality"]
        .clone()
}

/// The tables of a database that have a column of this name, read from the catalog as the
/// owner (tests that check a list of tables against the schema).
pub async fn tables_with_column(db: &TestDb, column: &str) -> std::collections::BTreeSet<String> {
    let owner = Database::connect(&db.owner_url).await.unwrap();
    let sql = match db.backend {
        Backend::Sqlite => {
            "SELECT m.name FROM sqlite_master m WHERE m.type = 'table'
             AND EXISTS (SELECT 1 FROM pragma_table_info(m.name) p WHERE p.name = ?)"
        }
        // Partitions (of a partitioned events table) are not tables of the schema of their own.
        Backend::Postgres => {
            "SELECT c.relname::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND NOT a.attisdropped
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND a.attname = $1"
        }
    };
    owner
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            owner.get_database_backend(),
            sql,
            [column.into()],
        ))
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.try_get_by_index::<String>(0).unwrap())
        .collect()
}

/// A WebSocket to `/graphql/ws` speaking `protocol` (the server must agree to it).
pub async fn open_socket(
    server: &TestServer,
    protocol: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = server
        .url("/graphql/ws")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket upgrade");
    assert_eq!(response.headers()["sec-websocket-protocol"], protocol);
    socket
}
