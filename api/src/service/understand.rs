//! Real-time understanding: after a write changes some profiles, re-evaluate their lifecycle
//! stage and the segments that depend on what changed, in the same transaction, and say what
//! changed so that the caller can publish it once committed.
//!
//! Guarantees: only segments whose dependencies meet the change are evaluated; the stage is
//! decided first, so segments on the stage see the new one; a profile merged away leaves every
//! segment; every change is written with its history row and reason. Segments still building
//! are skipped: their build, ordered after this transaction by the barrier, sees its writes
//! (ADR 0005).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Duration, Utc};
use domain::condition::{self, Attribute, Condition, Dependencies};
use domain::lifecycle::{self, LifecycleModel, StageInput};
use uuid::Uuid;

use super::bus::Notice;
use crate::store::facts::EventNeeds;
use crate::store::{self, Backend, StoreError, StoreResult, TenantTx};

/// What a write changed of one (surviving) profile.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// The profile is new, or absorbed another one: evaluate everything.
    pub everything: bool,
    /// Top-level trait keys that were set.
    pub trait_keys: BTreeSet<String>,
    /// Names of the events added (nameless events add nothing here).
    pub event_names: BTreeSet<String>,
    /// At least one event was added (which moves `last_seen_at`, `event_count` and the order
    /// attributes).
    pub events: bool,
    /// Consent purposes that changed.
    pub consents: BTreeSet<String>,
    /// The profile was created by this write.
    pub created: bool,
}

impl Delta {
    /// A delta that makes everything be evaluated (a new or merged profile).
    pub fn everything() -> Delta {
        Delta {
            everything: true,
            ..Delta::default()
        }
    }

    /// Whether something that `deps` depends on changed.
    pub fn touches(&self, deps: &Dependencies) -> bool {
        const EVENT_ATTRIBUTES: [Attribute; 6] = [
            Attribute::FirstSeenAt,
            Attribute::LastSeenAt,
            Attribute::EventCount,
            Attribute::DaysSinceLastSeen,
            Attribute::OrderCount,
            Attribute::TotalRevenue,
        ];
        self.everything
            || deps
                .trait_keys
                .iter()
                .any(|key| self.trait_keys.contains(key))
            || (self.events
                && (deps.any_event
                    || deps
                        .event_names
                        .iter()
                        .any(|name| self.event_names.contains(name))
                    || EVENT_ATTRIBUTES
                        .iter()
                        .any(|attribute| deps.attributes.contains(attribute))))
            || deps
                .consent_purposes
                .iter()
                .any(|purpose| self.consents.contains(purpose))
    }

