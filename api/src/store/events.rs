//! Events (reads): the timeline of a profile, the event list, and duplicate detection.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait,
};
use uuid::Uuid;

use super::entity::events;
use super::{StoreResult, TenantTx};

pub use events::Model as EventRow;

/// Which of these message ids are already stored. When the events table is partitioned the
/// register of message ids answers (one primary-key lookup each, whatever the number of
/// partitions); otherwise the unique index of `events`.
pub async fn existing_message_ids(
    tx: &TenantTx,
    partitioned: bool,
    message_ids: &[String],
) -> StoreResult<Vec<String>> {
    if partitioned {
        return super::partitions::existing_message_ids(tx, message_ids).await;
    }
    if tx.backend() == super::Backend::Postgres {
        // One probe of the unique index per message id (see `store::keyed`).
        let key = super::keyed::KeyColumn::Text("message_id", message_ids.to_vec());
        return super::keyed::tuples::<String>(
            tx,
            "events",
            "message_id",
            vec![key],
            super::keyed::Probe::One,
        )
        .await;
    }
    let mut found = Vec::new();
    for chunk in message_ids.chunks(500) {
        let rows: Vec<String> = events::Entity::find()
            .select_only()
            .column(events::Column::MessageId)
            .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()))
            .filter(events::Column::MessageId.is_in(chunk.iter().cloned()))
            .into_tuple::<String>()
            .all(tx.conn())
            .await?;
        found.extend(rows);
    }
    Ok(found)
}

pub async fn by_message_id(tx: &TenantTx, message_id: &str) -> StoreResult<Option<EventRow>> {
    Ok(events::Entity::find()
        .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(events::Column::MessageId.eq(message_id))
        .one(tx.conn())
        .await?)
}

/// Filters of the event list.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub profile_id: Option<Uuid>,
    pub name: Option<String>,
}

/// The position of an event in the newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPosition {
    pub timestamp: DateTime<Utc>,
    pub id: Uuid,
}

fn filtered(tx: &TenantTx, filter: &EventFilter) -> sea_orm::Select<events::Entity> {
    let mut query =
        events::Entity::find().filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()));
    if let Some(profile_id) = filter.profile_id {
        query = query.filter(events::Column::ProfileId.eq(profile_id));
    }
    if let Some(name) = &filter.name {
        query = query.filter(events::Column::Name.eq(name.as_str()));
    }
    query
}

/// Which columns of an event a read decodes: all of them, or all but the (sealed) context, which
/// is then answered as JSON `null` without being read or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    All,
    WithoutContext,
}

impl Columns {
    fn apply(
        self,
        query: sea_orm::Select<events::Entity>,
        backend: super::Backend,
    ) -> sea_orm::Select<events::Entity> {
        match self {
            Columns::All => query,
            Columns::WithoutContext => {
                super::without_json_column(query, events::Column::Context, "null", backend)
            }
        }
    }
}

/// One page of events, newest first (by timestamp, then id), after the cursor position, with
/// the number of events the filter matches when `with_total`.
pub async fn page(
    tx: &TenantTx,
    filter: &EventFilter,
    after: Option<EventPosition>,
    limit: u64,
    with_total: bool,
    columns: Columns,
) -> StoreResult<(Vec<EventRow>, Option<u64>)> {
    let total = if with_total {
        Some(filtered(tx, filter).count(tx.conn()).await?)
    } else {
        None
    };
    let mut query = columns
        .apply(filtered(tx, filter), tx.backend())
        .order_by_desc(events::Column::Timestamp)
        .order_by_desc(events::Column::Id)
        .limit(limit);
    if let Some(after) = after {
        query = query.filter(
            Condition::any()
                .add(events::Column::Timestamp.lt(after.timestamp))
                .add(
                    Condition::all()
                        .add(events::Column::Timestamp.eq(after.timestamp))
                        .add(events::Column::Id.lt(after.id)),
                ),
        );
    }
    Ok((query.all(tx.conn()).await?, total))
}

/// The newest `limit` events of each of `profile_ids` (newest first per profile), in one
/// statement: one branch per profile, each an index range scan with its own limit, joined with
/// `UNION ALL` (a window over every event of the profiles would read whole timelines, and SQLite
/// has no `LATERAL`).
pub async fn latest_of(
    tx: &TenantTx,
    profile_ids: &[Uuid],
    limit: u64,
    columns: Columns,
) -> StoreResult<Vec<EventRow>> {
    use sea_orm::sea_query::{Alias, Asterisk, Query, SelectStatement, UnionType};
    let tenant = tx.tenant_id().as_uuid();
    let branch = |profile_id: Uuid, n: usize| -> SelectStatement {
        let newest = columns
            .apply(events::Entity::find(), tx.backend())
            .filter(events::Column::TenantId.eq(tenant))
            .filter(events::Column::ProfileId.eq(profile_id))
            .order_by_desc(events::Column::Timestamp)
            .order_by_desc(events::Column::Id)
            .limit(limit)
            .into_query();
        // SQLite allows ORDER BY and LIMIT only in a subquery of a compound select's branch.
        Query::select()
            .column(Asterisk)
            .from_subquery(newest, Alias::new(format!("p{n}")))
            .to_owned()
    };
    let mut rows = Vec::new();
    for chunk in profile_ids.chunks(100) {
        let mut branches = chunk.iter().enumerate().map(|(n, id)| branch(*id, n));
        let Some(mut query) = branches.next() else {
            continue;
        };
        for other in branches {
            query.union(UnionType::All, other);
        }
        let statement = tx.conn().get_database_backend().build(&query);
        rows.extend(
            events::Entity::find()
                .from_raw_sql(statement)
                .all(tx.conn())
                .await?,
        );
    }
    Ok(rows)
}

