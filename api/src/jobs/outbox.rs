//! The outbox worker: claims due emails through a system transaction, sends them, and records
//! the result. A claim is a lease: if this process dies between claim and send, the lease expires
//! and another worker (or this one after a restart) sends the email, with the same Message-ID.
//! Retries back off exponentially with jitter; after the last attempt the email is FAILED.

use std::time::Duration;

use rand::Rng;

use super::Shutdown;
use crate::mail::{Mailer, OutgoingEmail};
use crate::service::AppState;
use crate::store::{self, outbox::OutboxRow};

/// How many emails one claim takes at most.
const BATCH: u64 = 20;

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
    for row in &claimed {
        deliver(state, mailer, row).await?;
    }
    Ok(claimed.len())
}

async fn deliver(state: &AppState, mailer: &Mailer, row: &OutboxRow) -> anyhow::Result<()> {
    let email = OutgoingEmail {
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
    };
    let result = mailer.send(&state.config.mail_from, &email).await;
    let now = state.now();
    let tx = state.store.begin_system("outbox: record delivery").await?;
    match result {
        Ok(()) => {
            store::outbox::mark_sent(&tx, row, now).await?;
            tracing::info!(email_id = %row.id, tenant_id = %row.tenant_id, kind = %row.kind, "email sent");
        }
        Err(error) => {
            let retry_after = backoff(state.config.outbox_backoff_base, row.attempts);
            let status = store::outbox::mark_attempt_failed(
                &tx,
                row,
                &error.message,
                error.permanent,
                chrono::Duration::from_std(retry_after)?,
                now,
            )
            .await?;
            tracing::warn!(email_id = %row.id, tenant_id = %row.tenant_id, attempts = row.attempts, status, error = %error.message, "email not sent");
        }
    }
    tx.commit().await?;
    Ok(())
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
