//! Security: hostile input from outside and from another tenant, over real HTTP, WebSocket and
//! SMTP on both databases. Each attack is refused with the contract's answer (an error code, a
//! status, a close code), leaks nothing and loses nothing already accepted.
//!
//! What other files already prove is not repeated here:
//! - `isolation.rs`: tenant B on tenant A's users, roles and api keys; lists; row-level security.
//! - `unify.rs`: `profile`, `profileByIdentity`, `profiles`, `events`, `mergeProfiles` (both ids
//!   of A), `setConsent` and `splitIdentity` with A's ids; B's write key never writes into A.
//! - `segments.rs`: `segment`, `segments`, `deleteSegment`, `profiles(filter: {segmentId})`.
//! - `analytics.rs`: `segmentOverlap` with A's segment. `webhooks.rs`: `webhooks`,
//!   `webhookDeliveries`, `setWebhookActive` and `deleteWebhook` with A's webhook.
//! - `bad_input.rs`: JWT `alg: none`, a tampered signature, another secret, an expired token,
//!   another tenant, a wrong audience, a refresh token as access token; a body over 1 MiB, a
//!   query deeper than 16, a batch of 11, a body that is not JSON.
//! - `abuse.rs`: root fields and logins multiplied by aliases, fragments and batches, rates,
//!   timeouts, the WebSocket message size.
//! - `privacy.rs`: export, erasure, consent history and settings within one tenant (this file
//!   tries them as another tenant).
//! - `unify.rs`: NUL in an event name, invalid UTF-8 inside a string value, 413 over the limits.
//! - `campaigns.rs`: CR/LF in a campaign subject and in a trait rendered into a subject.
//! - `subscriptions.rs` and `http_surface.rs`: `connection_init` without credentials, with a
//!   garbage, expired or unknown user's token (4403), a subscription before it (4401), a token
//!   that expires on an open socket (4401), the per-tenant socket and subscription limits.

use std::io::Write;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

// ---------------- helpers ----------------

/// Two tenants on one server, each with a write key.
struct Tenants {
    server: TestServer,
    smtp: SmtpSink,
    a: Session,
    b: Session,
    a_key: String,
    b_key: String,
}

async fn two_tenants(backend: Backend, name: &str) -> Tenants {
    init_logs();
    let smtp = SmtpSink::start().await;
    let server = TestServer::start(backend, &smtp).await;
    let a = new_tenant(
        &server,
        &smtp,
        &slug(&format!("{name}-a")),
        &format!("owner@{name}-a.example"),
    )
    .await;
    let b = new_tenant(
        &server,
        &smtp,
        &slug(&format!("{name}-b")),
        &format!("owner@{name}-b.example"),
    )
    .await;
    let a_key = write_key(&server, &a, "a", "SERVER").await;
    let b_key = write_key(&server, &b, "b", "SERVER").await;
    Tenants {
        server,
        smtp,
        a,
        b,
        a_key,
        b_key,
    }
}

async fn send(server: &TestServer, key: &str, messages: Value) -> Value {
    let (status, body) = collect(server, "/v1/batch", key, &json!({ "batch": messages })).await;
    assert_eq!(status, 200, "[{:?}] {body}", server.backend);
    body
}

fn identify(user: &str, traits: Value) -> Value {
    json!({"type": "identify", "userId": user, "traits": traits,
           "messageId": uuid::Uuid::new_v4().to_string()})
}

fn consenting(mut message: Value) -> Value {
    message["context"] = json!({"consent": {"categoryPreferences": {"email_marketing": true}}});
    message
}

fn track(user: &str, event: &str, properties: Value) -> Value {
    json!({"type": "track", "userId": user, "event": event, "properties": properties,
           "messageId": uuid::Uuid::new_v4().to_string()})
}

async fn profile_id(server: &TestServer, session: &Session, user_id: &str) -> String {
    let profile = profile_by(server, &session.access_token, "user_id", user_id).await;
    profile["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no profile for {user_id}: {profile}"))
        .to_owned()
}

async fn event_total(server: &TestServer, session: &Session) -> i64 {
    server
        .gql_ok(
            Some(&session.access_token),
            "{ events(first: 1) { totalCount } }",
            json!({}),
        )
        .await["events"]["totalCount"]
        .as_i64()
        .unwrap()
}

const CREATE_SEGMENT: &str =
    "mutation($input: SegmentInput!) { createSegment(input: $input) { id name size } }";

async fn create_segment(
    server: &TestServer,
    session: &Session,
    name: &str,
    condition: Value,
) -> String {
    server
        .gql_ok(
            Some(&session.access_token),
            CREATE_SEGMENT,
            json!({"input": {"name": name, "condition": condition}}),
        )
        .await["createSegment"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Creates and activates a campaign emailing on `event`; returns its id.
async fn event_campaign(server: &TestServer, session: &Session, event: &str) -> String {
    let token = Some(session.access_token.as_str());
    let id = server
        .gql_ok(
            token,
            "mutation($input: CampaignInput!) { createCampaign(input: $input) { id } }",
            json!({"input": {"name": format!("On {event}"), "trigger": {"event": event},
                "subject": "Hello {{ profile.traits.name }}", "textBody": "Thanks"}}),
        )
        .await["createCampaign"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server
        .gql_ok(
            token,
            "mutation($id: ID!) { setCampaignStatus(id: $id, status: ACTIVE) { status } }",
            json!({"id": id}),
        )
        .await;
    id
}

/// `template` with every string equal to `placeholder` replaced by `id`.
fn with_id(template: &Value, placeholder: &str, id: &str) -> Value {
    match template {
        Value::String(text) if text == placeholder => Value::String(id.to_owned()),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| with_id(item, placeholder, id))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| (key.clone(), with_id(value, placeholder, id)))
                .collect(),
        ),
        other => other.clone(),
    }
}

// ---------------- tokens ----------------

/// A JWT with any header, signed by `sign` over `header.payload` (so that a test can put any
/// `alg` in the header whatever the signature really is).
fn jwt(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = URL_SAFE_NO_PAD.encode(sign(input.as_bytes()));
    format!("{input}.{signature}")
}

fn hs256(secret: &[u8]) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
    move |input| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(input);
        mac.finalize().into_bytes().to_vec()
    }
}

fn hs512(secret: &[u8]) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
    move |input| {
        let mut mac = Hmac::<sha2::Sha512>::new_from_slice(secret).unwrap();
        mac.update(input);
        mac.finalize().into_bytes().to_vec()
    }
}

/// The claims of a valid access token of `session`.
fn access_claims(session: &Session) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": session.user_id, "tid": session.tenant_id, "sid": uuid::Uuid::new_v4(),
           "typ": "access", "iss": "cdp", "aud": "cdp-api", "iat": now, "exp": now + 300})
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn jwt_secret(server: &TestServer) -> Vec<u8> {
    server
        .app
        .as_ref()
        .unwrap()
        .state()
        .config
        .jwt_secret
        .clone()
}

/// Tokens that look like access tokens of `session` but are forged: every one must be refused.
fn forged_tokens(server: &TestServer, session: &Session) -> Vec<(&'static str, String)> {
    let secret = jwt_secret(server);
    let claims = access_claims(session);
    let hs = json!({"alg": "HS256", "typ": "JWT"});
    vec![
        // Algorithm confusion: the secret is only ever an HMAC-SHA256 key.
        (
            "RS256 header signed with the HMAC secret",
            jwt(
                &json!({"alg": "RS256", "typ": "JWT"}),
                &claims,
                hs256(&secret),
            ),
        ),
        (
            "ES256 header signed with the HMAC secret",
            jwt(
                &json!({"alg": "ES256", "typ": "JWT"}),
                &claims,
                hs256(&secret),
            ),
        ),
        (
            "HS512 with the right secret",
            jwt(
                &json!({"alg": "HS512", "typ": "JWT"}),
                &claims,
                hs512(&secret),
            ),
        ),
        (
            "alg none with a valid HS256 signature",
            jwt(
                &json!({"alg": "none", "typ": "JWT"}),
                &claims,
                hs256(&secret),
            ),
        ),
        // HS256 signed with something public instead of the secret.
        (
            "HS256 signed with an empty key",
            jwt(&hs, &claims, hs256(b"")),
        ),
        (
            "HS256 signed with the tenant id",
            jwt(&hs, &claims, hs256(session.tenant_id.as_bytes())),
        ),
        (
            "HS256 signed with the issuer name",
            jwt(&hs, &claims, hs256(b"cdp")),
        ),
        // The right key, the wrong claims.
        (
            "no iss",
            jwt(&hs, &without(claims.clone(), "iss"), hs256(&secret)),
        ),
        (
            "wrong iss",
            jwt(
                &hs,
                &with(claims.clone(), "iss", json!("someone-else")),
                hs256(&secret),
            ),
        ),
        (
            "no aud",
            jwt(&hs, &without(claims.clone(), "aud"), hs256(&secret)),
        ),
        (
            "no exp",
            jwt(&hs, &without(claims.clone(), "exp"), hs256(&secret)),
        ),
        (
            "no typ",
            jwt(&hs, &without(claims.clone(), "typ"), hs256(&secret)),
        ),
        (
            "typ refresh",
            jwt(
                &hs,
                &with(claims.clone(), "typ", json!("refresh")),
                hs256(&secret),
            ),
        ),
        (
            "no sub",
            jwt(&hs, &without(claims.clone(), "sub"), hs256(&secret)),
        ),
    ]
}

