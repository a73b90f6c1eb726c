//! Per-tenant ingestion settings: limits, the phone region, blocked identity values and the
//! identity rules. Stored in the tenant's `settings` document; every field has a default. The
//! ingestion path reads them through a short-lived cache that an update in this process clears.

use std::time::Duration;

use domain::identity::IdentityRules;
use domain::ingest::ParseOptions;
use domain::Permission;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::require_permission;
use super::{audit, AppState, RequestMeta, ServiceError, ServiceResult};
use crate::auth::cache::TtlCache;
use crate::auth::Principal;
use crate::store::{self, TenantTx};

/// The ingestion settings of a tenant, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct IngestSettings {
    pub max_message_bytes: usize,
    pub max_request_bytes: usize,
    pub max_batch_messages: usize,
    /// Messages per second per source (api key); 0 means no limit.
    pub rate_limit_per_second: u32,
    pub default_region: Option<String>,
    pub blocked_identity_values: Vec<String>,
    pub identity_rules: IdentityRules,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            max_message_bytes: 32 * 1024,
            max_request_bytes: 4 * 1024 * 1024,
            max_batch_messages: 2500,
            rate_limit_per_second: 20_000,
            default_region: None,
            blocked_identity_values: Vec::new(),
            identity_rules: IdentityRules::default(),
        }
    }
}

impl IngestSettings {
    pub fn parse_options(&self) -> ParseOptions {
        ParseOptions {
            max_message_bytes: self.max_message_bytes,
            default_region: self.default_region.clone(),
            blocked_values: self.blocked_identity_values.clone(),
            ..ParseOptions::default()
        }
    }
}

/// Reads the settings in a transaction of the tenant.
pub async fn load_in(tx: &TenantTx) -> ServiceResult<IngestSettings> {
    Ok(store::tenants::settings_section(tx, "ingest").await?)
}

pub async fn load(state: &AppState, tenant_id: domain::TenantId) -> ServiceResult<IngestSettings> {
    let tx = state.store.read(tenant_id).await?;
    load_in(&tx).await
}

/// How long the ingestion path reuses a tenant's settings without reading them again. An update
/// through this process applies to the next request; through another process of the same
/// deployment, within this time.
pub const CACHE_TIME_TO_LIVE: Duration = Duration::from_secs(5);

static CACHE: TtlCache<Uuid, IngestSettings> = TtlCache::new(CACHE_TIME_TO_LIVE);

/// [`load`] for the ingestion path, which reads the settings on every request: served from a
/// short-lived cache (see [`CACHE_TIME_TO_LIVE`]).
pub async fn load_cached(
    state: &AppState,
    tenant_id: domain::TenantId,
) -> ServiceResult<IngestSettings> {
    if let Some(settings) = CACHE.get(&tenant_id.as_uuid()) {
        return Ok(settings);
    }
    let ticket = CACHE.ticket();
    let settings = load(state, tenant_id).await?;
    CACHE.insert(ticket, tenant_id.as_uuid(), settings.clone());
    Ok(settings)
}

pub async fn get(state: &AppState, principal: Option<&Principal>) -> ServiceResult<IngestSettings> {
    let principal = require_permission(principal, Permission::ApiKeysManage)?;
    load(state, principal.tenant_id).await
}

/// Replaces the settings after checking them.
pub async fn update(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    settings: IngestSettings,
) -> ServiceResult<IngestSettings> {
    let principal = require_permission(principal, Permission::ApiKeysManage)?;
    if !(1024..=1024 * 1024).contains(&settings.max_message_bytes) {
        return Err(ServiceError::bad_input(
            "input.maxMessageBytes",
            "maxMessageBytes must be between 1 KB and 1 MB",
        ));
    }
    if !(1024..=64 * 1024 * 1024).contains(&settings.max_request_bytes) {
        return Err(ServiceError::bad_input(
            "input.maxRequestBytes",
            "maxRequestBytes must be between 1 KB and 64 MB",
        ));
    }
    if !(1..=10_000).contains(&settings.max_batch_messages) {
        return Err(ServiceError::bad_input(
            "input.maxBatchMessages",
            "maxBatchMessages must be between 1 and 10000",
        ));
    }
    if let Some(region) = &settings.default_region {
        if domain::ingest::normalize_region(region).is_none() {
            return Err(ServiceError::bad_input(
                "input.defaultRegion",
                format!("{region:?} is not an ISO 3166 region code such as US or DE"),
            ));
        }
    }
    for (index, (kind, rule)) in settings.identity_rules.kinds.iter().enumerate() {
        if !domain::ingest::valid_kind(kind) {
            return Err(ServiceError::bad_input(
                format!("input.identityRules[{index}].kind"),
                format!("{kind:?} is not a valid identity kind"),
            ));
        }
        if rule.limit == 0 || rule.limit > 1000 {
            return Err(ServiceError::bad_input(
                format!("input.identityRules[{index}].limit"),
                "limit must be between 1 and 1000",
            ));
        }
    }
    let tx = state.store.begin(principal.tenant_id).await?;
    let value =
        serde_json::to_value(&settings).map_err(|error| ServiceError::Unexpected(error.into()))?;
    store::tenants::set_settings_section(&tx, "ingest", value.clone()).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "settings.ingest.update",
        Some("tenant"),
        Some(value),
    )
    .await?;
    tx.commit().await?;
    // After the commit: a read that started earlier may have seen the old settings, and the
    // cache refuses it.
    CACHE.invalidate(Duration::ZERO);
    Ok(settings)
}
