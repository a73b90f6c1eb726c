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

fn filtered(tenant: Uuid, filter: &EventFilter) -> sea_orm::Select<events::Entity> {
    let mut query = events::Entity::find().filter(events::Column::TenantId.eq(tenant));
    if let Some(profile_id) = filter.profile_id {
        query = query.filter(events::Column::ProfileId.eq(profile_id));
    }
    if let Some(name) = &filter.name {
        query = query.filter(events::Column::Name.eq(name.as_str()));
    }
    query
}

/// Which columns of an event a read decodes: all of them; all but the (sealed) context, which is
/// then answered as JSON `null` without being read or decoded; or only what a timeline shows
/// (id, profile, type, name, properties, timestamp), the others left empty (see [`Timeline`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    All,
    WithoutContext,
    Timeline,
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
            Columns::Timeline => query.select_only().columns(TIMELINE),
        }
    }

    /// Runs a page's statement and decodes its rows as these columns.
    async fn rows<S: sea_orm::StatementBuilder>(
        self,
        tx: &TenantTx,
        statement: &S,
    ) -> StoreResult<Vec<EventRow>> {
        let statement = tx.conn().get_database_backend().build(statement);
        Ok(match self {
            Columns::All | Columns::WithoutContext => {
                events::Entity::find()
                    .from_raw_sql(statement)
                    .all(tx.conn())
                    .await?
            }
            Columns::Timeline => events::Entity::find()
                .from_raw_sql(statement)
                .into_model::<Timeline>()
                .all(tx.conn())
                .await?
                .into_iter()
                .map(Timeline::into_row)
                .collect(),
        })
    }
}

/// The columns of [`Columns::Timeline`].
const TIMELINE: [events::Column; 7] = [
    events::Column::TenantId,
    events::Column::Id,
    events::Column::ProfileId,
    events::Column::Kind,
    events::Column::Name,
    events::Column::Properties,
    events::Column::Timestamp,
];

/// An event as a timeline shows it: half the columns of a whole row to copy out of the database
/// and decode, for the pages whose reader selects nothing else (the compiled plans,
/// `graphql/compiled`).
#[derive(Debug, sea_orm::FromQueryResult)]
struct Timeline {
    tenant_id: Uuid,
    id: Uuid,
    profile_id: Uuid,
    #[sea_orm(from_alias = "type")]
    kind: String,
    name: Option<String>,
    properties: serde_json::Value,
    timestamp: DateTime<Utc>,
}

