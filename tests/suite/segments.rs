//! Segments and lifecycle stages over real HTTP on both databases: validation, builds, real-time
//! membership, time windows driven by the scheduler with a manual clock, the lifecycle model and
//! tenant isolation.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};

use crate::support::*;

const SEGMENT_FIELDS: &str =
    "id name description condition status timeDependent size createdAt updatedAt";

/// The manual clock starts at the real time: access tokens are checked against the system clock
/// too, and moving the manual clock forward only moves their expiry further away.
fn start_time() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(0)
}

struct Env {
    server: TestServer,
    owner: Session,
    key: String,
    clock: Arc<ManualClock>,
    smtp: SmtpSink,
}

async fn setup(backend: Backend, name: &str) -> Env {
    let smtp = SmtpSink::start().await;
    let clock = Arc::new(ManualClock::new(start_time()));
    let db = TestDb::create(backend).await;
    let server = TestServer::start_with_clock(db, Some(&smtp), |_| {}, clock.clone()).await;
    let owner = new_tenant(
        &server,
        &smtp,
        &slug(name),
        &format!("owner@{name}.example"),
    )
    .await;
    let key = write_key(&server, &owner, name, "SERVER").await;
    Env {
        server,
        owner,
        key,
        clock,
        smtp,
    }
}

impl Env {
    fn token(&self) -> Option<&str> {
        Some(&self.owner.access_token)
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    async fn send(&self, messages: Value) {
        let (status, body) = collect(
            &self.server,
            "/v1/batch",
            &self.key,
            &json!({ "batch": messages }),
        )
        .await;
        assert_eq!(
            (status, body),
            (200, json!({"success": true})),
            "[{:?}]",
            self.server.backend
        );
    }

    async fn create_segment(&self, name: &str, condition: Value) -> Value {
        let data = self
            .server
            .gql_ok(
                self.token(),
                &format!("mutation($input: SegmentInput!) {{ createSegment(input: $input) {{ {SEGMENT_FIELDS} }} }}"),
                json!({"input": {"name": name, "condition": condition}}),
            )
            .await;
        data["createSegment"].clone()
    }

    async fn segment(&self, id: &str) -> Value {
        self.server
            .gql_ok(
                self.token(),
                &format!(
                    "query($id: ID!) {{ segment(id: $id) {{ {SEGMENT_FIELDS}
                        members(first: 100) {{ totalCount edges {{ node {{ id }} }} }} }} }}"
                ),
                json!({"id": id}),
            )
            .await["segment"]
            .clone()
    }

    /// The profile of a user id with its stage, segments, transitions and segment history.
    async fn profile(&self, user_id: &str) -> Value {
        self.server
            .gql_ok(
                self.token(),
                "query($v: String!) { profileByIdentity(kind: \"user_id\", value: $v) {
                    id stage segments { id name }
                    attributes { orderCount totalRevenue }
                    lifecycleTransitions { from to at reason }
                    segmentHistory { segmentId entered at reason }
                } }",
                json!({"v": user_id}),
            )
            .await["profileByIdentity"]
            .clone()
    }

    async fn tick(&self) {
        let app = self.server.app.as_ref().unwrap();
        let report = api::jobs::scheduler::tick(app.state()).await.unwrap();
        assert_eq!(report.failed_tenants, 0, "{report:?}");
    }
}

