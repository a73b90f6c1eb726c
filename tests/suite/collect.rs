//! The data-collection API: compatibility with real Segment clients, the transport rules, and
//! the limits.

use std::io::Write;

use serde_json::{json, Value};

use crate::support::*;

fn samples() -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/contract/samples/segment-clients.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test]
async fn requests_recorded_from_real_segment_clients_become_unified_profiles() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("samples"), "owner@samples.example").await;
        let key = write_key(&server, &owner, "website", "WEB").await;
        for sample in samples() {
            let mut request = server
                .client
                .post(server.url(sample["path"].as_str().unwrap()))
                .basic_auth(&key, Some(""));
            for (name, value) in sample["headers"].as_object().unwrap() {
                if name != "Authorization" {
                    request = request.header(name.as_str(), value.as_str().unwrap());
                }
            }
            let response = request
                .body(sample["body"].to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                body,
                json!({"success": true}),
                "[{backend:?}] every sample message is accepted"
            );
        }
        let token = owner.access_token.as_str();

        let ada = profile_by(&server, token, "user_id", "user-42").await;
        assert_eq!(
            ada["traits"]["email"], "ada@example.com",
            "emails are normalized"
        );
        assert_eq!(ada["traits"]["firstName"], "Ada");
        assert_eq!(
            ada["traits"]["plan"], "pro",
            "group traits stay on the group"
        );
        assert_eq!(ada["channels"], json!(["web"]));
        let kinds: Vec<(String, String)> = ada["identities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["kind"].as_str().unwrap().to_owned(),
                    i["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for expected in [
            ("user_id", "user-42"),
            ("anonymous_id", "anon-1"),
            ("email", "ada@example.com"),
            ("anonymous_id", "anon-7"),
        ] {
            assert!(
                kinds.contains(&(expected.0.to_owned(), expected.1.to_owned())),
                "{expected:?} in {kinds:?}"
            );
        }
        assert_eq!(ada["eventCount"], 5);
        let events = ada["events"]["edges"].as_array().unwrap();
        let page = events.iter().find(|e| e["node"]["type"] == "page").unwrap();
        assert_eq!(page["node"]["name"], "Quickstart");
        assert_eq!(page["node"]["properties"]["category"], "Docs");
        let order = events
            .iter()
            .find(|e| e["node"]["name"] == "Order Completed")
            .unwrap();
        assert_eq!(order["node"]["properties"]["revenue"], 129.5);
        assert_eq!(
            ada["groups"],
            json!([{"groupId": "acme-inc", "traits": {"name": "Acme", "plan": "enterprise"}}])
        );
        // The alias made anon-7 resolve to the same person.
        let aliased = profile_by(&server, token, "anonymous_id", "anon-7").await;
        assert_eq!(aliased["id"], ada["id"]);
        // Lookups normalize like ingestion does.
        let by_email = profile_by(&server, token, "email", "  ADA@example.COM ").await;
        assert_eq!(by_email["id"], ada["id"]);

        let bob = profile_by(&server, token, "user_id", "user-43").await;
        assert_eq!(bob["traits"]["phone"], "+442079460958", "phones are E.164");
        assert_eq!(
            bob["consents"],
            json!([{"purpose": "email_marketing", "granted": true}])
        );
        let by_phone = profile_by(&server, token, "phone", "+44 20 7946 0958").await;
        assert_eq!(by_phone["id"], bob["id"]);
        let anonymous = profile_by(&server, token, "anonymous_id", "anon-3").await;
        assert_eq!(
            anonymous["events"]["edges"][0]["node"]["name"],
            "Product Viewed"
        );

        let quality = data_quality(&server, token).await;
        let website = quality
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "website")
            .unwrap();
        assert_eq!(website["channel"], "web");
        assert!(website["accepted"].as_i64().unwrap() >= 8);
        assert_eq!(website["rejected"], json!([]));
        server.stop().await;
    }
}

