//! Privacy: the tenant's privacy settings (its own personal-data keys, its consent purposes, its
//! event retention), the consent history, export of everything stored about a person, and
//! verifiable erasure.

use chrono::{DateTime, Utc};
use domain::pii::PiiKeys;
use domain::Permission;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::require_permission;
use super::{audit, AppState, RequestMeta, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::store::{self, TenantTx};

/// The consent purposes every tenant starts with.
pub const DEFAULT_PURPOSES: [&str; 4] = [
    "email_marketing",
    "analytics",
    "personalization",
    "advertising",
];

/// Most extra personal-data keys and purposes a tenant may name.
const MAX_LIST: usize = 100;

/// A tenant's privacy settings, as stored in its settings document under `privacy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PrivacySettings {
    /// Trait and property keys that hold personal data beyond the built-in ones
    /// (`domain::pii::DEFAULT_KEYS`). Values written afterwards are sealed.
    pub pii_traits: Vec<String>,
    /// The consent purposes of the tenant. Campaigns may only name one of these.
    pub consent_purposes: Vec<String>,
    /// Events older than this many days are purged by the scheduler; `None` keeps them.
    pub event_retention_days: Option<u32>,
}

impl Default for PrivacySettings {
    fn default() -> Self {
        PrivacySettings {
            pii_traits: Vec::new(),
            consent_purposes: DEFAULT_PURPOSES.iter().map(|p| (*p).to_owned()).collect(),
            event_retention_days: None,
        }
    }
}

impl PrivacySettings {
    pub fn pii_keys(&self) -> PiiKeys {
        PiiKeys::with_extra(&self.pii_traits)
    }

    pub fn has_purpose(&self, purpose: &str) -> bool {
        self.consent_purposes.iter().any(|known| known == purpose)
    }
}

/// Rewrites conditions for evaluation: comparisons of personal values go through the tenant's
/// blind index, and operators a blind index cannot answer are refused.
pub struct Blinder {
    tenant: std::sync::Arc<super::vault::TenantKeys>,
    pii: PiiKeys,
}

impl std::fmt::Debug for Blinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blinder")
            .field("pii", &self.pii)
            .finish_non_exhaustive()
    }
}

impl Blinder {
    pub fn condition(
        &self,
        condition: &domain::condition::Condition,
    ) -> Result<domain::condition::Condition, domain::condition::ConditionError> {
        domain::pii::blind_condition(condition, &self.pii, &|value| {
            self.tenant.value_blind(value)
        })
    }
}

/// The tenant's blinder, in its transaction.
pub async fn blinder(state: &AppState, tx: &TenantTx) -> ServiceResult<Blinder> {
    Ok(Blinder {
        tenant: state.vault.tenant(tx).await?,
        pii: settings_in(tx).await?.pii_keys(),
    })
}

/// Reads the privacy settings in a transaction of the tenant.
pub async fn settings_in(tx: &TenantTx) -> ServiceResult<PrivacySettings> {
    Ok(store::tenants::settings_section(tx, SETTINGS_SECTION).await?)
}

/// [`settings_in`] of a tenant row already read.
pub fn settings_of(tenant: &store::tenants::TenantRow) -> PrivacySettings {
    store::tenants::section_of(tenant, SETTINGS_SECTION)
}

/// The section of the tenant's settings document that holds the privacy settings.
const SETTINGS_SECTION: &str = "privacy";

pub async fn get_settings(
    state: &AppState,
    principal: Option<&Principal>,
) -> ServiceResult<PrivacySettings> {
    let principal = require_permission(principal, Permission::PrivacyManage)?;
    let tx = state.store.read(principal.tenant_id).await?;
    settings_in(&tx).await
}

