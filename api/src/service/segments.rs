//! Segments: definitions, their stored membership, previews and builds.
//!
//! Guarantees: a condition is validated before anything is stored (errors name its path, such as
//! `condition.all[1].op`); a segment's members are computed in the database, never by loading
//! profiles; while a segment builds it reports `building`, and real-time evaluation leaves it to
//! the build, which is ordered after every batch in flight (ADR 0005). Changes are audited.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::condition::{self, Condition};
use domain::{Permission, TenantId};
use serde_json::Value;
use uuid::Uuid;

use super::audit;
use super::auth::require_permission;
use super::pagination::{build_page, decode_cursor, page_size, Page};
use super::profiles::{self, Profile};
use super::{AppState, RequestMeta, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::store::{self, segments::SegmentRow};

const MAX_NAME: usize = 100;
const MAX_DESCRIPTION: usize = 1000;
/// Profiles in a preview's sample.
pub const PREVIEW_SAMPLE: u64 = 10;

/// A segment as callers see it.
#[derive(Debug, Clone)]
pub struct Segment {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub condition: Value,
    pub building: bool,
    pub time_dependent: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<SegmentRow> for Segment {
    fn from(row: SegmentRow) -> Self {
        Segment {
            id: row.id,
            name: row.name,
            description: row.description,
            condition: row.condition,
            building: row.status != store::segments::STATUS_READY,
            time_dependent: row.time_dependent,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// What a caller submits.
#[derive(Debug, Clone)]
pub struct SegmentInput {
    pub name: String,
    pub description: Option<String>,
    pub condition: Value,
}

/// Parses a condition, naming the offending node in the error.
pub fn parse_condition(value: &Value) -> ServiceResult<Condition> {
    condition::parse(value).map_err(|error| ServiceError::bad_input(error.path, error.reason))
}

/// Checks a condition against the tenant's personal-data keys and returns the form that is
/// evaluated, with personal values compared through the blind index.
fn evaluated(blinder: &super::privacy::Blinder, condition: &Condition) -> ServiceResult<Condition> {
    blinder
        .condition(condition)
        .map_err(|error| ServiceError::bad_input(error.path, error.reason))
}

fn validate(
    input: &SegmentInput,
    blinder: &super::privacy::Blinder,
) -> ServiceResult<(store::segments::SegmentDraft, Condition)> {
    let name = input.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(ServiceError::bad_input(
            "name",
            format!("name must be 1 to {MAX_NAME} characters"),
        ));
    }
    let description = input
        .description
        .as_deref()
        .map(str::trim)
        .filter(|text| !text.is_empty());
    if description.is_some_and(|text| text.chars().count() > MAX_DESCRIPTION) {
        return Err(ServiceError::bad_input(
            "description",
            format!("description must be at most {MAX_DESCRIPTION} characters"),
        ));
    }
    let condition = parse_condition(&input.condition)?;
    Ok((
        store::segments::SegmentDraft {
            name: name.to_owned(),
            description: description.map(str::to_owned),
            // Stored in canonical form.
            condition: condition.to_json(),
            evaluated: evaluated(blinder, &condition)?.to_json(),
            time_dependent: condition.dependencies().time_dependent,
        },
        condition,
    ))
}

fn parse_id(id: &str) -> ServiceResult<Uuid> {
    Uuid::parse_str(id.trim()).map_err(|_| ServiceError::NotFound("segment"))
}

pub async fn list(state: &AppState, principal: Option<&Principal>) -> ServiceResult<Vec<Segment>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(store::segments::list(&tx)
        .await?
        .into_iter()
        .map(Segment::from)
        .collect())
}

pub async fn get(
    state: &AppState,
    principal: Option<&Principal>,
    id: &str,
) -> ServiceResult<Option<Segment>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let Ok(id) = Uuid::parse_str(id.trim()) else {
        return Ok(None);
    };
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(store::segments::get(&tx, id).await?.map(Segment::from))
}

/// The segments a profile is a member of.
/// The segments each of `profile_ids` is a member of now, in one read of the memberships and
/// one of the tenant's segments.
pub async fn of_profiles(
    state: &AppState,
    principal: Option<&Principal>,
    profile_ids: &[Uuid],
) -> ServiceResult<HashMap<Uuid, Vec<Segment>>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let memberships = store::segments::memberships_of(&tx, profile_ids).await?;
    if memberships.is_empty() {
        return Ok(HashMap::new());
    }
    let mut member_of: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for (segment_id, profile_id) in memberships {
        member_of.entry(segment_id).or_default().push(profile_id);
    }
    // In the tenant's segment order (creation), as `segments` lists them.
    let mut found: HashMap<Uuid, Vec<Segment>> = HashMap::new();
    for row in store::segments::list(&tx).await? {
        let Some(members) = member_of.get(&row.id) else {
            continue;
        };
        let segment = Segment::from(row);
        for profile_id in members {
            found.entry(*profile_id).or_default().push(segment.clone());
        }
    }
    Ok(found)
}

pub async fn size(state: &AppState, principal: Option<&Principal>, id: Uuid) -> ServiceResult<u64> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(store::segments::size(&tx, id).await?)
}

