//! Lifecycle stages: the tenant's model, each profile's stage and the transitions between stages.

use chrono::{DateTime, Utc};
use domain::condition::Condition;
use sea_orm::sea_query::{CaseStatement, Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set, Statement,
};
use uuid::Uuid;

use super::conditions::{db_backend, ids_subquery, Sql};
use super::entity::{lifecycle_stages, lifecycle_transitions, profile_state};
use super::{Backend, StoreResult, TenantTx};

pub use lifecycle_stages::Model as StageRow;
pub use lifecycle_transitions::Model as TransitionRow;
pub use profile_state::Model as ProfileStateRow;

/// The tenant's stored model in evaluation order; empty when the tenant never set one.
pub async fn model(tx: &TenantTx) -> StoreResult<Vec<StageRow>> {
    Ok(lifecycle_stages::Entity::find()
        .filter(lifecycle_stages::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .order_by_asc(lifecycle_stages::Column::Position)
        .all(tx.conn())
        .await?)
}

/// Replaces the tenant's model with these stages, `(key, name, condition, evaluated)` in order.
pub async fn replace_model(
    tx: &TenantTx,
    stages: &[(String, String, serde_json::Value, serde_json::Value)],
) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    lifecycle_stages::Entity::delete_many()
        .filter(lifecycle_stages::Column::TenantId.eq(tenant))
        .exec(tx.conn())
        .await?;
    let rows = stages
        .iter()
        .enumerate()
        .map(
            |(position, (key, name, condition, evaluated))| lifecycle_stages::ActiveModel {
                tenant_id: Set(tenant),
                key: Set(key.clone()),
                name: Set(name.clone()),
                condition: Set(condition.clone()),
                evaluated: Set(Some(evaluated.clone())),
                position: Set(i32::try_from(position).unwrap_or(i32::MAX)),
            },
        );
    if !stages.is_empty() {
        lifecycle_stages::Entity::insert_many(rows)
            .exec_without_returning(tx.conn())
            .await?;
    }
    Ok(())
}

/// The understanding columns of these live profiles.
pub async fn states_of(tx: &TenantTx, ids: &[Uuid]) -> StoreResult<Vec<ProfileStateRow>> {
    let mut rows = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        rows.extend(
            profile_state::Entity::find()
                .filter(profile_state::Column::TenantId.eq(tx.tenant_id().as_uuid()))
                .filter(profile_state::Column::Id.is_in(chunk.iter().copied()))
                .all(tx.conn())
                .await?,
        );
    }
    Ok(rows)
}

/// One stage change to record.
#[derive(Debug, Clone, PartialEq)]
pub struct StageChange {
    pub profile_id: Uuid,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
}

/// Sets the stage of each profile and records a transition for every change into a stage (a
/// profile that leaves every stage has no stage; no transition row is written for that, since a
/// transition always leads to a stage).
pub async fn apply_changes(
    tx: &TenantTx,
    changes: &[StageChange],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    // One statement per chunk: stage = CASE id WHEN … THEN … END.
    for chunk in changes.chunks(200) {
        let mut stage: Option<CaseStatement> = None;
        for change in chunk {
            let when = profile_state::Column::Id.eq(change.profile_id);
            let then = Expr::value(change.to.clone());
            stage = Some(match stage {
                None => Expr::case(when, then),
                Some(case) => case.case(when, then),
            });
        }
        let Some(stage) = stage else { continue };
        profile_state::Entity::update_many()
            .col_expr(
                profile_state::Column::Stage,
                stage
                    .finally(Expr::col(profile_state::Column::Stage))
                    .into(),
            )
            .col_expr(profile_state::Column::StageSince, Expr::value(Some(now)))
            .filter(profile_state::Column::TenantId.eq(tenant))
            .filter(profile_state::Column::Id.is_in(chunk.iter().map(|change| change.profile_id)))
            .exec(tx.conn())
            .await?;
    }
    record_transitions(tx, changes, now).await
}

/// Records a transition for every change into a stage, for changes whose stage is stored
/// already: by [`apply_changes`], or with the profile's first row by the write path.
pub async fn record_transitions(
    tx: &TenantTx,
    changes: &[StageChange],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    let transitions: Vec<&StageChange> = changes
        .iter()
        .filter(|change| change.to.is_some())
        .collect();
    let change_bytes = |change: &&StageChange| {
        change.from.as_ref().map_or(0, String::len)
            + change.to.as_ref().map_or(0, String::len)
            + change.reason.len()
            + 4 * super::wire::FIXED
    };
    for chunk in super::wire::chunks(tx, &transitions, 500, change_bytes) {
        let rows = chunk.iter().filter_map(|change| {
            change
                .to
                .clone()
                .map(|to| lifecycle_transitions::ActiveModel {
                    tenant_id: Set(tenant),
                    id: Set(Uuid::now_v7()),
                    profile_id: Set(change.profile_id),
                    from_stage: Set(change.from.clone()),
                    to_stage: Set(to),
                    at: Set(now),
                    reason: Set(change.reason.clone()),
                })
        });
        lifecycle_transitions::Entity::insert_many(rows)
            .exec_without_returning(tx.conn())
            .await?;
    }
    Ok(())
}

