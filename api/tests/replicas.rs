//! Two real `cdp serve` processes on one PostgreSQL database work as one service: a session
//! opened on one is good on the other, a subscriber on one receives what the other ingested, a
//! campaign's emails are sent once each although both processes' outbox workers run, and the
//! scheduler ticks a tenant once per interval although both processes' schedulers run.
//!
//! PostgreSQL only (`CDP_TEST_POSTGRES_URL`): SQLite is served by one process. The harness of the
//! black-box suite (`tests/suite/support`) is shared, not copied: it makes the fresh database, the
//! service's login role and the SMTP sink the processes send to.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// Not every helper of the suite is used here.
#[allow(unused_imports)]
#[path = "../../tests/suite/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sea_orm::{ConnectionTrait, Database, Statement, TransactionTrait};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use support::{token_from_link, Backend, SmtpSink, TestDb, ACTIVATE, PASSWORD, SIGN_UP, WAIT};

/// The scheduler's interval in both processes.
const TICK: Duration = Duration::from_secs(1);
/// Recipients of the campaign.
const RECIPIENTS: usize = 40;

/// One `cdp serve` process, killed when dropped.
struct Replica {
    name: &'static str,
    child: Child,
    base: String,
    /// Its log, one JSON object a line.
    logs: Arc<Mutex<Vec<Value>>>,
    client: reqwest::Client,
    _data_dir: tempfile::TempDir,
}

impl Replica {
    /// Starts `cdp serve` on an ephemeral port and waits until it is ready.
    async fn start(name: &'static str, db: &TestDb, smtp: &SmtpSink) -> Replica {
        let data_dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cdp"));
        command.arg("serve");
        // Nothing of the caller's configuration leaks in.
        for (key, _) in std::env::vars() {
            if key.starts_with("CDP_") {
                command.env_remove(key);
            }
        }
        command
            .env("CDP_DATABASE_URL", &db.service_url)
            .env("CDP_DATA_DIR", data_dir.path())
            .env("CDP_LISTEN", "127.0.0.1:0")
            .env("CDP_PUBLIC_URL", "http://cdp.test")
            // Replicas share their secrets: a token signed by one is checked by the other.
            .env(
                "CDP_JWT_SECRET",
                "replicas-test-secret-replicas-test-secret-0123456789",
            )
            .env(
                "CDP_ENCRYPTION_KEY",
                "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
            )
            .env("CDP_SMTP_URL", smtp.url())
            .env("CDP_MAIL_FROM", "CDP <no-reply@cdp.test>")
            .env("CDP_SCHEDULER_TICK_SECS", TICK.as_secs().to_string())
            .env("CDP_OUTBOX_WORKERS", "2")
            .env("CDP_OUTBOX_POLL_MS", "50")
            .env("CDP_RATE_LIMIT_GRAPHQL_PER_IP", "0")
            .env("CDP_RATE_LIMIT_GRAPHQL_PER_TENANT", "0")
            .env("CDP_RATE_LIMIT_INGEST_PER_IP", "0")
            .env("CDP_LOG_FORMAT", "json")
            .env(
                "CDP_LOG",
                "warn,api::startup=info,api::jobs::outbox=info,api::jobs::scheduler=debug",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("cdp serve starts");

        // The log tells the address the process bound; every line is kept for the assertions.
        let logs: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (address_tx, address_rx) = tokio::sync::oneshot::channel::<String>();
        let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = logs.clone();
        std::thread::spawn(move || {
            let mut address_tx = Some(address_tx);
            for line in lines.map_while(Result::ok) {
                // Shown when the test fails.
                eprintln!("[{name}] {line}");
                let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if entry["fields"]["message"] == "serving" {
                    if let (Some(address), Some(sender)) =
                        (entry["fields"]["address"].as_str(), address_tx.take())
                    {
                        let _ = sender.send(address.to_owned());
                    }
                }
                kept.lock().unwrap().push(entry);
            }
        });
        let address = tokio::time::timeout(WAIT, address_rx)
            .await
            .unwrap_or_else(|_| panic!("{name} says where it serves in time"))
            .unwrap_or_else(|_| panic!("{name} exited before serving"));
        let replica = Replica {
            name,
            child,
            base: format!("http://{address}"),
            logs,
            client: reqwest::Client::new(),
            _data_dir: data_dir,
        };
        let ready = replica.url("/readyz");
        eventually(&format!("{name} is ready"), || async {
            let response = replica.client.get(&ready).send().await.ok()?;
            (response.status() == 200).then_some(())
        })
        .await;
        replica
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn gql(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let mut request = self
            .client
            .post(self.url("/graphql"))
            .json(&json!({"query": query, "variables": variables}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap().json().await.unwrap()
    }

    async fn gql_ok(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let response = self.gql(token, query, variables).await;
        assert!(
            response.get("errors").is_none(),
            "[{}] unexpected errors: {response:#}",
            self.name
        );
        response["data"].clone()
    }

    async fn ingest(&self, key: &str, messages: Value) {
        let response = self
            .client
            .post(self.url("/v1/batch"))
            .basic_auth(key, Some(""))
            .json(&json!({ "batch": messages }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (status, body),
            (200, json!({"success": true})),
            "{}",
            self.name
        );
    }

    /// The log entries whose message is `message`.
    fn logged(&self, message: &str) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|entry| entry["fields"]["message"] == message)
            .cloned()
            .collect()
    }

    /// Stops the process as an orchestrator does (SIGTERM), and waits until it has finished its
    /// work in progress and exited.
    async fn terminate(mut self) -> Replica {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let name = self.name;
        let exit = eventually(&format!("{name} stops"), || {
            let exit = self.child.try_wait().unwrap();
            async move { exit }
        })
        .await;
        assert!(exit.success(), "{name} exits cleanly: {exit:?}");
        self
    }
}

impl Drop for Replica {
    /// A process still running when the test ends (or fails) is killed.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `probe` until it gives a value, failing the test after [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A `graphql-transport-ws` socket signed in with `token`.
async fn subscriber(replica: &Replica, token: &str) -> Socket {
    let mut request = replica
        .url("/graphql/ws")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
        .send(Message::text(
            json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}})
                .to_string(),
        ))
        .await
        .unwrap();
    let ack = next_message(&mut socket, WAIT)
        .await
        .expect("connection_ack");
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    socket
}

/// The next protocol message other than a ping or pong, or `None` after `within`.
async fn next_message(socket: &mut Socket, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .ok()?;
        match message {
            Some(Ok(Message::Text(text))) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                if matches!(message["type"].as_str(), Some("ping" | "pong")) {
                    continue;
                }
                return Some(message);
            }
            Some(Ok(Message::Close(frame))) => panic!("the socket closed: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(error)) => panic!("the socket failed: {error}"),
            None => panic!("the socket ended"),
        }
    }
}

