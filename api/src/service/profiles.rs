//! Reading unified profiles and events; manual merges, splits and consent changes.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use domain::identity::{IdentityKey, EMAIL, PHONE};
use domain::pii::PiiKeys;
use domain::traits::{self, Stamp};
use domain::Permission;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::auth::require_permission;
use super::bus::{Notice, ProfileChangeKind};
use super::pagination::{build_page, decode_cursor, page_size, Page};
use super::vault::Opener;
use super::{audit, settings, AppState, RequestMeta, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::store;

#[derive(Debug, Clone)]
pub struct Identity {
    pub kind: String,
    pub value: String,
}

#[derive(Debug, Clone)]
pub struct Consent {
    pub purpose: String,
    pub granted: bool,
    pub updated_at: DateTime<Utc>,
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub group_id: String,
    pub traits: Value,
}

#[derive(Debug, Clone)]
pub struct LedgerEntry {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub action: String,
    pub profile_id: Uuid,
    pub other_profile_id: Option<Uuid>,
    pub message_id: Option<String>,
    pub identity_kind: Option<String>,
    pub identity_value: Option<String>,
    pub rule: String,
}

/// A unified profile, already masked for the principal that asked.
#[derive(Debug, Clone)]
pub struct Profile {
    pub id: Uuid,
    pub traits: Value,
    pub channels: Vec<String>,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub event_count: i64,
    pub created_at: DateTime<Utc>,
    /// Whether PII is to be masked in everything loaded for this profile.
    pub masked: bool,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: Uuid,
    pub profile_id: Uuid,
    pub kind: String,
    pub name: Option<String>,
    pub properties: Value,
    pub context: Value,
    pub timestamp: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub message_id: String,
    pub channel: String,
    pub source_id: Option<Uuid>,
}

/// What one principal may see of personal data, with the keys to open it: sealed values are
/// opened, then masked for a principal without PII_READ. Built once per read, for the rows it
/// shows.
#[derive(Debug)]
pub(crate) struct Reveal {
    opener: Opener,
    pii: PiiKeys,
    masked: bool,
}

impl Reveal {
    /// Loads the data keys of the owners of every sealed value in `values` and `texts`.
    pub(crate) async fn load<'a>(
        state: &AppState,
        tx: &store::TenantTx,
        masked: bool,
        values: impl IntoIterator<Item = &'a Value>,
        texts: impl IntoIterator<Item = &'a str>,
    ) -> store::StoreResult<Reveal> {
        let mut owners = BTreeSet::new();
        for value in values {
            super::vault::collect_owners(value, &mut owners, 0);
        }
        owners.extend(texts.into_iter().filter_map(crate::crypto::envelope_owner));
        let opener = state.vault.opener_for(tx, owners).await?;
        // Which keys are personal matters only to masking: a principal who may read PII sees
        // every value opened, so its reads skip the settings.
        let pii = if masked {
            super::privacy::settings_in(tx)
                .await
                .map(|settings| settings.pii_keys())
                .unwrap_or_default()
        } else {
            PiiKeys::default()
        };
        Ok(Reveal {
            opener,
            pii,
            masked,
        })
    }

    pub(crate) fn new(opener: Opener, pii: PiiKeys, masked: bool) -> Reveal {
        Reveal {
            opener,
            pii,
            masked,
        }
    }

    /// A traits or properties object as this principal may see it.
    pub(crate) fn object(&self, value: &Value) -> Value {
        self.object_owned(value.clone())
    }

    /// [`Reveal::object`] of a value the caller gives up (a row just read): opened in place.
    pub(crate) fn object_owned(&self, value: Value) -> Value {
        let opened = self.opener.open_object_owned(value);
        if self.masked {
            domain::pii::mask_object(&opened, &self.pii)
        } else {
            opened
        }
    }

    /// A whole sealed JSON value (an event context) the caller gives up, opened; masked
    /// principals see nothing of it.
    pub(crate) fn json_owned(&self, value: Value) -> Value {
        if self.masked {
            return Value::Null;
        }
        self.opener.open_value_owned(value)
    }

    /// An identity value (or another sealed text of `kind`) as this principal may see it. Email
    /// and phone identities and kinds named like personal keys are masked; user and anonymous
    /// ids, which are pseudonymous, are shown.
    pub(crate) fn identity(&self, kind: &str, stored: &str) -> String {
        let plain = self.opener.open_text(stored).unwrap_or_default();
        if self.masked && (kind == EMAIL || kind == PHONE || self.pii.contains(kind)) {
            match domain::pii::mask(kind, &Value::String(plain)) {
                Value::String(text) => text,
                _ => "***".to_owned(),
            }
        } else {
            plain
        }
    }

    /// A sealed text opened without masking, for the principal's own use (sending, export).
    pub(crate) fn text(&self, stored: &str) -> Option<String> {
        self.opener.open_text(stored)
    }

    pub(crate) fn masked(&self) -> bool {
        self.masked
    }
}

