//! The operator's account commands (`cdp tenant`, `cdp user`, `cdp apikey`), parsed and run in
//! process against the running server's state, with their effects checked from outside: the
//! email at the SMTP sink, sign-in over GraphQL, keys on the collection API, the audit log.

use serde_json::{json, Value};

use crate::support::*;

const OPERATOR: &str = "ops-tester";

/// Runs `cdp ARGS…` in process and returns what it printed, or its error as text.
async fn cdp(server: &TestServer, args: &[&str]) -> Result<String, String> {
    let state = server.app.as_ref().unwrap().state();
    let invocation = api::cli::accounts::Invocation {
        operator: OPERATOR.to_owned(),
        show_progress: false,
    };
    let mut out = Vec::new();
    match api::cli::accounts::run_args(state, &invocation, args, &mut out).await {
        Ok(()) => Ok(String::from_utf8(out).unwrap()),
        Err(error) => Err(format!("{error:#}")),
    }
}

async fn cdp_ok(server: &TestServer, args: &[&str]) -> String {
    cdp(server, args)
        .await
        .unwrap_or_else(|error| panic!("[{:?}] cdp {args:?} failed: {error}", server.backend))
}

async fn cdp_json(server: &TestServer, args: &[&str]) -> Value {
    serde_json::from_str(&cdp_ok(server, args).await).unwrap()
}

fn cdp_err(result: Result<String, String>, expected: &str) {
    match result {
        Ok(out) => panic!("expected an error containing {expected:?}, got output {out}"),
        Err(error) => assert!(
            error.contains(expected),
            "expected an error containing {expected:?}, got {error}"
        ),
    }
}

async fn login(server: &TestServer, slug: &str, email: &str) -> Value {
    server
        .gql(
            None,
            LOGIN,
            json!({"slug": slug, "email": email, "password": PASSWORD}),
        )
        .await
}