#[tokio::test]
async fn gzip_text_plain_body_write_keys_and_short_paths_are_accepted() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(
            &server,
            &smtp,
            &slug("transport"),
            "owner@transport.example",
        )
        .await;
        let key = write_key(&server, &owner, "browser", "WEB").await;

        // The browser library: text/plain, the key in the body, a short path.
        let body = json!({"writeKey": key, "anonymousId": "browser-1", "event": "Clicked", "messageId": "b-1"});
        let response = server
            .client
            .post(server.url("/v1/t"))
            .header("content-type", "text/plain")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

        // A gzip batch through /v1/b.
        let batch = json!({"batch": [
            {"type": "identify", "anonymousId": "browser-1", "userId": "u-1", "traits": {"email": "u1@transport.example"}, "messageId": "b-2"},
            {"type": "screen", "userId": "u-1", "name": "Home", "messageId": "b-3"}
        ]});
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(batch.to_string().as_bytes()).unwrap();
        let compressed = encoder.finish().unwrap();
        let response = server
            .client
            .post(server.url("/v1/b"))
            .basic_auth(&key, Some(""))
            .header("content-encoding", "gzip")
            .header("content-type", "application/json")
            .body(compressed)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

        // A CORS preflight from any site is answered.
        let preflight = server
            .client
            .request(reqwest::Method::OPTIONS, server.url("/v1/batch"))
            .header("Origin", "https://shop.example")
            .header("Access-Control-Request-Method", "POST")
            .send()
            .await
            .unwrap();
        assert_eq!(
            preflight.headers()["access-control-allow-origin"],
            "https://shop.example"
        );

        let profile = profile_by(&server, &owner.access_token, "user_id", "u-1").await;
        assert_eq!(profile["eventCount"], 3);
        let types: Vec<&str> = profile["events"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["node"]["type"].as_str().unwrap())
            .collect();
        assert!(
            types.contains(&"screen") && types.contains(&"track") && types.contains(&"identify"),
            "{types:?}"
        );
        server.stop().await;
    }
}

/// A batch far larger than one statement of the events writer (which splits its rows into
/// statements of at most 12 KiB on PostgreSQL) is stored whole and exactly: every event with its type,
/// name, properties (nested, Unicode, escapes, numbers, nulls), microsecond timestamp and message
/// id.
#[tokio::test]
async fn a_large_batch_is_stored_event_for_event_as_sent() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("large"), "owner@large.example").await;
        let key = write_key(&server, &owner, "server", "SERVER").await;

        let mut sent = Vec::new();
        for n in 0..80u32 {
            let properties = json!({
                "n": n,
                "price": f64::from(n) + 0.25,
                "note": format!("Ünïcödé ✓ {}", "x".repeat(900 + n as usize)),
                "nested": {"list": [1, "two", null, true], "deep": {"k": n % 7}},
                "absent": null,
                // Characters that JSON text escapes (the writer binds JSON as its text).
                "escaped": format!("say \"hi\" \\ back\n\ttab {n}"),
                "big": u64::MAX - u64::from(n),
            });
            let message = if n % 5 == 0 {
                json!({"type": "page", "anonymousId": "large-visitor", "name": format!("Page {n}"),
                       "properties": properties, "messageId": format!("large-{n}"),
                       "timestamp": format!("2026-11-20T10:{:02}:{:02}.{:06}Z", n / 60, n % 60, 123_456 + n)})
            } else {
                json!({"type": "track", "userId": "large-user", "anonymousId": "large-visitor",
                       "event": format!("Event {}", n % 3), "properties": properties,
                       "messageId": format!("large-{n}"),
                       "timestamp": format!("2026-11-20T10:{:02}:{:02}.{:06}Z", n / 60, n % 60, 123_456 + n)})
            };
            sent.push(message);
        }
        let batch = json!({ "batch": sent });
        assert!(
            batch.to_string().len() > 5 * 12 * 1024,
            "the batch must need several statements"
        );
        let (status, body) = collect(&server, "/v1/batch", &key, &batch).await;
        assert_eq!(status, 200, "{body}");

        let data = server
            .gql_ok(
                Some(&owner.access_token),
                "query($k: String!, $v: String!) { profileByIdentity(kind: $k, value: $v) {
                    eventCount events(first: 100) { totalCount edges { node {
                        type name properties timestamp messageId } } } } }",
                json!({"k": "user_id", "v": "large-user"}),
            )
            .await;
        let profile = &data["profileByIdentity"];
        assert_eq!(profile["eventCount"], 80, "{profile}");
        assert_eq!(profile["events"]["totalCount"], 80);
        let stored: std::collections::HashMap<String, Value> = profile["events"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|edge| {
                let node = edge["node"].clone();
                (node["messageId"].as_str().unwrap().to_owned(), node)
            })
            .collect();
        for message in &sent {
            let id = message["messageId"].as_str().unwrap();
            let event = &stored[id];
            assert_eq!(event["type"], message["type"], "{id}");
            let name = message
                .get("event")
                .or_else(|| message.get("name"))
                .unwrap();
            assert_eq!(&event["name"], name, "{id}");
            assert_eq!(event["properties"], message["properties"], "{id}");
            let at = |value: &Value| {
                chrono::DateTime::parse_from_rfc3339(value.as_str().unwrap())
                    .unwrap()
                    .with_timezone(&chrono::Utc)
            };
            assert_eq!(at(&event["timestamp"]), at(&message["timestamp"]), "{id}");
        }
    }
}

