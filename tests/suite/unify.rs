//! The rules of collection and unification, over real HTTP on both databases.

use api::metrics::IngestRetry;
use serde_json::{json, Value};

use crate::support::*;

async fn setup(backend: Backend, smtp: &SmtpSink, name: &str) -> (TestServer, Session, String) {
    let server = TestServer::start(backend, smtp).await;
    let owner = new_tenant(&server, smtp, &slug(name), &format!("owner@{name}.example")).await;
    let key = write_key(&server, &owner, name, "SERVER").await;
    (server, owner, key)
}

async fn event_total(server: &TestServer, token: &str) -> i64 {
    server
        .gql_ok(Some(token), "{ events { totalCount } }", json!({}))
        .await["events"]["totalCount"]
        .as_i64()
        .unwrap()
}

/// How many ingestion transactions the server began again for each of `reasons`.
fn retries<const N: usize>(server: &TestServer, reasons: [IngestRetry; N]) -> [u64; N] {
    let metrics = &server.app.as_ref().expect("running").state().metrics;
    reasons.map(|reason| metrics.ingest_retry_count(reason))
}

#[tokio::test]
async fn a_retried_batch_is_stored_once() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "retry").await;
        let batch = json!({"batch": [
            {"type": "track", "userId": "u1", "event": "A", "messageId": "m-1"},
            {"type": "track", "userId": "u1", "event": "B", "messageId": "m-2"},
            {"type": "track", "userId": "u1", "event": "B", "messageId": "m-2"},
            {"type": "track", "userId": "u1", "event": "Order Completed",
             "properties": {"revenue": 12.5}, "messageId": "m-3"}
        ]});
        for _ in 0..3 {
            let (status, body) = collect(&server, "/v1/batch", &key, &batch).await;
            assert_eq!((status, body), (200, json!({"success": true})));
        }
        assert_eq!(event_total(&server, &owner.access_token).await, 3);
        let profile = profile_by(&server, &owner.access_token, "user_id", "u1").await;
        assert_eq!(profile["eventCount"], 3);
        // The order counts once: the attempts that met the stored messages left nothing behind.
        let attributes = server
            .gql_ok(
                Some(&owner.access_token),
                "query($id: ID!) { profile(id: $id) { attributes { orderCount totalRevenue } } }",
                json!({"id": profile["id"]}),
            )
            .await["profile"]["attributes"]
            .clone();
        assert_eq!(
            attributes,
            json!({"orderCount": 1, "totalRevenue": 12.5}),
            "[{backend:?}]"
        );
        let quality = data_quality(&server, &owner.access_token).await;
        let source = quality
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "retry")
            .unwrap();
        assert_eq!(source["accepted"], 3);
        assert_eq!(source["duplicates"], 9);
        // Each resend's first attempt met the stored message ids and was begun again once, looking
        // them up; nothing else was retried.
        assert_eq!(
            retries(
                &server,
                [
                    IngestRetry::StoredMessage,
                    IngestRetry::Conflict,
                    IngestRetry::Transient
                ]
            ),
            [2, 0, 0],
            "[{backend:?}]"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_batch_with_invalid_messages_stores_the_valid_ones_and_says_why_for_the_rest() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "partial").await;
        let batch = json!({"batch": [
            {"type": "track", "userId": "u1", "event": "Good", "messageId": "ok-1"},
            {"type": "track", "userId": "u1", "messageId": "no-event"},
            {"type": "identify", "messageId": "no-identity", "traits": {"plan": "pro"}},
            {"type": "teleport", "userId": "u1", "messageId": "bad-type"},
            {"type": "track", "userId": "u1", "event": "Old", "timestamp": "1900-01-01T00:00:00Z", "messageId": "too-old"},
            {"type": "track", "userId": "u1", "event": "Nul\u{0}", "messageId": "nul"},
            {"type": "identify", "userId": "u1", "traits": {"email": "U1@Partial.example"}, "messageId": "ok-2"}
        ]});
        let (status, body) = collect(&server, "/v1/batch", &key, &batch).await;
        assert_eq!(status, 200);
        assert_eq!(body["success"], true);
        let rejected: Vec<(u64, String, String)> = body["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["index"].as_u64().unwrap(),
                    r["messageId"].as_str().unwrap().to_owned(),
                    r["reason"]
                        .as_str()
                        .unwrap()
                        .split(':')
                        .next()
                        .unwrap()
                        .to_owned(),
                )
            })
            .collect();
        assert_eq!(
            rejected,
            [
                (1, "no-event".to_owned(), "missing_event".to_owned()),
                (2, "no-identity".to_owned(), "missing_identity".to_owned()),
                (3, "bad-type".to_owned(), "unknown_type".to_owned()),
                (4, "too-old".to_owned(), "timestamp_out_of_range".to_owned()),
                (5, "nul".to_owned(), "nul_character".to_owned()),
            ]
        );
        assert_eq!(event_total(&server, &owner.access_token).await, 2);
        let quality = data_quality(&server, &owner.access_token).await;
        let source = quality
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "partial")
            .unwrap();
        assert_eq!(source["accepted"], 2);
        assert_eq!(source["rejected"].as_array().unwrap().len(), 5);

        // A body that is not JSON, or has no batch, is refused whole with a code and a message.
        let response = server
            .client
            .post(server.url("/v1/batch"))
            .basic_auth(&key, Some(""))
            .body("{oops")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (body["success"].clone(), body["code"].clone()),
            (json!(false), json!("invalid_json"))
        );
        assert!(body["message"].is_string());
        let (status, body) = collect(&server, "/v1/batch", &key, &json!({"messages": []})).await;
        assert_eq!(
            (status, body["code"].clone()),
            (400, json!("invalid_request"))
        );

        // Invalid UTF-8 inside one message spoils only that message.
        let mut raw = br#"{"batch":[{"type":"track","userId":"u1","event":"Fine","messageId":"utf-ok"},{"type":"track","userId":"u1","event":"Bad "#.to_vec();
        raw.extend_from_slice(&[0xff, 0xfe]);
        raw.extend_from_slice(br#"","messageId":"utf-bad"}]}"#);
        let response = server
            .client
            .post(server.url("/v1/batch"))
            .basic_auth(&key, Some(""))
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["rejected"][0]["index"], 1);
        assert!(body["rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("invalid_utf8"));
        assert_eq!(event_total(&server, &owner.access_token).await, 3);
        server.stop().await;
    }
}