pub(crate) fn masks(principal: &Principal) -> bool {
    !principal.has(Permission::PiiRead)
}

pub(crate) fn profile_from_row(row: store::profiles::ProfileRow, reveal: &Reveal) -> Profile {
    Profile {
        id: row.id,
        traits: reveal.object_owned(row.traits),
        channels: row
            .channels
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        first_seen_at: row.first_seen_at,
        last_seen_at: row.last_seen_at,
        event_count: row.event_count,
        created_at: row.created_at,
        masked: reveal.masked(),
    }
}

pub(crate) fn event_from_row(row: store::events::EventRow, reveal: &Reveal) -> Event {
    let properties = reveal.object_owned(row.properties);
    let context = reveal.json_owned(row.context);
    Event {
        id: row.id,
        profile_id: row.profile_id,
        kind: row.kind,
        name: row.name,
        properties,
        context,
        timestamp: row.timestamp,
        received_at: row.received_at,
        message_id: row.message_id,
        channel: row.channel,
        source_id: row.source_id,
    }
}

fn parse_profile_id(id: &str) -> ServiceResult<Uuid> {
    Uuid::parse_str(id.trim()).map_err(|_| ServiceError::NotFound("profile"))
}

/// A profile by id; a merged id resolves to its survivor.
pub async fn get(
    state: &AppState,
    principal: Option<&Principal>,
    id: &str,
) -> ServiceResult<Option<Profile>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let Ok(id) = Uuid::parse_str(id.trim()) else {
        return Ok(None);
    };
    let tx = state.store.read(principal.tenant_id).await?;
    let Some(row) = store::profiles::get_resolved_shown(&tx, id).await? else {
        return Ok(None);
    };
    let reveal = Reveal::load(state, &tx, masks(principal), [&row.traits], []).await?;
    Ok(Some(profile_from_row(row, &reveal)))
}

/// Normalizes a looked-up identity value the way ingestion does.
fn lookup_key(kind: &str, value: &str, region: Option<&str>) -> Option<IdentityKey> {
    let kind = kind.trim().to_lowercase();
    let value = match kind.as_str() {
        EMAIL => domain::ingest::normalize_email(value)?,
        PHONE => domain::ingest::normalize_phone(value, region)?,
        _ => value.trim().to_owned(),
    };
    Some(IdentityKey::new(kind, value))
}

pub async fn by_identity(
    state: &AppState,
    principal: Option<&Principal>,
    kind: &str,
    value: &str,
) -> ServiceResult<Option<Profile>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let settings = settings::load_in(&tx).await?;
    let Some(key) = lookup_key(kind, value, settings.default_region.as_deref()) else {
        return Ok(None);
    };
    let lookup = state.vault.tenant(&tx).await?.identity_lookup(&key.value);
    let found = store::profiles::identities_by_keys(&tx, &[(key.kind, lookup)]).await?;
    let Some(identity) = found.first() else {
        return Ok(None);
    };
    let Some(row) = store::profiles::get_resolved_shown(&tx, identity.profile_id).await? else {
        return Ok(None);
    };
    let reveal = Reveal::load(state, &tx, masks(principal), [&row.traits], []).await?;
    Ok(Some(profile_from_row(row, &reveal)))
}

/// Filters of `profiles`.
#[derive(Debug, Default, Clone)]
pub struct ProfileFilter {
    pub segment_id: Option<String>,
    pub stage: Option<String>,
    pub trait_equals: Option<Value>,
    pub seen_after: Option<DateTime<Utc>>,
    pub seen_before: Option<DateTime<Utc>>,
}

pub async fn list(
    state: &AppState,
    principal: Option<&Principal>,
    filter: ProfileFilter,
    first: Option<i32>,
    after: Option<&str>,
    count_total: bool,
) -> ServiceResult<Page<Profile>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let limit = page_size(first)?;
    let after = decode_cursor(after)?;
    let mut store_filter = store::profiles::ProfileFilter {
        seen_after: filter.seen_after,
        seen_before: filter.seen_before,
        ..Default::default()
    };
    if let Some(equals) = &filter.trait_equals {
        let object = equals.as_object().ok_or_else(|| {
            ServiceError::bad_input(
                "filter.traitEquals",
                "traitEquals must be an object of trait paths and values",
            )
        })?;
        for (path, value) in object {
            if value.is_object() || value.is_array() {
                return Err(ServiceError::bad_input(
                    format!("filter.traitEquals.{path}"),
                    "traitEquals compares with strings, numbers, booleans or null",
                ));
            }
            let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
            if parts.iter().any(String::is_empty) {
                return Err(ServiceError::bad_input(
                    format!("filter.traitEquals.{path}"),
                    "a trait path is keys joined by dots",
                ));
            }
            store_filter.trait_equals.push((parts, value.clone()));
        }
    }
    let tx = state.store.read(principal.tenant_id).await?;
    if !store_filter.trait_equals.is_empty() {
        // Personal traits are compared through their blind index, like segment conditions.
        let pii = super::privacy::settings_in(&tx).await?.pii_keys();
        let tenant_keys = state.vault.tenant(&tx).await?;
        for (parts, value) in &mut store_filter.trait_equals {
            if !pii.contains(&parts[0]) {
                continue;
            }
            if parts.len() > 1 {
                return Err(ServiceError::bad_input(
                    format!("filter.traitEquals.{}", parts.join(".")),
                    format!("{:?} holds personal data, which is stored encrypted as a whole: compare the whole value", parts[0]),
                ));
            }
            *value = Value::String(tenant_keys.value_blind(value));
            parts.push(domain::pii::BLIND_FIELD.to_owned());
        }
    }
    if let Some(segment_id) = &filter.segment_id {
        match Uuid::parse_str(segment_id.trim()) {
            Ok(id) => store_filter.segment_id = Some(id),
            // An id that names no segment selects no profile.
            Err(_) => store_filter.only_ids = Some(Vec::new()),
        }
    }
    store_filter.stage = filter.stage.clone();
    let (rows, total) = store::profiles::page(
        &tx,
        state.store.backend(),
        &store_filter,
        after,
        limit + 1,
        count_total,
    )
    .await?;
    let reveal = Reveal::load(
        state,
        &tx,
        masks(principal),
        rows.iter().map(|row| &row.traits),
        [],
    )
    .await?;
    Ok(build_page(
        rows,
        limit,
        total,
        |row| row.id,
        |row| profile_from_row(row, &reveal),
    ))
}

