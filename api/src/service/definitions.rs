//! The tenant's definitions that every ingestion batch reads (its ready segments, its lifecycle
//! model, its active campaigns and webhooks), cached per process and keyed by the tenant's
//! `definitions_version`, which the database raises with every change to those tables (migration
//! `m20261129_000019_definitions_version`).
//!
//! The batch reads the version with the tenant's row, which it reads anyway (the privacy
//! settings), under the segment barrier; when this process holds the definitions of that version
//! it reads none of the four tables. What a batch then uses is what it would have read: a segment
//! build cannot commit while the batch holds the barrier, and any other change raises the version,
//! so the next batch reads it. Only callers that did not change definitions in their own
//! transaction may pass a version they read (the ingestion path); every other path reads the
//! definitions as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use domain::lifecycle::LifecycleModel;
use uuid::Uuid;

use super::understand::{self, Definition};
use super::webhooks::Webhook;
use crate::store::campaigns::CampaignRow;
use crate::store::{self, StoreResult, TenantTx};

/// One tenant's definitions as of one version.
pub struct Definitions {
    pub version: i64,
    pub segments: Vec<Definition>,
    pub model: LifecycleModel,
    pub campaigns: Vec<CampaignRow>,
    /// The active webhooks, their topics parsed.
    pub webhooks: Vec<Webhook>,
}

/// Tenants held at most; past it the cache starts over (each entry is a few kilobytes).
const MAX_TENANTS: usize = 10_000;

/// Keyed by the store's origin and the tenant: a version counts changes in one database, and a
/// process may hold stores of several (tests, the bench, a restore into another database).
type Key = (Uuid, Uuid);

static CACHE: Mutex<Option<HashMap<Key, Arc<Definitions>>>> = Mutex::new(None);

fn cache() -> MutexGuard<'static, Option<HashMap<Key, Arc<Definitions>>>> {
    CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The definitions of `tx`'s tenant at `version`, the `definitions_version` that `tx` read from
/// the tenant's row: this process's copy when it is of that version, else read in `tx` and kept.
pub async fn at(tx: &TenantTx, version: i64) -> StoreResult<Arc<Definitions>> {
    let key = (tx.origin(), tx.tenant_id().as_uuid());
    let held = cache()
        .as_ref()
        .and_then(|held| held.get(&key))
        .filter(|definitions| definitions.version == version)
        .cloned();
    if let Some(held) = held {
        return Ok(held);
    }
    let loaded = Arc::new(Definitions {
        version,
        segments: understand::ready_segments(tx).await?,
        model: understand::lifecycle_model(tx).await?,
        campaigns: store::campaigns::active(tx).await?,
        webhooks: store::webhooks::active(tx)
            .await?
            .into_iter()
            .map(Webhook::from)
            .collect(),
    });
    let mut guard = cache();
    let held = guard.get_or_insert_with(HashMap::new);
    if held.len() >= MAX_TENANTS && !held.contains_key(&key) {
        held.clear();
    }
    // A slow transaction that read an older version never replaces a newer copy.
    if held
        .get(&key)
        .is_none_or(|current| current.version <= version)
    {
        held.insert(key, loaded.clone());
    }
    Ok(loaded)
}
