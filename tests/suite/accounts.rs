//! The account journey, end to end.

use serde_json::json;

use crate::support::*;

const ME: &str =
    "{ me { user { id email status roles } apiKey { id scope } tenant { id slug } permissions } }";

#[tokio::test]
async fn the_whole_account_journey_works_over_http() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let tenant_slug = slug("journey");

        // Sign up, receive the activation mail over SMTP, activate.
        let owner = new_tenant(&server, &smtp, &tenant_slug, "owner@journey.example").await;
        let activation = &smtp.received()[0];
        assert!(
            activation
                .text()
                .contains("http://cdp.test/activate?token=act_"),
            "{}",
            activation.text()
        );
        assert!(activation.header("Message-ID").is_some());

        // Log in with the new password.
        let login = server
            .gql_ok(None, LOGIN, json!({"slug": tenant_slug, "email": "Owner@Journey.example", "password": PASSWORD}))
            .await;
        let owner_token = login["login"]["accessToken"].as_str().unwrap().to_owned();

        let me = server.gql_ok(Some(&owner_token), ME, json!({})).await;
        assert_eq!(me["me"]["user"]["email"], "owner@journey.example");
        assert_eq!(me["me"]["user"]["status"], "ACTIVE");
        assert_eq!(me["me"]["user"]["roles"], json!(["owner"]));
        assert_eq!(me["me"]["tenant"]["slug"], tenant_slug.as_str());
        assert_eq!(me["me"]["permissions"].as_array().unwrap().len(), 10);

        // Invite a viewer, who activates through the second email.
        let viewer = invited_user(
            &server,
            &smtp,
            &owner,
            "viewer@journey.example",
            &["viewer"],
        )
        .await;
        let me = server
            .gql_ok(Some(&viewer.access_token), ME, json!({}))
            .await;
        assert_eq!(me["me"]["permissions"], json!(["PROFILES_READ"]));

        // A viewer may not manage anything.
        for forbidden in [
            "mutation { inviteUser(email: \"x@journey.example\", roles: [\"viewer\"]) { id } }",
            "mutation { createApiKey(name: \"k\", scope: WRITE) { secret } }",
            "mutation { createRole(name: \"r\", permissions: [PROFILES_READ]) { name } }",
            "{ users { totalCount } }",
            "{ auditLog { totalCount } }",
            "{ apiKeys { id } }",
        ] {
            let response = server
                .gql(Some(&viewer.access_token), forbidden, json!({}))
                .await;
            assert_eq!(
                error_code(&response),
                "FORBIDDEN",
                "{forbidden}: {response}"
            );
        }

        // A role change takes effect on the very next request with the same access token.
        server
            .gql_ok(
                Some(&owner.access_token),
                "mutation($id: ID!) { setUserRoles(userId: $id, roles: [\"admin\"]) { roles } }",
                json!({"id": viewer.user_id}),
            )
            .await;
        let users = server
            .gql_ok(
                Some(&viewer.access_token),
                "{ users { totalCount edges { node { email roles status } } } }",
                json!({}),
            )
            .await;
        assert_eq!(users["users"]["totalCount"], 2);

        // An admin may not promote itself to owner.
        let response = server
            .gql(
                Some(&viewer.access_token),
                "mutation($id: ID!) { setUserRoles(userId: $id, roles: [\"owner\"]) { roles } }",
                json!({"id": viewer.user_id}),
            )
            .await;
        assert_eq!(error_code(&response), "FORBIDDEN");

        // Refresh tokens rotate; a replayed one revokes the whole family.
        let refresh = "mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken refreshToken } }";
        let rotated = server
            .gql_ok(None, refresh, json!({"t": viewer.refresh_token}))
            .await;
        let second_refresh = rotated["refreshSession"]["refreshToken"]
            .as_str()
            .unwrap()
            .to_owned();
        let second_access = rotated["refreshSession"]["accessToken"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(second_refresh, viewer.refresh_token);
        let replay = server
            .gql(None, refresh, json!({"t": viewer.refresh_token}))
            .await;
        assert_eq!(error_code(&replay), "UNAUTHENTICATED");
        let after_replay = server
            .gql(None, refresh, json!({"t": second_refresh}))
            .await;
        assert_eq!(
            error_code(&after_replay),
            "UNAUTHENTICATED",
            "the family is revoked after a replay"
        );
        let response = server.gql(Some(&second_access), ME, json!({})).await;
        assert_eq!(
            error_code(&response),
            "UNAUTHENTICATED",
            "access tokens of a revoked family stop working"
        );

        // Deactivation refuses the user's tokens at once, and login.
        let relogin = server
            .gql_ok(None, LOGIN, json!({"slug": tenant_slug, "email": "viewer@journey.example", "password": PASSWORD}))
            .await;
        let viewer_token = relogin["login"]["accessToken"].as_str().unwrap().to_owned();
        let viewer_refresh = relogin["login"]["refreshToken"]
            .as_str()
            .unwrap()
            .to_owned();
        let deactivated = server
            .gql_ok(
                Some(&owner.access_token),
                "mutation($id: ID!) { deactivateUser(userId: $id) { status } }",
                json!({"id": viewer.user_id}),
            )
            .await;
        assert_eq!(deactivated["deactivateUser"]["status"], "DEACTIVATED");
        assert_eq!(
            error_code(&server.gql(Some(&viewer_token), ME, json!({})).await),
            "UNAUTHENTICATED"
        );
        assert_eq!(
            error_code(
                &server
                    .gql(None, refresh, json!({"t": viewer_refresh}))
                    .await
            ),
            "UNAUTHENTICATED"
        );
        let login = server
            .gql(None, LOGIN, json!({"slug": tenant_slug, "email": "viewer@journey.example", "password": PASSWORD}))
            .await;
        assert_eq!(error_code(&login), "UNAUTHENTICATED");

        // The last active owner cannot be removed.
        let response = server
            .gql(
                Some(&owner.access_token),
                "mutation($id: ID!) { deactivateUser(userId: $id) { status } }",
                json!({"id": owner.user_id}),
            )
            .await;
        assert_eq!(error_code(&response), "CONFLICT");

        // The audit log recorded every change, with who and from where.
        let audit = server
            .gql_ok(Some(&owner.access_token), "{ auditLog(first: 100) { totalCount edges { node { actor action target at detail ip } } } }", json!({}))
            .await;
        let actions: Vec<&str> = audit["auditLog"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|edge| edge["node"]["action"].as_str().unwrap())
            .collect();
        for expected in [
            "tenant.create",
            "user.activate",
            "user.login",
            "user.invite",
            "user.set_roles",
            "session.replay_detected",
            "user.deactivate",
        ] {
            assert!(
                actions.contains(&expected),
                "audit log lacks {expected}: {actions:?}"
            );
        }
        let deactivation = audit["auditLog"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|edge| edge["node"]["action"] == "user.deactivate")
            .unwrap();
        assert!(deactivation["node"]["actor"]
            .as_str()
            .unwrap()
            .contains("owner@journey.example"));
        assert_eq!(deactivation["node"]["ip"], "127.0.0.1");
        assert_eq!(
            deactivation["node"]["target"],
            format!("user:{}", viewer.user_id)
        );

        server.stop().await;
    }
}

