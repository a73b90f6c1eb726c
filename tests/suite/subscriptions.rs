//! GraphQL subscriptions over real WebSockets on both databases: what each subscription receives
//! after ingestion through `/v1/batch`, its filters, tenant isolation, masking, authentication
//! and its close codes, limits, and fan-out between two server processes on PostgreSQL.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::Utc;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const TRANSPORT_WS: &str = "graphql-transport-ws";
const LEGACY_WS: &str = "graphql-ws";

async fn open_socket(server: &TestServer, protocol: &str) -> Socket {
    let mut request = server
        .url("/graphql/ws")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket upgrade");
    socket
}

/// What a socket received next, skipping pings and keep-alives, with a deadline.
#[derive(Debug)]
enum Received {
    /// A `next` (or legacy `data`) message: subscription id and payload.
    Next(String, Value),
    /// Another protocol message (`connection_ack`, `connection_error`, `complete`, …).
    Other(Value),
    Closed(Option<u16>, String),
}

async fn receive(socket: &mut Socket) -> Received {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a message in time");
        match message {
            Some(Ok(Message::Text(text))) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                match message["type"].as_str() {
                    Some("ping" | "pong" | "ka") => continue,
                    Some("next" | "data") => {
                        return Received::Next(
                            message["id"].as_str().unwrap().to_owned(),
                            message["payload"].clone(),
                        )
                    }
                    _ => return Received::Other(message),
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Received::Closed(
                    frame.as_ref().map(|frame| u16::from(frame.code)),
                    frame
                        .map(|frame| frame.reason.to_string())
                        .unwrap_or_default(),
                )
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Received::Closed(None, String::new()),
        }
    }
}

/// A signed-in socket with subscriptions.
struct Live {
    socket: Socket,
    protocol: &'static str,
}

impl Live {
    async fn connect(server: &TestServer, protocol: &'static str, token: &str) -> Live {
        let mut socket = open_socket(server, protocol).await;
        send_init(
            &mut socket,
            json!({"authorization": format!("Bearer {token}")}),
        )
        .await;
        match receive(&mut socket).await {
            Received::Other(message) if message["type"] == "connection_ack" => {}
            other => panic!("expected connection_ack, got {other:?}"),
        }
        Live { socket, protocol }
    }

    async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        let kind = if self.protocol == LEGACY_WS {
            "start"
        } else {
            "subscribe"
        };
        self.socket
            .send(Message::text(
                json!({"type": kind, "id": id, "payload": {"query": query, "variables": variables}})
                    .to_string(),
            ))
            .await
            .unwrap();
    }

    /// The payload of the next message of any subscription.
    async fn next(&mut self) -> (String, Value) {
        match receive(&mut self.socket).await {
            Received::Next(id, payload) => (id, payload),
            other => panic!("expected a subscription message, got {other:?}"),
        }
    }

    /// The first `count` messages of each subscription id in `wanted`, reading until all arrived.
    async fn collect(&mut self, wanted: &[(&str, usize)]) -> HashMap<String, Vec<Value>> {
        let mut got: HashMap<String, Vec<Value>> = HashMap::new();
        while wanted
            .iter()
            .any(|(id, count)| got.get(*id).map_or(0, Vec::len) < *count)
        {
            let (id, payload) = self.next().await;
            assert!(
                payload.get("errors").is_none(),
                "subscription {id} failed: {payload:#}"
            );
            got.entry(id).or_default().push(payload["data"].clone());
        }
        got
    }
}

async fn send_init(socket: &mut Socket, payload: Value) {
    socket
        .send(Message::text(
            json!({"type": "connection_init", "payload": payload}).to_string(),
        ))
        .await
        .unwrap();
}

/// Waits until the server has `count` subscriptions of the tenant receiving notices.
async fn subscribed(server: &TestServer, tenant_id: &str, count: usize) {
    let tenant_id = domain::TenantId(uuid::Uuid::from_str(tenant_id).unwrap());
    let realtime = server.app.as_ref().unwrap().state().realtime.clone();
    tokio::time::timeout(WAIT, realtime.wait_for_subscriptions(tenant_id, count))
        .await
        .expect("the subscriptions start in time");
}

fn track(user: &str, event: &str) -> Value {
    json!({"type": "track", "userId": user, "event": event, "properties": {"n": 1},
           "messageId": uuid::Uuid::new_v4().to_string()})
}