#[tokio::test]
async fn over_a_request_limit_the_answer_is_413_and_nothing_is_stored() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "limits").await;
        server
            .gql_ok(
                Some(&owner.access_token),
                "mutation { updateIngestSettings(input: {maxMessageBytes: 2048, maxRequestBytes: 4096, maxBatchMessages: 3, rateLimitPerSecond: 0, defaultRegion: \"US\", blockedIdentityValues: [], identityRules: []}) { maxBatchMessages } }",
                json!({}),
            )
            .await;
        let big: Vec<Value> = (0..3).map(|i| json!({"type": "track", "userId": "u", "event": "E", "messageId": format!("big-{i}"), "properties": {"pad": "x".repeat(1500)}})).collect();
        let (status, body) = collect(&server, "/v1/batch", &key, &json!({"batch": big})).await;
        assert_eq!(
            (status, body["code"].clone()),
            (413, json!("payload_too_large"))
        );
        let many: Vec<Value> = (0..4).map(|i| json!({"type": "track", "userId": "u", "event": "E", "messageId": format!("many-{i}")})).collect();
        let (status, body) = collect(&server, "/v1/batch", &key, &json!({"batch": many})).await;
        assert_eq!(
            (status, body["code"].clone()),
            (413, json!("too_many_messages"))
        );
        assert_eq!(
            event_total(&server, &owner.access_token).await,
            0,
            "nothing of a refused request is stored"
        );
        // A single message over the message limit is rejected alone.
        let batch = json!({"batch": [
            {"type": "track", "userId": "u", "event": "E", "messageId": "small"},
            {"type": "track", "userId": "u", "event": "E", "messageId": "large", "properties": {"pad": "x".repeat(2100)}}
        ]});
        let (status, body) = collect(&server, "/v1/batch", &key, &batch).await;
        assert_eq!(status, 200);
        assert!(body["rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("message_too_large"));
        assert_eq!(event_total(&server, &owner.access_token).await, 1);
        server.stop().await;
    }
}

#[tokio::test]
async fn wrong_or_revoked_keys_get_401_and_a_tenant_over_its_rate_gets_429() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "auth").await;
        let message = json!({"userId": "u", "event": "E"});
        let (status, body) = collect(&server, "/v1/track", "cdp_wk_not-a-key", &message).await;
        assert_eq!((status, body["code"].clone()), (401, json!("unauthorized")));
        let response = server
            .client
            .post(server.url("/v1/track"))
            .json(&message)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);

        server
            .gql_ok(
                Some(&owner.access_token),
                "mutation { updateIngestSettings(input: {maxMessageBytes: 32768, maxRequestBytes: 4194304, maxBatchMessages: 2500, rateLimitPerSecond: 2, defaultRegion: null, blockedIdentityValues: [], identityRules: []}) { rateLimitPerSecond } }",
                json!({}),
            )
            .await;
        let batch: Vec<Value> = (0..10).map(|i| json!({"type": "track", "userId": "u", "event": "E", "messageId": format!("r-{i}")})).collect();
        let (status, _) = collect(&server, "/v1/batch", &key, &json!({"batch": batch})).await;
        assert_eq!(status, 200, "the burst allows five seconds' worth");
        let response = server
            .client
            .post(server.url("/v1/track"))
            .basic_auth(&key, Some(""))
            .json(&message)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1);
        assert_eq!(event_total(&server, &owner.access_token).await, 10);

        let keys = server
            .gql_ok(
                Some(&owner.access_token),
                "{ apiKeys { id name } }",
                json!({}),
            )
            .await;
        let id = keys["apiKeys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == "auth")
            .unwrap()["id"]
            .clone();
        server
            .gql_ok(
                Some(&owner.access_token),
                "mutation($id: ID!) { revokeApiKey(id: $id) { id } }",
                json!({"id": id}),
            )
            .await;
        let (status, _) = collect(&server, "/v1/track", &key, &message).await;
        assert_eq!(status, 401, "a revoked key stops working at once");
        server.stop().await;
    }
}

