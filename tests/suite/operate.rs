//! Operating the service: metrics, request ids, draining and shutdown.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

async fn metrics_text(server: &TestServer) -> String {
    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    response.text().await.unwrap()
}

/// The value of one sample line (`name{labels} value`), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_operations_messages_and_the_outbox() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("metrics"), "owner@metrics.example").await;
        let key = write_key(&server, &owner, "site", "WEB").await;
        let (status, _) = collect(
            &server,
            "/v1/batch",
            &key,
            &json!({"batch": [
                {"type": "identify", "userId": "m-1", "traits": {"plan": "pro"}},
                {"type": "track", "userId": "m-1", "event": "Signed In"},
                {"type": "track", "userId": "m-1"}
            ]}),
        )
        .await;
        assert_eq!(status, 200);
        let me = server
            .client
            .post(server.url("/graphql"))
            .bearer_auth(&owner.access_token)
            .json(&json!({"query": "query Me { me { user { email } } }", "operationName": "Me"}))
            .send()
            .await
            .unwrap();
        assert_eq!(me.status(), 200);

        // The outbox records a sent email just after the SMTP conversation: wait for it.
        let mails = smtp.received().len() as f64;
        let deadline = tokio::time::Instant::now() + WAIT;
        let text = loop {
            let text = metrics_text(&server).await;
            if sample(&text, "cdp_emails_total{result=\"sent\"}") == Some(mails)
                && sample(&text, "cdp_outbox_depth") == Some(0.0)
            {
                break text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "[{backend:?}] {text}"
            );
            tokio::task::yield_now().await;
        };
        let at = |series: &str| sample(&text, series);
        assert_eq!(
            at("cdp_ingest_messages_total{outcome=\"accepted\"}"),
            Some(2.0),
            "[{backend:?}] {text}"
        );
        assert_eq!(
            at("cdp_ingest_messages_total{outcome=\"rejected\"}"),
            Some(1.0)
        );
        assert_eq!(
            at("cdp_ingest_rejected_total{reason=\"missing_event\"}"),
            Some(1.0)
        );
        assert_eq!(
            at("cdp_http_requests_total{method=\"POST\",route=\"/v1/batch\",status=\"200\"}"),
            Some(1.0)
        );
        assert_eq!(
            at("cdp_graphql_operations_total{operation=\"Me\",outcome=\"ok\"}"),
            Some(1.0)
        );
        assert_eq!(
            at("cdp_http_request_duration_seconds_count{route=\"/v1/batch\"}"),
            Some(1.0)
        );
        assert_eq!(at("cdp_outbox_oldest_age_seconds"), Some(0.0));
        assert_eq!(at("cdp_websockets_open"), Some(0.0));
        assert_eq!(at("cdp_draining"), Some(0.0));
        // No tenant, person or id is ever a label.
        assert!(!text.contains(&owner.tenant_id));
        assert!(!text.contains("m-1"));
        server.stop().await;
    }
}

