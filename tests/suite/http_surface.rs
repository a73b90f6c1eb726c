//! The HTTP surface: GraphiQL offline, health checks, CORS, and the WebSocket transport's
//! authentication.

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn graphiql_is_served_with_every_asset_from_the_binary() {
    let smtp = SmtpSink::start().await;
    let server = TestServer::start(Backend::Sqlite, &smtp).await;
    let page = server
        .client
        .get(server.url("/graphql"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("https://"),
        "the page must not load anything from the internet"
    );
    for asset in [
        "react.production.min.js",
        "react-dom.production.min.js",
        "graphiql.min.js",
        "graphiql.min.css",
    ] {
        let path = format!("/graphql/assets/{asset}");
        assert!(html.contains(&path), "the page loads {path}");
        let response = server.client.get(server.url(&path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.bytes().await.unwrap().len() > 1000);
    }
    let missing = server
        .client
        .get(server.url("/graphql/assets/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    server.stop().await;
}

#[tokio::test]
async fn health_and_readiness_answer() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        assert_eq!(
            server
                .client
                .get(server.url("/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            server
                .client
                .get(server.url("/readyz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn cors_admits_only_the_configured_origins() {
    let db = TestDb::create(Backend::Sqlite).await;
    let server = TestServer::start_on(db, None, |config| {
        config.cors_origins =
            api::config::CorsOrigins::List(vec!["https://app.example.com".to_owned()]);
    })
    .await;
    let preflight = |origin: &'static str| {
        server
            .client
            .request(reqwest::Method::OPTIONS, server.url("/graphql"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization, content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let refused = preflight("https://evil.example.com").await.unwrap();
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let response = server
        .client
        .post(server.url("/graphql"))
        .header("Origin", "https://app.example.com")
        .json(&json!({"query": "{ __typename }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    server.stop().await;
}

/// The next text or close message, with a deadline.
async fn next_message(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Option<Message> {
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

#[tokio::test]
async fn a_websocket_needs_credentials_in_connection_init() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("ws"), "owner@ws.example").await;

        for (what, payload) in [
            ("no credentials", json!({})),
            (
                "a forged token",
                json!({"authorization": "Bearer not-a-token"}),
            ),
        ] {
            let mut socket = open_socket(&server, "graphql-transport-ws").await;
            socket
                .send(Message::text(
                    json!({"type": "connection_init", "payload": payload}).to_string(),
                ))
                .await
                .unwrap();
            match next_message(&mut socket).await {
                Some(Message::Close(Some(frame))) => {
                    assert_ne!(u16::from(frame.code), 1000, "{what}")
                }
                Some(Message::Close(None)) | None => {}
                other => panic!("{what}: expected the socket to close, got {other:?}"),
            }
        }

        let mut socket = open_socket(&server, "graphql-transport-ws").await;
        socket
            .send(Message::text(
                json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", owner.access_token)}}).to_string(),
            ))
            .await
            .unwrap();
        match next_message(&mut socket).await {
            Some(Message::Text(text)) => {
                let message: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(message["type"], "connection_ack");
            }
            other => panic!("expected connection_ack, got {other:?}"),
        }
        socket.close(None).await.unwrap();
        server.stop().await;
    }
}