/// The identities of each of `profile_ids`, in one read (a page's profiles ask together).
pub async fn identities(
    state: &AppState,
    principal: Option<&Principal>,
    profile_ids: &[Uuid],
) -> ServiceResult<HashMap<Uuid, Vec<Identity>>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let rows = store::profiles::identities_of(&tx, profile_ids).await?;
    let reveal = Reveal::load(
        state,
        &tx,
        masks(principal),
        [],
        rows.iter().map(|row| row.value.as_str()),
    )
    .await?;
    let mut found: HashMap<Uuid, Vec<Identity>> = HashMap::new();
    for row in rows {
        found.entry(row.profile_id).or_default().push(Identity {
            value: reveal.identity(&row.kind, &row.value),
            kind: row.kind,
        });
    }
    Ok(found)
}

/// The consents of each of `profile_ids`, in one read.
pub async fn consents(
    state: &AppState,
    principal: Option<&Principal>,
    profile_ids: &[Uuid],
) -> ServiceResult<HashMap<Uuid, Vec<Consent>>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let mut found: HashMap<Uuid, Vec<Consent>> = HashMap::new();
    for row in store::profiles::consents_of(&tx, profile_ids).await? {
        found.entry(row.profile_id).or_default().push(Consent {
            purpose: row.purpose,
            granted: row.granted,
            updated_at: row.updated_at,
            source: row.source,
        });
    }
    Ok(found)
}

/// The ids merged into each of `profile_ids`, in one read.
pub async fn merged_ids(
    state: &AppState,
    principal: Option<&Principal>,
    profile_ids: &[Uuid],
) -> ServiceResult<HashMap<Uuid, Vec<Uuid>>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let mut found: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for (merged, survivor) in store::profiles::merged_into(&tx, profile_ids).await? {
        found.entry(survivor).or_default().push(merged);
    }
    Ok(found)
}

/// The groups (accounts) each of `profile_ids` belongs to, in one read.
pub async fn groups(
    state: &AppState,
    principal: Option<&Principal>,
    profile_ids: &[Uuid],
) -> ServiceResult<HashMap<Uuid, Vec<Group>>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let mut found: HashMap<Uuid, Vec<Group>> = HashMap::new();
    for (profile_id, row) in store::profiles::groups_of_profiles(&tx, profile_ids).await? {
        found.entry(profile_id).or_default().push(Group {
            group_id: row.group_id,
            traits: row.traits,
        });
    }
    Ok(found)
}

/// The merge ledger of a profile and of every profile merged into it, newest first.
pub async fn ledger(
    state: &AppState,
    principal: Option<&Principal>,
    profile: &Profile,
) -> ServiceResult<Vec<LedgerEntry>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let mut ids = store::profiles::merged_ids(&tx, profile.id).await?;
    ids.push(profile.id);
    let rows = store::profiles::ledger_of(&tx, &ids).await?;
    let reveal = Reveal::load(
        state,
        &tx,
        profile.masked,
        [],
        rows.iter().filter_map(|row| row.identity_value.as_deref()),
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| LedgerEntry {
            id: row.id,
            at: row.at,
            action: row.action,
            profile_id: row.profile_id,
            other_profile_id: row.other_profile_id,
            message_id: row.message_id,
            identity_value: match (&row.identity_kind, &row.identity_value) {
                (Some(kind), Some(value)) => Some(reveal.identity(kind, value)),
                (None, Some(value)) => reveal.text(value),
                (_, None) => None,
            },
            identity_kind: row.identity_kind,
            rule: row.rule,
        })
        .collect())
}