fn valid_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Replaces the privacy settings after checking them.
pub async fn set_settings(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    mut settings: PrivacySettings,
) -> ServiceResult<PrivacySettings> {
    let principal = require_permission(principal, Permission::PrivacyManage)?;
    for (field, list) in [
        ("input.piiTraits", &mut settings.pii_traits),
        ("input.consentPurposes", &mut settings.consent_purposes),
    ] {
        for item in list.iter_mut() {
            *item = item.trim().to_owned();
        }
        if list.len() > MAX_LIST {
            return Err(ServiceError::bad_input(
                field,
                format!("at most {MAX_LIST} entries"),
            ));
        }
        if let Some((index, bad)) = list.iter().enumerate().find(|(_, item)| !valid_name(item)) {
            return Err(ServiceError::bad_input(
                format!("{field}[{index}]"),
                format!("{bad:?} is not a valid name: 1 to 64 letters, digits, '_', '-' or '.'"),
            ));
        }
        list.sort();
        list.dedup();
    }
    if settings.pii_traits.iter().any(|key| key.contains('.')) {
        return Err(ServiceError::bad_input(
            "input.piiTraits",
            "personal-data keys are top-level trait names, without dots",
        ));
    }
    if settings.event_retention_days == Some(0) {
        return Err(ServiceError::bad_input(
            "input.eventRetentionDays",
            "eventRetentionDays must be at least 1 (or null to keep events)",
        ));
    }
    let tx = state.store.begin(principal.tenant_id).await?;
    let before = settings_in(&tx).await?;
    let keys_changed = before.pii_keys() != settings.pii_keys();
    let mut rebuild = Vec::new();
    let mut restage = false;
    if keys_changed {
        // Every condition is rewritten for the new personal keys (refusing the change if one
        // cannot be), and the values already stored under a key that changed side are sealed or
        // opened to match, so that conditions and data agree again.
        store::segments::barrier(&tx, state.store.backend(), true).await?;
        let blinder = Blinder {
            tenant: state.vault.tenant(&tx).await?,
            pii: settings.pii_keys(),
        };
        (rebuild, restage) = reevaluate_conditions(state, &tx, &blinder).await?;
        let changed: Vec<String> = before
            .pii_keys()
            .iter()
            .chain(settings.pii_keys().iter())
            .filter(|key| before.pii_keys().contains(key) != settings.pii_keys().contains(key))
            .map(str::to_owned)
            .collect();
        reseal(state, &tx, &settings.pii_keys(), &changed).await?;
    }
    let value =
        serde_json::to_value(&settings).map_err(|error| ServiceError::Unexpected(error.into()))?;
    store::tenants::set_settings_section(&tx, SETTINGS_SECTION, value.clone()).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "settings.privacy.update",
        Some("tenant"),
        Some(value),
    )
    .await?;
    tx.commit().await?;
    for id in rebuild {
        super::segments::build(state, principal.tenant_id, id).await?;
    }
    if restage {
        let notices = super::understand::restage(
            &state.store,
            principal.tenant_id,
            state.now(),
            state.config.scheduler_batch,
            "personal keys changed",
        )
        .await?;
        state.bus.publish(notices);
    }
    Ok(settings)
}

/// Rewrites the evaluated form of every segment and lifecycle stage for `blinder`'s personal
/// keys. Returns the segments to rebuild and whether the stages changed.
async fn reevaluate_conditions(
    state: &AppState,
    tx: &TenantTx,
    blinder: &Blinder,
) -> ServiceResult<(Vec<Uuid>, bool)> {
    let now = state.now();
    let refused = |what: String, error: domain::condition::ConditionError| {
        ServiceError::bad_input(
            "input.piiTraits",
            format!(
                "{what} cannot be evaluated with these personal keys ({}: {}); change it first",
                error.path, error.reason
            ),
        )
    };
    let mut rebuild = Vec::new();
    for row in store::segments::list(tx).await? {
        let written = super::segments::parse_condition(&row.condition)?;
        let evaluated = blinder
            .condition(&written)
            .map_err(|error| refused(format!("segment {:?}", row.name), error))?
            .to_json();
        if row.evaluated.as_ref() != Some(&evaluated) {
            store::segments::set_evaluated(tx, row.id, evaluated, now).await?;
            rebuild.push(row.id);
        }
    }
    let stages = store::lifecycle::model(tx).await?;
    if stages.is_empty() {
        return Ok((rebuild, false));
    }
    let mut rows = Vec::with_capacity(stages.len());
    let mut changed = false;
    for stage in stages {
        let written = super::segments::parse_condition(&stage.condition)?;
        let evaluated = blinder
            .condition(&written)
            .map_err(|error| refused(format!("lifecycle stage {:?}", stage.key), error))?
            .to_json();
        changed |= stage.evaluated.as_ref() != Some(&evaluated);
        rows.push((stage.key, stage.name, stage.condition, evaluated));
    }
    if changed {
        store::lifecycle::replace_model(tx, &rows).await?;
    }
    Ok((rebuild, changed))
}

