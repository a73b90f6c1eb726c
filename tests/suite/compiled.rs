//! Compiled plans (ADR 0016): the hottest read shapes are answered without async-graphql's
//! executor. Two servers on one database, one with compiled plans and one without
//! (`CDP_GRAPHQL_COMPILED_PLANS=false`), must answer every request with the same status and the
//! same JSON (values, strings, numbers, nulls, errors), for a principal who may read personal
//! data, one who may not, and nobody; and the plans must really answer
//! the shapes they are for (counted by `cdp_graphql_compiled_total`), and leave every other
//! document, and every request they cannot answer exactly, to the schema.

use serde_json::{json, Value};

use crate::support::*;

/// The bench's `profile(id)` (`cdp-bench read`).
const PROFILE: &str = "query Profile($id: ID!) { profile(id: $id) { id traits \
    firstSeenAt lastSeenAt eventCount events(first: 20) { edges { node { id type name \
    properties timestamp } } } } }";

/// The bench's page.
const PAGE: &str = "query Profiles($after: String) { profiles(first: 50, after: $after) \
    { edges { node { id traits eventCount lastSeenAt } } pageInfo { hasNextPage endCursor } } }";

/// Every field a plan answers.
const EVERYTHING: &str = "query Everything($id: ID!) { profile(id: $id) { id traits channels \
    firstSeenAt lastSeenAt eventCount createdAt events(first: 5) { totalCount \
    pageInfo { hasNextPage endCursor } edges { cursor node { id profileId type name properties \
    context timestamp receivedAt messageId channel sourceId } } } } }";

/// The raw body of one GraphQL request, and its status.
async fn raw(server: &TestServer, token: Option<&str>, body: &Value) -> (u16, String) {
    let mut request = server.client.post(server.url("/graphql")).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    (status, response.text().await.expect("a body"))
}

fn compiled_count(server: &TestServer) -> u64 {
    server
        .app
        .as_ref()
        .expect("a running server")
        .state()
        .metrics
        .graphql_compiled_count()
}

