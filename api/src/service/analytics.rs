//! Customer analytics: the computed attributes of profiles (order totals, RFM scores, churn risk),
//! daily segment sizes, and the read-only analytics views (stage funnel, segment overlap, size
//! history, RFM grid).
//!
//! Guarantees: the recomputations run in the database in one tenant transaction each, write only
//! what changes and are idempotent; the views need PROFILES_READ, checked before any data is
//! touched, and see only the principal's tenant. The rules are documented in `docs/understand.md`.

use std::collections::HashMap;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use domain::{Permission, TenantId};
use uuid::Uuid;

use super::auth::require_permission;
use super::{AppState, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::store;

/// The most days `segmentSizeHistory` looks back.
pub const MAX_HISTORY_DAYS: i32 = 366;

/// Brings every computed attribute of the tenant's live profiles up to date at `now`: order
/// totals from the events (repairing what ingestion maintains), then mean gaps, churn risk and RFM
/// scores. The scheduler calls it every tick; imports and merges may call it at once. Returns the
/// ids, in id order, of the profiles whose RFM scores or churn risk changed, whose segment
/// memberships may therefore have changed.
#[tracing::instrument(skip(state), fields(tenant_id = %tenant))]
pub async fn refresh(
    state: &AppState,
    tenant: TenantId,
    now: DateTime<Utc>,
) -> ServiceResult<Vec<Uuid>> {
    Ok(store::with_retry(|| async {
        let tx = state.store.begin(tenant).await?;
        store::analytics::recompute_order_totals(&tx).await?;
        let changed = store::analytics::recompute_customer_attributes(&tx, now).await?;
        tx.commit().await?;
        Ok(changed)
    })
    .await?)
}

/// Recomputes mean gaps, churn risk and RFM scores of the tenant's live profiles at `now` from the
/// stored order totals, without touching the totals. Returns the ids, in id order, of the profiles
/// whose RFM scores or churn risk changed.
#[tracing::instrument(skip(state), fields(tenant_id = %tenant))]
pub async fn recompute_customer_attributes(
    state: &AppState,
    tenant: TenantId,
    now: DateTime<Utc>,
) -> ServiceResult<Vec<Uuid>> {
    Ok(store::with_retry(|| async {
        let tx = state.store.begin(tenant).await?;
        let changed = store::analytics::recompute_customer_attributes(&tx, now).await?;
        tx.commit().await?;
        Ok(changed)
    })
    .await?)
}

/// Records the size of every segment of the tenant for `day`; taking it again the same day
/// replaces that day's sizes. Returns the number of segments.
#[tracing::instrument(skip(state), fields(tenant_id = %tenant))]
pub async fn take_segment_snapshots(
    state: &AppState,
    tenant: TenantId,
    day: NaiveDate,
) -> ServiceResult<u64> {
    Ok(store::with_retry(|| async {
        let tx = state.store.begin(tenant).await?;
        let segments = store::analytics::take_segment_snapshots(&tx, day).await?;
        tx.commit().await?;
        Ok(segments)
    })
    .await?)
}

/// The computed attributes of one profile.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerAttributes {
    pub total_revenue: f64,
    pub order_count: i64,
    pub mean_gap_seconds: Option<f64>,
    pub rfm: Option<Rfm>,
    pub churn_risk: bool,
    /// Whole days since the profile was last seen, as the condition language computes it.
    pub days_since_last_seen: i64,
}

/// RFM quintile scores, each 1 to 5 (5 is the most recent, most frequent, highest spending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfm {
    pub recency: i32,
    pub frequency: i32,
    pub monetary: i32,
}

impl Rfm {
    /// `recency * 100 + frequency * 10 + monetary`, the `rfm_score` of the condition language.
    pub fn score(&self) -> i32 {
        self.recency * 100 + self.frequency * 10 + self.monetary
    }
}

/// The computed attributes of a live profile (a merged id resolves to its survivor), or None
/// when there is no such profile in the principal's tenant.
/// The computed attributes of each of `profile_ids` (ids of live profiles, as a profile read in
/// this request carries) that has some, in one read.
pub async fn attributes(
    state: &AppState,
    principal: Option<&Principal>,
    profile_ids: &[Uuid],
) -> ServiceResult<HashMap<Uuid, CustomerAttributes>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let now = state.now();
    let tx = state.store.read(principal.tenant_id).await?;
    let rows = store::analytics::attributes_of(&tx, profile_ids).await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let attributes = CustomerAttributes {
                total_revenue: row.total_revenue,
                order_count: row.order_count,
                mean_gap_seconds: row.mean_gap_seconds,
                rfm: match (row.rfm_recency, row.rfm_frequency, row.rfm_monetary) {
                    (Some(recency), Some(frequency), Some(monetary)) => Some(Rfm {
                        recency,
                        frequency,
                        monetary,
                    }),
                    _ => None,
                },
                churn_risk: row.churn_risk,
                days_since_last_seen: domain::analytics::days_since(now, row.last_seen_at),
            };
            (row.profile_id, attributes)
        })
        .collect())
}

/// One step of the stage funnel: from a stage to the next one in the model.
#[derive(Debug, Clone, PartialEq)]
pub struct FunnelStep {
    pub from_stage: String,
    pub from_name: String,
    pub to_stage: String,
    pub to_name: String,
    /// Live profiles that were in `from_stage` at some time in the period.
    pub reached: i64,
    /// Live profiles with a transition from `from_stage` to `to_stage` in the period.
    pub converted: i64,
    /// `converted / reached`, 0 when nobody reached the stage.
    pub conversion_rate: f64,
}