/// Rows re-sealed per read.
const RESEAL_PAGE: u64 = 500;

/// Seals the stored values of keys that became personal, and opens those of keys that no longer
/// are, in every profile's traits and every event's properties.
async fn reseal(
    state: &AppState,
    tx: &TenantTx,
    keys: &PiiKeys,
    changed: &[String],
) -> ServiceResult<()> {
    if changed.is_empty() {
        return Ok(());
    }
    let fix = |object: &Value,
               owner: Uuid,
               sealer: &mut super::vault::Sealer,
               opener: &super::vault::Opener| {
        let map = object.as_object()?;
        let mut out = map.clone();
        let mut touched = false;
        for key in changed {
            let Some(value) = map.get(key) else { continue };
            let sealed = domain::pii::is_sealed(value);
            if keys.contains(key) && !sealed && !value.is_null() {
                out.insert(key.clone(), sealer.seal_value(owner, value));
                touched = true;
            } else if !keys.contains(key) && sealed {
                out.insert(key.clone(), opener.open_value(value));
                touched = true;
            }
        }
        touched.then_some(Value::Object(out))
    };
    let mut after = None;
    loop {
        let page = store::privacy::traits_page(tx, after, RESEAL_PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        let ids: Vec<Uuid> = page.iter().map(|(id, _)| *id).collect();
        let mut sealer = state.vault.sealer(tx, keys.clone(), &ids).await?;
        let opener = state
            .vault
            .opener(tx, page.iter().map(|(_, traits)| traits))
            .await?;
        for (id, traits) in &page {
            if let Some(fixed) = fix(traits, *id, &mut sealer, &opener) {
                store::privacy::set_traits(tx, *id, fixed).await?;
            }
        }
        sealer.save(tx, state.now()).await?;
    }
    let mut after = None;
    loop {
        let page = store::privacy::properties_page(tx, after, RESEAL_PAGE).await?;
        let Some((last, _, _)) = page.last() else {
            break;
        };
        after = Some(*last);
        let owners: Vec<Uuid> = page.iter().map(|(_, owner, _)| *owner).collect();
        let mut sealer = state.vault.sealer(tx, keys.clone(), &owners).await?;
        let opener = state
            .vault
            .opener(tx, page.iter().map(|(_, _, properties)| properties))
            .await?;
        for (id, owner, properties) in &page {
            if let Some(fixed) = fix(properties, *owner, &mut sealer, &opener) {
                store::privacy::set_properties(tx, *id, fixed).await?;
            }
        }
        sealer.save(tx, state.now()).await?;
    }
    Ok(())
}

// ---------------- consent history ----------------

/// One change of a consent.
#[derive(Debug, Clone)]
pub struct ConsentChange {
    pub purpose: String,
    pub granted: bool,
    /// What changed it: `message` (a collected message's consent preferences), `api`
    /// (setConsent), `unsubscribe link`.
    pub source: String,
    /// Who, when a principal did it.
    pub actor: Option<String>,
    pub message_id: Option<String>,
    pub at: DateTime<Utc>,
}

impl From<store::keys::ConsentChangeRow> for ConsentChange {
    fn from(row: store::keys::ConsentChangeRow) -> Self {
        ConsentChange {
            purpose: row.purpose,
            granted: row.granted,
            source: row.source,
            actor: row.actor,
            message_id: row.message_id,
            at: row.at,
        }
    }
}

/// The consent history of a profile (and of the profiles merged into it), oldest first.
pub async fn consent_history(
    state: &AppState,
    principal: Option<&Principal>,
    profile_id: Uuid,
) -> ServiceResult<Vec<ConsentChange>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let mut ids = store::profiles::merged_ids(&tx, profile_id).await?;
    ids.push(profile_id);
    Ok(store::keys::consent_history_of(&tx, &ids)
        .await?
        .into_iter()
        .map(ConsentChange::from)
        .collect())
}