/// Cursor of the newest-first event order: `timestamp|id`.
fn encode_event_cursor(row: &store::events::EventRow) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "ev:{}|{}",
        row.timestamp
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        row.id
    ))
}

fn decode_event_cursor(
    cursor: Option<&str>,
) -> ServiceResult<Option<store::events::EventPosition>> {
    use base64::Engine;
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    let invalid = || ServiceError::bad_input("after", "after is not a cursor returned by this API");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (timestamp, id) = text
        .strip_prefix("ev:")
        .and_then(|rest| rest.split_once('|'))
        .ok_or_else(invalid)?;
    Ok(Some(store::events::EventPosition {
        timestamp: DateTime::parse_from_rfc3339(timestamp)
            .map_err(|_| invalid())?
            .with_timezone(&Utc),
        id: Uuid::parse_str(id).map_err(|_| invalid())?,
    }))
}

/// Events, newest first, optionally of one profile (a merged id counts as its survivor) and name.
/// What a reader of an event page uses, so that nothing else is computed: the total count (a
/// `COUNT(*)` over the filter), the opened contexts (key reads and decryption), the details
/// (message id, channel, source, time received) and the cursors of the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventPageWants {
    pub total_count: bool,
    pub context: bool,
    pub details: bool,
    pub cursors: bool,
}

impl EventPageWants {
    /// The columns a read of such a page decodes: the sealed context only when it is selected,
    /// the details only when they are.
    fn columns(&self) -> store::events::Columns {
        match (self.context, self.details) {
            (true, _) => store::events::Columns::All,
            (false, true) => store::events::Columns::WithoutContext,
            (false, false) => store::events::Columns::Timeline,
        }
    }
}

impl Default for EventPageWants {
    fn default() -> Self {
        EventPageWants {
            total_count: true,
            context: true,
            details: true,
            cursors: true,
        }
    }
}

/// Whose events a page lists.
#[derive(Debug, Clone, Copy)]
pub enum EventOwner<'a> {
    /// Every profile's.
    Anyone,
    /// A profile id as a client sent it; a merged id resolves to its survivor.
    Id(&'a str),
    /// A profile already read (so already resolved) in this request.
    Resolved(Uuid),
}

/// A page of events, newest first. `total_count` is `None` and contexts are null when `wants` says
/// they are not used.
pub async fn events(
    state: &AppState,
    principal: Option<&Principal>,
    owner: EventOwner<'_>,
    name: Option<String>,
    first: Option<i32>,
    after: Option<&str>,
    wants: EventPageWants,
) -> ServiceResult<Page<Event>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let limit = page_size(first)?;
    let position = decode_event_cursor(after)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let profile_id = match owner {
        EventOwner::Anyone => None,
        EventOwner::Resolved(id) => Some(id),
        EventOwner::Id(id) => match Uuid::parse_str(id.trim()) {
            Ok(id) => Some(
                store::profiles::get_resolved(&tx, id)
                    .await?
                    .map(|row| row.id)
                    .unwrap_or(id),
            ),
            Err(_) => {
                return Ok(Page {
                    items: Vec::new(),
                    has_next_page: false,
                    total_count: Some(0),
                })
            }
        },
    };
    let filter = store::events::EventFilter { profile_id, name };
    let (mut rows, total) = store::events::page(
        &tx,
        &filter,
        position,
        limit + 1,
        wants.total_count,
        wants.columns(),
    )
    .await?;
    let has_next_page = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    Ok(Page {
        items: reveal_events(state, &tx, principal, rows, wants.cursors).await?,
        has_next_page,
        total_count: total,
    })
}

/// Events read for `principal` as it may see them, each with its cursor (empty unless `cursors`):
/// opened and masked. Rows read without their context (`EventPageWants::columns`) carry `null`,
/// which reads no key.
async fn reveal_events(
    state: &AppState,
    tx: &store::TenantTx,
    principal: &Principal,
    rows: Vec<store::events::EventRow>,
    cursors: bool,
) -> ServiceResult<Vec<(Event, String)>> {
    let reveal = Reveal::load(
        state,
        tx,
        masks(principal),
        rows.iter().flat_map(|row| [&row.properties, &row.context]),
        [],
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let cursor = if cursors {
                encode_event_cursor(&row)
            } else {
                String::new()
            };
            (event_from_row(row, &reveal), cursor)
        })
        .collect())
}