/// How many events each of `profile_ids` has.
pub async fn counts_of(tx: &TenantTx, profile_ids: &[Uuid]) -> StoreResult<Vec<(Uuid, i64)>> {
    let mut counts = Vec::new();
    for chunk in profile_ids.chunks(500) {
        let rows: Vec<(Uuid, i64)> = events::Entity::find()
            .select_only()
            .column(events::Column::ProfileId)
            .column_as(events::Column::Id.count(), "count")
            .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()))
            .filter(events::Column::ProfileId.is_in(chunk.iter().copied()))
            .group_by(events::Column::ProfileId)
            .into_tuple()
            .all(tx.conn())
            .await?;
        counts.extend(rows);
    }
    Ok(counts)
}

/// Events of a profile that arrived under one identifier (for splitting it off).
pub async fn of_identity(
    tx: &TenantTx,
    profile_id: Uuid,
    kind: &str,
    value: &str,
) -> StoreResult<Vec<EventRow>> {
    let column = match kind {
        domain::identity::USER_ID => events::Column::UserId,
        domain::identity::ANONYMOUS_ID => events::Column::AnonymousId,
        _ => return Ok(Vec::new()),
    };
    Ok(events::Entity::find()
        .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(events::Column::ProfileId.eq(profile_id))
        .filter(column.eq(value))
        .order_by_asc(events::Column::Timestamp)
        .all(tx.conn())
        .await?)
}

/// Every event of a profile, oldest first (to recompute its derived state).
pub async fn all_of(tx: &TenantTx, profile_id: Uuid) -> StoreResult<Vec<EventRow>> {
    Ok(events::Entity::find()
        .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(events::Column::ProfileId.eq(profile_id))
        .order_by_asc(events::Column::Timestamp)
        .order_by_asc(events::Column::Id)
        .all(tx.conn())
        .await?)
}

/// Replaces the properties and context of events (sealed again for another profile).
pub async fn reseal(tx: &TenantTx, rows: &[EventRow]) -> StoreResult<()> {
    for row in rows {
        let (id, properties, context) = (row.id, &row.properties, &row.context);
        events::Entity::update_many()
            .col_expr(
                events::Column::Properties,
                sea_orm::sea_query::Expr::value(properties.clone()),
            )
            .col_expr(
                events::Column::Context,
                sea_orm::sea_query::Expr::value(context.clone()),
            )
            .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()))
            .filter(events::Column::Id.eq(id))
            .exec(tx.conn())
            .await?;
    }
    Ok(())
}

/// Deletes up to `limit` events older than `before` (retention), oldest first, and lowers the
/// event counts of their profiles to match. Returns (profile id, events deleted) per profile.
pub async fn purge_before(
    tx: &TenantTx,
    before: DateTime<Utc>,
    limit: u64,
) -> StoreResult<Vec<(Uuid, i64)>> {
    use sea_orm::sea_query::{Expr, ExprTrait};
    let tenant = tx.tenant_id().as_uuid();
    let doomed: Vec<(Uuid, Uuid)> = events::Entity::find()
        .select_only()
        .column(events::Column::Id)
        .column(events::Column::ProfileId)
        .filter(events::Column::TenantId.eq(tenant))
        .filter(events::Column::Timestamp.lt(before))
        .order_by_asc(events::Column::Timestamp)
        .limit(limit)
        .into_tuple()
        .all(tx.conn())
        .await?;
    if doomed.is_empty() {
        return Ok(Vec::new());
    }
    let mut per_profile: std::collections::BTreeMap<Uuid, i64> = Default::default();
    for (_, profile_id) in &doomed {
        *per_profile.entry(*profile_id).or_default() += 1;
    }
    for chunk in doomed.chunks(500) {
        events::Entity::delete_many()
            .filter(events::Column::TenantId.eq(tenant))
            .filter(events::Column::Id.is_in(chunk.iter().map(|(id, _)| *id)))
            .exec(tx.conn())
            .await?;
    }
    for (profile_id, count) in &per_profile {
        super::entity::profiles::Entity::update_many()
            .col_expr(
                super::entity::profiles::Column::EventCount,
                Expr::col(super::entity::profiles::Column::EventCount).sub(*count),
            )
            .filter(super::entity::profiles::Column::TenantId.eq(tenant))
            .filter(super::entity::profiles::Column::Id.eq(*profile_id))
            .exec(tx.conn())
            .await?;
    }
    Ok(per_profile.into_iter().collect())
}