/// A batch of many new people with large traits needs several statements for each of its
/// multi-row writes on PostgreSQL (profiles, identities, their keys, their stages: each cut at
/// 12 KiB, `store::wire`): every person comes back whole, with exactly their traits and
/// identities, one profile each.
#[tokio::test]
async fn many_new_people_with_large_traits_are_stored_whole() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("people"), "owner@people.example").await;
        let key = write_key(&server, &owner, "server", "SERVER").await;

        let traits_of = |n: u32| {
            json!({
                "name": format!("Person {n}"),
                "plan": if n.is_multiple_of(2) { "pro" } else { "free" },
                "bio": format!("Ünïcödé ✓ {}", "b".repeat(700 + n as usize)),
                "score": n,
                "tags": ["a", n.to_string(), null],
            })
        };
        let sent: Vec<Value> = (0..60u32)
            .map(|n| {
                json!({"type": "identify", "userId": format!("wide-{n}"),
                       "anonymousId": format!("wide-anon-{n}"),
                       "traits": {"email": format!("Wide.{n}@People.example")},
                       "messageId": format!("wide-{n}"),
                       "timestamp": "2026-11-20T10:00:00Z"})
            })
            .map(|mut message| {
                let n: u32 = message["userId"].as_str().unwrap()[5..].parse().unwrap();
                let mut traits = traits_of(n);
                traits["email"] = message["traits"]["email"].clone();
                message["traits"] = traits;
                message
            })
            .collect();
        let batch = json!({ "batch": sent });
        assert!(batch.to_string().len() > 3 * 12 * 1024);
        let (status, body) = collect(&server, "/v1/batch", &key, &batch).await;
        assert_eq!(status, 200, "{body}");

        let data = server
            .gql_ok(
                Some(&owner.access_token),
                "{ profiles(first: 100) { totalCount edges { node {
                    traits eventCount stage identities { kind value } } } } }",
                json!({}),
            )
            .await;
        assert_eq!(data["profiles"]["totalCount"], 60, "{data}");
        let mut seen = std::collections::HashSet::new();
        for edge in data["profiles"]["edges"].as_array().unwrap() {
            let node = &edge["node"];
            let identity = |kind: &str| {
                node["identities"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|identity| identity["kind"] == kind)
                    .map(|identity| identity["value"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            };
            let user_ids = identity("user_id");
            assert_eq!(user_ids.len(), 1, "{node}");
            let n: u32 = user_ids[0][5..].parse().unwrap();
            assert!(seen.insert(n), "one profile per person: {n}");
            let mut expected = traits_of(n);
            expected["email"] = json!(format!("wide.{n}@people.example"));
            assert_eq!(node["traits"], expected, "{n}");
            assert_eq!(identity("anonymous_id"), vec![format!("wide-anon-{n}")]);
            assert_eq!(identity("email"), vec![format!("wide.{n}@people.example")]);
            assert_eq!(node["eventCount"], 1);
            assert!(node["stage"].is_string(), "{node}");
        }
        assert_eq!(seen.len(), 60);
        server.stop().await;
    }
}