#[tokio::test]
async fn identities_are_normalized_and_blocked_values_never_identify_anybody() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "clean").await;
        let token = owner.access_token.as_str();
        server
            .gql_ok(
                Some(token),
                "mutation { updateIngestSettings(input: {maxMessageBytes: 32768, maxRequestBytes: 4194304, maxBatchMessages: 2500, rateLimitPerSecond: 0, defaultRegion: \"us\", blockedIdentityValues: [\"guest\"], identityRules: []}) { defaultRegion } }",
                json!({}),
            )
            .await;
        let batch = json!({"batch": [
            {"type": "identify", "userId": "c-1", "traits": {"email": "  Mixed.Case@Example.COM ", "phone": "(415) 555-2671"}, "messageId": "c1"},
            {"type": "identify", "userId": "undefined", "anonymousId": "real-anon", "traits": {"name": "Visitor"}, "messageId": "c2"},
            {"type": "identify", "userId": "GUEST", "anonymousId": "other-anon", "messageId": "c3"},
            {"type": "identify", "userId": "0", "anonymousId": "null", "messageId": "c4"},
            {"type": "identify", "userId": "c-2", "traits": {"email": "not an email"}, "messageId": "c5"}
        ]});
        let (status, body) = collect(&server, "/v1/batch", &key, &batch).await;
        assert_eq!(status, 200);
        assert_eq!(
            body["rejected"][0]["index"], 3,
            "a message with nothing but blocked identifiers: {body}"
        );
        assert!(body["rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("no_usable_identity"));

        let one = profile_by(&server, token, "email", "mixed.case@example.com").await;
        assert_eq!(one["traits"]["email"], "mixed.case@example.com");
        assert_eq!(
            one["traits"]["phone"], "+14155552671",
            "the tenant's default region applies"
        );
        assert_eq!(
            profile_by(&server, token, "phone", "+1 415-555-2671").await["id"],
            one["id"]
        );
        // Blocked values never make identities, so two visitors stay apart.
        let visitor = profile_by(&server, token, "anonymous_id", "real-anon").await;
        let other = profile_by(&server, token, "anonymous_id", "other-anon").await;
        assert_ne!(visitor["id"], other["id"]);
        assert!(profile_by(&server, token, "user_id", "undefined")
            .await
            .is_null());
        assert!(profile_by(&server, token, "user_id", "GUEST")
            .await
            .is_null());
        let invalid = profile_by(&server, token, "user_id", "c-2").await;
        assert_eq!(
            invalid["traits"]["email"], "not an email",
            "an invalid email stays a trait"
        );
        assert_eq!(invalid["identities"].as_array().unwrap().len(), 1);

        let quality = data_quality(&server, token).await;
        let source = quality
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "clean")
            .unwrap();
        let warnings: Vec<(String, i64)> = source["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["reason"].as_str().unwrap().to_owned(),
                    w["count"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            warnings,
            [
                ("blocked_identity_value".to_owned(), 2),
                ("invalid_email".to_owned(), 1)
            ]
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_late_message_with_an_older_timestamp_never_overwrites_a_newer_trait() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "order").await;
        let newer = json!({"userId": "o-1", "traits": {"plan": "enterprise", "city": "Oslo"}, "timestamp": "2026-11-20T10:00:00Z", "messageId": "new"});
        let older = json!({"userId": "o-1", "traits": {"plan": "free", "seats": 3}, "timestamp": "2026-11-01T10:00:00Z", "messageId": "old"});
        assert_eq!(collect(&server, "/v1/identify", &key, &newer).await.0, 200);
        assert_eq!(collect(&server, "/v1/identify", &key, &older).await.0, 200);
        let profile = profile_by(&server, &owner.access_token, "user_id", "o-1").await;
        assert_eq!(
            profile["traits"],
            json!({"plan": "enterprise", "city": "Oslo", "seats": 3})
        );
        assert_eq!(profile["firstSeenAt"], "2026-11-01T10:00:00+00:00");
        assert_eq!(profile["lastSeenAt"], "2026-11-20T10:00:00+00:00");
        // The timeline is newest first, by event time.
        assert_eq!(profile["events"]["edges"][0]["node"]["messageId"], "new");
        server.stop().await;
    }
}