const ME: &str = "{ me { user { email } tenant { id } } }";

// ---------------- tenant isolation ----------------

const ADA_EMAIL: &str = "ada@xt-a.example";

/// Adds to `isolation.rs`, `unify.rs`, `segments.rs`, `analytics.rs` and `webhooks.rs`: the
/// privacy operations (`exportProfile`, `eraseProfile` with and without `suppress`, also on an id
/// A already erased, `Profile.consentHistory`, `setPrivacySettings`), `mergeProfiles` mixing a
/// profile of B with one of A, `updateSegment`, `segmentSizeHistory`, the campaign operations
/// (`campaign`, `campaigns`, `setCampaignStatus`, `updateCampaign`, `emailDeliveries` by A's
/// campaign and profile), A's segment named in `createCampaign` and `createWebhook`,
/// `previewSegment` and `setLifecycleModel`. Every id of A is answered exactly as a made-up id
/// is, and A's data is unchanged afterwards.
#[tokio::test]
async fn tenant_b_reaches_nothing_of_tenant_a_through_privacy_campaign_and_segment_operations() {
    for backend in backends() {
        let t = two_tenants(backend, "xt").await;
        let server = &t.server;
        let a_token = Some(t.a.access_token.as_str());
        let b_token = Some(t.b.access_token.as_str());

        let pro = create_segment(
            server,
            &t.a,
            "Pro",
            json!({"trait": "plan", "op": "eq", "value": "pro"}),
        )
        .await;
        let campaign = event_campaign(server, &t.a, "Order Completed").await;
        let mails_before = t.smtp.received().len();
        send(
            server,
            &t.a_key,
            json!([
                consenting(identify("ada", json!({"email": ADA_EMAIL, "plan": "pro"}))),
                track("ada", "Order Completed", json!({"total": 10})),
                identify("gus", json!({"plan": "pro"})),
            ]),
        )
        .await;
        mail_to(&t.smtp, mails_before + 1, ADA_EMAIL).await;
        let ada = profile_id(server, &t.a, "ada").await;
        let gus = profile_id(server, &t.a, "gus").await;
        server
            .gql_ok(
                a_token,
                "mutation($id: ID!) { eraseProfile(id: $id) { profileId } }",
                json!({"id": gus}),
            )
            .await;
        send(
            server,
            &t.b_key,
            json!([identify(
                "bea",
                json!({"email": "bea@xt-b.example", "plan": "pro"})
            )]),
        )
        .await;
        let bea = profile_id(server, &t.b, "bea").await;

        const SETTINGS: &str =
            "{ privacySettings { piiTraits consentPurposes eventRetentionDays } }";
        const MODEL: &str = "{ lifecycleModel { key name condition position } }";
        let a_settings = server.gql_ok(a_token, SETTINGS, json!({})).await;
        let a_model = server.gql_ok(a_token, MODEL, json!({})).await;
        let a_ada_before = server
            .gql_ok(
                a_token,
                "query($id: ID!) { profile(id: $id) { id eventCount identities { kind value } consentHistory { purpose granted } } }",
                json!({"id": ada}),
            )
            .await;

        // Mutations and queries that name one id of A: each must answer as for a made-up id.
        let campaign_input =
            json!({"name": "Hijack", "trigger": {"event": "x"}, "subject": "s", "textBody": "t"});
        let attempts = [
            ("exportProfile", "mutation($id: ID!) { exportProfile(id: $id) }", json!({"id": "<id>"}), &ada),
            ("eraseProfile", "mutation($id: ID!) { eraseProfile(id: $id) { profileId eventsDeleted } }", json!({"id": "<id>"}), &ada),
            ("eraseProfile with suppress", "mutation($id: ID!) { eraseProfile(id: $id, suppress: true) { profileId } }", json!({"id": "<id>"}), &ada),
            ("eraseProfile of an id A erased", "mutation($id: ID!) { eraseProfile(id: $id) { profileId eventsDeleted erasedAt } }", json!({"id": "<id>"}), &gus),
            ("mergeProfiles keeping B's", "mutation($k: ID!, $m: ID!) { mergeProfiles(keepId: $k, mergeId: $m) { id } }", json!({"k": bea, "m": "<id>"}), &ada),
            ("mergeProfiles keeping A's", "mutation($k: ID!, $m: ID!) { mergeProfiles(keepId: $k, mergeId: $m) { id } }", json!({"k": "<id>", "m": bea}), &ada),
            ("updateSegment", "mutation($id: ID!) { updateSegment(id: $id, input: {name: \"Hijacked\", condition: {all: []}}) { id } }", json!({"id": "<id>"}), &pro),
            ("segmentSizeHistory", "query($id: ID!) { segmentSizeHistory(segmentId: $id) { size } }", json!({"id": "<id>"}), &pro),
            ("setCampaignStatus", "mutation($id: ID!) { setCampaignStatus(id: $id, status: PAUSED) { id } }", json!({"id": "<id>"}), &campaign),
            ("updateCampaign", "mutation($id: ID!, $input: CampaignInput!) { updateCampaign(id: $id, input: $input) { id } }", json!({"id": "<id>", "input": campaign_input}), &campaign),
            ("createCampaign on A's segment entry", "mutation($input: CampaignInput!) { createCampaign(input: $input) { id } }",
                json!({"input": {"name": "Steal", "trigger": {"segmentEntered": "<id>"}, "subject": "s", "textBody": "t"}}), &pro),
            ("createCampaign broadcasting A's segment", "mutation($input: CampaignInput!) { createCampaign(input: $input) { id } }",
                json!({"input": {"name": "Steal", "trigger": {"broadcastSegment": "<id>"}, "subject": "s", "textBody": "t"}}), &pro),
            ("createWebhook on A's segment", "mutation($input: CreateWebhookInput!) { createWebhook(input: $input) { secret } }",
                json!({"input": {"url": "https://hooks.xt-b.example/in", "topics": ["SEGMENT_MEMBERSHIP"], "segmentId": "<id>"}}), &pro),
        ];
        for (what, query, template, a_id) in attempts {
            let made_up = uuid::Uuid::new_v4().to_string();
            let as_a_id = server
                .gql(b_token, query, with_id(&template, "<id>", a_id))
                .await;
            let as_made_up = server
                .gql(b_token, query, with_id(&template, "<id>", &made_up))
                .await;
            let code = error_code(&as_a_id);
            assert!(
                code == "NOT_FOUND" || code == "BAD_USER_INPUT",
                "[{backend:?}] {what}: {as_a_id:#}"
            );
            assert_eq!(code, error_code(&as_made_up), "[{backend:?}] {what}");
            assert_eq!(
                as_a_id["errors"][0]["message"]
                    .as_str()
                    .unwrap()
                    .replace(a_id.as_str(), "<id>"),
                as_made_up["errors"][0]["message"]
                    .as_str()
                    .unwrap()
                    .replace(&made_up, "<id>"),
                "[{backend:?}] {what}: an id of A reads exactly as an unknown id"
            );
            assert!(
                as_a_id["data"].is_null(),
                "[{backend:?}] {what}: {as_a_id:#}"
            );
        }

        // Reads that name an id of A find nothing, exactly as for a made-up id.
        let reads = [
            ("profile with consentHistory", "query($id: ID!) { profile(id: $id) { id consentHistory { purpose } } }", json!({"id": "<id>"}), &ada, json!({"profile": null})),
            ("campaign", "query($id: ID!) { campaign(id: $id) { id } }", json!({"id": "<id>"}), &campaign, json!({"campaign": null})),
            ("emailDeliveries by campaign", "query($id: ID) { emailDeliveries(campaignId: $id) { totalCount edges { node { id } } } }", json!({"id": "<id>"}), &campaign,
                json!({"emailDeliveries": {"totalCount": 0, "edges": []}})),
            ("emailDeliveries by profile", "query($id: ID) { emailDeliveries(profileId: $id) { totalCount edges { node { id } } } }", json!({"id": "<id>"}), &ada,
                json!({"emailDeliveries": {"totalCount": 0, "edges": []}})),
        ];
        for (what, query, template, a_id, expected) in reads {
            let made_up = uuid::Uuid::new_v4().to_string();
            let as_a_id = server
                .gql_ok(b_token, query, with_id(&template, "<id>", a_id))
                .await;
            let as_made_up = server
                .gql_ok(b_token, query, with_id(&template, "<id>", &made_up))
                .await;
            assert_eq!(as_a_id, expected, "[{backend:?}] {what}");
            assert_eq!(as_made_up, expected, "[{backend:?}] {what}");
        }
        let lists = server
            .gql_ok(
                b_token,
                "{ campaigns { id } emailDeliveries { totalCount } webhooks { id } }",
                json!({}),
            )
            .await;
        assert_eq!(
            lists,
            json!({"campaigns": [], "emailDeliveries": {"totalCount": 0}, "webhooks": []}),
            "[{backend:?}]"
        );
        // B's preview counts B's profiles only: A's order and A's pro customers are invisible.
        let preview = "query($c: JSON!) { previewSegment(condition: $c) { size sample { id } } }";
        let orders = server
            .gql_ok(b_token, preview, json!({"c": {"event": "Order Completed"}}))
            .await;
        assert_eq!(
            orders["previewSegment"],
            json!({"size": 0, "sample": []}),
            "[{backend:?}]"
        );
        let pros = server
            .gql_ok(
                b_token,
                preview,
                json!({"c": {"trait": "plan", "op": "eq", "value": "pro"}}),
            )
            .await;
        assert_eq!(
            pros["previewSegment"],
            json!({"size": 1, "sample": [{"id": bea}]}),
            "[{backend:?}]"
        );

        // B's settings and lifecycle model are B's own: A's stay as they were.
        let b_settings = server
            .gql_ok(
                b_token,
                "mutation { setPrivacySettings(input: {piiTraits: [\"b_secret\"], consentPurposes: [\"b_only\"], eventRetentionDays: 1}) { piiTraits consentPurposes eventRetentionDays } }",
                json!({}),
            )
            .await;
        assert_eq!(
            b_settings["setPrivacySettings"]["consentPurposes"],
            json!(["b_only"])
        );
        server
            .gql_ok(
                b_token,
                "mutation { setLifecycleModel(stages: [{key: \"b_only\", name: \"B only\", condition: {all: []}}]) { key } }",
                json!({}),
            )
            .await;
        assert_eq!(
            server.gql_ok(a_token, SETTINGS, json!({})).await,
            a_settings,
            "[{backend:?}] A's privacy settings"
        );
        assert_eq!(
            server.gql_ok(a_token, MODEL, json!({})).await,
            a_model,
            "[{backend:?}] A's lifecycle model"
        );
        assert_eq!(
            server.gql_ok(b_token, SETTINGS, json!({})).await,
            json!({ "privacySettings": b_settings["setPrivacySettings"] })
        );

        // A's person, segment and campaign are intact.
        let a_ada_after = server
            .gql_ok(
                a_token,
                "query($id: ID!) { profile(id: $id) { id eventCount identities { kind value } consentHistory { purpose granted } } }",
                json!({"id": ada}),
            )
            .await;
        assert_eq!(a_ada_after, a_ada_before, "[{backend:?}]");
        assert_eq!(a_ada_after["profile"]["eventCount"], 2);
        assert!(!a_ada_after["profile"]["consentHistory"]
            .as_array()
            .unwrap()
            .is_empty());
        let export = server
            .gql_ok(
                a_token,
                "mutation($id: ID!) { exportProfile(id: $id) }",
                json!({"id": ada}),
            )
            .await;
        assert!(export.to_string().contains(ADA_EMAIL), "[{backend:?}]");
        let a_view = server
            .gql_ok(
                a_token,
                "query($s: ID!, $c: ID!) { segment(id: $s) { name size } campaign(id: $c) { status }
                  emailDeliveries(campaignId: $c) { totalCount } webhooks { id } }",
                json!({"s": pro, "c": campaign}),
            )
            .await;
        assert_eq!(
            a_view,
            json!({"segment": {"name": "Pro", "size": 1}, "campaign": {"status": "ACTIVE"},
                   "emailDeliveries": {"totalCount": 1}, "webhooks": []}),
            "[{backend:?}]"
        );
        // B's person was not merged with A's either.
        let bea_now = profile_by(server, &t.b.access_token, "user_id", "bea").await;
        assert_eq!(bea_now["mergedIds"], json!([]));
        assert_eq!(bea_now["id"], bea.as_str());
        t.server.stop().await;
    }
}