/// A profile's transitions, newest first.
pub async fn transitions_of(
    tx: &TenantTx,
    profile_id: Uuid,
    limit: u64,
) -> StoreResult<Vec<TransitionRow>> {
    Ok(lifecycle_transitions::Entity::find()
        .filter(lifecycle_transitions::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(lifecycle_transitions::Column::ProfileId.eq(profile_id))
        .order_by_desc(lifecycle_transitions::Column::At)
        .order_by_desc(lifecycle_transitions::Column::Id)
        .limit(limit)
        .all(tx.conn())
        .await?)
}

/// How many live profiles are in each stage (`None`: no stage).
pub async fn distribution(tx: &TenantTx) -> StoreResult<Vec<(Option<String>, i64)>> {
    Ok(profile_state::Entity::find()
        .select_only()
        .column(profile_state::Column::Stage)
        .column_as(profile_state::Column::Id.count(), "count")
        .filter(profile_state::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profile_state::Column::MergedInto.is_null())
        .group_by(profile_state::Column::Stage)
        .into_tuple()
        .all(tx.conn())
        .await?)
}

/// Up to `limit` live profiles, in id order, whose stored stage differs from `stage` although
/// `condition` (the exclusive condition of that stage, or the no-stage condition for `None`)
/// holds for them at `now`: the profiles whose stage time has changed. Returns (id, stored stage).
pub async fn stale_stages(
    tx: &TenantTx,
    backend: Backend,
    stage: Option<&str>,
    condition: &Condition,
    now: DateTime<Utc>,
    limit: u64,
) -> StoreResult<Vec<(Uuid, Option<String>)>> {
    let tenant = tx.tenant_id().as_uuid();
    let mut sql = Sql::default();
    sql.push("SELECT p.id, p.stage FROM profiles p WHERE p.tenant_id = ")
        .bind(tenant)
        .push(" AND p.merged_into IS NULL AND ");
    match stage {
        Some(key) => {
            sql.push("(p.stage IS NULL OR p.stage <> ")
                .bind(key.to_owned())
                .push(")");
        }
        None => {
            sql.push("p.stage IS NOT NULL");
        }
    }
    sql.push(" AND p.id IN (");
    sql.append(ids_subquery(backend, tenant, condition, now, None));
    sql.push(") ORDER BY p.id LIMIT ")
        .bind(i64::try_from(limit).unwrap_or(i64::MAX));
    let (text, values) = sql.render(backend);
    let rows = tx
        .conn()
        .query_all_raw(Statement::from_sql_and_values(
            db_backend(backend),
            text,
            values,
        ))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push((
            row.try_get_by_index::<Uuid>(0)?,
            row.try_get_by_index::<Option<String>>(1)?,
        ));
    }
    Ok(out)
}

/// Adds (orders, revenue) to the order totals of each profile (ingestion of orders).
pub async fn add_order_totals(tx: &TenantTx, deltas: &[(Uuid, i64, f64)]) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    // One statement per chunk: x = x + CASE id WHEN … THEN … END.
    for chunk in deltas.chunks(200) {
        let mut orders: Option<CaseStatement> = None;
        let mut revenue: Option<CaseStatement> = None;
        for (id, count, amount) in chunk {
            let when = || profile_state::Column::Id.eq(*id);
            orders = Some(match orders {
                None => Expr::case(when(), Expr::value(*count)),
                Some(case) => case.case(when(), Expr::value(*count)),
            });
            revenue = Some(match revenue {
                None => Expr::case(when(), Expr::value(*amount)),
                Some(case) => case.case(when(), Expr::value(*amount)),
            });
        }
        let (Some(orders), Some(revenue)) = (orders, revenue) else {
            continue;
        };
        profile_state::Entity::update_many()
            .col_expr(
                profile_state::Column::OrderCount,
                Expr::col(profile_state::Column::OrderCount).add(orders.finally(Expr::value(0i64))),
            )
            .col_expr(
                profile_state::Column::TotalRevenue,
                Expr::col(profile_state::Column::TotalRevenue)
                    .add(revenue.finally(Expr::value(0.0f64))),
            )
            .filter(profile_state::Column::TenantId.eq(tenant))
            .filter(profile_state::Column::Id.is_in(chunk.iter().map(|(id, _, _)| *id)))
            .exec(tx.conn())
            .await?;
    }
    Ok(())
}

/// Adds the order totals of a merged-away profile to its survivor's (a merge moves the orders).
pub async fn fold_order_totals(tx: &TenantTx, merged: Uuid, survivor: Uuid) -> StoreResult<()> {
    let states = states_of(tx, &[merged]).await?;
    if let Some(state) = states.first() {
        if state.order_count != 0 || state.total_revenue != 0.0 {
            add_order_totals(tx, &[(survivor, state.order_count, state.total_revenue)]).await?;
        }
    }
    Ok(())
}

/// Sets the order totals of one profile (after a split recomputed them from its events).
pub async fn set_order_totals(
    tx: &TenantTx,
    id: Uuid,
    orders: i64,
    revenue: f64,
) -> StoreResult<()> {
    profile_state::Entity::update_many()
        .col_expr(profile_state::Column::OrderCount, Expr::value(orders))
        .col_expr(profile_state::Column::TotalRevenue, Expr::value(revenue))
        .filter(profile_state::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profile_state::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(())
}