/// The first page (newest first) of the timeline of each of `profile_ids` (live profiles, as a
/// profile read in this request carries), in one read: what `Profile.events` without a cursor
/// answers for a list of profiles.
pub async fn first_event_pages(
    state: &AppState,
    principal: Option<&Principal>,
    profile_ids: &[Uuid],
    first: Option<i32>,
    wants: EventPageWants,
) -> ServiceResult<HashMap<Uuid, Page<Event>>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let limit = page_size(first)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let rows = store::events::latest_of(&tx, profile_ids, limit + 1, wants.columns()).await?;
    let totals: HashMap<Uuid, i64> = if wants.total_count {
        store::events::counts_of(&tx, profile_ids)
            .await?
            .into_iter()
            .collect()
    } else {
        HashMap::new()
    };
    let mut pages: HashMap<Uuid, Page<Event>> = profile_ids
        .iter()
        .map(|id| {
            let page = Page {
                items: Vec::new(),
                has_next_page: false,
                total_count: wants
                    .total_count
                    .then(|| totals.get(id).copied().unwrap_or(0).max(0) as u64),
            };
            (*id, page)
        })
        .collect();
    // Each profile's rows come newest first, up to `limit + 1`: the extra one only tells that a
    // next page exists, and is not opened.
    let mut kept = Vec::with_capacity(rows.len());
    let mut taken: HashMap<Uuid, u64> = HashMap::new();
    for row in rows {
        let count = taken.entry(row.profile_id).or_default();
        if *count == limit {
            if let Some(page) = pages.get_mut(&row.profile_id) {
                page.has_next_page = true;
            }
            continue;
        }
        *count += 1;
        kept.push(row);
    }
    for (event, cursor) in reveal_events(state, &tx, principal, kept, wants.cursors).await? {
        if let Some(page) = pages.get_mut(&event.profile_id) {
            page.items.push((event, cursor));
        }
    }
    Ok(pages)
}

/// An event by message id (the answer to an idempotent `track` retry).
pub async fn event_by_message_id(
    state: &AppState,
    principal: &Principal,
    message_id: &str,
) -> ServiceResult<Option<Event>> {
    let tx = state.store.read(principal.tenant_id).await?;
    let Some(row) = store::events::by_message_id(&tx, message_id).await? else {
        return Ok(None);
    };
    let reveal = Reveal::load(
        state,
        &tx,
        masks(principal),
        [&row.properties, &row.context],
        [],
    )
    .await?;
    Ok(Some(event_from_row(row, &reveal)))
}

/// Merges `merge_id` into `keep_id` on an admin's word, recorded in the ledger. Refused when the
/// two profiles together would break an identity limit (two user ids): split first.
pub async fn merge(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    keep_id: &str,
    merge_id: &str,
) -> ServiceResult<Profile> {
    let principal = require_permission(principal, Permission::ProfilesWrite)?;
    let keep = parse_profile_id(keep_id)?;
    let gone = parse_profile_id(merge_id)?;
    let now = state.now();
    let tx = state.store.begin(principal.tenant_id).await?;
    let settings = settings::load_in(&tx).await?;
    let ids: BTreeSet<Uuid> = [keep, gone].into_iter().collect();
    let rows = store::profiles::load(&tx, state.store.backend(), &ids, true).await?;
    let (Some(mut keep_row), Some(mut gone_row)) = (
        rows.iter()
            .find(|row| row.id == keep && row.merged_into.is_none())
            .cloned(),
        rows.iter()
            .find(|row| row.id == gone && row.merged_into.is_none())
            .cloned(),
    ) else {
        return Err(ServiceError::NotFound("profile"));
    };
    if keep == gone {
        return Err(ServiceError::bad_input(
            "mergeId",
            "a profile cannot be merged into itself",
        ));
    }
    let identities = store::profiles::identities_of(&tx, &[keep, gone]).await?;
    let mut graph = domain::identity::IdentityGraph::default();
    for row in [&keep_row, &gone_row] {
        let keys = identities
            .iter()
            .filter(|identity| identity.profile_id == row.id)
            .map(|identity| IdentityKey::new(identity.kind.clone(), identity.lookup.clone()))
            .collect();
        graph.insert_profile(
            row.id,
            domain::identity::ProfileNode {
                created_at: row.created_at,
                identities: keys,
            },
        );
    }
    if let Some(rule) = graph.merge_violation(keep, gone, &settings.identity_rules) {
        return Err(ServiceError::Conflict(format!("these profiles cannot be one person under rule {rule}; split the conflicting identity first")));
    }
    super::ingest::fold_profile(&mut keep_row, &gone_row);
    gone_row.merged_into = Some(keep);
    // Consents: the newer decision per purpose wins.
    let consents = store::profiles::consents_of(&tx, &[keep, gone]).await?;
    let mut merged_consents: Vec<store::profiles::ConsentRow> = Vec::new();
    for consent in consents.iter().filter(|consent| consent.profile_id == gone) {
        let ours = consents
            .iter()
            .find(|c| c.profile_id == keep && c.purpose == consent.purpose);
        if ours.is_none_or(|ours| consent.updated_at > ours.updated_at) {
            merged_consents.push(store::profiles::ConsentRow {
                profile_id: keep,
                ..consent.clone()
            });
        }
    }
    let set = store::ingest::WriteSet {
        profiles: vec![keep_row.clone(), gone_row],
        merges: vec![(gone, keep)],
        consents: merged_consents,
        ledger: vec![store::ingest::LedgerRow {
            tenant_id: principal.tenant_id.as_uuid(),
            id: Uuid::now_v7(),
            at: now,
            action: "manual_merge".to_owned(),
            profile_id: keep,
            other_profile_id: Some(gone),
            message_id: None,
            identity_kind: None,
            identity_value: None,
            rule: format!("requested by {}", principal.actor()),
            detail: None,
        }],
        ..Default::default()
    };
    store::ingest::apply(&tx, set, now).await?;
    store::lifecycle::fold_order_totals(&tx, gone, keep).await?;
    let mut notices = vec![
        Notice::ProfileChanged {
            tenant_id: principal.tenant_id,
            profile_id: gone,
            kind: ProfileChangeKind::Merged { into: keep },
        },
        Notice::ProfileChanged {
            tenant_id: principal.tenant_id,
            profile_id: keep,
            kind: ProfileChangeKind::Updated,
        },
    ];
    notices.extend(
        super::understand::after_write(
            &tx,
            state.store.backend(),
            None,
            &[(keep, super::understand::Delta::everything())].into(),
            &[(gone, keep)],
            now,
        )
        .await?,
    );
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "profile.merge",
        Some(&format!("profile:{keep}")),
        Some(json!({"merged": gone})),
    )
    .await?;
    let reactions =
        super::reactions::react(&tx, state.store.backend(), None, &notices, now).await?;
    let reveal = Reveal::load(state, &tx, masks(principal), [&keep_row.traits], []).await?;
    tx.commit().await?;
    state.bus.publish(notices);
    state.bus.publish(reactions);
    Ok(profile_from_row(keep_row, &reveal))
}