// ---------------- WebSocket helpers ----------------

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_socket(server: &TestServer) -> Socket {
    let mut request = server
        .url("/graphql/ws")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket upgrade");
    socket
}

/// What a socket received next (protocol pings answered by the library are skipped).
#[derive(Debug)]
enum Received {
    Text(Value),
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
                if message["type"] == "ping" {
                    continue;
                }
                return Received::Text(message);
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

async fn send_json(socket: &mut Socket, message: Value) {
    socket
        .send(Message::text(message.to_string()))
        .await
        .unwrap();
}

async fn signed_in_socket(server: &TestServer, token: &str) -> Socket {
    let mut socket = open_socket(server).await;
    send_json(
        &mut socket,
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}),
    )
    .await;
    match receive(&mut socket).await {
        Received::Text(message) if message["type"] == "connection_ack" => socket,
        other => panic!("expected connection_ack, got {other:?}"),
    }
}

async fn subscribe(socket: &mut Socket, id: &str, query: &str, variables: Value) {
    send_json(
        socket,
        json!({"type": "subscribe", "id": id, "payload": {"query": query, "variables": variables}}),
    )
    .await;
}

/// Waits until the server runs `count` subscriptions of the tenant.
async fn subscribed(server: &TestServer, tenant_id: &str, count: usize) {
    let tenant_id = domain::TenantId(tenant_id.parse().unwrap());
    let realtime = server.app.as_ref().unwrap().state().realtime.clone();
    tokio::time::timeout(WAIT, realtime.wait_for_subscriptions(tenant_id, count))
        .await
        .expect("the subscriptions start in time");
}

/// A ping answered by a pong: the socket is open and has read everything sent before the ping.
async fn still_open(socket: &mut Socket) {
    send_json(socket, json!({"type": "ping"})).await;
    loop {
        match receive(socket).await {
            Received::Text(message) if message["type"] == "pong" => return,
            Received::Text(_) => {}
            other => panic!("expected pong, got {other:?}"),
        }
    }
}

/// Reads until the socket closes with `code`; returns the close reason.
async fn expect_close(socket: &mut Socket, code: u16, what: &str) -> String {
    loop {
        match receive(socket).await {
            Received::Closed(Some(got), reason) if got == code => return reason,
            // A reply to something sent before the offending message may come first.
            Received::Text(message) if message["type"] != "next" => {}
            other => panic!("{what}: expected close {code}, got {other:?}"),
        }
    }
}

const PROFILE_UPDATED: &str =
    "subscription($id: ID) { profileUpdated(profileId: $id) { kind profileId profile { id traits } } }";
const EVENT_INGESTED: &str =
    "subscription($name: String) { eventIngested(name: $name) { id profileId name properties } }";
const MEMBERSHIP_CHANGED: &str =
    "subscription($id: ID) { segmentMembershipChanged(segmentId: $id) { segmentId profileId entered } }";
const STAGE_CHANGED: &str = "subscription { lifecycleStageChanged { profileId from to } }";
const DELIVERY_UPDATED: &str =
    "subscription($id: ID) { emailDeliveryUpdated(campaignId: $id) { id campaignId profileId to status } }";

