//! Fan-out of committed changes between processes on PostgreSQL: `pg_notify` inside the write
//! transaction (delivered only if it commits), a `LISTEN`ing connection per process, and the reads
//! by id that turn a notification's ids back into details.
//!
//! Guarantees: a notification is sent only from inside a tenant transaction, so it is delivered
//! exactly when that transaction commits and never for a rolled-back change; the reads filter by
//! the transaction's tenant like every store function.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, Statement,
};
use uuid::Uuid;

use super::entity::{events, lifecycle_transitions, segment_history};
use super::{Backend, Store, StoreError, StoreResult, TenantTx};

pub use lifecycle_transitions::Model as TransitionRow;
pub use segment_history::Model as HistoryRow;

/// The notification channel every process listens on.
pub const CHANNEL: &str = "cdp_notices";

/// Sends each payload on [`CHANNEL`] from inside `tx`; PostgreSQL delivers them, in order, when
/// the transaction commits. Does nothing on SQLite (one process serves a SQLite file).
pub async fn notify(tx: &TenantTx, backend: Backend, payloads: &[String]) -> StoreResult<()> {
    if backend != Backend::Postgres {
        return Ok(());
    }
    // As few statements as fit the wire's bound, each sending its payloads in their order.
    for chunk in super::wire::chunks(tx, payloads, 100, String::len) {
        tx.conn()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_notify($1, t.payload) \
                 FROM unnest($2::text[]) WITH ORDINALITY AS t(payload, n) ORDER BY t.n",
                [
                    CHANNEL.into(),
                    super::array_of(sea_orm::sea_query::ArrayType::String, chunk.iter().cloned()),
                ],
            ))
            .await?;
    }
    Ok(())
}

/// A connection that listens on [`CHANNEL`]. It holds one connection of the pool.
pub struct Listener {
    listener: PgListener,
}

impl Listener {
    /// Connects and starts listening. Only PostgreSQL has notifications.
    pub async fn connect(store: &Store) -> StoreResult<Listener> {
        let pool = store.notification_pool().ok_or_else(|| {
            StoreError::Db(DbErr::Custom("notifications need PostgreSQL".to_owned()))
        })?;
        let mut listener = PgListener::connect_with(pool).await.map_err(sqlx_error)?;
        listener.listen(CHANNEL).await.map_err(sqlx_error)?;
        Ok(Listener { listener })
    }

    /// The next payload. `Ok(None)` means the connection was lost and has been re-established:
    /// notifications sent in between are lost.
    pub async fn recv(&mut self) -> StoreResult<Option<String>> {
        Ok(self
            .listener
            .try_recv()
            .await
            .map_err(sqlx_error)?
            .map(|notification| notification.payload().to_owned()))
    }
}

fn sqlx_error(error: sea_orm::sqlx::Error) -> StoreError {
    StoreError::Db(DbErr::Custom(format!("listener: {error}")))
}

/// Events by id (those that still exist), in no particular order.
pub async fn events_by_ids(
    tx: &TenantTx,
    ids: &[Uuid],
) -> StoreResult<Vec<super::events::EventRow>> {
    let mut rows = Vec::new();
    for chunk in ids.chunks(500) {
        rows.extend(
            events::Entity::find()
                .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()))
                .filter(events::Column::Id.is_in(chunk.iter().copied()))
                .all(tx.conn())
                .await?,
        );
    }
    Ok(rows)
}

/// Membership history rows of these profiles written between `from` and `to` (inclusive).
pub async fn history_between(
    tx: &TenantTx,
    profile_ids: &BTreeSet<Uuid>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> StoreResult<Vec<HistoryRow>> {
    let mut rows = Vec::new();
    let ids: Vec<Uuid> = profile_ids.iter().copied().collect();
    for chunk in ids.chunks(500) {
        rows.extend(
            segment_history::Entity::find()
                .filter(segment_history::Column::TenantId.eq(tx.tenant_id().as_uuid()))
                .filter(segment_history::Column::ProfileId.is_in(chunk.iter().copied()))
                .filter(segment_history::Column::At.between(from, to))
                .all(tx.conn())
                .await?,
        );
    }
    Ok(rows)
}

/// Stage transitions of these profiles written between `from` and `to` (inclusive).
pub async fn transitions_between(
    tx: &TenantTx,
    profile_ids: &BTreeSet<Uuid>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> StoreResult<Vec<TransitionRow>> {
    let mut rows = Vec::new();
    let ids: Vec<Uuid> = profile_ids.iter().copied().collect();
    for chunk in ids.chunks(500) {
        rows.extend(
            lifecycle_transitions::Entity::find()
                .filter(lifecycle_transitions::Column::TenantId.eq(tx.tenant_id().as_uuid()))
                .filter(lifecycle_transitions::Column::ProfileId.is_in(chunk.iter().copied()))
                .filter(lifecycle_transitions::Column::At.between(from, to))
                .all(tx.conn())
                .await?,
        );
    }
    Ok(rows)
}
