//! Customer analytics on both databases: order totals and RFM scores against values worked out by
//! hand, churn risk under an injected `now`, segment overlap, idempotent daily snapshots, the
//! stage funnel, and that another tenant's data never counts.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDate, SubsecRound, Utc};
use domain::TenantId;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement, TransactionTrait};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::*;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

struct Shop<'a> {
    server: &'a TestServer,
    owner: Session,
    key: String,
    tenant: TenantId,
}

async fn shop<'a>(server: &'a TestServer, smtp: &SmtpSink, name: &str) -> Shop<'a> {
    let owner = new_tenant(server, smtp, &slug(name), &format!("owner@{name}.example")).await;
    let key = write_key(server, &owner, name, "SERVER").await;
    let tenant = owner.tenant_id.parse().unwrap();
    Shop {
        server,
        owner,
        key,
        tenant,
    }
}

impl Shop<'_> {
    fn state(&self) -> &api::service::AppState {
        self.server.app.as_ref().unwrap().state()
    }

    /// Sends messages through the real collection API; every one must be accepted.
    async fn send(&self, messages: Vec<Value>) {
        let (status, body) = collect(
            self.server,
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

    async fn profile_id(&self, user_id: &str) -> Uuid {
        let profile = profile_by(self.server, &self.owner.access_token, "user_id", user_id).await;
        profile["id"].as_str().unwrap().parse().unwrap()
    }

    async fn refresh(&self, now: DateTime<Utc>) -> Vec<Uuid> {
        api::service::analytics::refresh(self.state(), self.tenant, now)
            .await
            .unwrap()
    }

    /// `refresh` at the application clock's now, as the scheduler calls it.
    async fn refresh_now(&self) -> Vec<Uuid> {
        self.refresh(self.state().now()).await
    }

    async fn attributes(&self, ids: &[Uuid]) -> Vec<api::store::analytics::AttributesRow> {
        let tx = self.state().store.read(self.tenant).await.unwrap();
        api::store::analytics::attributes_of(&tx, ids)
            .await
            .unwrap()
    }

    async fn gql(&self, query: &str, variables: Value) -> Value {
        self.server
            .gql_ok(Some(&self.owner.access_token), query, variables)
            .await
    }
}

fn track(user_id: &str, event: &str, properties: Value, timestamp: &str) -> Value {
    json!({
        "type": "track",
        "userId": user_id,
        "event": event,
        "properties": properties,
        "timestamp": timestamp,
        "messageId": Uuid::new_v4().to_string(),
    })
}

fn order(user_id: &str, properties: Value, timestamp: &str) -> Value {
    track(user_id, "Order Completed", properties, timestamp)
}

/// Writes rows of tables whose writers belong to other modules (segments, their members, the
/// lifecycle model) with bound parameters, as the service role with the tenant set: the test's
/// arrangement, not a path the service offers.
struct Fixture {
    db: DatabaseConnection,
    backend: Backend,
}

impl Fixture {
    async fn open(server: &TestServer) -> Fixture {
        Fixture {
            db: Database::connect(&server.db.service_url).await.unwrap(),
            backend: server.backend,
        }
    }

    async fn exec(&self, tenant: TenantId, sql: &str, values: Vec<sea_orm::Value>) {
        let backend = self.db.get_database_backend();
        let tx = self.db.begin().await.unwrap();
        if self.backend == Backend::Postgres {
            tx.execute_raw(Statement::from_sql_and_values(
                backend,
                "SELECT set_config('app.tenant_id', $1, true)",
                [tenant.to_string().into()],
            ))
            .await
            .unwrap();
        }
        tx.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    async fn segment(&self, tenant: TenantId, name: &str, members: &[Uuid]) -> Uuid {
        let id = Uuid::now_v7();
        let now = Utc::now();
        self.exec(
            tenant,
            "INSERT INTO segments (tenant_id, id, name, description, condition, status, size,
                                   time_dependent, created_at, updated_at)
             VALUES ($1, $2, $3, NULL, $4, 'ACTIVE', 0, FALSE, $5, $5)",
            vec![
                tenant.as_uuid().into(),
                id.into(),
                name.into(),
                json!({"all": []}).into(),
                now.into(),
            ],
        )
        .await;
        self.add_members(tenant, id, members).await;
        id
    }

    async fn add_members(&self, tenant: TenantId, segment_id: Uuid, members: &[Uuid]) {
        for profile_id in members {
            self.exec(
                tenant,
                "INSERT INTO segment_members (tenant_id, segment_id, profile_id, since)
                 VALUES ($1, $2, $3, $4)",
                vec![
                    tenant.as_uuid().into(),
                    segment_id.into(),
                    (*profile_id).into(),
                    Utc::now().into(),
                ],
            )
            .await;
        }
    }

    async fn stages(&self, tenant: TenantId, stages: &[(&str, &str)]) {
        for (position, (key, name)) in stages.iter().enumerate() {
            self.exec(
                tenant,
                "INSERT INTO lifecycle_stages (tenant_id, key, name, condition, position)
                 VALUES ($1, $2, $3, $4, $5)",
                vec![
                    tenant.as_uuid().into(),
                    (*key).into(),
                    (*name).into(),
                    json!({"all": []}).into(),
                    i32::try_from(position).unwrap().into(),
                ],
            )
            .await;
        }
    }
}

async fn transitions(shop: &Shop<'_>, rows: &[(Uuid, Option<&str>, &str, &str)]) {
    let tx = shop.state().store.begin(shop.tenant).await.unwrap();
    let rows: Vec<api::store::analytics::NewTransition> = rows
        .iter()
        .map(
            |(profile_id, from, to, when)| api::store::analytics::NewTransition {
                profile_id: *profile_id,
                from_stage: from.map(str::to_owned),
                to_stage: (*to).to_owned(),
                at: at(when),
                reason: "test".to_owned(),
            },
        )
        .collect();
    api::store::analytics::insert_transitions(&tx, &rows)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

const RFM_GRID: &str = "{ rfmDistribution { recency frequency profiles totalRevenue } }";

#[tokio::test]
async fn rfm_scores_and_order_totals_match_the_values_worked_out_by_hand() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let a = shop(&server, &smtp, "rfm").await;
        a.send(vec![
            order("u1", json!({"revenue": 10}), "2026-01-01T10:00:00Z"),
            order("u2", json!({"revenue": 20.25}), "2026-01-05T10:00:00Z"),
            order("u2", json!({"revenue": 19.75}), "2026-01-10T10:00:00Z"),
            // No revenue: the total counts; with revenue, the revenue does.
            order("u3", json!({"total": 25}), "2026-01-02T10:00:00Z"),
            order(
                "u3",
                json!({"revenue": 15, "total": 999}),
                "2026-01-10T10:00:00Z",
            ),
            // A string is not a number, and an order without either is worth 0.
            order("u4", json!({"revenue": 5}), "2026-01-20T10:00:00Z"),
            order("u4", json!({"revenue": "7"}), "2026-01-25T10:00:00Z"),
            order("u4", json!({}), "2026-02-01T10:00:00Z"),
            order("u5", json!({"revenue": 100}), "2026-01-20T10:00:00Z"),
            // Not orders.
            track(
                "u6",
                "Product Viewed",
                json!({"revenue": 50}),
                "2026-01-01T10:00:00Z",
            ),
            track(
                "u6",
                "order completed",
                json!({"revenue": 50}),
                "2026-01-02T10:00:00Z",
            ),
        ])
        .await;
        // A second shop on the same server with a big spender, which must not move the first
        // shop's quintiles.
        let b = shop(&server, &smtp, "rfm-other").await;
        b.send(vec![
            order("u1", json!({"revenue": 100000}), "2026-03-01T10:00:00Z"),
            order("u1", json!({"revenue": 100000}), "2026-03-02T10:00:00Z"),
            order("u1", json!({"revenue": 100000}), "2026-03-03T10:00:00Z"),
            order("u1", json!({"revenue": 100000}), "2026-03-04T10:00:00Z"),
        ])
        .await;

        let mut ids = BTreeMap::new();
        for user in ["u1", "u2", "u3", "u4", "u5", "u6"] {
            ids.insert(user, a.profile_id(user).await);
        }
        let now = at("2026-02-02T00:00:00Z");
        b.refresh(now).await;
        let changed = a.refresh(now).await;
        let mut every: Vec<Uuid> = ids.values().copied().collect();
        every.sort();
        // Every buyer gets scores; u6 (two events a day apart, silent for a month) turns at risk.
        assert_eq!(changed, every, "[{backend:?}]");

        // Five buyers, so a score is the number of buyers with a value at most this one's.
        // recency (last order): u1 01-01 → 1; u2, u3 01-10 → 3; u5 01-20 → 4; u4 02-01 → 5.
        // frequency: u1, u5 one order → 2; u2, u3 two → 4; u4 three → 5.
        // monetary: u4 5 → 1; u1 10 → 2; u2, u3 40 → 4; u5 100 → 5.
        let expected = [
            ("u1", 10.0, 1, Some((1, 2, 2)), false),
            ("u2", 40.0, 2, Some((3, 4, 4)), true),
            ("u3", 40.0, 2, Some((3, 4, 4)), false),
            ("u4", 5.0, 3, Some((5, 5, 1)), false),
            ("u5", 100.0, 1, Some((4, 2, 5)), false),
            ("u6", 0.0, 0, None, true),
        ];
        let rows = a.attributes(&every).await;
        for (user, revenue, orders, rfm, churn) in expected {
            let row = rows.iter().find(|row| row.profile_id == ids[user]).unwrap();
            let scores = match (row.rfm_recency, row.rfm_frequency, row.rfm_monetary) {
                (Some(r), Some(f), Some(m)) => Some((r, f, m)),
                (None, None, None) => None,
                other => panic!("partial scores {other:?}"),
            };
            assert_eq!(
                (row.total_revenue, row.order_count, scores, row.churn_risk),
                (revenue, orders, rfm, churn),
                "[{backend:?}] {user}"
            );
        }

        // Running it again with the same clock changes nothing.
        assert_eq!(a.refresh(now).await, Vec::<Uuid>::new(), "[{backend:?}]");

        // The grid: 25 cells, recency 5 to 1, then frequency 5 to 1.
        let grid = a.gql(RFM_GRID, json!({})).await["rfmDistribution"].clone();
        let cells = grid.as_array().unwrap();
        assert_eq!(cells.len(), 25);
        assert_eq!(cells[0]["recency"], 5);
        assert_eq!(cells[0]["frequency"], 5);
        assert_eq!(cells[24]["recency"], 1);
        assert_eq!(cells[24]["frequency"], 1);
        let filled: Vec<(i64, i64, i64, f64)> = cells
            .iter()
            .filter(|cell| cell["profiles"] != 0)
            .map(|cell| {
                (
                    cell["recency"].as_i64().unwrap(),
                    cell["frequency"].as_i64().unwrap(),
                    cell["profiles"].as_i64().unwrap(),
                    cell["totalRevenue"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            filled,
            [
                (5, 5, 1, 5.0),
                (4, 2, 1, 100.0),
                (3, 4, 2, 80.0),
                (1, 2, 1, 10.0)
            ],
            "[{backend:?}]"
        );
        // The other shop sees only its own buyer.
        let other = b.gql(RFM_GRID, json!({})).await["rfmDistribution"].clone();
        let counted: i64 = other
            .as_array()
            .unwrap()
            .iter()
            .map(|cell| cell["profiles"].as_i64().unwrap())
            .sum();
        assert_eq!(counted, 1, "[{backend:?}]");

        // Reading the grid needs a principal.
        let anonymous = a.server.gql(None, RFM_GRID, json!({})).await;
        assert_eq!(error_code(&anonymous), "UNAUTHENTICATED");
        server.stop().await;
    }
}

#[tokio::test]
async fn churn_risk_follows_the_injected_clock_against_three_mean_gaps() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        // Whole seconds, so that both databases measure the gaps exactly.
        let start = Utc::now().trunc_subsecs(0);
        let clock = Arc::new(ManualClock::new(start));
        let server = TestServer::start_with_clock(
            TestDb::create(backend).await,
            Some(&smtp),
            |_| {},
            clock.clone(),
        )
        .await;
        let a = shop(&server, &smtp, "churn").await;
        let hours_ago = |hours: i64| (start - Duration::hours(hours)).to_rfc3339();
        a.send(vec![
            track("steady", "Visit", json!({}), &hours_ago(5)),
            track("steady", "Visit", json!({}), &hours_ago(4)),
            track("steady", "Visit", json!({}), &hours_ago(3)),
            track("once", "Visit", json!({}), &hours_ago(5)),
        ])
        .await;
        let steady = a.profile_id("steady").await;
        let once = a.profile_id("once").await;

        // Mean gap one hour: exactly three hours of silence is not yet a risk.
        assert_eq!(a.refresh_now().await, Vec::<Uuid>::new(), "[{backend:?}]");
        let rows = a.attributes(&[steady, once]).await;
        let steady_row = rows.iter().find(|row| row.profile_id == steady).unwrap();
        let once_row = rows.iter().find(|row| row.profile_id == once).unwrap();
        assert_eq!(steady_row.mean_gap_seconds, Some(3600.0), "[{backend:?}]");
        assert!(!steady_row.churn_risk);
        assert_eq!(once_row.mean_gap_seconds, None, "[{backend:?}]");

        // One second more and it is; the profile seen once never is.
        clock.advance(Duration::seconds(1));
        assert_eq!(a.refresh_now().await, vec![steady], "[{backend:?}]");
        clock.advance(Duration::days(365));
        assert_eq!(a.refresh_now().await, Vec::<Uuid>::new(), "[{backend:?}]");
        let rows = a.attributes(&[steady, once]).await;
        assert_eq!(
            rows.iter()
                .map(|row| (row.profile_id, row.churn_risk))
                .collect::<BTreeMap<_, _>>(),
            BTreeMap::from([(steady, true), (once, false)]),
            "[{backend:?}]"
        );

        // An event now brings the profile back: the gap grows to (1 year 5 h 1 s) / 3.
        a.send(vec![track(
            "steady",
            "Visit",
            json!({}),
            &clock.now().to_rfc3339(),
        )])
        .await;
        assert_eq!(a.refresh_now().await, vec![steady], "[{backend:?}]");
        let rows = a.attributes(&[steady]).await;
        let gap = f64::from(365 * 86_400 + 5 * 3_600 + 1) / 3.0;
        assert_eq!(rows[0].mean_gap_seconds, Some(gap), "[{backend:?}]");
        assert!(!rows[0].churn_risk);
        server.stop().await;
    }
}

const OVERLAP: &str = "query($a: ID!, $b: ID!) { segmentOverlap(a: $a, b: $b) {
    sizeA sizeB intersection union jaccard } }";

