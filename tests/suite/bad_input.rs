//! Bad input gets its contract error code and changes nothing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::json;

use crate::support::*;

const ME: &str = "{ me { user { email } } }";
/// The JWT secret of `Config::for_tests`.
const TEST_JWT_SECRET: &[u8] = b"test-secret-test-secret-test-secret-0123456789";

fn forge(claims: serde_json::Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn claims(user_id: &str, tenant_id: &str, exp_offset: i64) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "sub": user_id, "tid": tenant_id, "sid": uuid::Uuid::new_v4().to_string(), "typ": "access",
        "iss": "cdp", "aud": "cdp-api", "iat": now, "exp": now + exp_offset
    })
}

#[tokio::test]
async fn sign_up_and_activation_refuse_bad_input_and_change_nothing() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let tenant_slug = slug("bad");

        let malformed = server
            .gql(None, SIGN_UP, json!({"input": {"tenantName": "Bad", "tenantSlug": tenant_slug, "email": "not-an-email"}}))
            .await;
        assert_eq!(error_code(&malformed), "BAD_USER_INPUT");
        assert_eq!(malformed["errors"][0]["extensions"]["field"], "email");
        for bad_slug in ["Upper", "a", "with space", "-dash"] {
            let response = server
                .gql(None, SIGN_UP, json!({"input": {"tenantName": "Bad", "tenantSlug": bad_slug, "email": "a@bad.example"}}))
                .await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{bad_slug}");
            assert_eq!(response["errors"][0]["extensions"]["field"], "tenantSlug");
        }
        // Nothing was created: the slug is still free, and no email went out.
        let owner = new_tenant(&server, &smtp, &tenant_slug, "owner@bad.example").await;
        assert_eq!(smtp.received().len(), 1);
        let duplicate = server
            .gql(None, SIGN_UP, json!({"input": {"tenantName": "Again", "tenantSlug": tenant_slug, "email": "x@bad.example"}}))
            .await;
        assert_eq!(error_code(&duplicate), "CONFLICT");

        // A short password is refused and the token stays usable.
        let before = smtp.received().len();
        server
            .gql_ok(
                Some(&owner.access_token),
                "mutation { inviteUser(email: \"new@bad.example\", roles: [\"viewer\"]) { id } }",
                json!({}),
            )
            .await;
        let mail = mail_to(&smtp, before + 1, "new@bad.example").await;
        let token = token_from_link(&mail.text(), "/activate");
        let short = server
            .gql(
                None,
                ACTIVATE,
                json!({"token": token, "password": "123456789"}),
            )
            .await;
        assert_eq!(error_code(&short), "BAD_USER_INPUT");
        assert_eq!(short["errors"][0]["extensions"]["field"], "password");
        server
            .gql_ok(
                None,
                ACTIVATE,
                json!({"token": token, "password": PASSWORD}),
            )
            .await;
        let used = server
            .gql(
                None,
                ACTIVATE,
                json!({"token": token, "password": PASSWORD}),
            )
            .await;
        assert_eq!(error_code(&used), "BAD_USER_INPUT");
        assert_eq!(used["errors"][0]["extensions"]["field"], "token");
        let garbage = server
            .gql(
                None,
                ACTIVATE,
                json!({"token": "act_garbage", "password": PASSWORD}),
            )
            .await;
        assert_eq!(error_code(&garbage), "BAD_USER_INPUT");

        // Logins: an unknown slug and a wrong password read the same.
        let unknown = server.gql(None, LOGIN, json!({"slug": "no-such-tenant", "email": "owner@bad.example", "password": PASSWORD})).await;
        let wrong = server.gql(None, LOGIN, json!({"slug": tenant_slug, "email": "owner@bad.example", "password": "wrong password!"})).await;
        assert_eq!(error_code(&unknown), "UNAUTHENTICATED");
        assert_eq!(error_code(&wrong), "UNAUTHENTICATED");
        assert_eq!(
            unknown["errors"][0]["message"],
            wrong["errors"][0]["message"]
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn an_expired_activation_token_is_refused() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let server = TestServer::start_on(db, Some(&smtp), |config| {
            config.activation_token_ttl = std::time::Duration::ZERO;
        })
        .await;
        server
            .gql_ok(None, SIGN_UP, json!({"input": {"tenantName": "Late", "tenantSlug": slug("late"), "email": "late@late.example"}}))
            .await;
        let mail = mail_to(&smtp, 1, "late@late.example").await;
        let token = token_from_link(&mail.text(), "/activate");
        let expired = server
            .gql(
                None,
                ACTIVATE,
                json!({"token": token, "password": PASSWORD}),
            )
            .await;
        assert_eq!(error_code(&expired), "BAD_USER_INPUT");
        server.stop().await;
    }
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens_are_unauthenticated() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let a = new_tenant(&server, &smtp, &slug("tok-a"), "a@tok.example").await;
        let b = new_tenant(&server, &smtp, &slug("tok-b"), "b@tok.example").await;

        // The forging helper is right: a token it signs with the real secret is accepted.
        let genuine = forge(claims(&a.user_id, &a.tenant_id, 300), TEST_JWT_SECRET);
        server.gql_ok(Some(&genuine), ME, json!({})).await;

        let payload = URL_SAFE_NO_PAD.encode(claims(&a.user_id, &a.tenant_id, 300).to_string());
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let mut tampered = a.access_token.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        let cases = [
            ("alg none", format!("{none_header}.{payload}.")),
            ("tampered signature", tampered),
            (
                "another secret",
                forge(
                    claims(&a.user_id, &a.tenant_id, 300),
                    b"some-other-secret-some-other-secret-000",
                ),
            ),
            (
                "expired",
                forge(claims(&a.user_id, &a.tenant_id, -3600), TEST_JWT_SECRET),
            ),
            (
                "another tenant",
                forge(claims(&a.user_id, &b.tenant_id, 300), TEST_JWT_SECRET),
            ),
            (
                "wrong audience",
                forge(
                    json!({"sub": a.user_id, "tid": a.tenant_id, "sid": uuid::Uuid::new_v4(), "typ": "access", "iss": "cdp", "aud": "other", "iat": 0, "exp": 4_000_000_000i64}),
                    TEST_JWT_SECRET,
                ),
            ),
            ("refresh token as access token", a.refresh_token.clone()),
            ("garbage", "not.a.token".to_owned()),
        ];
        for (what, token) in cases {
            let response = server.gql(Some(&token), ME, json!({})).await;
            assert_eq!(
                error_code(&response),
                "UNAUTHENTICATED",
                "{what}: {response}"
            );
            assert!(response["data"].is_null(), "{what}: no data leaks");
        }
        let response = server
            .client
            .post(server.url("/graphql"))
            .header("Authorization", "Basic Zm9vOmJhcg==")
            .json(&json!({"query": ME}))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap();
        assert_eq!(error_code(&response), "UNAUTHENTICATED");
        // No credentials at all: operations that need a principal say so.
        assert_eq!(
            error_code(&server.gql(None, ME, json!({})).await),
            "UNAUTHENTICATED"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn repeated_login_failures_are_rate_limited() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let tenant_slug = slug("throttle");
        new_tenant(&server, &smtp, &tenant_slug, "owner@throttle.example").await;
        for _ in 0..5 {
            let wrong = server
                .gql(None, LOGIN, json!({"slug": tenant_slug, "email": "owner@throttle.example", "password": "wrong password!"}))
                .await;
            assert_eq!(error_code(&wrong), "UNAUTHENTICATED");
        }
        let limited = server
            .gql(None, LOGIN, json!({"slug": tenant_slug, "email": "owner@throttle.example", "password": PASSWORD}))
            .await;
        assert_eq!(error_code(&limited), "RATE_LIMITED");
        assert!(
            limited["errors"][0]["extensions"]["retryAfter"]
                .as_u64()
                .unwrap()
                > 0
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn oversized_bodies_deep_queries_and_large_batches_are_refused() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;

        let huge = "x".repeat(1024 * 1024 + 1);
        let response = server
            .client
            .post(server.url("/graphql"))
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"query": "{{ __typename }}", "variables": {{"x": "{huge}"}}}}"#
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error_code(&body), "BAD_USER_INPUT");

        // 20 levels of `ofType` under the introspection root: deeper than the limit of 16.
        let deep = format!(
            "{{ __schema {{ types {{ fields {{ type {{ {} name {} }} }} }} }} }}",
            "ofType { ".repeat(20),
            "} ".repeat(20)
        );
        let response = server.gql(None, &deep, json!({})).await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT");
        assert!(
            response["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("nested too deep"),
            "{response}"
        );

        let batch: Vec<_> = (0..11)
            .map(|_| json!({"query": "{ __typename }"}))
            .collect();
        let response = server
            .client
            .post(server.url("/graphql"))
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(
            error_code(&response.json().await.unwrap()),
            "BAD_USER_INPUT"
        );
        let batch: Vec<_> = (0..2).map(|_| json!({"query": "{ __typename }"})).collect();
        let response: serde_json::Value = server
            .client
            .post(server.url("/graphql"))
            .json(&batch)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            response,
            json!([{"data": {"__typename": "Query"}}, {"data": {"__typename": "Query"}}])
        );

        let response = server
            .client
            .post(server.url("/graphql"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(
            error_code(&response.json().await.unwrap()),
            "BAD_USER_INPUT"
        );
        let unknown_field = server.gql(None, "{ nope }", json!({})).await;
        assert_eq!(error_code(&unknown_field), "BAD_USER_INPUT");
        let bad_cursor = server
            .gql(None, "{ users(after: \"zzz\") { totalCount } }", json!({}))
            .await;
        assert_eq!(error_code(&bad_cursor), "UNAUTHENTICATED");
        server.stop().await;
    }
}