/// Undoes a wrong merge: moves one identity of a profile, and the events that arrived under it,
/// to a new profile; both profiles' traits and counts are recomputed from their events. Recorded
/// in the ledger and the audit log. Returns the new profile.
pub async fn split(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    profile_id: &str,
    kind: &str,
    value: &str,
) -> ServiceResult<Profile> {
    let principal = require_permission(principal, Permission::ProfilesWrite)?;
    let profile_id = parse_profile_id(profile_id)?;
    let now = state.now();
    let tx = state.store.begin(principal.tenant_id).await?;
    let settings = settings::load_in(&tx).await?;
    let key = lookup_key(kind, value, settings.default_region.as_deref()).ok_or_else(|| {
        ServiceError::bad_input("value", "not a valid value for this identity kind")
    })?;
    let Some(source_row) = store::profiles::get_resolved(&tx, profile_id).await? else {
        return Err(ServiceError::NotFound("profile"));
    };
    let lookup = state.vault.tenant(&tx).await?.identity_lookup(&key.value);
    let identities = store::profiles::identities_of(&tx, &[source_row.id]).await?;
    let Some(split_identity) = identities
        .iter()
        .find(|identity| identity.kind == key.kind && identity.lookup == lookup)
        .cloned()
    else {
        return Err(ServiceError::NotFound("identity"));
    };
    if identities.len() < 2 {
        return Err(ServiceError::Conflict(
            "the profile has no other identity; there is nothing to split off".to_owned(),
        ));
    }
    let new_id = Uuid::now_v7();
    let found_events = store::events::of_identity(&tx, source_row.id, &key.kind, &lookup).await?;
    // What moves to the new profile is sealed again under its own data key, so that erasing
    // either profile later shreds exactly its own data.
    let identity_text = Value::String(split_identity.value.clone());
    let opener = state
        .vault
        .opener(
            &tx,
            found_events
                .iter()
                .flat_map(|event| [&event.properties, &event.context])
                .chain([&identity_text]),
        )
        .await?;
    let pii = super::privacy::settings_in(&tx).await?.pii_keys();
    let mut sealer = state.vault.sealer(&tx, pii, &[source_row.id]).await?;
    let moved_events: Vec<store::events::EventRow> = found_events
        .into_iter()
        .map(|mut event| {
            let properties = opener.open_object(&event.properties);
            event.properties = Value::Object(sealer.seal_object(
                new_id,
                properties.as_object().unwrap_or(&Map::new()),
                None,
            ));
            event.context = sealer.seal_json(new_id, &opener.open_value(&event.context));
            event
        })
        .collect();
    let plain_identity = opener.open_text(&split_identity.value).unwrap_or_default();
    let moved_identity_value = sealer.seal_text(new_id, &plain_identity);
    let ledger_identity_value = sealer.seal_text(source_row.id, &plain_identity);
    sealer.save(&tx, now).await?;
    let moved_ids: Vec<Uuid> = moved_events.iter().map(|event| event.id).collect();
    let remaining: Vec<store::events::EventRow> = store::events::all_of(&tx, source_row.id)
        .await?
        .into_iter()
        .filter(|event| !moved_ids.contains(&event.id))
        .collect();
    let new_row = rebuilt(
        principal.tenant_id.as_uuid(),
        new_id,
        now,
        now,
        &moved_events,
    );
    let kept_row = rebuilt(
        principal.tenant_id.as_uuid(),
        source_row.id,
        source_row.created_at,
        now,
        &remaining,
    );
    let set = store::ingest::WriteSet {
        profiles: vec![new_row.clone(), kept_row],
        ledger: vec![store::ingest::LedgerRow {
            tenant_id: principal.tenant_id.as_uuid(),
            id: Uuid::now_v7(),
            at: now,
            action: "split".to_owned(),
            profile_id: source_row.id,
            other_profile_id: Some(new_id),
            message_id: None,
            identity_kind: Some(key.kind.clone()),
            identity_value: Some(ledger_identity_value),
            rule: format!("requested by {}", principal.actor()),
            detail: Some(json!({"eventsMoved": moved_ids.len()})),
        }],
        ..Default::default()
    };
    store::ingest::apply(&tx, set, now).await?;
    store::ingest::move_identity(&tx, &key.kind, &lookup, new_id, &moved_identity_value).await?;
    store::ingest::move_events(&tx, &moved_ids, new_id).await?;
    store::events::reseal(&tx, &moved_events).await?;
    for (id, events) in [(new_id, &moved_events), (source_row.id, &remaining)] {
        let (orders, revenue) = order_totals(events);
        store::lifecycle::set_order_totals(&tx, id, orders, revenue).await?;
    }
    let mut notices = vec![
        Notice::ProfileChanged {
            tenant_id: principal.tenant_id,
            profile_id: new_id,
            kind: ProfileChangeKind::Created,
        },
        Notice::ProfileChanged {
            tenant_id: principal.tenant_id,
            profile_id: source_row.id,
            kind: ProfileChangeKind::Updated,
        },
    ];
    notices.extend(
        super::understand::after_write(
            &tx,
            state.store.backend(),
            None,
            &[
                (new_id, super::understand::Delta::everything()),
                (source_row.id, super::understand::Delta::everything()),
            ]
            .into(),
            &[],
            now,
        )
        .await?,
    );
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "profile.split",
        Some(&format!("profile:{}", source_row.id)),
        Some(json!({"newProfile": new_id, "kind": key.kind, "eventsMoved": moved_ids.len()})),
    )
    .await?;
    let reactions =
        super::reactions::react(&tx, state.store.backend(), None, &notices, now).await?;
    let reveal = Reveal::load(state, &tx, masks(principal), [&new_row.traits], []).await?;
    tx.commit().await?;
    state.bus.publish(notices);
    state.bus.publish(reactions);
    Ok(profile_from_row(new_row, &reveal))
}

