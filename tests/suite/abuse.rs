//! Abuse limits: request rates per client address and per tenant (429 with `Retry-After`), the
//! per-operation limits on root fields and account mutations, the bounded password hashing
//! queue, request timeouts, the WebSocket message size, and introspection and suggestions
//! switched off.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const ME: &str = "{ me { user { email } permissions } }";

/// What one HTTP answer said: the status, `Retry-After`, and the JSON body.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().parse().unwrap());
    let text = response.text().await.unwrap();
    Answer {
        status,
        retry_after,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// Posts a GraphQL body (one operation or a batch) as if relayed for `from` by a proxy.
async fn graphql_from(
    server: &TestServer,
    from: &str,
    token: Option<&str>,
    body: &Value,
) -> Answer {
    let mut request = server
        .client
        .post(server.url("/graphql"))
        .header("x-forwarded-for", from)
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    answer(request.send().await.unwrap()).await
}

fn operation(query: &str) -> Value {
    json!({"query": query})
}

/// Asserts a 429 with `Retry-After` and the contract's RATE_LIMITED error, `retryAfter` included.
fn assert_graphql_rate_limited(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 429, "{what}: {:#}", answer.body);
    let seconds = answer.retry_after.expect("a Retry-After header");
    assert!(seconds >= 1, "{what}");
    assert_eq!(error_code(&answer.body), "RATE_LIMITED", "{what}");
    assert_eq!(
        answer.body["errors"][0]["extensions"]["retryAfter"],
        json!(seconds),
        "{what}: the body and the header agree"
    );
}

/// Opens `/graphql/ws` (graphql-transport-ws), as if relayed for `from`.
async fn connect(
    server: &TestServer,
    from: &str,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut request = server
        .url("/graphql/ws")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    request
        .headers_mut()
        .insert("X-Forwarded-For", from.parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

/// The next text or close message, with a deadline.
async fn next_message(socket: &mut Socket) -> Option<Message> {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a message in time");
        match message {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return Some(message),
            Some(Err(_)) | None => return None,
        }
    }
}

async fn send_json(socket: &mut Socket, message: Value) {
    socket
        .send(Message::text(message.to_string()))
        .await
        .unwrap();
}

async fn init(socket: &mut Socket, token: &str) -> Option<Message> {
    send_json(
        socket,
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}),
    )
    .await;
    next_message(socket).await
}

/// A socket past `connection_ack`.
async fn open_socket(server: &TestServer, from: &str, token: &str) -> Socket {
    let mut socket = connect(server, from).await.expect("websocket upgrade");
    match init(&mut socket, token).await {
        Some(Message::Text(text)) => assert!(text.contains("connection_ack"), "{text}"),
        other => panic!("expected connection_ack, got {other:?}"),
    }
    socket
}

/// Runs one operation over the socket and returns its result (`data` and/or `errors`).
async fn run_on_socket(socket: &mut Socket, id: &str, query: &str) -> Value {
    send_json(
        socket,
        json!({"id": id, "type": "subscribe", "payload": {"query": query}}),
    )
    .await;
    let mut messages = Vec::new();
    for _ in 0..2 {
        match next_message(socket).await {
            Some(Message::Text(text)) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(message["id"], id, "{message:#}");
                messages.push(message);
            }
            other => panic!("expected a result for {id}, got {other:?}"),
        }
    }
    assert_eq!(messages[0]["type"], "next", "{messages:#?}");
    assert_eq!(messages[1]["type"], "complete", "{messages:#?}");
    messages[0]["payload"].clone()
}

