//! The durable outbox: queued email survives a restart, is sent once, and failures retry with
//! backoff until they succeed or are marked FAILED.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

async fn outbox_rows(db: &TestDb, tenant_id: &str) -> Vec<api::store::outbox::OutboxRow> {
    let store = api::store::Store::connect(&api::store::StoreOptions {
        url: db.service_url.clone(),
        max_connections: 1,
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