    /// A short, human-readable account of the change, kept as the reason of what it causes.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.everything {
            parts.push("profile created or merged".to_owned());
        }
        if !self.event_names.is_empty() {
            parts.push(format!("events: {}", join(&self.event_names)));
        } else if self.events {
            parts.push("activity".to_owned());
        }
        if !self.trait_keys.is_empty() {
            parts.push(format!("traits: {}", join(&self.trait_keys)));
        }
        if !self.consents.is_empty() {
            parts.push(format!("consent: {}", join(&self.consents)));
        }
        if parts.is_empty() {
            "re-evaluated".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

fn join(set: &BTreeSet<String>) -> String {
    const SHOWN: usize = 5;
    let mut text: Vec<&str> = set.iter().take(SHOWN).map(String::as_str).collect();
    if set.len() > SHOWN {
        text.push("…");
    }
    text.join(", ")
}

/// A ready segment with its parsed condition.
#[derive(Debug, Clone)]
pub struct Definition {
    pub id: Uuid,
    pub condition: Condition,
    pub deps: Dependencies,
    pub time_dependent: bool,
}

/// The tenant's ready segments. A stored condition that no longer parses (it was valid when
/// saved) is logged and skipped rather than failing ingestion.
pub async fn ready_segments(tx: &TenantTx) -> StoreResult<Vec<Definition>> {
    let mut out = Vec::new();
    for row in store::segments::list(tx).await? {
        if row.status != store::segments::STATUS_READY {
            continue;
        }
        match condition::parse(row.evaluated.as_ref().unwrap_or(&row.condition)) {
            Ok(condition) => out.push(Definition {
                id: row.id,
                deps: condition.dependencies(),
                time_dependent: row.time_dependent,
                condition,
            }),
            Err(error) => {
                tracing::error!(segment = %row.id, %error, "stored segment condition does not parse")
            }
        }
    }
    Ok(out)
}

/// The tenant's lifecycle model as evaluated (personal values through their blind index): the
/// stored one, or the default model when none was set.
pub async fn lifecycle_model(tx: &TenantTx) -> StoreResult<LifecycleModel> {
    stored_model(tx, true).await
}

/// The tenant's lifecycle model as written, for display.
pub async fn lifecycle_model_as_written(tx: &TenantTx) -> StoreResult<LifecycleModel> {
    stored_model(tx, false).await
}

async fn stored_model(tx: &TenantTx, evaluated: bool) -> StoreResult<LifecycleModel> {
    let rows = store::lifecycle::model(tx).await?;
    if rows.is_empty() {
        return Ok(LifecycleModel::default_model());
    }
    let inputs: Vec<StageInput> = rows
        .into_iter()
        .map(|row| StageInput {
            key: row.key,
            name: row.name,
            condition: match (evaluated, row.evaluated) {
                (true, Some(evaluated)) => evaluated,
                _ => row.condition,
            },
        })
        .collect();
    LifecycleModel::new(&inputs)
        .map_err(|error| StoreError::corrupt(format!("stored lifecycle model is invalid: {error}")))
}

/// What evaluation of conditions with these dependencies needs loaded at `now`: which events,
/// and whether the consents and the traits.
fn event_needs<'a>(deps: impl Iterator<Item = &'a Dependencies>, now: DateTime<Utc>) -> EventNeeds {
    let mut needs = EventNeeds {
        without_traits: true,
        ..EventNeeds::default()
    };
    let mut all_time = false;
    let mut longest: Option<i64> = None;
    let mut any_events = false;
    for deps in deps {
        needs.consents |= !deps.consent_purposes.is_empty();
        needs.without_traits &= deps.trait_keys.is_empty();
        if deps.any_event || !deps.event_names.is_empty() {
            any_events = true;
            needs.any |= deps.any_event;
            needs.names.extend(deps.event_names.iter().cloned());
            all_time |= deps.all_time_events;
            if let Some(window) = deps.longest_window {
                longest = longest.max(Some(window.num_seconds()));
            }
        }
    }
    if any_events && !all_time {
        // A window is measured back from `now`; a second more covers rounding at the edge, and
        // the evaluator applies the exact window itself.
        needs.since = longest.map(|seconds| now - Duration::seconds(seconds.saturating_add(1)));
    }
    if needs.any {
        needs.names.clear();
    }
    needs
}