impl Timeline {
    /// The row with the columns not read left empty: no message id, channel, source or
    /// identifiers, a context of `null`, and the timestamp as the time received.
    fn into_row(self) -> EventRow {
        EventRow {
            tenant_id: self.tenant_id,
            id: self.id,
            profile_id: self.profile_id,
            message_id: String::new(),
            kind: self.kind,
            name: self.name,
            properties: self.properties,
            context: serde_json::Value::Null,
            timestamp: self.timestamp,
            received_at: self.timestamp,
            source_id: None,
            channel: String::new(),
            user_id: None,
            anonymous_id: None,
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
    let tenant = tx.tenant_id().as_uuid();
    let total = if with_total {
        Some(filtered(tenant, filter).count(tx.conn()).await?)
    } else {
        None
    };
    let query = page_select(tenant, tx.backend(), filter, after, limit, columns);
    Ok((columns.rows(tx, &query.into_query()).await?, total))
}

/// The statement of [`page`]: newest first by `(timestamp, id)`, the order of the timeline index
/// `ix_events_timeline`, so that a profile's page is read off the index without a sort.
fn page_select(
    tenant: Uuid,
    backend: super::Backend,
    filter: &EventFilter,
    after: Option<EventPosition>,
    limit: u64,
    columns: Columns,
) -> sea_orm::Select<events::Entity> {
    let mut query = columns
        .apply(filtered(tenant, filter), backend)
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
    query
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
    let mut rows = Vec::new();
    for chunk in profile_ids.chunks(100) {
        let Some(query) = latest_select(
            tx.tenant_id().as_uuid(),
            tx.backend(),
            chunk,
            limit,
            columns,
        ) else {
            continue;
        };
        rows.extend(columns.rows(tx, &query).await?);
    }
    Ok(rows)
}

/// The statement of [`latest_of`] for some profiles (none for none).
fn latest_select(
    tenant: Uuid,
    backend: super::Backend,
    profile_ids: &[Uuid],
    limit: u64,
    columns: Columns,
) -> Option<sea_orm::sea_query::SelectStatement> {
    use sea_orm::sea_query::{Alias, Asterisk, Query, SelectStatement, UnionType};
    let newest = |profile_id: Uuid| -> SelectStatement {
        page_select(
            tenant,
            backend,
            &EventFilter {
                profile_id: Some(profile_id),
                name: None,
            },
            None,
            limit,
            columns,
        )
        .into_query()
    };
    // One profile (`profile(id)`): its page as it is, no compound select to wrap it in.
    if let [profile_id] = profile_ids {
        return Some(newest(*profile_id));
    }
    let branch = |profile_id: Uuid, n: usize| -> SelectStatement {
        // SQLite allows ORDER BY and LIMIT only in a subquery of a compound select's branch.
        Query::select()
            .column(Asterisk)
            .from_subquery(newest(profile_id), Alias::new(format!("p{n}")))
            .to_owned()
    };
    let mut branches = profile_ids.iter().enumerate().map(|(n, id)| branch(*id, n));
    let mut query = branches.next()?;
    for other in branches {
        query.union(UnionType::All, other);
    }
    Some(query)
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

#[cfg(test)]
mod tests {
    //! The timeline's statements in SQLite's plans: read off `ix_events_timeline` in its order,
    //! without a sort. (PostgreSQL's choice depends on statistics; SQLite's on the indexes.)

    use super::*;
    use crate::store::{Backend, Store, StoreOptions};
    use domain::TenantId;
    use sea_orm::{DbBackend, Statement};

    async fn plan(store: &Store, statement: Statement) -> Vec<String> {
        let tx = store
            .read(TenantId(Uuid::new_v4()))
            .await
            .expect("a read transaction");
        let explain = Statement::from_sql_and_values(
            DbBackend::Sqlite,
            format!("EXPLAIN QUERY PLAN {}", statement.sql),
            statement.values.map(|values| values.0).unwrap_or_default(),
        );
        tx.conn()
            .query_all_raw(explain)
            .await
            .expect("a plan")
            .iter()
            .map(|row| row.try_get::<String>("", "detail").expect("a detail"))
            .collect()
    }

    fn assert_read_off_the_timeline_index(plan: &[String], what: &str) {
        assert!(
            plan.iter().any(|step| step.contains("ix_events_timeline")),
            "{what}: not read through the timeline index: {plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "{what}: sorted outside the index: {plan:?}"
        );
    }

    #[tokio::test]
    async fn timeline_pages_are_read_off_the_index_without_a_sort() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::connect(&StoreOptions {
            url: format!("sqlite://{}?mode=rwc", dir.path().join("plan.db").display()),
            max_connections: 1,
            min_connections: 1,
        })
        .await
        .expect("a store");
        store.migrate().await.expect("migrations");
        let tenant = Uuid::new_v4();
        let profile = EventFilter {
            profile_id: Some(Uuid::new_v4()),
            name: None,
        };
        let after = EventPosition {
            timestamp: Utc::now(),
            id: Uuid::new_v4(),
        };
        for (what, cursor) in [("first page", None), ("page after a cursor", Some(after))] {
            for columns in [Columns::All, Columns::WithoutContext, Columns::Timeline] {
                let select = page_select(tenant, Backend::Sqlite, &profile, cursor, 20, columns);
                let steps = plan(&store, select.build(DbBackend::Sqlite)).await;
                assert_read_off_the_timeline_index(&steps, what);
            }
        }
        let profiles = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        let latest = latest_select(tenant, Backend::Sqlite, &profiles, 20, Columns::All)
            .expect("a statement for three profiles");
        let steps = plan(&store, DbBackend::Sqlite.build(&latest)).await;
        assert_read_off_the_timeline_index(&steps, "the newest events of a list of profiles");
        let one = latest_select(
            tenant,
            Backend::Sqlite,
            &profiles[..1],
            20,
            Columns::Timeline,
        )
        .expect("a statement for one profile");
        let steps = plan(&store, DbBackend::Sqlite.build(&one)).await;
        assert_read_off_the_timeline_index(&steps, "the newest events of one profile");
        assert!(latest_select(tenant, Backend::Sqlite, &[], 20, Columns::All).is_none());
    }
}
