//! Encryption in transit, each with a CA and certificates this test makes: the HTTP listener
//! serves HTTPS and WSS (and nothing in plain text), PostgreSQL connections honour `sslmode`, and
//! mail goes out over STARTTLS or implicit TLS to a server whose certificate chains to
//! `CDP_SMTP_CA_CERT`, and never to one whose certificate does not.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::smtp::SinkTls;
use crate::support::*;

/// A certificate authority made for one test.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate for `localhost` and `127.0.0.1`, with its key, in PEM.
struct ServerCert {
    chain_pem: String,
    key_pem: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn server_cert(&self) -> ServerCert {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        ServerCert {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A rustls client configuration that trusts this CA and nothing else.
    fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

impl ServerCert {
    /// A rustls server configuration serving this certificate (for the SMTP sink).
    fn server_config(&self) -> Arc<ServerConfig> {
        let chain = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// An HTTPS client that trusts the test CA and no public root.
fn https_client(ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// Starts a server on `db` that serves HTTPS with a certificate of `ca`, sending mail to `smtp`;
/// its `base` and `client` speak HTTPS.
async fn https_server(db: Arc<TestDb>, smtp: &SmtpSink, ca: &TestCa, dir: &Path) -> TestServer {
    let cert = ca.server_cert();
    let files = api::config::TlsFiles {
        cert: write(dir, "server.pem", &cert.chain_pem),
        key: write(dir, "server.key", &cert.key_pem),
    };
    let mut server =
        TestServer::start_on(db, Some(smtp), |config| config.tls = Some(files.clone())).await;
    let app = server.app.as_ref().unwrap();
    assert_eq!(app.scheme(), "https");
    server.base = format!("https://{}", app.address());
    server.client = https_client(ca);
    server
}

/// Sends a plain HTTP request to `address` and returns whatever comes back before the close.
async fn plain_http_exchange(address: SocketAddr) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // A reset after the server's alert is an answer too: what arrived before it counts.
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection in time");
    answer
}

type TlsSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens `wss://localhost:{port}/graphql/ws` over a TLS connection that trusts only `ca`.
async fn open_wss(address: SocketAddr, ca: &TestCa) -> TlsSocket {
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(ca.client_config())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the listener");
    let mut request = format!("wss://localhost:{}/graphql/ws", address.port())
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (socket, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("websocket upgrade over TLS");
    socket
}

/// The next protocol message other than a ping or pong, within the deadline.
async fn next_message(socket: &mut TlsSocket) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a message in time")
            .expect("the socket stays open")
            .expect("a readable frame");
        if let Message::Text(text) = message {
            let message: Value = serde_json::from_str(&text).unwrap();
            if !matches!(message["type"].as_str(), Some("ping" | "pong")) {
                return message;
            }
        }
    }
}

#[tokio::test]
async fn the_listener_serves_https_and_wss_with_its_certificate_and_refuses_plain_http() {
    for backend in backends() {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("CDP test CA");
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let server = https_server(db, &smtp, &ca, dir.path()).await;
        let address = server.app.as_ref().unwrap().address();

        // A client that trusts the test CA gets answers, and the whole API works over HTTPS.
        let response = server
            .client
            .get(server.url("/healthz"))
            .send()
            .await
            .expect("HTTPS request");
        assert_eq!(response.status(), 200);
        let admin = new_tenant(&server, &smtp, &slug("tls"), "owner@tls.example").await;
        let key = write_key(&server, &admin, "site", "SERVER").await;

        // A client that trusts only the public roots refuses the certificate.
        let error = reqwest::Client::new()
            .get(server.url("/healthz"))
            .send()
            .await
            .expect_err("the test certificate is not publicly trusted");
        assert!(
            format!("{error:?}").contains("UnknownIssuer"),
            "[{backend:?}] expected a certificate error, got {error:?}"
        );

        // Plain HTTP on the TLS port gets no HTTP answer.
        let answer = plain_http_exchange(address).await;
        assert!(
            !answer.starts_with(b"HTTP/"),
            "[{backend:?}] plain HTTP was answered: {}",
            String::from_utf8_lossy(&answer)
        );

        // A subscription over WSS receives what is ingested over HTTPS.
        let mut socket = open_wss(address, &ca).await;
        socket
            .send(Message::text(
                json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", admin.access_token)}})
                    .to_string(),
            ))
            .await
            .unwrap();
        assert_eq!(next_message(&mut socket).await["type"], "connection_ack");
        socket
            .send(Message::text(
                json!({"type": "subscribe", "id": "1", "payload": {"query": "subscription { eventIngested(name: \"Paid\") { name } }"}})
                    .to_string(),
            ))
            .await
            .unwrap();
        let tenant_id = domain::TenantId(admin.tenant_id.parse().unwrap());
        let realtime = server.app.as_ref().unwrap().state().realtime.clone();
        tokio::time::timeout(WAIT, realtime.wait_for_subscriptions(tenant_id, 1))
            .await
            .expect("the subscription starts in time");
        let (status, body) = collect(
            &server,
            "/v1/track",
            &key,
            &json!({"userId": "u1", "event": "Paid", "messageId": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let message = next_message(&mut socket).await;
        assert_eq!(message["type"], "next", "{message}");
        assert_eq!(message["payload"]["data"]["eventIngested"]["name"], "Paid");
        drop(socket);
        server.stop().await;
    }
}

#[tokio::test]
async fn a_tls_key_that_does_not_belong_to_the_certificate_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("CDP test CA");
    let (one, other) = (ca.server_cert(), ca.server_cert());
    let db = TestDb::create(Backend::Sqlite).await;
    let mut config = api::config::Config::for_tests(&db.data_dir, &db.service_url);
    config.tls = Some(api::config::TlsFiles {
        cert: write(dir.path(), "one.pem", &one.chain_pem),
        key: write(dir.path(), "other.key", &other.key_pem),
    });
    let error = match api::startup::build(config).await {
        Ok(_) => panic!("the server started with a key of another certificate"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("CDP_TLS_CERT and CDP_TLS_KEY do not fit together"),
        "{error}"
    );
}

/// `url` with query parameters added.
fn with_query(url: &str, pairs: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse(url).unwrap();
    url.query_pairs_mut().extend_pairs(pairs);
    url.to_string()
}

/// Whether each server connection of `application_name` is encrypted, as PostgreSQL sees it.
async fn ssl_of_connections(admin_url: &str, application_name: &str) -> Vec<bool> {
    let admin = Database::connect(admin_url).await.unwrap();
    let rows = admin
        .query_all_raw(Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
             WHERE a.application_name = $1",
            [application_name.into()],
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|row| row.try_get::<bool>("", "ssl").unwrap())
        .collect()
}

/// Whether each of the connections a server holds to PostgreSQL is encrypted, as PostgreSQL sees
/// it, when the service's URL is `db`'s with `sslmode` set to `sslmode` (or left out for `None`).
/// The server starts, serves a sign-up (so its pool is in use), is asked about and stops.
async fn encryption_of_a_server(
    admin_url: &str,
    db: &Arc<TestDb>,
    smtp: &SmtpSink,
    sslmode: Option<&str>,
) -> Vec<bool> {
    let name = format!(
        "cdp_tls_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut pairs = vec![("application_name", name.as_str())];
    pairs.extend(sslmode.map(|mode| ("sslmode", mode)));
    let url = with_query(&db.service_url, &pairs);
    let server = TestServer::start_on(db.clone(), Some(smtp), |config| {
        config.database_url = url.clone()
    })
    .await;
    let tenant = slug(&format!("pg-{}", sslmode.unwrap_or("default")));
    new_tenant(&server, smtp, &tenant, &format!("owner@{tenant}.example")).await;
    let encrypted = ssl_of_connections(admin_url, &name).await;
    server.stop().await;
    assert!(!encrypted.is_empty(), "the service holds no connection");
    encrypted
}

#[tokio::test]
async fn sslmode_require_encrypts_every_connection_of_the_service_to_postgresql() {
    let Some(admin_url) = postgres_admin_url() else {
        return;
    };
    init_logs();
    let smtp = SmtpSink::start().await;
    let db = TestDb::create(Backend::Postgres).await;
    let encrypted = encryption_of_a_server(&admin_url, &db, &smtp, Some("require")).await;
    assert!(
        encrypted.iter().all(|ssl| *ssl),
        "connections without TLS: {encrypted:?}"
    );
    // The control: the same database with TLS turned off, so that the check above can tell.
    let control = encryption_of_a_server(&admin_url, &db, &smtp, Some("disable")).await;
    assert!(
        control.iter().all(|ssl| !*ssl),
        "sslmode=disable should show unencrypted connections: {control:?}"
    );
}

#[tokio::test]
async fn a_loopback_url_without_sslmode_connects_in_plain_text_and_an_explicit_prefer_keeps_tls() {
    let Some(admin_url) = postgres_admin_url() else {
        return;
    };
    init_logs();
    let smtp = SmtpSink::start().await;
    let db = TestDb::create(Backend::Postgres).await;
    assert!(
        reqwest::Url::parse(&db.service_url)
            .unwrap()
            .host_str()
            .is_some_and(api::store::is_loopback_host),
        "this test needs CDP_TEST_POSTGRES_URL on 127.0.0.1, ::1 or localhost: {}",
        db.service_url
    );
    let plain = encryption_of_a_server(&admin_url, &db, &smtp, None).await;
    assert!(
        plain.iter().all(|ssl| !*ssl),
        "a loopback URL without sslmode should connect without TLS: {plain:?}"
    );
    // The control: the same database with `prefer` said, which must negotiate TLS (the test
    // server offers it, as the one of the test above must).
    let preferred = encryption_of_a_server(&admin_url, &db, &smtp, Some("prefer")).await;
    assert!(
        preferred.iter().all(|ssl| *ssl),
        "sslmode=prefer said in the URL should negotiate TLS: {preferred:?}"
    );
}

#[tokio::test]
async fn sslmode_verify_full_refuses_a_postgresql_certificate_not_signed_by_the_given_ca() {
    if postgres_admin_url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("not the PostgreSQL server's CA");
    let root = write(dir.path(), "root.pem", &ca.pem());
    let db = TestDb::create(Backend::Postgres).await;
    let mut config = api::config::Config::for_tests(&db.data_dir, &db.service_url);
    config.database_url = with_query(
        &db.service_url,
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &root.display().to_string()),
        ],
    );
    let error = match api::startup::build(config).await {
        Ok(_) => panic!("connected to a server whose certificate the CA did not sign"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("cannot connect to the database (CDP_DATABASE_URL)")
            && error.contains("invalid peer certificate"),
        "{error}"
    );
}

/// The tenant's outbox rows once `done` holds for them, failing after the deadline.
async fn outbox_when(
    db: &TestDb,
    tenant_id: &str,
    done: impl Fn(&[api::store::outbox::OutboxRow]) -> bool,
) -> Vec<api::store::outbox::OutboxRow> {
    let store = api::store::Store::connect(&api::store::StoreOptions {
        url: db.service_url.clone(),
        max_connections: 1,
        min_connections: 1,
    })
    .await
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let tx = store.read(tenant_id.parse().unwrap()).await.unwrap();
        let rows = api::store::outbox::list(&tx).await.unwrap();
        drop(tx);
        if done(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox never got there: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Signs up a tenant on `server` and returns its id (the activation email goes to the outbox).
async fn sign_up(server: &TestServer, prefix: &str) -> String {
    let data = server
        .gql_ok(
            None,
            SIGN_UP,
            json!({"input": {"tenantName": prefix, "tenantSlug": slug(prefix), "email": format!("owner@{prefix}.example")}}),
        )
        .await;
    data["signUp"]["tenant"]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn mail_goes_out_over_starttls_and_smtps_to_a_server_certified_by_the_configured_ca() {
    for backend in backends() {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("CDP test mail CA");
        let ca_file = write(dir.path(), "mail-ca.pem", &ca.pem());
        let tls = ca.server_cert().server_config();
        let sinks = [
            (SinkTls::StartTls(tls.clone()), "smtp", "?tls=required"),
            (SinkTls::StartTls(tls.clone()), "smtp", ""),
            (SinkTls::Implicit(tls), "smtps", ""),
        ];
        for (mode, scheme, query) in sinks {
            let smtp = SmtpSink::start_tls(mode).await;
            let url = format!("{scheme}://127.0.0.1:{}{query}", smtp.port());
            let db = TestDb::create(backend).await;
            let server = TestServer::start_on(db, None, |config| {
                config.smtp_url = Some(url.clone());
                config.smtp_ca_cert = Some(ca_file.clone());
            })
            .await;
            let session =
                new_tenant(&server, &smtp, &slug("mail-tls"), "owner@mail-tls.example").await;
            assert!(!session.access_token.is_empty());
            let mails = smtp.received();
            assert_eq!(mails.len(), 1, "[{backend:?}] {url}");
            assert!(
                mails[0].tls,
                "[{backend:?}] {url}: the mail arrived in plain text"
            );
            server.stop().await;
        }
    }
}

#[tokio::test]
async fn tls_required_fails_against_a_server_without_starttls_and_the_outbox_keeps_the_error() {
    for backend in backends() {
        init_logs();
        let smtp = SmtpSink::start().await;
        let url = format!("smtp://127.0.0.1:{}?tls=required", smtp.port());
        let db = TestDb::create(backend).await;
        let server = TestServer::start_on(db.clone(), None, |config| {
            config.smtp_url = Some(url.clone());
            config.outbox_max_attempts = 1;
        })
        .await;
        let tenant_id = sign_up(&server, "no-starttls").await;
        let rows = outbox_when(&db, &tenant_id, |rows| {
            rows.iter().all(|row| row.status == "FAILED")
        })
        .await;
        let error = rows[0].last_error.as_deref().unwrap_or_default();
        assert!(error.contains("STARTTLS"), "[{backend:?}] {error}");
        assert!(smtp.received().is_empty(), "mail went out in plain text");
        server.stop().await;
    }
}

#[tokio::test]
async fn a_mail_server_certificate_not_signed_by_the_trusted_ca_is_refused() {
    for backend in backends() {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let trusted = TestCa::new("CDP test mail CA");
        let ca_file = write(dir.path(), "mail-ca.pem", &trusted.pem());
        let impostor = TestCa::new("someone else").server_cert().server_config();
        let sinks = [
            (SinkTls::StartTls(impostor.clone()), "smtp", "?tls=required"),
            // Opportunistic STARTTLS does not fall back to plain text on a bad certificate.
            (SinkTls::StartTls(impostor.clone()), "smtp", ""),
            (SinkTls::Implicit(impostor), "smtps", ""),
        ];
        for (mode, scheme, query) in sinks {
            let smtp = SmtpSink::start_tls(mode).await;
            let url = format!("{scheme}://127.0.0.1:{}{query}", smtp.port());
            let db = TestDb::create(backend).await;
            let server = TestServer::start_on(db.clone(), None, |config| {
                config.smtp_url = Some(url.clone());
                config.smtp_ca_cert = Some(ca_file.clone());
                config.outbox_max_attempts = 1;
            })
            .await;
            let tenant_id = sign_up(&server, "impostor").await;
            let rows = outbox_when(&db, &tenant_id, |rows| {
                rows.iter().all(|row| row.status == "FAILED")
            })
            .await;
            let error = rows[0].last_error.as_deref().unwrap_or_default();
            assert!(
                error.contains("invalid peer certificate"),
                "[{backend:?}] {url}: {error}"
            );
            assert!(smtp.received().is_empty(), "[{backend:?}] {url}");
            server.stop().await;
        }
    }
}
