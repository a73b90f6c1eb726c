//! Webhooks: signed HTTP deliveries of changes. (Being built: see issue "Activate".)

use chrono::{DateTime, Utc};

use super::bus::Notice;
use crate::store::{Backend, StoreResult, TenantTx};

/// Queues the webhook deliveries that `notices` trigger, in the caller's transaction.
pub async fn enqueue(
    _tx: &TenantTx,
    _backend: Backend,
    _notices: &[Notice],
    _now: DateTime<Utc>,
) -> StoreResult<Vec<Notice>> {
    Ok(Vec::new())
}
