//! The read path over HTTP: a request made only of queries runs in one read transaction,
//! authentication included, and the fields of a list of profiles are batched.

use serde_json::{json, Value};

use crate::support::*;

const PROFILE: &str = "query Profile($id: ID!) { profile(id: $id) { id traits eventCount \
    stage segments { id } identities { kind value } consents { purpose } \
    events(first: 5) { edges { node { name } } } } }";

const PAGE: &str = "{ profiles(first: 50) { edges { node { id stage identities { kind } \
    consents { purpose } mergedIds groups { groupId } attributes { orderCount } \
    events(first: 2) { totalCount edges { node { name } } } } } } }";

/// The fewest tenant transactions and statements that one request took over five tries. The
/// queue workers poll in system transactions, which the transaction count leaves out (at the
/// tests' 50 ms interval one fell into a page request on a loaded machine); their statements
/// are counted, and the fewest of five tries leaves them out.
async fn fewest(server: &TestServer, token: &str, body: &Value) -> (u64, u64) {
    let store = &server.app.as_ref().expect("a running server").state().store;
    let mut fewest = (u64::MAX, u64::MAX);
    for _ in 0..5 {
        let (transactions, statements) = (store.transactions_begun(), store.statements_executed());
        let response = server
            .client
            .post(server.url("/graphql"))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.expect("JSON");
        assert!(answer.get("errors").is_none(), "{answer:#}");
        fewest.0 = fewest.0.min(store.transactions_begun() - transactions);
        fewest.1 = fewest.1.min(store.statements_executed() - statements);
    }
    fewest
}

#[tokio::test]
async fn a_query_request_reads_in_one_transaction_and_a_page_costs_what_one_profile_costs() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("reads"), "owner@reads.example").await;
        let key = write_key(&server, &owner, "site", "WEB").await;
        let mut batch = Vec::new();
        for n in 0..12 {
            batch.push(json!({"type": "identify", "userId": format!("r-{n}"),
                "traits": {"plan": "pro", "email": format!("r{n}@reads.example")}}));
            batch.push(json!({"type": "track", "userId": format!("r-{n}"), "event": "Viewed"}));
            batch.push(json!({"type": "group", "userId": format!("r-{n}"), "groupId": "acme"}));
        }
        let (status, _) = collect(&server, "/v1/batch", &key, &json!({"batch": batch})).await;
        assert_eq!(status, 200);
        let profile = profile_by(&server, &owner.access_token, "user_id", "r-3").await;
        let id = profile["id"].as_str().expect("an id").to_owned();

        // A named operation without `operationName`, as most clients send it.
        let one = json!({"query": PROFILE, "variables": {"id": id}});
        let (transactions, statements) = fewest(&server, &owner.access_token, &one).await;
        assert_eq!(
            transactions, 1,
            "[{backend:?}] profile(id) with its fields began {transactions} transactions"
        );

        // Each field of a list of twelve profiles is one batch; and it all shares the request's
        // one transaction.
        let page = json!({"query": PAGE});
        let (page_transactions, page_statements) =
            fewest(&server, &owner.access_token, &page).await;
        assert_eq!(
            page_transactions, 1,
            "[{backend:?}] a page began {page_transactions}"
        );
        // One statement per field and profile would be a hundred more (12 profiles, 8 fields);
        // the margin leaves room for a round of the queue workers' polls.
        assert!(
            page_statements <= statements + 20,
            "[{backend:?}] a page of 12 ran {page_statements} statements, one profile {statements}"
        );

        // A mutation is not a read: its use cases keep their own transactions.
        let mutation = json!({"query": "mutation { track(input: {userId: \"r-3\", event: \"Clicked\"}) { id } }"});
        let (mutation_transactions, _) = fewest(&server, &owner.access_token, &mutation).await;
        assert!(
            mutation_transactions >= 2,
            "[{backend:?}] {mutation_transactions}"
        );
        server.stop().await;
    }
}