#[tokio::test]
async fn a_password_reset_replaces_the_password_and_signs_out_everywhere() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let tenant_slug = slug("reset");
        let owner = new_tenant(&server, &smtp, &tenant_slug, "owner@reset.example").await;

        let request = "mutation($s: String!, $e: String!) { requestPasswordReset(tenantSlug: $s, email: $e) }";
        // Unknown accounts get the same answer and no email.
        let unknown = server
            .gql_ok(
                None,
                request,
                json!({"s": tenant_slug, "e": "nobody@reset.example"}),
            )
            .await;
        assert_eq!(unknown["requestPasswordReset"], true);
        let unknown = server
            .gql_ok(
                None,
                request,
                json!({"s": "no-such-tenant", "e": "owner@reset.example"}),
            )
            .await;
        assert_eq!(unknown["requestPasswordReset"], true);
        let known = server
            .gql_ok(
                None,
                request,
                json!({"s": tenant_slug, "e": "owner@reset.example"}),
            )
            .await;
        assert_eq!(known["requestPasswordReset"], true);
        let mail = mail_to(&smtp, 2, "owner@reset.example").await;
        assert_eq!(
            smtp.received().len(),
            2,
            "only the known account got an email"
        );
        let token = token_from_link(&mail.text(), "/reset-password");
        assert!(token.starts_with("rst_"));

        let reset = "mutation($t: String!, $p: String!) { resetPassword(token: $t, password: $p) { accessToken user { email } } }";
        let short = server
            .gql(None, reset, json!({"t": token, "p": "short"}))
            .await;
        assert_eq!(error_code(&short), "BAD_USER_INPUT");
        let done = server
            .gql_ok(
                None,
                reset,
                json!({"t": token, "p": "a brand new passphrase"}),
            )
            .await;
        let new_token = done["resetPassword"]["accessToken"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            error_code(
                &server
                    .gql(
                        None,
                        reset,
                        json!({"t": token, "p": "yet another passphrase"})
                    )
                    .await
            ),
            "BAD_USER_INPUT",
            "single use"
        );

        // Old sessions are gone, the new one works, the old password no longer does.
        assert_eq!(
            error_code(&server.gql(Some(&owner.access_token), ME, json!({})).await),
            "UNAUTHENTICATED"
        );
        let refresh = "mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken } }";
        assert_eq!(
            error_code(
                &server
                    .gql(None, refresh, json!({"t": owner.refresh_token}))
                    .await
            ),
            "UNAUTHENTICATED"
        );
        server.gql_ok(Some(&new_token), ME, json!({})).await;
        let old = server
            .gql(
                None,
                LOGIN,
                json!({"slug": tenant_slug, "email": "owner@reset.example", "password": PASSWORD}),
            )
            .await;
        assert_eq!(error_code(&old), "UNAUTHENTICATED");
        server
            .gql_ok(None, LOGIN, json!({"slug": tenant_slug, "email": "owner@reset.example", "password": "a brand new passphrase"}))
            .await;
        server.stop().await;
    }
}