#[tokio::test]
async fn segment_overlap_counts_shared_members_and_hides_other_tenants_segments() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let a = shop(&server, &smtp, "overlap").await;
        let users = ["u1", "u2", "u3", "u4", "u5"];
        a.send(
            users
                .iter()
                .map(|user| track(user, "Visit", json!({}), "2026-05-01T10:00:00Z"))
                .collect(),
        )
        .await;
        let mut ids = Vec::new();
        for user in users {
            ids.push(a.profile_id(user).await);
        }
        let fixture = Fixture::open(&server).await;
        let first = fixture.segment(a.tenant, "first", &ids[0..3]).await;
        let second = fixture.segment(a.tenant, "second", &ids[1..5]).await;
        let empty = fixture.segment(a.tenant, "empty", &[]).await;

        let overlap =
            a.gql(OVERLAP, json!({"a": first, "b": second})).await["segmentOverlap"].clone();
        assert_eq!(
            overlap,
            json!({"sizeA": 3, "sizeB": 4, "intersection": 2, "union": 5, "jaccard": 0.4}),
            "[{backend:?}]"
        );
        let same = a.gql(OVERLAP, json!({"a": first, "b": first})).await["segmentOverlap"].clone();
        assert_eq!(
            same,
            json!({"sizeA": 3, "sizeB": 3, "intersection": 3, "union": 3, "jaccard": 1.0})
        );
        let none = a.gql(OVERLAP, json!({"a": empty, "b": empty})).await["segmentOverlap"].clone();
        assert_eq!(
            none,
            json!({"sizeA": 0, "sizeB": 0, "intersection": 0, "union": 0, "jaccard": 0.0})
        );

        // Another tenant's segment is as unknown as a made-up id.
        let b = shop(&server, &smtp, "overlap-other").await;
        let theirs = fixture.segment(b.tenant, "theirs", &[]).await;
        for (x, y) in [
            (first.to_string(), theirs.to_string()),
            (first.to_string(), Uuid::new_v4().to_string()),
            ("not-an-id".to_owned(), first.to_string()),
        ] {
            let response = a
                .server
                .gql(
                    Some(&a.owner.access_token),
                    OVERLAP,
                    json!({"a": x, "b": y}),
                )
                .await;
            assert_eq!(error_code(&response), "NOT_FOUND", "[{backend:?}]");
        }
        server.stop().await;
    }
}

