//! The events table partitioned by time on PostgreSQL (ADR 0011): the conversion keeps every
//! event and duplicate detection, ingestion afterwards still skips duplicates, the scheduler
//! creates partitions ahead and drops expired ones with the counts kept right, and an event
//! outside every range lands in the DEFAULT partition. PostgreSQL only: SQLite has no partitions.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::{json, Value};

use crate::support::*;

fn skip() -> bool {
    if postgres_admin_url().is_none() {
        eprintln!(
            "skipped: partitions of the events table exist only on PostgreSQL; set \
             CDP_TEST_POSTGRES_URL to run these tests"
        );
        return true;
    }
    false
}

/// A database, not partitioned (whatever `CDP_TEST_PARTITION_EVENTS` says), and its owner.
async fn plain_database() -> (Arc<TestDb>, DatabaseConnection) {
    let db = TestDb::create(Backend::Postgres).await;
    let owner = Database::connect(&db.owner_url).await.unwrap();
    (db, owner)
}

async fn partitioned(owner: &DatabaseConnection) -> bool {
    number(
        owner,
        "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'events'::regclass",
    )
    .await
        == 1
}

/// Converts as `cdp events partition --interval month` does (as the owner).
async fn convert(db: &TestDb) -> api::store::partitions::Conversion {
    let store = api::store::Store::connect(&api::store::StoreOptions {
        url: db.owner_url.clone(),
        max_connections: 2,
        min_connections: 1,
    })
    .await
    .unwrap();
    api::store::partitions::convert(&store, api::store::partitions::Interval::Month)
        .await
        .unwrap()
}

async fn number(owner: &DatabaseConnection, sql: &str) -> i64 {
    owner
        .query_one_raw(Statement::from_string(owner.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index::<i64>(0)
        .unwrap()
}

async fn texts(owner: &DatabaseConnection, sql: &str) -> Vec<String> {
    owner
        .query_all_raw(Statement::from_string(owner.get_database_backend(), sql))
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.try_get_by_index::<String>(0).unwrap())
        .collect()
}

/// The partitions of `events`, by name.
async fn partitions(owner: &DatabaseConnection) -> Vec<String> {
    texts(
        owner,
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'events'::regclass ORDER BY 1",
    )
    .await
}

fn partition_of(at: DateTime<Utc>) -> String {
    format!("events_p{}", at.format("%Y%m01"))
}

fn track(user: &str, message_id: &str, at: DateTime<Utc>) -> Value {
    json!({"type": "track", "event": "Bought", "userId": user, "messageId": message_id,
           "timestamp": at.to_rfc3339(), "properties": {"total": 10}})
}

async fn send(server: &TestServer, key: &str, messages: Vec<Value>) {
    let (status, body) = collect(server, "/v1/batch", key, &json!({"batch": messages})).await;
    assert_eq!(status, 200, "{body:#}");
}

async fn duplicates(server: &TestServer, token: &str) -> i64 {
    data_quality(server, token)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|source| source["duplicates"].as_i64().unwrap())
        .sum()
}

/// (eventCount, events stored) of a user's profile, read through GraphQL.
async fn counts(server: &TestServer, token: &str, user: &str) -> (i64, i64) {
    let profile = profile_by(server, token, "user_id", user).await;
    (
        profile["eventCount"].as_i64().unwrap(),
        profile["events"]["totalCount"].as_i64().unwrap(),
    )
}