/// (orders, revenue) of these events, by the rule of `domain::analytics::order_value`.
fn order_totals(events: &[store::events::EventRow]) -> (i64, f64) {
    let empty = Map::new();
    events
        .iter()
        .filter_map(|event| {
            domain::analytics::order_value(
                event.name.as_deref().unwrap_or_default(),
                event.properties.as_object().unwrap_or(&empty),
            )
        })
        .fold((0, 0.0), |(orders, revenue), value| {
            (orders + 1, revenue + value)
        })
}

/// A profile row recomputed from its events: traits from identify events by timestamp, counts,
/// seen times and channels.
fn rebuilt(
    tenant_id: Uuid,
    id: Uuid,
    created_at: DateTime<Utc>,
    now: DateTime<Utc>,
    events: &[store::events::EventRow],
) -> store::profiles::ProfileRow {
    let mut traits_map = Map::new();
    let mut clock = Map::new();
    let mut channels = BTreeSet::new();
    for event in events {
        if event.kind == "identify" {
            if let Some(properties) = event.properties.as_object() {
                traits::apply(
                    &mut traits_map,
                    &mut clock,
                    properties,
                    &Stamp {
                        at: event.timestamp,
                        message_id: event.message_id.clone(),
                    },
                );
            }
        }
        channels.insert(event.channel.clone());
    }
    store::profiles::ProfileRow {
        tenant_id,
        id,
        traits: Value::Object(traits_map),
        trait_clock: Value::Object(clock),
        channels: json!(channels),
        first_seen_at: events
            .iter()
            .map(|event| event.timestamp)
            .min()
            .unwrap_or(now),
        last_seen_at: events
            .iter()
            .map(|event| event.timestamp)
            .max()
            .unwrap_or(now),
        event_count: events.len() as i64,
        merged_into: None,
        created_at,
        updated_at: now,
    }
}

/// Who or what changed a consent: a source (`api`, `unsubscribe`) and the principal, if any.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConsentSource<'a> {
    pub source: &'a str,
    pub actor: Option<&'a str>,
}

