//! `cdp backup` and `cdp restore`: a tenant's data as a portable file and back, from SQLite to
//! PostgreSQL and back again with identical answers; a damaged file changes nothing; a restore
//! over a tenant replaces its data and no other tenant's; every tenant table is backed up or
//! excluded with a reason; key material stays out of the data file, and erased profiles never
//! come back.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::service::backup::{
    self, BackupCommand, BackupError, BackupSummary, NoProgress, Phase, Progress, RestoreCommand,
    RestoreSummary,
};
use api::service::AppState;
use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement, Value as Sql};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::*;

/// The clock stands still at a whole second. Every time the service stores comes from it (or from
/// the messages), so the same rows read back identically from PostgreSQL, which keeps
/// microseconds, and SQLite, which keeps whatever it was given.
fn start_time() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(0)
}

/// A server without webhook workers: deliveries stay QUEUED, so nothing changes behind a test's
/// back between a backup and the comparison.
async fn start(db: Arc<TestDb>, smtp: &SmtpSink, clock: &Arc<ManualClock>) -> TestServer {
    init_logs();
    TestServer::start_with_clock(
        db,
        Some(smtp),
        |config| config.webhook_workers = 0,
        clock.clone(),
    )
    .await
}

/// The service state over a database without serving it, as `cdp backup` and `cdp restore` run.
async fn offline_state(db: &TestDb, clock: &Arc<ManualClock>) -> AppState {
    api::startup::state(
        api::config::Config::for_tests(&db.data_dir, &db.service_url),
        clock.clone(),
    )
    .await
    .expect("state over the database")
}

struct Shop {
    server: TestServer,
    owner: Session,
    key: String,
    slug: String,
}

impl Shop {
    fn token(&self) -> Option<&str> {
        Some(&self.owner.access_token)
    }

    fn state(&self) -> &AppState {
        self.server.app.as_ref().unwrap().state()
    }

