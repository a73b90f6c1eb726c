//! Tenant isolation: tenant B never reaches tenant A's data, through the API or, on PostgreSQL,
//! even through a raw query that forgets its tenant filter.

use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn tenant_b_gets_not_found_for_every_id_of_tenant_a() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let a = new_tenant(&server, &smtp, &slug("iso-a"), "owner@a.example").await;
        let b = new_tenant(&server, &smtp, &slug("iso-b"), "owner@b.example").await;
        let a_member = invited_user(&server, &smtp, &a, "member@a.example", &["viewer"]).await;
        let a_key = server
            .gql_ok(
                Some(&a.access_token),
                "mutation { createApiKey(name: \"a\", scope: WRITE) { apiKey { id } } }",
                json!({}),
            )
            .await["createApiKey"]["apiKey"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        server
            .gql_ok(
                Some(&a.access_token),
                "mutation { createRole(name: \"a-only\", permissions: [PROFILES_READ]) { name } }",
                json!({}),
            )
            .await;

        let attempts = [
            (
                "setUserRoles",
                "mutation($id: ID!) { setUserRoles(userId: $id, roles: [\"admin\"]) { id } }",
                json!({"id": a_member.user_id}),
            ),
            (
                "deactivateUser",
                "mutation($id: ID!) { deactivateUser(userId: $id) { id } }",
                json!({"id": a_member.user_id}),
            ),
            (
                "deactivateUser owner",
                "mutation($id: ID!) { deactivateUser(userId: $id) { id } }",
                json!({"id": a.user_id}),
            ),
            (
                "revokeApiKey",
                "mutation($id: ID!) { revokeApiKey(id: $id) { id } }",
                json!({"id": a_key}),
            ),
            (
                "deleteRole",
                "mutation { deleteRole(name: \"a-only\") }",
                json!({}),
            ),
            (
                "malformed id",
                "mutation { deactivateUser(userId: \"not-a-uuid\") { id } }",
                json!({}),
            ),
        ];
        for (what, query, variables) in attempts {
            let response = server.gql(Some(&b.access_token), query, variables).await;
            assert_eq!(
                error_code(&response),
                "NOT_FOUND",
                "[{backend:?}] {what}: {response}"
            );
            assert!(response["data"].is_null(), "{what}: no data");
        }

        // Lists show only the caller's tenant.
        let users = server
            .gql_ok(
                Some(&b.access_token),
                "{ users { totalCount edges { node { email } } } }",
                json!({}),
            )
            .await;
        assert_eq!(users["users"]["totalCount"], 1);
        assert_eq!(
            users["users"]["edges"][0]["node"]["email"],
            "owner@b.example"
        );
        let keys = server
            .gql_ok(Some(&b.access_token), "{ apiKeys { id } }", json!({}))
            .await;
        assert_eq!(keys["apiKeys"], json!([]));
        let audit = server
            .gql_ok(
                Some(&b.access_token),
                "{ auditLog(first: 500) { edges { node { actor detail target } } } }",
                json!({}),
            )
            .await;
        assert!(
            !audit.to_string().contains("a.example"),
            "tenant A leaks into B's audit log: {audit}"
        );
        let roles = server
            .gql_ok(Some(&b.access_token), "{ roles { name } }", json!({}))
            .await;
        assert!(!roles.to_string().contains("a-only"));
        let tenant = server
            .gql_ok(Some(&b.access_token), "{ tenant { id } }", json!({}))
            .await;
        assert_eq!(tenant["tenant"]["id"], b.tenant_id.as_str());

        // Tenant A is untouched.
        let users = server
            .gql_ok(
                Some(&a.access_token),
                "{ users { edges { node { email status roles } } } }",
                json!({}),
            )
            .await;
        let member = users["users"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|edge| edge["node"]["email"] == "member@a.example")
            .unwrap();
        assert_eq!(member["node"]["status"], "ACTIVE");
        assert_eq!(member["node"]["roles"], json!(["viewer"]));
        let keys = server
            .gql_ok(
                Some(&a.access_token),
                "{ apiKeys { revokedAt } }",
                json!({}),
            )
            .await;
        assert_eq!(keys["apiKeys"][0]["revokedAt"], serde_json::Value::Null);
        server.stop().await;
    }
}