/// Writes a consent decision of a (live) profile in the caller's transaction, and lets the
/// segments and stages on that consent follow in the same transaction. Returns the notices to
/// publish after the commit. `setConsent` and the unsubscribe link both come through here.
pub(crate) async fn record_consent(
    tx: &store::TenantTx,
    backend: store::Backend,
    profile_id: Uuid,
    purpose: &str,
    granted: bool,
    change: ConsentSource<'_>,
    now: DateTime<Utc>,
) -> store::StoreResult<Vec<Notice>> {
    let tenant_id = tx.tenant_id();
    let source = change.actor.unwrap_or(change.source);
    let set = store::ingest::WriteSet {
        consent_changes: vec![store::keys::ConsentChangeRow {
            tenant_id: tenant_id.as_uuid(),
            id: Uuid::now_v7(),
            profile_id,
            purpose: purpose.to_owned(),
            granted,
            source: change.source.to_owned(),
            actor: change.actor.map(str::to_owned),
            message_id: None,
            at: now,
        }],
        consents: vec![store::profiles::ConsentRow {
            tenant_id: tenant_id.as_uuid(),
            profile_id,
            purpose: purpose.to_owned(),
            granted,
            updated_at: now,
            source: source.to_owned(),
        }],
        ..Default::default()
    };
    store::ingest::apply(tx, set, now).await?;
    let mut notices = vec![Notice::ProfileChanged {
        tenant_id,
        profile_id,
        kind: ProfileChangeKind::Updated,
    }];
    let delta = super::understand::Delta {
        consents: [purpose.to_owned()].into(),
        ..Default::default()
    };
    notices.extend(
        super::understand::after_write(tx, backend, None, &[(profile_id, delta)].into(), &[], now)
            .await?,
    );
    Ok(notices)
}

/// Records a consent decision for a purpose.
pub async fn set_consent(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    profile_id: &str,
    purpose: &str,
    granted: bool,
) -> ServiceResult<Profile> {
    let principal = require_permission(principal, Permission::ProfilesWrite)?;
    let purpose = purpose.trim();
    if purpose.is_empty() || purpose.len() > 100 || purpose.chars().any(char::is_control) {
        return Err(ServiceError::bad_input(
            "purpose",
            "purpose must be 1 to 100 characters",
        ));
    }
    let id = parse_profile_id(profile_id)?;
    let now = state.now();
    let tx = state.store.begin(principal.tenant_id).await?;
    let row = store::profiles::get_resolved(&tx, id)
        .await?
        .ok_or(ServiceError::NotFound("profile"))?;
    let actor = principal.actor();
    let notices = record_consent(
        &tx,
        state.store.backend(),
        row.id,
        purpose,
        granted,
        ConsentSource {
            source: "api",
            actor: Some(&actor),
        },
        now,
    )
    .await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "consent.set",
        Some(&format!("profile:{}", row.id)),
        Some(json!({"purpose": purpose, "granted": granted})),
    )
    .await?;
    let reactions =
        super::reactions::react(&tx, state.store.backend(), None, &notices, now).await?;
    let reveal = Reveal::load(state, &tx, masks(principal), [&row.traits], []).await?;
    tx.commit().await?;
    state.bus.publish(notices);
    state.bus.publish(reactions);
    Ok(profile_from_row(row, &reveal))
}

/// Per-source counts of accepted, duplicate and rejected messages (by reason) and warnings.
#[derive(Debug, Clone)]
pub struct SourceQuality {
    pub source_id: Option<Uuid>,
    pub name: String,
    pub channel: String,
    pub accepted: i64,
    pub duplicates: i64,
    pub rejected: Vec<(String, i64)>,
    pub warnings: Vec<(String, i64)>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

pub async fn data_quality(
    state: &AppState,
    principal: Option<&Principal>,
) -> ServiceResult<Vec<SourceQuality>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let keys = store::api_keys::list(&tx).await?;
    let stats = store::ingest::stats(&tx).await?;
    let mut sources: Vec<SourceQuality> = Vec::new();
    let mut source_ids: Vec<Uuid> = keys
        .iter()
        .filter(|key| key.scope == "WRITE")
        .map(|key| key.id)
        .collect();
    for stat in &stats {
        if !source_ids.contains(&stat.source_id) {
            source_ids.push(stat.source_id);
        }
    }
    for source_id in source_ids {
        let key = keys.iter().find(|key| key.id == source_id);
        let mut quality = SourceQuality {
            source_id: (!source_id.is_nil()).then_some(source_id),
            name: key
                .map(|key| key.name.clone())
                .unwrap_or_else(|| "GraphQL and import".to_owned()),
            channel: key
                .map(|key| key.channel.clone())
                .unwrap_or_else(|| "server".to_owned()),
            accepted: 0,
            duplicates: 0,
            rejected: Vec::new(),
            warnings: Vec::new(),
            last_seen_at: None,
        };
        for stat in stats.iter().filter(|stat| stat.source_id == source_id) {
            quality.last_seen_at = quality.last_seen_at.max(Some(stat.updated_at));
            match stat.outcome.split_once(':') {
                Some(("rejected", reason)) => {
                    quality.rejected.push((reason.to_owned(), stat.count))
                }
                Some(("warning", reason)) => quality.warnings.push((reason.to_owned(), stat.count)),
                _ if stat.outcome == "accepted" => quality.accepted = stat.count,
                _ if stat.outcome == "duplicate" => quality.duplicates = stat.count,
                _ => {}
            }
        }
        quality.rejected.sort();
        quality.warnings.sort();
        sources.push(quality);
    }
    Ok(sources)
}