/// For each consecutive pair of the tenant's lifecycle stages, in model order: how many profiles
/// were in the first stage during `[since, until)` and how many moved from it to the next.
pub async fn stage_funnel(
    state: &AppState,
    principal: Option<&Principal>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> ServiceResult<Vec<FunnelStep>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    if until <= since {
        return Err(ServiceError::bad_input(
            "until",
            "until must be after since",
        ));
    }
    let tx = state.store.read(principal.tenant_id).await?;
    let stages = store::analytics::stages(&tx).await?;
    if stages.len() < 2 {
        return Ok(Vec::new());
    }
    let transitions = store::analytics::transition_counts(&tx, since, until).await?;
    let reach = store::analytics::stage_reach(&tx, since, until).await?;
    Ok(stages
        .windows(2)
        .map(|pair| {
            let (from, to) = (&pair[0], &pair[1]);
            let reached = reach
                .iter()
                .find(|(stage, _)| *stage == from.key)
                .map_or(0, |(_, count)| *count);
            let converted = transitions
                .iter()
                .find(|(from_stage, to_stage, _)| *from_stage == from.key && *to_stage == to.key)
                .map_or(0, |(_, _, count)| *count);
            FunnelStep {
                from_stage: from.key.clone(),
                from_name: from.name.clone(),
                to_stage: to.key.clone(),
                to_name: to.name.clone(),
                reached,
                converted,
                conversion_rate: if reached > 0 {
                    converted as f64 / reached as f64
                } else {
                    0.0
                },
            }
        })
        .collect())
}

/// The members two segments share.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentOverlap {
    pub size_a: i64,
    pub size_b: i64,
    pub intersection: i64,
    pub union: i64,
    /// `intersection / union`, 0 when both segments are empty.
    pub jaccard: f64,
}

fn parse_segment_id(id: &str) -> ServiceResult<Uuid> {
    Uuid::parse_str(id.trim()).map_err(|_| ServiceError::NotFound("segment"))
}

/// Sizes of two segments, of their intersection and union, and their Jaccard index, from the
/// stored memberships. NOT_FOUND unless both are segments of the principal's tenant.
pub async fn segment_overlap(
    state: &AppState,
    principal: Option<&Principal>,
    a: &str,
    b: &str,
) -> ServiceResult<SegmentOverlap> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let (a, b) = (parse_segment_id(a)?, parse_segment_id(b)?);
    let tx = state.store.read(principal.tenant_id).await?;
    let found = store::analytics::existing_segments(&tx, &[a, b]).await?;
    if !found.contains(&a) || !found.contains(&b) {
        return Err(ServiceError::NotFound("segment"));
    }
    let (size_a, size_b, intersection, union) =
        store::analytics::segment_overlap(&tx, a, b).await?;
    Ok(SegmentOverlap {
        size_a,
        size_b,
        intersection,
        union,
        jaccard: if union > 0 {
            intersection as f64 / union as f64
        } else {
            0.0
        },
    })
}

/// The recorded size of a segment on each of the last `days` days (today included), oldest first;
/// days without a snapshot are left out. NOT_FOUND unless the segment is the tenant's.
pub async fn segment_size_history(
    state: &AppState,
    principal: Option<&Principal>,
    segment_id: &str,
    days: i32,
) -> ServiceResult<Vec<(NaiveDate, i64)>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    if !(1..=MAX_HISTORY_DAYS).contains(&days) {
        return Err(ServiceError::bad_input(
            "days",
            format!("days must be between 1 and {MAX_HISTORY_DAYS}"),
        ));
    }
    let segment_id = parse_segment_id(segment_id)?;
    let today = state.now().date_naive();
    let first_day = today - Duration::days(i64::from(days) - 1);
    let tx = state.store.read(principal.tenant_id).await?;
    if store::analytics::existing_segments(&tx, &[segment_id])
        .await?
        .is_empty()
    {
        return Err(ServiceError::NotFound("segment"));
    }
    Ok(store::analytics::segment_sizes(&tx, segment_id, first_day)
        .await?
        .into_iter()
        .filter(|(day, _)| *day <= today)
        .collect())
}

/// One cell of the RFM grid.
#[derive(Debug, Clone, PartialEq)]
pub struct RfmCell {
    pub recency: i32,
    pub frequency: i32,
    pub profiles: i64,
    pub total_revenue: f64,
}

/// The RFM grid: all 25 (recency, frequency) score pairs, recency 5 to 1, then frequency 5 to
/// 1, each with the number of live profiles scored so and their summed revenue (empty cells
/// included, with zeros). Profiles without orders have no scores and are not counted.
pub async fn rfm_distribution(
    state: &AppState,
    principal: Option<&Principal>,
) -> ServiceResult<Vec<RfmCell>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let rows = store::analytics::rfm_cells(&tx).await?;
    let mut cells = Vec::with_capacity(25);
    for recency in (1..=5).rev() {
        for frequency in (1..=5).rev() {
            let row = rows
                .iter()
                .find(|row| row.recency == recency && row.frequency == frequency);
            cells.push(RfmCell {
                recency,
                frequency,
                profiles: row.map_or(0, |row| row.profiles),
                total_revenue: row.map_or(0.0, |row| row.total_revenue),
            });
        }
    }
    Ok(cells)
}