#[tokio::test]
async fn metrics_can_require_a_bearer_token() {
    let smtp = SmtpSink::start().await;
    let db = TestDb::create(Backend::Sqlite).await;
    let server = TestServer::start_on(db, Some(&smtp), |config| {
        config.metrics_token = Some("scrape-secret".to_owned());
    })
    .await;
    let anonymous = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth("scrape-secreT")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let scraper = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth("scrape-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(scraper.status(), 200);
    assert!(scraper
        .text()
        .await
        .unwrap()
        .contains("cdp_http_requests_total"));
    server.stop().await;
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let smtp = SmtpSink::start().await;
    let server = TestServer::start(Backend::Sqlite, &smtp).await;
    let get = |id: Option<&'static str>| {
        let mut request = server.client.get(server.url("/healthz"));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.send()
    };
    let first = get(None).await.unwrap();
    let second = get(None).await.unwrap();
    let id = |response: &reqwest::Response| {
        response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let (one, two) = (id(&first), id(&second));
    assert_eq!(one.len(), 32, "{one}");
    assert!(one.bytes().all(|byte| byte.is_ascii_hexdigit()));
    assert_ne!(one, two, "each request gets its own id");
    // A proxy's id is kept; one that could forge log lines is replaced.
    assert_eq!(id(&get(Some("lb-7f3a.2")).await.unwrap()), "lb-7f3a.2");
    let replaced = id(&get(Some("two words")).await.unwrap());
    assert_ne!(replaced, "two words");
    assert_eq!(replaced.len(), 32);
    // Errors carry it too.
    let missing = server
        .client
        .get(server.url("/no-such-path"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.headers().contains_key("x-request-id"));
    server.stop().await;
}

#[tokio::test]
async fn draining_turns_readiness_off_then_closes_sockets_with_going_away() {
    let smtp = SmtpSink::start().await;
    let db = TestDb::create(Backend::Sqlite).await;
    let server = TestServer::start_on(db, Some(&smtp), |config| {
        config.drain_delay = Duration::from_secs(3);
    })
    .await;
    let owner = new_tenant(&server, &smtp, &slug("drain"), "owner@drain.example").await;

    let mut socket = open_socket(&server, "graphql-transport-ws").await;
    socket
        .send(Message::text(
            json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", owner.access_token)}})
                .to_string(),
        ))
        .await
        .unwrap();
    let ack = tokio::time::timeout(WAIT, socket.next()).await.unwrap();
    assert!(
        matches!(&ack, Some(Ok(Message::Text(text))) if text.contains("connection_ack")),
        "{ack:?}"
    );

    let client = server.client.clone();
    let ready = server.url("/readyz");
    let health = server.url("/healthz");
    assert_eq!(client.get(&ready).send().await.unwrap().status(), 200);
    let stopping = tokio::spawn(server.stop());
    // Readiness turns 503 while requests are still served.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = client.get(&ready).send().await.unwrap().status();
        if status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never turned 503"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(client.get(&health).send().await.unwrap().status(), 200);

    // Then the socket is closed with 1001 and the process stops.
    let close = loop {
        match tokio::time::timeout(WAIT, socket.next()).await.unwrap() {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => break other,
        }
    };
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a close frame with 1001, got {other:?}"),
    }
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the server stops in time")
        .unwrap();
    assert!(
        client.get(&health).send().await.is_err(),
        "nothing listens any more"
    );
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

#[tokio::test]
async fn persisted_queries_work_over_post_and_cacheable_get() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("apq"), "owner@apq.example").await;
        let query = "query Me { me { user { email } tenant { slug } } }";
        let hash = sha256_hex(query);
        let extensions = json!({"persistedQuery": {"version": 1, "sha256Hash": hash}});
        let post = |body: serde_json::Value| {
            server
                .client
                .post(server.url("/graphql"))
                .bearer_auth(&owner.access_token)
                .json(&body)
                .send()
        };

        // The hash alone is unknown at first: the protocol's answer, 200.
        let unknown = post(json!({"extensions": extensions})).await.unwrap();
        assert_eq!(unknown.status(), 200);
        let body: serde_json::Value = unknown.json().await.unwrap();
        assert_eq!(body["errors"][0]["message"], "PersistedQueryNotFound");
        assert_eq!(
            body["errors"][0]["extensions"]["code"],
            "PERSISTED_QUERY_NOT_FOUND"
        );
        // A hash that is not the query's is refused and remembers nothing.
        let forged = post(json!({
            "query": "{ me { user { id } } }",
            "extensions": extensions
        }))
        .await
        .unwrap();
        assert_eq!(forged.status(), 400);
        // Hash and query together: run and remembered.
        let registered: serde_json::Value = post(json!({"query": query, "extensions": extensions}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            registered["data"]["me"]["user"]["email"],
            "owner@apq.example"
        );
        // Then the hash alone, by POST…
        let by_hash: serde_json::Value = post(json!({"extensions": extensions}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(by_hash["data"], registered["data"]);
        // …and by GET, with headers a browser cache may use.
        let url = format!(
            "{}?operationName=Me&extensions={}",
            server.url("/graphql"),
            urlencode(&extensions.to_string())
        );
        let get = server
            .client
            .get(&url)
            .bearer_auth(&owner.access_token)
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), 200);
        assert_eq!(get.headers()["cache-control"], "private, max-age=5");
        assert_eq!(get.headers()["vary"], "authorization, accept-encoding");
        assert!(!get.headers().contains_key("etag"));
        let got: serde_json::Value = get.json().await.unwrap();
        assert_eq!(got["data"], registered["data"]);
        // A GET that fails is not to be kept.
        let anonymous = server.client.get(&url).send().await.unwrap();
        assert_eq!(anonymous.headers()["cache-control"], "no-store");
        // Mutations never go by GET.
        let mutation = server
            .client
            .get(format!(
                "{}?query={}",
                server.url("/graphql"),
                urlencode("mutation { logout }")
            ))
            .bearer_auth(&owner.access_token)
            .send()
            .await
            .unwrap();
        assert_eq!(mutation.status(), 405);
        // Named, without `operationName`, too.
        let named = server
            .client
            .get(format!(
                "{}?query={}",
                server.url("/graphql"),
                urlencode("mutation Out { logout }")
            ))
            .bearer_auth(&owner.access_token)
            .send()
            .await
            .unwrap();
        assert_eq!(named.status(), 405);
        // POST answers are never cached.
        let plain = post(json!({"query": query})).await.unwrap();
        assert_eq!(plain.headers()["cache-control"], "no-store");
        // Without a query, GET is still the GraphiQL page.
        let page = server
            .client
            .get(server.url("/graphql"))
            .send()
            .await
            .unwrap();
        assert!(page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        server.stop().await;
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn large_graphql_answers_are_gzipped_for_clients_that_accept_it() {
    let smtp = SmtpSink::start().await;
    let server = TestServer::start(Backend::Sqlite, &smtp).await;
    let owner = new_tenant(&server, &smtp, &slug("gzip"), "owner@gzip.example").await;
    let query = json!({"query": "{ __schema { types { name description } } }"});
    let send = |encoding: Option<&'static str>| {
        let mut request = server
            .client
            .post(server.url("/graphql"))
            .bearer_auth(&owner.access_token)
            .json(&query);
        if let Some(encoding) = encoding {
            request = request.header("accept-encoding", encoding);
        }
        request.send()
    };
    let plain = send(None).await.unwrap();
    assert!(!plain.headers().contains_key("content-encoding"));
    let plain = plain.bytes().await.unwrap();
    assert!(plain.len() > 1024, "a large answer: {} bytes", plain.len());

    let compressed = send(Some("br;q=1.0, gzip;q=0.8")).await.unwrap();
    assert_eq!(compressed.headers()["content-encoding"], "gzip");
    let bytes = compressed.bytes().await.unwrap();
    assert!(
        bytes.len() < plain.len() / 2,
        "{} of {}",
        bytes.len(),
        plain.len()
    );
    let mut decoded = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(bytes.as_ref()),
        &mut decoded,
    )
    .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&decoded).unwrap(),
        serde_json::from_slice::<serde_json::Value>(&plain).unwrap()
    );
    // gzip refused with q=0: sent as it is.
    let refused = send(Some("gzip;q=0")).await.unwrap();
    assert!(!refused.headers().contains_key("content-encoding"));
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_stops_the_start_at_once_with_the_reason() {
    let data = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let config = api::config::Config::for_tests(data.path(), "postgres://postgres@127.0.0.1:1/cdp");
    let error = match api::startup::build(config).await {
        Ok(_) => panic!("a server without its database must not start"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("CDP_DATABASE_URL"), "{error}");
    // The reason, not the pool's "timed out" after its acquire timeout.
    assert!(error.contains("refused"), "{error}");
}