#[tokio::test]
async fn converting_keeps_every_event_and_duplicates_are_still_skipped() {
    if skip() {
        return;
    }
    init_logs();
    let smtp = SmtpSink::start().await;
    let (db, owner) = plain_database().await;
    let server = TestServer::start_on(db.clone(), Some(&smtp), |_| {}).await;
    let session = new_tenant(&server, &smtp, &slug("parts"), "owner@parts.example").await;
    let key = write_key(&server, &session, "web", "WEB").await;
    let token = session.access_token.as_str();
    let now = Utc::now();
    // Imported history over two years, and today.
    let history: Vec<Value> = (0..24)
        .map(|month| {
            track(
                "ada",
                &format!("m-{month}"),
                now - Duration::days(30 * month),
            )
        })
        .collect();
    send(&server, &key, history.clone()).await;
    server.stop().await;
    if partitioned(&owner).await {
        // CDP_TEST_PARTITION_EVENTS made the database partitioned already.
        return;
    }

    let conversion = convert(&db).await;
    assert!(partitioned(&owner).await);
    assert_eq!(conversion.events, 24);
    // One partition per month with events (24 months), the ones ahead, the default one.
    let names = partitions(&owner).await;
    assert!(names.contains(&"events_default".to_owned()), "{names:?}");
    for month in 0..24 {
        let name = partition_of(now - Duration::days(30 * month));
        assert!(names.contains(&name), "{name} missing: {names:?}");
    }
    assert_eq!(conversion.partitions, i64::try_from(names.len()).unwrap());
    assert_eq!(number(&owner, "SELECT count(*) FROM events").await, 24);
    assert_eq!(
        number(&owner, "SELECT count(*) FROM events_default").await,
        0,
        "every converted event has its month's partition"
    );
    assert_eq!(
        number(&owner, "SELECT count(*) FROM event_message_ids").await,
        24
    );
    // The schema stays distributable by tenant_id after the conversion.
    let violations = crate::citus::violations(&owner).await;
    assert!(violations.is_empty(), "{violations:?}");

    let server = TestServer::start_on(db.clone(), Some(&smtp), |_| {}).await;
    assert_eq!(counts(&server, token, "ada").await, (24, 24));
    let before = duplicates(&server, token).await;
    // The whole history again, plus one new message twice in one batch and once more after.
    let mut again = history.clone();
    again.push(track("ada", "m-new", now));
    again.push(track("ada", "m-new", now));
    send(&server, &key, again).await;
    send(&server, &key, vec![track("ada", "m-new", now)]).await;
    assert_eq!(duplicates(&server, token).await - before, 24 + 1 + 1);
    assert_eq!(counts(&server, token, "ada").await, (25, 25));
    assert_eq!(
        number(&owner, "SELECT count(*) FROM event_message_ids").await,
        25
    );
    server.stop().await;
}

