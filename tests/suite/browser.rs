//! The GraphiQL page in a real headless Chromium, driven through ChromeDriver's WebDriver API
//! (plain HTTP): the page loads from the binary alone, runs a query when its button is clicked,
//! and shows the answer.
//!
//! Needs Debian's `chromium` and `chromium-driver` (CI installs them; `CDP_TEST_CHROMEDRIVER` and
//! `CDP_TEST_CHROMIUM` override the paths). Without them the test says so and returns, unless
//! `CDP_TEST_REQUIRE_BROWSER` is set (CI sets it), which makes it fail.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::support::*;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn executable(variable: &str, default: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var(variable).unwrap_or_else(|_| default.to_owned()));
    path.exists().then_some(path)
}

/// Kills the driver (and with it the browser) however the test ends.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Session {
    client: reqwest::Client,
    base: String,
}

impl Session {
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let response = self
            .client
            .request(method, format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("ChromeDriver answers");
        let status = response.status();
        let value: Value = response.json().await.expect("WebDriver JSON");
        assert!(status.is_success(), "WebDriver {path}: {status} {value}");
        value["value"].clone()
    }

    /// Runs a script in the page and returns its result.
    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Polls the page with `script` until it returns a non-empty string containing `wanted`.
    async fn wait_for_text(&self, script: &str, wanted: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.script(script).await;
            let text = text.as_str().unwrap_or_default().to_owned();
            if text.contains(wanted) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never showed {wanted:?}; last seen: {text:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// A headless Chromium session; the browser and its driver end when it is dropped.
struct Browser {
    session: Session,
    _driver: Driver,
}

/// Starts ChromeDriver and a headless Chromium, or returns `None` (saying why) when they are
/// not installed.
async fn start_browser() -> Option<Browser> {
    let (Some(chromedriver), Some(chromium)) = (
        executable("CDP_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"),
        executable("CDP_TEST_CHROMIUM", "/usr/bin/chromium"),
    ) else {
        assert!(
            std::env::var_os("CDP_TEST_REQUIRE_BROWSER").is_none(),
            "CDP_TEST_REQUIRE_BROWSER is set but chromium or chromedriver is missing"
        );
        eprintln!(
            "browser test skipped: install Debian's chromium and chromium-driver (CI does) to run it"
        );
        return None;
    };

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let driver_process = Driver(
        Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts"),
    );
    let client = reqwest::Client::new();
    let driver = format!("http://127.0.0.1:{port}");
    // Ready when its status says so; polled with a deadline.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready = match client.get(format!("{driver}/status")).send().await {
            Ok(response) => response
                .json::<Value>()
                .await
                .is_ok_and(|status| status["value"]["ready"] == true),
            Err(_) => false,
        };
        if ready {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver never got ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let created: Value = client
        .post(format!("{driver}/session"))
        .json(&json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
            }
        }}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session_id = created["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("a WebDriver session: {created}"))
        .to_owned();
    Some(Browser {
        session: Session {
            client: client.clone(),
            base: format!("{driver}/session/{session_id}"),
        },
        _driver: driver_process,
    })
}

impl Session {
    /// The WebDriver id of the element `selector` matches.
    async fn element(&self, selector: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": selector}),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {selector}: {found}"))
            .to_owned()
    }

    async fn click(&self, selector: &str) {
        let element = self.element(selector).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            json!({}),
        )
        .await;
    }

    async fn type_into(&self, selector: &str, text: &str) {
        let element = self.element(selector).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            json!({"text": text}),
        )
        .await;
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    async fn close(&self) {
        self.call(reqwest::Method::DELETE, "", json!({})).await;
    }
}

#[tokio::test]
async fn graphiql_runs_a_query_in_a_real_browser() {
    let Some(browser) = start_browser().await else {
        return;
    };
    let session = &browser.session;
    let smtp = SmtpSink::start().await;
    let server = TestServer::start(Backend::Sqlite, &smtp).await;

    // The page opens with the query of its URL in the editor.
    let query = "query Probe { __typename }";
    let url = format!(
        "{}?query={}",
        server.url("/graphql"),
        query
            .replace(' ', "%20")
            .replace('{', "%7B")
            .replace('}', "%7D")
    );
    session.open(&url).await;
    // Every asset came from the server: GraphiQL rendered its editor.
    session
        .wait_for_text(
            "var e = document.querySelector('.graphiql-query-editor'); return e ? e.innerText : '';",
            "Probe",
        )
        .await;
    session.click(".graphiql-execute-button").await;
    let shown = session
        .wait_for_text(
            "var e = document.querySelector('.graphiql-response'); return e ? e.innerText : '';",
            "\"__typename\": \"Query\"",
        )
        .await;
    assert!(shown.contains("\"data\""), "{shown}");
    // Nothing was loaded from elsewhere.
    let foreign = session
        .script(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith(location.origin));",
        )
        .await;
    assert_eq!(foreign, json!([]), "resources from other origins");
    session.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_activation_link_of_the_email_opens_a_page_that_activates_the_account() {
    let Some(browser) = start_browser().await else {
        return;
    };
    let session = &browser.session;
    let smtp = SmtpSink::start().await;
    let server = TestServer::start(Backend::Sqlite, &smtp).await;
    let slug = slug("page");
    server
        .gql_ok(
            None,
            SIGN_UP,
            json!({"input": {"tenantName": "Page Inc", "tenantSlug": slug, "email": "owner@page.example"}}),
        )
        .await;
    let mail = mail_to(&smtp, 1, "owner@page.example").await;
    let token = token_from_link(&mail.text(), "/activate");

    session
        .open(&server.url(&format!("/activate?token={token}")))
        .await;
    session
        .wait_for_text(
            "return document.getElementById('title').innerText;",
            "Activate your account",
        )
        .await;
    // Two different passwords are caught on the page.
    session.type_into("#password", PASSWORD).await;
    session
        .type_into("#confirm", "something else entirely")
        .await;
    session.click("#submit").await;
    session
        .wait_for_text(
            "return document.getElementById('outcome').innerText;",
            "differ",
        )
        .await;
    let confirm = session.element("#confirm").await;
    session
        .call(
            reqwest::Method::POST,
            &format!("/element/{confirm}/clear"),
            json!({}),
        )
        .await;
    session.type_into("#confirm", PASSWORD).await;
    session.click("#submit").await;
    session
        .wait_for_text(
            "return document.getElementById('outcome').innerText;",
            "Account activated for owner@page.example",
        )
        .await;
    // The password chosen on the page signs in; the link is spent.
    let login = server
        .gql_ok(
            None,
            LOGIN,
            json!({"slug": slug, "email": "owner@page.example", "password": PASSWORD}),
        )
        .await;
    assert_eq!(login["login"]["user"]["status"], "ACTIVE");
    session
        .open(&server.url(&format!("/activate?token={token}")))
        .await;
    session.type_into("#password", PASSWORD).await;
    session.type_into("#confirm", PASSWORD).await;
    session.click("#submit").await;
    let shown = session
        .wait_for_text(
            "var o = document.getElementById('outcome'); return o.className + ': ' + o.innerText;",
            "failed: ",
        )
        .await;
    assert!(shown.len() > "failed: ".len(), "the page says why: {shown}");
    session.close().await;
    server.stop().await;
}
