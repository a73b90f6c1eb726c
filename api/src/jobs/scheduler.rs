//! The scheduler: what must change while no data arrives. Every tick, for every tenant (walked in
//! pages), it finishes segments left building, recomputes the customer attributes (RFM, churn
//! risk), brings stages and time-dependent segments in line with the clock (a profile leaves
//! "active in the last 7 days" within one tick of the boundary), takes the day's segment sizes,
//! and publishes what changed. Before the tenants, on PostgreSQL with a partitioned events table,
//! one replica creates the partitions ahead and retires those past the platform's retention.
//!
//! Several processes on one database tick each tenant once per interval between them: before it
//! ticks a tenant, the loop ([`run`]) claims the tenant's tick in the database
//! (`store::scheduler::claim`, a conditional upsert of the tenant's `scheduler_ticks` row that
//! succeeds only when the last tick started at least 90 % of an interval ago), and skips the tenant
//! when another process claimed it. Tenants are claimed one by one, so replicas share the tenants
//! of a slow tick. [`tick`], which tests and tools call, is forced: it ticks every tenant whatever
//! the claims say, and records its runs like the loop does.
//!
//! Guarantees: work is done in bounded batches, one transaction each; every change locks the
//! profiles it touches and decides again under the lock, so ticks that do overlap (a forced tick
//! beside the loop, a tick slower than the interval, replicas whose clocks disagree by more than a
//! tenth of the interval), or run beside ingestion, never record a change that is not true. A
//! failing tenant is logged and skipped; the next tick retries it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::condition::Attribute;
use domain::TenantId;

use super::Shutdown;
use crate::service::bus::Notice;
use crate::service::{analytics, privacy, segments, understand, AppState};
use crate::store;

/// Tenants read per page of the registry.
const TENANT_PAGE: u64 = 100;

/// What one tick did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Tenants in the registry when the tick ran.
    pub tenants: usize,
    /// Tenants this tick claimed and ticked (every tenant, when forced).
    pub tenants_ticked: usize,
    /// Tenants left alone because another process ticked them within the interval.
    pub tenants_skipped: usize,
    pub segments_built: usize,
    pub membership_changes: usize,
    pub stage_changes: usize,
    /// Events deleted by the tenants' retention periods and by the platform's (partitions).
    pub events_purged: u64,
    /// Partitions of the events table created ahead by this tick.
    pub event_partitions_created: usize,
    /// Partitions of the events table dropped whole by this tick.
    pub event_partitions_dropped: usize,
    pub failed_tenants: usize,
}

impl TickReport {
    /// Whether this tick did the work of at least one tenant (it may have skipped others).
    pub fn ran(&self) -> bool {
        self.tenants_ticked > 0
    }

    /// Counts the membership changes and stage transitions among published notices (the
    /// emails and other notices they triggered are not counted).
    fn count(&mut self, notices: &[Notice]) {
        for notice in notices {
            match notice {
                Notice::SegmentMembership { .. } => self.membership_changes += 1,
                Notice::StageTransition { .. } => self.stage_changes += 1,
                _ => {}
            }
        }
    }
}

/// Runs ticks until shutdown; does nothing when the tick is zero. Each tick claims every tenant
/// before ticking it, so that several processes on one database tick each tenant once per
/// interval between them.
pub async fn run(state: AppState, mut shutdown: Shutdown) {
    let every = state.config.scheduler_tick;
    if every == Duration::ZERO {
        return;
    }
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        let started = std::time::Instant::now();
        let result = tick_claimed(&state, every).await;
        let finished = state.now().timestamp_millis() as f64 / 1000.0;
        state
            .metrics
            .scheduler_tick(result.is_ok(), started.elapsed(), finished);
        match result {
            Ok(report) if report.ran() => tracing::info!(
                ticked = report.tenants_ticked,
                skipped = report.tenants_skipped,
                failed = report.failed_tenants,
                segments_built = report.segments_built,
                membership_changes = report.membership_changes,
                stage_changes = report.stage_changes,
                events_purged = report.events_purged,
                "scheduler tick ran"
            ),
            Ok(report) => tracing::debug!(
                tenants = report.tenants,
                skipped = report.tenants_skipped,
                failed = report.failed_tenants,
                "scheduler tick skipped: every tenant was ticked by another process within the interval"
            ),
            Err(error) => tracing::error!(error = ?error, "scheduler tick failed"),
        }
    }
}