/// An event's context is read only when it is selected, and then read whole: for one profile,
/// for a list of profiles (the batched first page) and for a page after a cursor alike. The
/// other fields do not depend on whether it is selected.
#[tokio::test]
async fn an_event_context_is_answered_when_selected_and_the_rest_alike_without_it() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("ctx"), "owner@ctx.example").await;
        let key = write_key(&server, &owner, "site", "WEB").await;
        let batch: Vec<Value> = (0..4)
            .map(|n| {
                json!({"type": "track", "userId": "c-1", "event": format!("Step {n}"),
                    "messageId": format!("ctx-{n}"),
                    "timestamp": format!("2026-11-0{}T00:00:00Z", n + 1),
                    "properties": {"n": n},
                    "context": {"ip": "203.0.113.9", "page": {"path": format!("/step/{n}")},
                        "library": {"name": "analytics.js", "version": "5.0.0"}}})
            })
            .collect();
        let (status, _) = collect(&server, "/v1/batch", &key, &json!({"batch": batch})).await;
        assert_eq!(status, 200);
        let token = Some(owner.access_token.as_str());
        let id = profile_by(&server, &owner.access_token, "user_id", "c-1").await["id"]
            .as_str()
            .expect("an id")
            .to_owned();

        let node = |with_context: bool| {
            if with_context {
                "id name properties timestamp context"
            } else {
                "id name properties timestamp"
            }
        };
        let nodes = |page: &Value| -> Vec<Value> {
            page["edges"]
                .as_array()
                .expect("edges")
                .iter()
                .map(|edge| edge["node"].clone())
                .collect()
        };
        let check = |label: &str, with: Vec<Value>, without: Vec<Value>, paths: &[usize]| {
            assert_eq!(with.len(), paths.len(), "[{backend:?}] {label}: {with:#?}");
            for ((event, plain), n) in with.iter().zip(&without).zip(paths) {
                assert_eq!(
                    event["context"]["ip"], "203.0.113.9",
                    "[{backend:?}] {label}"
                );
                assert_eq!(event["context"]["page"]["path"], format!("/step/{n}"));
                assert_eq!(event["context"]["library"]["name"], "analytics.js");
                assert_eq!(event["properties"]["n"], *n, "[{backend:?}] {label}");
                let mut stripped = event.clone();
                stripped
                    .as_object_mut()
                    .expect("an object")
                    .remove("context");
                assert_eq!(&stripped, plain, "[{backend:?}] {label}");
            }
        };

        // One profile: its first page.
        let one = |with: bool| {
            format!(
                "query($id: ID!) {{ profile(id: $id) {{ events(first: 3) {{ edges {{ node {{ {} }} }} pageInfo {{ endCursor }} }} }} }}",
                node(with)
            )
        };
        let with = server.gql_ok(token, &one(true), json!({"id": id})).await;
        let without = server.gql_ok(token, &one(false), json!({"id": id})).await;
        let first = &with["profile"]["events"];
        check(
            "profile(id)",
            nodes(first),
            nodes(&without["profile"]["events"]),
            &[3, 2, 1],
        );

        // A list of profiles: the batched first pages.
        let list = |with: bool| {
            format!(
                "{{ profiles(first: 10) {{ edges {{ node {{ events(first: 3) {{ edges {{ node {{ {} }} }} }} }} }} }} }}",
                node(with)
            )
        };
        let with_list = server.gql_ok(token, &list(true), json!({})).await;
        let without_list = server.gql_ok(token, &list(false), json!({})).await;
        check(
            "profiles",
            nodes(&with_list["profiles"]["edges"][0]["node"]["events"]),
            nodes(&without_list["profiles"]["edges"][0]["node"]["events"]),
            &[3, 2, 1],
        );

        // The page after a cursor.
        let after = |with: bool| {
            format!(
                "query($id: ID!, $after: String) {{ profile(id: $id) {{ events(first: 3, after: $after) {{ edges {{ node {{ {} }} }} }} }} }}",
                node(with)
            )
        };
        let cursor = first["pageInfo"]["endCursor"].clone();
        let variables = json!({"id": id, "after": cursor});
        let with_after = server.gql_ok(token, &after(true), variables.clone()).await;
        let without_after = server.gql_ok(token, &after(false), variables).await;
        check(
            "events after a cursor",
            nodes(&with_after["profile"]["events"]),
            nodes(&without_after["profile"]["events"]),
            &[0],
        );
        server.stop().await;
    }
}