/// Re-evaluates the stage and the affected segments of the profiles in `deltas` (survivors, by
/// id), and takes the profiles in `merged_away` out of every segment. Writes the changes and
/// returns them as notices for the caller to publish after commit.
///
/// `definitions` are the tenant's definitions when the caller holds them (see
/// `super::definitions`); without them they are read here.
pub async fn after_write(
    tx: &TenantTx,
    backend: Backend,
    definitions: Option<&super::definitions::Definitions>,
    deltas: &BTreeMap<Uuid, Delta>,
    merged_away: &[(Uuid, Uuid)],
    now: DateTime<Utc>,
) -> StoreResult<Vec<Notice>> {
    if deltas.is_empty() && merged_away.is_empty() {
        return Ok(Vec::new());
    }
    store::segments::barrier(tx, backend, false).await?;
    let tenant_id = tx.tenant_id();
    let mut notices = Vec::new();

    // A merged-away profile is no longer anyone: it leaves every segment.
    let mut segment_changes: Vec<store::segments::Change> = Vec::new();
    if !merged_away.is_empty() {
        let merged: Vec<Uuid> = merged_away.iter().map(|(merged, _)| *merged).collect();
        for (segment_id, profile_id) in store::segments::memberships_of(tx, &merged).await? {
            let survivor = merged_away
                .iter()
                .find(|(merged, _)| *merged == profile_id)
                .map(|(_, survivor)| *survivor)
                .unwrap_or(profile_id);
            segment_changes.push(store::segments::Change {
                segment_id,
                profile_id,
                entered: false,
                reason: format!("merged into {survivor}"),
            });
        }
    }

    let read;
    let (segments, model): (&[Definition], &LifecycleModel) = match definitions {
        Some(definitions) => (&definitions.segments, &definitions.model),
        None => {
            read = (ready_segments(tx).await?, lifecycle_model(tx).await?);
            (&read.0, &read.1)
        }
    };
    let model_deps = model.dependencies();
    let stage_segments: Vec<&Definition> = segments
        .iter()
        .filter(|segment| segment.deps.depends_on_stage())
        .collect();

    // What each profile needs evaluated.
    let mut plans: Vec<(Uuid, bool, Vec<&Definition>)> = Vec::new();
    let mut needed: Vec<&Dependencies> = Vec::new();
    for (profile_id, delta) in deltas {
        let stage = delta.touches(&model_deps);
        let affected: Vec<&Definition> = segments
            .iter()
            .filter(|segment| delta.touches(&segment.deps))
            .collect();
        if !stage && affected.is_empty() {
            continue;
        }
        if stage {
            needed.push(&model_deps);
            needed.extend(stage_segments.iter().map(|segment| &segment.deps));
        }
        needed.extend(affected.iter().map(|segment| &segment.deps));
        plans.push((*profile_id, stage, affected));
    }
    if plans.is_empty() && segment_changes.is_empty() {
        return Ok(notices);
    }

    let ids: Vec<Uuid> = plans.iter().map(|(id, _, _)| *id).collect();
    let needs = event_needs(needed.into_iter(), now);
    let mut facts = store::facts::load(tx, &ids, &needs).await?;
    let members: HashSet<(Uuid, Uuid)> = if segments.is_empty() {
        HashSet::new()
    } else {
        store::segments::memberships_of(tx, &ids)
            .await?
            .into_iter()
            .collect()
    };

    let mut stage_changes = Vec::new();
    for (profile_id, stage, affected) in plans {
        let Some(profile) = facts.get_mut(&profile_id) else {
            continue;
        };
        let reason = deltas
            .get(&profile_id)
            .map(Delta::describe)
            .unwrap_or_default();
        let mut to_check = affected;
        if stage {
            let new = lifecycle::stage_of(model, profile, now).map(str::to_owned);
            if new != profile.stage {
                stage_changes.push(store::lifecycle::StageChange {
                    profile_id,
                    from: profile.stage.clone(),
                    to: new.clone(),
                    reason: reason.clone(),
                });
                profile.stage = new;
                for segment in &stage_segments {
                    if !to_check.iter().any(|checked| checked.id == segment.id) {
                        to_check.push(segment);
                    }
                }
            }
        }
        for segment in to_check {
            let holds = segment.condition.evaluate(profile, now);
            if holds != members.contains(&(segment.id, profile_id)) {
                segment_changes.push(store::segments::Change {
                    segment_id: segment.id,
                    profile_id,
                    entered: holds,
                    reason: reason.clone(),
                });
            }
        }
    }

    store::lifecycle::apply_changes(tx, &stage_changes, now).await?;
    store::segments::apply_changes(tx, &segment_changes, now).await?;
    notices.extend(
        stage_changes
            .into_iter()
            .map(|change| stage_notice(tenant_id, change, now)),
    );
    notices.extend(
        segment_changes
            .into_iter()
            .map(|change| membership_notice(tenant_id, change, now)),
    );
    Ok(notices)
}

pub(crate) fn stage_notice(
    tenant_id: domain::TenantId,
    change: store::lifecycle::StageChange,
    at: DateTime<Utc>,
) -> Notice {
    Notice::StageTransition {
        tenant_id,
        profile_id: change.profile_id,
        from: change.from,
        to: change.to,
        at,
        reason: change.reason,
    }
}

pub(crate) fn membership_notice(
    tenant_id: domain::TenantId,
    change: store::segments::Change,
    at: DateTime<Utc>,
) -> Notice {
    Notice::SegmentMembership {
        tenant_id,
        segment_id: change.segment_id,
        profile_id: change.profile_id,
        entered: change.entered,
        at,
        reason: change.reason,
    }
}

/// Decides the membership of `ids` in each of `segments` again, in the database, and returns the
/// changes to make (not yet written). The caller holds the profiles' row locks, so what it reads
/// is what it changes.
pub async fn resync_segments(
    tx: &TenantTx,
    backend: Backend,
    segments: &[&Definition],
    ids: &[Uuid],
    now: DateTime<Utc>,
    reason: &str,
) -> StoreResult<Vec<store::segments::Change>> {
    if ids.is_empty() || segments.is_empty() {
        return Ok(Vec::new());
    }
    let members: HashSet<(Uuid, Uuid)> = store::segments::memberships_of(tx, ids)
        .await?
        .into_iter()
        .collect();
    let mut changes = Vec::new();
    for segment in segments {
        let matching: HashSet<Uuid> = store::conditions::matching_profiles(
            tx,
            backend,
            &segment.condition,
            now,
            Some(ids),
            None,
        )
        .await?
        .into_iter()
        .collect();
        for id in ids {
            let holds = matching.contains(id);
            if holds != members.contains(&(segment.id, *id)) {
                changes.push(store::segments::Change {
                    segment_id: segment.id,
                    profile_id: *id,
                    entered: holds,
                    reason: reason.to_owned(),
                });
            }
        }
    }
    Ok(changes)
}

