//! Segments, their stored membership and its history.
//!
//! Guarantees: membership changes and their history rows are written together, in the caller's
//! transaction; the bulk operations ([`rebuild`], [`reconcile`]) run in the database (an
//! `INSERT … SELECT` / `DELETE … WHERE … IN` over the compiled condition), never by loading every
//! profile. [`barrier`] orders a full build against concurrent real-time evaluation on PostgreSQL
//! (see ADR 0005).

use chrono::{DateTime, Utc};
use domain::condition::Condition;
use sea_orm::sea_query::ArrayType;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, Statement,
};
use serde_json::Value as Json;
use uuid::Uuid;

use super::conditions::{db_backend, ids_subquery, Sql};
use super::entity::{segment_history, segment_members, segments};
use super::{Backend, StoreResult, TenantTx};

pub use segment_history::Model as HistoryRow;
pub use segments::Model as SegmentRow;

/// Created, members not computed yet.
pub const STATUS_BUILDING: &str = "building";
/// Condition changed, members being recomputed (changes get history rows).
pub const STATUS_REBUILDING: &str = "rebuilding";
pub const STATUS_READY: &str = "ready";

const CHUNK: usize = 500;

/// Every segment of the tenant, oldest first.
pub async fn list(tx: &TenantTx) -> StoreResult<Vec<SegmentRow>> {
    Ok(segments::Entity::find()
        .filter(segments::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .order_by_asc(segments::Column::CreatedAt)
        .order_by_asc(segments::Column::Id)
        .all(tx.conn())
        .await?)
}

pub async fn get(tx: &TenantTx, id: Uuid) -> StoreResult<Option<SegmentRow>> {
    Ok(segments::Entity::find()
        .filter(segments::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segments::Column::Id.eq(id))
        .one(tx.conn())
        .await?)
}

/// What a segment is made of, as the service submits it.
#[derive(Debug, Clone)]
pub struct SegmentDraft {
    pub name: String,
    pub description: Option<String>,
    pub condition: Json,
    /// The condition as evaluated: personal values compared through their blind index.
    pub evaluated: Json,
    pub time_dependent: bool,
}

pub async fn insert(
    tx: &TenantTx,
    id: Uuid,
    draft: SegmentDraft,
    now: DateTime<Utc>,
) -> StoreResult<SegmentRow> {
    Ok(segments::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        id: Set(id),
        name: Set(draft.name),
        description: Set(draft.description),
        condition: Set(draft.condition),
        evaluated: Set(Some(draft.evaluated)),
        status: Set(STATUS_BUILDING.to_owned()),
        size: Set(0),
        time_dependent: Set(draft.time_dependent),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(tx.conn())
    .await?)
}

/// Replaces a segment's definition and marks it rebuilding.
pub async fn update(
    tx: &TenantTx,
    id: Uuid,
    draft: SegmentDraft,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    segments::Entity::update_many()
        .col_expr(segments::Column::Name, Expr::value(draft.name))
        .col_expr(
            segments::Column::Description,
            Expr::value(draft.description),
        )
        .col_expr(segments::Column::Condition, Expr::value(draft.condition))
        .col_expr(
            segments::Column::Evaluated,
            Expr::value(Some(draft.evaluated)),
        )
        .col_expr(
            segments::Column::TimeDependent,
            Expr::value(draft.time_dependent),
        )
        .col_expr(segments::Column::Status, Expr::value(STATUS_REBUILDING))
        .col_expr(segments::Column::UpdatedAt, Expr::value(now))
        .filter(segments::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segments::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Replaces the evaluated form of a segment's condition (after a change of the tenant's personal
/// keys) and marks it rebuilding.
pub async fn set_evaluated(
    tx: &TenantTx,
    id: Uuid,
    evaluated: Json,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    segments::Entity::update_many()
        .col_expr(segments::Column::Evaluated, Expr::value(Some(evaluated)))
        .col_expr(segments::Column::Status, Expr::value(STATUS_REBUILDING))
        .col_expr(segments::Column::UpdatedAt, Expr::value(now))
        .filter(segments::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segments::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Changes only a segment's name and description.
pub async fn rename(
    tx: &TenantTx,
    id: Uuid,
    name: String,
    description: Option<String>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    segments::Entity::update_many()
        .col_expr(segments::Column::Name, Expr::value(name))
        .col_expr(segments::Column::Description, Expr::value(description))
        .col_expr(segments::Column::UpdatedAt, Expr::value(now))
        .filter(segments::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segments::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Deletes a segment; its members, history and snapshots go with it (foreign keys cascade).
pub async fn delete(tx: &TenantTx, id: Uuid) -> StoreResult<bool> {
    // Children first: SQLite databases opened without foreign-key enforcement would keep them.
    segment_members::Entity::delete_many()
        .filter(segment_members::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segment_members::Column::SegmentId.eq(id))
        .exec(tx.conn())
        .await?;
    segment_history::Entity::delete_many()
        .filter(segment_history::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segment_history::Column::SegmentId.eq(id))
        .exec(tx.conn())
        .await?;
    let result = segments::Entity::delete_many()
        .filter(segments::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segments::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(result.rows_affected > 0)
}

/// Marks a segment built, with its size, when its definition is still the one that was built
/// (`built_version` is the `updated_at` the build started from). False when it changed meanwhile.
pub async fn mark_ready(
    tx: &TenantTx,
    id: Uuid,
    built_version: DateTime<Utc>,
    size: u64,
) -> StoreResult<bool> {
    let result = segments::Entity::update_many()
        .col_expr(segments::Column::Status, Expr::value(STATUS_READY))
        .col_expr(
            segments::Column::Size,
            Expr::value(i64::try_from(size).unwrap_or(i64::MAX)),
        )
        .filter(segments::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segments::Column::Id.eq(id))
        .filter(segments::Column::UpdatedAt.eq(built_version))
        .exec(tx.conn())
        .await?;
    Ok(result.rows_affected > 0)
}

/// The tenant's segments still building or rebuilding.
pub async fn building(tx: &TenantTx) -> StoreResult<Vec<SegmentRow>> {
    Ok(segments::Entity::find()
        .filter(segments::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segments::Column::Status.ne(STATUS_READY))
        .all(tx.conn())
        .await?)
}

/// The number of members of a segment.
pub async fn size(tx: &TenantTx, id: Uuid) -> StoreResult<u64> {
    Ok(segment_members::Entity::find()
        .filter(segment_members::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segment_members::Column::SegmentId.eq(id))
        .count(tx.conn())
        .await?)
}

/// One page of a segment's member ids in id order, after `after`.
pub async fn member_page(
    tx: &TenantTx,
    id: Uuid,
    after: Option<Uuid>,
    limit: u64,
) -> StoreResult<Vec<Uuid>> {
    let mut query = segment_members::Entity::find()
        .select_only()
        .column(segment_members::Column::ProfileId)
        .filter(segment_members::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segment_members::Column::SegmentId.eq(id));
    if let Some(after) = after {
        query = query.filter(segment_members::Column::ProfileId.gt(after));
    }
    Ok(query
        .order_by_asc(segment_members::Column::ProfileId)
        .limit(limit)
        .into_tuple::<Uuid>()
        .all(tx.conn())
        .await?)
}

/// (segment id, profile id) of every membership of these profiles.
pub async fn memberships_of(tx: &TenantTx, profile_ids: &[Uuid]) -> StoreResult<Vec<(Uuid, Uuid)>> {
    let mut found = Vec::new();
    for chunk in profile_ids.chunks(CHUNK) {
        let rows: Vec<(Uuid, Uuid)> = segment_members::Entity::find()
            .select_only()
            .column(segment_members::Column::SegmentId)
            .column(segment_members::Column::ProfileId)
            .filter(segment_members::Column::TenantId.eq(tx.tenant_id().as_uuid()))
            .filter(super::any_of(
                tx.backend(),
                segment_members::Column::ProfileId,
                ArrayType::Uuid,
                chunk.iter().copied(),
            ))
            .into_tuple()
            .all(tx.conn())
            .await?;
        found.extend(rows);
    }
    Ok(found)
}

/// One membership change to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub segment_id: Uuid,
    pub profile_id: Uuid,
    pub entered: bool,
    pub reason: String,
}

/// Applies membership changes and writes their history, at `now`.
pub async fn apply_changes(
    tx: &TenantTx,
    changes: &[Change],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    let change_bytes = |change: &Change| change.reason.len() + 6 * super::wire::FIXED;
    for chunk in super::wire::chunks(tx, changes, CHUNK, change_bytes) {
        let entered: Vec<segment_members::ActiveModel> = chunk
            .iter()
            .filter(|change| change.entered)
            .map(|change| segment_members::ActiveModel {
                tenant_id: Set(tenant),
                segment_id: Set(change.segment_id),
                profile_id: Set(change.profile_id),
                since: Set(now),
            })
            .collect();
        if !entered.is_empty() {
            segment_members::Entity::insert_many(entered)
                .on_conflict(
                    OnConflict::columns([
                        segment_members::Column::TenantId,
                        segment_members::Column::SegmentId,
                        segment_members::Column::ProfileId,
                    ])
                    .do_nothing()
                    .to_owned(),
                )
                .exec_without_returning(tx.conn())
                .await?;
        }
        for change in chunk.iter().filter(|change| !change.entered) {
            segment_members::Entity::delete_many()
                .filter(segment_members::Column::TenantId.eq(tenant))
                .filter(segment_members::Column::SegmentId.eq(change.segment_id))
                .filter(segment_members::Column::ProfileId.eq(change.profile_id))
                .exec(tx.conn())
                .await?;
        }
        let history = chunk.iter().map(|change| segment_history::ActiveModel {
            tenant_id: Set(tenant),
            id: Set(Uuid::now_v7()),
            segment_id: Set(change.segment_id),
            profile_id: Set(change.profile_id),
            entered: Set(change.entered),
            at: Set(now),
            reason: Set(change.reason.clone()),
        });
        if !chunk.is_empty() {
            segment_history::Entity::insert_many(history)
                .exec_without_returning(tx.conn())
                .await?;
        }
    }
    Ok(())
}

/// A profile's membership history, newest first.
pub async fn history_of_profile(
    tx: &TenantTx,
    profile_id: Uuid,
    limit: u64,
) -> StoreResult<Vec<HistoryRow>> {
    Ok(segment_history::Entity::find()
        .filter(segment_history::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segment_history::Column::ProfileId.eq(profile_id))
        .order_by_desc(segment_history::Column::At)
        .order_by_desc(segment_history::Column::Id)
        .limit(limit)
        .all(tx.conn())
        .await?)
}

/// A segment's membership history, newest first.
pub async fn history_of_segment(
    tx: &TenantTx,
    segment_id: Uuid,
    limit: u64,
) -> StoreResult<Vec<HistoryRow>> {
    Ok(segment_history::Entity::find()
        .filter(segment_history::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segment_history::Column::SegmentId.eq(segment_id))
        .order_by_desc(segment_history::Column::At)
        .order_by_desc(segment_history::Column::Id)
        .limit(limit)
        .all(tx.conn())
        .await?)
}

/// Orders whole-segment work against real-time evaluation (ADR 0005). Real-time evaluation takes
/// the tenant's barrier shared, a full build takes it exclusively: a build then waits for the
/// batches in flight and holds new ones back until it commits, so no batch evaluates a segment
/// against a membership that a build is rewriting. SQLite serializes writers already.
pub async fn barrier(tx: &TenantTx, backend: Backend, exclusive: bool) -> StoreResult<()> {
    if backend != Backend::Postgres {
        return Ok(());
    }
    // Advisory transaction locks last until the end of the transaction: a write path that took
    // the barrier early (ingestion, before reading the privacy settings) does not ask again.
    let level = if exclusive {
        super::BARRIER_EXCLUSIVE
    } else {
        super::BARRIER_SHARED
    };
    if tx.barrier_held() >= level {
        return Ok(());
    }
    let (class, key) = barrier_key(tx.tenant_id());
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock($1, $2)"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1, $2)"
    };
    tx.conn()
        .execute_raw(Statement::from_sql_and_values(
            db_backend(backend),
            sql,
            [class.into(), key.into()],
        ))
        .await?;
    tx.note_barrier(level);
    Ok(())
}

/// The first key of the two-key advisory locks of segment builds.
const BARRIER_CLASS: i32 = 0x5E6;

/// The advisory lock of a tenant's segment barrier: (class, key), the key made of the first four
/// bytes of the tenant id.
pub(crate) fn barrier_key(tenant_id: domain::TenantId) -> (i32, i32) {
    let id = tenant_id.as_uuid();
    let bytes = id.as_bytes();
    (
        BARRIER_CLASS,
        i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
    )
}

/// A new history id made by the database: the bulk statements insert many rows at once.
fn new_id_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "gen_random_uuid()",
        // sqlx stores a UUID as 16 bytes on SQLite.
        Backend::Sqlite => "randomblob(16)",
    }
}

/// Brings a segment's stored membership in line with `condition` at `now`, in the database:
/// profiles that match and are not members enter, members that no longer match exit. With
/// `reason`, every change gets a history row with it; without, none does (the first build of a
/// segment: its members are found, not changed). The caller holds the tenant's barrier
/// exclusively, so that the statements see the same profiles. Returns (entered, exited).
pub async fn rebuild(
    tx: &TenantTx,
    backend: Backend,
    segment_id: Uuid,
    condition: &Condition,
    now: DateTime<Utc>,
    reason: Option<&str>,
) -> StoreResult<(u64, u64)> {
    let tenant = tx.tenant_id().as_uuid();
    let exits = |select: &str| {
        let mut sql = Sql::default();
        sql.push(select);
        sql.push(" FROM segment_members m WHERE m.tenant_id = ")
            .bind(tenant)
            .push(" AND m.segment_id = ")
            .bind(segment_id)
            .push(" AND m.profile_id NOT IN (");
        sql.append(ids_subquery(backend, tenant, condition, now, None));
        sql.push(")");
        sql
    };
    let entries = |select: &str| {
        let mut sql = Sql::default();
        sql.push(select);
        sql.push(" FROM (");
        sql.append(ids_subquery(backend, tenant, condition, now, None));
        sql.push(") c WHERE NOT EXISTS (SELECT 1 FROM segment_members m WHERE m.tenant_id = ")
            .bind(tenant)
            .push(" AND m.segment_id = ")
            .bind(segment_id)
            .push(" AND m.profile_id = c.id)");
        sql
    };
    if let Some(reason) = reason {
        let mut history = Sql::default();
        history
            .push(
                "INSERT INTO segment_history (tenant_id, id, segment_id, profile_id, entered, at, \
                 reason) SELECT m.tenant_id, ",
            )
            .push(new_id_sql(backend))
            .push(", m.segment_id, m.profile_id, ")
            .bind(false)
            .push(", ")
            .bind(now)
            .push(", ")
            .bind(reason.to_owned());
        history.append(exits(""));
        execute(tx, backend, history).await?;
    }
    let mut delete = Sql::default();
    delete
        .push("DELETE FROM segment_members WHERE tenant_id = ")
        .bind(tenant)
        .push(" AND segment_id = ")
        .bind(segment_id)
        .push(" AND profile_id IN (");
    delete.append(exits("SELECT m.profile_id"));
    delete.push(")");
    let exited = execute(tx, backend, delete).await?;

    if let Some(reason) = reason {
        let mut history = Sql::default();
        history
            .push(
                "INSERT INTO segment_history (tenant_id, id, segment_id, profile_id, entered, at, \
                 reason) SELECT ",
            )
            .bind(tenant)
            .push(", ")
            .push(new_id_sql(backend))
            .push(", ")
            .bind(segment_id)
            .push(", c.id, ")
            .bind(true)
            .push(", ")
            .bind(now)
            .push(", ")
            .bind(reason.to_owned());
        history.append(entries(""));
        execute(tx, backend, history).await?;
    }
    let mut insert = Sql::default();
    insert
        .push("INSERT INTO segment_members (tenant_id, segment_id, profile_id, since) SELECT ")
        .bind(tenant)
        .push(", ")
        .bind(segment_id)
        .push(", c.id, ")
        .bind(now);
    insert.append(entries(""));
    let entered = execute(tx, backend, insert).await?;
    Ok((entered, exited))
}

/// Up to `limit` profiles (in id order) whose membership of the segment disagrees with
/// `condition` at `now`: (should enter, should exit). The scheduler locks them and decides each
/// again before changing anything.
pub async fn disagreements(
    tx: &TenantTx,
    backend: Backend,
    segment_id: Uuid,
    condition: &Condition,
    now: DateTime<Utc>,
    limit: u64,
) -> StoreResult<(Vec<Uuid>, Vec<Uuid>)> {
    let tenant = tx.tenant_id().as_uuid();
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut enter = Sql::default();
    enter.push("SELECT c.id FROM (");
    enter.append(ids_subquery(backend, tenant, condition, now, None));
    enter
        .push(") c WHERE NOT EXISTS (SELECT 1 FROM segment_members m WHERE m.tenant_id = ")
        .bind(tenant)
        .push(" AND m.segment_id = ")
        .bind(segment_id)
        .push(" AND m.profile_id = c.id) ORDER BY c.id LIMIT ")
        .bind(limit);
    let mut exit = Sql::default();
    exit.push("SELECT m.profile_id FROM segment_members m WHERE m.tenant_id = ")
        .bind(tenant)
        .push(" AND m.segment_id = ")
        .bind(segment_id)
        .push(" AND m.profile_id NOT IN (");
    exit.append(ids_subquery(backend, tenant, condition, now, None));
    exit.push(") ORDER BY m.profile_id LIMIT ").bind(limit);
    Ok((
        query_ids(tx, backend, enter).await?,
        query_ids(tx, backend, exit).await?,
    ))
}

/// Removes every membership of these (merged-away or erased) profiles, with history.
pub async fn remove_profiles(
    tx: &TenantTx,
    profile_ids: &[Uuid],
    reason: &str,
    now: DateTime<Utc>,
) -> StoreResult<Vec<Change>> {
    let changes: Vec<Change> = memberships_of(tx, profile_ids)
        .await?
        .into_iter()
        .map(|(segment_id, profile_id)| Change {
            segment_id,
            profile_id,
            entered: false,
            reason: reason.to_owned(),
        })
        .collect();
    apply_changes(tx, &changes, now).await?;
    Ok(changes)
}

async fn query_ids(tx: &TenantTx, backend: Backend, sql: Sql) -> StoreResult<Vec<Uuid>> {
    let (text, values) = sql.render(backend);
    let rows = tx
        .conn()
        .query_all_raw(Statement::from_sql_and_values(
            db_backend(backend),
            text,
            values,
        ))
        .await?;
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.try_get_by_index::<Uuid>(0)?);
    }
    Ok(ids)
}

async fn execute(tx: &TenantTx, backend: Backend, sql: Sql) -> StoreResult<u64> {
    let (text, values) = sql.render(backend);
    let result = tx
        .conn()
        .execute_raw(Statement::from_sql_and_values(
            db_backend(backend),
            text,
            values,
        ))
        .await?;
    Ok(result.rows_affected())
}