#[tokio::test]
async fn a_shared_identifier_merges_profiles_explainably_and_the_merged_id_keeps_resolving() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "merge").await;
        let token = owner.access_token.as_str();
        // An anonymous visitor, and separately a known email, become one when a message carries both.
        let batch = json!({"batch": [
            {"type": "track", "anonymousId": "visitor", "event": "Viewed", "timestamp": "2026-11-01T00:00:00Z", "messageId": "v1", "context": {"consent": {"categoryPreferences": {"analytics": true}}}},
            {"type": "identify", "userId": "m-1", "traits": {"email": "m1@merge.example", "plan": "pro"}, "timestamp": "2026-11-02T00:00:00Z", "messageId": "v2"}
        ]});
        collect(&server, "/v1/batch", &key, &batch).await;
        let anonymous = profile_by(&server, token, "anonymous_id", "visitor").await;
        let known = profile_by(&server, token, "user_id", "m-1").await;
        assert_ne!(anonymous["id"], known["id"]);
        let joining = json!({"type": "identify", "anonymousId": "visitor", "traits": {"email": "M1@merge.example"}, "timestamp": "2026-11-03T00:00:00Z", "messageId": "v3"});
        collect(&server, "/v1/identify", &key, &joining).await;

        let merged = profile_by(&server, token, "user_id", "m-1").await;
        assert_eq!(merged["id"], anonymous["id"], "the oldest profile survives");
        assert_eq!(merged["eventCount"], 3);
        assert_eq!(merged["traits"]["plan"], "pro");
        assert_eq!(merged["mergedIds"], json!([known["id"]]));
        assert_eq!(
            merged["consents"],
            json!([{"purpose": "analytics", "granted": true}])
        );
        let ledger = merged["mergeLedger"].as_array().unwrap();
        let entry = ledger.iter().find(|e| e["action"] == "merge").unwrap();
        assert_eq!(entry["otherProfileId"], known["id"]);
        assert_eq!(entry["messageId"], "v3");
        assert_eq!(entry["rule"], "shared_identifier");
        assert!(entry["identityKind"] == "email" || entry["identityKind"] == "anonymous_id");
        // The merged id resolves to the survivor.
        let resolved = server
            .gql_ok(
                Some(token),
                "query($id: ID!) { profile(id: $id) { id } }",
                json!({"id": known["id"]}),
            )
            .await;
        assert_eq!(resolved["profile"]["id"], merged["id"]);
        let events = server
            .gql_ok(
                Some(token),
                "query($id: ID!) { events(profileId: $id) { totalCount } }",
                json!({"id": known["id"]}),
            )
            .await;
        assert_eq!(events["events"]["totalCount"], 3);
        server.stop().await;
    }
}

#[tokio::test]
async fn two_user_ids_never_merge_and_the_conflict_is_recorded() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "conflict").await;
        let token = owner.access_token.as_str();
        collect(
            &server,
            "/v1/identify",
            &key,
            &json!({"userId": "alice", "anonymousId": "shared-laptop", "messageId": "k1"}),
        )
        .await;
        collect(
            &server,
            "/v1/identify",
            &key,
            &json!({"userId": "bob", "anonymousId": "shared-laptop", "messageId": "k2"}),
        )
        .await;
        let alice = profile_by(&server, token, "user_id", "alice").await;
        let bob = profile_by(&server, token, "user_id", "bob").await;
        assert_ne!(alice["id"], bob["id"]);
        assert_eq!(
            profile_by(&server, token, "anonymous_id", "shared-laptop").await["id"],
            alice["id"]
        );
        let conflict = bob["mergeLedger"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == "conflict")
            .unwrap()
            .clone();
        assert_eq!(conflict["rule"], "limit:user_id=1");
        assert_eq!(conflict["identityKind"], "anonymous_id");
        assert_eq!(conflict["otherProfileId"], alice["id"]);
        assert_eq!(bob["eventCount"], 1, "bob's message went to bob");
        // A manual merge that would join two user ids is refused too.
        let refused = server
            .gql(
                Some(token),
                "mutation($k: ID!, $m: ID!) { mergeProfiles(keepId: $k, mergeId: $m) { id } }",
                json!({"k": alice["id"], "m": bob["id"]}),
            )
            .await;
        assert_eq!(error_code(&refused), "CONFLICT");
        server.stop().await;
    }
}