/// The name of the next `eventIngested` the socket receives within `within`.
async fn next_event_name(socket: &mut Socket, within: Duration) -> Option<String> {
    let message = next_message(socket, within).await?;
    assert_eq!(message["type"], "next", "{message}");
    Some(
        message["payload"]["data"]["eventIngested"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn track(user: &str, event: &str) -> Value {
    json!({"type": "track", "userId": user, "event": event,
           "messageId": uuid::Uuid::new_v4().to_string()})
}

/// How many runs of the tenant's tick the database recorded, read as the owner inside the tenant
/// (row-level security holds for the owner too).
async fn tick_runs(db: &TestDb, tenant_id: &str) -> i64 {
    let owner = Database::connect(&db.owner_url).await.unwrap();
    let tx = owner.begin().await.unwrap();
    tx.execute_raw(Statement::from_sql_and_values(
        tx.get_database_backend(),
        "SELECT set_config('app.tenant_id', $1, true)",
        [tenant_id.into()],
    ))
    .await
    .unwrap();
    let row = tx
        .query_one_raw(Statement::from_sql_and_values(
            tx.get_database_backend(),
            "SELECT runs FROM scheduler_ticks WHERE tenant_id = $1::uuid AND job = 'tick'",
            [tenant_id.into()],
        ))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    owner.close().await.unwrap();
    row.map_or(0, |row| row.try_get_by_index::<i64>(0).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_on_one_database_work_as_one_service() {
    if support::postgres_admin_url().is_none() {
        eprintln!(
            "skipped: replicas share a PostgreSQL database; set CDP_TEST_POSTGRES_URL to run this test"
        );
        return;
    }
    let smtp = SmtpSink::start().await;
    let db = TestDb::create(Backend::Postgres).await;
    let (one, two) = tokio::join!(
        Replica::start("one", &db, &smtp),
        Replica::start("two", &db, &smtp)
    );

    // 1. Sessions are stateless: sign up on one process, activate and sign in on the other, and
    // use the tokens of each on the other.
    let data = one
        .gql_ok(
            None,
            SIGN_UP,
            json!({"input": {"tenantName": "Replicas Inc", "tenantSlug": support::slug("replicas"), "email": "owner@replicas.example"}}),
        )
        .await;
    let tenant_id = data["signUp"]["tenant"]["id"].as_str().unwrap().to_owned();
    let slug = data["signUp"]["tenant"]["slug"]
        .as_str()
        .unwrap()
        .to_owned();
    let mail = support::mail_to(&smtp, 1, "owner@replicas.example").await;
    let activation = token_from_link(&mail.text(), "/activate");
    let activated = two
        .gql_ok(
            None,
            ACTIVATE,
            json!({"token": activation, "password": PASSWORD}),
        )
        .await;
    let token_from_two = activated["activateAccount"]["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let me = "{ me { tenant { id } user { email } } }";
    let seen = one.gql_ok(Some(&token_from_two), me, json!({})).await;
    assert_eq!(seen["me"]["tenant"]["id"], tenant_id.as_str());
    assert_eq!(seen["me"]["user"]["email"], "owner@replicas.example");
    let login = one
        .gql_ok(
            None,
            support::LOGIN,
            json!({"slug": slug, "email": "owner@replicas.example", "password": PASSWORD}),
        )
        .await;
    let token = login["login"]["accessToken"].as_str().unwrap().to_owned();
    let refresh = login["login"]["refreshToken"].as_str().unwrap().to_owned();
    let seen = two.gql_ok(Some(&token), me, json!({})).await;
    assert_eq!(seen["me"]["tenant"]["id"], tenant_id.as_str());
    let refreshed = two
        .gql_ok(
            None,
            "mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken refreshToken } }",
            json!({"t": refresh}),
        )
        .await;
    let refreshed = refreshed["refreshSession"]["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(one.gql_ok(Some(&refreshed), me, json!({})).await["me"]["user"].is_object());
    // The refresh token was rotated on two: one refuses the old one and, since a reused token
    // revokes its whole family, two refuses the family's access token at once.
    let reused = one
        .gql(
            None,
            "mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken } }",
            json!({"t": refresh}),
        )
        .await;
    assert_eq!(
        support::error_code(&reused),
        "UNAUTHENTICATED",
        "{reused:#}"
    );
    let revoked = two.gql(Some(&refreshed), me, json!({})).await;
    assert_eq!(
        support::error_code(&revoked),
        "UNAUTHENTICATED",
        "{revoked:#}"
    );
    let token = token_from_two;
    let key = one
        .gql_ok(
            Some(&token),
            "mutation { createApiKey(name: \"site\", scope: WRITE) { secret } }",
            json!({}),
        )
        .await["createApiKey"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();

    // 2. A subscriber on two receives what one ingested. The subscription and two's listener
    // start asynchronously: probes are ingested on one until the first reaches two.
    let mut socket = subscriber(&two, &token).await;
    socket
        .send(Message::text(
            json!({"type": "subscribe", "id": "e", "payload": {"query": "subscription { eventIngested { name profileId } }"}})
                .to_string(),
        ))
        .await
        .unwrap();
    let mut probes = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        probes += 1;
        one.ingest(&key, json!([track("probe", &format!("Probe {probes}"))]))
            .await;
        if let Some(name) = next_event_name(&mut socket, Duration::from_millis(250)).await {
            assert!(name.starts_with("Probe "), "{name}");
            break;
        }
        assert!(Instant::now() < deadline, "no probe reached two in time");
    }
    one.ingest(&key, json!([track("walker", "Crossed Replicas")]))
        .await;
    // Probes ingested before the first one arrived may still come first.
    loop {
        let name = next_event_name(&mut socket, WAIT)
            .await
            .expect("two's subscriber receives one's event in time");
        if name == "Crossed Replicas" {
            break;
        }
        assert!(name.starts_with("Probe "), "{name}");
    }
    drop(socket);

    // 3. Each email once: both processes' outbox workers (two each) claim from one queue.
    let batch: Vec<Value> = (0..RECIPIENTS)
        .map(|n| {
            json!({"type": "identify", "userId": format!("r{n}"),
                   "traits": {"email": format!("r{n}@replicas.example"), "plan": "pro"},
                   "context": {"consent": {"categoryPreferences": {"email_marketing": true}}},
                   "messageId": uuid::Uuid::new_v4().to_string()})
        })
        .collect();
    two.ingest(&key, Value::Array(batch)).await;
    let segment = two
        .gql_ok(
            Some(&token),
            "mutation($input: SegmentInput!) { createSegment(input: $input) { id status } }",
            json!({"input": {"name": "Pro", "condition": {"trait": "plan", "op": "eq", "value": "pro"}}}),
        )
        .await["createSegment"]
        .clone();
    assert_eq!(segment["status"], "READY");
    let before = smtp.received().len();
    let campaign = one
        .gql_ok(
            Some(&token),
            "mutation($input: CampaignInput!) { createCampaign(input: $input) { id } }",
            json!({"input": {"name": "News", "trigger": {"broadcastSegment": segment["id"]},
                             "subject": "News", "textBody": "News for you"}}),
        )
        .await["createCampaign"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    two.gql_ok(
        Some(&token),
        "mutation($id: ID!) { setCampaignStatus(id: $id, status: ACTIVE) { status } }",
        json!({"id": campaign}),
    )
    .await;
    let stats = "query($id: ID!) { campaign(id: $id) { stats { queued sent failed suppressed } } }";
    let final_stats = eventually("every campaign email is recorded as sent", || async {
        let stats = one
            .gql_ok(Some(&token), stats, json!({"id": campaign}))
            .await["campaign"]["stats"]
            .clone();
        (stats["sent"] == RECIPIENTS && stats["queued"] == 0).then_some(stats)
    })
    .await;
    assert_eq!(
        final_stats,
        json!({"queued": 0, "sent": RECIPIENTS, "failed": 0, "suppressed": 0})
    );
    // Recorded as sent means handed to the sink first: nothing of the campaign is on its way.
    let mails = smtp.received();
    let campaign_mails = &mails[before..];
    assert_eq!(campaign_mails.len(), RECIPIENTS, "exactly one email each");
    let recipients: BTreeSet<&str> = campaign_mails
        .iter()
        .flat_map(|mail| mail.to.iter().map(String::as_str))
        .collect();
    let expected: BTreeSet<String> = (0..RECIPIENTS)
        .map(|n| format!("r{n}@replicas.example"))
        .collect();
    assert_eq!(
        recipients,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    let message_ids: BTreeSet<String> = campaign_mails
        .iter()
        .map(|mail| mail.header("Message-ID").unwrap())
        .collect();
    assert_eq!(message_ids.len(), RECIPIENTS);
    let deliveries = one
        .gql_ok(
            Some(&token),
            "query($c: ID) { emailDeliveries(campaignId: $c, first: 100) { edges { node { status attempts } } } }",
            json!({"c": campaign}),
        )
        .await;
    let attempts: Vec<&Value> = deliveries["emailDeliveries"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|edge| &edge["node"]["attempts"])
        .collect();
    assert_eq!(attempts.len(), RECIPIENTS);
    assert!(
        attempts.iter().all(|attempts| **attempts == 1),
        "each email was claimed once: {attempts:?}"
    );

    // 4. Each tick once: both schedulers run every second, and the tenant's tick is claimed at
    // most once per 90 % of the interval between them. Two uncoordinated schedulers would tick
    // it about twice a second.
    const TICKS: i64 = 6;
    let started = Instant::now();
    let first = tick_runs(&db, &tenant_id).await;
    eventually("the scheduler ticks the tenant", || async {
        (tick_runs(&db, &tenant_id).await >= first + TICKS).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    let shortest = TICK.mul_f64(0.9 * (TICKS - 1) as f64);
    assert!(
        elapsed >= shortest,
        "{TICKS} ticks took {elapsed:?}: more than one tick per interval"
    );

    // Stopped gracefully, each process finishes its tick and logs it: every recorded run was
    // done by exactly one process, and the other process's scheduler did run, and stood aside.
    let (one, two) = tokio::join!(one.terminate(), two.terminate());
    let runs = tick_runs(&db, &tenant_id).await;
    let mut ticked = BTreeMap::new();
    let mut skipped = 0;
    for replica in [&one, &two] {
        let ran = replica.logged("scheduler tick ran");
        ticked.insert(
            replica.name,
            ran.iter()
                .map(|entry| entry["fields"]["ticked"].as_i64().unwrap())
                .sum::<i64>(),
        );
        skipped += replica.logged(
            "scheduler tick skipped: every tenant was ticked by another process within the interval",
        )
        .len();
        skipped += ran
            .iter()
            .map(|entry| entry["fields"]["skipped"].as_i64().unwrap() as usize)
            .sum::<usize>();
    }
    assert_eq!(
        ticked.values().sum::<i64>(),
        runs,
        "every claimed tick was run by one process: {ticked:?}"
    );
    assert!(
        skipped > 0,
        "both schedulers ran, and one stood aside: {ticked:?}"
    );
    let sent: BTreeMap<&str, usize> = [&one, &two]
        .iter()
        .map(|replica| (replica.name, replica.logged("email sent").len()))
        .collect();
    assert_eq!(
        sent.values().sum::<usize>(),
        smtp.received().len(),
        "every email was sent by one process: {sent:?}"
    );
    eprintln!("ticks per process: {ticked:?}; emails per process: {sent:?}");
}