/// One page of a segment's members, in profile id order.
pub async fn members(
    state: &AppState,
    principal: Option<&Principal>,
    id: Uuid,
    first: Option<i32>,
    after: Option<&str>,
) -> ServiceResult<Page<Profile>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let limit = page_size(first)?;
    let after = decode_cursor(after)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let total = store::segments::size(&tx, id).await?;
    let ids = store::segments::member_page(&tx, id, after, limit + 1).await?;
    let rows = store::profiles::get_many(&tx, &ids).await?;
    let reveal = profiles::Reveal::load(
        state,
        &tx,
        profiles::masks(principal),
        rows.iter().map(|row| &row.traits),
        [],
    )
    .await?;
    Ok(build_page(
        rows,
        limit,
        Some(total),
        |row| row.id,
        |row| profiles::profile_from_row(row, &reveal),
    ))
}

/// What a condition would select now, without saving anything.
#[derive(Debug, Clone)]
pub struct Preview {
    pub size: u64,
    pub sample: Vec<Profile>,
}

pub async fn preview(
    state: &AppState,
    principal: Option<&Principal>,
    condition: &Value,
) -> ServiceResult<Preview> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let condition = parse_condition(condition)?;
    let now = state.now();
    let backend = state.store.backend();
    let tx = state.store.read(principal.tenant_id).await?;
    let condition = evaluated(&super::privacy::blinder(state, &tx).await?, &condition)?;
    let size = store::conditions::count_matching(&tx, backend, &condition, now).await?;
    let ids = store::conditions::matching_profiles(
        &tx,
        backend,
        &condition,
        now,
        None,
        Some(PREVIEW_SAMPLE),
    )
    .await?;
    let rows = store::profiles::get_many(&tx, &ids).await?;
    let reveal = profiles::Reveal::load(
        state,
        &tx,
        profiles::masks(principal),
        rows.iter().map(|row| &row.traits),
        [],
    )
    .await?;
    let sample = rows
        .into_iter()
        .map(|row| profiles::profile_from_row(row, &reveal))
        .collect();
    Ok(Preview { size, sample })
}

pub async fn create(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    input: SegmentInput,
) -> ServiceResult<Segment> {
    let principal = require_permission(principal, Permission::SegmentsManage)?;
    let now = state.now();
    let id = Uuid::now_v7();
    let tx = state.store.begin(principal.tenant_id).await?;
    let (draft, _) = validate(&input, &super::privacy::blinder(state, &tx).await?)?;
    let name = draft.name.clone();
    store::segments::insert(&tx, id, draft, now).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "segment.create",
        Some(&format!("segment:{id}")),
        Some(serde_json::json!({"name": name})),
    )
    .await?;
    tx.commit().await?;
    build_and_wait(state, principal.tenant_id, id).await?;
    reload(state, principal.tenant_id, id).await
}

