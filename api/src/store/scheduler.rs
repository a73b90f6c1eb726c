//! The scheduler's claims (`scheduler_ticks`): how the scheduler loops of several processes on one
//! database agree that a tenant's tick runs once per interval.
//!
//! Guarantees: a claim is one statement, a conditional upsert, so of two processes claiming the
//! same tenant's job at once exactly one succeeds, on PostgreSQL (the second waits for the first's
//! row lock, then sees its `started_at`) as on SQLite (one writer at a time). Times are the
//! claiming process's clock, compared as the store compares every instant (on SQLite as text, see
//! `store::analytics`).

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, Statement};

use super::{StoreResult, TenantTx};

/// The job of a whole scheduler tick of a tenant.
pub const TICK: &str = "tick";

/// Records that `holder` starts `job` of the transaction's tenant at `now`, unless the last run
/// started after `unless_started_after` (`None`: record unconditionally, a forced run). Returns
/// whether the run is claimed; the caller commits before doing the work, so that the claim is
/// seen by other processes at once.
pub async fn claim(
    tx: &TenantTx,
    job: &str,
    holder: &str,
    now: DateTime<Utc>,
    unless_started_after: Option<DateTime<Utc>>,
) -> StoreResult<bool> {
    const UPSERT: &str = "INSERT INTO scheduler_ticks (tenant_id, job, started_at, holder, runs)
         VALUES ($1, $2, $3, $4, 1)
         ON CONFLICT (tenant_id, job) DO UPDATE
         SET started_at = excluded.started_at, holder = excluded.holder,
             runs = scheduler_ticks.runs + 1";
    let tenant = tx.tenant_id().as_uuid();
    let mut values: Vec<sea_orm::Value> =
        vec![tenant.into(), job.into(), now.into(), holder.into()];
    let sql = match unless_started_after {
        None => UPSERT.to_owned(),
        Some(limit) => {
            values.push(limit.into());
            format!("{UPSERT} WHERE scheduler_ticks.started_at <= $5")
        }
    };
    let result = tx
        .conn()
        .execute_raw(Statement::from_sql_and_values(
            tx.conn().get_database_backend(),
            sql,
            values,
        ))
        .await?;
    Ok(result.rows_affected() == 1)
}