const HISTORY: &str =
    "query($id: ID!, $days: Int) { segmentSizeHistory(segmentId: $id, days: $days) {
    day size } }";

#[tokio::test]
async fn daily_snapshots_are_idempotent_per_day_and_make_the_size_history() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        // The clock stands still, so that "today" cannot change during the test.
        let clock = Arc::new(ManualClock::new(Utc::now()));
        let server = TestServer::start_with_clock(
            TestDb::create(backend).await,
            Some(&smtp),
            |_| {},
            clock.clone(),
        )
        .await;
        let a = shop(&server, &smtp, "snap").await;
        a.send(
            ["u1", "u2", "u3"]
                .iter()
                .map(|user| track(user, "Visit", json!({}), "2026-05-01T10:00:00Z"))
                .collect(),
        )
        .await;
        let mut ids = Vec::new();
        for user in ["u1", "u2", "u3"] {
            ids.push(a.profile_id(user).await);
        }
        let fixture = Fixture::open(&server).await;
        let segment = fixture.segment(a.tenant, "buyers", &ids[0..1]).await;
        let other = fixture.segment(a.tenant, "others", &ids).await;

        let today = clock.now().date_naive();
        let day = |back: i64| today - Duration::days(back);
        let shop = &a;
        let snapshot = move |when: NaiveDate| async move {
            api::service::analytics::take_segment_snapshots(shop.state(), shop.tenant, when)
                .await
                .unwrap()
        };
        assert_eq!(snapshot(day(40)).await, 2);
        assert_eq!(snapshot(day(10)).await, 2);
        assert_eq!(snapshot(day(3)).await, 2);
        // Taken again the same day after a change, the day's size is replaced, not added.
        fixture.add_members(a.tenant, segment, &ids[1..3]).await;
        assert_eq!(snapshot(day(3)).await, 2);

        let history =
            a.gql(HISTORY, json!({"id": segment, "days": 30})).await["segmentSizeHistory"].clone();
        let text = |back: i64| day(back).format("%Y-%m-%d").to_string();
        assert_eq!(
            history,
            json!([{"day": text(10), "size": 1}, {"day": text(3), "size": 3}]),
            "[{backend:?}]"
        );
        let longer =
            a.gql(HISTORY, json!({"id": other, "days": 60})).await["segmentSizeHistory"].clone();
        assert_eq!(
            longer,
            json!([
                {"day": text(40), "size": 3},
                {"day": text(10), "size": 3},
                {"day": text(3), "size": 3}
            ]),
            "[{backend:?}]"
        );
        // The default window is 30 days.
        let default = a.gql(HISTORY, json!({"id": other})).await["segmentSizeHistory"].clone();
        assert_eq!(default.as_array().unwrap().len(), 2, "[{backend:?}]");

        for days in [0, 367] {
            let response = a
                .server
                .gql(
                    Some(&a.owner.access_token),
                    HISTORY,
                    json!({"id": segment, "days": days}),
                )
                .await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "[{backend:?}]");
        }
        let response = a
            .server
            .gql(
                Some(&a.owner.access_token),
                HISTORY,
                json!({"id": Uuid::new_v4()}),
            )
            .await;
        assert_eq!(error_code(&response), "NOT_FOUND", "[{backend:?}]");
        server.stop().await;
    }
}