fn segment_ids(profile: &Value) -> Vec<String> {
    let mut ids: Vec<String> = profile["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|segment| segment["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

fn track(user: &str, event: &str, at: DateTime<Utc>, properties: Value) -> Value {
    json!({"type": "track", "userId": user, "event": event, "properties": properties,
           "timestamp": at.to_rfc3339(), "messageId": uuid::Uuid::new_v4().to_string()})
}

fn identify(user: &str, traits: Value, at: DateTime<Utc>) -> Value {
    json!({"type": "identify", "userId": user, "traits": traits,
           "timestamp": at.to_rfc3339(), "messageId": uuid::Uuid::new_v4().to_string()})
}

#[tokio::test]
async fn bad_conditions_are_refused_with_the_path_of_the_first_bad_node() {
    for backend in backends() {
        let env = setup(backend, "segval").await;
        let cases = [
            (
                json!({"all": [{"trait": "plan", "op": "eq", "value": "pro"}, {"trait": "x", "op": "bigger", "value": 1}]}),
                "condition.all[1].op",
            ),
            (
                json!({"any": [{"consent": "email", "extra": 1}]}),
                "condition.any[0].extra",
            ),
            (
                json!({"event": "Order Completed", "within": "thirty days"}),
                "condition.within",
            ),
            (json!({"nope": 1}), "condition"),
        ];
        for (condition, field) in cases {
            for query in [
                "mutation($c: JSON!) { createSegment(input: {name: \"x\", condition: $c}) { id } }",
                "query($c: JSON!) { previewSegment(condition: $c) { size } }",
            ] {
                let response = env
                    .server
                    .gql(env.token(), query, json!({"c": condition}))
                    .await;
                assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
                assert_eq!(
                    response["errors"][0]["extensions"]["field"], field,
                    "[{backend:?}] {condition}: {response}"
                );
            }
        }
        // Nothing was stored.
        let data = env
            .server
            .gql_ok(env.token(), "{ segments { id } }", json!({}))
            .await;
        assert_eq!(data["segments"], json!([]));
        let response = env
            .server
            .gql(
                env.token(),
                "mutation { createSegment(input: {name: \" \", condition: {all: []}}) { id } }",
                json!({}),
            )
            .await;
        assert_eq!(response["errors"][0]["extensions"]["field"], "name");
        env.server.stop().await;
    }
}

#[tokio::test]
async fn a_segment_is_built_from_existing_data_and_rebuilt_when_its_condition_changes() {
    for backend in backends() {
        let env = setup(backend, "segbuild").await;
        let now = env.now();
        env.send(json!([
            identify(
                "u1",
                json!({"plan": "pro", "email": "u1@segbuild.example"}),
                now
            ),
            identify("u2", json!({"plan": "free"}), now),
            identify("u3", json!({"plan": "pro"}), now),
            track("u1", "Order Completed", now, json!({"revenue": 120})),
            track("u1", "Order Completed", now, json!({"revenue": 30})),
            track("u2", "Order Completed", now, json!({"revenue": 500})),
        ]))
        .await;
        let preview = env
            .server
            .gql_ok(
                env.token(),
                "query($c: JSON!) { previewSegment(condition: $c) { size sample { id } } }",
                json!({"c": {"trait": "plan", "op": "eq", "value": "pro"}}),
            )
            .await;
        assert_eq!(preview["previewSegment"]["size"], 2);
        assert_eq!(
            preview["previewSegment"]["sample"]
                .as_array()
                .unwrap()
                .len(),
            2
        );

        let segment = env
            .create_segment("Pro", json!({"trait": "plan", "op": "eq", "value": "pro"}))
            .await;
        assert_eq!(segment["status"], "READY");
        assert_eq!(segment["size"], 2);
        assert_eq!(segment["timeDependent"], false);
        let id = segment["id"].as_str().unwrap().to_owned();
        let u1 = env.profile("u1").await;
        let u2 = env.profile("u2").await;
        assert_eq!(segment_ids(&u1), vec![id.clone()]);
        assert_eq!(segment_ids(&u2), Vec::<String>::new());
        // The first build finds members; it records no entries.
        assert_eq!(u1["segmentHistory"], json!([]));

        // Profiles filter by segment.
        let filtered = env
            .server
            .gql_ok(
                env.token(),
                "query($s: ID!) { profiles(filter: {segmentId: $s}) { totalCount } }",
                json!({"s": id}),
            )
            .await;
        assert_eq!(filtered["profiles"]["totalCount"], 2);

        // A new condition: "ordered at least twice" (u1 only).
        let data = env
            .server
            .gql_ok(
                env.token(),
                &format!("mutation($id: ID!, $input: SegmentInput!) {{ updateSegment(id: $id, input: $input) {{ {SEGMENT_FIELDS} }} }}"),
                json!({"id": id, "input": {"name": "Repeat buyers", "condition":
                    {"event": "Order Completed", "count": {"gte": 2}}}}),
            )
            .await;
        assert_eq!(data["updateSegment"]["status"], "READY");
        assert_eq!(data["updateSegment"]["size"], 1);
        let members = env.segment(&id).await;
        assert_eq!(members["members"]["totalCount"], 1);
        assert_eq!(members["members"]["edges"][0]["node"]["id"], u1["id"]);
        let u3 = env.profile("u3").await;
        assert_eq!(segment_ids(&u3), Vec::<String>::new());
        assert_eq!(u3["segmentHistory"][0]["entered"], false);
        assert_eq!(
            u3["segmentHistory"][0]["reason"],
            "segment condition changed"
        );

        let data = env
            .server
            .gql_ok(
                env.token(),
                "mutation($id: ID!) { deleteSegment(id: $id) }",
                json!({"id": id}),
            )
            .await;
        assert_eq!(data["deleteSegment"], true);
        assert_eq!(env.segment(&id).await, Value::Null);
        assert_eq!(segment_ids(&env.profile("u1").await), Vec::<String>::new());
        env.server.stop().await;
    }
}

#[tokio::test]
async fn a_new_event_makes_a_profile_enter_a_segment_before_the_response_returns() {
    for backend in backends() {
        let env = setup(backend, "segrt").await;
        let now = env.now();
        let segment = env
            .create_segment(
                "Ordered twice in 30 days",
                json!({"event": "Order Completed", "count": {"gte": 2}, "within": "30d"}),
            )
            .await;
        let id = segment["id"].as_str().unwrap().to_owned();
        let vip = env
            .create_segment(
                "Pro with consent",
                json!({"all": [{"trait": "plan", "op": "eq", "value": "pro"}, {"consent": "email_marketing"}]}),
            )
            .await;
        let vip_id = vip["id"].as_str().unwrap().to_owned();
        env.send(json!([track(
            "u1",
            "Order Completed",
            now,
            json!({"revenue": 10})
        )]))
        .await;
        assert_eq!(segment_ids(&env.profile("u1").await), Vec::<String>::new());
        env.send(json!([track(
            "u1",
            "Order Completed",
            now,
            json!({"revenue": 20})
        )]))
        .await;
        // The response above came after the commit, which held the membership.
        let u1 = env.profile("u1").await;
        assert_eq!(segment_ids(&u1), vec![id.clone()]);
        let entry = &u1["segmentHistory"][0];
        assert_eq!(entry["segmentId"], id);
        assert_eq!(entry["entered"], true);
        assert!(
            entry["reason"]
                .as_str()
                .unwrap()
                .contains("Order Completed"),
            "{entry}"
        );

        // Traits and consent: enters when both hold, leaves when one stops holding.
        env.send(json!([identify("u1", json!({"plan": "pro"}), now)]))
            .await;
        assert!(!segment_ids(&env.profile("u1").await).contains(&vip_id));
        env.send(
            json!([{"type": "identify", "userId": "u1", "messageId": "consent-1",
            "timestamp": now.to_rfc3339(),
            "context": {"consent": {"categoryPreferences": {"email_marketing": true}}}}]),
        )
        .await;
        assert!(segment_ids(&env.profile("u1").await).contains(&vip_id));
        env.send(json!([identify(
            "u1",
            json!({"plan": "free"}),
            now + Duration::seconds(1)
        )]))
        .await;
        let u1 = env.profile("u1").await;
        assert!(!segment_ids(&u1).contains(&vip_id));
        env.server.stop().await;
    }
}

#[tokio::test]
async fn a_profile_leaves_a_within_segment_after_the_window_with_no_new_data() {
    for backend in backends() {
        let env = setup(backend, "segtime").await;
        let start = env.now();
        let segment = env
            .create_segment(
                "Active in the last 7 days",
                json!({"event": "$any", "within": "7d"}),
            )
            .await;
        assert_eq!(segment["timeDependent"], true);
        let id = segment["id"].as_str().unwrap().to_owned();
        env.send(json!([track("u1", "Page Viewed", start, json!({}))]))
            .await;
        assert_eq!(segment_ids(&env.profile("u1").await), vec![id.clone()]);

        // Just inside the window: a tick changes nothing.
        env.clock
            .set(start + Duration::days(7) - Duration::seconds(1));
        env.tick().await;
        assert_eq!(segment_ids(&env.profile("u1").await), vec![id.clone()]);

        // Past the boundary, with no new data: the next tick takes the profile out.
        env.clock
            .set(start + Duration::days(7) + Duration::seconds(1));
        env.tick().await;
        let u1 = env.profile("u1").await;
        assert_eq!(segment_ids(&u1), Vec::<String>::new());
        let exit = &u1["segmentHistory"][0];
        assert_eq!(exit["entered"], false);
        assert_eq!(exit["reason"], "time passed");
        let data = env
            .server
            .gql_ok(
                env.token(),
                "query($id: ID!) { segment(id: $id) { size } }",
                json!({"id": id}),
            )
            .await;
        assert_eq!(data["segment"]["size"], 0);
        // A second tick finds nothing more to do.
        env.tick().await;
        assert_eq!(
            env.profile("u1").await["segmentHistory"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        env.server.stop().await;
    }
}

#[tokio::test]
async fn the_default_lifecycle_model_moves_profiles_and_records_transitions() {
    for backend in backends() {
        let env = setup(backend, "stages").await;
        let start = env.now();
        let model = env
            .server
            .gql_ok(
                env.token(),
                "{ lifecycleModel { key name position condition } }",
                json!({}),
            )
            .await;
        let keys: Vec<&str> = model["lifecycleModel"]
            .as_array()
            .unwrap()
            .iter()
            .map(|stage| stage["key"].as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "acquisition",
                "activation",
                "growth",
                "retention",
                "dormant"
            ]
        );

        env.send(json!([identify("u1", json!({"plan": "free"}), start)]))
            .await;
        assert_eq!(env.profile("u1").await["stage"], "acquisition");
        env.send(json!([track(
            "u1",
            "Order Completed",
            start,
            json!({"revenue": 50})
        )]))
        .await;
        assert_eq!(env.profile("u1").await["stage"], "activation");
        env.send(json!([
            track("u1", "Order Completed", start, json!({"revenue": 60})),
            track("u1", "Order Completed", start, json!({"total": 70})),
        ]))
        .await;
        let u1 = env.profile("u1").await;
        assert_eq!(u1["stage"], "growth");
        // Ingestion kept the order totals: revenue 50 + 60, then `total` 70.
        assert_eq!(u1["attributes"]["orderCount"], 3);
        assert_eq!(u1["attributes"]["totalRevenue"], 180.0);
        let transitions: Vec<(Value, Value)> = u1["lifecycleTransitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["from"].clone(), t["to"].clone()))
            .collect();
        assert_eq!(
            transitions,
            vec![
                (json!("activation"), json!("growth")),
                (json!("acquisition"), json!("activation")),
                (Value::Null, json!("acquisition")),
            ]
        );

        // A profile whose first batch holds its orders is written in the stage they give, with
        // one transition into it (the stage is decided before the profile's row is written).
        env.send(json!([
            identify("u2", json!({"plan": "pro"}), start),
            track("u2", "Order Completed", start, json!({"revenue": 10})),
            track("u2", "Order Completed", start, json!({"revenue": 20})),
            track("u2", "Order Completed", start, json!({"revenue": 30})),
        ]))
        .await;
        let u2 = env.profile("u2").await;
        assert_eq!(u2["stage"], "growth");
        assert_eq!(u2["attributes"]["orderCount"], 3);
        assert_eq!(u2["attributes"]["totalRevenue"], 60.0);
        let transitions = u2["lifecycleTransitions"].as_array().unwrap();
        assert_eq!(transitions.len(), 1, "{transitions:?}");
        assert_eq!(transitions[0]["from"], Value::Null);
        assert_eq!(transitions[0]["to"], "growth");
        assert_eq!(
            transitions[0]["reason"],
            "profile created or merged; events: Order Completed; traits: plan"
        );

        // Silence: after 90 days without data the scheduler moves the profiles to dormant.
        env.clock.set(start + Duration::days(91));
        env.tick().await;
        let u1 = env.profile("u1").await;
        assert_eq!(u1["stage"], "dormant");
        assert_eq!(u1["lifecycleTransitions"][0]["reason"], "time passed");
        let distribution = env
            .server
            .gql_ok(
                env.token(),
                "{ lifecycleDistribution { stage count } }",
                json!({}),
            )
            .await;
        let dormant = distribution["lifecycleDistribution"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["stage"] == "dormant")
            .unwrap()
            .clone();
        assert_eq!(dormant["count"], 2);
        let by_stage = env
            .server
            .gql_ok(
                env.token(),
                "{ profiles(filter: {stage: \"dormant\"}) { totalCount } }",
                json!({}),
            )
            .await;
        assert_eq!(by_stage["profiles"]["totalCount"], 2);
        env.server.stop().await;
    }
}

#[tokio::test]
async fn a_custom_lifecycle_model_is_validated_and_replaces_the_default() {
    for backend in backends() {
        let env = setup(backend, "custom").await;
        let now = env.now();
        env.send(json!([
            identify("u1", json!({"plan": "pro"}), now),
            identify("u2", json!({"plan": "free"}), now),
        ]))
        .await;
        let set = "mutation($s: [LifecycleStageInput!]!) { setLifecycleModel(stages: $s) { key position } }";
        let response = env
            .server
            .gql(
                env.token(),
                set,
                json!({"s": [
                    {"key": "paying", "name": "Paying", "condition": {"trait": "plan", "op": "eq", "value": "pro"}},
                    {"key": "other", "name": "Other", "condition": {"all": [{"trait": "plan", "op": "around"}]}},
                ]}),
            )
            .await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT");
        assert_eq!(
            response["errors"][0]["extensions"]["field"],
            "stages[1].condition.all[0].op"
        );
        // The default model is still in force.
        assert_eq!(env.profile("u1").await["stage"], "acquisition");

        let data = env
            .server
            .gql_ok(
                env.token(),
                set,
                json!({"s": [
                    {"key": "paying", "name": "Paying", "condition": {"trait": "plan", "op": "eq", "value": "pro"}},
                    {"key": "trying", "name": "Trying", "condition": {"trait": "plan", "op": "exists"}},
                ]}),
            )
            .await;
        assert_eq!(
            data["setLifecycleModel"],
            json!([{"key": "paying", "position": 0}, {"key": "trying", "position": 1}])
        );
        let u1 = env.profile("u1").await;
        assert_eq!(u1["stage"], "paying");
        assert_eq!(u1["lifecycleTransitions"][0]["from"], "acquisition");
        assert_eq!(
            u1["lifecycleTransitions"][0]["reason"],
            "lifecycle model changed"
        );
        assert_eq!(env.profile("u2").await["stage"], "trying");

        // Real time under the new model, and a segment on the stage follows the stage.
        let paying = env
            .create_segment("Paying", json!({"stage": "paying"}))
            .await;
        let paying_id = paying["id"].as_str().unwrap().to_owned();
        assert_eq!(paying["size"], 1);
        env.send(json!([identify(
            "u2",
            json!({"plan": "pro"}),
            now + Duration::seconds(1)
        )]))
        .await;
        let u2 = env.profile("u2").await;
        assert_eq!(u2["stage"], "paying");
        assert_eq!(segment_ids(&u2), vec![paying_id]);
        let distribution = env
            .server
            .gql_ok(
                env.token(),
                "{ lifecycleDistribution { stage count } }",
                json!({}),
            )
            .await;
        assert_eq!(
            distribution["lifecycleDistribution"],
            json!([{"stage": "paying", "count": 2}, {"stage": "trying", "count": 0}])
        );
        env.server.stop().await;
    }
}

#[tokio::test]
async fn segments_and_memberships_belong_to_one_tenant() {
    for backend in backends() {
        let env = setup(backend, "segiso").await;
        let now = env.now();
        env.send(json!([identify("u1", json!({"plan": "pro"}), now)]))
            .await;
        let segment = env
            .create_segment("Pro", json!({"trait": "plan", "op": "eq", "value": "pro"}))
            .await;
        let id = segment["id"].as_str().unwrap().to_owned();

        // A second tenant on the same server, with the same kind of data.
        let other = new_tenant(
            &env.server,
            &env.smtp,
            &slug("segiso2"),
            "owner@segiso2.example",
        )
        .await;
        let other_server = &env.server;
        let other_key = write_key(other_server, &other, "other", "SERVER").await;
        let (status, _) = collect(
            other_server,
            "/v1/batch",
            &other_key,
            &json!({"batch": [identify("u1", json!({"plan": "pro"}), now)]}),
        )
        .await;
        assert_eq!(status, 200);
        let token = Some(other.access_token.as_str());
        let data = other_server
            .gql_ok(token, "{ segments { id } }", json!({}))
            .await;
        assert_eq!(data["segments"], json!([]));
        let data = other_server
            .gql_ok(
                token,
                "query($id: ID!) { segment(id: $id) { id } }",
                json!({"id": id}),
            )
            .await;
        assert_eq!(data["segment"], Value::Null);
        let response = other_server
            .gql(
                token,
                "mutation($id: ID!) { deleteSegment(id: $id) }",
                json!({"id": id}),
            )
            .await;
        assert_eq!(error_code(&response), "NOT_FOUND");
        let data = other_server
            .gql_ok(
                token,
                "query($s: ID!) { profiles(filter: {segmentId: $s}) { totalCount } }",
                json!({"s": id}),
            )
            .await;
        assert_eq!(data["profiles"]["totalCount"], 0);
        // The owner's segment still has exactly its own member.
        assert_eq!(env.segment(&id).await["members"]["totalCount"], 1);
        env.server.stop().await;
    }
}

#[tokio::test]
async fn a_merge_takes_the_merged_profile_out_and_every_change_is_published_after_commit() {
    for backend in backends() {
        let env = setup(backend, "segmerge").await;
        let now = env.now();
        let segment = env
            .create_segment("Visitors", json!({"event": "Page Viewed"}))
            .await;
        let id = segment["id"].as_str().unwrap().to_owned();
        let mut notices = env.server.app.as_ref().unwrap().state().bus.subscribe();
        // u1 first, so that it is the older profile and survives the merge below.
        env.send(json!([
            {"type": "identify", "userId": "u1", "traits": {"plan": "pro"},
             "timestamp": now.to_rfc3339(), "messageId": "id-1"},
        ]))
        .await;
        env.send(json!([
            {"type": "track", "anonymousId": "anon-1", "event": "Page Viewed",
             "timestamp": now.to_rfc3339(), "messageId": "pv-1"},
        ]))
        .await;
        // Two profiles; only the visitor is a member. Its entry was published with its stage.
        let mut entered = Vec::new();
        while let Ok(notice) = notices.try_recv() {
            if let api::service::bus::Notice::SegmentMembership {
                segment_id,
                profile_id,
                entered: true,
                ..
            } = notice
            {
                entered.push((segment_id.to_string(), profile_id));
            }
        }
        assert_eq!(entered.len(), 1, "[{backend:?}] {entered:?}");
        assert_eq!(entered[0].0, id);
        let visitor = entered[0].1.to_string();

        // The visitor identifies as u1: the younger profile merges into the older one.
        env.send(json!([
            {"type": "identify", "userId": "u1", "anonymousId": "anon-1",
             "timestamp": now.to_rfc3339(), "messageId": "id-2"},
        ]))
        .await;
        let u1 = env.profile("u1").await;
        assert_eq!(segment_ids(&u1), vec![id.clone()], "[{backend:?}]");
        let members = env.segment(&id).await;
        assert_eq!(members["members"]["totalCount"], 1);
        assert_eq!(members["members"]["edges"][0]["node"]["id"], u1["id"]);
        let mut changes = Vec::new();
        while let Ok(notice) = notices.try_recv() {
            if let api::service::bus::Notice::SegmentMembership {
                profile_id,
                entered,
                reason,
                ..
            } = notice
            {
                changes.push((profile_id.to_string(), entered, reason));
            }
        }
        let survivor = u1["id"].as_str().unwrap().to_owned();
        assert_ne!(survivor, visitor);
        assert!(
            changes.contains(&(visitor.clone(), false, format!("merged into {survivor}"))),
            "[{backend:?}] {changes:?}"
        );
        assert!(
            changes
                .iter()
                .any(|(p, entered, _)| *p == survivor && *entered),
            "[{backend:?}] {changes:?}"
        );
        env.server.stop().await;
    }
}

#[tokio::test]
async fn two_processes_scheduler_loops_tick_a_tenant_once_per_interval_and_a_forced_tick_always_runs(
) {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let clock = Arc::new(ManualClock::new(start_time()));
        let db = TestDb::create(backend).await;
        // Two servers on one database, as two replicas (on SQLite, in one process: the claims
        // mean the same there).
        let one =
            TestServer::start_with_clock(db.clone(), Some(&smtp), |_| {}, clock.clone()).await;
        let two = TestServer::start_with_clock(db, Some(&smtp), |_| {}, clock.clone()).await;
        new_tenant(&one, &smtp, &slug("ticks"), "owner@ticks.example").await;
        let every = std::time::Duration::from_secs(60);
        let claimed = |server: &TestServer| {
            let state = server.app.as_ref().unwrap().state().clone();
            async move {
                let report = api::jobs::scheduler::tick_claimed(&state, every)
                    .await
                    .unwrap();
                assert_eq!(report.failed_tenants, 0, "{report:?}");
                assert_eq!(report.tenants, 1, "{report:?}");
                (report.tenants_ticked, report.tenants_skipped)
            }
        };

        assert_eq!(
            claimed(&one).await,
            (1, 0),
            "[{backend:?}] the first claim runs"
        );
        assert_eq!(
            claimed(&two).await,
            (0, 1),
            "[{backend:?}] the other process skips"
        );
        assert_eq!(
            claimed(&one).await,
            (0, 1),
            "[{backend:?}] and so does the first"
        );
        // Less than 90 % of the interval later, still nothing; from then on, one of them.
        clock.advance(Duration::seconds(53));
        assert_eq!(claimed(&two).await, (0, 1), "[{backend:?}]");
        clock.advance(Duration::seconds(1));
        assert_eq!(claimed(&two).await, (1, 0), "[{backend:?}]");
        assert_eq!(claimed(&one).await, (0, 1), "[{backend:?}]");

        // A forced tick (tests, tools) runs whatever the claims say, and counts as a run.
        let state = one.app.as_ref().unwrap().state().clone();
        let forced = api::jobs::scheduler::tick(&state).await.unwrap();
        assert_eq!((forced.tenants_ticked, forced.tenants_skipped), (1, 0));
        clock.advance(Duration::seconds(54));
        assert_eq!(claimed(&one).await, (1, 0), "[{backend:?}]");
        one.stop().await;
        two.stop().await;
    }
}
