//! Reactions to committed-to-be changes, inside the transaction that makes them: campaign emails
//! and webhook deliveries are queued atomically with their cause, so a rolled-back change queues
//! nothing and a committed one can never miss its email or webhook.
//!
//! Every write path calls [`react`] with the notices it is about to publish, just before its
//! commit, and publishes the returned notices with its own after the commit. On PostgreSQL
//! `react` also announces them to the other replicas (`fanout`), delivered on commit.

use chrono::{DateTime, Utc};

use super::bus::Notice;
use crate::store::{Backend, StoreResult, TenantTx};

/// Queues what `notices` trigger; returns further notices (queued deliveries) to publish.
/// `definitions` are the tenant's definitions when the caller holds them (see
/// `super::definitions`); without them the active campaigns and webhooks are read here.
pub async fn react(
    tx: &TenantTx,
    backend: Backend,
    definitions: Option<&super::definitions::Definitions>,
    notices: &[Notice],
    now: DateTime<Utc>,
) -> StoreResult<Vec<Notice>> {
    if notices.is_empty() {
        return Ok(Vec::new());
    }
    let campaigns = definitions.map(|definitions| definitions.campaigns.as_slice());
    let webhooks = definitions.map(|definitions| definitions.webhooks.as_slice());
    let mut more = super::campaigns::trigger(tx, backend, campaigns, notices, now).await?;
    more.extend(super::webhooks::enqueue(tx, backend, webhooks, notices, now).await?);
    // Other replicas learn of this transaction's notices when (and only if) it commits.
    super::fanout::announce(tx, backend, &[notices, more.as_slice()].concat()).await?;
    Ok(more)
}