    async fn gql(&self, query: &str, variables: Value) -> Value {
        self.server.gql_ok(self.token(), query, variables).await
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

    async fn profile_id(&self, user_id: &str) -> String {
        let data = self
            .gql(
                "query($v: String!) { profileByIdentity(kind: \"user_id\", value: $v) { id } }",
                json!({"v": user_id}),
            )
            .await;
        data["profileByIdentity"]["id"].as_str().unwrap().to_owned()
    }

    /// Waits until every email of the tenant has been sent.
    async fn wait_for_outbox(&self, count: usize) {
        let tenant_id = domain::TenantId(self.owner.tenant_id.parse().unwrap());
        let deadline = Instant::now() + WAIT;
        loop {
            let tx = self.state().store.read(tenant_id).await.unwrap();
            let rows = api::store::outbox::list(&tx).await.unwrap();
            drop(tx);
            if rows.len() == count && rows.iter().all(|row| row.status == "SENT") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the outbox never held {count} sent emails: {rows:#?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn identify(user: &str, traits: Value, consent: bool, at: &str) -> Value {
    json!({"type": "identify", "userId": user, "traits": traits, "timestamp": at,
           "context": {"consent": {"categoryPreferences": {"email_marketing": consent}}},
           "messageId": Uuid::new_v4().to_string()})
}

fn track(user: &str, event: &str, properties: Value, at: &str) -> Value {
    json!({"type": "track", "userId": user, "event": event, "properties": properties,
           "timestamp": at, "messageId": Uuid::new_v4().to_string()})
}

/// A tenant with rows in every table the service writes: users, roles, an api key, profiles with
/// traits, identities, events, consents, groups, merges (automatic and manual), lifecycle stages
/// and transitions, segments with members, history and daily sizes, a campaign with its emails,
/// a webhook with queued deliveries, ingestion counts and the audit log.
async fn fill(server: TestServer, smtp: &SmtpSink, name: &str) -> Shop {
    let slug = slug(name);
    let owner = new_tenant(&server, smtp, &slug, &format!("owner@{name}.example")).await;
    invited_user(
        &server,
        smtp,
        &owner,
        &format!("ana@{name}.example"),
        &["analyst"],
    )
    .await;
    let key = write_key(&server, &owner, "website", "WEB").await;
    let shop = Shop {
        server,
        owner,
        key,
        slug,
    };
    shop.gql(
        "mutation($s: [LifecycleStageInput!]!) { setLifecycleModel(stages: $s) { key } }",
        json!({"s": [
            {"key": "paying", "name": "Paying", "condition": {"trait": "plan", "op": "eq", "value": "pro"}},
            {"key": "trying", "name": "Trying", "condition": {"trait": "plan", "op": "exists"}},
        ]}),
    )
    .await;
    let buyers = shop
        .gql(
            "mutation($input: SegmentInput!) { createSegment(input: $input) { id } }",
            json!({"input": {"name": "Buyers", "description": "Ordered once",
                "condition": {"event": "Order Completed", "where": [{"property": "revenue", "op": "gte", "value": 100}]}}}),
        )
        .await["createSegment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    shop.gql(
        "mutation($input: SegmentInput!) { createSegment(input: $input) { id } }",
        json!({"input": {"name": "Everyone with a plan", "condition": {"trait": "plan", "op": "exists"}}}),
    )
    .await;
    let campaign = shop
        .gql(
            "mutation($input: CampaignInput!) { createCampaign(input: $input) { id } }",
            json!({"input": {"name": "Thanks", "trigger": {"segmentEntered": buyers},
                "subject": "Thank you", "textBody": "Thanks for your order."}}),
        )
        .await["createCampaign"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    shop.gql(
        "mutation($id: ID!) { setCampaignStatus(id: $id, status: ACTIVE) { id } }",
        json!({"id": campaign}),
    )
    .await;
    shop.gql(
        "mutation($input: CreateWebhookInput!) { createWebhook(input: $input) { secret } }",
        json!({"input": {"url": "https://hooks.example.com/cdp", "topics": ["EVENT_INGESTED"]}}),
    )
    .await;

    shop.send(json!([
        identify("u1", json!({"email": format!("ada@{name}.example"), "name": "Ada", "plan": "pro", "score": 0.1 + 0.2}), true, "2026-10-01T09:00:00Z"),
        identify("u2", json!({"email": format!("bob@{name}.example"), "plan": "free", "tags": ["a", "b"], "nothing": null}), false, "2026-10-01T09:01:00Z"),
        track("u1", "Order Completed", json!({"revenue": 129.5, "currency": "EUR"}), "2026-10-02T10:00:00.123Z"),
        track("u1", "Order Completed", json!({"revenue": 19.99}), "2026-10-05T10:00:00Z"),
        {"type": "page", "anonymousId": "anon-7", "name": "Pricing", "properties": {"path": "/pricing"},
         "timestamp": "2026-10-01T08:00:00Z", "messageId": Uuid::new_v4().to_string()},
        {"type": "alias", "previousId": "anon-7", "userId": "u1",
         "timestamp": "2026-10-01T09:30:00Z", "messageId": Uuid::new_v4().to_string()},
        {"type": "group", "userId": "u1", "groupId": "acme", "traits": {"name": "Acme", "employees": 12},
         "timestamp": "2026-10-01T09:40:00Z", "messageId": Uuid::new_v4().to_string()},
        {"type": "track", "anonymousId": "anon-9", "event": "Signed Up",
         "properties": {"ratio": 1.0715660391465826e-75, "big": 408711.11634904717},
         "timestamp": "2026-10-03T11:00:00Z", "messageId": Uuid::new_v4().to_string()},
    ]))
    .await;
    let u2 = shop.profile_id("u2").await;
    let anonymous = shop
        .gql(
            "{ profileByIdentity(kind: \"anonymous_id\", value: \"anon-9\") { id } }",
            json!({}),
        )
        .await["profileByIdentity"]["id"]
        .clone();
    shop.gql(
        "mutation($k: ID!, $m: ID!) { mergeProfiles(keepId: $k, mergeId: $m) { id } }",
        json!({"k": u2, "m": anonymous}),
    )
    .await;
    shop.gql(
        "mutation($p: ID!) { setConsent(profileId: $p, purpose: \"sms\", granted: true) { id } }",
        json!({"p": u2}),
    )
    .await;
    // A person erased with their identifiers suppressed: the register and the suppressions.
    shop.send(json!([identify(
        "gone",
        json!({"email": format!("gone@{name}.example")}),
        false,
        "2026-10-04T09:00:00Z"
    )]))
    .await;
    let gone = shop.profile_id("gone").await;
    shop.gql(
        "mutation($id: ID!) { eraseProfile(id: $id, suppress: true) { profileId } }",
        json!({"id": gone}),
    )
    .await;
    let report = api::jobs::scheduler::tick(shop.state()).await.unwrap();
    assert_eq!(report.failed_tenants, 0, "{report:?}");
    // Ingestion counts are appended per batch and folded at most every few seconds: of two
    // batches in a row, the second stays unfolded, so both count tables hold rows.
    for page in ["/docs", "/blog"] {
        shop.send(json!([{"type": "page", "userId": "u2", "name": page,
            "timestamp": "2026-10-06T08:00:00Z", "messageId": Uuid::new_v4().to_string()}]))
            .await;
    }
    // The activation, the invitation and the campaign's email to u1.
    shop.wait_for_outbox(3).await;
    shop
}

const TENANT_VIEW: &str = "{
    tenant { id slug name createdAt }
    users(first: 50) { totalCount edges { node { id email status roles createdAt } } }
    roles { name permissions builtIn }
    apiKeys { id name scope prefix createdAt revokedAt }
    ingestSettings { maxMessageBytes maxRequestBytes maxBatchMessages rateLimitPerSecond
        defaultRegion blockedIdentityValues identityRules { kind priority limit } }
    dataQuality { sourceId name channel accepted duplicates rejected { reason count }
        warnings { reason count } lastSeenAt }
    profiles(first: 50) { totalCount edges { node { id } } }
    events(first: 50) { totalCount edges { node { id profileId type name properties timestamp
        receivedAt messageId channel } } }
    segments { id name description condition status timeDependent size createdAt updatedAt
        members(first: 50) { totalCount edges { node { id } } } }
    lifecycleModel { key name condition position }
    lifecycleDistribution { stage count }
    rfmDistribution { recency frequency profiles totalRevenue }
    campaigns { id name status subject consentPurpose trigger { kind segmentId stage event }
        stats { queued sent failed suppressed } createdAt }
    emailDeliveries(first: 50) { totalCount edges { node { id campaignId profileId to status
        suppressionReason attempts lastError sentAt createdAt } } }
    webhooks { id url topics segmentId eventName active createdAt }
}";

const PROFILE_VIEW: &str = "query($id: ID!) { profile(id: $id) {
    id traits channels firstSeenAt lastSeenAt eventCount createdAt stage
    identities { kind value }
    segments { id name }
    attributes { totalRevenue orderCount meanGapSeconds rfm { recency frequency monetary score }
        churnRisk daysSinceLastSeen }
    lifecycleTransitions { from to at reason }
    segmentHistory { segmentId entered at reason }
    consents { purpose granted updatedAt }
    mergedIds
    mergeLedger { id at action profileId otherProfileId messageId identityKind identityValue rule }
    groups { groupId traits }
    events(first: 50) { totalCount edges { node { id type name properties timestamp receivedAt
        messageId channel } } }
} }";

/// Everything the API tells about a tenant, as one JSON document: the tenant and its accounts,
/// every profile in full (traits, identities, events, consents, groups, merges, stage, segments,
/// attributes), segments with members and daily sizes, the lifecycle model, campaigns and their
/// emails, webhooks and their deliveries, ingestion counts and settings, and the audit log
/// without the restore's own entry.
async fn view(server: &TestServer, token: &str) -> Value {
    let token = Some(token);
    let mut view = server.gql_ok(token, TENANT_VIEW, json!({})).await;
    let mut profiles = Vec::new();
    for edge in view["profiles"]["edges"].as_array().unwrap().clone() {
        let id = edge["node"]["id"].clone();
        profiles.push(
            server
                .gql_ok(token, PROFILE_VIEW, json!({ "id": id }))
                .await["profile"]
                .clone(),
        );
    }
    view["profileDetails"] = Value::Array(profiles);
    let mut sizes = Vec::new();
    for segment in view["segments"].as_array().unwrap().clone() {
        sizes.push(
            server
                .gql_ok(
                    token,
                    "query($id: ID!) { segmentSizeHistory(segmentId: $id, days: 30) { day size } }",
                    json!({"id": segment["id"]}),
                )
                .await["segmentSizeHistory"]
                .clone(),
        );
    }
    view["segmentSizes"] = Value::Array(sizes);
    let mut deliveries = Vec::new();
    for webhook in view["webhooks"].as_array().unwrap().clone() {
        deliveries.push(
            server
                .gql_ok(
                    token,
                    "query($id: ID!) { webhookDeliveries(webhookId: $id, first: 50) { totalCount
                        edges { node { id webhookId topic payload status attempts nextAttemptAt
                        lastStatusCode lastError createdAt sentAt } } } }",
                    json!({"id": webhook["id"]}),
                )
                .await["webhookDeliveries"]
                .clone(),
        );
    }
    view["webhookDeliveries"] = Value::Array(deliveries);
    let audit = server
        .gql_ok(
            token,
            "{ auditLog(first: 100) { edges { node { id at actor action target detail } } } }",
            json!({}),
        )
        .await;
    view["auditLog"] = Value::Array(
        audit["auditLog"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|edge| edge["node"].clone())
            .filter(|entry| entry["action"] != "tenant.restored")
            .collect(),
    );
    view
}