#[tokio::test]
async fn api_keys_and_custom_roles_are_managed_by_admins() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("keys"), "owner@keys.example").await;
        let token = Some(owner.access_token.as_str());

        let create = "mutation($n: String!, $s: ApiKeyScope!) { createApiKey(name: $n, scope: $s) { secret apiKey { id name scope prefix revokedAt } } }";
        let write = server
            .gql_ok(token, create, json!({"n": "website", "s": "WRITE"}))
            .await;
        let write_secret = write["createApiKey"]["secret"].as_str().unwrap().to_owned();
        assert!(write_secret.starts_with("cdp_wk_"));
        assert!(
            write_secret.starts_with(write["createApiKey"]["apiKey"]["prefix"].as_str().unwrap())
        );
        let secret = server
            .gql_ok(token, create, json!({"n": "backend", "s": "SECRET"}))
            .await;
        let secret_key = secret["createApiKey"]["secret"]
            .as_str()
            .unwrap()
            .to_owned();
        let secret_id = secret["createApiKey"]["apiKey"]["id"]
            .as_str()
            .unwrap()
            .to_owned();

        // The listing never shows a secret.
        let keys = server
            .gql(token, "{ apiKeys { id name scope prefix } }", json!({}))
            .await;
        assert_eq!(keys["data"]["apiKeys"].as_array().unwrap().len(), 2);
        assert!(!keys.to_string().contains(&secret_key));
        let no_secret_field = server.gql(token, "{ apiKeys { secret } }", json!({})).await;
        assert_eq!(error_code(&no_secret_field), "BAD_USER_INPUT");

        // A SECRET key acts as an admin without account management; a WRITE key only sends data.
        let me = server.gql_ok(Some(&secret_key), ME, json!({})).await;
        assert_eq!(me["me"]["apiKey"]["scope"], "SECRET");
        assert!(me["me"]["user"].is_null());
        let permissions = me["me"]["permissions"].as_array().unwrap();
        assert!(permissions.contains(&json!("AUDIT_READ")));
        assert!(!permissions.contains(&json!("USERS_MANAGE")));
        assert_eq!(
            error_code(
                &server
                    .gql(Some(&secret_key), "{ users { totalCount } }", json!({}))
                    .await
            ),
            "FORBIDDEN"
        );
        server
            .gql_ok(Some(&secret_key), "{ auditLog { totalCount } }", json!({}))
            .await;
        let me = server.gql_ok(Some(&write_secret), ME, json!({})).await;
        assert_eq!(me["me"]["permissions"], json!([]));
        assert_eq!(
            error_code(
                &server
                    .gql(
                        Some(&write_secret),
                        "{ auditLog { totalCount } }",
                        json!({})
                    )
                    .await
            ),
            "FORBIDDEN"
        );

        // Revocation works at once.
        let revoked = server
            .gql_ok(
                token,
                "mutation($id: ID!) { revokeApiKey(id: $id) { revokedAt } }",
                json!({"id": secret_id}),
            )
            .await;
        assert!(revoked["revokeApiKey"]["revokedAt"].is_string());
        assert_eq!(
            error_code(&server.gql(Some(&secret_key), ME, json!({})).await),
            "UNAUTHENTICATED"
        );

        // Custom roles.
        let role = server
            .gql_ok(token, "mutation { createRole(name: \"support\", permissions: [PROFILES_READ, PII_READ]) { name permissions builtIn } }", json!({}))
            .await;
        assert_eq!(
            role["createRole"],
            json!({"name": "support", "permissions": ["PROFILES_READ", "PII_READ"], "builtIn": false})
        );
        let duplicate = server
            .gql(
                token,
                "mutation { createRole(name: \"support\", permissions: []) { name } }",
                json!({}),
            )
            .await;
        assert_eq!(error_code(&duplicate), "CONFLICT");
        let roles = server
            .gql_ok(token, "{ roles { name builtIn } }", json!({}))
            .await;
        let names: Vec<&str> = roles["roles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["owner", "admin", "marketer", "analyst", "viewer", "support"]
        );
        let supporter =
            invited_user(&server, &smtp, &owner, "support@keys.example", &["support"]).await;
        let in_use = server
            .gql(
                token,
                "mutation { deleteRole(name: \"support\") }",
                json!({}),
            )
            .await;
        assert_eq!(error_code(&in_use), "CONFLICT");
        server
            .gql_ok(
                token,
                "mutation($id: ID!) { setUserRoles(userId: $id, roles: [\"viewer\"]) { roles } }",
                json!({"id": supporter.user_id}),
            )
            .await;
        let deleted = server
            .gql_ok(
                token,
                "mutation { deleteRole(name: \"support\") }",
                json!({}),
            )
            .await;
        assert_eq!(deleted["deleteRole"], true);
        let built_in = server
            .gql(
                token,
                "mutation { deleteRole(name: \"viewer\") }",
                json!({}),
            )
            .await;
        assert_eq!(error_code(&built_in), "CONFLICT");
        let unknown_role = server
            .gql(
                token,
                "mutation { inviteUser(email: \"a@keys.example\", roles: [\"support\"]) { id } }",
                json!({}),
            )
            .await;
        assert_eq!(error_code(&unknown_role), "BAD_USER_INPUT");
        assert_eq!(unknown_role["errors"][0]["extensions"]["field"], "roles[0]");
        server.stop().await;
    }
}