/// Adds to `subscriptions.rs` (where B's unfiltered subscription never sees A's events): every
/// subscription given A's ids as filters (`profileUpdated(profileId)`,
/// `segmentMembershipChanged(segmentId)`, `emailDeliveryUpdated(campaignId)`), an event name of
/// A, and `lifecycleStageChanged`, while A's own subscriber proves that the notices were sent.
#[tokio::test]
async fn subscriptions_filtered_on_tenant_as_ids_receive_nothing_of_tenant_a() {
    for backend in backends() {
        let t = two_tenants(backend, "xs").await;
        let server = &t.server;
        let pro = create_segment(
            server,
            &t.a,
            "Pro",
            json!({"trait": "plan", "op": "eq", "value": "pro"}),
        )
        .await;
        let campaign = event_campaign(server, &t.a, "Order Completed").await;
        send(
            server,
            &t.a_key,
            json!([consenting(identify(
                "ada",
                json!({"email": ADA_EMAIL, "plan": "free"})
            ))]),
        )
        .await;
        let ada = profile_id(server, &t.a, "ada").await;
        send(
            server,
            &t.b_key,
            json!([identify("bea", json!({"plan": "free"}))]),
        )
        .await;
        let bea = profile_id(server, &t.b, "bea").await;

        let mut b_socket = signed_in_socket(server, &t.b.access_token).await;
        subscribe(
            &mut b_socket,
            "profile",
            PROFILE_UPDATED,
            json!({"id": ada}),
        )
        .await;
        subscribe(
            &mut b_socket,
            "members",
            MEMBERSHIP_CHANGED,
            json!({"id": pro}),
        )
        .await;
        subscribe(
            &mut b_socket,
            "emails",
            DELIVERY_UPDATED,
            json!({"id": campaign}),
        )
        .await;
        subscribe(&mut b_socket, "stages", STAGE_CHANGED, json!({})).await;
        subscribe(
            &mut b_socket,
            "orders",
            EVENT_INGESTED,
            json!({"name": "Order Completed"}),
        )
        .await;
        let mut a_socket = signed_in_socket(server, &t.a.access_token).await;
        subscribe(
            &mut a_socket,
            "profile",
            PROFILE_UPDATED,
            json!({"id": ada}),
        )
        .await;
        subscribe(
            &mut a_socket,
            "members",
            MEMBERSHIP_CHANGED,
            json!({"id": pro}),
        )
        .await;
        subscribe(
            &mut a_socket,
            "emails",
            DELIVERY_UPDATED,
            json!({"id": campaign}),
        )
        .await;
        subscribed(server, &t.b.tenant_id, 5).await;
        subscribed(server, &t.a.tenant_id, 3).await;

        send(
            server,
            &t.a_key,
            json!([
                identify("ada", json!({"plan": "pro"})),
                track("ada", "Order Completed", json!({"total": 10})),
            ]),
        )
        .await;
        // A's own subscriber receives all three kinds: the notices were published.
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 3 {
            match receive(&mut a_socket).await {
                Received::Text(message) if message["type"] == "next" => {
                    assert!(message["payload"].get("errors").is_none(), "{message:#}");
                    seen.insert(message["id"].as_str().unwrap().to_owned());
                }
                other => panic!("[{backend:?}] A's subscriber: {other:?}"),
            }
        }

        // B's own order goes through B's `orders` subscription, twice, one after the other. Had
        // any of A's notices reached B, it would have been ready before the second order, which
        // is sent only after the first arrived.
        let a_ids = [ada.as_str(), pro.as_str(), campaign.as_str(), ADA_EMAIL];
        for round in 0..2 {
            send(
                server,
                &t.b_key,
                json!([track("bea", "Order Completed", json!({"round": round}))]),
            )
            .await;
            loop {
                let message = match receive(&mut b_socket).await {
                    Received::Text(message) => message,
                    other => panic!("[{backend:?}] B's socket: {other:?}"),
                };
                let text = message.to_string();
                for a_id in a_ids {
                    assert!(
                        !text.contains(a_id),
                        "[{backend:?}] tenant B received A's {a_id}: {message:#}"
                    );
                }
                assert_eq!(message["type"], "next", "[{backend:?}] {message:#}");
                assert!(message["payload"].get("errors").is_none(), "{message:#}");
                if message["id"] == "orders" {
                    let event = &message["payload"]["data"]["eventIngested"];
                    assert_eq!(event["profileId"], bea.as_str());
                    if event["properties"]["round"] == round {
                        break;
                    }
                } else {
                    // Only B's own stage changes may arrive besides B's orders.
                    assert_eq!(message["id"], "stages", "[{backend:?}] {message:#}");
                    assert_eq!(
                        message["payload"]["data"]["lifecycleStageChanged"]["profileId"],
                        bea.as_str()
                    );
                }
            }
        }
        t.server.stop().await;
    }
}

// ---------------- tokens ----------------

/// Adds to `bad_input.rs`: algorithm confusion (RS256, ES256 and HS512 headers, `alg: none` with
/// a real signature, HS256 signed with public values), missing or wrong `iss`, missing `aud`,
/// `exp`, `typ` or `sub`, `typ: refresh`, and the one-time tokens of the activation and
/// password-reset emails used as access tokens (which stay usable for what they are for).
#[tokio::test]
async fn forged_tokens_and_one_time_tokens_are_not_access_tokens() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("jwt"), "owner@jwt.example").await;

        // The forging is right: the real secret with the real claims is accepted.
        let genuine = jwt(
            &json!({"alg": "HS256", "typ": "JWT"}),
            &access_claims(&owner),
            hs256(&jwt_secret(&server)),
        );
        let me = server.gql_ok(Some(&genuine), ME, json!({})).await;
        assert_eq!(me["me"]["user"]["email"], "owner@jwt.example");

        for (what, token) in forged_tokens(&server, &owner) {
            let response = server.gql(Some(&token), ME, json!({})).await;
            assert_eq!(
                error_code(&response),
                "UNAUTHENTICATED",
                "[{backend:?}] {what}: {response:#}"
            );
            assert!(response["data"].is_null(), "{what}: no data");
        }

        // The one-time tokens of the account emails.
        let before = smtp.received().len();
        server
            .gql_ok(
                Some(&owner.access_token),
                "mutation { inviteUser(email: \"new@jwt.example\", roles: [\"admin\"]) { id } }",
                json!({}),
            )
            .await;
        let activation = token_from_link(
            &mail_to(&smtp, before + 1, "new@jwt.example").await.text(),
            "/activate",
        );
        server
            .gql_ok(
                None,
                "mutation($s: String!, $e: String!) { requestPasswordReset(tenantSlug: $s, email: $e) }",
                json!({"s": server.gql_ok(Some(&owner.access_token), "{ tenant { slug } }", json!({})).await["tenant"]["slug"], "e": "owner@jwt.example"}),
            )
            .await;
        let reset = token_from_link(
            &mail_to(&smtp, before + 2, "owner@jwt.example").await.text(),
            "/reset-password",
        );
        for (what, token) in [
            ("an activation token", &activation),
            ("a password-reset token", &reset),
        ] {
            let response = server.gql(Some(token), ME, json!({})).await;
            assert_eq!(
                error_code(&response),
                "UNAUTHENTICATED",
                "[{backend:?}] {what}: {response:#}"
            );
            let response = server
                .gql(Some(token), "{ users { totalCount } }", json!({}))
                .await;
            assert_eq!(error_code(&response), "UNAUTHENTICATED", "{what}");
        }
        // Refusing them did not spend them: each still does its own job.
        server
            .gql_ok(
                None,
                ACTIVATE,
                json!({"token": activation, "password": PASSWORD}),
            )
            .await;
        server
            .gql_ok(
                None,
                "mutation($t: String!, $p: String!) { resetPassword(token: $t, password: $p) { accessToken } }",
                json!({"t": reset, "p": "another correct horse battery"}),
            )
            .await;
        server.stop().await;
    }
}

// ---------------- query bombs ----------------

/// A query of `count` aliases of `field`.
/// A query of `count` aliases of `field` under `me` (at the root, `abuse.rs` shows the root-field
/// limit refusing far fewer).
fn aliases(count: usize, field: &str) -> String {
    let mut query = String::from("{ me { ");
    for index in 0..count {
        query.push_str(&format!("a{index}: {field} "));
    }
    query.push_str("} }");
    query
}

/// Posts a query with a deadline: a bomb must be refused quickly, not computed.
async fn post_in_time(server: &TestServer, token: &str, body: &Value) -> (u16, Value) {
    let response = tokio::time::timeout(
        WAIT,
        server
            .client
            .post(server.url("/graphql"))
            .bearer_auth(token)
            .json(body)
            .send(),
    )
    .await
    .expect("the server answers in time")
    .expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON response"))
}

fn assert_too_complex(response: &Value, what: &str) {
    assert_eq!(
        error_code(response),
        "BAD_USER_INPUT",
        "{what}: {response:#}"
    );
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("too complex"),
        "{what}: {response:#}"
    );
    assert!(response["data"].is_null(), "{what}: nothing executed");
}

