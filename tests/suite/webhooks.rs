//! Webhooks on both databases: a receiver in this process gets signed deliveries of events and
//! segment entries, failures are retried until SENT or FAILED, another tenant's changes never
//! arrive, bad URLs are refused, and the delivery log shows every attempt.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::support::*;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// An HTTP endpoint on 127.0.0.1 that records every request and answers with the given statuses
/// in turn (the last one repeats).
struct Receiver {
    url: String,
    requests: mpsc::UnboundedReceiver<Received>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(statuses: &[u16]) -> Receiver {
        use poem::listener::{Acceptor, Listener};
        let statuses: Arc<Vec<u16>> = Arc::new(statuses.to_vec());
        let served = Arc::new(AtomicUsize::new(0));
        let (sender, requests) = mpsc::unbounded_channel();
        let endpoint = poem::endpoint::make(move |request: poem::Request| {
            let statuses = statuses.clone();
            let served = served.clone();
            let sender = sender.clone();
            async move {
                let header =
                    |name: &str| request.header(name).map(str::to_owned).unwrap_or_default();
                let received = Received {
                    id: header("webhook-id"),
                    timestamp: header("webhook-timestamp"),
                    signature: header("webhook-signature"),
                    content_type: header("content-type"),
                    body: String::new(),
                };
                let body = request.into_body().into_string().await.unwrap_or_default();
                let _ = sender.send(Received { body, ..received });
                let turn = served.fetch_add(1, Ordering::SeqCst);
                let status = statuses[turn.min(statuses.len() - 1)];
                poem::Response::builder()
                    .status(poem::http::StatusCode::from_u16(status).unwrap())
                    .body("ok")
            }
        });
        let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .unwrap();
        let address = *acceptor.local_addr()[0].as_socket_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(acceptor)
                .run(endpoint)
                .await;
        });
        Receiver {
            url: format!("http://{address}/hook"),
            requests,
            server,
        }
    }

    /// The next request, failing the test after the deadline.
    async fn next(&mut self) -> Received {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("a webhook delivery arrives in time")
            .expect("the receiver is running")
    }

    /// Requests that arrived and were not taken yet.
    fn pending(&mut self) -> Vec<Received> {
        let mut pending = Vec::new();
        while let Ok(received) = self.requests.try_recv() {
            pending.push(received);
        }
        pending
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The signature a receiver expects: `v1=` and hex HMAC-SHA256(secret, "{timestamp}.{body}").
fn expected_signature(secret: &str, timestamp: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

struct Env {
    server: TestServer,
    smtp: SmtpSink,
    owner: Session,
    key: String,
}

async fn setup(backend: Backend, name: &str, allow_http: bool) -> Env {
    let smtp = SmtpSink::start().await;
    let db = TestDb::create(backend).await;
    let server = TestServer::start_on(db, Some(&smtp), |config| {
        config.webhook_allow_http = allow_http;
        config.webhook_poll_interval = Duration::from_millis(20);
        config.webhook_backoff_base = Duration::from_millis(20);
        config.webhook_max_attempts = 3;
    })
    .await;
    let owner = new_tenant(
        &server,
        &smtp,
        &slug(name),
        &format!("owner@{name}.example"),
    )
    .await;
    let key = write_key(&server, &owner, name, "SERVER").await;
    Env {
        server,
        smtp,
        owner,
        key,
    }
}

const CREATE: &str = "mutation($input: CreateWebhookInput!) { createWebhook(input: $input) {
    secret webhook { id url topics segmentId eventName active createdAt } } }";

const DELIVERIES: &str = "query($id: ID!, $first: Int, $after: String) {
    webhookDeliveries(webhookId: $id, first: $first, after: $after) {
        totalCount pageInfo { hasNextPage endCursor }
        edges { cursor node { id webhookId topic payload status attempts nextAttemptAt
            lastStatusCode lastError createdAt sentAt attemptLog { at statusCode error } } } } }";

impl Env {
    fn token(&self) -> Option<&str> {
        Some(&self.owner.access_token)
    }

    /// Creates a webhook and returns (id, secret).
    async fn create_webhook(&self, input: Value) -> (String, String) {
        let data = self
            .server
            .gql_ok(self.token(), CREATE, json!({ "input": input }))
            .await;
        let created = &data["createWebhook"];
        assert_eq!(created["webhook"]["active"], true);
        (
            created["webhook"]["id"].as_str().unwrap().to_owned(),
            created["secret"].as_str().unwrap().to_owned(),
        )
    }