pub async fn update(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    id: &str,
    input: SegmentInput,
) -> ServiceResult<Segment> {
    let principal = require_permission(principal, Permission::SegmentsManage)?;
    let id = parse_id(id)?;
    let now = state.now();
    let tx = state.store.begin(principal.tenant_id).await?;
    let (draft, _) = validate(&input, &super::privacy::blinder(state, &tx).await?)?;
    let Some(existing) = store::segments::get(&tx, id).await? else {
        return Err(ServiceError::NotFound("segment"));
    };
    let rebuild =
        existing.condition != draft.condition || existing.status != store::segments::STATUS_READY;
    let name = draft.name.clone();
    if rebuild {
        store::segments::update(&tx, id, draft, now).await?;
    } else {
        store::segments::rename(&tx, id, draft.name, draft.description, now).await?;
    }
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "segment.update",
        Some(&format!("segment:{id}")),
        Some(serde_json::json!({"name": name, "rebuilt": rebuild})),
    )
    .await?;
    tx.commit().await?;
    if rebuild {
        build_and_wait(state, principal.tenant_id, id).await?;
    }
    reload(state, principal.tenant_id, id).await
}

pub async fn delete(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    id: &str,
) -> ServiceResult<bool> {
    let principal = require_permission(principal, Permission::SegmentsManage)?;
    let id = parse_id(id)?;
    let tx = state.store.begin(principal.tenant_id).await?;
    // Exclusive: no batch in flight may still add a member to it.
    store::segments::barrier(&tx, state.store.backend(), true).await?;
    if !store::segments::delete(&tx, id).await? {
        return Err(ServiceError::NotFound("segment"));
    }
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "segment.delete",
        Some(&format!("segment:{id}")),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

async fn reload(state: &AppState, tenant: TenantId, id: Uuid) -> ServiceResult<Segment> {
    let tx = state.store.read(tenant).await?;
    store::segments::get(&tx, id)
        .await?
        .map(Segment::from)
        .ok_or(ServiceError::NotFound("segment"))
}

/// Builds the segment in a task of its own and waits for it up to the configured time; the
/// build goes on when the caller stops waiting (or goes away).
async fn build_and_wait(state: &AppState, tenant: TenantId, id: Uuid) -> ServiceResult<()> {
    let task_state = state.clone();
    let task = tokio::spawn(async move { build(&task_state, tenant, id).await });
    let wait = state
        .config
        .segment_build_wait
        .max(Duration::from_millis(1));
    match tokio::time::timeout(wait, task).await {
        Ok(Ok(result)) => result.map(|_| ()),
        Ok(Err(join)) => Err(ServiceError::Unexpected(anyhow::Error::new(join))),
        Err(_) => Ok(()),
    }
}

/// Computes a building segment's members in the database and marks it ready. Exclusive on the
/// tenant's barrier: batches in flight finish first, new ones wait for the commit. A segment
/// changed again meanwhile is left to the build of its new version. Returns whether it built.
pub async fn build(state: &AppState, tenant: TenantId, id: Uuid) -> ServiceResult<bool> {
    let backend = state.store.backend();
    let tx = state.store.begin(tenant).await?;
    store::segments::barrier(&tx, backend, true).await?;
    let Some(row) = store::segments::get(&tx, id).await? else {
        return Ok(false);
    };
    if row.status == store::segments::STATUS_READY {
        return Ok(false);
    }
    let condition = parse_condition(row.evaluated.as_ref().unwrap_or(&row.condition))?;
    let now = state.now();
    let reason = if row.status == store::segments::STATUS_BUILDING {
        None
    } else {
        Some("segment condition changed")
    };
    let started = std::time::Instant::now();
    let (entered, exited) =
        store::segments::rebuild(&tx, backend, id, &condition, now, reason).await?;
    let size = store::segments::size(&tx, id).await?;
    let ready = store::segments::mark_ready(&tx, id, row.updated_at, size).await?;
    tx.commit().await?;
    tracing::info!(
        tenant = %tenant, segment = %id, size, entered, exited,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "segment built"
    );
    Ok(ready)
}

/// One recorded entry into or exit from a segment.
#[derive(Debug, Clone)]
pub struct MembershipChange {
    pub segment_id: Uuid,
    pub profile_id: Uuid,
    pub entered: bool,
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// A profile's entries into and exits from segments, newest first.
pub async fn history_of_profile(
    state: &AppState,
    principal: Option<&Principal>,
    profile_id: Uuid,
    limit: u64,
) -> ServiceResult<Vec<MembershipChange>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(store::segments::history_of_profile(&tx, profile_id, limit)
        .await?
        .into_iter()
        .map(|row| MembershipChange {
            segment_id: row.segment_id,
            profile_id: row.profile_id,
            entered: row.entered,
            at: row.at,
            reason: row.reason,
        })
        .collect())
}