/// Adds to `bad_input.rs` (depth 20 refused, 11 operations refused) and `abuse.rs` (root fields
/// and account mutations per operation): a query within the depth limit but over the complexity
/// limit, an alias bomb and a fragment bomb (fragments spreading each other twice, 2^30
/// selections once expanded) below the root, a fragment cycle, directive bombs, a batch of ten
/// bombs, and values nested far deeper than any limit, in the query text and in the variables.
/// Each is refused quickly, and the server goes on answering.
#[tokio::test]
async fn complexity_alias_fragment_directive_and_nesting_bombs_are_refused_quickly() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("bomb"), "owner@bomb.example").await;
        let token = owner.access_token.as_str();

        // Within the limits, a large query runs: the limits are where the configuration says.
        let (status, response) = post_in_time(
            &server,
            token,
            &json!({"query": aliases(4000, "__typename")}),
        )
        .await;
        assert_eq!(status, 200);
        assert!(response.get("errors").is_none(), "{response:#}");
        assert_eq!(response["data"]["me"]["a3999"], "Me");

        // Depth 6 (under 16), complexity 12 × 12 × 40: each alias level multiplies the fields.
        let fields = "id type name properties timestamp receivedAt messageId profileId ".repeat(5);
        let inner: String = (0..12)
            .map(|index| {
                format!("e{index}: events(first: 500) {{ edges {{ node {{ {fields} }} }} }} ")
            })
            .collect();
        let outer: String = (0..12)
            .map(|index| {
                format!("p{index}: profiles(first: 500) {{ edges {{ node {{ {inner} }} }} }} ")
            })
            .collect();
        let (_, response) =
            post_in_time(&server, token, &json!({"query": format!("{{ {outer} }}")})).await;
        assert_too_complex(&response, "complexity bomb");

        let (_, response) = post_in_time(
            &server,
            token,
            &json!({"query": aliases(5001, "__typename")}),
        )
        .await;
        assert_too_complex(&response, "alias bomb");

        // F0 spreads F1 twice, F1 spreads F2 twice, …: 2^30 fields from thirty small fragments,
        // under one root field (at the root, the root-field limit of `abuse.rs` stops it).
        let mut bomb = String::from("query { me { ...F0 } } ");
        for level in 0..30 {
            let next = level + 1;
            bomb.push_str(&format!(
                "fragment F{level} on Me {{ ...F{next} ...F{next} }} "
            ));
        }
        bomb.push_str("fragment F30 on Me { permissions }");
        let (_, response) = post_in_time(&server, token, &json!({"query": bomb})).await;
        assert_too_complex(&response, "fragment bomb");

        // A fragment spreading itself is refused too, not followed.
        let cycle = "query { me { ...A } } fragment A on Me { permissions ...B } fragment B on Me { ...A ...A }";
        let (_, response) = post_in_time(&server, token, &json!({"query": cycle})).await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response:#}");
        assert!(response["data"].is_null());

        // Forty thousand directives on one field, and on one fragment spread.
        let directives = "@skip(if: false) ".repeat(40_000);
        for query in [
            format!("{{ me {directives} {{ user {{ email }} }} }}"),
            format!("{{ me {{ ...F {directives} }} }} fragment F on Me {{ permissions }}"),
        ] {
            let (_, response) = post_in_time(&server, token, &json!({ "query": query })).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "directive bomb");
            assert_eq!(
                response["errors"].as_array().unwrap().len(),
                1,
                "one error, not 40,000"
            );
            assert!(response["data"].is_null());
        }

        let batch: Vec<Value> = (0..10)
            .map(|_| json!({"query": aliases(5001, "__typename")}))
            .collect();
        let (status, responses) = post_in_time(&server, token, &json!(batch)).await;
        assert_eq!(status, 200);
        assert_eq!(responses.as_array().unwrap().len(), 10);
        for response in responses.as_array().unwrap() {
            assert_too_complex(response, "batch of bombs");
        }

        // Values nested 100,000 deep: in the query text, and in the variables.
        let deep_literal = format!(
            "{{ previewSegment(condition: {}{}) {{ size }} }}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let (_, response) = post_in_time(&server, token, &json!({"query": deep_literal})).await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "deep literal");
        assert!(response["data"].is_null());
        let deep_variables = format!(
            r#"{{"query": "query($c: JSON!) {{ previewSegment(condition: $c) {{ size }} }}", "variables": {{"c": {}{}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let response = server
            .client
            .post(server.url("/graphql"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(deep_variables)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(
            error_code(&response.json().await.unwrap()),
            "BAD_USER_INPUT"
        );

        // The server is still well.
        let (status, response) = post_in_time(
            &server,
            token,
            &json!({"query": "{ me { user { email } } }"}),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            response["data"]["me"]["user"]["email"],
            "owner@bomb.example"
        );
        server.stop().await;
    }
}

// ---------------- ingestion bodies ----------------

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Posts raw bytes to `/v1/batch`; `gzipped` adds `Content-Encoding: gzip`.
async fn post_raw(server: &TestServer, key: &str, body: Vec<u8>, gzipped: bool) -> (u16, Value) {
    let mut request = server
        .client
        .post(server.url("/v1/batch"))
        .basic_auth(key, Some(""))
        .header("content-type", "application/json");
    if gzipped {
        request = request.header("content-encoding", "gzip");
    }
    let response = request.body(body).send().await.expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A batch body with `filler` as one message's property, inside a JSON string.
fn padded_batch(filler: &[u8]) -> Vec<u8> {
    let mut body = br#"{"batch":[{"type":"track","userId":"bomber","event":"Bomb","messageId":"bomb","properties":{"pad":""#.to_vec();
    body.extend_from_slice(filler);
    body.extend_from_slice(br#""}}]}"#);
    body
}

fn rejections(body: &Value) -> Vec<(String, String)> {
    body["rejected"]
        .as_array()
        .map(|rejected| {
            rejected
                .iter()
                .map(|rejection| {
                    (
                        rejection["messageId"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        rejection["reason"]
                            .as_str()
                            .unwrap()
                            .split(':')
                            .next()
                            .unwrap()
                            .to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Adds to `unify.rs` and `collect.rs` (NUL in an event name, invalid UTF-8 in a string value,
/// 413 over the tenant's limits): gzip bombs past the hard cap and past the tenant's limit, a
/// corrupt gzip body, JSON nested past the parser's limit and past the message limit, NUL in a
/// property name, in a trait value, in the batch-level context and as a raw byte, invalid UTF-8
/// in a property name, in a gzip body and outside any string, a lone UTF-16 surrogate, and NUL
/// through the GraphQL `track` mutation. Each gets the contract's answer; what was accepted
/// before is all still there.
#[tokio::test]
async fn hostile_collection_bodies_get_the_contracts_answer_and_lose_nothing() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("body"), "owner@body.example").await;
        let key = write_key(&server, &owner, "site", "SERVER").await;
        send(
            &server,
            &key,
            json!([
                identify("kept", json!({"plan": "pro"})),
                track("kept", "Kept", json!({"n": 1})),
            ]),
        )
        .await;
        assert_eq!(event_total(&server, &owner).await, 2);

        // Gzip bombs: 20 MiB of zeros (over the 16 MiB hard cap) and 5 MiB (under the cap, over
        // the tenant's 4 MB), each about a thousandth of that on the wire.
        let cap = server
            .app
            .as_ref()
            .unwrap()
            .state()
            .config
            .ingest_max_body_bytes;
        for inflated in [cap + 4 * 1024 * 1024, 5 * 1024 * 1024] {
            let bomb = gzip(&padded_batch(&vec![b'0'; inflated]));
            assert!(bomb.len() < inflated / 100, "a real bomb");
            let (status, body) = post_raw(&server, &key, bomb, true).await;
            assert_eq!(
                (status, body["code"].clone()),
                (413, json!("payload_too_large")),
                "[{backend:?}] {inflated} bytes inflated: {body}"
            );
        }
        let mut corrupt = gzip(br#"{"batch":[]}"#);
        corrupt.truncate(corrupt.len() / 2);
        let (status, body) = post_raw(&server, &key, corrupt, true).await;
        assert_eq!((status, body["code"].clone()), (400, json!("invalid_gzip")));
        let (status, body) = post_raw(&server, &key, br#"{"batch":[]}"#.to_vec(), true).await;
        assert_eq!((status, body["code"].clone()), (400, json!("invalid_gzip")));

        // Nesting past the JSON parser's limit refuses the whole body; past the message limit
        // (16) only that message.
        let mut deep =
            br#"{"batch":[{"type":"track","userId":"u","event":"Deep","properties":{"x":"#.to_vec();
        deep.extend_from_slice(&b"[".repeat(100_000));
        deep.extend_from_slice(&b"]".repeat(100_000));
        deep.extend_from_slice(b"}}]}");
        let (status, body) = post_raw(&server, &key, deep, false).await;
        assert_eq!((status, body["code"].clone()), (400, json!("invalid_json")));
        let mut nested = json!("bottom");
        for _ in 0..20 {
            nested = json!({ "in": nested });
        }
        let body = send(
            &server,
            &key,
            json!([
                {"type": "track", "userId": "u", "event": "Deep", "messageId": "deep", "properties": {"x": nested}},
                {"type": "track", "userId": "u", "event": "Shallow", "messageId": "shallow-1"},
            ]),
        )
        .await;
        assert_eq!(
            rejections(&body),
            [("deep".to_owned(), "too_deep".to_owned())]
        );

        // NUL: escaped in a property name, a trait value or the batch-level context, the message
        // is rejected with its reason; as a raw byte, the body is not JSON.
        let (status, body) = collect(
            &server,
            "/v1/batch",
            &key,
            &json!({
                "batch": [
                    {"type": "track", "userId": "u", "event": "E", "messageId": "nul-key", "properties": {"a\u{0}b": 1}},
                    {"type": "identify", "userId": "u", "messageId": "nul-trait", "traits": {"plan": "p\u{0}"}},
                    {"type": "track", "userId": "u", "event": "Shallow", "messageId": "shallow-2"},
                ]
            }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            rejections(&body),
            [
                ("nul-key".to_owned(), "nul_character".to_owned()),
                ("nul-trait".to_owned(), "nul_character".to_owned()),
            ]
        );
        let (status, body) = collect(
            &server,
            "/v1/batch",
            &key,
            &json!({
                "context": {"library": {"name": "evil\u{0}"}},
                "batch": [{"type": "track", "userId": "u", "event": "E", "messageId": "nul-context"}]
            }),
        )
        .await;
        assert_eq!(status, 200, "[{backend:?}] {body}");
        assert_eq!(
            rejections(&body),
            [("nul-context".to_owned(), "nul_character".to_owned())],
            "[{backend:?}]"
        );
        let (status, body) = post_raw(
            &server,
            &key,
            b"{\"batch\":[{\"type\":\"track\",\"userId\":\"u\",\"event\":\"Raw\0Nul\"}]}".to_vec(),
            false,
        )
        .await;
        assert_eq!((status, body["code"].clone()), (400, json!("invalid_json")));

        // Invalid UTF-8 in a property name, and inside a gzip body: only that message. Outside
        // any string, or as a lone surrogate escape: the body is not JSON.
        let mut bad_key = br#"{"batch":[{"type":"track","userId":"u","event":"E","messageId":"utf-key","properties":{"k"#.to_vec();
        bad_key.extend_from_slice(&[0xc3, 0x28]);
        bad_key.extend_from_slice(
            br#"":1}},{"type":"track","userId":"u","event":"Shallow","messageId":"shallow-3"}]}"#,
        );
        let (status, body) = post_raw(&server, &key, bad_key, false).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            rejections(&body),
            [("utf-key".to_owned(), "invalid_utf8".to_owned())]
        );
        let mut bad_value = br#"{"batch":[{"type":"track","userId":"u","event":"E","messageId":"utf-gzip","properties":{"v":""#.to_vec();
        bad_value.extend_from_slice(&[0xed, 0xa0, 0x80]);
        bad_value.extend_from_slice(
            br#""}},{"type":"track","userId":"u","event":"Shallow","messageId":"shallow-4"}]}"#,
        );
        let (status, body) = post_raw(&server, &key, gzip(&bad_value), true).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            rejections(&body),
            [("utf-gzip".to_owned(), "invalid_utf8".to_owned())]
        );
        let mut outside = br#"{"batch":[{"type":"track","userId":"u","event":"E"}]"#.to_vec();
        outside.extend_from_slice(&[0xff]);
        outside.push(b'}');
        let (status, body) = post_raw(&server, &key, outside, false).await;
        assert_eq!((status, body["code"].clone()), (400, json!("invalid_json")));
        let surrogate =
            br#"{"batch":[{"type":"track","userId":"u","event":"\ud800","messageId":"lone"}]}"#;
        let (status, body) = post_raw(&server, &key, surrogate.to_vec(), false).await;
        assert_eq!((status, body["code"].clone()), (400, json!("invalid_json")));

        // The GraphQL write path refuses NUL the same way.
        let response = server
            .gql(
                Some(&owner.access_token),
                "mutation($input: TrackInput!) { track(input: $input) { id } }",
                json!({"input": {"userId": "u", "event": "Nul\u{0}"}}),
            )
            .await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response:#}");

        // Everything accepted is there: the two first events and the four shallow ones.
        assert_eq!(event_total(&server, &owner).await, 6, "[{backend:?}]");
        let kept = profile_by(&server, &owner.access_token, "user_id", "kept").await;
        assert_eq!(kept["traits"]["plan"], "pro");
        assert_eq!(kept["eventCount"], 2);
        let health = server
            .client
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        server.stop().await;
    }
}

// ---------------- SQL metacharacters ----------------

/// Names and values that would break SQL, a SQLite JSON path or a PostgreSQL text array if they
/// were ever spliced into a statement, or match too much if they reached a LIKE pattern.
const HOSTILE: [&str; 20] = [
    "O'Brien",
    "'); DROP TABLE events; --",
    "\"; DROP TABLE profiles; --",
    "1' OR '1'='1",
    "a -- comment",
    "semi;colon",
    "back\\slash\\",
    "100%",
    "under_score",
    "%",
    "_",
    "$1 ? :name @p",
    "$[0] ** \"x\"",
    "{a,b}",
    "Zoë ☃ 🎉 \u{202e}txt",
    "'",
    "\"",
    "\\",
    "\\\"'",
    "*",
];

/// The expected members of a condition: the users whose hostile string satisfies `holds`.
fn users_where(holds: impl Fn(&str) -> bool) -> Vec<String> {
    let mut users: Vec<String> = HOSTILE
        .iter()
        .enumerate()
        .filter(|(_, text)| holds(text))
        .map(|(index, _)| format!("sql-{index}"))
        .collect();
    users.sort();
    users
}

/// Counts a table's rows as the database owner: the table is still there.
async fn count_rows(db: &TestDb, table: &str) -> i64 {
    let connection = Database::connect(&db.owner_url).await.expect("connect");
    let row = connection
        .query_one_raw(Statement::from_string(
            connection.get_database_backend(),
            format!("SELECT count(*) FROM {table}"),
        ))
        .await
        .unwrap_or_else(|error| panic!("{table} is still there: {error}"))
        .unwrap();
    row.try_get_by_index::<i64>(0).unwrap()
}

/// Adds to `segments.rs` (conditions validated and evaluated): trait names and values, event
/// names and property names made of quotes, semicolons, comments, `DROP TABLE`, backslashes,
/// `%`, `_`, JSON path and array syntax and unicode; conditions on them, through
/// `previewSegment` and saved segments (with hostile names), `profiles(traitEquals)`,
/// `events(name)` and `profileByIdentity`. Each is data: the members are exactly the expected
/// ones, no error is INTERNAL, and every table is still there.
#[tokio::test]
async fn sql_metacharacters_in_names_values_and_conditions_are_only_data() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("sql"), "owner@sql.example").await;
        let key = write_key(&server, &owner, "site", "SERVER").await;
        let token = Some(owner.access_token.as_str());

        let mut messages = Vec::new();
        for (index, text) in HOSTILE.iter().enumerate() {
            let user = format!("sql-{index}");
            let mut traits = serde_json::Map::new();
            traits.insert((*text).to_owned(), json!(text));
            traits.insert("k".to_owned(), json!(text));
            messages.push(identify(&user, Value::Object(traits)));
            let mut properties = serde_json::Map::new();
            properties.insert((*text).to_owned(), json!(text));
            messages.push(track(&user, text, Value::Object(properties)));
        }
        let body = send(&server, &key, Value::Array(messages)).await;
        assert!(body.get("rejected").is_none(), "{body:#}");
        let mut ids = std::collections::HashMap::new();
        for index in 0..HOSTILE.len() {
            let user = format!("sql-{index}");
            ids.insert(profile_id(&server, &owner, &user).await, user);
        }
        let members_of = |sample: &Value| -> Vec<String> {
            let mut users: Vec<String> = sample
                .as_array()
                .unwrap()
                .iter()
                .map(|profile| ids[profile["id"].as_str().unwrap()].clone())
                .collect();
            users.sort();
            users
        };
        let preview = |condition: Value| {
            let server = &server;
            async move {
                let response = server
                    .gql(
                        token,
                        "query($c: JSON!) { previewSegment(condition: $c) { size sample { id } } }",
                        json!({ "c": condition }),
                    )
                    .await;
                assert!(
                    response.get("errors").is_none(),
                    "[{backend:?}] {condition}: {response:#}"
                );
                response["data"]["previewSegment"].clone()
            }
        };

        for (index, text) in HOSTILE.iter().enumerate() {
            let expected = vec![format!("sql-{index}")];
            for condition in [
                json!({"trait": text, "op": "eq", "value": text}),
                json!({"trait": text, "op": "exists"}),
                json!({"trait": "k", "op": "eq", "value": text}),
                json!({"event": text}),
                json!({"event": text, "where": [{"property": text, "op": "eq", "value": text}]}),
            ] {
                let found = preview(condition.clone()).await;
                assert_eq!(found["size"], 1, "[{backend:?}] {condition}: {found}");
                assert_eq!(members_of(&found["sample"]), expected, "{condition}");
            }
        }
        // Pattern characters match only themselves.
        for (op, needle) in [
            ("contains", "%"),
            ("contains", "_"),
            ("contains", "'"),
            ("contains", "\\"),
            ("contains", "--"),
            ("starts_with", "%"),
            ("starts_with", "_"),
            ("starts_with", "\\"),
            ("starts_with", "*"),
        ] {
            let expected = users_where(|text| match op {
                "contains" => text.contains(needle),
                _ => text.starts_with(needle),
            });
            let condition = json!({"trait": "k", "op": op, "value": needle});
            let found = preview(condition.clone()).await;
            assert_eq!(
                found["size"].as_u64().unwrap() as usize,
                expected.len(),
                "[{backend:?}] {condition}: {found}"
            );
            assert!(expected.len() <= 10, "the sample holds them all");
            assert_eq!(members_of(&found["sample"]), expected, "{condition}");
        }
        let everyone = preview(json!({"trait": "k", "op": "in", "value": HOSTILE})).await;
        assert_eq!(everyone["size"], HOSTILE.len());
        let nobody = preview(json!({"trait": "k", "op": "eq", "value": "' OR 1=1 --"})).await;
        assert_eq!(nobody["size"], 0);

        // Saved segments with hostile names keep them verbatim and have the right members.
        for (index, text) in HOSTILE.iter().enumerate().step_by(3) {
            let segment = server
                .gql_ok(
                    token,
                    "mutation($input: SegmentInput!) { createSegment(input: $input) { id name size
                        members { edges { node { id } } } } }",
                    json!({"input": {"name": text, "description": text,
                        "condition": {"event": text, "where": [{"property": text, "op": "starts_with", "value": text}]}}}),
                )
                .await;
            let segment = &segment["createSegment"];
            assert_eq!(segment["name"], *text, "[{backend:?}]");
            assert_eq!(segment["size"], 1, "[{backend:?}] {text}");
            assert_eq!(
                ids[segment["members"]["edges"][0]["node"]["id"]
                    .as_str()
                    .unwrap()],
                format!("sql-{index}")
            );
        }

        // Filters and lookups by hostile values find exactly their row, or nothing.
        for (index, text) in HOSTILE.iter().enumerate() {
            let mut equals = serde_json::Map::new();
            equals.insert("k".to_owned(), json!(text));
            let data = server
                .gql_ok(
                    token,
                    "query($f: ProfileFilter, $n: String, $v: String!) {
                        profiles(filter: $f) { totalCount edges { node { id } } }
                        events(name: $n) { totalCount edges { node { name properties } } }
                        profileByIdentity(kind: \"user_id\", value: $v) { id } }",
                    json!({"f": {"traitEquals": equals}, "n": text, "v": text}),
                )
                .await;
            assert_eq!(data["profiles"]["totalCount"], 1, "[{backend:?}] {text}");
            assert_eq!(
                ids[data["profiles"]["edges"][0]["node"]["id"].as_str().unwrap()],
                format!("sql-{index}")
            );
            assert_eq!(data["events"]["totalCount"], 1, "[{backend:?}] {text}");
            assert_eq!(data["events"]["edges"][0]["node"]["name"], *text);
            assert_eq!(
                data["events"]["edges"][0]["node"]["properties"][text],
                *text
            );
            assert!(data["profileByIdentity"].is_null());
            let kind = server
                .gql(
                    token,
                    "query($k: String!) { profileByIdentity(kind: $k, value: \"x\") { id } }",
                    json!({ "k": text }),
                )
                .await;
            if kind.get("errors").is_some() {
                assert_eq!(error_code(&kind), "BAD_USER_INPUT", "{kind:#}");
            } else {
                assert!(kind["data"]["profileByIdentity"].is_null());
            }
        }

        // NUL cannot be stored in PostgreSQL text at all: refused as input, not an internal error.
        for (what, query, variables) in [
            (
                "a condition value",
                "query($c: JSON!) { previewSegment(condition: $c) { size } }",
                json!({"c": {"trait": "k", "op": "eq", "value": "a\u{0}b"}}),
            ),
            (
                "a condition path",
                "query($c: JSON!) { previewSegment(condition: $c) { size } }",
                json!({"c": {"trait": "a\u{0}b", "op": "exists"}}),
            ),
            (
                "an event name in a condition",
                "query($c: JSON!) { previewSegment(condition: $c) { size } }",
                json!({"c": {"event": "a\u{0}b"}}),
            ),
            (
                "a segment name",
                "mutation($input: SegmentInput!) { createSegment(input: $input) { id } }",
                json!({"input": {"name": "a\u{0}b", "condition": {"all": []}}}),
            ),
            (
                "an identity value",
                "query($v: String!) { profileByIdentity(kind: \"user_id\", value: $v) { id } }",
                json!({"v": "a\u{0}b"}),
            ),
        ] {
            let response = server.gql(token, query, variables).await;
            assert_eq!(
                error_code(&response),
                "BAD_USER_INPUT",
                "[{backend:?}] NUL in {what}: {response:#}"
            );
        }

        // Every table is still there, with every row.
        assert_eq!(event_total(&server, &owner).await, 2 * HOSTILE.len() as i64);
        for table in [
            "events",
            "profiles",
            "identities",
            "segments",
            "users",
            "tenants",
        ] {
            assert!(
                count_rows(&server.db, table).await > 0,
                "[{backend:?}] {table}"
            );
        }
        server.stop().await;
    }
}

// ---------------- email headers ----------------

/// Adds to `campaigns.rs` (CR/LF in a subject template and in a trait rendered into a subject):
/// the recipient side. An email trait or an external email identity with CR/LF never becomes an
/// address (the profile's campaign email is suppressed for want of one); sign-up, invitation and
/// password-reset addresses and tenant names with CR/LF are refused. No email goes to the
/// injected address and no email carries an injected header.
#[tokio::test]
async fn line_breaks_in_addresses_and_names_never_reach_an_email_header() {
    for backend in backends() {
        init_logs();
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let tenant_slug = slug("hdr");
        let owner = new_tenant(&server, &smtp, &tenant_slug, "owner@hdr.example").await;
        let key = write_key(&server, &owner, "site", "SERVER").await;
        let token = Some(owner.access_token.as_str());
        const VICTIM: &str = "victim@hdr.example";
        let injected = [
            format!("eve@hdr.example\r\nBcc: {VICTIM}"),
            format!("eve@hdr.example\nBcc: {VICTIM}"),
            format!("eve@hdr.example\r\n\r\nInjected body <{VICTIM}>"),
            format!("\"eve\r\nBcc: {VICTIM}\"@hdr.example"),
        ];

        for (index, address) in injected.iter().enumerate() {
            let sign_up = server
                .gql(
                    None,
                    SIGN_UP,
                    json!({"input": {"tenantName": "Evil", "tenantSlug": slug("evil"), "email": address}}),
                )
                .await;
            assert_eq!(error_code(&sign_up), "BAD_USER_INPUT", "{sign_up:#}");
            assert_eq!(sign_up["errors"][0]["extensions"]["field"], "email");
            let invite = server
                .gql(
                    token,
                    "mutation($e: String!) { inviteUser(email: $e, roles: [\"viewer\"]) { id } }",
                    json!({ "e": address }),
                )
                .await;
            assert_eq!(error_code(&invite), "BAD_USER_INPUT", "{invite:#}");
            let reset = server
                .gql_ok(
                    None,
                    "mutation($s: String!, $e: String!) { requestPasswordReset(tenantSlug: $s, email: $e) }",
                    json!({"s": tenant_slug, "e": address}),
                )
                .await;
            assert_eq!(reset["requestPasswordReset"], true);
            let name = server
                .gql(
                    None,
                    SIGN_UP,
                    json!({"input": {"tenantName": format!("Evil {index}\r\nBcc: {VICTIM}"),
                        "tenantSlug": slug("evil"), "email": format!("ok{index}@hdr.example")}}),
                )
                .await;
            assert_eq!(error_code(&name), "BAD_USER_INPUT", "{name:#}");
        }

        // Campaign emails: Eve's addresses carry line breaks, Mallory's is fine.
        event_campaign(&server, &owner, "Poke").await;
        let mut messages = Vec::new();
        for (index, address) in injected.iter().enumerate() {
            let user = format!("eve-{index}");
            let mut message = consenting(identify(&user, json!({"email": address, "name": "Eve"})));
            message["context"]["externalIds"] = json!([{"type": "email", "id": address}]);
            messages.push(message);
            messages.push(track(&user, "Poke", json!({})));
        }
        messages.push(consenting(identify(
            "mallory",
            json!({"email": "mallory@hdr.example", "name": "Mallory"}),
        )));
        messages.push(track("mallory", "Poke", json!({})));
        let before = smtp.received().len();
        send(&server, &key, Value::Array(messages)).await;
        let mail = mail_to(&smtp, before + 1, "mallory@hdr.example").await;
        assert_eq!(mail.to, ["mallory@hdr.example"]);

        for index in 0..injected.len() {
            let eve = profile_by(
                &server,
                &owner.access_token,
                "user_id",
                &format!("eve-{index}"),
            )
            .await;
            let kinds: Vec<&Value> = eve["identities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|identity| &identity["kind"])
                .collect();
            assert_eq!(kinds, [&json!("user_id")], "[{backend:?}] {eve:#}");
            let deliveries = server
                .gql_ok(
                    token,
                    "query($p: ID) { emailDeliveries(profileId: $p) { edges { node { status suppressionReason to } } } }",
                    json!({"p": eve["id"]}),
                )
                .await;
            for edge in deliveries["emailDeliveries"]["edges"].as_array().unwrap() {
                assert_eq!(edge["node"]["status"], "SUPPRESSED", "{deliveries:#}");
                assert!(!edge["node"]["to"].as_str().unwrap().contains(VICTIM));
            }
        }

        // One more email, queued last, as a barrier: everything queued before it has gone out.
        let before = smtp.received().len();
        server
            .gql_ok(
                None,
                "mutation($s: String!) { requestPasswordReset(tenantSlug: $s, email: \"owner@hdr.example\") }",
                json!({ "s": tenant_slug }),
            )
            .await;
        mail_to(&smtp, before + 1, "owner@hdr.example").await;
        for mail in smtp.received() {
            assert!(
                mail.to
                    .iter()
                    .all(|to| to.ends_with("@hdr.example") && to != VICTIM),
                "[{backend:?}] {:?}",
                mail.to
            );
            assert!(mail.header("Bcc").is_none());
            assert!(mail.header("Cc").is_none());
            assert!(!mail.text().contains("Injected body"));
        }
        server.stop().await;
    }
}

// ---------------- WebSocket protocol abuse ----------------

/// Adds to `subscriptions.rs` and `http_surface.rs` (no credentials, a garbage, expired or unknown
/// user's token: 4403; a subscription before `connection_init`: 4401): a socket that never sends
/// `connection_init` (4408), `connection_init` twice (4429), two running subscriptions with one
/// id (4409; an id may be reused once its subscription completed), frames that are not JSON or
/// not protocol messages (4400), and forged tokens, one-time tokens, refresh tokens and a
/// revoked secret key in `connection_init` (4403). A good socket works afterwards.
#[tokio::test]
async fn websocket_protocol_abuse_is_closed_with_the_protocols_codes() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("wsabuse"), "owner@wsabuse.example").await;
        // Opened first, answered last: it never says connection_init.
        let mut idle = open_socket(&server).await;

        let mut twice = signed_in_socket(&server, &owner.access_token).await;
        send_json(
            &mut twice,
            json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", owner.access_token)}}),
        )
        .await;
        expect_close(&mut twice, 4429, "connection_init twice").await;

        let mut duplicate = signed_in_socket(&server, &owner.access_token).await;
        subscribe(&mut duplicate, "same", STAGE_CHANGED, json!({})).await;
        // An id whose subscription completed may be used again: a bad filter ends it at once.
        subscribe(
            &mut duplicate,
            "done",
            PROFILE_UPDATED,
            json!({"id": "not-an-id"}),
        )
        .await;
        loop {
            match receive(&mut duplicate).await {
                Received::Text(message) if message["type"] == "complete" => {
                    assert_eq!(message["id"], "done");
                    break;
                }
                Received::Text(message) if message["type"] == "next" => {
                    assert_eq!(error_code(&message["payload"]), "BAD_USER_INPUT")
                }
                other => panic!("[{backend:?}] expected the bad subscription to end: {other:?}"),
            }
        }
        subscribe(&mut duplicate, "done", STAGE_CHANGED, json!({})).await;
        // So may an id the client completed itself.
        subscribe(&mut duplicate, "mine", STAGE_CHANGED, json!({})).await;
        send_json(&mut duplicate, json!({"type": "complete", "id": "mine"})).await;
        subscribe(&mut duplicate, "mine", STAGE_CHANGED, json!({})).await;
        still_open(&mut duplicate).await;
        subscribe(&mut duplicate, "same", STAGE_CHANGED, json!({})).await;
        let reason = expect_close(&mut duplicate, 4409, "two subscriptions with one id").await;
        assert_eq!(reason, "Subscriber for same already exists");

        for (what, frame) in [
            ("text that is not JSON", Message::text("{not json")),
            ("binary garbage", Message::binary(vec![0xff, 0x00, 0xfe])),
            (
                "an unknown message type",
                Message::text(r#"{"type":"hello"}"#),
            ),
            (
                "a subscribe without an id",
                Message::text(
                    r#"{"type":"subscribe","payload":{"query":"subscription { lifecycleStageChanged { to } }"}}"#,
                ),
            ),
        ] {
            let mut socket = signed_in_socket(&server, &owner.access_token).await;
            socket.send(frame.clone()).await.unwrap();
            expect_close(&mut socket, 4400, what).await;
            // Before connection_init too.
            let mut socket = open_socket(&server).await;
            socket.send(frame).await.unwrap();
            expect_close(&mut socket, 4400, what).await;
        }

        // Credentials that are not a valid access token or api key.
        let before = smtp.received().len();
        server
            .gql_ok(
                Some(&owner.access_token),
                "mutation { inviteUser(email: \"new@wsabuse.example\", roles: [\"admin\"]) { id } }",
                json!({}),
            )
            .await;
        let activation = token_from_link(
            &mail_to(&smtp, before + 1, "new@wsabuse.example")
                .await
                .text(),
            "/activate",
        );
        let revoked = server
            .gql_ok(
                Some(&owner.access_token),
                "mutation { createApiKey(name: \"gone\", scope: SECRET) { apiKey { id } secret } }",
                json!({}),
            )
            .await["createApiKey"]
            .clone();
        server
            .gql_ok(
                Some(&owner.access_token),
                "mutation($id: ID!) { revokeApiKey(id: $id) { revokedAt } }",
                json!({"id": revoked["apiKey"]["id"]}),
            )
            .await;
        let mut refused = forged_tokens(&server, &owner);
        refused.push(("an activation token", activation));
        refused.push(("a refresh token", owner.refresh_token.clone()));
        refused.push((
            "a revoked secret key",
            revoked["secret"].as_str().unwrap().to_owned(),
        ));
        for (what, token) in refused {
            let mut socket = open_socket(&server).await;
            send_json(
                &mut socket,
                json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}),
            )
            .await;
            expect_close(&mut socket, 4403, what).await;
        }

        // A well-behaved client is served.
        let mut good = signed_in_socket(&server, &owner.access_token).await;
        subscribe(&mut good, "1", STAGE_CHANGED, json!({})).await;
        still_open(&mut good).await;
        expect_close(&mut idle, 4408, "no connection_init").await;
        server.stop().await;
    }
}