#[tokio::test]
async fn the_scheduler_creates_partitions_ahead_and_drops_expired_ones_keeping_counts() {
    if skip() {
        return;
    }
    init_logs();
    let smtp = SmtpSink::start().await;
    let (db, owner) = plain_database().await;
    if !partitioned(&owner).await {
        convert(&db).await;
    }
    // Mid-month, an hour past midnight UTC: far from every boundary.
    let start = Utc.with_ymd_and_hms(2030, 3, 15, 1, 0, 0).single().unwrap();
    let clock = Arc::new(ManualClock::new(start));
    let server = TestServer::start_with_clock(
        db.clone(),
        Some(&smtp),
        |config| config.events_retention_days = Some(60),
        clock.clone(),
    )
    .await;
    let session = new_tenant(&server, &smtp, &slug("ticks"), "owner@ticks.example").await;
    let key = write_key(&server, &session, "web", "WEB").await;
    let token = session.access_token.as_str();
    let state = server.app.as_ref().unwrap().state();

    // The first tick creates March 2030 and the three months after it.
    let report = api::jobs::scheduler::tick(state).await.unwrap();
    assert_eq!(report.failed_tenants, 0);
    assert_eq!(report.event_partitions_created, 4, "{report:?}");
    let names = partitions(&owner).await;
    for month in [
        "events_p20300301",
        "events_p20300401",
        "events_p20300501",
        "events_p20300601",
    ] {
        assert!(
            names.contains(&month.to_owned()),
            "{month} missing: {names:?}"
        );
    }
    // A second tick on another replica's behalf finds them made.
    assert_eq!(
        api::jobs::scheduler::tick(state)
            .await
            .unwrap()
            .event_partitions_created,
        0
    );

    // Ada: three events in March, and one imported from 2020 (no partition: the default one).
    // Grace: one event in March. Ada again: one in May (not yet arrived, so sent later).
    let old = Utc.with_ymd_and_hms(2020, 6, 1, 0, 0, 0).single().unwrap();
    send(
        &server,
        &key,
        vec![
            track("ada", "a-1", start - Duration::days(1)),
            track("ada", "a-2", start - Duration::days(2)),
            track("ada", "a-3", start),
            track("ada", "a-old", old),
            track("grace", "g-1", start),
        ],
    )
    .await;
    assert_eq!(
        texts(
            &owner,
            "SELECT tableoid::regclass::text FROM events WHERE message_id = 'a-old'"
        )
        .await,
        ["events_default"],
        "an event outside every range lands in the default partition"
    );
    assert_eq!(counts(&server, token, "ada").await, (4, 4));

    // Two and a half months later: March is older than 60 days as a whole; the 2020 event too.
    clock.set(start + Duration::days(78));
    send(
        &server,
        &key,
        vec![track("ada", "a-may", start + Duration::days(77))],
    )
    .await;
    let report = api::jobs::scheduler::tick(state).await.unwrap();
    assert_eq!(report.failed_tenants, 0, "{report:?}");
    assert_eq!(report.event_partitions_dropped, 1, "{report:?}");
    // Ada loses three March events and the 2020 one; Grace her March event.
    assert_eq!(report.events_purged, 5, "{report:?}");
    let names = partitions(&owner).await;
    assert!(!names.contains(&"events_p20300301".to_owned()), "{names:?}");
    assert!(names.contains(&"events_p20300401".to_owned()), "{names:?}");
    assert!(names.contains(&"events_p20300901".to_owned()), "{names:?}");
    assert_eq!(counts(&server, token, "ada").await, (1, 1));
    assert_eq!(counts(&server, token, "grace").await, (0, 0));

    // The message ids of the dropped events are forgotten, the others kept: a re-sent May
    // message is a duplicate, a re-sent March one is stored again (as after a row purge).
    let before = duplicates(&server, token).await;
    send(
        &server,
        &key,
        vec![
            track("ada", "a-may", start + Duration::days(77)),
            track("grace", "g-1", start + Duration::days(77)),
        ],
    )
    .await;
    assert_eq!(duplicates(&server, token).await - before, 1);
    assert_eq!(counts(&server, token, "grace").await, (1, 1));
    assert_eq!(
        number(&owner, "SELECT count(*) FROM event_message_ids").await,
        number(&owner, "SELECT count(*) FROM events").await,
    );
    server.stop().await;
}

#[tokio::test]
async fn a_partition_created_later_takes_over_its_events_from_the_default_one() {
    if skip() {
        return;
    }
    init_logs();
    let smtp = SmtpSink::start().await;
    let (db, owner) = plain_database().await;
    if !partitioned(&owner).await {
        convert(&db).await;
    }
    let start = Utc
        .with_ymd_and_hms(2031, 1, 10, 12, 0, 0)
        .single()
        .unwrap();
    let clock = Arc::new(ManualClock::new(start));
    let server = TestServer::start_with_clock(db.clone(), Some(&smtp), |_| {}, clock.clone()).await;
    let session = new_tenant(&server, &smtp, &slug("late"), "owner@late.example").await;
    let key = write_key(&server, &session, "web", "WEB").await;
    let token = session.access_token.as_str();
    let state = server.app.as_ref().unwrap().state();

    // No partition covers January 2031 before the scheduler's tick: the event waits in the
    // default partition, and is found and counted as any other.
    send(&server, &key, vec![track("ada", "late-1", start)]).await;
    assert_eq!(
        texts(
            &owner,
            "SELECT tableoid::regclass::text FROM events WHERE message_id = 'late-1'"
        )
        .await,
        ["events_default"]
    );
    let report = api::jobs::scheduler::tick(state).await.unwrap();
    assert_eq!(report.event_partitions_created, 4, "{report:?}");
    assert_eq!(report.events_purged, 0, "no retention is configured");
    assert_eq!(
        texts(
            &owner,
            "SELECT tableoid::regclass::text FROM events WHERE message_id = 'late-1'"
        )
        .await,
        ["events_p20310101"]
    );
    assert_eq!(counts(&server, token, "ada").await, (1, 1));
    let before = duplicates(&server, token).await;
    send(&server, &key, vec![track("ada", "late-1", start)]).await;
    assert_eq!(duplicates(&server, token).await - before, 1);
    server.stop().await;
}