/// Fails with the first path where two JSON documents differ, and both values there.
fn assert_same(actual: &Value, expected: &Value, what: &str) {
    fn first_difference(actual: &Value, expected: &Value, path: String) -> Option<String> {
        match (actual, expected) {
            (Value::Object(a), Value::Object(b)) => {
                let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                keys.into_iter().find_map(|key| {
                    first_difference(
                        a.get(key).unwrap_or(&Value::Null),
                        b.get(key).unwrap_or(&Value::Null),
                        format!("{path}.{key}"),
                    )
                })
            }
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
                .iter()
                .zip(b)
                .enumerate()
                .find_map(|(index, (a, b))| first_difference(a, b, format!("{path}[{index}]"))),
            _ if actual == expected => None,
            _ => Some(format!("{path}: {actual} instead of {expected}")),
        }
    }
    if let Some(difference) = first_difference(actual, expected, String::new()) {
        panic!("{what}: {difference}");
    }
}

/// How many restore entries the audit log holds.
async fn restore_entries(server: &TestServer, token: &str) -> usize {
    let audit = server
        .gql_ok(
            Some(token),
            "{ auditLog(first: 100) { edges { node { action } } } }",
            json!({}),
        )
        .await;
    audit["auditLog"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|edge| edge["node"]["action"] == "tenant.restored")
        .count()
}

/// Records the phases a progress went through and the last position of each.
#[derive(Default)]
struct Recorder {
    phases: Mutex<Vec<(Phase, u64, u64)>>,
}

impl Progress for Recorder {
    fn start(&self, phase: Phase, total: u64) {
        self.phases.lock().unwrap().push((phase, total, 0));
    }
    fn set(&self, done: u64) {
        if let Some(last) = self.phases.lock().unwrap().last_mut() {
            last.2 = done;
        }
    }
    fn finish(&self) {}
}

impl Recorder {
    /// Every phase reached its total.
    fn all_completed(&self) -> bool {
        self.phases
            .lock()
            .unwrap()
            .iter()
            .all(|(_, total, done)| total == done)
    }
}

async fn take_backup(
    state: &AppState,
    slug: &str,
    out: &Path,
    keys_out: Option<&Path>,
) -> BackupSummary {
    backup::backup(
        state,
        BackupCommand {
            tenant_slug: slug,
            out,
            keys_out,
        },
        &NoProgress,
    )
    .await
    .expect("backup")
}

async fn restore(
    state: &AppState,
    slug: &str,
    file: &Path,
    keys: Option<&Path>,
) -> Result<RestoreSummary, BackupError> {
    backup::restore(
        state,
        RestoreCommand {
            tenant_slug: slug,
            file,
            keys,
            actor: "operator:test",
        },
        &NoProgress,
    )
    .await
}

/// The lines of a backup file (gzipped or not).
fn lines(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .unwrap();
        text
    } else {
        String::from_utf8(bytes).unwrap()
    };
    text.lines().map(str::to_owned).collect()
}

fn header(path: &Path) -> Value {
    serde_json::from_str(&lines(path)[0]).unwrap()
}