fn close_code(message: Option<Message>) -> u16 {
    match message {
        Some(Message::Close(Some(frame))) => u16::from(frame.code),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// Polls until `done` holds, failing the test after [`WAIT`].
async fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn one_address_over_its_rate_gets_429_with_retry_after_and_other_addresses_go_on() {
    init_logs();
    for backend in backends() {
        let db = TestDb::create(backend).await;
        let server = TestServer::start_on(db, None, |config| {
            config.abuse.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
            // 3 GraphQL operations and 2 collection requests a minute, all at once if need be.
            config.abuse.graphql_per_ip_per_minute = 3;
            config.abuse.ingest_per_ip_per_minute = 2;
            config.abuse.burst_secs = 60;
        })
        .await;
        let typename = operation("{ __typename }");

        for _ in 0..3 {
            let ok = graphql_from(&server, "203.0.113.1", None, &typename).await;
            assert_eq!(ok.status, 200, "[{backend:?}] {:#}", ok.body);
            assert_eq!(ok.body["data"]["__typename"], "Query");
        }
        let refused = graphql_from(&server, "203.0.113.1", None, &typename).await;
        assert_graphql_rate_limited(&refused, "the fourth operation");
        let other = graphql_from(&server, "203.0.113.2", None, &typename).await;
        assert_eq!(other.status, 200, "another address has its own budget");

        // A batch counts each of its operations.
        let batch = json!([typename, typename]);
        assert_eq!(
            graphql_from(&server, "203.0.113.3", None, &batch)
                .await
                .status,
            200
        );
        assert_graphql_rate_limited(
            &graphql_from(&server, "203.0.113.3", None, &batch).await,
            "a batch of two with one operation left",
        );

        // Bodies that are no GraphQL count as well.
        for _ in 0..3 {
            let garbage = graphql_from(&server, "203.0.113.5", None, &json!("not a request")).await;
            assert_eq!(garbage.status, 400);
        }
        assert_graphql_rate_limited(
            &graphql_from(&server, "203.0.113.5", None, &json!("not a request")).await,
            "the fourth body that is no GraphQL",
        );

        // A WebSocket connect counts against the same budget, refused before the upgrade.
        match connect(&server, "203.0.113.1").await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 429);
                let seconds: u64 = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(seconds >= 1);
            }
            Ok(_) => panic!("[{backend:?}] an address over its rate opened a socket"),
            Err(other) => panic!("[{backend:?}] expected 429, got {other}"),
        }
        connect(&server, "203.0.113.4")
            .await
            .expect("another address connects");

        // The collection API counts requests per address before it looks at the key.
        let message = json!({"userId": "u", "event": "E"});
        let post = |from: &'static str| {
            server
                .client
                .post(server.url("/v1/track"))
                .header("x-forwarded-for", from)
                .basic_auth("cdp_wk_not-a-key", Some(""))
                .json(&message)
                .send()
        };
        for _ in 0..2 {
            assert_eq!(answer(post("203.0.113.1").await.unwrap()).await.status, 401);
        }
        let refused = answer(post("203.0.113.1").await.unwrap()).await;
        assert_eq!(refused.status, 429, "{:#}", refused.body);
        assert!(refused.retry_after.unwrap() >= 1);
        assert_eq!(refused.body["success"], false);
        assert_eq!(refused.body["code"], "rate_limited");
        assert!(refused.body["message"].is_string());
        assert_eq!(
            answer(post("203.0.113.2").await.unwrap()).await.status,
            401,
            "another address reaches the key check"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn without_a_trusted_proxy_x_forwarded_for_changes_nothing() {
    init_logs();
    for backend in backends() {
        let db = TestDb::create(backend).await;
        let server = TestServer::start_on(db, None, |config| {
            config.abuse.graphql_per_ip_per_minute = 3;
            config.abuse.burst_secs = 60;
        })
        .await;
        let typename = operation("{ __typename }");
        for from in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
            assert_eq!(
                graphql_from(&server, from, None, &typename).await.status,
                200
            );
        }
        assert_graphql_rate_limited(
            &graphql_from(&server, "198.51.100.4", None, &typename).await,
            "a client naming a new address in X-Forwarded-For is still the peer",
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_tenant_over_its_rate_gets_429_from_any_address_over_http_and_websocket() {
    init_logs();
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let server = TestServer::start_on(db, Some(&smtp), |config| {
            config.abuse.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
            config.abuse.graphql_per_tenant_per_minute = 4;
            config.abuse.burst_secs = 60;
        })
        .await;
        // Signing up and activating need no principal and count against no tenant.
        let busy = new_tenant(&server, &smtp, &slug("busy"), "owner@busy.example").await;
        let calm = new_tenant(&server, &smtp, &slug("calm"), "owner@calm.example").await;

        // 1: connection_init; 2: an operation over the socket; 3 and 4: HTTP, from two addresses.
        let mut socket = open_socket(&server, "203.0.113.1", &busy.access_token).await;
        let result = run_on_socket(&mut socket, "1", ME).await;
        assert_eq!(
            result["data"]["me"]["user"]["email"], "owner@busy.example",
            "{result:#}"
        );
        for from in ["203.0.113.2", "203.0.113.3"] {
            let ok = graphql_from(&server, from, Some(&busy.access_token), &operation(ME)).await;
            assert_eq!(ok.status, 200, "[{backend:?}] {:#}", ok.body);
        }
        assert_graphql_rate_limited(
            &graphql_from(
                &server,
                "203.0.113.4",
                Some(&busy.access_token),
                &operation(ME),
            )
            .await,
            "the tenant's fifth operation, from a fresh address",
        );
        let over_socket = run_on_socket(&mut socket, "2", ME).await;
        assert_eq!(error_code(&over_socket), "RATE_LIMITED", "{over_socket:#}");
        assert!(
            over_socket["errors"][0]["extensions"]["retryAfter"]
                .as_u64()
                .unwrap()
                >= 1
        );
        let mut refused = connect(&server, "203.0.113.5").await.unwrap();
        assert_eq!(
            close_code(init(&mut refused, &busy.access_token).await),
            4429,
            "connection_init over the tenant's rate"
        );

        // Other tenants and requests without a principal are not affected.
        let calm_answer = graphql_from(
            &server,
            "203.0.113.4",
            Some(&calm.access_token),
            &operation(ME),
        )
        .await;
        assert_eq!(calm_answer.status, 200, "{:#}", calm_answer.body);
        let anonymous =
            graphql_from(&server, "203.0.113.4", None, &operation("{ __typename }")).await;
        assert_eq!(anonymous.status, 200);
        server.stop().await;
    }
}

#[tokio::test]
async fn aliases_fragments_and_batches_cannot_multiply_logins() {
    init_logs();
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let tenant_slug = slug("alias");
        let owner = new_tenant(&server, &smtp, &tenant_slug, "owner@alias.example").await;
        let wrong = format!(
            "login(tenantSlug: \"{tenant_slug}\", email: \"owner@alias.example\", password: \"wrong password!\") {{ accessToken }}"
        );

        // Six wrong guesses under aliases: had they run, five failures would lock the account.
        let aliased = (0..6)
            .map(|i| format!("guess{i}: {wrong}"))
            .collect::<Vec<_>>()
            .join(" ");
        let response = server
            .gql(None, &format!("mutation {{ {aliased} }}"), json!({}))
            .await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response:#}");
        assert!(response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("at most 1 of"));
        assert!(response["data"].is_null(), "nothing ran: {response:#}");

        // A fragment spread twice runs twice, so it counts twice.
        let spread = server
            .gql(
                None,
                &format!(
                    "mutation {{ ...Guess ...Guess }} fragment Guess on Mutation {{ {wrong} }}"
                ),
                json!({}),
            )
            .await;
        assert_eq!(error_code(&spread), "BAD_USER_INPUT", "{spread:#}");

        // A batch counts over all its operations.
        let batch: Vec<Value> = (0..6)
            .map(|_| operation(&format!("mutation {{ {wrong} }}")))
            .collect();
        let batched = server
            .client
            .post(server.url("/graphql"))
            .json(&batch)
            .send()
            .await
            .unwrap();
        let batched = answer(batched).await;
        assert_eq!(batched.status, 400, "{:#}", batched.body);
        assert_eq!(error_code(&batched.body), "BAD_USER_INPUT");

        // None of those guesses ran: the account is not locked, and one login still works.
        server
            .gql_ok(
                None,
                LOGIN,
                json!({"slug": tenant_slug, "email": "owner@alias.example", "password": PASSWORD}),
            )
            .await;

        // Root fields are counted, aliases included: 30 pass, 31 do not.
        let typenames = |count: usize| {
            format!(
                "{{ {} }}",
                (0..count)
                    .map(|i| format!("t{i}: __typename"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        };
        server.gql_ok(None, &typenames(30), json!({})).await;
        let wide = server.gql(None, &typenames(31), json!({})).await;
        assert_eq!(error_code(&wide), "BAD_USER_INPUT", "{wide:#}");
        assert!(wide["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("at most 30 root fields"));

        // The same limits hold over a WebSocket.
        let mut socket = open_socket(&server, "203.0.113.1", &owner.access_token).await;
        let result = run_on_socket(&mut socket, "1", &format!("mutation {{ {aliased} }}")).await;
        assert_eq!(error_code(&result), "BAD_USER_INPUT", "{result:#}");
        server
            .gql_ok(
                None,
                LOGIN,
                json!({"slug": tenant_slug, "email": "owner@alias.example", "password": PASSWORD}),
            )
            .await;
        server.stop().await;
    }
}

#[tokio::test]
async fn a_login_flood_waits_for_the_hashing_slots_while_other_requests_are_answered() {
    init_logs();
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let server = TestServer::start_on(db, Some(&smtp), |config| {
            config.abuse.password_hash_concurrency = 1;
            config.abuse.password_hash_queue = 3;
        })
        .await;
        let tenant_slug = slug("flood");
        let owner = new_tenant(&server, &smtp, &tenant_slug, "owner@flood.example").await;
        let key = write_key(&server, &owner, "site", "WEB").await;
        let hasher = server.app.as_ref().unwrap().state().hasher.clone();
        assert_eq!(hasher.concurrency(), 1);

        // Hold the only hashing slot: no login can finish until it is given back.
        let pause = hasher.pause().await.unwrap();
        let logins: Vec<_> = (0..3)
            .map(|_| {
                let request = server.client.post(server.url("/graphql")).json(&json!({
                    "query": LOGIN,
                    "variables": {"slug": tenant_slug, "email": "owner@flood.example", "password": PASSWORD},
                }));
                tokio::spawn(async move {
                    request
                        .send()
                        .await
                        .unwrap()
                        .json::<Value>()
                        .await
                        .unwrap()
                })
            })
            .collect();
        poll_until("three logins wait for the hashing slot", || {
            hasher.waiting() == 3
        })
        .await;

        // The queue is full: the next login is refused at once instead of waiting.
        let refused = server
            .gql(
                None,
                LOGIN,
                json!({"slug": tenant_slug, "email": "owner@flood.example", "password": PASSWORD}),
            )
            .await;
        assert_eq!(error_code(&refused), "RATE_LIMITED", "{refused:#}");
        assert!(
            refused["errors"][0]["extensions"]["retryAfter"]
                .as_u64()
                .unwrap()
                >= 1
        );

        // Everything else is answered while the logins wait.
        let me = server
            .gql_ok(Some(&owner.access_token), ME, json!({}))
            .await;
        assert_eq!(me["me"]["user"]["email"], "owner@flood.example");
        let (status, body) = collect(
            &server,
            "/v1/track",
            &key,
            &json!({"userId": "u-1", "event": "Flood"}),
        )
        .await;
        assert_eq!((status, body["success"].clone()), (200, json!(true)));
        assert!(
            logins.iter().all(|login| !login.is_finished()),
            "no login finished while the slot was held"
        );
        assert_eq!(hasher.waiting(), 3);

        drop(pause);
        for login in logins {
            let response = login.await.unwrap();
            assert!(
                response["data"]["login"]["accessToken"].is_string(),
                "[{backend:?}] {response:#}"
            );
        }
        assert_eq!(hasher.waiting(), 0);
        server.stop().await;
    }
}

#[tokio::test]
async fn a_request_over_the_timeout_gets_503_and_a_websocket_outlives_it() {
    init_logs();
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        // The tenant is made under the default timeout; the short one applies from here on.
        let setup = TestServer::start_on(db.clone(), Some(&smtp), |_| {}).await;
        let tenant_slug = slug("slow");
        let owner = new_tenant(&setup, &smtp, &tenant_slug, "owner@slow.example").await;
        setup.stop().await;
        let server = TestServer::start_on(db, Some(&smtp), |config| {
            config.abuse.request_timeout = Duration::from_secs(2);
        })
        .await;

        let mut socket = open_socket(&server, "203.0.113.1", &owner.access_token).await;
        // A login that cannot finish (the hashing slots are held) runs into the timeout.
        let hasher = server.app.as_ref().unwrap().state().hasher.clone();
        let pause = hasher.pause().await.unwrap();
        let response = server
            .client
            .post(server.url("/graphql"))
            .json(&json!({
                "query": LOGIN,
                "variables": {"slug": tenant_slug, "email": "owner@slow.example", "password": PASSWORD},
            }))
            // Without the server's timeout this request would wait for the pause; fail instead.
            .timeout(WAIT)
            .send()
            .await
            .unwrap();
        let timed_out = answer(response).await;
        assert_eq!(timed_out.status, 503, "{:#}", timed_out.body);
        assert_eq!(error_code(&timed_out.body), "INTERNAL");
        assert!(timed_out.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("took longer than 2 s"));
        assert_eq!(hasher.waiting(), 0, "the stopped login left the queue");
        drop(pause);

        // The socket was opened before that login began and the login outlived the timeout, so
        // the socket has too; it still answers.
        let result = run_on_socket(&mut socket, "1", ME).await;
        assert_eq!(
            result["data"]["me"]["user"]["email"], "owner@slow.example",
            "{result:#}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_websocket_message_over_the_limit_closes_the_socket_with_1009() {
    init_logs();
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let server = TestServer::start_on(db, Some(&smtp), |config| {
            config.abuse.ws_max_message_bytes = 4096;
        })
        .await;
        let owner = new_tenant(&server, &smtp, &slug("ws-size"), "owner@ws-size.example").await;
        let mut socket = open_socket(&server, "203.0.113.1", &owner.access_token).await;

        // Just under the limit is fine.
        let padded = format!("{ME} # {}", "x".repeat(3500));
        let result = run_on_socket(&mut socket, "1", &padded).await;
        assert_eq!(
            result["data"]["me"]["user"]["email"],
            "owner@ws-size.example"
        );

        let oversized = json!({"id": "2", "type": "subscribe", "payload": {"query": format!("{ME} # {}", "x".repeat(8192))}});
        send_json(&mut socket, oversized).await;
        assert_eq!(close_code(next_message(&mut socket).await), 1009);

        // Before connection_init as well.
        let mut fresh = connect(&server, "203.0.113.1").await.unwrap();
        fresh.send(Message::binary(vec![b'{'; 5000])).await.unwrap();
        assert_eq!(close_code(next_message(&mut fresh).await), 1009);
        server.stop().await;
    }
}

#[tokio::test]
async fn introspection_and_suggestions_can_be_switched_off_and_the_sdl_still_prints() {
    init_logs();
    const SCHEMA: &str = "{ __schema { queryType { name } } }";
    const TYPO: &str = "{ tenan { id } }";
    for backend in backends() {
        let db = TestDb::create(backend).await;
        let open = TestServer::start_on(db.clone(), None, |_| {}).await;
        let data = open.gql_ok(None, SCHEMA, json!({})).await;
        assert_eq!(data["__schema"]["queryType"]["name"], "Query");
        let typo = open.gql(None, TYPO, json!({})).await;
        assert!(
            typo["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("Did you mean"),
            "suggestions are on by default: {typo:#}"
        );
        open.stop().await;

        let closed = TestServer::start_on(db, None, |config| {
            config.abuse.graphql_introspection = false;
            config.abuse.graphql_suggestions = false;
        })
        .await;
        let refused = closed.gql(None, SCHEMA, json!({})).await;
        assert_eq!(error_code(&refused), "BAD_USER_INPUT", "{refused:#}");
        assert!(refused["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("introspection is switched off"));
        assert!(refused["data"].is_null());
        // Reached through a fragment as well.
        let hidden = closed
            .gql(
                None,
                "{ ...Q } fragment Q on Query { __type(name: \"Query\") { name } }",
                json!({}),
            )
            .await;
        assert_eq!(error_code(&hidden), "BAD_USER_INPUT", "{hidden:#}");
        let typo = closed.gql(None, TYPO, json!({})).await;
        assert_eq!(error_code(&typo), "BAD_USER_INPUT");
        assert!(
            !typo["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("Did you mean"),
            "{typo:#}"
        );
        // Ordinary operations are untouched.
        let data = closed.gql_ok(None, "{ __typename }", json!({})).await;
        assert_eq!(data["__typename"], "Query");
        closed.stop().await;
    }
    // `cdp schema` prints the SDL from a schema of its own, whatever the switches say.
    let sdl = api::graphql::sdl();
    assert!(sdl.contains("login(tenantSlug: String!, email: String!, password: String!)"));
}