// ---------------- erasure ----------------

/// What an erasure did, as the person (or the regulator) may be shown it.
#[derive(Debug, Clone)]
pub struct ErasureReceipt {
    pub profile_id: Uuid,
    /// Every id the person had (merged profiles included).
    pub profile_ids: Vec<Uuid>,
    pub events_deleted: u64,
    pub identities_deleted: u64,
    /// Rows deleted over all tables, profiles included.
    pub rows_deleted: u64,
    /// Data keys destroyed: what they sealed is unreadable everywhere, backups included.
    pub keys_destroyed: u64,
    /// Identifiers suppressed (kept as blind indexes only) so that they create no profile again.
    pub identifiers_suppressed: u64,
    pub erased_at: DateTime<Utc>,
}

fn parse_id(id: &str) -> ServiceResult<Uuid> {
    Uuid::parse_str(id.trim()).map_err(|_| ServiceError::NotFound("profile"))
}

/// Erases a person: requires PRIVACY_MANAGE.
#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn erase(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    id: &str,
    suppress: bool,
) -> ServiceResult<ErasureReceipt> {
    let principal = require_permission(principal, Permission::PrivacyManage)?;
    erase_as(
        state,
        principal.tenant_id,
        &principal.actor(),
        meta,
        parse_id(id)?,
        suppress,
    )
    .await
}