/// Brings stored stages in line with the model at `now`, one bounded batch per transaction:
/// finds profiles whose stage differs from what the model says, locks them, decides again and
/// records the transitions; segments that depend on the stage follow. Returns the notices of
/// committed changes.
pub async fn restage(
    store_handle: &store::Store,
    tenant: domain::TenantId,
    now: DateTime<Utc>,
    batch: u64,
    reason: &str,
) -> StoreResult<Vec<Notice>> {
    let backend = store_handle.backend();
    let mut notices = Vec::new();
    // Each round settles at least the profiles it found, so this ends; the bound is a guard
    // against a pathological race where others keep moving the same profiles.
    for _ in 0..10_000 {
        let tx = begin_shared(store_handle, tenant).await?;
        let model = lifecycle_model(&tx).await?;
        let mut found: Vec<(Uuid, Option<String>)> = Vec::new();
        let mut target: Option<Option<String>> = None;
        let targets = model
            .stages()
            .iter()
            .enumerate()
            .map(|(index, stage)| (Some(stage.key.clone()), model.exclusive_condition(index)))
            .chain(std::iter::once((None, model.no_stage_condition())));
        let mut condition = None;
        for (stage, stage_condition) in targets {
            found = store::lifecycle::stale_stages(
                &tx,
                backend,
                stage.as_deref(),
                &stage_condition,
                now,
                batch,
            )
            .await?;
            if !found.is_empty() {
                target = Some(stage);
                condition = Some(stage_condition);
                break;
            }
        }
        let (Some(target), Some(condition)) = (target, condition) else {
            tx.commit().await?;
            return Ok(notices);
        };
        // Lock, then decide again: a batch may have moved these profiles meanwhile.
        let ids = lock_profiles(&tx, backend, found.iter().map(|(id, _)| *id)).await?;
        let confirmed: HashSet<Uuid> =
            store::conditions::matching_profiles(&tx, backend, &condition, now, Some(&ids), None)
                .await?
                .into_iter()
                .collect();
        let states = store::lifecycle::states_of(&tx, &ids).await?;
        let changes: Vec<store::lifecycle::StageChange> = states
            .into_iter()
            .filter(|state| confirmed.contains(&state.id) && state.stage != target)
            .map(|state| store::lifecycle::StageChange {
                profile_id: state.id,
                from: state.stage,
                to: target.clone(),
                reason: reason.to_owned(),
            })
            .collect();
        if changes.is_empty() {
            // Everything found moved on its own meanwhile; look again.
            tx.commit().await?;
            continue;
        }
        store::lifecycle::apply_changes(&tx, &changes, now).await?;
        let changed: Vec<Uuid> = changes.iter().map(|change| change.profile_id).collect();
        let segments = ready_segments(&tx).await?;
        let on_stage: Vec<&Definition> = segments
            .iter()
            .filter(|segment| segment.deps.depends_on_stage())
            .collect();
        let segment_notices = settle_memberships(
            &tx,
            backend,
            &on_stage,
            &changed,
            now,
            "lifecycle stage changed",
        )
        .await?;
        let mut batch_notices: Vec<Notice> = changes
            .into_iter()
            .map(|change| stage_notice(tenant, change, now))
            .collect();
        batch_notices.extend(segment_notices);
        commit_with_reactions(tx, backend, batch_notices, now, &mut notices).await?;
    }
    Ok(notices)
}