fn header_tables(path: &Path) -> Vec<String> {
    header(path)["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|table| table["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The row lines of a data file, sorted, without the audit entries of restores: what two
/// backups of the same data must share whatever database they were taken from.
fn row_lines(path: &Path) -> Vec<String> {
    let header = header(path);
    let audit_action = header["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|table| table["name"] == "audit_log")
        .and_then(|table| {
            table["columns"]
                .as_array()
                .unwrap()
                .iter()
                .position(|column| column["name"] == "action")
        })
        .unwrap();
    let lines = lines(path);
    let mut rows: Vec<String> = lines[1..lines.len() - 1]
        .iter()
        .filter(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            !(row["table"] == "audit_log" && row["values"][audit_action] == "tenant.restored")
        })
        .cloned()
        .collect();
    rows.sort();
    rows
}

/// The row lines of a file, sorted.
fn sorted_rows(path: &Path) -> Vec<String> {
    let lines = lines(path);
    let mut rows = lines[1..lines.len() - 1].to_vec();
    rows.sort();
    rows
}

#[tokio::test]
async fn a_tenant_moved_from_sqlite_to_postgresql_and_back_answers_every_query_as_before() {
    let smtp = SmtpSink::start().await;
    let clock = Arc::new(ManualClock::new(start_time()));
    let source = fill(
        start(TestDb::create(Backend::Sqlite).await, &smtp, &clock).await,
        &smtp,
        "move",
    )
    .await;
    // A key never used on the source, so that the target cannot answer from a cache.
    let spare_key = write_key(&source.server, &source.owner, "spare", "SERVER").await;
    let token = source.owner.access_token.clone();
    let before = view(&source.server, &token).await;
    let files = tempfile::tempdir().unwrap();

    // Every backed-up table has rows here, so the comparison below covers every table; a new
    // table needs data in `fill` (or a reason to be empty).
    let first = files.path().join("move.jsonl.gz");
    let mut keys = files.path().join("move.keys.jsonl.gz");
    let recorder = Recorder::default();
    let summary = backup::backup(
        source.state(),
        BackupCommand {
            tenant_slug: &source.slug,
            out: &first,
            keys_out: Some(&keys),
        },
        &recorder,
    )
    .await
    .unwrap();
    assert!(recorder.all_completed(), "the progress reached its total");
    let empty: Vec<&String> = summary
        .tables
        .iter()
        .filter(|(_, rows)| **rows == 0)
        .map(|(table, _)| table)
        .collect();
    assert_eq!(
        empty,
        Vec::<&String>::new(),
        "tables without rows in the round trip"
    );
    assert_eq!(summary.rows, summary.tables.values().sum::<u64>());

    // SQLite → PostgreSQL (when configured) → SQLite, each hop a restore into a fresh database
    // through the service's own role, with the key file (without it the personal data could not
    // be read), then a backup of the result.
    let mut hops = vec![Backend::Sqlite];
    if backends().contains(&Backend::Postgres) {
        hops = vec![Backend::Postgres, Backend::Sqlite];
    }
    let mut file = first.clone();
    for (hop, backend) in hops.into_iter().enumerate() {
        let db = TestDb::create(backend).await;
        let state = offline_state(&db, &clock).await;
        let recorder = Recorder::default();
        let restored = backup::restore(
            &state,
            RestoreCommand {
                tenant_slug: &source.slug,
                file: &file,
                keys: Some(&keys),
                actor: "operator:test",
            },
            &recorder,
        )
        .await
        .unwrap();
        assert!(restored.created_tenant);
        assert_eq!(
            restored.key_rows_inserted, summary.key_rows,
            "[{backend:?}]"
        );
        // Each hop's backup also holds the audit entry of the restore before it.
        assert_eq!(restored.rows, summary.rows + hop as u64, "[{backend:?}]");
        assert_eq!(restored.skipped_erased, 0);
        assert!(recorder.all_completed(), "[{backend:?}] progress");
        let next = files.path().join(format!("hop-{hop}.jsonl"));
        let next_keys = files.path().join(format!("hop-{hop}.keys.jsonl"));
        take_backup(&state, &source.slug, &next, Some(&next_keys)).await;
        assert_eq!(
            row_lines(&next),
            row_lines(&first),
            "[{backend:?}] a backup of the restored tenant holds the same rows"
        );
        assert_eq!(
            sorted_rows(&next_keys),
            sorted_rows(&keys),
            "[{backend:?}] and the same keys"
        );
        file = next;
        keys = next_keys;
        drop(state);

        // The source's access token is good here: same signing secret, and its user is restored.
        let server = start(db, &smtp, &clock).await;
        assert_same(
            &view(&server, &token).await,
            &before,
            &format!("[{backend:?}] the restored tenant answers as the original"),
        );
        assert_eq!(restore_entries(&server, &token).await, hop + 1);
        // The password hashes came along.
        server
            .gql_ok(
                None,
                LOGIN,
                json!({"slug": source.slug, "email": "owner@move.example", "password": PASSWORD}),
            )
            .await;
        // The source's write keys work here.
        let (status, _) = collect(
            &server,
            "/v1/track",
            &spare_key,
            &json!({"userId": "u1", "event": "After Restore", "messageId": Uuid::new_v4().to_string()}),
        )
        .await;
        assert_eq!(status, 200, "[{backend:?}] the write key survives the move");
        server.stop().await;
    }
    source.server.stop().await;
}

#[tokio::test]
async fn a_restore_replaces_the_tenants_data_and_leaves_other_tenants_alone() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let clock = Arc::new(ManualClock::new(start_time()));
        let db = TestDb::create(backend).await;
        let shop = fill(start(db.clone(), &smtp, &clock).await, &smtp, "over").await;
        let token = shop.owner.access_token.clone();
        let before = view(&shop.server, &token).await;
        let files = tempfile::tempdir().unwrap();
        let file = files.path().join("over.jsonl");
        take_backup(shop.state(), &shop.slug, &file, None).await;

        // Another tenant in the same database.
        let neighbour_slug = slug("neighbour");
        let neighbour = new_tenant(
            &shop.server,
            &smtp,
            &neighbour_slug,
            "owner@neighbour.example",
        )
        .await;
        let neighbour_key = write_key(&shop.server, &neighbour, "site", "WEB").await;
        let (status, _) = collect(
            &shop.server,
            "/v1/batch",
            &neighbour_key,
            &json!({"batch": [identify("n1", json!({"plan": "pro"}), true, "2026-10-01T09:00:00Z")]}),
        )
        .await;
        assert_eq!(status, 200);
        let neighbour_before = view(&shop.server, &neighbour.access_token).await;

        // The tenant changes after the backup: new people and events, a new segment, a deleted
        // campaign trigger, new traits.
        shop.send(json!([
            identify("u9", json!({"plan": "pro"}), true, "2026-10-09T09:00:00Z"),
            identify(
                "u1",
                json!({"name": "Ada Lovelace", "plan": "free"}),
                false,
                "2026-10-09T09:00:00Z"
            ),
            track(
                "u2",
                "Order Completed",
                json!({"revenue": 500}),
                "2026-10-09T10:00:00Z"
            ),
        ]))
        .await;
        shop.gql(
            "mutation($input: SegmentInput!) { createSegment(input: $input) { id } }",
            json!({"input": {"name": "Late", "condition": {"trait": "plan", "op": "eq", "value": "free"}}}),
        )
        .await;
        assert_ne!(view(&shop.server, &token).await, before);

        let summary = restore(shop.state(), &shop.slug, &file, None)
            .await
            .unwrap();
        assert!(!summary.created_tenant);
        assert!(summary.deleted_rows > summary.rows, "{summary:?}");
        let audit = shop
            .gql(
                "{ auditLog(first: 1) { edges { node { actor action } } } }",
                json!({}),
            )
            .await;
        assert_eq!(
            audit["auditLog"]["edges"][0]["node"],
            json!({"actor": "operator:test", "action": "tenant.restored"})
        );
        assert_same(
            &view(&shop.server, &token).await,
            &before,
            &format!("[{backend:?}] the tenant is back as it was"),
        );
        assert_same(
            &view(&shop.server, &neighbour.access_token).await,
            &neighbour_before,
            &format!("[{backend:?}] the other tenant is untouched"),
        );
        // The sessions were not restored: the old refresh token is gone, signing in works.
        let refreshed = shop
            .server
            .gql(
                None,
                "mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken } }",
                json!({"t": shop.owner.refresh_token}),
            )
            .await;
        assert_eq!(error_code(&refreshed), "UNAUTHENTICATED", "{refreshed:#}");
        shop.server
            .gql_ok(
                None,
                LOGIN,
                json!({"slug": shop.slug, "email": "owner@over.example", "password": PASSWORD}),
            )
            .await;
        shop.server.stop().await;
    }
}