/// Erases a person on behalf of `actor` (a principal, or the operator at the command line):
/// the profile, every profile merged into it, and every row of them in every table (see
/// `store::privacy::PERSON_TABLES`); then destroys their data keys, so that any copy of their
/// sealed data (an old backup, a replica's disk) can never be read again. With `suppress`, the
/// blind indexes of their identifiers are kept so that those identifiers never create a profile
/// again. Recorded in the register of erasures (ids and counts only) and in the audit log.
/// Erasing an id that was already erased returns the first receipt.
pub async fn erase_as(
    state: &AppState,
    tenant_id: domain::TenantId,
    actor: &str,
    meta: &RequestMeta,
    profile_id: Uuid,
    suppress: bool,
) -> ServiceResult<ErasureReceipt> {
    // Microseconds, as both databases store it: the receipt of a repeated erasure (read back from
    // the register) is then the same as the first.
    let now = chrono::SubsecRound::trunc_subsecs(state.now(), 6);
    let backend = state.store.backend();
    let tx = state.store.begin(tenant_id).await?;
    // Like a write batch: segment builds see the erasure whole or not at all.
    store::segments::barrier(&tx, backend, false).await?;
    let Some(profile) = store::profiles::get_resolved(&tx, profile_id).await? else {
        return match store::keys::erasure(&tx, profile_id).await? {
            Some(row) => Ok(ErasureReceipt {
                profile_id,
                profile_ids: vec![profile_id],
                events_deleted: u64::try_from(row.events_deleted).unwrap_or_default(),
                identities_deleted: u64::try_from(row.identities_deleted).unwrap_or_default(),
                rows_deleted: 0,
                keys_destroyed: 0,
                identifiers_suppressed: 0,
                erased_at: row.erased_at,
            }),
            None => Err(ServiceError::NotFound("profile")),
        };
    };
    // Locked like a write batch locks them, so that a concurrent batch for this person either
    // finishes first or finds the person gone. A batch that committed while we waited may have
    // merged another profile into the person, or the person into another: resolve again under
    // the locks until nothing moves.
    let mut profile = profile;
    let mut ids: Vec<Uuid>;
    let mut rounds = 0;
    loop {
        ids = store::profiles::merged_ids(&tx, profile.id).await?;
        ids.push(profile.id);
        ids.sort();
        ids.dedup();
        let id_set: std::collections::BTreeSet<Uuid> = ids.iter().copied().collect();
        store::profiles::load(&tx, backend, &id_set, true).await?;
        let Some(now_resolved) = store::profiles::get_resolved(&tx, profile.id).await? else {
            return Err(ServiceError::NotFound("profile"));
        };
        let mut again = store::profiles::merged_ids(&tx, now_resolved.id).await?;
        again.push(now_resolved.id);
        again.sort();
        again.dedup();
        if again == ids {
            break;
        }
        rounds += 1;
        if rounds > 8 {
            return Err(ServiceError::Conflict(
                "the person keeps changing under concurrent writes; try again".to_owned(),
            ));
        }
        profile = now_resolved;
    }
    let mut identifiers_suppressed = 0;
    if suppress {
        let keys: Vec<(String, String)> = store::profiles::identities_of(&tx, &ids)
            .await?
            .into_iter()
            .map(|row| (row.kind, row.lookup))
            .collect();
        identifiers_suppressed = keys.len() as u64;
        store::keys::suppress(&tx, &keys, now).await?;
    }
    let deleted = store::privacy::erase(&tx, &ids).await?;
    let keys_destroyed = store::keys::delete_profile_keys(&tx, &ids).await?;
    for id in &ids {
        let main = *id == profile.id;
        store::keys::record_erasure(
            &tx,
            store::keys::ErasureRow {
                tenant_id: tenant_id.as_uuid(),
                profile_id: *id,
                erased_at: now,
                actor: actor.to_owned(),
                events_deleted: if main { deleted.events as i64 } else { 0 },
                identities_deleted: if main { deleted.identities as i64 } else { 0 },
                suppressed: suppress,
            },
        )
        .await?;
    }
    let receipt = ErasureReceipt {
        profile_id: profile.id,
        profile_ids: ids.clone(),
        events_deleted: deleted.events,
        identities_deleted: deleted.identities,
        rows_deleted: deleted.rows,
        keys_destroyed,
        identifiers_suppressed,
        erased_at: now,
    };
    audit::record(
        state,
        &tx,
        meta,
        actor,
        "profile.erase",
        Some(&format!("profile:{}", profile.id)),
        Some(json!({
            "profileIds": ids,
            "eventsDeleted": deleted.events,
            "identitiesDeleted": deleted.identities,
            "rowsDeleted": deleted.rows,
            "keysDestroyed": keys_destroyed,
            "suppressed": suppress,
            "identifiersSuppressed": identifiers_suppressed,
        })),
    )
    .await?;
    let notices = vec![super::bus::Notice::ProfileChanged {
        tenant_id,
        profile_id: profile.id,
        kind: super::bus::ProfileChangeKind::Erased,
    }];
    let reactions = super::reactions::react(&tx, backend, None, &notices, now).await?;
    tx.commit().await?;
    state.store.truncate_wal().await;
    state.bus.publish(notices);
    state.bus.publish(reactions);
    Ok(receipt)
}

// ---------------- export ----------------

/// Exports everything stored about a person: requires PRIVACY_MANAGE.
pub async fn export(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    id: &str,
) -> ServiceResult<Value> {
    let principal = require_permission(principal, Permission::PrivacyManage)?;
    export_as(
        state,
        principal.tenant_id,
        &principal.actor(),
        meta,
        parse_id(id)?,
    )
    .await
}