fn identify(user: &str, traits: Value) -> Value {
    json!({"type": "identify", "userId": user, "traits": traits,
           "messageId": uuid::Uuid::new_v4().to_string()})
}

async fn ingest(server: &TestServer, key: &str, messages: Value) {
    let (status, body) = collect(server, "/v1/batch", key, &json!({"batch": messages})).await;
    assert_eq!(status, 200, "{body}");
}

const PROFILE_UPDATED: &str = "subscription($id: ID) { profileUpdated(profileId: $id) { kind profileId profile { id traits } } }";
const EVENT_INGESTED: &str = "subscription($name: String) { eventIngested(name: $name) { id profileId type name properties messageId } }";
const MEMBERSHIP_CHANGED: &str = "subscription($id: ID) { segmentMembershipChanged(segmentId: $id) { segmentId profileId entered at } }";
const STAGE_CHANGED: &str = "subscription { lifecycleStageChanged { profileId from to at } }";

async fn create_segment(server: &TestServer, token: &str, name: &str, plan: &str) -> String {
    let data = server
        .gql_ok(
            Some(token),
            "mutation($input: SegmentInput!) { createSegment(input: $input) { id status } }",
            json!({"input": {"name": name, "condition": {"trait": "plan", "op": "eq", "value": plan}}}),
        )
        .await;
    data["createSegment"]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn each_subscription_receives_its_tenants_changes_through_its_filters() {
    for backend in backends() {
        init_logs();
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let a = new_tenant(&server, &smtp, &slug("live-a"), "owner@live-a.example").await;
        let b = new_tenant(&server, &smtp, &slug("live-b"), "owner@live-b.example").await;
        let a_key = write_key(&server, &a, "site", "SERVER").await;
        let b_key = write_key(&server, &b, "site", "SERVER").await;

        ingest(
            &server,
            &a_key,
            json!([identify("u1", json!({"plan": "pro"}))]),
        )
        .await;
        let u1 = profile_by(&server, &a.access_token, "user_id", "u1").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let pro = create_segment(&server, &a.access_token, "Pro", "pro").await;
        create_segment(&server, &a.access_token, "Free", "free").await;

        let mut live_a = Live::connect(&server, TRANSPORT_WS, &a.access_token).await;
        live_a.subscribe("all", PROFILE_UPDATED, json!({})).await;
        live_a
            .subscribe("u1", PROFILE_UPDATED, json!({"id": u1}))
            .await;
        live_a
            .subscribe("orders", EVENT_INGESTED, json!({"name": "Order Completed"}))
            .await;
        live_a
            .subscribe("pro", MEMBERSHIP_CHANGED, json!({"id": pro}))
            .await;
        live_a.subscribe("stages", STAGE_CHANGED, json!({})).await;
        // Tenant B listens with the legacy protocol to every event of its own.
        let mut live_b = Live::connect(&server, LEGACY_WS, &b.access_token).await;
        live_b.subscribe("events", EVENT_INGESTED, json!({})).await;
        subscribed(&server, &a.tenant_id, 5).await;
        subscribed(&server, &b.tenant_id, 1).await;

        ingest(
            &server,
            &a_key,
            json!([
                identify("u2", json!({"plan": "free"})),
                identify("u3", json!({"plan": "pro"})),
                track("u2", "Page Viewed"),
                track("u1", "Order Completed"),
                identify("u4", json!({"plan": "none"})),
            ]),
        )
        .await;
        ingest(
            &server,
            &a_key,
            json!([
                identify("u5", json!({"plan": "pro"})),
                track("u1", "Order Completed"),
            ]),
        )
        .await;
        // B's own event comes after everything A did: had B been sent any of A's notices, they
        // would arrive before it.
        ingest(&server, &b_key, json!([track("b1", "B only")])).await;

        let got = live_a
            .collect(&[
                ("all", 4),
                ("u1", 2),
                ("orders", 2),
                ("pro", 2),
                ("stages", 4),
            ])
            .await;

        let mut kinds: Vec<&str> = got["all"][..4]
            .iter()
            .map(|data| data["profileUpdated"]["kind"].as_str().unwrap())
            .collect();
        kinds.sort_unstable();
        assert_eq!(
            kinds,
            ["CREATED", "CREATED", "CREATED", "UPDATED"],
            "{backend:?}"
        );
        for data in &got["all"][..4] {
            let change = &data["profileUpdated"];
            assert_eq!(change["profile"]["id"], change["profileId"]);
        }

        for data in &got["u1"][..2] {
            assert_eq!(data["profileUpdated"]["profileId"], u1.as_str());
            assert_eq!(data["profileUpdated"]["kind"], "UPDATED");
            assert_eq!(data["profileUpdated"]["profile"]["traits"]["plan"], "pro");
        }

        for data in &got["orders"][..2] {
            let event = &data["eventIngested"];
            assert_eq!(event["name"], "Order Completed", "{backend:?}");
            assert_eq!(event["type"], "track");
            assert_eq!(event["profileId"], u1.as_str());
            assert_eq!(event["properties"]["n"], 1);
        }

        let u3 = profile_by(&server, &a.access_token, "user_id", "u3").await["id"].clone();
        let u5 = profile_by(&server, &a.access_token, "user_id", "u5").await["id"].clone();
        let entered: Vec<(Value, Value, Value)> = got["pro"][..2]
            .iter()
            .map(|data| {
                let change = &data["segmentMembershipChanged"];
                (
                    change["segmentId"].clone(),
                    change["profileId"].clone(),
                    change["entered"].clone(),
                )
            })
            .collect();
        assert_eq!(
            entered,
            [(json!(pro), u3, json!(true)), (json!(pro), u5, json!(true))],
            "{backend:?}"
        );

        let stages: Vec<&Value> = got["stages"][..4]
            .iter()
            .map(|data| &data["lifecycleStageChanged"])
            .collect();
        assert_eq!(
            stages
                .iter()
                .filter(|stage| stage["from"].is_null() && stage["to"] == "acquisition")
                .count(),
            3,
            "{stages:#?}"
        );
        assert!(stages.iter().any(|stage| stage["profileId"] == u1.as_str()
            && stage["from"] == "acquisition"
            && stage["to"] == "activation"));

        let (id, payload) = live_b.next().await;
        assert_eq!(id, "events");
        assert_eq!(
            payload["data"]["eventIngested"]["name"], "B only",
            "[{backend:?}] tenant B received {payload:#}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn subscriptions_mask_pii_without_pii_read_and_need_profiles_read() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("live-pii"), "owner@live-pii.example").await;
        let analyst = invited_user(
            &server,
            &smtp,
            &owner,
            "analyst@live-pii.example",
            &["analyst"],
        )
        .await;
        let key = write_key(&server, &owner, "site", "SERVER").await;

        // A write key may open a socket but not read profiles.
        let mut writer = Live::connect(&server, TRANSPORT_WS, &key).await;
        writer.subscribe("w", EVENT_INGESTED, json!({})).await;
        let (_, payload) = writer.next().await;
        assert_eq!(error_code(&payload), "FORBIDDEN", "{payload:#}");

        let mut masked = Live::connect(&server, TRANSPORT_WS, &analyst.access_token).await;
        masked.subscribe("p", PROFILE_UPDATED, json!({})).await;
        masked.subscribe("e", EVENT_INGESTED, json!({})).await;
        let mut clear = Live::connect(&server, TRANSPORT_WS, &owner.access_token).await;
        clear.subscribe("p", PROFILE_UPDATED, json!({})).await;
        subscribed(&server, &owner.tenant_id, 3).await;

        ingest(
            &server,
            &key,
            json!([identify(
                "jane",
                json!({"email": "jane.doe@example.com", "plan": "pro"})
            )]),
        )
        .await;

        let got = masked.collect(&[("p", 1), ("e", 1)]).await;
        let traits = &got["p"][0]["profileUpdated"]["profile"]["traits"];
        assert_ne!(traits["email"], "jane.doe@example.com", "{backend:?}");
        assert!(
            traits["email"].as_str().unwrap().contains("***"),
            "{traits}"
        );
        assert_eq!(traits["plan"], "pro");
        let properties = &got["e"][0]["eventIngested"]["properties"];
        assert_ne!(properties["email"], "jane.doe@example.com", "{properties}");

        let got = clear.collect(&[("p", 1)]).await;
        assert_eq!(
            got["p"][0]["profileUpdated"]["profile"]["traits"]["email"],
            "jane.doe@example.com"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn sockets_without_valid_credentials_are_closed_with_the_protocols_codes() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(
            &server,
            &smtp,
            &slug("live-auth"),
            "owner@live-auth.example",
        )
        .await;
        let jwt = &server.app.as_ref().unwrap().state().jwt;
        let tenant_id = domain::TenantId(uuid::Uuid::from_str(&owner.tenant_id).unwrap());
        let user_id = domain::UserId(uuid::Uuid::from_str(&owner.user_id).unwrap());
        let now = Utc::now();
        let expired = jwt
            .issue(
                user_id,
                tenant_id,
                uuid::Uuid::new_v4(),
                now - chrono::Duration::hours(1),
                now - chrono::Duration::minutes(10),
            )
            .unwrap();
        let unknown_user = jwt
            .issue(
                domain::UserId(uuid::Uuid::new_v4()),
                tenant_id,
                uuid::Uuid::new_v4(),
                now,
                now + chrono::Duration::minutes(10),
            )
            .unwrap();

        for (what, payload) in [
            ("no credentials", json!({})),
            (
                "a forged token",
                json!({"authorization": "Bearer not-a-token"}),
            ),
            (
                "an expired token",
                json!({"authorization": format!("Bearer {expired}")}),
            ),
            (
                "a token of an unknown user",
                json!({"authorization": format!("Bearer {unknown_user}")}),
            ),
        ] {
            let mut socket = open_socket(&server, TRANSPORT_WS).await;
            send_init(&mut socket, payload.clone()).await;
            match receive(&mut socket).await {
                Received::Closed(Some(4403), _) => {}
                other => panic!("[{backend:?}] {what}: expected close 4403, got {other:?}"),
            }

            let mut socket = open_socket(&server, LEGACY_WS).await;
            send_init(&mut socket, payload).await;
            match receive(&mut socket).await {
                Received::Other(message) if message["type"] == "connection_error" => {}
                other => panic!("[{backend:?}] {what}: expected connection_error, got {other:?}"),
            }
            match receive(&mut socket).await {
                Received::Closed(Some(4403), _) => {}
                other => panic!("[{backend:?}] {what}: expected close 4403, got {other:?}"),
            }
        }

        // Subscribing before connection_init is refused as unauthorized.
        let mut socket = open_socket(&server, TRANSPORT_WS).await;
        socket
            .send(Message::text(
                json!({"type": "subscribe", "id": "1", "payload": {"query": STAGE_CHANGED}})
                    .to_string(),
            ))
            .await
            .unwrap();
        match receive(&mut socket).await {
            Received::Closed(Some(4401), _) => {}
            other => panic!("[{backend:?}] expected close 4401, got {other:?}"),
        }

        // A token that expires while the socket is open closes it.
        let short = jwt
            .issue(
                user_id,
                tenant_id,
                uuid::Uuid::new_v4(),
                Utc::now(),
                Utc::now() + chrono::Duration::seconds(2),
            )
            .unwrap();
        let mut live = Live::connect(&server, TRANSPORT_WS, &short).await;
        live.subscribe("s", STAGE_CHANGED, json!({})).await;
        loop {
            match receive(&mut live.socket).await {
                Received::Closed(Some(4401), reason) => {
                    assert!(reason.contains("expired"), "{reason}");
                    break;
                }
                // The subscription itself ends with an UNAUTHENTICATED error first.
                Received::Next(_, payload) => {
                    assert_eq!(error_code(&payload), "UNAUTHENTICATED", "{payload:#}")
                }
                Received::Other(message) if message["type"] == "complete" => {}
                other => panic!("[{backend:?}] expected close 4401, got {other:?}"),
            }
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn sockets_and_subscriptions_over_the_tenants_limits_are_refused() {
    for backend in backends() {
        init_logs();
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let server = TestServer::start_on(db, Some(&smtp), |config| {
            config.ws_max_sockets_per_tenant = 1;
            config.ws_max_subscriptions_per_tenant = 1;
        })
        .await;
        let owner = new_tenant(&server, &smtp, &slug("live-lim"), "owner@live-lim.example").await;

        let mut first = Live::connect(&server, TRANSPORT_WS, &owner.access_token).await;
        first.subscribe("one", STAGE_CHANGED, json!({})).await;
        subscribed(&server, &owner.tenant_id, 1).await;
        first.subscribe("two", STAGE_CHANGED, json!({})).await;
        let (id, payload) = first.next().await;
        assert_eq!(id, "two");
        assert_eq!(error_code(&payload), "RATE_LIMITED", "{payload:#}");
        assert!(
            payload["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("CDP_WS_MAX_SUBSCRIPTIONS_PER_TENANT"),
            "{payload:#}"
        );

        let mut second = open_socket(&server, TRANSPORT_WS).await;
        send_init(
            &mut second,
            json!({"authorization": format!("Bearer {}", owner.access_token)}),
        )
        .await;
        match receive(&mut second).await {
            Received::Closed(Some(4403), reason) => {
                assert!(reason.contains("CDP_WS_MAX_SOCKETS_PER_TENANT"), "{reason}")
            }
            other => panic!("[{backend:?}] expected close 4403, got {other:?}"),
        }

        // Closing the first socket frees its places.
        first.socket.close(None).await.unwrap();
        drop(first);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut socket = open_socket(&server, TRANSPORT_WS).await;
            send_init(
                &mut socket,
                json!({"authorization": format!("Bearer {}", owner.access_token)}),
            )
            .await;
            match receive(&mut socket).await {
                Received::Other(message) if message["type"] == "connection_ack" => break,
                Received::Closed(Some(4403), _) if tokio::time::Instant::now() < deadline => {
                    // The server has not yet seen the first socket close: ask again.
                    tokio::task::yield_now().await;
                }
                other => panic!("[{backend:?}] expected connection_ack, got {other:?}"),
            }
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn a_subscriber_on_one_replica_receives_what_another_replica_ingested() {
    // Two processes share a database only on PostgreSQL; SQLite is served by one process, whose
    // subscribers see its own bus (covered above).
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let smtp = SmtpSink::start().await;
    let db = TestDb::create(Backend::Postgres).await;
    let one = TestServer::start_on(db.clone(), Some(&smtp), |_| {}).await;
    let two = TestServer::start_on(db, Some(&smtp), |_| {}).await;
    let owner = new_tenant(&one, &smtp, &slug("replicas"), "owner@replicas.example").await;
    let key = write_key(&one, &owner, "site", "SERVER").await;
    let other = new_tenant(&one, &smtp, &slug("replicas-b"), "owner@replicas-b.example").await;

    let mut on_one = Live::connect(&one, TRANSPORT_WS, &owner.access_token).await;
    on_one.subscribe("e", EVENT_INGESTED, json!({})).await;
    on_one.subscribe("s", STAGE_CHANGED, json!({})).await;
    let mut on_two = Live::connect(&two, TRANSPORT_WS, &owner.access_token).await;
    on_two.subscribe("e", EVENT_INGESTED, json!({})).await;
    let mut other_on_one = Live::connect(&one, TRANSPORT_WS, &other.access_token).await;
    other_on_one.subscribe("e", EVENT_INGESTED, json!({})).await;
    subscribed(&one, &owner.tenant_id, 2).await;
    subscribed(&two, &owner.tenant_id, 1).await;
    subscribed(&one, &other.tenant_id, 1).await;

    ingest(
        &two,
        &key,
        json!([
            identify("r1", json!({"plan": "pro"})),
            track("r1", "Signed Up")
        ]),
    )
    .await;
    ingest(&two, &key, json!([track("r1", "Second")])).await;

    let got = on_one.collect(&[("e", 3), ("s", 1)]).await;
    let names: Vec<&Value> = got["e"][..3]
        .iter()
        .map(|data| &data["eventIngested"]["name"])
        .collect();
    assert_eq!(names, [&Value::Null, &json!("Signed Up"), &json!("Second")]);
    assert_eq!(got["s"][0]["lifecycleStageChanged"]["to"], "acquisition");

    // The replica that ingested publishes its own notices once, not again from the database.
    let got = on_two.collect(&[("e", 3)]).await;
    let names: Vec<&Value> = got["e"][..3]
        .iter()
        .map(|data| &data["eventIngested"]["name"])
        .collect();
    assert_eq!(names, [&Value::Null, &json!("Signed Up"), &json!("Second")]);

    // Another tenant on the receiving replica sees none of it: its own event comes first.
    let other_key = write_key(&two, &other, "site", "SERVER").await;
    ingest(&two, &other_key, json!([track("x", "Other tenant")])).await;
    let (_, payload) = other_on_one.next().await;
    assert_eq!(payload["data"]["eventIngested"]["name"], "Other tenant");

    one.stop().await;
    two.stop().await;
}