/// What an error must be.
type Expectation = fn(&BackupError) -> bool;

/// Replaces the first occurrence of `from` in a file's text by `to`.
fn edit(path: &Path, to_path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from} is in the file");
    std::fs::write(to_path, text.replacen(from, to, 1)).unwrap();
}

#[tokio::test]
async fn a_damaged_or_foreign_file_is_refused_with_a_clear_error_and_changes_nothing() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let clock = Arc::new(ManualClock::new(start_time()));
        let db = TestDb::create(backend).await;
        let shop = fill(start(db.clone(), &smtp, &clock).await, &smtp, "damage").await;
        let files = tempfile::tempdir().unwrap();
        let dir = files.path();
        let plain = dir.join("damage.jsonl");
        let gzipped = dir.join("damage.jsonl.gz");
        let keys = dir.join("damage.keys.jsonl");
        take_backup(shop.state(), &shop.slug, &plain, Some(&keys)).await;
        take_backup(shop.state(), &shop.slug, &gzipped, None).await;
        // The tenant moves on, so that a restore that went through would show.
        shop.send(json!([identify(
            "late",
            json!({"plan": "pro"}),
            true,
            "2026-10-09T09:00:00Z"
        )]))
        .await;
        let token = shop.owner.access_token.clone();
        let before = view(&shop.server, &token).await;

        let text = std::fs::read_to_string(&plain).unwrap();
        let bytes = text.as_bytes();
        let damaged = |name: &str| dir.join(name);

        // One letter changed inside a row: still JSON, but the checksum differs.
        edit(
            &plain,
            &damaged("letter.jsonl"),
            "\"Thank you\"",
            "\"Thank yoU\"",
        );
        // A byte that breaks the JSON of a row.
        let second_line = text.find('\n').unwrap() + 1;
        let mut broken = bytes.to_vec();
        broken[second_line] = b'#';
        std::fs::write(damaged("json.jsonl"), &broken).unwrap();
        // Cut in the middle of a row, and cut before the trailer.
        std::fs::write(damaged("half.jsonl"), &bytes[..bytes.len() / 2]).unwrap();
        let without_trailer = text.trim_end().rsplit_once('\n').unwrap().0.to_owned() + "\n";
        std::fs::write(damaged("no-trailer.jsonl"), without_trailer).unwrap();
        // A trailer with a changed count.
        edit(
            &plain,
            &damaged("count.jsonl"),
            "{\"end\":{\"rows\":",
            "{\"end\":{\"rows\":1",
        );
        // A gzipped file cut short, and one with a flipped byte in its compressed data.
        let zipped = std::fs::read(&gzipped).unwrap();
        std::fs::write(damaged("cut.jsonl.gz"), &zipped[..zipped.len() - 40]).unwrap();
        let mut flipped = zipped.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x55;
        std::fs::write(damaged("flipped.jsonl.gz"), &flipped).unwrap();
        // Not a backup at all, a newer format, a key file given as the data file.
        std::fs::write(damaged("other.jsonl"), "{\"type\":\"track\"}\n").unwrap();
        std::fs::write(damaged("empty.jsonl"), "").unwrap();
        edit(
            &plain,
            &damaged("newer.jsonl"),
            "\"version\":1,",
            "\"version\":2,",
        );

        let cases: Vec<(&str, Expectation)> = vec![
            (
                "letter.jsonl",
                |e| matches!(e, BackupError::Damaged { reason, .. } if reason.contains("checksum")),
            ),
            (
                "json.jsonl",
                |e| matches!(e, BackupError::Damaged { reason, .. } if reason.contains("not valid JSON")),
            ),
            (
                "half.jsonl",
                |e| matches!(e, BackupError::Damaged { reason, .. } if reason.contains("cut short")),
            ),
            (
                "no-trailer.jsonl",
                |e| matches!(e, BackupError::Damaged { reason, .. } if reason.contains("without its trailer")),
            ),
            (
                "count.jsonl",
                |e| matches!(e, BackupError::Damaged { reason, .. } if reason.contains("row counts")),
            ),
            ("cut.jsonl.gz", |e| matches!(e, BackupError::Damaged { .. })),
            ("flipped.jsonl.gz", |e| {
                matches!(e, BackupError::Damaged { .. })
            }),
            ("other.jsonl", |e| {
                matches!(e, BackupError::NotABackup { .. })
            }),
            ("empty.jsonl", |e| {
                matches!(e, BackupError::NotABackup { .. })
            }),
            ("newer.jsonl", |e| {
                matches!(e, BackupError::UnsupportedVersion { found: 2, .. })
            }),
            ("damage.keys.jsonl", |e| {
                matches!(e, BackupError::WrongKind { .. })
            }),
        ];
        for (name, expected) in cases {
            let path = if name == "damage.keys.jsonl" {
                keys.clone()
            } else {
                damaged(name)
            };
            let error = restore(shop.state(), &shop.slug, &path, None)
                .await
                .expect_err(name);
            assert!(expected(&error), "[{backend:?}] {name}: {error}");
            assert!(
                error.to_string().contains("nothing was changed"),
                "[{backend:?}] {name}: {error}"
            );
        }
        // A backup of another tenant, and a key file that is damaged: refused too.
        let error = restore(shop.state(), "someone-else", &plain, None)
            .await
            .unwrap_err();
        assert!(matches!(error, BackupError::WrongTenant { .. }), "{error}");
        edit(
            &keys,
            &damaged("keys-damaged.jsonl"),
            "\"end\":{\"rows\":",
            "\"end\":{\"rows\":7",
        );
        let error = restore(
            shop.state(),
            &shop.slug,
            &plain,
            Some(&damaged("keys-damaged.jsonl")),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, BackupError::Damaged { .. }), "{error}");
        // The command line says the same.
        let error = api::cli::restore(
            shop.state(),
            RestoreCommand {
                tenant_slug: &shop.slug,
                file: &damaged("letter.jsonl"),
                keys: None,
                actor: "operator:test",
            },
            false,
        )
        .await
        .unwrap_err();
        assert!(error.to_string().contains("is damaged"), "{error}");

        assert_same(
            &view(&shop.server, &token).await,
            &before,
            &format!("[{backend:?}] nothing changed"),
        );
        assert_eq!(restore_entries(&shop.server, &token).await, 0);
        // The intact files restore.
        restore(shop.state(), &shop.slug, &gzipped, None)
            .await
            .unwrap();
        restore(shop.state(), &shop.slug, &plain, Some(&keys))
            .await
            .unwrap();
        shop.server.stop().await;
    }
}