#[tokio::test]
async fn the_operator_lists_and_shows_tenants_and_creates_one_whose_owner_gets_the_email() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let first = slug("opt");
        let owner = new_tenant(&server, &smtp, &first, "owner@opt.example").await;
        collect(
            &server,
            "/v1/identify",
            &write_key(&server, &owner, "site", "WEB").await,
            &json!({"userId": "u-1", "traits": {"plan": "pro"}}),
        )
        .await;

        let second = slug("opt");
        let before = smtp.received().len();
        let created = cdp_ok(
            &server,
            &[
                "tenant",
                "create",
                "--slug",
                &second,
                "--name",
                "Second Co",
                "--owner-email",
                "boss@second.example",
            ],
        )
        .await;
        assert!(created.contains(&format!("tenant {second} (")), "{created}");
        let printed = token_from_link(&created, "/activate");
        let mail = mail_to(&smtp, before + 1, "boss@second.example").await;
        assert_eq!(token_from_link(&mail.text(), "/activate"), printed);
        server
            .gql_ok(
                None,
                ACTIVATE,
                json!({"token": printed, "password": PASSWORD}),
            )
            .await;

        let list = cdp_json(&server, &["tenant", "list", "--json"]).await;
        let find = |slug: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .find(|tenant| tenant["slug"] == slug)
                .cloned()
                .unwrap_or_else(|| panic!("{slug} not in {list:#}"))
        };
        let shown = find(&first);
        assert_eq!(shown["id"], owner.tenant_id.as_str());
        assert_eq!(shown["name"], format!("{first} Inc"));
        assert_eq!(
            (shown["users"].clone(), shown["profiles"].clone()),
            (json!(1), json!(1))
        );
        assert!(shown["createdAt"].as_str().unwrap().ends_with('Z'));
        assert_eq!(find(&second)["profiles"], 0);

        let table = cdp_ok(&server, &["tenant", "list"]).await;
        assert!(table.starts_with("SLUG"), "{table}");
        assert!(table.contains(&first) && table.contains(&second), "{table}");

        let one = cdp_json(&server, &["tenant", "show", &first, "--json"]).await;
        assert_eq!(one, shown);
        let text = cdp_ok(&server, &["tenant", "show", &second]).await;
        assert!(text.contains("name:     Second Co"), "{text}");

        cdp_err(
            cdp(&server, &["tenant", "show", "no-such-tenant"]).await,
            "there is no tenant with the slug \"no-such-tenant\"",
        );
        cdp_err(
            cdp(
                &server,
                &[
                    "tenant",
                    "create",
                    "--slug",
                    &second,
                    "--name",
                    "Again",
                    "--owner-email",
                    "again@second.example",
                ],
            )
            .await,
            "this tenant slug is taken",
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn the_operator_invites_sets_roles_disables_and_enables_users_through_the_use_cases() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let tenant = slug("opu");
        let owner = new_tenant(&server, &smtp, &tenant, "owner@opu.example").await;

        // Invited at the command line: the email goes out through the outbox like inviteUser's,
        // carries the printed link, and the user activates with it.
        let before = smtp.received().len();
        let invited = cdp_ok(
            &server,
            &[
                "user",
                "invite",
                "--tenant",
                &tenant,
                "--email",
                "Ann@OPU.example",
                "--role",
                "analyst",
            ],
        )
        .await;
        let printed = token_from_link(&invited, "/activate");
        let mail = mail_to(&smtp, before + 1, "ann@opu.example").await;
        assert_eq!(token_from_link(&mail.text(), "/activate"), printed);
        let activated = server
            .gql_ok(
                None,
                ACTIVATE,
                json!({"token": printed, "password": PASSWORD}),
            )
            .await;
        assert_eq!(
            activated["activateAccount"]["user"]["roles"],
            json!(["analyst"])
        );
        let ann_token = activated["activateAccount"]["accessToken"]
            .as_str()
            .unwrap()
            .to_owned();

        let users = cdp_json(&server, &["user", "list", "--tenant", &tenant, "--json"]).await;
        let ann = users
            .as_array()
            .unwrap()
            .iter()
            .find(|user| user["email"] == "ann@opu.example")
            .cloned()
            .unwrap();
        assert_eq!(
            (ann["status"].clone(), ann["roles"].clone()),
            (json!("ACTIVE"), json!(["analyst"]))
        );
        assert_eq!(users.as_array().unwrap().len(), 2);
        let table = cdp_ok(&server, &["user", "list", "--tenant", &tenant]).await;
        assert!(table.contains("owner@opu.example  ACTIVE"), "{table}");

        // Errors: each refused with a clear message, nothing changed.
        cdp_err(
            cdp(
                &server,
                &[
                    "user",
                    "invite",
                    "--tenant",
                    &tenant,
                    "--email",
                    "ann@opu.example",
                    "--role",
                    "viewer",
                ],
            )
            .await,
            "a user with this email already exists",
        );
        cdp_err(
            cdp(
                &server,
                &[
                    "user",
                    "invite",
                    "--tenant",
                    &tenant,
                    "--email",
                    "bob@opu.example",
                    "--role",
                    "wizard",
                ],
            )
            .await,
            "there is no role named \"wizard\"",
        );
        cdp_err(
            cdp(
                &server,
                &[
                    "user",
                    "invite",
                    "--tenant",
                    "no-such-tenant",
                    "--email",
                    "bob@opu.example",
                    "--role",
                    "viewer",
                ],
            )
            .await,
            "there is no tenant with the slug \"no-such-tenant\"",
        );
        cdp_err(
            cdp(
                &server,
                &[
                    "user",
                    "invite",
                    "--tenant",
                    &tenant,
                    "--email",
                    "not-an-email",
                    "--role",
                    "viewer",
                ],
            )
            .await,
            "is not a valid email address",
        );
        cdp_err(
            cdp(
                &server,
                &[
                    "user",
                    "invite",
                    "--tenant",
                    &tenant,
                    "--email",
                    "bob@opu.example",
                ],
            )
            .await,
            "--role",
        );
        cdp_err(
            cdp(
                &server,
                &[
                    "user",
                    "set-roles",
                    "--tenant",
                    &tenant,
                    "--email",
                    "nobody@opu.example",
                    "--role",
                    "viewer",
                ],
            )
            .await,
            "there is no user with the email \"nobody@opu.example\"",
        );
        // The last active owner stays, whoever asks.
        cdp_err(
            cdp(
                &server,
                &[
                    "user",
                    "disable",
                    "--tenant",
                    &tenant,
                    "--email",
                    "owner@opu.example",
                ],
            )
            .await,
            "a tenant must keep at least one active owner",
        );
        let users = cdp_json(&server, &["user", "list", "--tenant", &tenant, "--json"]).await;
        assert_eq!(users.as_array().unwrap().len(), 2);

        let set = cdp_ok(
            &server,
            &[
                "user",
                "set-roles",
                "--tenant",
                &tenant,
                "--email",
                "ann@opu.example",
                "--role",
                "viewer",
                "--role",
                "marketer",
            ],
        )
        .await;
        assert!(set.contains("marketer,viewer"), "{set}");
        let me = server
            .gql_ok(Some(&ann_token), "{ me { user { roles } } }", json!({}))
            .await;
        assert_eq!(me["me"]["user"]["roles"], json!(["marketer", "viewer"]));

        // Disabled: the session in hand stops working and sign-in is refused.
        assert!(login(&server, &tenant, "ann@opu.example").await["errors"].is_null());
        cdp_ok(
            &server,
            &[
                "user",
                "disable",
                "--tenant",
                &tenant,
                "--email",
                "ann@opu.example",
            ],
        )
        .await;
        assert_eq!(
            error_code(
                &server
                    .gql(Some(&ann_token), "{ me { user { id } } }", json!({}))
                    .await
            ),
            "UNAUTHENTICATED"
        );
        assert_eq!(
            error_code(&login(&server, &tenant, "ann@opu.example").await),
            "UNAUTHENTICATED"
        );
        cdp_err(
            cdp(
                &server,
                &[
                    "user",
                    "disable",
                    "--tenant",
                    &tenant,
                    "--email",
                    "nobody@opu.example",
                ],
            )
            .await,
            "there is no user",
        );

        // Enabled: the same password works again.
        let enabled = cdp_ok(
            &server,
            &[
                "user",
                "enable",
                "--tenant",
                &tenant,
                "--email",
                "ann@opu.example",
            ],
        )
        .await;
        assert!(enabled.contains("is ACTIVE"), "{enabled}");
        assert!(login(&server, &tenant, "ann@opu.example").await["errors"].is_null());
        cdp_err(
            cdp(
                &server,
                &[
                    "user",
                    "enable",
                    "--tenant",
                    &tenant,
                    "--email",
                    "ann@opu.example",
                ],
            )
            .await,
            "is not deactivated",
        );

        // A user disabled before activating is pending again when enabled, with a new link
        // that works (disabling retired the first one).
        let before = smtp.received().len();
        let invited = cdp_ok(
            &server,
            &[
                "user",
                "invite",
                "--tenant",
                &tenant,
                "--email",
                "cat@opu.example",
                "--role",
                "viewer",
            ],
        )
        .await;
        let first_link = token_from_link(&invited, "/activate");
        mail_to(&smtp, before + 1, "cat@opu.example").await;
        cdp_ok(
            &server,
            &[
                "user",
                "disable",
                "--tenant",
                &tenant,
                "--email",
                "cat@opu.example",
            ],
        )
        .await;
        let enabled = cdp_ok(
            &server,
            &[
                "user",
                "enable",
                "--tenant",
                &tenant,
                "--email",
                "cat@opu.example",
            ],
        )
        .await;
        assert!(enabled.contains("is PENDING"), "{enabled}");
        let second_link = token_from_link(&enabled, "/activate");
        let mail = mail_to(&smtp, before + 2, "cat@opu.example").await;
        assert_eq!(token_from_link(&mail.text(), "/activate"), second_link);
        let stale = server
            .gql(
                None,
                ACTIVATE,
                json!({"token": first_link, "password": PASSWORD}),
            )
            .await;
        assert_eq!(error_code(&stale), "BAD_USER_INPUT");
        server
            .gql_ok(
                None,
                ACTIVATE,
                json!({"token": second_link, "password": PASSWORD}),
            )
            .await;

        // Every change is in the audit log, by the operator.
        let audit = server
            .gql_ok(
                Some(&owner.access_token),
                "{ auditLog(first: 100) { edges { node { actor action target } } } }",
                json!({}),
            )
            .await;
        let by_operator: Vec<String> = audit["auditLog"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|edge| edge["node"]["actor"] == format!("operator:{OPERATOR}"))
            .map(|edge| edge["node"]["action"].as_str().unwrap().to_owned())
            .collect();
        for action in [
            "user.invite",
            "user.set_roles",
            "user.deactivate",
            "user.reactivate",
        ] {
            assert!(
                by_operator.iter().any(|seen| seen == action),
                "[{backend:?}] no {action} by the operator in {by_operator:?}"
            );
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn the_operator_creates_lists_and_revokes_api_keys_that_the_collection_api_obeys() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let tenant = slug("opk");
        let owner = new_tenant(&server, &smtp, &tenant, "owner@opk.example").await;
        let batch = json!({"batch": [{"type": "track", "userId": "k-1", "event": "Signed Up"}]});

        let created = cdp_json(
            &server,
            &[
                "apikey",
                "create",
                "--tenant",
                &tenant,
                "--name",
                "website",
                "--scope",
                "WRITE",
                "--channel",
                "WEB",
                "--json",
            ],
        )
        .await;
        let secret = created["secret"].as_str().unwrap().to_owned();
        assert_eq!(
            (created["scope"].clone(), created["channel"].clone()),
            (json!("WRITE"), json!("WEB"))
        );
        assert!(secret.starts_with(created["prefix"].as_str().unwrap()));
        let (status, _) = collect(&server, "/v1/batch", &secret, &batch).await;
        assert_eq!(status, 200);

        let text = cdp_ok(
            &server,
            &[
                "apikey", "create", "--tenant", &tenant, "--name", "backend", "--scope", "secret",
            ],
        )
        .await;
        let backend_secret = text.lines().last().unwrap().to_owned();
        let me = server
            .gql_ok(
                Some(&backend_secret),
                "{ me { apiKey { name scope channel } } }",
                json!({}),
            )
            .await;
        assert_eq!(
            me["me"]["apiKey"],
            json!({"name": "backend", "scope": "SECRET", "channel": "OTHER"})
        );

        let keys = cdp_json(&server, &["apikey", "list", "--tenant", &tenant, "--json"]).await;
        let names: Vec<&str> = keys
            .as_array()
            .unwrap()
            .iter()
            .map(|key| key["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"website") && names.contains(&"backend"));
        assert!(
            !keys.to_string().contains(&secret),
            "a listing never shows a secret"
        );
        // The keys are the API's keys.
        let api_keys = server
            .gql_ok(
                Some(&owner.access_token),
                "{ apiKeys { id name } }",
                json!({}),
            )
            .await;
        assert_eq!(api_keys["apiKeys"].as_array().unwrap().len(), 2);

        // Errors.
        cdp_err(
            cdp(
                &server,
                &[
                    "apikey", "create", "--tenant", &tenant, "--name", "x", "--scope", "READ",
                ],
            )
            .await,
            "invalid value 'READ' for '--scope <SCOPE>'",
        );
        cdp_err(
            cdp(
                &server,
                &[
                    "apikey", "create", "--tenant", &tenant, "--name", "  ", "--scope", "write",
                ],
            )
            .await,
            "name must be 1 to 200 characters",
        );
        cdp_err(
            cdp(&server, &["apikey", "list", "--tenant", "no-such-tenant"]).await,
            "there is no tenant with the slug",
        );
        cdp_err(
            cdp(
                &server,
                &[
                    "apikey",
                    "revoke",
                    "--tenant",
                    &tenant,
                    "nothing-by-this-name",
                ],
            )
            .await,
            "there is no unrevoked api key with the id or name",
        );

        // Revoked by name: the collection API answers 401 at once.
        let revoked = cdp_ok(
            &server,
            &["apikey", "revoke", "--tenant", &tenant, "website"],
        )
        .await;
        assert!(revoked.contains("revoked at"), "{revoked}");
        let (status, _) = collect(&server, "/v1/batch", &secret, &batch).await;
        assert_eq!(status, 401);
        // Revoked by id.
        let id = created["id"].as_str().unwrap();
        let backend_id = keys
            .as_array()
            .unwrap()
            .iter()
            .find(|key| key["name"] == "backend")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        cdp_ok(
            &server,
            &["apikey", "revoke", "--tenant", &tenant, &backend_id],
        )
        .await;
        assert_eq!(
            error_code(
                &server
                    .gql(Some(&backend_secret), "{ me { permissions } }", json!({}))
                    .await
            ),
            "UNAUTHENTICATED"
        );
        let keys = cdp_json(&server, &["apikey", "list", "--tenant", &tenant, "--json"]).await;
        assert!(keys
            .as_array()
            .unwrap()
            .iter()
            .all(|key| key["revokedAt"].is_string()));
        // A name that names only revoked keys names nothing to revoke.
        cdp_err(
            cdp(
                &server,
                &["apikey", "revoke", "--tenant", &tenant, "website"],
            )
            .await,
            "there is no unrevoked api key",
        );
        // Another tenant's key id is unknown here.
        let other = slug("opk");
        cdp_ok(
            &server,
            &[
                "tenant",
                "create",
                "--slug",
                &other,
                "--name",
                "Other",
                "--owner-email",
                "o@other.example",
            ],
        )
        .await;
        cdp_err(
            cdp(&server, &["apikey", "revoke", "--tenant", &other, id]).await,
            "there is no unrevoked api key",
        );

        let audit = server
            .gql_ok(
                Some(&owner.access_token),
                "{ auditLog(first: 100) { edges { node { actor action } } } }",
                json!({}),
            )
            .await;
        let count = |action: &str| {
            audit["auditLog"]["edges"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|edge| {
                    edge["node"]["action"] == action
                        && edge["node"]["actor"] == format!("operator:{OPERATOR}")
                })
                .count()
        };
        assert_eq!((count("api_key.create"), count("api_key.revoke")), (2, 2));
        server.stop().await;
    }
}
