//! The webhook worker: claims due deliveries through a system transaction, POSTs them signed, and
//! records each attempt. A claim is a lease: if this process dies between claim and answer, the
//! lease expires and another worker sends the delivery again, with the same `Webhook-Id`.
//! Failures (a non-2xx answer, a timeout, a refused connection) are retried with exponential
//! backoff and jitter; after the last attempt the delivery is FAILED.

use std::time::Duration;

use futures::StreamExt;

use super::Shutdown;
use crate::service::{webhooks, AppState};
use crate::store::{self, webhooks::DeliveryRow};

/// How many deliveries one claim takes at most.
const BATCH: u64 = 20;
/// How many of a batch are in flight at once.
const CONCURRENCY: usize = 8;
/// The longest error text kept per attempt.
const MAX_ERROR: usize = 500;

/// Runs until shutdown, polling for due deliveries.
pub async fn run(state: AppState, mut shutdown: Shutdown) {
    let client = match client(&state) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(error = ?error, "webhook worker cannot build its HTTP client");
            return;
        }
    };
    let poll = state.config.webhook_poll_interval;
    loop {
        match process_due(&state, &client).await {
            // A full batch means more may be waiting: go again at once.
            Ok(count) if count as u64 >= BATCH && !*shutdown.borrow() => continue,
            Ok(_) => {}
            Err(error) => tracing::error!(error = ?error, "webhook worker failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// The HTTP client of the worker: the configured timeout per request, and no redirects (a
/// redirect is an answer that is not 2xx, so it cannot lead a delivery elsewhere).
pub fn client(state: &AppState) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(state.config.webhook_timeout)
        .connect_timeout(state.config.webhook_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cdp-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// How long a claim holds: long enough for a whole batch at the request timeout.
fn lease(state: &AppState) -> Duration {
    state.config.webhook_timeout * 2 + Duration::from_secs(30)
}

/// Claims and sends one batch. Returns how many deliveries were claimed.
pub async fn process_due(state: &AppState, client: &reqwest::Client) -> anyhow::Result<usize> {
    let now = state.now();
    let lease_until = now + chrono::Duration::from_std(lease(state))?;
    let tx = state
        .store
        .begin_system("webhooks: claim due deliveries")
        .await?;
    let claimed =
        store::webhooks::claim_due(&tx, state.store.backend(), now, lease_until, BATCH).await?;
    tx.commit().await?;
    let count = claimed.len();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(claimed)
        .map(|row| async move { deliver(state, client, &row).await })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for result in results {
        result?;
    }
    Ok(count)
}

async fn deliver(
    state: &AppState,
    client: &reqwest::Client,
    row: &DeliveryRow,
) -> anyhow::Result<()> {
    let tenant_id = domain::TenantId(row.tenant_id);
    let webhook = {
        let tx = state.store.read(tenant_id).await?;
        let webhook = store::webhooks::get(&tx, row.webhook_id).await?;
        tx.commit().await?;
        webhook
    };
    // Deleted since the claim: its deliveries went with it.
    let Some(webhook) = webhook else {
        return Ok(());
    };
    let outcome = if webhook.active {
        post(state, client, row, &webhook).await
    } else {
        Err((None, "the webhook is inactive".to_owned()))
    };
    let now = state.now();
    let attempt = match &outcome {
        Ok(code) => store::webhooks::Attempt {
            at: now,
            status_code: Some(*code),
            error: None,
        },
        Err((code, error)) => store::webhooks::Attempt {
            at: now,
            status_code: *code,
            error: Some(truncate(error)),
        },
    };
    let (status, next_attempt_at) = match &outcome {
        Ok(_) => (store::webhooks::SENT, now),
        Err(_) if !webhook.active || row.attempts >= state.config.webhook_max_attempts => {
            (store::webhooks::FAILED, now)
        }
        Err(_) => {
            let retry_after =
                super::outbox::backoff(state.config.webhook_backoff_base, row.attempts);
            (
                store::webhooks::QUEUED,
                now + chrono::Duration::from_std(retry_after)?,
            )
        }
    };
    let tx = state
        .store
        .begin_system("webhooks: record delivery attempt")
        .await?;
    store::webhooks::record_attempt(&tx, row, &attempt, status, next_attempt_at).await?;
    tx.commit().await?;
    match &outcome {
        Ok(code) => tracing::info!(
            delivery_id = %row.id, tenant_id = %row.tenant_id, webhook_id = %row.webhook_id,
            status_code = code, "webhook delivered"
        ),
        Err((_, error)) => tracing::warn!(
            delivery_id = %row.id, tenant_id = %row.tenant_id, webhook_id = %row.webhook_id,
            attempts = row.attempts, status, error = %error, "webhook not delivered"
        ),
    }
    Ok(())
}

/// POSTs one delivery, signed. Ok with the 2xx status, or the status (if any) and why it failed.
async fn post(
    state: &AppState,
    client: &reqwest::Client,
    row: &DeliveryRow,
    webhook: &store::webhooks::WebhookRow,
) -> Result<i32, (Option<i32>, String)> {
    let body = serde_json::to_string(&row.payload)
        .map_err(|error| (None, format!("cannot encode the payload: {error}")))?;
    let keys = state
        .vault
        .tenant_of(&state.store, domain::TenantId(row.tenant_id))
        .await
        .map_err(|error| (None, format!("cannot read the tenant key: {error}")))?
        .ok_or_else(|| (None, "the tenant has no key".to_owned()))?;
    let secret = webhooks::derive_secret(
        &webhooks::signing_key(&keys),
        domain::TenantId(row.tenant_id),
        webhook.id,
        &webhook.secret_salt,
    );
    let timestamp = state.now().timestamp();
    let signature = webhooks::signature(&secret, timestamp, &body);
    let response = client
        .post(&webhook.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Webhook-Id", row.id.to_string())
        .header("Webhook-Timestamp", timestamp.to_string())
        .header("Webhook-Signature", signature)
        .body(body)
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status();
            let code = i32::from(status.as_u16());
            if status.is_success() {
                Ok(code)
            } else {
                Err((Some(code), format!("answered HTTP {status}")))
            }
        }
        Err(error) if error.is_timeout() => Err((
            None,
            format!(
                "timed out after {} s",
                state.config.webhook_timeout.as_secs_f64()
            ),
        )),
        Err(error) => Err((None, chain(&error.without_url()))),
    }
}

/// An error with its causes, which say what actually went wrong (refused, DNS, TLS).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn truncate(text: &str) -> String {
    text.chars().take(MAX_ERROR).collect()
}