/// The same document sent again is answered from the process's parse of it, exactly as the
/// first time; a document with a syntax error is not kept and is refused every time.
#[tokio::test]
async fn a_repeated_document_answers_alike_and_a_broken_one_is_refused_each_time() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("docs"), "owner@docs.example").await;
        let token = Some(owner.access_token.as_str());
        let documents = &api::graphql::transport::Caches::of(
            server.app.as_ref().expect("a running server").schema(),
        )
        .documents;
        let query = "query Me { me { user { email } } }";
        let kept = documents.len();
        let first = server.gql_ok(token, query, json!({})).await;
        assert_eq!(documents.len(), kept + 1, "[{backend:?}]");
        let again = server.gql_ok(token, query, json!({})).await;
        assert_eq!(first, again);
        assert_eq!(first["me"]["user"]["email"], "owner@docs.example");
        assert_eq!(documents.len(), kept + 1, "[{backend:?}]");

        let broken = "query Me { me { user { email } }";
        for _ in 0..2 {
            let answer = server.gql(token, broken, json!({})).await;
            let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
            assert!(message.contains("expected"), "[{backend:?}] {answer:#}");
            assert_eq!(documents.len(), kept + 1, "[{backend:?}]");
        }
        server.stop().await;
    }
}

/// The reads that answer profiles (`profile(id)`, `profileByIdentity`, `profiles`) skip the
/// trait clock: their rows equal the full ones but for it, and the clock the write path merges
/// by is intact after them (a late message with an older timestamp still loses).
#[tokio::test]
async fn profile_reads_skip_the_trait_clock_and_leave_it_intact() {
    use api::store::profiles;
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let owner = new_tenant(&server, &smtp, &slug("clock"), "owner@clock.example").await;
        let key = write_key(&server, &owner, "site", "WEB").await;
        // Sends one identify of k-1 and returns k-1's profile as read afterwards.
        let identify = |plan: &'static str, at: &'static str, id: &'static str| {
            let (server, key, token) = (&server, &key, &owner.access_token);
            async move {
                let message = json!({"type": "identify", "userId": "k-1",
                    "traits": {"plan": plan, "seats": 3}, "timestamp": at, "messageId": id});
                let (status, _) =
                    collect(server, "/v1/batch", key, &json!({"batch": [message]})).await;
                assert_eq!(status, 200);
                profile_by(server, token, "user_id", "k-1").await
            }
        };
        let first = identify("pro", "2026-11-20T00:00:00Z", "k-a").await;
        let token = Some(owner.access_token.as_str());
        let id = first["id"].as_str().expect("an id").to_owned();
        // The three reads over HTTP.
        let read = server
            .gql_ok(
                token,
                "query($id: ID!) { profile(id: $id) { traits } profiles(first: 5) { edges { node { traits } } } }",
                json!({"id": id}),
            )
            .await;
        assert_eq!(read["profile"]["traits"]["plan"], "pro", "[{backend:?}]");
        assert_eq!(
            read["profiles"]["edges"][0]["node"]["traits"]["plan"],
            "pro"
        );

        // In the store: the shown rows are the full row without its clock.
        let state = server.app.as_ref().expect("a running server").state();
        let tenant_id = domain::TenantId(owner.tenant_id.parse().expect("a tenant id"));
        let profile_id: uuid::Uuid = id.parse().expect("a profile id");
        let tx = state.store.read(tenant_id).await.expect("a read");
        let full = profiles::get_resolved(&tx, profile_id)
            .await
            .expect("read")
            .expect("the profile");
        assert!(
            full.trait_clock.get("plan").is_some(),
            "[{backend:?}] the full row carries the clock: {:?}",
            full.trait_clock
        );
        let shown = profiles::get_resolved_shown(&tx, profile_id)
            .await
            .expect("read")
            .expect("the profile");
        let (page, _) = profiles::page(
            &tx,
            state.store.backend(),
            &profiles::ProfileFilter::default(),
            None,
            10,
            false,
        )
        .await
        .expect("a page");
        drop(tx);
        let without_clock = profiles::ProfileRow {
            trait_clock: json!({}),
            ..full.clone()
        };
        assert_eq!(shown, without_clock, "[{backend:?}]");
        assert_eq!(page, vec![without_clock], "[{backend:?}]");

        // After the reads, an older message still loses to the newer value, a newer one wins.
        let after = identify("free", "2026-11-10T00:00:00Z", "k-b").await;
        assert_eq!(after["traits"]["plan"], "pro", "[{backend:?}] {after:#}");
        let last = identify("team", "2026-11-25T00:00:00Z", "k-c").await;
        assert_eq!(last["traits"]["plan"], "team", "[{backend:?}] {last:#}");
        server.stop().await;
    }
}
