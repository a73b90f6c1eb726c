//! The time partitions of the events table on PostgreSQL (ADR 0011): the conversion, the message
//! id register the write path reads when the table is partitioned, and the scheduler's upkeep.
//! The DDL lives in `migration::partitions`; this module calls it.
//!
//! Guarantees: the upkeep runs on one replica at a time (a transaction-scoped advisory lock that
//! the others do not wait for), in one transaction: partitions are created and retired together
//! with the bookkeeping of event counts and message ids, or not at all.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use uuid::Uuid;

pub use migration::partitions::{Conversion, Interval, AHEAD, DEFAULT_PARTITION, MESSAGE_IDS};

use super::{Backend, Store, StoreError, StoreResult, TenantTx};

/// The key of the advisory lock of the upkeep (any constant; "cdp-partitions" in ASCII).
const UPKEEP_LOCK: i64 = 0x6364_702d_7061_7274;

/// Converts the events table into a partitioned table (run as the owner of the tables).
pub async fn convert(store: &Store, interval: Interval) -> StoreResult<Conversion> {
    Ok(migration::partitions::convert_events(&store.db, interval).await?)
}

/// Which of these message ids the register holds.
pub(super) async fn existing_message_ids(
    tx: &TenantTx,
    message_ids: &[String],
) -> StoreResult<Vec<String>> {
    let mut found = Vec::new();
    for chunk in message_ids.chunks(500) {
        let ids = super::array_of(sea_orm::sea_query::ArrayType::String, chunk.iter().cloned());
        let rows = tx
            .conn()
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT message_id FROM event_message_ids
                 WHERE tenant_id = $1 AND message_id = ANY ($2::text[])",
                [tx.tenant_id().as_uuid().into(), ids],
            ))
            .await?;
        for row in rows {
            found.push(row.try_get_by_index::<String>(0)?);
        }
    }
    Ok(found)
}

/// What one upkeep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upkeep {
    /// Partitions created ahead.
    pub created: i32,
    /// Partitions dropped whole, by name.
    pub dropped: Vec<String>,
    /// (tenant, profile, events) that profiles lost, from dropped partitions and from the
    /// DEFAULT partition's rows before the cutoff.
    pub lost: Vec<(Uuid, Uuid, i64)>,
}

/// Creates the partitions of `now`'s interval and the [`AHEAD`] next ones, and, with a cutoff,
/// retires what is older than it. `None` when there is nothing to do here: SQLite, an
/// unpartitioned table, or another replica doing it right now.
pub async fn upkeep(
    store: &Store,
    now: DateTime<Utc>,
    cutoff: Option<DateTime<Utc>>,
) -> StoreResult<Option<Upkeep>> {
    if store.backend() != Backend::Postgres || !store.events_partitioned() {
        return Ok(None);
    }
    let system = store.begin_system("events partitions upkeep").await?;
    let conn = system.conn();
    let locked = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_try_advisory_xact_lock($1)",
            [UPKEEP_LOCK.into()],
        ))
        .await?
        .ok_or_else(|| StoreError::corrupt("no answer to the advisory lock"))?
        .try_get_by_index::<bool>(0)?;
    if !locked {
        return Ok(None);
    }
    let created: i32 = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT cdp_events_create_partitions($1, $2)",
            [now.into(), AHEAD.into()],
        ))
        .await?
        .ok_or_else(|| StoreError::corrupt("no answer from cdp_events_create_partitions"))?
        .try_get_by_index(0)?;
    let mut upkeep = Upkeep {
        created,
        ..Upkeep::default()
    };
    if let Some(cutoff) = cutoff {
        let rows = conn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT partition_name, tenant, profile, removed FROM cdp_events_retire($1)",
                [cutoff.into()],
            ))
            .await?;
        for row in rows {
            let partition: String = row.try_get_by_index(0)?;
            let tenant: Option<Uuid> = row.try_get_by_index(1)?;
            let profile: Option<Uuid> = row.try_get_by_index(2)?;
            let removed: i64 = row.try_get_by_index(3)?;
            match (tenant, profile) {
                (Some(tenant), Some(profile)) => upkeep.lost.push((tenant, profile, removed)),
                // The row that says a partition is gone.
                _ => upkeep.dropped.push(partition),
            }
        }
    }
    system.commit().await?;
    Ok(Some(upkeep))
}
