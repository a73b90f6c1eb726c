//! Campaigns: triggered emails. (Being built: see issue "Activate".)

use chrono::{DateTime, Utc};

use super::bus::Notice;
use crate::store::{Backend, StoreResult, TenantTx};

/// Queues the campaign emails that `notices` trigger, in the caller's transaction.
pub async fn trigger(
    _tx: &TenantTx,
    _backend: Backend,
    _notices: &[Notice],
    _now: DateTime<Utc>,
) -> StoreResult<Vec<Notice>> {
    Ok(Vec::new())
}
