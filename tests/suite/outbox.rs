//! The durable outbox: queued email survives a restart, is sent once, and failures retry with
//! backoff until they succeed or are marked FAILED.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

async fn outbox_rows(db: &TestDb, tenant_id: &str) -> Vec<api::store::outbox::OutboxRow> {
    let store = api::store::Store::connect(&api::store::StoreOptions {
        url: db.service_url.clone(),
        max_connections: 1,
        min_connections: 1,
    })
    .await
    .unwrap();
    let tx = store.read(tenant_id.parse().unwrap()).await.unwrap();
    api::store::outbox::list(&tx).await.unwrap()
}

/// Polls the outbox until `done` holds, or fails after the deadline.
async fn wait_for_outbox(
    db: &TestDb,
    tenant_id: &str,
    done: impl Fn(&[api::store::outbox::OutboxRow]) -> bool,
) -> Vec<api::store::outbox::OutboxRow> {
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = outbox_rows(db, tenant_id).await;
        if done(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "outbox never reached the expected state: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn an_email_queued_before_a_restart_is_sent_once_after_it() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        // The first process queues but has no outbox worker, as if it died before sending.
        let first =
            TestServer::start_on(db.clone(), Some(&smtp), |config| config.outbox_workers = 0).await;
        let signed_up = first
            .gql_ok(None, SIGN_UP, json!({"input": {"tenantName": "Restart", "tenantSlug": slug("restart"), "email": "owner@restart.example"}}))
            .await;
        let tenant_id = signed_up["signUp"]["tenant"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        first.stop().await;
        assert!(smtp.received().is_empty());
        let rows = outbox_rows(&db, &tenant_id).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, "QUEUED");

        let second = TestServer::start_on(db.clone(), Some(&smtp), |_| {}).await;
        let rows = wait_for_outbox(&db, &tenant_id, |rows| {
            rows.iter().all(|row| row.status == "SENT")
        })
        .await;
        assert_eq!(rows[0].attempts, 1);
        let mails = smtp.received();
        assert_eq!(mails.len(), 1, "sent exactly once");
        assert_eq!(mails[0].header("Message-ID").unwrap(), rows[0].message_id);
        assert!(mails[0].text().contains("/activate?token=act_"));
        second.stop().await;
    }
}