#[tokio::test]
async fn every_tenant_table_is_backed_up_or_left_out_with_a_reason() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let clock = Arc::new(ManualClock::new(start_time()));
        let db = TestDb::create(backend).await;
        let server = start(db.clone(), &smtp, &clock).await;
        let tenant_slug = slug("cover");
        new_tenant(&server, &smtp, &tenant_slug, "owner@cover.example").await;
        let files = tempfile::tempdir().unwrap();
        let data = files.path().join("cover.jsonl");
        let keys = files.path().join("cover.keys.jsonl");
        take_backup(
            server.app.as_ref().unwrap().state(),
            &tenant_slug,
            &data,
            Some(&keys),
        )
        .await;

        let catalog = tables_with_column(&db, "tenant_id").await;
        assert!(catalog.contains("profiles") && catalog.contains("events"));
        let in_data: BTreeSet<String> = header_tables(&data).into_iter().collect();
        let in_keys: BTreeSet<String> = header_tables(&keys).into_iter().collect();
        let left_out: BTreeSet<String> = backup::NOT_BACKED_UP
            .iter()
            .map(|(table, _)| (*table).to_owned())
            .collect();
        for (table, reason) in backup::NOT_BACKED_UP {
            assert!(
                reason.split_whitespace().count() >= 5,
                "{table} is left out with a reason"
            );
        }
        let covered: BTreeSet<String> = in_data
            .iter()
            .chain(&in_keys)
            .chain(left_out.iter().filter(|table| catalog.contains(*table)))
            .cloned()
            .collect();
        assert_eq!(
            covered, catalog,
            "[{backend:?}] every tenant table is in the data file, in the key file, or left out \
             with a reason (NOT_BACKED_UP)"
        );
        assert!(in_data.is_disjoint(&in_keys));
        assert!(in_data.is_disjoint(&left_out));
        for table in backup::KEY_TABLES {
            assert!(
                !in_data.contains(table),
                "{table} is never in the data file"
            );
        }
        // Parents come before their children in the file.
        let order = header_tables(&data);
        let position = |table: &str| order.iter().position(|name| name == table).unwrap();
        assert!(position("profiles") < position("events"));
        assert!(position("segments") < position("segment_members"));
        assert!(position("users") < position("user_roles"));
        assert!(position("roles") < position("user_roles"));
        server.stop().await;
    }
}