/// Each process keeps the standings of the sessions it authenticated, keyed by the tenant's
/// `auth_version` (ADR 0017). A change made anywhere (another replica, SQL by hand) raises the
/// version in the database, so the next request on this replica reads the standing again: role
/// changes, deactivation and family revocation take effect at once, as when every request read
/// the database.
#[tokio::test]
async fn a_change_made_elsewhere_takes_effect_at_the_next_request_on_every_replica() {
    use sea_orm::{ConnectionTrait, Database};
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let here = TestServer::start_on(db.clone(), Some(&smtp), |_| {}).await;
        let elsewhere = TestServer::start_on(db.clone(), Some(&smtp), |_| {}).await;
        let tenant_slug = slug("replicas");
        let owner = new_tenant(&here, &smtp, &tenant_slug, "owner@replicas.example").await;
        let viewer =
            invited_user(&here, &smtp, &owner, "viewer@replicas.example", &["viewer"]).await;
        let metrics = &here.app.as_ref().expect("running").state().metrics;
        let permissions = |me: &serde_json::Value| me["me"]["permissions"].clone();

        // Asked twice with nothing changed in between: the second answer is the kept standing.
        let me = here.gql_ok(Some(&viewer.access_token), ME, json!({})).await;
        assert_eq!(permissions(&me), json!(["PROFILES_READ"]), "[{backend:?}]");
        let cached = metrics.auth_standing_count(true);
        let me = here.gql_ok(Some(&viewer.access_token), ME, json!({})).await;
        assert_eq!(permissions(&me), json!(["PROFILES_READ"]), "[{backend:?}]");
        assert_eq!(
            metrics.auth_standing_count(true),
            cached + 1,
            "[{backend:?}] an unchanged standing is not read again"
        );

        // A role change through the other replica.
        elsewhere
            .gql_ok(
                Some(&owner.access_token),
                "mutation($id: ID!) { setUserRoles(userId: $id, roles: [\"admin\"]) { roles } }",
                json!({"id": viewer.user_id}),
            )
            .await;
        let me = here.gql_ok(Some(&viewer.access_token), ME, json!({})).await;
        assert!(
            permissions(&me).as_array().expect("a list").len() > 1,
            "[{backend:?}] the admin role is in force here at once: {me}"
        );

        // Changes in SQL, as the database's owner: a role's permissions, a deactivation and
        // its reversal, an assignment removed.
        let sql = Database::connect(&db.owner_url).await.expect("connect");
        let run = |statement: String| {
            let sql = &sql;
            async move {
                let done = sql
                    .execute_unprepared(&statement)
                    .await
                    .unwrap_or_else(|error| panic!("{statement}: {error}"));
                assert_eq!(done.rows_affected(), 1, "{statement}");
            }
        };
        // Ids as each database stores them: uuid on PostgreSQL, a 16-byte blob on SQLite.
        let id = |text: &str| match backend {
            Backend::Postgres => format!("'{text}'"),
            Backend::Sqlite => format!("X'{}'", text.replace('-', "")),
        };
        let tenant = &id(&owner.tenant_id);
        run(format!(
            "UPDATE roles SET permissions = '[\"PROFILES_READ\",\"SEGMENTS_MANAGE\"]' \
             WHERE tenant_id = {tenant} AND name = 'admin'"
        ))
        .await;
        let me = here.gql_ok(Some(&viewer.access_token), ME, json!({})).await;
        assert_eq!(
            permissions(&me),
            json!(["PROFILES_READ", "SEGMENTS_MANAGE"]),
            "[{backend:?}]"
        );
        let viewer_id = &id(&viewer.user_id);
        run(format!(
            "UPDATE users SET status = 'DEACTIVATED' WHERE tenant_id = {tenant} AND id = {viewer_id}"
        ))
        .await;
        let refused = here.gql(Some(&viewer.access_token), ME, json!({})).await;
        assert_eq!(error_code(&refused), "UNAUTHENTICATED", "[{backend:?}]");
        run(format!(
            "UPDATE users SET status = 'ACTIVE' WHERE tenant_id = {tenant} AND id = {viewer_id}"
        ))
        .await;
        here.gql_ok(Some(&viewer.access_token), ME, json!({})).await;
        run(format!(
            "DELETE FROM user_roles WHERE tenant_id = {tenant} AND user_id = {viewer_id}"
        ))
        .await;
        let me = here.gql_ok(Some(&viewer.access_token), ME, json!({})).await;
        assert_eq!(permissions(&me), json!([]), "[{backend:?}]");

        // The session family revoked through the other replica (a replayed refresh token).
        let refresh = "mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken refreshToken } }";
        elsewhere
            .gql_ok(None, refresh, json!({"t": viewer.refresh_token}))
            .await;
        here.gql_ok(Some(&viewer.access_token), ME, json!({})).await;
        let replay = elsewhere
            .gql(None, refresh, json!({"t": viewer.refresh_token}))
            .await;
        assert_eq!(error_code(&replay), "UNAUTHENTICATED", "[{backend:?}]");
        let refused = here.gql(Some(&viewer.access_token), ME, json!({})).await;
        assert_eq!(
            error_code(&refused),
            "UNAUTHENTICATED",
            "[{backend:?}] the revoked family's access token is refused here at once"
        );
        // The owner's session was not touched by any of it, and its standing is kept again.
        here.gql_ok(Some(&owner.access_token), ME, json!({})).await;
        let cached = metrics.auth_standing_count(true);
        here.gql_ok(Some(&owner.access_token), ME, json!({})).await;
        assert_eq!(
            metrics.auth_standing_count(true),
            cached + 1,
            "[{backend:?}]"
        );

        elsewhere.stop().await;
        here.stop().await;
    }
}