#[tokio::test]
async fn a_refusing_smtp_server_leads_to_retries_and_then_failed() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let server = TestServer::start_on(db.clone(), Some(&smtp), |config| {
            config.outbox_max_attempts = 3
        })
        .await;

        // A transient refusal, then success.
        smtp.fail_next(vec![451]);
        let signed_up = server
            .gql_ok(None, SIGN_UP, json!({"input": {"tenantName": "Retry", "tenantSlug": slug("retry"), "email": "owner@retry.example"}}))
            .await;
        let tenant_id = signed_up["signUp"]["tenant"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let rows = wait_for_outbox(&db, &tenant_id, |rows| {
            rows.iter().all(|row| row.status == "SENT")
        })
        .await;
        assert_eq!(rows[0].attempts, 2);
        assert_eq!(smtp.received().len(), 1);

        // Transient refusals until the attempts run out: FAILED, with the last error kept.
        smtp.fail_next(vec![451, 451, 451]);
        let signed_up = server
            .gql_ok(None, SIGN_UP, json!({"input": {"tenantName": "Fail", "tenantSlug": slug("fail"), "email": "owner@fail.example"}}))
            .await;
        let tenant_id = signed_up["signUp"]["tenant"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let rows = wait_for_outbox(&db, &tenant_id, |rows| {
            rows.iter().all(|row| row.status == "FAILED")
        })
        .await;
        assert_eq!(rows[0].attempts, 3);
        assert!(rows[0].last_error.as_deref().unwrap().contains("451"));

        // A permanent refusal fails at once.
        smtp.fail_next(vec![554]);
        let signed_up = server
            .gql_ok(None, SIGN_UP, json!({"input": {"tenantName": "Perm", "tenantSlug": slug("perm"), "email": "owner@perm.example"}}))
            .await;
        let tenant_id = signed_up["signUp"]["tenant"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let rows = wait_for_outbox(&db, &tenant_id, |rows| {
            rows.iter().all(|row| row.status == "FAILED")
        })
        .await;
        assert_eq!(rows[0].attempts, 1);
        assert_eq!(
            smtp.received().len(),
            1,
            "nothing but the first email was delivered"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn without_smtp_mail_lands_in_the_mailbox_folder() {
    let db = TestDb::create(Backend::Sqlite).await;
    let server = TestServer::start_on(db.clone(), None, |_| {}).await;
    let signed_up = server
        .gql_ok(None, SIGN_UP, json!({"input": {"tenantName": "Box", "tenantSlug": slug("box"), "email": "owner@box.example"}}))
        .await;
    let tenant_id = signed_up["signUp"]["tenant"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_outbox(&db, &tenant_id, |rows| {
        rows.iter().all(|row| row.status == "SENT")
    })
    .await;
    let files: Vec<_> = std::fs::read_dir(db.data_dir.join("mail"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "eml"))
        .collect();
    assert_eq!(files.len(), 1);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(text.contains("owner@box.example"));
    assert!(
        text.contains("/activate?token=3Dact_") || text.contains("/activate?token=act_"),
        "{text}"
    );
    server.stop().await;
}

/// A tenant with a write key and an active campaign on `trigger`, set up through `server`.
async fn tenant_with_campaign(
    server: &TestServer,
    smtp: &SmtpSink,
    name: &str,
    trigger: serde_json::Value,
) -> (Session, String, String) {
    let owner = new_tenant(server, smtp, &slug(name), &format!("owner@{name}.example")).await;
    let key = write_key(server, &owner, name, "SERVER").await;
    let token = Some(owner.access_token.as_str());
    let data = server
        .gql_ok(
            token,
            "mutation($input: CampaignInput!) { createCampaign(input: $input) { id } }",
            json!({"input": {"name": name, "trigger": trigger, "subject": "Hi {{ profile.traits.n }}", "textBody": "Hello"}}),
        )
        .await;
    let campaign = data["createCampaign"]["id"].as_str().unwrap().to_owned();
    (owner, key, campaign)
}

fn consenting(user: &str, n: usize) -> serde_json::Value {
    json!({"type": "identify", "userId": user, "messageId": uuid::Uuid::new_v4().to_string(),
        "traits": {"email": format!("{user}@example.com"), "plan": "pro", "n": n},
        "context": {"consent": {"categoryPreferences": {"email_marketing": true}}}})
}

#[tokio::test]
async fn two_processes_with_several_workers_on_one_database_never_send_an_email_twice() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let first =
            TestServer::start_on(db.clone(), Some(&smtp), |config| config.outbox_workers = 4).await;
        let second =
            TestServer::start_on(db.clone(), Some(&smtp), |config| config.outbox_workers = 4).await;
        let owner = new_tenant(&first, &smtp, &slug("twice"), "owner@twice.example").await;
        let key = write_key(&first, &owner, "twice", "SERVER").await;
        const MEMBERS: usize = 120;
        let batch: Vec<_> = (0..MEMBERS)
            .map(|n| consenting(&format!("p{n}"), n))
            .collect();
        let (status, _) = collect(&first, "/v1/batch", &key, &json!({"batch": batch})).await;
        assert_eq!(status, 200);
        let token = Some(owner.access_token.as_str());
        let segment = first
            .gql_ok(
                token,
                "mutation { createSegment(input: {name: \"Pro\", condition: {trait: \"plan\", op: \"eq\", value: \"pro\"}}) { id } }",
                json!({}),
            )
            .await["createSegment"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let campaign = first
            .gql_ok(
                token,
                "mutation($input: CampaignInput!) { createCampaign(input: $input) { id } }",
                json!({"input": {"name": "All", "trigger": {"broadcastSegment": segment}, "subject": "Hi", "textBody": "Hello"}}),
            )
            .await["createCampaign"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        second
            .gql_ok(
                token,
                "mutation($id: ID!) { setCampaignStatus(id: $id, status: ACTIVE) { id } }",
                json!({"id": campaign}),
            )
            .await;
        let rows = wait_for_outbox(&db, &owner.tenant_id, |rows| {
            let campaign_rows: Vec<_> = rows
                .iter()
                .filter(|row| row.campaign_id.is_some())
                .collect();
            campaign_rows.len() == MEMBERS && campaign_rows.iter().all(|row| row.status == "SENT")
        })
        .await;
        // Every SMTP transaction happens before its SENT is recorded: nothing more can arrive.
        first.stop().await;
        second.stop().await;
        let mut ids: Vec<String> = smtp
            .received()
            .iter()
            .filter_map(|mail| mail.header("Message-ID"))
            .filter(|id| id.contains("@campaign.cdp"))
            .collect();
        assert_eq!(ids.len(), MEMBERS, "[{backend:?}] one email per member");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), MEMBERS, "[{backend:?}] no Message-ID twice");
        assert!(rows
            .iter()
            .filter(|row| row.campaign_id.is_some())
            .all(|row| row.attempts == 1));
    }
}

#[tokio::test]
async fn a_campaign_email_claimed_by_a_process_that_died_is_sent_once_after_its_lease() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let db = TestDb::create(backend).await;
        let setup = TestServer::start_on(db.clone(), Some(&smtp), |_| {}).await;
        let (owner, key, campaign) =
            tenant_with_campaign(&setup, &smtp, "lease", json!({"event": "Ping"})).await;
        setup
            .gql_ok(
                Some(&owner.access_token),
                "mutation($id: ID!) { setCampaignStatus(id: $id, status: ACTIVE) { id } }",
                json!({"id": campaign}),
            )
            .await;
        setup.stop().await;
        let before = smtp.received().len();

        // Queued by a process without a worker.
        let quiet =
            TestServer::start_on(db.clone(), Some(&smtp), |config| config.outbox_workers = 0).await;
        let ping = json!({"type": "track", "userId": "p0", "event": "Ping", "messageId": "ping-1"});
        let (status, _) = collect(
            &quiet,
            "/v1/batch",
            &key,
            &json!({"batch": [consenting("p0", 7), ping]}),
        )
        .await;
        assert_eq!(status, 200);
        quiet.stop().await;

        // A worker claims it and dies before sending.
        let store = api::store::Store::connect(&api::store::StoreOptions {
            url: db.service_url.clone(),
            max_connections: 1,
            min_connections: 1,
        })
        .await
        .unwrap();
        let now = chrono::Utc::now();
        let tx = store
            .begin_system("test: a worker that dies")
            .await
            .unwrap();
        let claimed = api::store::outbox::claim_due(
            &tx,
            store.backend(),
            now,
            now + chrono::Duration::minutes(5),
            10,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(
            claimed[0].campaign_id.map(|id| id.to_string()),
            Some(campaign.clone())
        );

        // After a restart, the email is sent once its lease has run out.
        let clock = std::sync::Arc::new(ManualClock::new(now));
        let restarted =
            TestServer::start_with_clock(db.clone(), Some(&smtp), |_| {}, clock.clone()).await;
        clock.advance(chrono::Duration::minutes(6));
        let rows = wait_for_outbox(&db, &owner.tenant_id, |rows| {
            rows.iter()
                .any(|row| row.campaign_id.is_some() && row.status == "SENT")
        })
        .await;
        restarted.stop().await;
        let row = rows.iter().find(|row| row.campaign_id.is_some()).unwrap();
        assert_eq!(row.attempts, 2, "the dead claim counts as an attempt");
        let mails = smtp.received();
        assert_eq!(mails.len(), before + 1, "[{backend:?}] sent exactly once");
        assert_eq!(mails[before].header("Message-ID").unwrap(), row.message_id);
        assert_eq!(mails[before].decoded_header("Subject").unwrap(), "Hi 7");
    }
}
