//! The outbox worker: claims due emails through a system transaction, sends them, and records
//! the result. A claim is a lease: if this process dies between claim and send, the lease expires
//! and another worker (or this one after a restart) sends the email, with the same Message-ID.
//! Retries back off exponentially with jitter; after the last attempt the email is FAILED.
//! Campaign emails are rendered here, for their profile as it is at send time, and are suppressed
//! instead of sent when the consent was withdrawn since they were queued; a change of a campaign
//! email's status is published on the bus after its commit.

use std::time::Duration;

use futures::StreamExt;
use rand::Rng;

use domain::TenantId;

use super::Shutdown;
use crate::mail::{Mailer, OutgoingEmail};
use crate::service::bus::Notice;
use crate::service::campaigns::{self, Prepared};
use crate::service::AppState;
use crate::store::{self, outbox::OutboxRow};

/// How many emails one claim takes at most.
const BATCH: u64 = 20;
/// How many of its claimed emails one worker sends at the same time.
const SEND_CONCURRENCY: usize = 8;

/// Runs until shutdown, polling for due emails.
pub async fn run(state: AppState, mailer: Mailer, mut shutdown: Shutdown) {
    let poll = state.config.outbox_poll_interval;
    loop {
        match process_due(&state, &mailer).await {
            // A full batch means more may be waiting: go again at once.
            Ok(count) if count as u64 >= BATCH => continue,
            Ok(_) => {}
            Err(error) => tracing::error!(error = ?error, "outbox worker failed; retrying"),
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

/// Claims and sends one batch. Returns how many emails were claimed.
pub async fn process_due(state: &AppState, mailer: &Mailer) -> anyhow::Result<usize> {
    let now = state.now();
    let lease_until = now + chrono::Duration::from_std(state.config.outbox_lease)?;
    let tx = state.store.begin_system("outbox: claim due emails").await?;
    let claimed =
        store::outbox::claim_due(&tx, state.store.backend(), now, lease_until, BATCH).await?;
    tx.commit().await?;
    // SMTP is latency-bound (a round trip per command, and lettre's separate write of the final
    // dot often waits for a delayed ACK): the claimed emails go out a few at a time, each on its
    // own pooled connection, and each records its own result.
    let count = claimed.len();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(claimed)
        .map(|row: OutboxRow| async move { deliver(state, mailer, &row).await })
        .buffer_unordered(SEND_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<()>>()?;
    Ok(count)
}

async fn deliver(state: &AppState, mailer: &Mailer, row: &OutboxRow) -> anyhow::Result<()> {
    // Campaign emails are queued without an attempt limit of their own (they are queued inside
    // write transactions that do not know the configuration): the worker's applies.
    let configured;
    let row = if row.max_attempts <= 0 {
        configured = OutboxRow {
            max_attempts: state.config.outbox_max_attempts,
            ..row.clone()
        };
        &configured
    } else {
        row
    };
    let email = if row.campaign_id.is_some() {
        match campaigns::prepare(state, row).await {
            Ok(Prepared::Send(email)) => *email,
            Ok(Prepared::Hold) => {
                let tx = state
                    .store
                    .begin_system("outbox: hold a paused campaign's email")
                    .await?;
                store::outbox::release(&tx, row, state.now() + campaigns::PAUSED_RETRY).await?;
                tx.commit().await?;
                return Ok(());
            }
            Ok(Prepared::Suppress(reason)) => {
                let tx = state
                    .store
                    .begin_system("outbox: suppress an email")
                    .await?;
                store::outbox::mark_suppressed(&tx, row, reason, state.now()).await?;
                tx.commit().await?;
                tracing::info!(email_id = %row.id, tenant_id = %row.tenant_id, reason, "email suppressed");
                state.metrics.email("suppressed");
                publish(state, row, store::outbox::SUPPRESSED).await;
                return Ok(());
            }
            Ok(Prepared::Fail(reason)) => {
                record_failure(state, row, &reason, true).await?;
                return Ok(());
            }
            Err(error) => {
                record_failure(state, row, &format!("cannot prepare: {error}"), false).await?;
                return Ok(());
            }
        }
    } else {
        OutgoingEmail {
            message_id: row.message_id.clone(),
            to: row.to_address.clone(),
            subject: row.subject.clone(),
            text_body: row.text_body.clone(),
            html_body: row.html_body.clone(),
            headers: row
                .headers
                .as_object()
                .map(|headers| {
                    headers
                        .iter()
                        .filter_map(|(name, value)| {
                            value.as_str().map(|value| (name.clone(), value.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    };
    match mailer.send(&state.config.mail_from, &email).await {
        Ok(()) => {
            let tx = state.store.begin_system("outbox: record delivery").await?;
            store::outbox::mark_sent(&tx, row, state.now()).await?;
            tx.commit().await?;
            tracing::info!(email_id = %row.id, tenant_id = %row.tenant_id, kind = %row.kind, "email sent");
            state.metrics.email("sent");
            publish(state, row, store::outbox::SENT).await;
        }
        Err(error) => record_failure(state, row, &error.message, error.permanent).await?,
    }
    Ok(())
}

/// Records a failed attempt: retried later with backoff, or FAILED for good.
async fn record_failure(
    state: &AppState,
    row: &OutboxRow,
    error: &str,
    permanent: bool,
) -> anyhow::Result<()> {
    // Mail servers repeat the recipient in their answers: masked before it is stored or logged.
    let masked = domain::pii::mask_free_text(error);
    let error = masked.as_str();
    let retry_after = backoff(state.config.outbox_backoff_base, row.attempts);
    let tx = state.store.begin_system("outbox: record delivery").await?;
    let status = store::outbox::mark_attempt_failed(
        &tx,
        row,
        error,
        permanent,
        chrono::Duration::from_std(retry_after)?,
        state.now(),
    )
    .await?;
    tx.commit().await?;
    tracing::warn!(email_id = %row.id, tenant_id = %row.tenant_id, attempts = row.attempts, status, error = %error, "email not sent");
    if status == store::outbox::FAILED {
        state.metrics.email("failed");
        publish(state, row, store::outbox::FAILED).await;
    } else {
        state.metrics.email("retried");
    }
    Ok(())
}

/// Tells subscribers, after the commit, that a campaign email changed status: this process's on
/// the bus, other processes' through the fan-out (PostgreSQL), in a small tenant transaction of
/// its own. A failure to announce is logged; the delivery row stays the durable record.
async fn publish(state: &AppState, row: &OutboxRow, status: &'static str) {
    if row.campaign_id.is_none() {
        return;
    }
    let notice = Notice::EmailDelivery {
        tenant_id: TenantId(row.tenant_id),
        delivery_id: row.id,
        campaign_id: row.campaign_id,
        status,
    };
    let backend = state.store.backend();
    if backend == store::Backend::Postgres {
        let announced = async {
            let tx = state.store.begin(TenantId(row.tenant_id)).await?;
            crate::service::fanout::announce(&tx, backend, std::slice::from_ref(&notice)).await?;
            tx.commit().await
        };
        if let Err(error) = announced.await {
            tracing::warn!(email_id = %row.id, error = %error, "email status not announced to other processes");
        }
    }
    state.bus.publish([notice]);
}

/// Exponential backoff with full jitter over the upper half: base × 2^(attempt-1), between 50 %
/// and 100 % of that, capped at one hour.
pub fn backoff(base: Duration, attempt: i32) -> Duration {
    let exponent = attempt.clamp(1, 16) as u32 - 1;
    let ceiling = base
        .saturating_mul(1u32 << exponent)
        .min(Duration::from_secs(3600));
    let factor = rand::thread_rng().gen_range(0.5..=1.0);
    ceiling.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let base = Duration::from_secs(10);
        for attempt in 1..10 {
            let delay = backoff(base, attempt);
            let ceiling = base * (1 << (attempt - 1));
            assert!(delay <= ceiling.min(Duration::from_secs(3600)));
            assert!(delay >= ceiling.min(Duration::from_secs(3600)) / 2);
        }
        assert!(backoff(base, 40) <= Duration::from_secs(3600));
    }
}