/// SQL with `$1`, `$2`… placeholders, each used once and in order, for either database.
fn statement(backend: DbBackend, sql: &str, values: Vec<Sql>) -> Statement {
    let sql = if backend == DbBackend::Sqlite {
        let mut text = sql.to_owned();
        for index in (1..=values.len()).rev() {
            text = text.replace(&format!("${index}"), "?");
        }
        text
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

async fn execute(owner: &DatabaseConnection, sql: &str, values: Vec<Sql>) {
    owner
        .execute_raw(statement(owner.get_database_backend(), sql, values))
        .await
        .unwrap();
}

/// The wrapped key of every profile that has one, by profile id.
async fn profile_keys(owner: &DatabaseConnection, tenant: Uuid) -> BTreeMap<Uuid, String> {
    owner
        .query_all_raw(statement(
            owner.get_database_backend(),
            "SELECT profile_id, wrapped FROM profile_keys WHERE tenant_id = $1",
            vec![tenant.into()],
        ))
        .await
        .unwrap()
        .into_iter()
        .map(|row| {
            (
                row.try_get_by_index::<Uuid>(0).unwrap(),
                row.try_get_by_index::<String>(1).unwrap(),
            )
        })
        .collect()
}

/// The wrapped tenant key, if the tenant has one.
async fn tenant_key(owner: &DatabaseConnection, tenant: Uuid) -> Option<String> {
    owner
        .query_one_raw(statement(
            owner.get_database_backend(),
            "SELECT wrapped FROM tenant_keys WHERE tenant_id = $1",
            vec![tenant.into()],
        ))
        .await
        .unwrap()
        .map(|row| row.try_get_by_index::<String>(0).unwrap())
}

async fn count(owner: &DatabaseConnection, sql: &str, values: Vec<Sql>) -> i64 {
    let row = owner
        .query_one_raw(statement(owner.get_database_backend(), sql, values))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index::<i64>(0).unwrap()
}

/// Rows of a profile anywhere: its own row, tombstones merged into it, and every row of a table
/// with a profile column.
async fn rows_of_profile(
    owner: &DatabaseConnection,
    db: &TestDb,
    tenant: Uuid,
    profile: Uuid,
) -> BTreeMap<String, i64> {
    let mut found = BTreeMap::new();
    for table in tables_with_column(db, "tenant_id").await {
        if table == "erasures" {
            continue;
        }
        let columns: Vec<String> = owner
            .query_all_raw(Statement::from_string(
                owner.get_database_backend(),
                match db.backend {
                    Backend::Sqlite => format!("SELECT name FROM pragma_table_info('{table}')"),
                    Backend::Postgres => format!(
                        "SELECT column_name::text FROM information_schema.columns
                         WHERE table_schema = 'public' AND table_name = '{table}'"
                    ),
                },
            ))
            .await
            .unwrap()
            .into_iter()
            .map(|row| row.try_get_by_index::<String>(0).unwrap())
            .collect();
        for column in columns {
            let holds_profile = matches!(
                column.as_str(),
                "profile_id" | "other_profile_id" | "merged_into"
            ) || (table == "profiles" && column == "id");
            if holds_profile {
                let rows = count(
                    owner,
                    &format!("SELECT COUNT(*) FROM {table} WHERE tenant_id = $1 AND {column} = $2"),
                    vec![tenant.into(), profile.into()],
                )
                .await;
                if rows > 0 {
                    found.insert(format!("{table}.{column}"), rows);
                }
            }
        }
    }
    found
}

#[tokio::test]
async fn keys_stay_out_of_the_data_file_and_an_erased_profile_never_comes_back() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let clock = Arc::new(ManualClock::new(start_time()));
        let db = TestDb::create(backend).await;
        let shop = fill(start(db.clone(), &smtp, &clock).await, &smtp, "erase").await;
        let owner = Database::connect(&db.owner_url).await.unwrap();
        let tenant: Uuid = shop.owner.tenant_id.parse().unwrap();
        let u1: Uuid = shop.profile_id("u1").await.parse().unwrap();
        let u2: Uuid = shop.profile_id("u2").await.parse().unwrap();
        let keys_before = profile_keys(&owner, tenant).await;
        let tenant_key_before = tenant_key(&owner, tenant).await.unwrap();
        assert!(keys_before.contains_key(&u1) && keys_before.contains_key(&u2));

        let files = tempfile::tempdir().unwrap();
        let data = files.path().join("erase.jsonl");
        let keys = files.path().join("erase.keys.jsonl");
        let summary = take_backup(shop.state(), &shop.slug, &data, Some(&keys)).await;
        assert_eq!(summary.key_rows, keys_before.len() as u64 + 1);
        let data_text = std::fs::read_to_string(&data).unwrap();
        let keys_text = std::fs::read_to_string(&keys).unwrap();
        for wrapped in keys_before.values().chain([&tenant_key_before]) {
            assert!(
                !data_text.contains(wrapped.as_str()),
                "a key is in the data file"
            );
            assert!(
                keys_text.contains(wrapped.as_str()),
                "a key is missing from the key file"
            );
        }
        assert!(
            !data_text.contains("ada@erase.example"),
            "[{backend:?}] personal data is sealed in the data file"
        );
        let key_tables: BTreeSet<String> = header_tables(&keys).into_iter().collect();
        assert_eq!(
            key_tables,
            BTreeSet::from(backup::KEY_TABLES.map(str::to_owned))
        );
        assert!(header_tables(&data)
            .iter()
            .all(|table| !backup::KEY_TABLES.contains(&table.as_str())));
        // Without --keys-out, the key rows go nowhere and the summary says so.
        let alone = take_backup(
            shop.state(),
            &shop.slug,
            &files.path().join("alone.jsonl"),
            None,
        )
        .await;
        assert_eq!(
            (alone.key_rows, alone.unsaved_key_rows),
            (0, summary.key_rows)
        );

        // After the backup, u2 (and the profile merged into it) is erased.
        let receipt = shop
            .gql(
                "mutation($id: ID!) { eraseProfile(id: $id) { profileId } }",
                json!({"id": u2}),
            )
            .await;
        assert_eq!(receipt["eraseProfile"]["profileId"], json!(u2));

        // The old backup restored over the tenant, with its key file.
        let restored = restore(shop.state(), &shop.slug, &data, Some(&keys))
            .await
            .unwrap();
        assert!(restored.skipped_erased >= 3, "{restored:?}");
        assert_eq!(restored.key_rows_inserted, 0, "{restored:?}");
        assert_eq!(
            rows_of_profile(&owner, &db, tenant, u2).await,
            BTreeMap::new(),
            "[{backend:?}] nothing of the erased profile came back"
        );
        assert_eq!(
            count(
                &owner,
                "SELECT COUNT(*) FROM erasures WHERE tenant_id = $1 AND profile_id = $2",
                vec![tenant.into(), u2.into()]
            )
            .await,
            1,
            "the register of erasures is kept"
        );
        let keys_after = profile_keys(&owner, tenant).await;
        assert!(
            !keys_after.contains_key(&u2),
            "[{backend:?}] u2's key stays destroyed"
        );
        assert_eq!(keys_after.get(&u1), keys_before.get(&u1));
        assert_eq!(
            tenant_key(&owner, tenant).await,
            Some(tenant_key_before.clone())
        );
        let gone = shop
            .gql(
                "{ profileByIdentity(kind: \"user_id\", value: \"u2\") { id } }",
                json!({}),
            )
            .await;
        assert_eq!(gone["profileByIdentity"], Value::Null);
        let email = "{ profileByIdentity(kind: \"user_id\", value: \"u1\") { traits } }";
        assert_eq!(
            shop.gql(email, json!({})).await["profileByIdentity"]["traits"]["email"],
            "ada@erase.example"
        );

        // A key the target has is never replaced; a key it lacks comes from the key file.
        execute(
            &owner,
            "UPDATE profile_keys SET wrapped = $1 WHERE tenant_id = $2 AND profile_id = $3",
            vec!["NOT-A-KEY".into(), tenant.into(), u1.into()],
        )
        .await;
        restore(shop.state(), &shop.slug, &data, Some(&keys))
            .await
            .unwrap();
        assert_eq!(
            profile_keys(&owner, tenant)
                .await
                .get(&u1)
                .map(String::as_str),
            Some("NOT-A-KEY")
        );
        execute(
            &owner,
            "DELETE FROM profile_keys WHERE tenant_id = $1 AND profile_id = $2",
            vec![tenant.into(), u1.into()],
        )
        .await;
        let restored = restore(shop.state(), &shop.slug, &data, Some(&keys))
            .await
            .unwrap();
        assert_eq!(restored.key_rows_inserted, 1, "{restored:?}");
        assert_eq!(profile_keys(&owner, tenant).await, keys_after);
        assert_eq!(
            shop.gql(email, json!({})).await["profileByIdentity"]["traits"]["email"],
            "ada@erase.example"
        );

        // Into a new database, the newest data file brings the register along: even the old key
        // file then gives back no key of the erased profile.
        let newest = files.path().join("newest.jsonl");
        take_backup(shop.state(), &shop.slug, &newest, None).await;
        let fresh = TestDb::create(backend).await;
        let fresh_state = offline_state(&fresh, &clock).await;
        let fresh_owner = Database::connect(&fresh.owner_url).await.unwrap();
        restore(&fresh_state, &shop.slug, &newest, Some(&keys))
            .await
            .unwrap();
        assert_eq!(profile_keys(&fresh_owner, tenant).await, keys_after);
        assert_eq!(
            tenant_key(&fresh_owner, tenant).await,
            Some(tenant_key_before.clone())
        );
        // The old data file with the old key file brings the erased profile back, keys and all,
        // into a database that has no record of the erasure: why operations.md says to keep few
        // key files and to restore the newest data file into new databases.
        let old = TestDb::create(backend).await;
        let old_state = offline_state(&old, &clock).await;
        let old_owner = Database::connect(&old.owner_url).await.unwrap();
        restore(&old_state, &shop.slug, &data, Some(&keys))
            .await
            .unwrap();
        assert_eq!(profile_keys(&old_owner, tenant).await, keys_before);
        // Without the key file, no key is restored.
        let keyless = TestDb::create(backend).await;
        let keyless_state = offline_state(&keyless, &clock).await;
        let keyless_owner = Database::connect(&keyless.owner_url).await.unwrap();
        let restored = restore(&keyless_state, &shop.slug, &data, None)
            .await
            .unwrap();
        assert_eq!(restored.key_rows_inserted, 0);
        assert_eq!(tenant_key(&keyless_owner, tenant).await, None);
        assert_eq!(profile_keys(&keyless_owner, tenant).await, BTreeMap::new());
        drop((fresh_state, old_state, keyless_state));
        shop.server.stop().await;
    }
}