#[tokio::test]
async fn a_wrong_merge_can_be_split_with_the_events_that_came_under_the_identity() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "split").await;
        let token = owner.access_token.as_str();
        let batch = json!({"batch": [
            {"type": "identify", "userId": "owner-1", "traits": {"plan": "pro"}, "timestamp": "2026-11-01T00:00:00Z", "messageId": "s1"},
            {"type": "track", "anonymousId": "kiosk", "event": "Browsed", "timestamp": "2026-11-02T00:00:00Z", "messageId": "s2"},
            {"type": "identify", "anonymousId": "kiosk", "traits": {"name": "Someone Else"}, "timestamp": "2026-11-03T00:00:00Z", "messageId": "s3"},
            {"type": "track", "userId": "owner-1", "anonymousId": "kiosk", "event": "Bought", "timestamp": "2026-11-04T00:00:00Z", "messageId": "s4"}
        ]});
        collect(&server, "/v1/batch", &key, &batch).await;
        let joined = profile_by(&server, token, "user_id", "owner-1").await;
        assert_eq!(joined["eventCount"], 4);
        assert_eq!(joined["traits"]["name"], "Someone Else");

        let split = server
            .gql_ok(
                Some(token),
                "mutation($p: ID!) { splitIdentity(profileId: $p, kind: \"anonymous_id\", value: \"kiosk\") { id eventCount traits identities { kind value } } }",
                json!({"p": joined["id"]}),
            )
            .await["splitIdentity"]
            .clone();
        assert_ne!(split["id"], joined["id"]);
        assert_eq!(
            split["identities"],
            json!([{"kind": "anonymous_id", "value": "kiosk"}])
        );
        assert_eq!(
            split["eventCount"], 3,
            "the events that arrived under the kiosk id moved with it"
        );
        assert_eq!(split["traits"], json!({"name": "Someone Else"}));
        let kept = profile_by(&server, token, "user_id", "owner-1").await;
        assert_eq!(kept["eventCount"], 1);
        assert_eq!(
            kept["traits"],
            json!({"plan": "pro"}),
            "traits are recomputed from the remaining events"
        );
        let entry = kept["mergeLedger"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == "split")
            .unwrap()
            .clone();
        assert_eq!(entry["otherProfileId"], split["id"]);
        assert_eq!(
            profile_by(&server, token, "anonymous_id", "kiosk").await["id"],
            split["id"]
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn fifty_parallel_first_contacts_create_exactly_one_profile() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "race").await;
        let requests = (0..50).map(|i| {
            let message = json!({"batch": [{"type": "identify", "anonymousId": format!("device-{i}"), "traits": {"email": "same@race.example"}, "messageId": format!("race-{i}")}]});
            let server = &server;
            let key = &key;
            async move { collect(server, "/v1/batch", key, &message).await }
        });
        for (status, body) in futures::future::join_all(requests).await {
            assert_eq!((status, body), (200, json!({"success": true})));
        }
        let profiles = server
            .gql_ok(
                Some(&owner.access_token),
                "{ profiles { totalCount } }",
                json!({}),
            )
            .await;
        assert_eq!(
            profiles["profiles"]["totalCount"], 1,
            "[{backend:?}] one identifier, one profile"
        );
        let profile = profile_by(&server, &owner.access_token, "email", "same@race.example").await;
        assert_eq!(profile["eventCount"], 50);
        assert_eq!(profile["identities"].as_array().unwrap().len(), 51);
        server.stop().await;
    }
}

#[tokio::test]
async fn concurrent_batches_merging_the_same_profiles_neither_deadlock_nor_lose_events() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "deadlock").await;
        // Ten people, each known by an anonymous id and an email first, separately.
        let mut seed = Vec::new();
        for person in 0..10 {
            seed.push(json!({"type": "track", "anonymousId": format!("a-{person}"), "event": "Seen", "messageId": format!("seed-a-{person}")}));
            seed.push(json!({"type": "identify", "userId": format!("p-{person}"), "traits": {"email": format!("p{person}@deadlock.example")}, "messageId": format!("seed-e-{person}")}));
        }
        collect(&server, "/v1/batch", &key, &json!({"batch": seed})).await;
        // Twenty batches, each joining all ten pairs, in opposite orders.
        let requests = (0..20).map(|batch| {
            let mut messages: Vec<Value> = (0..10)
                .map(|person| json!({"type": "identify", "anonymousId": format!("a-{person}"), "traits": {"email": format!("p{person}@deadlock.example")}, "messageId": format!("join-{batch}-{person}")}))
                .collect();
            if batch % 2 == 1 {
                messages.reverse();
            }
            let server = &server;
            let key = &key;
            async move { collect(server, "/v1/batch", key, &json!({"batch": messages})).await }
        });
        for (status, body) in futures::future::join_all(requests).await {
            assert_eq!((status, body), (200, json!({"success": true})));
        }
        assert_eq!(
            event_total(&server, &owner.access_token).await,
            20 + 200,
            "no event lost"
        );
        let profiles = server
            .gql_ok(
                Some(&owner.access_token),
                "{ profiles { totalCount } }",
                json!({}),
            )
            .await;
        assert_eq!(profiles["profiles"]["totalCount"], 10);
        for person in 0..10 {
            let profile = profile_by(
                &server,
                &owner.access_token,
                "user_id",
                &format!("p-{person}"),
            )
            .await;
            assert_eq!(profile["eventCount"], 22, "person {person}");
            assert_eq!(
                profile_by(
                    &server,
                    &owner.access_token,
                    "anonymous_id",
                    &format!("a-{person}")
                )
                .await["id"],
                profile["id"]
            );
        }
        server.stop().await;
    }
}