#[tokio::test]
async fn compiled_plans_answer_what_the_schema_answers_and_only_what_they_can() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let compiled = TestServer::start(backend, &smtp).await;
        let schema = TestServer::start_on(compiled.db.clone(), Some(&smtp), |config| {
            config.graphql.compiled_plans = false;
        })
        .await;
        let owner = new_tenant(&compiled, &smtp, &slug("plans"), "owner@plans.example").await;
        let viewer = invited_user(
            &compiled,
            &smtp,
            &owner,
            "viewer@plans.example",
            &["viewer"],
        )
        .await;
        let key = write_key(&compiled, &owner, "site", "WEB").await;

        // A profile with personal traits, nested and non-ASCII values, floats and 26 events of
        // every kind; a second one (anonymous, merged into the first below); a third without
        // events of its own but its identify.
        let mut batch = vec![
            json!({"type": "identify", "userId": "p-1", "messageId": "p-1-identify",
            "timestamp": "2026-11-01T10:00:00.123456Z",
            "traits": {"email": "Ann@Plans.example", "phone": "+33 6 12 34 56 78", "plan": "pro",
                "score": 1.5, "ratio": 0.1, "big": 12345678901234_i64,
                "nested": {"list": [1, "a\"b\\c", null, true], "ünï": "çé ✓"}},
            "context": {"ip": "203.0.113.7", "locale": "fr-FR"}}),
        ];
        for n in 0..24 {
            batch.push(
                json!({"type": "track", "userId": "p-1", "event": format!("Viewed {n}"),
                "messageId": format!("p-1-{n}"),
                "timestamp": format!("2026-11-02T10:{n:02}:00Z"),
                "properties": {"n": n, "email": "ann@plans.example", "path": format!("/p/{n}"),
                    "price": 9.99, "tags": ["x", "y"]},
                "context": {"page": {"path": format!("/p/{n}")}, "userAgent": "test\u{1F600}"}}),
            );
        }
        batch.push(
            json!({"type": "page", "userId": "p-1", "name": "Home", "messageId": "p-1-page",
            "timestamp": "2026-11-03T00:00:00Z", "properties": {"title": "Home"}}),
        );
        batch.push(json!({"type": "identify", "anonymousId": "anon-9", "messageId": "anon-9-identify",
            "timestamp": "2026-11-01T09:00:00Z", "traits": {"plan": "free", "email": "anon@plans.example"}}));
        batch.push(
            json!({"type": "identify", "userId": "p-3", "messageId": "p-3-identify",
            "timestamp": "2026-11-04T00:00:00Z", "traits": {}}),
        );
        let (status, _) = collect(&compiled, "/v1/batch", &key, &json!({"batch": batch})).await;
        assert_eq!(status, 200);
        let anonymous = profile_by(&compiled, &owner.access_token, "anonymous_id", "anon-9").await;
        let anonymous_id = anonymous["id"].as_str().expect("an id").to_owned();
        let merge = json!({"type": "identify", "userId": "p-1", "anonymousId": "anon-9",
            "messageId": "p-1-merge", "timestamp": "2026-11-05T00:00:00Z"});
        let (status, _) = collect(&compiled, "/v1/batch", &key, &json!({"batch": [merge]})).await;
        assert_eq!(status, 200);
        let survivor = profile_by(&compiled, &owner.access_token, "user_id", "p-1").await;
        let id = survivor["id"].as_str().expect("an id").to_owned();
        let merged_id = [anonymous_id.as_str(), id.as_str()]
            .into_iter()
            .find(|candidate| {
                survivor["mergedIds"]
                    .as_array()
                    .expect("merged ids")
                    .iter()
                    .any(|m| m == candidate)
            })
            .expect("the anonymous profile was merged")
            .to_owned();
        let third = profile_by(&compiled, &owner.access_token, "user_id", "p-3").await;
        let third_id = third["id"].as_str().expect("an id").to_owned();

        // Cursors to page with, from the schema's own answers.
        let token = Some(owner.access_token.as_str());
        let first_events = compiled.gql_ok(token, EVERYTHING, json!({"id": id})).await;
        let event_cursor = first_events["profile"]["events"]["pageInfo"]["endCursor"].clone();
        assert!(event_cursor.is_string(), "{first_events:#}");
        let first_page = compiled
            .gql_ok(
                token,
                "{ profiles(first: 1) { pageInfo { endCursor } } }",
                json!({}),
            )
            .await;
        let page_cursor = first_page["profiles"]["pageInfo"]["endCursor"].clone();

        // (body, whether a plan answers it)
        let answered =
            |query: &str, variables: Value| json!({"query": query, "variables": variables});
        let cases: Vec<(Value, bool)> = vec![
            (answered(PROFILE, json!({"id": id})), true),
            (answered(EVERYTHING, json!({"id": id})), true),
            (answered(EVERYTHING, json!({"id": third_id})), true),
            // A merged id answers its survivor.
            (answered(PROFILE, json!({"id": merged_id})), true),
            (json!({"query": PROFILE, "variables": {"id": id}, "operationName": "Profile"}), true),
            // No such profile; not an id at all.
            (answered(PROFILE, json!({"id": "00000000-0000-4000-8000-000000000000"})), true),
            (answered(PROFILE, json!({"id": "not an id"})), true),
            (answered(&format!("{{ profile(id: \"{id}\") {{ id eventCount }} }}"), json!({})), true),
            (answered("query Two($a: ID!, $b: ID!) { first: profile(id: $a) { key: id traits } \
                second: profile(id: $b) { id events { totalCount edges { node { name } } } } }",
                json!({"a": id, "b": third_id})), true),
            (answered("query After($id: ID!, $after: String) { profile(id: $id) { \
                events(first: 3, after: $after) { edges { cursor node { name properties } } \
                pageInfo { hasNextPage endCursor } } } }",
                json!({"id": id, "after": event_cursor})), true),
            // Details without the context; the cursor of the last event alone.
            (answered("query($id: ID!) { profile(id: $id) { events(first: 4) { edges { node { id \
                receivedAt channel sourceId messageId } } } } }", json!({"id": id})), true),
            (answered("query($id: ID!) { profile(id: $id) { events(first: 2) { \
                pageInfo { endCursor } edges { node { id } } } } }", json!({"id": id})), true),
            (answered(PAGE, json!({"after": null})), true),
            (answered(PAGE, json!({})), true),
            (answered(PAGE, json!({"after": page_cursor})), true),
            (answered("{ profiles(first: 2) { totalCount edges { cursor node { id channels createdAt \
                events(first: 2) { totalCount edges { node { type name context receivedAt messageId \
                channel sourceId profileId } } } } } pageInfo { hasNextPage endCursor } } }", json!({})), true),
            (answered("query D($first: Int = 1) { profiles(first: $first) { edges { node { id } } } }", json!({})), true),
            (answered("query D($first: Int = 1) { profiles(first: $first) { edges { node { id } } } }", json!({"first": 3})), true),
            // Plans exist, but these requests are the schema's to answer: a size out of range
            // (BAD_USER_INPUT), an ID sent as a number, a missing variable, an operation name
            // the document does not hold.
            (answered("{ profiles(first: 501) { edges { node { id } } } }", json!({})), false),
            (answered(PROFILE, json!({"id": 5})), false),
            (answered(PROFILE, json!({})), false),
            (json!({"query": PROFILE, "variables": {"id": id}, "operationName": "Other"}), false),
            (answered(PROFILE, json!({"id": "a\u{0}b"})), false),
            // Documents without a plan: other fields, fragments, directives, filters, field
            // merging, invalid documents.
            (answered("query($id: ID!) { profile(id: $id) { __typename id } }", json!({"id": id})), false),
            (answered("query($id: ID!) { profile(id: $id) { ...F } } fragment F on Profile { id traits }", json!({"id": id})), false),
            (answered("query($id: ID!) { profile(id: $id) { id traits @include(if: true) } }", json!({"id": id})), false),
            (answered("query($id: ID!) { profile(id: $id) { id identities { kind value } } }", json!({"id": id})), false),
            (answered("{ profiles(first: 5, filter: {traitEquals: {plan: \"pro\"}}) { edges { node { id } } } }", json!({})), false),
            (answered("query($id: ID!) { profile(id: $id) { id } profile(id: $id) { id } }", json!({"id": id})), false),
            (answered("query($id: ID!) { profile(id: $id) { id nope } }", json!({"id": id})), false),
            (answered("query($id: ID!, $unused: Int) { profile(id: $id) { id } }", json!({"id": id})), false),
            (answered("query($id: ID) { profile(id: $id) { id } }", json!({"id": id})), false),
            (answered("{ profile(id: 5) { id } }", json!({})), false),
            (answered("{ profile { id } }", json!({})), false),
            (answered("{ profiles(first: 2) { a: edges { node { id events(first: 1) { edges { node { name } } } } } \
                b: edges { node { events(first: 2) { totalCount } } } } }", json!({})), false),
            (answered("{ profiles(first: 2) { edges { a: node { id } b: node { events { totalCount } } } } }", json!({})), false),
            (answered("{ profile(id: \"x\") }", json!({})), false),
        ];
        for (body, by_plan) in &cases {
            for (who, token) in [
                ("owner", Some(owner.access_token.as_str())),
                ("viewer", Some(viewer.access_token.as_str())),
                ("nobody", None),
            ] {
                let before = compiled_count(&compiled);
                let (status, answer) = raw(&compiled, token, body).await;
                let planned = compiled_count(&compiled) - before;
                let (expected_status, expected) = raw(&schema, token, body).await;
                // The same JSON; the order of an object's keys is not compared (see
                // `checked below).
                let parse = |text: &str| -> Value {
                    serde_json::from_str(text).unwrap_or_else(|_| panic!("JSON: {text}"))
                };
                assert_eq!(
                    (status, parse(&answer)),
                    (expected_status, parse(&expected)),
                    "[{backend:?}] {who}: {body}"
                );
                // Nobody is refused by the schema; the plans answer signed-in principals.
                let by_plan = *by_plan && token.is_some();
                assert_eq!(
                    planned,
                    u64::from(by_plan),
                    "[{backend:?}] {who}: {body}: {answer}"
                );
            }
        }

        // The cases answer what they should: not vacuous comparisons of two errors.
        let answer = compiled
            .gql(Some(&owner.access_token), EVERYTHING, json!({"id": id}))
            .await;
        let profile = &answer["data"]["profile"];
        assert_eq!(profile["traits"]["nested"]["ünï"], "çé ✓", "{answer:#}");
        assert_eq!(profile["traits"]["email"], "ann@plans.example");
        assert_eq!(profile["events"]["totalCount"], 28, "{answer:#}");
        assert_eq!(profile["events"]["edges"].as_array().map(Vec::len), Some(5));
        assert!(
            profile["events"]["edges"][0]["node"]["context"].is_object(),
            "{answer:#}"
        );
        let masked = compiled
            .gql(Some(&viewer.access_token), EVERYTHING, json!({"id": id}))
            .await;
        let masked_email = &masked["data"]["profile"]["traits"]["email"];
        assert!(
            masked_email.is_string() && masked_email != "ann@plans.example",
            "{masked:#}"
        );
        let merged = compiled
            .gql(Some(&owner.access_token), PROFILE, json!({"id": merged_id}))
            .await;
        assert_eq!(merged["data"]["profile"]["id"], id.as_str(), "{merged:#}");

        // The keys of every object come in the order of the selection, as GraphQL specifies
        // (async-graphql's executor writes them in the order its field futures complete).
        let (_, ordered) = raw(
            &compiled,
            Some(&owner.access_token),
            &answered(
                "{ profiles(first: 1) { totalCount edges { node { events(first: 1) { \
                    edges { node { name type } } totalCount pageInfo { endCursor hasNextPage } } \
                    id } cursor } pageInfo { hasNextPage } } }",
                json!({}),
            ),
        )
        .await;
        let keys: Vec<&str> = ordered
            .split('"')
            .filter(|part| {
                [
                    "totalCount",
                    "edges",
                    "node",
                    "events",
                    "name",
                    "type",
                    "pageInfo",
                    "endCursor",
                    "hasNextPage",
                    "id",
                    "cursor",
                ]
                .contains(part)
            })
            .collect();
        assert_eq!(
            keys,
            [
                "totalCount",
                "edges",
                "node",
                "events",
                "edges",
                "node",
                "name",
                "type",
                "totalCount",
                "pageInfo",
                "endCursor",
                "hasNextPage",
                "id",
                "cursor",
                "pageInfo",
                "hasNextPage"
            ],
            "{ordered}"
        );

        schema.stop().await;
        compiled.stop().await;
    }
}