fn time(at: DateTime<Utc>) -> Value {
    Value::String(at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// Everything stored about a person (the profile, every profile merged into it, and everything
/// hanging off them) as one JSON document, opened (personal data in the clear: this is the
/// person's own copy), recorded in the audit log. The document's sections are described in
/// `docs/privacy.md`.
pub async fn export_as(
    state: &AppState,
    tenant_id: domain::TenantId,
    actor: &str,
    meta: &RequestMeta,
    profile_id: Uuid,
) -> ServiceResult<Value> {
    let now = state.now();
    let tx = state.store.begin(tenant_id).await?;
    let profile = store::profiles::get_resolved(&tx, profile_id)
        .await?
        .ok_or(ServiceError::NotFound("profile"))?;
    let mut ids = store::profiles::merged_ids(&tx, profile.id).await?;
    ids.push(profile.id);
    ids.sort();
    ids.dedup();
    let profiles = store::profiles::get_many(&tx, &ids).await?;
    let identities = store::profiles::identities_of(&tx, &ids).await?;
    // A merge moves every event to the survivor: the live profile holds them all.
    let events = store::events::all_of(&tx, profile.id).await?;
    let consents = store::profiles::consents_of(&tx, &ids).await?;
    let consent_changes = store::keys::consent_history_of(&tx, &ids).await?;
    let memberships = store::privacy::memberships_of(&tx, &ids).await?;
    let segment_history = store::privacy::segment_history_of(&tx, &ids).await?;
    let transitions = store::privacy::transitions_of(&tx, &ids).await?;
    let ledger = store::profiles::ledger_of(&tx, &ids).await?;
    let emails = store::privacy::emails_of(&tx, &ids).await?;
    let webhook_deliveries = store::privacy::webhook_deliveries_of(&tx, &ids).await?;
    let groups = store::profiles::groups_of(&tx, profile.id).await?;
    let states = store::lifecycle::states_of(&tx, &[profile.id]).await?;

    let texts: Vec<Value> = identities
        .iter()
        .map(|row| Value::String(row.value.clone()))
        .chain(
            ledger
                .iter()
                .filter_map(|row| row.identity_value.clone())
                .map(Value::String),
        )
        .chain(
            emails
                .iter()
                .map(|row| Value::String(row.to_address.clone())),
        )
        .collect();
    let opener = state
        .vault
        .opener(
            &tx,
            profiles
                .iter()
                .map(|row| &row.traits)
                .chain(
                    events
                        .iter()
                        .flat_map(|row| [&row.properties, &row.context]),
                )
                .chain(texts.iter()),
        )
        .await?;
    let open_text = |text: &str| {
        opener
            .open_text(text)
            .map(Value::String)
            .unwrap_or(Value::Null)
    };

    let live = profiles.iter().find(|row| row.id == profile.id);
    let document = json!({
        "format": "cdp-profile-export/1",
        "exportedAt": time(now),
        "tenantId": tenant_id.as_uuid(),
        "profile": live.map(|row| json!({
            "id": row.id,
            "traits": opener.open_object(&row.traits),
            "channels": row.channels,
            "firstSeenAt": time(row.first_seen_at),
            "lastSeenAt": time(row.last_seen_at),
            "eventCount": row.event_count,
            "createdAt": time(row.created_at),
            "stage": states.first().and_then(|state| state.stage.clone()),
            "stageSince": states.first().and_then(|state| state.stage_since).map(time),
            // What profiling computed about the person (docs/understand.md).
            "computed": states.first().map(|state| json!({
                "totalRevenue": state.total_revenue,
                "orderCount": state.order_count,
                "meanGapSeconds": state.mean_gap_seconds,
                "rfmRecency": state.rfm_recency,
                "rfmFrequency": state.rfm_frequency,
                "rfmMonetary": state.rfm_monetary,
                "churnRisk": state.churn_risk,
            })),
        })),
        "mergedProfiles": profiles.iter().filter(|row| row.id != profile.id).map(|row| json!({
            "id": row.id,
            "mergedInto": row.merged_into,
            "traits": opener.open_object(&row.traits),
            "createdAt": time(row.created_at),
        })).collect::<Vec<_>>(),
        "identities": identities.iter().map(|row| json!({
            "kind": row.kind,
            "value": open_text(&row.value),
            "profileId": row.profile_id,
            "messageId": row.message_id,
            "createdAt": time(row.created_at),
        })).collect::<Vec<_>>(),
        "events": events.iter().map(|row| json!({
            "id": row.id,
            "type": row.kind,
            "name": row.name,
            "properties": opener.open_object(&row.properties),
            "context": opener.open_value(&row.context),
            "timestamp": time(row.timestamp),
            "receivedAt": time(row.received_at),
            "messageId": row.message_id,
            "channel": row.channel,
            "sourceId": row.source_id,
        })).collect::<Vec<_>>(),
        "consents": consents.iter().map(|row| json!({
            "purpose": row.purpose,
            "granted": row.granted,
            "updatedAt": time(row.updated_at),
            "source": row.source,
        })).collect::<Vec<_>>(),
        "consentHistory": consent_changes.iter().map(|row| json!({
            "purpose": row.purpose,
            "granted": row.granted,
            "source": row.source,
            "actor": row.actor,
            "messageId": row.message_id,
            "at": time(row.at),
        })).collect::<Vec<_>>(),
        "segments": memberships.iter().map(|(id, name, since)| json!({
            "id": id,
            "name": name,
            "since": time(*since),
        })).collect::<Vec<_>>(),
        "segmentHistory": segment_history.iter().map(|row| json!({
            "segmentId": row.segment_id,
            "entered": row.entered,
            "at": time(row.at),
            "reason": row.reason,
        })).collect::<Vec<_>>(),
        "lifecycleTransitions": transitions.iter().map(|row| json!({
            "from": row.from_stage,
            "to": row.to_stage,
            "at": time(row.at),
            "reason": row.reason,
        })).collect::<Vec<_>>(),
        "mergeLedger": ledger.iter().map(|row| json!({
            "id": row.id,
            "at": time(row.at),
            "action": row.action,
            "profileId": row.profile_id,
            "otherProfileId": row.other_profile_id,
            "messageId": row.message_id,
            "identityKind": row.identity_kind,
            "identityValue": row.identity_value.as_deref().map(&open_text),
            "rule": row.rule,
        })).collect::<Vec<_>>(),
        "emails": emails.iter().map(|row| json!({
            "id": row.id,
            "campaignId": row.campaign_id,
            "to": open_text(&row.to_address),
            "status": row.status,
            "suppressionReason": row.suppression_reason,
            "attempts": row.attempts,
            "sentAt": row.sent_at.map(time),
            "createdAt": time(row.created_at),
        })).collect::<Vec<_>>(),
        "webhookDeliveries": webhook_deliveries.iter().map(|row| json!({
            "id": row.id,
            "webhookId": row.webhook_id,
            "topic": row.topic,
            "status": row.status,
            "payload": row.payload,
            "createdAt": time(row.created_at),
        })).collect::<Vec<_>>(),
        "groups": groups.iter().map(|row| json!({
            "groupId": row.group_id,
            "traits": row.traits,
        })).collect::<Vec<_>>(),
    });
    audit::record(
        state,
        &tx,
        meta,
        actor,
        "profile.export",
        Some(&format!("profile:{}", profile.id)),
        Some(json!({"profileIds": ids})),
    )
    .await?;
    tx.commit().await?;
    Ok(document)
}

// ---------------- master key rotation ----------------

/// What a master-key rotation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rotation {
    pub tenants: u64,
    pub rewrapped: u64,
}

/// Rewraps every tenant's key under the current master key (`CDP_ENCRYPTION_KEY`); the earlier
/// one must be in `CDP_ENCRYPTION_KEY_PREVIOUS`. Tenant keys themselves do not change, so no
/// sealed value, blind index, unsubscribe link or webhook secret changes, and running processes
/// that hold both keys keep serving throughout (see `docs/operations.md`, "Rotating the master
/// key"). Safe to run again: tenants already under the current key are skipped.
pub async fn rotate_master_key(state: &AppState) -> ServiceResult<Rotation> {
    let mut rotation = Rotation::default();
    let mut after = None;
    loop {
        let page = store::tenants::ids_page(&state.store, after, 200).await?;
        let Some(last) = page.last().copied() else {
            break;
        };
        for tenant_id in page {
            let tx = state.store.begin(tenant_id).await?;
            rotation.tenants += 1;
            if state.vault.rewrap(&tx, state.now()).await? {
                rotation.rewrapped += 1;
            }
            tx.commit().await?;
        }
        after = Some(last);
    }
    tracing::info!(
        tenants = rotation.tenants,
        rewrapped = rotation.rewrapped,
        master_key = %state.vault.master_id(),
        "master key rotation done"
    );
    Ok(rotation)
}