    async fn send(&self, key: &str, messages: Value) {
        let (status, body) = collect(
            &self.server,
            "/v1/batch",
            key,
            &json!({ "batch": messages }),
        )
        .await;
        assert_eq!((status, body), (200, json!({"success": true})));
    }

    async fn deliveries(&self, webhook_id: &str, first: i32, after: Option<&str>) -> Value {
        self.server
            .gql_ok(
                self.token(),
                DELIVERIES,
                json!({"id": webhook_id, "first": first, "after": after}),
            )
            .await["webhookDeliveries"]
            .clone()
    }

    /// Polls the delivery log until every delivery satisfies `done` and there are `count`.
    async fn wait_for_log(
        &self,
        webhook_id: &str,
        count: usize,
        done: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.deliveries(webhook_id, 100, None).await;
            let nodes: Vec<Value> = log["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|edge| edge["node"].clone())
                .collect();
            if nodes.len() == count && nodes.iter().all(&done) {
                return nodes;
            }
            assert!(
                Instant::now() < deadline,
                "[{:?}] the delivery log never reached the expected state: {nodes:#?}",
                self.server.backend
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn track(user: &str, event: &str, properties: Value) -> Value {
    json!({"type": "track", "userId": user, "event": event, "properties": properties,
           "messageId": uuid::Uuid::new_v4().to_string()})
}

#[tokio::test]
async fn an_ingested_event_arrives_signed_with_the_secret_shown_once() {
    for backend in backends() {
        let env = setup(backend, "whevent", true).await;
        let mut receiver = Receiver::start(&[200]).await;
        let (webhook_id, secret) = env
            .create_webhook(json!({"url": receiver.url, "topics": ["EVENT_INGESTED"]}))
            .await;
        assert!(secret.starts_with("whsec_"), "{secret}");

        env.send(
            &env.key,
            json!([
                track("u-1", "Order Completed", json!({"total": 30})),
                json!({"type": "identify", "userId": "u-1", "traits": {"email": "jane@example.com"},
                       "messageId": uuid::Uuid::new_v4().to_string()}),
                track("u-1", "Page Viewed", json!({})),
                track("u-2", "Order Completed", json!({"total": 10})),
            ]),
        )
        .await;

        let mut names = Vec::new();
        let mut ids = Vec::new();
        // Every stored message is an event; the identify has no name.
        for _ in 0..4 {
            let received = receiver.next().await;
            assert_eq!(received.content_type, "application/json");
            assert_eq!(
                received.signature,
                expected_signature(&secret, &received.timestamp, &received.body),
                "[{backend:?}] the signature verifies with the secret from createWebhook"
            );
            let age = chrono::Utc::now().timestamp() - received.timestamp.parse::<i64>().unwrap();
            assert!((0..60).contains(&age), "a current timestamp: {age}");
            let body = received.json();
            assert_eq!(body["topic"], "event.ingested");
            assert!(body["occurredAt"].is_string());
            assert!(body["data"]["eventId"].is_string());
            assert!(body["data"]["profileId"].is_string());
            assert!(
                !received.body.contains("jane@example.com") && !received.body.contains("total"),
                "no traits or properties in a payload: {}",
                received.body
            );
            names.push(body["data"]["name"].as_str().map(str::to_owned));
            ids.push(received.id);
        }
        names.sort();
        assert_eq!(
            names,
            [
                None,
                Some("Order Completed".to_owned()),
                Some("Order Completed".to_owned()),
                Some("Page Viewed".to_owned())
            ]
        );

        // The delivery log: every delivery SENT after one attempt with its status code, the
        // Webhook-Id header being the delivery's id; newest first, paginated.
        let log = env
            .wait_for_log(&webhook_id, 4, |node| node["status"] == "SENT")
            .await;
        for node in &log {
            assert!(ids.contains(&node["id"].as_str().unwrap().to_owned()));
            assert_eq!(node["webhookId"], webhook_id.as_str());
            assert_eq!(node["topic"], "EVENT_INGESTED");
            assert_eq!(node["attempts"], 1);
            assert_eq!(node["lastStatusCode"], 200);
            assert!(node["nextAttemptAt"].is_null());
            assert!(node["sentAt"].is_string());
            assert_eq!(node["attemptLog"].as_array().unwrap().len(), 1);
            assert_eq!(node["attemptLog"][0]["statusCode"], 200);
        }
        let first_page = env.deliveries(&webhook_id, 3, None).await;
        assert_eq!(first_page["totalCount"], 4);
        assert_eq!(first_page["edges"].as_array().unwrap().len(), 3);
        assert_eq!(first_page["pageInfo"]["hasNextPage"], true);
        let second_page = env
            .deliveries(&webhook_id, 2, first_page["pageInfo"]["endCursor"].as_str())
            .await;
        assert_eq!(second_page["edges"].as_array().unwrap().len(), 1);
        assert_eq!(second_page["pageInfo"]["hasNextPage"], false);

        // The secret is never shown again, and creating the webhook was audited.
        let listed = env
            .server
            .gql_ok(
                env.token(),
                "{ webhooks { id url topics active } }",
                json!({}),
            )
            .await;
        assert_eq!(
            listed["webhooks"],
            json!([{"id": webhook_id, "url": receiver.url, "topics": ["EVENT_INGESTED"], "active": true}])
        );
        assert!(!listed.to_string().contains(&secret));
        let audit = env
            .server
            .gql_ok(
                env.token(),
                "{ auditLog(first: 10) { edges { node { action target } } } }",
                json!({}),
            )
            .await;
        assert!(audit["auditLog"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|edge| edge["node"]["action"] == "webhook.create"
                && edge["node"]["target"] == format!("webhook:{webhook_id}")));
        env.server.stop().await;
    }
}

#[tokio::test]
async fn a_segment_entry_reaches_a_webhook_filtered_on_that_segment() {
    for backend in backends() {
        let env = setup(backend, "whsegment", true).await;
        let mut receiver = Receiver::start(&[204]).await;
        let create_segment = |name: &str, plan: &str| json!({"input": {"name": name, "condition": {"trait": "plan", "op": "eq", "value": plan}}});
        let mut segment_ids = Vec::new();
        for (name, plan) in [("Pro", "pro"), ("Free", "free")] {
            let data = env
                .server
                .gql_ok(
                    env.token(),
                    "mutation($input: SegmentInput!) { createSegment(input: $input) { id status } }",
                    create_segment(name, plan),
                )
                .await;
            segment_ids.push(data["createSegment"]["id"].as_str().unwrap().to_owned());
        }
        let pro = segment_ids[0].clone();
        let (webhook_id, secret) = env
            .create_webhook(
                json!({"url": receiver.url, "topics": ["SEGMENT_MEMBERSHIP"], "segmentId": pro}),
            )
            .await;

        // One profile enters Free (filtered out), then one enters Pro.
        for (user, plan) in [("u-free", "free"), ("u-pro", "pro")] {
            env.send(
                &env.key,
                json!([{"type": "identify", "userId": user, "traits": {"plan": plan},
                        "messageId": uuid::Uuid::new_v4().to_string()}]),
            )
            .await;
        }
        let received = receiver.next().await;
        assert_eq!(
            received.signature,
            expected_signature(&secret, &received.timestamp, &received.body)
        );
        let body = received.json();
        assert_eq!(body["topic"], "segment.membership");
        assert_eq!(body["data"]["segmentId"], pro.as_str());
        assert_eq!(body["data"]["entered"], true);
        let profile = profile_by(&env.server, &env.owner.access_token, "user_id", "u-pro").await;
        assert_eq!(body["data"]["profileId"], profile["id"]);
        let log = env
            .wait_for_log(&webhook_id, 1, |node| node["status"] == "SENT")
            .await;
        assert_eq!(log[0]["lastStatusCode"], 204);
        assert!(receiver.pending().is_empty());
        env.server.stop().await;
    }
}

#[tokio::test]
async fn a_failed_delivery_is_retried_and_sent_on_the_second_attempt() {
    for backend in backends() {
        let env = setup(backend, "whretry", true).await;
        let mut receiver = Receiver::start(&[500, 200]).await;
        let (webhook_id, secret) = env
            .create_webhook(json!({"url": receiver.url, "topics": ["EVENT_INGESTED"], "eventName": "Signed Up"}))
            .await;
        env.send(
            &env.key,
            json!([
                track("u-1", "Page Viewed", json!({})),
                track("u-1", "Signed Up", json!({}))
            ]),
        )
        .await;
        let first = receiver.next().await;
        let second = receiver.next().await;
        assert_eq!(first.id, second.id, "a retry keeps its Webhook-Id");
        assert_eq!(first.body, second.body);
        for received in [&first, &second] {
            assert_eq!(
                received.signature,
                expected_signature(&secret, &received.timestamp, &received.body)
            );
        }
        assert_eq!(first.json()["data"]["name"], "Signed Up");
        let log = env
            .wait_for_log(&webhook_id, 1, |node| node["status"] == "SENT")
            .await;
        let delivery = &log[0];
        assert_eq!(delivery["attempts"], 2, "[{backend:?}] {delivery:#}");
        assert_eq!(delivery["lastStatusCode"], 200);
        assert!(delivery["lastError"].is_null());
        let attempts = delivery["attemptLog"].as_array().unwrap();
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0]["statusCode"], 500);
        assert!(attempts[0]["error"].as_str().unwrap().contains("500"));
        assert_eq!(attempts[1]["statusCode"], 200);
        assert!(attempts[1]["error"].is_null());
        env.server.stop().await;
    }
}

#[tokio::test]
async fn a_delivery_that_always_fails_is_failed_after_the_last_attempt() {
    for backend in backends() {
        let env = setup(backend, "whfail", true).await;
        let mut receiver = Receiver::start(&[500]).await;
        let (webhook_id, _) = env
            .create_webhook(json!({"url": receiver.url, "topics": ["EVENT_INGESTED"]}))
            .await;
        env.send(&env.key, json!([track("u-1", "Page Viewed", json!({}))]))
            .await;
        for _ in 0..3 {
            receiver.next().await;
        }
        let log = env
            .wait_for_log(&webhook_id, 1, |node| node["status"] == "FAILED")
            .await;
        let delivery = &log[0];
        assert_eq!(delivery["attempts"], 3, "[{backend:?}] {delivery:#}");
        assert_eq!(delivery["lastStatusCode"], 500);
        assert!(delivery["lastError"].as_str().unwrap().contains("500"));
        assert!(delivery["sentAt"].is_null());
        assert!(delivery["nextAttemptAt"].is_null());
        assert_eq!(delivery["attemptLog"].as_array().unwrap().len(), 3);
        // FAILED is final: the log was read after the third answer was recorded, and nothing
        // beyond the three attempts arrived.
        assert!(receiver.pending().is_empty());
        env.server.stop().await;
    }
}

#[tokio::test]
async fn another_tenants_changes_never_reach_a_webhook() {
    for backend in backends() {
        let env = setup(backend, "wha", true).await;
        let b = new_tenant(&env.server, &env.smtp, &slug("whb"), "owner@whb.example").await;
        let b_key = write_key(&env.server, &b, "b", "SERVER").await;
        let mut receiver = Receiver::start(&[200]).await;
        let (webhook_id, _) = env
            .create_webhook(
                json!({"url": receiver.url, "topics": ["EVENT_INGESTED", "PROFILE_CHANGED"]}),
            )
            .await;

        // Tenant B's batch goes first; only tenant A's changes may arrive.
        env.send(&b_key, json!([track("b-user", "From B", json!({}))]))
            .await;
        env.send(&env.key, json!([track("a-user", "From A", json!({}))]))
            .await;
        let a_profile = profile_by(&env.server, &env.owner.access_token, "user_id", "a-user").await;
        let mut topics = Vec::new();
        for _ in 0..2 {
            let body = receiver.next().await.json();
            assert_eq!(body["data"]["profileId"], a_profile["id"], "{body:#}");
            topics.push(body["topic"].as_str().unwrap().to_owned());
        }
        topics.sort();
        assert_eq!(topics, ["event.ingested", "profile.changed"]);
        env.wait_for_log(&webhook_id, 2, |node| node["status"] == "SENT")
            .await;
        assert!(receiver.pending().is_empty());

        // Tenant B sees none of A's webhooks and reaches none by id.
        let b_token = Some(b.access_token.as_str());
        let listed = env
            .server
            .gql_ok(b_token, "{ webhooks { id } }", json!({}))
            .await;
        assert_eq!(listed["webhooks"], json!([]));
        for (name, query, variables) in [
            (
                "webhookDeliveries",
                "query($id: ID!) { webhookDeliveries(webhookId: $id) { totalCount } }",
                json!({"id": webhook_id}),
            ),
            (
                "setWebhookActive",
                "mutation($id: ID!) { setWebhookActive(id: $id, active: false) { id } }",
                json!({"id": webhook_id}),
            ),
            (
                "deleteWebhook",
                "mutation($id: ID!) { deleteWebhook(id: $id) }",
                json!({"id": webhook_id}),
            ),
        ] {
            let response = env.server.gql(b_token, query, variables).await;
            assert_eq!(error_code(&response), "NOT_FOUND", "{name}: {response:#}");
        }

        // A paused webhook queues nothing; a deleted one is gone.
        let paused = env
            .server
            .gql_ok(
                env.token(),
                "mutation($id: ID!) { setWebhookActive(id: $id, active: false) { active } }",
                json!({"id": webhook_id}),
            )
            .await;
        assert_eq!(paused["setWebhookActive"]["active"], false);
        env.send(
            &env.key,
            json!([track("a-user", "While Paused", json!({}))]),
        )
        .await;
        let log = env.deliveries(&webhook_id, 10, None).await;
        assert_eq!(log["totalCount"], 2, "{log:#}");
        let deleted = env
            .server
            .gql_ok(
                env.token(),
                "mutation($id: ID!) { deleteWebhook(id: $id) }",
                json!({"id": webhook_id}),
            )
            .await;
        assert_eq!(deleted["deleteWebhook"], true);
        let gone = env
            .server
            .gql(
                env.token(),
                "query($id: ID!) { webhookDeliveries(webhookId: $id) { totalCount } }",
                json!({"id": webhook_id}),
            )
            .await;
        assert_eq!(error_code(&gone), "NOT_FOUND");
        env.server.stop().await;
    }
}

#[tokio::test]
async fn bad_webhooks_are_refused_with_the_field() {
    for backend in backends() {
        // The default configuration: https only.
        let env = setup(backend, "whbad", false).await;
        let cases = [
            (
                json!({"url": "http://127.0.0.1:9/hook", "topics": ["EVENT_INGESTED"]}),
                "url",
            ),
            (
                json!({"url": "http://hooks.example.com/", "topics": ["EVENT_INGESTED"]}),
                "url",
            ),
            (
                json!({"url": "https://user:secret@hooks.example.com/", "topics": ["EVENT_INGESTED"]}),
                "url",
            ),
            (
                json!({"url": "ftp://hooks.example.com/", "topics": ["EVENT_INGESTED"]}),
                "url",
            ),
            (
                json!({"url": "hooks.example.com", "topics": ["EVENT_INGESTED"]}),
                "url",
            ),
            (
                json!({"url": "https://10.0.0.8/hook", "topics": ["EVENT_INGESTED"]}),
                "url",
            ),
            (
                json!({"url": "https://hooks.example.com/", "topics": []}),
                "topics",
            ),
            (
                json!({"url": "https://hooks.example.com/", "topics": ["PROFILE_CHANGED"], "eventName": "X"}),
                "eventName",
            ),
            (
                json!({"url": "https://hooks.example.com/", "topics": ["EVENT_INGESTED"], "segmentId": uuid::Uuid::new_v4().to_string()}),
                "segmentId",
            ),
        ];
        for (input, field) in cases {
            let response = env
                .server
                .gql(env.token(), CREATE, json!({ "input": input }))
                .await;
            assert_eq!(
                error_code(&response),
                "BAD_USER_INPUT",
                "{input}: {response:#}"
            );
            assert_eq!(
                response["errors"][0]["extensions"]["field"], field,
                "{input}"
            );
        }
        // A segment filter must name a segment of the tenant.
        let response = env
            .server
            .gql(
                env.token(),
                CREATE,
                json!({"input": {"url": "https://hooks.example.com/", "topics": ["SEGMENT_MEMBERSHIP"], "segmentId": uuid::Uuid::new_v4().to_string()}}),
            )
            .await;
        assert_eq!(error_code(&response), "NOT_FOUND", "{response:#}");
        // An https URL is accepted, and nothing was created by the refusals.
        env.create_webhook(
            json!({"url": "https://hooks.example.com/cdp", "topics": ["PROFILE_CHANGED"]}),
        )
        .await;
        let listed = env
            .server
            .gql_ok(env.token(), "{ webhooks { url } }", json!({}))
            .await;
        assert_eq!(
            listed["webhooks"],
            json!([{"url": "https://hooks.example.com/cdp"}])
        );

        // Managing webhooks needs API_KEYS_MANAGE.
        let viewer = invited_user(
            &env.server,
            &env.smtp,
            &env.owner,
            "viewer@whbad.example",
            &["viewer"],
        )
        .await;
        let response = env
            .server
            .gql(
                Some(&viewer.access_token),
                CREATE,
                json!({"input": {"url": "https://hooks.example.com/", "topics": ["PROFILE_CHANGED"]}}),
            )
            .await;
        assert_eq!(error_code(&response), "FORBIDDEN");
        let response = env
            .server
            .gql(Some(&viewer.access_token), "{ webhooks { id } }", json!({}))
            .await;
        assert_eq!(error_code(&response), "FORBIDDEN");
        env.server.stop().await;
    }
}