/// One forced tick over every tenant, at the state's current time: no claim is asked for (tests
/// drive ticks with a manual clock, and a tool may want a tick now), but each tenant's run is
/// recorded in its claim row, so that the loops of other processes count it.
pub async fn tick(state: &AppState) -> anyhow::Result<TickReport> {
    run_tick(state, None).await
}

/// One tick over every tenant that no process ticked in the last 90 % of `every`, claiming each
/// before ticking it (what [`run`] does every `every`).
pub async fn tick_claimed(state: &AppState, every: Duration) -> anyhow::Result<TickReport> {
    run_tick(state, Some(every)).await
}

/// A tenant whose last tick started less than this share of an interval ago is skipped: the
/// slack absorbs the drift of the loops' timers and small differences between the processes'
/// clocks, and still lets one tick per interval through.
const CLAIM_SHARE: f64 = 0.9;

async fn run_tick(state: &AppState, every: Option<Duration>) -> anyhow::Result<TickReport> {
    let now = state.now();
    let unless_started_after = every
        .map(|every| chrono::Duration::from_std(every.mul_f64(CLAIM_SHARE)))
        .transpose()?
        .map(|margin| now - margin);
    let holder = state.store.origin().to_string();
    let mut report = TickReport::default();
    if let Err(error) = partition_upkeep(state, now, &mut report).await {
        tracing::error!(error = ?error, "scheduler: events partitions upkeep failed");
    }
    let mut after = None;
    loop {
        let tenants = store::tenants::ids_page(&state.store, after, TENANT_PAGE).await?;
        let Some(last) = tenants.last().copied() else {
            return Ok(report);
        };
        for tenant in tenants {
            report.tenants += 1;
            let outcome = async {
                if !claim(state, tenant, &holder, now, unless_started_after).await? {
                    return Ok(false);
                }
                tick_tenant(state, tenant, now, &mut report).await?;
                anyhow::Ok(true)
            }
            .await;
            match outcome {
                Ok(true) => report.tenants_ticked += 1,
                Ok(false) => {
                    report.tenants_skipped += 1;
                    tracing::debug!(%tenant, "scheduler: tenant ticked by another process");
                }
                Err(error) => {
                    report.failed_tenants += 1;
                    tracing::error!(%tenant, error = ?error, "scheduler: tenant failed");
                }
            }
        }
        after = Some(last);
    }
}

/// Claims the tenant's tick in a transaction of its own, committed before the work starts, so
/// that other processes see the claim at once.
async fn claim(
    state: &AppState,
    tenant: TenantId,
    holder: &str,
    now: DateTime<Utc>,
    unless_started_after: Option<DateTime<Utc>>,
) -> anyhow::Result<bool> {
    let tx = state.store.begin(tenant).await?;
    let claimed = store::scheduler::claim(
        &tx,
        store::scheduler::TICK,
        holder,
        now,
        unless_started_after,
    )
    .await?;
    tx.commit().await?;
    Ok(claimed)
}

/// One tick of one tenant.
pub async fn tick_tenant(
    state: &AppState,
    tenant: TenantId,
    now: DateTime<Utc>,
    report: &mut TickReport,
) -> anyhow::Result<()> {
    let batch = state.config.scheduler_batch.max(1);
    purge_expired_events(state, tenant, now, batch, report).await?;
    let (building, time_dependent) = {
        let tx = state.store.read(tenant).await?;
        let building: Vec<uuid::Uuid> = store::segments::building(&tx)
            .await?
            .into_iter()
            .map(|row| row.id)
            .collect();
        let time_dependent: Vec<uuid::Uuid> = understand::ready_segments(&tx)
            .await?
            .into_iter()
            .filter(|segment| segment.deps.time_dependent)
            .map(|segment| segment.id)
            .collect();
        tx.commit().await?;
        (building, time_dependent)
    };
    for id in building {
        if segments::build(state, tenant, id).await? {
            report.segments_built += 1;
        }
    }
    // Computed attributes (RFM, churn risk) move with time; segments on them follow.
    let changed = analytics::recompute_customer_attributes(state, tenant, now).await?;
    if !changed.is_empty() {
        let notices = understand::resync_profiles(
            &state.store,
            tenant,
            &changed,
            now,
            batch,
            "customer attributes recomputed",
            |segment| {
                segment
                    .deps
                    .attributes
                    .iter()
                    .any(|attribute| COMPUTED.contains(attribute))
            },
        )
        .await?;
        report.count(&notices);
        state.bus.publish(notices);
    }
    // Stages next (a model may use computed attributes): segments on the stage follow inside
    // `restage`.
    let notices = understand::restage(&state.store, tenant, now, batch, "time passed").await?;
    report.count(&notices);
    state.bus.publish(notices);
    for id in time_dependent {
        let notices =
            understand::resync_segment(&state.store, tenant, id, now, batch, "time passed").await?;
        report.count(&notices);
        state.bus.publish(notices);
    }
    // Today's sizes; taken every tick, the day keeps its last.
    analytics::take_segment_snapshots(state, tenant, now.date_naive()).await?;
    Ok(())
}