/// Brings one segment's membership in line with its condition at `now`, one bounded batch per
/// transaction (the scheduler's work for time windows). Returns the notices of committed changes.
pub async fn resync_segment(
    store_handle: &store::Store,
    tenant: domain::TenantId,
    segment_id: Uuid,
    now: DateTime<Utc>,
    batch: u64,
    reason: &str,
) -> StoreResult<Vec<Notice>> {
    let backend = store_handle.backend();
    let mut notices = Vec::new();
    // Each round settles at least the profiles it found, so this ends; the bound is a guard
    // against a pathological race where others keep moving the same profiles.
    for _ in 0..10_000 {
        let tx = begin_shared(store_handle, tenant).await?;
        let segments = ready_segments(&tx).await?;
        let Some(segment) = segments.iter().find(|segment| segment.id == segment_id) else {
            tx.commit().await?;
            return Ok(notices);
        };
        let (enter, exit) = store::segments::disagreements(
            &tx,
            backend,
            segment_id,
            &segment.condition,
            now,
            batch,
        )
        .await?;
        if enter.is_empty() && exit.is_empty() {
            tx.commit().await?;
            return Ok(notices);
        }
        let ids = lock_profiles(&tx, backend, enter.into_iter().chain(exit)).await?;
        let batch_notices = settle_memberships(&tx, backend, &[segment], &ids, now, reason).await?;
        commit_with_reactions(tx, backend, batch_notices, now, &mut notices).await?;
    }
    Ok(notices)
}

/// Decides again the membership of `ids` in every ready segment that `relevant` selects, one
/// bounded batch per transaction, locking the profiles first (after computed attributes changed
/// outside the write path). Returns the notices of committed changes.
pub async fn resync_profiles(
    store_handle: &store::Store,
    tenant: domain::TenantId,
    ids: &[Uuid],
    now: DateTime<Utc>,
    batch: u64,
    reason: &str,
    relevant: impl Fn(&Definition) -> bool,
) -> StoreResult<Vec<Notice>> {
    let backend = store_handle.backend();
    let mut notices = Vec::new();
    let size = usize::try_from(batch.max(1)).unwrap_or(usize::MAX);
    for chunk in ids.chunks(size) {
        let tx = begin_shared(store_handle, tenant).await?;
        let segments = ready_segments(&tx).await?;
        let chosen: Vec<&Definition> = segments
            .iter()
            .filter(|segment| relevant(segment))
            .collect();
        if chosen.is_empty() {
            tx.commit().await?;
            return Ok(notices);
        }
        let ids = lock_profiles(&tx, backend, chunk.iter().copied()).await?;
        let batch_notices = settle_memberships(&tx, backend, &chosen, &ids, now, reason).await?;
        commit_with_reactions(tx, backend, batch_notices, now, &mut notices).await?;
    }
    Ok(notices)
}

/// A transaction of the tenant holding its segment barrier shared, as every writer of memberships
/// outside a build does (ADR 0005).
async fn begin_shared(
    store_handle: &store::Store,
    tenant: domain::TenantId,
) -> StoreResult<TenantTx> {
    let tx = store_handle.begin(tenant).await?;
    store::segments::barrier(&tx, store_handle.backend(), false).await?;
    Ok(tx)
}

/// Locks these profiles' rows (in id order, as the write path does) and returns their ids in
/// that order: what is decided next is decided on data no batch can change before the commit.
async fn lock_profiles(
    tx: &TenantTx,
    backend: Backend,
    ids: impl IntoIterator<Item = Uuid>,
) -> StoreResult<Vec<Uuid>> {
    let ids: BTreeSet<Uuid> = ids.into_iter().collect();
    store::profiles::load(tx, backend, &ids, true).await?;
    Ok(ids.into_iter().collect())
}

/// Decides the membership of `ids` in `segments` again (see [`resync_segments`]), writes the
/// changes with their history, and returns their notices.
async fn settle_memberships(
    tx: &TenantTx,
    backend: Backend,
    segments: &[&Definition],
    ids: &[Uuid],
    now: DateTime<Utc>,
    reason: &str,
) -> StoreResult<Vec<Notice>> {
    let changes = resync_segments(tx, backend, segments, ids, now, reason).await?;
    store::segments::apply_changes(tx, &changes, now).await?;
    let tenant_id = tx.tenant_id();
    Ok(changes
        .into_iter()
        .map(|change| membership_notice(tenant_id, change, now))
        .collect())
}

/// Queues the reactions to a batch's notices (campaign emails, webhooks) in its transaction,
/// commits, and only then adds the notices and the reactions' own to `out` for publishing.
async fn commit_with_reactions(
    tx: TenantTx,
    backend: Backend,
    batch: Vec<Notice>,
    now: DateTime<Utc>,
    out: &mut Vec<Notice>,
) -> StoreResult<()> {
    let reactions = super::reactions::react(&tx, backend, None, &batch, now).await?;
    tx.commit().await?;
    out.extend(batch);
    out.extend(reactions);
    Ok(())
}