const FUNNEL: &str =
    "query($since: DateTime!, $until: DateTime!) { stageFunnel(since: $since, until: $until) {
    fromStage fromName toStage toName reached converted conversionRate } }";

#[tokio::test]
async fn the_stage_funnel_counts_who_was_in_a_stage_and_who_moved_on_within_the_period() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let a = shop(&server, &smtp, "funnel").await;
        let users = ["p1", "p2", "p3", "p4", "p5"];
        a.send(
            users
                .iter()
                .map(|user| track(user, "Visit", json!({}), "2026-01-01T10:00:00Z"))
                .collect(),
        )
        .await;
        let mut ids = BTreeMap::new();
        for user in users {
            ids.insert(user, a.profile_id(user).await);
        }
        let fixture = Fixture::open(&server).await;
        let model = [
            ("lead", "Lead"),
            ("customer", "Customer"),
            ("loyal", "Loyal"),
        ];
        fixture.stages(a.tenant, &model).await;
        transitions(
            &a,
            &[
                // In lead when the period begins, then customer, then loyal within it.
                (ids["p1"], None, "lead", "2026-02-10T00:00:00Z"),
                (ids["p1"], Some("lead"), "customer", "2026-03-05T00:00:00Z"),
                (ids["p1"], Some("customer"), "loyal", "2026-03-20T00:00:00Z"),
                // Enters lead within the period and stays.
                (ids["p2"], None, "lead", "2026-03-02T00:00:00Z"),
                // In customer when the period begins; moves on exactly at its end (excluded).
                (ids["p3"], None, "lead", "2026-01-01T00:00:00Z"),
                (ids["p3"], Some("lead"), "customer", "2026-02-01T00:00:00Z"),
                (ids["p3"], Some("customer"), "loyal", "2026-04-01T00:00:00Z"),
                // Only after the period.
                (ids["p4"], None, "lead", "2026-04-05T00:00:00Z"),
                // Skips customer: no step of the funnel counts it as converted.
                (ids["p5"], None, "lead", "2026-02-01T00:00:00Z"),
                (ids["p5"], Some("lead"), "loyal", "2026-03-10T00:00:00Z"),
            ],
        )
        .await;

        // Another tenant with the same model, whose moves must not count.
        let b = shop(&server, &smtp, "funnel-other").await;
        b.send(vec![track(
            "q1",
            "Visit",
            json!({}),
            "2026-01-01T10:00:00Z",
        )])
        .await;
        let q1 = b.profile_id("q1").await;
        fixture.stages(b.tenant, &model).await;
        transitions(
            &b,
            &[
                (q1, None, "lead", "2026-03-01T00:00:00Z"),
                (q1, Some("lead"), "customer", "2026-03-02T00:00:00Z"),
                (q1, Some("customer"), "loyal", "2026-03-03T00:00:00Z"),
            ],
        )
        .await;

        let period = json!({"since": "2026-03-01T00:00:00Z", "until": "2026-04-01T00:00:00Z"});
        let funnel = a.gql(FUNNEL, period.clone()).await["stageFunnel"].clone();
        assert_eq!(
            funnel,
            json!([
                {"fromStage": "lead", "fromName": "Lead", "toStage": "customer", "toName": "Customer",
                 "reached": 3, "converted": 1, "conversionRate": 1.0 / 3.0},
                {"fromStage": "customer", "fromName": "Customer", "toStage": "loyal", "toName": "Loyal",
                 "reached": 2, "converted": 1, "conversionRate": 0.5}
            ]),
            "[{backend:?}]"
        );
        let theirs = b.gql(FUNNEL, period).await["stageFunnel"].clone();
        assert_eq!(
            theirs
                .as_array()
                .unwrap()
                .iter()
                .map(|step| (step["reached"].clone(), step["converted"].clone()))
                .collect::<Vec<_>>(),
            [(json!(1), json!(1)), (json!(1), json!(1))],
            "[{backend:?}]"
        );

        let backwards = a
            .server
            .gql(
                Some(&a.owner.access_token),
                FUNNEL,
                json!({"since": "2026-04-01T00:00:00Z", "until": "2026-03-01T00:00:00Z"}),
            )
            .await;
        assert_eq!(error_code(&backwards), "BAD_USER_INPUT", "[{backend:?}]");
        server.stop().await;
    }
}