#[tokio::test]
async fn row_level_security_holds_even_when_a_query_forgets_the_tenant() {
    let Some(_) = postgres_admin_url() else {
        // This proof is about PostgreSQL's row-level security; SQLite has none, and its isolation
        // is covered by the store's tenant filters tested above.
        return;
    };
    let smtp = SmtpSink::start().await;
    let server = TestServer::start(Backend::Postgres, &smtp).await;
    let a = new_tenant(&server, &smtp, &slug("rls-a"), "owner@rls-a.example").await;
    let b = new_tenant(&server, &smtp, &slug("rls-b"), "owner@rls-b.example").await;

    // Through a tenant transaction of the store, as the non-owner service role.
    let store = api::store::Store::connect(&api::store::StoreOptions {
        url: server.db.service_url.clone(),
        max_connections: 2,
        min_connections: 1,
    })
    .await
    .unwrap();
    let tenant_a: domain::TenantId = a.tenant_id.parse().unwrap();
    let tx = store.read(tenant_a).await.unwrap();
    let emails = tx
        .raw_query_strings("SELECT email FROM users")
        .await
        .unwrap();
    assert_eq!(emails, ["owner@rls-a.example"]);
    let outbox = tx
        .raw_query_strings("SELECT to_address FROM email_outbox")
        .await
        .unwrap();
    assert_eq!(outbox, ["owner@rls-a.example"]);
    let tenants = tx
        .raw_query_strings("SELECT DISTINCT tenant_id FROM audit_log")
        .await
        .unwrap();
    assert_eq!(tenants, vec![a.tenant_id.clone()]);
    drop(tx);

    // Writing a row for another tenant is refused by the policy's WITH CHECK.
    let tx = store.begin(tenant_a).await.unwrap();
    let smuggle = tx
        .raw_query_strings(&format!(
            "INSERT INTO roles (tenant_id, name, permissions, built_in, created_at) VALUES ('{}', 'smuggled', '[]', false, now()) RETURNING name",
            b.tenant_id
        ))
        .await;
    assert!(
        smuggle.is_err(),
        "row-level security must refuse a row of another tenant"
    );
    drop(tx);

    // Without a tenant set, queries on tenant tables fail instead of returning anything.
    let raw = Database::connect(&server.db.service_url).await.unwrap();
    let unset = raw
        .query_all_raw(Statement::from_string(
            raw.get_database_backend(),
            "SELECT email FROM users",
        ))
        .await;
    assert!(unset.is_err(), "a query with no tenant set must fail");

    // The service role neither owns the tables nor bypasses row-level security.
    let role = raw
        .query_one_raw(Statement::from_string(
            raw.get_database_backend(),
            "SELECT rolbypassrls::text, rolsuper::text FROM pg_roles WHERE rolname = current_user",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(role.try_get_by_index::<String>(0).unwrap(), "false");
    assert_eq!(role.try_get_by_index::<String>(1).unwrap(), "false");
    let owned = raw
        .query_one_raw(Statement::from_string(
            raw.get_database_backend(),
            "SELECT count(*)::text FROM pg_tables WHERE schemaname = 'public' AND tableowner = current_user",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owned.try_get_by_index::<String>(0).unwrap(), "0");
    let unprotected = raw
        .query_all_raw(Statement::from_string(
            raw.get_database_backend(),
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND NOT (c.relrowsecurity AND c.relforcerowsecurity)",
        ))
        .await
        .unwrap();
    assert!(
        unprotected.is_empty(),
        "every table with tenant_id has forced row-level security"
    );
    // Partitions of a partitioned events table (ADR 0011) have no policies of their own: the
    // service reaches them only through `events`, whose policy applies, and may not name them.
    let reachable_partitions = raw
        .query_all_raw(Statement::from_string(
            raw.get_database_backend(),
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relispartition
               AND has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE')",
        ))
        .await
        .unwrap();
    assert!(
        reachable_partitions.is_empty(),
        "the service role has no privilege on a partition"
    );
    server.stop().await;
}