/// Deletes the tenant's events older than its retention period (privacy settings), in bounded
/// batches of one transaction each, then lets the segments on events follow for the profiles
/// that lost events.
async fn purge_expired_events(
    state: &AppState,
    tenant: TenantId,
    now: DateTime<Utc>,
    batch: u64,
    report: &mut TickReport,
) -> anyhow::Result<()> {
    let days = {
        let tx = state.store.read(tenant).await?;
        let settings = privacy::settings_in(&tx)
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        tx.commit().await?;
        settings.event_retention_days
    };
    let Some(days) = days else {
        return Ok(());
    };
    let cutoff = now - chrono::Duration::days(i64::from(days));
    let mut touched: std::collections::BTreeSet<uuid::Uuid> = Default::default();
    loop {
        let tx = state.store.begin(tenant).await?;
        let purged = store::events::purge_before(&tx, cutoff, batch).await?;
        tx.commit().await?;
        if purged.is_empty() {
            break;
        }
        for (profile_id, count) in purged {
            report.events_purged += u64::try_from(count).unwrap_or_default();
            touched.insert(profile_id);
        }
    }
    if touched.is_empty() {
        return Ok(());
    }
    let ids: Vec<uuid::Uuid> = touched.into_iter().collect();
    tracing::info!(%tenant, profiles = ids.len(), days, "retention: old events purged");
    let notices = understand::resync_profiles(
        &state.store,
        tenant,
        &ids,
        now,
        batch,
        "events purged (retention)",
        |segment| segment.deps.any_event || !segment.deps.event_names.is_empty(),
    )
    .await?;
    report.count(&notices);
    state.bus.publish(notices);
    Ok(())
}

/// On a partitioned events table: creates the partitions ahead and drops those whose whole range
/// is older than `CDP_EVENTS_RETENTION_DAYS` (one replica per tick, see `store::partitions`),
/// then lets the segments on events follow for the profiles that lost events, as the tenants'
/// own retention does.
async fn partition_upkeep(
    state: &AppState,
    now: DateTime<Utc>,
    report: &mut TickReport,
) -> anyhow::Result<()> {
    let cutoff = state
        .config
        .events_retention_days
        .map(|days| now - chrono::Duration::days(i64::from(days)));
    let Some(upkeep) = store::partitions::upkeep(&state.store, now, cutoff).await? else {
        return Ok(());
    };
    report.event_partitions_created += usize::try_from(upkeep.created).unwrap_or_default();
    report.event_partitions_dropped += upkeep.dropped.len();
    if !upkeep.dropped.is_empty() {
        tracing::info!(dropped = ?upkeep.dropped, "retention: events partitions dropped");
    }
    let mut by_tenant: std::collections::BTreeMap<uuid::Uuid, Vec<uuid::Uuid>> = Default::default();
    for (tenant, profile, removed) in upkeep.lost {
        report.events_purged += u64::try_from(removed).unwrap_or_default();
        by_tenant.entry(tenant).or_default().push(profile);
    }
    let batch = state.config.scheduler_batch.max(1);
    for (tenant, ids) in by_tenant {
        let notices = understand::resync_profiles(
            &state.store,
            TenantId(tenant),
            &ids,
            now,
            batch,
            "events purged (platform retention)",
            |segment| segment.deps.any_event || !segment.deps.event_names.is_empty(),
        )
        .await?;
        report.count(&notices);
        state.bus.publish(notices);
    }
    Ok(())
}

/// The attributes the scheduler recomputes.
const COMPUTED: [Attribute; 5] = [
    Attribute::RfmRecency,
    Attribute::RfmFrequency,
    Attribute::RfmMonetary,
    Attribute::RfmScore,
    Attribute::ChurnRisk,
];