/// A batch that looked up an identifier just before a concurrent batch merged its profile away
/// (and moved the identifier to the survivor) finds the merge when it locks the profile: it
/// begins again at once, counted as `profile_merged`, and its message lands on the survivor.
/// Without that check it took the moved identifier for a new one, failed on its key only at the
/// end and began again after a back-off (counted as a stored message until the causes were told
/// apart). PostgreSQL only: SQLite runs one write transaction at a time, so no lookup can be
/// overtaken there.
#[tokio::test]
async fn a_batch_overtaken_by_a_merge_of_its_profile_begins_again_and_lands_on_the_survivor() {
    use sea_orm::{ConnectionTrait, Database, TransactionTrait};
    for backend in backends() {
        if backend != Backend::Postgres {
            continue;
        }
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "overtaken").await;
        let token = &owner.access_token;
        // Two people as far as the service knows: the older profile by a user id, the younger
        // by an anonymous id.
        for (index, message) in [
            json!({"type": "identify", "userId": "u1", "traits": {"plan": "pro"}}),
            json!({"type": "track", "anonymousId": "a1", "event": "Visited"}),
        ]
        .into_iter()
        .enumerate()
        {
            let mut message = message;
            message["messageId"] = json!(format!("seed-{index}"));
            let (status, _) =
                collect(&server, "/v1/batch", &key, &json!({"batch": [message]})).await;
            assert_eq!(status, 200);
        }
        let survivor = profile_by(&server, token, "user_id", "u1").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let merged = profile_by(&server, token, "anonymous_id", "a1").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(survivor, merged);

        // A concurrent merge of the younger profile into the older one, in SQL as the database's
        // owner: it holds the younger profile's row while the batch below looks `a1` up, and
        // moves its rows as the write path's merge does (`store::ingest::move_profile_rows`).
        let sql = Database::connect(&server.db.owner_url).await.unwrap();
        let merge = sql.begin().await.unwrap();
        let tenant = &owner.tenant_id;
        merge
            .execute_unprepared(&format!(
                "SELECT set_config('app.tenant_id', '{tenant}', true);
                 SELECT id FROM profiles WHERE tenant_id = '{tenant}' AND id = '{merged}' FOR UPDATE"
            ))
            .await
            .unwrap();
        let batch = json!({"batch": [
            {"type": "track", "anonymousId": "a1", "event": "After", "messageId": "after-1"}
        ]});
        let waiting = "SELECT count(*) FROM pg_stat_activity \
                       WHERE datname = current_database() AND wait_event_type = 'Lock'";
        let ((status, body), ()) =
            tokio::join!(collect(&server, "/v1/batch", &key, &batch), async {
                // The batch has looked `a1` up (the younger profile's) and waits for that
                // profile's lock.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                loop {
                    let row = sql
                        .query_one_raw(sea_orm::Statement::from_string(
                            sql.get_database_backend(),
                            waiting,
                        ))
                        .await
                        .unwrap()
                        .unwrap();
                    if row.try_get_by_index::<i64>(0).unwrap() > 0 {
                        break;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the batch never waited for the profile's lock"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                merge
                    .execute_unprepared(&format!(
                        "UPDATE identities SET profile_id = '{survivor}' \
                             WHERE tenant_id = '{tenant}' AND profile_id = '{merged}';
                         UPDATE events SET profile_id = '{survivor}' \
                             WHERE tenant_id = '{tenant}' AND profile_id = '{merged}';
                         UPDATE profiles SET merged_into = '{survivor}' \
                             WHERE tenant_id = '{tenant}' AND id = '{merged}'"
                    ))
                    .await
                    .unwrap();
                merge.commit().await.unwrap();
            });
        assert_eq!((status, body), (200, json!({"success": true})));

        let profile = profile_by(&server, token, "anonymous_id", "a1").await;
        assert_eq!(
            profile["id"],
            json!(survivor),
            "a1 resolves to the survivor"
        );
        let names: Vec<&str> = profile["events"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|edge| edge["node"]["name"].as_str())
            .collect();
        assert!(
            names.contains(&"After") && names.contains(&"Visited"),
            "{names:?}"
        );
        assert_eq!(
            event_total(&server, token).await,
            3,
            "no event lost or twice"
        );
        assert_eq!(
            retries(
                &server,
                [
                    IngestRetry::ProfileMerged,
                    IngestRetry::StoredMessage,
                    IngestRetry::Conflict
                ]
            ),
            [1, 0, 0],
            "the batch began again once, for the merge"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn tenant_b_never_sees_tenant_a_profiles_or_events() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, a, key) = setup(backend, &smtp, "iso-data").await;
        let b = new_tenant(&server, &smtp, &slug("iso-data-b"), "owner@iso-b.example").await;
        collect(&server, "/v1/identify", &key, &json!({"userId": "secret-user", "traits": {"email": "secret@a.example"}, "messageId": "iso-1"})).await;
        let profile = profile_by(&server, &a.access_token, "user_id", "secret-user").await;
        let id = profile["id"].clone();
        let b_token = Some(b.access_token.as_str());
        assert!(server
            .gql_ok(
                b_token,
                "query($id: ID!) { profile(id: $id) { id } }",
                json!({"id": id})
            )
            .await["profile"]
            .is_null());
        assert!(
            profile_by(&server, &b.access_token, "user_id", "secret-user")
                .await
                .is_null()
        );
        assert!(
            profile_by(&server, &b.access_token, "email", "secret@a.example")
                .await
                .is_null()
        );
        assert_eq!(
            server
                .gql_ok(b_token, "{ profiles { totalCount } }", json!({}))
                .await["profiles"]["totalCount"],
            0
        );
        assert_eq!(
            server
                .gql_ok(
                    b_token,
                    "query($id: ID!) { events(profileId: $id) { totalCount } }",
                    json!({"id": id})
                )
                .await["events"]["totalCount"],
            0
        );
        assert_eq!(event_total(&server, &b.access_token).await, 0);
        for (what, query, variables) in [
            ("mergeProfiles", "mutation($k: ID!) { mergeProfiles(keepId: $k, mergeId: $k) { id } }", json!({"k": id})),
            ("setConsent", "mutation($p: ID!) { setConsent(profileId: $p, purpose: \"x\", granted: true) { id } }", json!({"p": id})),
            ("splitIdentity", "mutation($p: ID!) { splitIdentity(profileId: $p, kind: \"user_id\", value: \"secret-user\") { id } }", json!({"p": id})),
        ] {
            let response = server.gql(b_token, query, variables).await;
            assert_eq!(error_code(&response), "NOT_FOUND", "{what}: {response}");
        }
        // B's write key cannot write into A either: data lands in B.
        let b_key = write_key(&server, &b, "b-source", "WEB").await;
        collect(
            &server,
            "/v1/track",
            &b_key,
            &json!({"userId": "secret-user", "event": "B-event", "messageId": "iso-2"}),
        )
        .await;
        assert_eq!(
            profile_by(&server, &a.access_token, "user_id", "secret-user").await["eventCount"],
            1
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn identify_and_track_mutations_use_the_same_write_path_and_are_idempotent() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "gql").await;
        let token = Some(owner.access_token.as_str());
        let identify = "mutation($i: IdentifyInput!) { identify(input: $i) { id traits channels identities { kind value } } }";
        let profile = server
            .gql_ok(token, identify, json!({"i": {"userId": "g-1", "traits": {"email": "G1@Gql.example"}, "messageId": "g-msg-1"}}))
            .await["identify"]
            .clone();
        assert_eq!(profile["traits"]["email"], "g1@gql.example");
        assert_eq!(profile["channels"], json!(["server"]));
        let track = "mutation($t: TrackInput!) { track(input: $t) { id profileId type name properties messageId } }";
        let event = server.gql_ok(token, track, json!({"t": {"userId": "g-1", "event": "Signed Up", "properties": {"plan": "pro"}, "messageId": "g-msg-2"}})).await["track"].clone();
        assert_eq!(event["profileId"], profile["id"]);
        assert_eq!(
            (event["type"].clone(), event["name"].clone()),
            (json!("track"), json!("Signed Up"))
        );
        let again = server.gql_ok(token, track, json!({"t": {"userId": "g-1", "event": "Signed Up", "properties": {"plan": "pro"}, "messageId": "g-msg-2"}})).await["track"].clone();
        assert_eq!(
            again["id"], event["id"],
            "a retried messageId returns the stored event"
        );
        let missing = server
            .gql(token, track, json!({"t": {"event": "No One"}}))
            .await;
        assert_eq!(error_code(&missing), "BAD_USER_INPUT");
        assert_eq!(missing["errors"][0]["extensions"]["field"], "input.userId");
        // A WRITE key may use the mutations too; a viewer may not.
        server
            .gql_ok(
                Some(&key),
                track,
                json!({"t": {"anonymousId": "k-1", "event": "From Key"}}),
            )
            .await;
        let viewer = invited_user(&server, &smtp, &owner, "viewer@gql.example", &["viewer"]).await;
        let forbidden = server
            .gql(
                Some(&viewer.access_token),
                track,
                json!({"t": {"userId": "g-1", "event": "Nope"}}),
            )
            .await;
        assert_eq!(error_code(&forbidden), "FORBIDDEN");
        let quality = data_quality(&server, &owner.access_token).await;
        let graphql = quality
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["sourceId"].is_null())
            .unwrap()
            .clone();
        assert_eq!(
            (graphql["accepted"].clone(), graphql["duplicates"].clone()),
            (json!(2), json!(1))
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn profiles_page_with_a_stable_order_filter_by_traits_and_mask_pii_for_analysts() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let (server, owner, key) = setup(backend, &smtp, "list").await;
        let token = owner.access_token.as_str();
        let batch: Vec<Value> = (0..7)
            .map(|i| json!({"type": "identify", "userId": format!("l-{i}"), "traits": {"email": format!("l{i}@list.example"), "plan": if i % 2 == 0 { "pro" } else { "free" }, "office": {"city": if i < 3 { "Oslo" } else { "Bergen" }}, "age": 20 + i}, "timestamp": format!("2026-11-0{}T00:00:00Z", i + 1), "messageId": format!("l-{i}")}))
            .collect();
        collect(&server, "/v1/batch", &key, &json!({"batch": batch})).await;
        let page = "query($after: String, $f: ProfileFilter) { profiles(first: 3, after: $after, filter: $f) { totalCount pageInfo { hasNextPage endCursor } edges { node { traits } } } }";
        let mut seen = Vec::new();
        let mut after = Value::Null;
        loop {
            let data = server
                .gql_ok(Some(token), page, json!({"after": after}))
                .await["profiles"]
                .clone();
            assert_eq!(data["totalCount"], 7);
            seen.extend(
                data["edges"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["node"]["traits"]["email"].as_str().unwrap().to_owned()),
            );
            if !data["pageInfo"]["hasNextPage"].as_bool().unwrap() {
                break;
            }
            after = data["pageInfo"]["endCursor"].clone();
        }
        assert_eq!(
            seen,
            (0..7)
                .map(|i| format!("l{i}@list.example"))
                .collect::<Vec<_>>()
        );
        let count = |filter: Value| {
            let server = &server;
            async move {
                server.gql_ok(Some(token), page, json!({"f": filter})).await["profiles"]
                    ["totalCount"]
                    .as_i64()
                    .unwrap()
            }
        };
        assert_eq!(count(json!({"traitEquals": {"plan": "pro"}})).await, 4);
        assert_eq!(
            count(json!({"traitEquals": {"plan": "pro", "office.city": "Oslo"}})).await,
            2
        );
        // Personal traits are stored sealed: equality goes through the blind index, and a path
        // into a personal value (sealed whole) is refused.
        assert_eq!(
            count(json!({"traitEquals": {"email": "l3@list.example"}})).await,
            1
        );
        assert_eq!(
            count(json!({"traitEquals": {"email": "nobody@list.example"}})).await,
            0
        );
        let into_pii = server
            .gql(
                Some(token),
                page,
                json!({"f": {"traitEquals": {"email.domain": "list.example"}}}),
            )
            .await;
        assert_eq!(error_code(&into_pii), "BAD_USER_INPUT");
        assert_eq!(count(json!({"traitEquals": {"age": 21}})).await, 1);
        assert_eq!(
            count(json!({"traitEquals": {"age": "21"}})).await,
            0,
            "a number never equals a string"
        );
        assert_eq!(count(json!({"seenAfter": "2026-11-05T00:00:00Z"})).await, 3);
        assert_eq!(
            count(json!({"seenBefore": "2026-11-02T00:00:00Z"})).await,
            1
        );
        // The bounds are instants, compared in UTC whatever offset they are written with: within
        // a bound's own day the instant decides.
        assert_eq!(count(json!({"seenAfter": "2026-11-04T12:00:00Z"})).await, 3);
        assert_eq!(count(json!({"seenAfter": "2026-11-03T23:59:59Z"})).await, 4);
        assert_eq!(
            count(json!({"seenAfter": "2026-11-04T01:00:00+02:00"})).await,
            4,
            "the 3rd, 23:00 UTC"
        );
        assert_eq!(
            count(json!({"seenBefore": "2026-11-02T12:00:00Z"})).await,
            2
        );
        assert_eq!(
            count(json!({"seenBefore": "2026-11-01T20:00:00-05:00"})).await,
            2,
            "the 2nd, 01:00 UTC"
        );
        assert_eq!(
            count(json!({"seenAfter": "2026-11-03T00:00:00Z", "seenBefore": "2026-11-03T00:00:00.001Z"}))
                .await,
            1
        );
        let bad = server
            .gql(
                Some(token),
                page,
                json!({"f": {"traitEquals": {"plan": ["pro"]}}}),
            )
            .await;
        assert_eq!(error_code(&bad), "BAD_USER_INPUT");

        let analyst =
            invited_user(&server, &smtp, &owner, "analyst@list.example", &["analyst"]).await;
        let masked = profile_by(&server, &analyst.access_token, "user_id", "l-1").await;
        assert_eq!(masked["traits"]["email"], "l***@list.example");
        assert_eq!(masked["traits"]["plan"], "free");
        let email_identity = masked["identities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["kind"] == "email")
            .unwrap()
            .clone();
        assert_eq!(email_identity["value"], "l***@list.example");
        assert!(
            !masked.to_string().contains("l1@list.example"),
            "no PII anywhere in the analyst's view: {masked}"
        );
        server.stop().await;
    }
}
