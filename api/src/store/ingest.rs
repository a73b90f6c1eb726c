//! The bulk writer of the ingestion path: applies one batch's changes with a few multi-row
//! statements. It decides nothing; the service computed every row.
//!
//! Order matters and is fixed here: profiles (so that foreign keys hold), merges (re-pointing
//! rows of merged profiles), identities, events, consents, groups, the ledger, the counts
//! (appended as deltas, see [`compact_stats`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, ArrayType, Expr, ExprTrait, IntoIden, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter,
    QuerySelect, Statement, Value,
};
use uuid::Uuid;

use super::entity::{
    consent_history, consents, events, groups, identities, ingest_stats, merge_ledger,
    profile_groups, profiles,
};
use super::wire::{self, JsonText};
use super::{Backend, StoreError, StoreResult, TenantTx};

pub use consents::Model as ConsentRow;
pub use events::Model as EventRow;
pub use groups::Model as GroupRow;
pub use identities::Model as IdentityRow;
pub use merge_ledger::Model as LedgerRow;
pub use profiles::Model as ProfileRow;

/// The races of the write path ([`StoreError::Raced`]), each of which the caller answers by
/// beginning the batch again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Race {
    /// A message id that is stored already (sent before, or by a concurrent batch): the retry
    /// looks stored messages up.
    #[error("message stored concurrently")]
    MessageStored,
    /// An identifier linked by a concurrent batch first.
    #[error("identity linked concurrently")]
    IdentityLinked,
    /// A profile that owned one of the batch's identifiers when the batch looked them up, merged
    /// into another by a concurrent batch before this one locked it: the identifiers moved with
    /// it.
    #[error("profile merged concurrently")]
    ProfileMerged,
}

/// Rows per multi-row statement: well under SQLite's limit of bound variables.
const CHUNK: usize = 200;

/// Everything one batch changes.
#[derive(Debug, Default)]
pub struct WriteSet {
    /// New and changed profiles, tombstones included (upserted whole).
    pub profiles: Vec<ProfileRow>,
    /// (merged, survivor): re-point the merged profile's stored rows.
    pub merges: Vec<(Uuid, Uuid)>,
    pub identities: Vec<IdentityRow>,
    pub events: Vec<EventRow>,
    /// Consents to upsert.
    pub consents: Vec<ConsentRow>,
    pub groups: Vec<GroupRow>,
    pub profile_groups: Vec<(Uuid, String, DateTime<Utc>)>,
    pub ledger: Vec<LedgerRow>,
    /// (source id, outcome, count) to add.
    pub stats: Vec<(Uuid, String, i64)>,
    /// Consent changes to append to the history.
    pub consent_changes: Vec<super::keys::ConsentChangeRow>,
    /// (profile id, orders, revenue) to add to each profile's order totals.
    pub orders: Vec<(Uuid, i64, f64)>,
    /// The lifecycle stage of each profile the batch creates, written with its first row. A
    /// stored profile's stage is never written here (`store::lifecycle` changes it).
    pub stages: HashMap<Uuid, String>,
}

/// The profile columns the write path upserts, in the order of their values, besides the order
/// totals.
const PROFILE_COLUMNS: [profiles::Column; 11] = [
    profiles::Column::TenantId,
    profiles::Column::Id,
    profiles::Column::Traits,
    profiles::Column::TraitClock,
    profiles::Column::Channels,
    profiles::Column::FirstSeenAt,
    profiles::Column::LastSeenAt,
    profiles::Column::EventCount,
    profiles::Column::MergedInto,
    profiles::Column::CreatedAt,
    profiles::Column::UpdatedAt,
];

/// The profile columns of the order totals, kept by the write path (`profile_state`).
const ORDER_COUNT: &str = "order_count";
const TOTAL_REVENUE: &str = "total_revenue";
/// The profile columns of the stage, which the write path writes only into a profile it creates.
const STAGE: &str = "stage";
const STAGE_SINCE: &str = "stage_since";

pub async fn apply(tx: &TenantTx, set: WriteSet, now: DateTime<Utc>) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    // Traits, trait clocks and channels bound as their text, written once (`wire::JsonText`).
    let profiles: Vec<(ProfileRow, [JsonText; 3])> = set
        .profiles
        .into_iter()
        .map(|mut row| {
            let json = [&mut row.traits, &mut row.trait_clock, &mut row.channels]
                .map(|value| JsonText::of(&std::mem::take(value)));
            (row, json)
        })
        .collect();
    let profile_bytes = |(_, json): &(ProfileRow, [JsonText; 3])| {
        json.iter().map(JsonText::bytes).sum::<usize>()
            // The fixed-size values, and the stage key of a new profile.
            + 15 * wire::FIXED
    };
    // Order totals ride on the profile's own upsert (one row version a batch, not two): each
    // upserted profile adds its batch's orders to the stored totals.
    let mut orders: HashMap<Uuid, (i64, f64)> = set
        .orders
        .iter()
        .map(|(id, count, revenue)| (*id, (*count, *revenue)))
        .collect();
    let mut stages = set.stages;
    for chunk in wire::owned_chunks(tx, profiles, CHUNK, profile_bytes) {
        let rows: Vec<ProfileWrite> = chunk
            .into_iter()
            .map(|(row, json)| ProfileWrite {
                orders: orders.remove(&row.id).unwrap_or((0, 0.0)),
                stage: stages.remove(&row.id),
                row,
                json,
            })
            .collect();
        let statement = match tx.backend() {
            Backend::Postgres => profiles_over_arrays(tenant, now, rows),
            Backend::Sqlite => profiles_over_values(tenant, now, rows),
        };
        tx.conn().execute_raw(statement).await?;
    }
    // Orders of a profile the batch did not upsert (none today: every profile with an event is
    // upserted), added on their own.
    let rest: Vec<(Uuid, i64, f64)> = orders
        .into_iter()
        .map(|(id, (count, revenue))| (id, count, revenue))
        .collect();
    super::lifecycle::add_order_totals(tx, &rest).await?;

    for (merged, survivor) in &set.merges {
        move_profile_rows(tx, *merged, *survivor).await?;
    }

    let identity_bytes = |row: &IdentityRow| {
        row.kind.len()
            + row.lookup.len()
            + row.value.len()
            + row.message_id.as_ref().map_or(0, String::len)
            + 3 * wire::FIXED
    };
    for chunk in wire::owned_chunks(tx, set.identities, CHUNK, identity_bytes) {
        let rows = chunk.into_iter().map(|row| identities::ActiveModel {
            tenant_id: Set(tenant),
            kind: Set(row.kind),
            lookup: Set(row.lookup),
            value: Set(row.value),
            profile_id: Set(row.profile_id),
            message_id: Set(row.message_id),
            created_at: Set(row.created_at),
        });
        // A unique violation here means another transaction linked the same identifier first:
        // the caller retries the batch, which then sees it.
        identities::Entity::insert_many(rows)
            .exec_without_returning(tx.conn())
            .await
            .map_err(|error| StoreError::unique_as_race(error, Race::IdentityLinked))?;
    }

    insert_events(tx, set.events).await?;

    let consent_bytes = |row: &ConsentRow| row.purpose.len() + row.source.len() + 4 * wire::FIXED;
    for chunk in wire::chunks(tx, &set.consents, CHUNK, consent_bytes) {
        let rows = chunk.iter().map(|row| consents::ActiveModel {
            tenant_id: Set(tenant),
            profile_id: Set(row.profile_id),
            purpose: Set(row.purpose.clone()),
            granted: Set(row.granted),
            updated_at: Set(row.updated_at),
            source: Set(row.source.clone()),
        });
        consents::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([
                    consents::Column::TenantId,
                    consents::Column::ProfileId,
                    consents::Column::Purpose,
                ])
                .update_columns([
                    consents::Column::Granted,
                    consents::Column::UpdatedAt,
                    consents::Column::Source,
                ])
                .to_owned(),
            )
            .exec_without_returning(tx.conn())
            .await?;
    }

    super::keys::append_consent_changes(tx, &set.consent_changes).await?;

    let group_bytes = |row: &GroupRow| {
        row.group_id.len()
            + domain::json::text_len(&row.traits)
            + domain::json::text_len(&row.trait_clock)
            + 2 * wire::FIXED
    };
    for chunk in wire::chunks(tx, &set.groups, CHUNK, group_bytes) {
        let rows = chunk.iter().map(|row| groups::ActiveModel {
            tenant_id: Set(tenant),
            group_id: Set(row.group_id.clone()),
            traits: Set(row.traits.clone()),
            trait_clock: Set(row.trait_clock.clone()),
            updated_at: Set(row.updated_at),
        });
        groups::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([groups::Column::TenantId, groups::Column::GroupId])
                    .update_columns([
                        groups::Column::Traits,
                        groups::Column::TraitClock,
                        groups::Column::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(tx.conn())
            .await?;
    }
    let membership_bytes =
        |(_, group_id, _): &(Uuid, String, DateTime<Utc>)| group_id.len() + 3 * wire::FIXED;
    for chunk in wire::chunks(tx, &set.profile_groups, CHUNK, membership_bytes) {
        let rows =
            chunk.iter().map(
                |(profile_id, group_id, joined_at)| profile_groups::ActiveModel {
                    tenant_id: Set(tenant),
                    profile_id: Set(*profile_id),
                    group_id: Set(group_id.clone()),
                    joined_at: Set(*joined_at),
                },
            );
        profile_groups::Entity::insert_many(rows)
            .on_conflict_do_nothing_on([
                profile_groups::Column::TenantId,
                profile_groups::Column::ProfileId,
                profile_groups::Column::GroupId,
            ])
            .exec_without_returning(tx.conn())
            .await?;
    }

    let ledger_bytes = |row: &LedgerRow| {
        row.action.len()
            + row.message_id.as_ref().map_or(0, String::len)
            + row.identity_kind.as_ref().map_or(0, String::len)
            + row.identity_value.as_ref().map_or(0, String::len)
            + row.rule.len()
            + row.detail.as_ref().map_or(0, domain::json::text_len)
            + 5 * wire::FIXED
    };
    for chunk in wire::chunks(tx, &set.ledger, CHUNK, ledger_bytes) {
        let rows = chunk.iter().map(|row| merge_ledger::ActiveModel {
            tenant_id: Set(tenant),
            id: Set(row.id),
            at: Set(row.at),
            action: Set(row.action.clone()),
            profile_id: Set(row.profile_id),
            other_profile_id: Set(row.other_profile_id),
            message_id: Set(row.message_id.clone()),
            identity_kind: Set(row.identity_kind.clone()),
            identity_value: Set(row.identity_value.clone()),
            rule: Set(row.rule.clone()),
            detail: Set(row.detail.clone()),
        });
        merge_ledger::Entity::insert_many(rows)
            .exec_without_returning(tx.conn())
            .await?;
    }

    if !set.stats.is_empty() {
        // Appended, never updated: concurrent batches of one source do not wait on each other
        // here, as they would on the one `ingest_stats` row per source and outcome.
        let mut insert = Query::insert();
        insert
            .into_table(DELTAS)
            .columns(["tenant_id", "id", "source_id", "outcome", "count", "at"].map(Alias::new));
        for (source_id, outcome, count) in &set.stats {
            insert.values_panic([
                tenant.into(),
                Uuid::now_v7().into(),
                (*source_id).into(),
                outcome.clone().into(),
                (*count).into(),
                now.into(),
            ]);
        }
        tx.conn().execute(&insert).await?;
    }
    Ok(())
}

/// The batch's events as multi-row inserts, as few as fit the wire's bound.
async fn insert_events(tx: &TenantTx, rows: Vec<EventRow>) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    // Properties and contexts bound as their text, written once (`wire::JsonText`).
    let rows: Vec<(EventRow, JsonText, JsonText)> = rows
        .into_iter()
        .map(|mut row| {
            let properties = JsonText::of(&std::mem::take(&mut row.properties));
            let context = JsonText::of(&std::mem::take(&mut row.context));
            (row, properties, context)
        })
        .collect();
    let event_bytes = |(row, properties, context): &(EventRow, JsonText, JsonText)| {
        properties.bytes()
            + context.bytes()
            + row.message_id.len()
            + row.kind.len()
            + row.name.as_ref().map_or(0, String::len)
            + row.channel.len()
            + row.user_id.as_ref().map_or(0, String::len)
            + row.anonymous_id.as_ref().map_or(0, String::len)
            + 6 * wire::FIXED
    };
    for chunk in wire::owned_chunks(tx, rows, CHUNK, event_bytes) {
        let statement = match tx.backend() {
            Backend::Postgres => events_over_arrays(tenant, chunk),
            Backend::Sqlite => events_over_values(tenant, chunk),
        };
        tx.conn()
            .execute_raw(statement)
            .await
            .map_err(|error| StoreError::unique_as_race(error, Race::MessageStored))?;
    }
    Ok(())
}

/// One profile of an upsert: its row, its JSON columns as text (traits, trait clock, channels),
/// the orders its batch adds, and its stage if the batch creates it.
struct ProfileWrite {
    row: ProfileRow,
    json: [JsonText; 3],
    orders: (i64, f64),
    stage: Option<String>,
}

/// The profile upsert as a multi-row `VALUES` (SQLite), with the same effect as
/// [`PROFILES_OVER_ARRAYS`].
fn profiles_over_values(tenant: Uuid, now: DateTime<Utc>, rows: Vec<ProfileWrite>) -> Statement {
    let mut insert = Query::insert();
    insert.into_table(profiles::Entity).columns(
        PROFILE_COLUMNS.map(IntoIden::into_iden).into_iter().chain(
            [ORDER_COUNT, TOTAL_REVENUE, STAGE, STAGE_SINCE]
                .map(|column| Alias::new(column).into_iden()),
        ),
    );
    for ProfileWrite {
        row,
        json: [traits, trait_clock, channels],
        orders: (count, revenue),
        stage,
    } in rows
    {
        let since = stage.as_ref().map(|_| now);
        insert.values_panic([
            tenant.into(),
            row.id.into(),
            traits.into_expr(DbBackend::Sqlite),
            trait_clock.into_expr(DbBackend::Sqlite),
            channels.into_expr(DbBackend::Sqlite),
            row.first_seen_at.into(),
            row.last_seen_at.into(),
            row.event_count.into(),
            row.merged_into.into(),
            row.created_at.into(),
            now.into(),
            count.into(),
            revenue.into(),
            stage.into(),
            since.into(),
        ]);
    }
    let added = |column: &str| {
        Expr::col((profiles::Entity, Alias::new(column)))
            .add(Expr::col((Alias::new("excluded"), Alias::new(column))))
    };
    insert.on_conflict(
        OnConflict::columns([profiles::Column::TenantId, profiles::Column::Id])
            // Everything but the key, the creation time and the stage.
            .update_columns(PROFILE_COLUMNS.into_iter().filter(|column| {
                !matches!(
                    column,
                    profiles::Column::TenantId | profiles::Column::Id | profiles::Column::CreatedAt
                )
            }))
            .values([
                (Alias::new(ORDER_COUNT), added(ORDER_COUNT)),
                (Alias::new(TOTAL_REVENUE), added(TOTAL_REVENUE)),
            ])
            .to_owned(),
    );
    DbBackend::Sqlite.build(&insert)
}

/// The events insert as a multi-row `VALUES` (SQLite), with the same effect as
/// [`EVENTS_OVER_ARRAYS`].
fn events_over_values(tenant: Uuid, rows: Vec<(EventRow, JsonText, JsonText)>) -> Statement {
    let mut insert = Query::insert();
    insert.into_table(events::Entity).columns([
        events::Column::TenantId,
        events::Column::Id,
        events::Column::ProfileId,
        events::Column::MessageId,
        events::Column::Kind,
        events::Column::Name,
        events::Column::Properties,
        events::Column::Context,
        events::Column::Timestamp,
        events::Column::ReceivedAt,
        events::Column::SourceId,
        events::Column::Channel,
        events::Column::UserId,
        events::Column::AnonymousId,
    ]);
    for (row, properties, context) in rows {
        insert.values_panic([
            tenant.into(),
            row.id.into(),
            row.profile_id.into(),
            row.message_id.into(),
            row.kind.into(),
            row.name.into(),
            properties.into_expr(DbBackend::Sqlite),
            context.into_expr(DbBackend::Sqlite),
            row.timestamp.into(),
            row.received_at.into(),
            row.source_id.into(),
            row.channel.into(),
            row.user_id.into(),
            row.anonymous_id.into(),
        ]);
    }
    DbBackend::Sqlite.build(&insert)
}

/// `rows` as one array parameter a column, for a statement that reads them with `unnest`: `row`
/// gives a row's values in the order of `kinds`.
fn array_columns<R, const N: usize>(
    rows: Vec<R>,
    kinds: [ArrayType; N],
    mut row: impl FnMut(R) -> [Value; N],
) -> Vec<Value> {
    let mut columns: [Vec<Value>; N] = std::array::from_fn(|_| Vec::with_capacity(rows.len()));
    for values in rows.into_iter().map(&mut row) {
        for (column, value) in columns.iter_mut().zip(values) {
            column.push(value);
        }
    }
    kinds
        .into_iter()
        .zip(columns)
        .map(|(kind, values)| super::array_of(kind, values))
        .collect()
}

/// A text that may be missing, as an array element (the driver binds no `NULL` inside an array)
/// and a flag that it is there.
fn flagged(value: Option<String>) -> [Value; 2] {
    let present = value.is_some();
    [value.unwrap_or_default().into(), present.into()]
}

/// The profile upsert on PostgreSQL, one array a column as [`EVENTS_OVER_ARRAYS`]: each row
/// replaces everything but the key, the creation time and the stage, and adds its batch's orders
/// to the stored totals. A profile's stage is written only when the batch creates it (a stored
/// profile's is changed by `store::lifecycle`), flagged as a missing name is there; a missing
/// survivor is the nil UUID.
const PROFILES_OVER_ARRAYS: &str = "INSERT INTO profiles (tenant_id, id, traits, trait_clock, \
     channels, first_seen_at, last_seen_at, event_count, merged_into, created_at, updated_at, \
     order_count, total_revenue, stage, stage_since) \
     SELECT $1, u.id, CAST(u.traits AS jsonb), CAST(u.trait_clock AS jsonb), \
     CAST(u.channels AS jsonb), u.first_seen_at, u.last_seen_at, u.event_count, \
     NULLIF(u.merged_into, '00000000-0000-0000-0000-000000000000'::uuid), u.created_at, $2, \
     u.order_count, u.total_revenue, CASE WHEN u.has_stage THEN u.stage END, \
     CASE WHEN u.has_stage THEN $2 END \
     FROM unnest($3::uuid[], $4::text[], $5::text[], $6::text[], $7::timestamptz[], \
     $8::timestamptz[], $9::bigint[], $10::uuid[], $11::timestamptz[], $12::bigint[], \
     $13::float8[], $14::text[], $15::bool[]) \
     AS u(id, traits, trait_clock, channels, first_seen_at, last_seen_at, event_count, \
     merged_into, created_at, order_count, total_revenue, stage, has_stage) \
     ON CONFLICT (tenant_id, id) DO UPDATE SET traits = excluded.traits, \
     trait_clock = excluded.trait_clock, channels = excluded.channels, \
     first_seen_at = excluded.first_seen_at, last_seen_at = excluded.last_seen_at, \
     event_count = excluded.event_count, merged_into = excluded.merged_into, \
     updated_at = excluded.updated_at, \
     order_count = profiles.order_count + excluded.order_count, \
     total_revenue = profiles.total_revenue + excluded.total_revenue";

/// [`PROFILES_OVER_ARRAYS`] with its values: `rows` of `tenant` at `now`.
fn profiles_over_arrays(tenant: Uuid, now: DateTime<Utc>, rows: Vec<ProfileWrite>) -> Statement {
    use ArrayType::{
        BigInt, Bool, ChronoDateTimeUtc as Instant, Double, String as Text, Uuid as Id,
    };
    let kinds = [
        Id, Text, Text, Text, Instant, Instant, BigInt, Id, Instant, BigInt, Double, Text, Bool,
    ];
    let columns = array_columns(rows, kinds, |write| {
        let [traits, trait_clock, channels] = write.json;
        let [stage, has_stage] = flagged(write.stage);
        [
            write.row.id.into(),
            traits.into_string().into(),
            trait_clock.into_string().into(),
            channels.into_string().into(),
            write.row.first_seen_at.into(),
            write.row.last_seen_at.into(),
            write.row.event_count.into(),
            write.row.merged_into.unwrap_or_else(Uuid::nil).into(),
            write.row.created_at.into(),
            write.orders.0.into(),
            write.orders.1.into(),
            stage,
            has_stage,
        ]
    });
    let values: Vec<Value> = [tenant.into(), now.into()]
        .into_iter()
        .chain(columns)
        .collect();
    Statement::from_sql_and_values(DbBackend::Postgres, PROFILES_OVER_ARRAYS, values)
}

/// The events insert on PostgreSQL: one array a column, unnested into rows.
///
/// Its text does not depend on how many rows it carries, so each connection prepares it once
/// (a multi-row `VALUES` was a statement of its own for every row count), PostgreSQL plans
/// seventeen parameters instead of fourteen a row (every statement gets a custom plan,
/// `plan_cache_mode`, see `Store::connect`), and the service builds no statement tree of every
/// value. The rows are inserted in the arrays' order. (Measured: the service process about 5 %
/// less CPU an event, no change of the rate beyond noise; docs/PERFORMANCE.md.)
///
/// The driver binds no `NULL` inside an array, so a missing name, user id or anonymous id is
/// bound as an empty string beside a flag that it is missing, and a missing source as the nil
/// UUID, which no source has (sources get random UUIDs).
const EVENTS_OVER_ARRAYS: &str = "INSERT INTO events (tenant_id, id, profile_id, message_id, \
     type, name, properties, context, timestamp, received_at, source_id, channel, user_id, \
     anonymous_id) \
     SELECT $1, u.id, u.profile_id, u.message_id, u.type, \
     CASE WHEN u.has_name THEN u.name END, \
     CAST(u.properties AS jsonb), CAST(u.context AS jsonb), u.ts, u.received_at, \
     NULLIF(u.source_id, '00000000-0000-0000-0000-000000000000'::uuid), u.channel, \
     CASE WHEN u.has_user_id THEN u.user_id END, \
     CASE WHEN u.has_anonymous_id THEN u.anonymous_id END \
     FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::bool[], \
     $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::uuid[], $13::text[], \
     $14::text[], $15::bool[], $16::text[], $17::bool[]) \
     AS u(id, profile_id, message_id, type, name, has_name, properties, context, ts, \
     received_at, source_id, channel, user_id, has_user_id, anonymous_id, has_anonymous_id)";

/// [`EVENTS_OVER_ARRAYS`] with its values: `rows` of `tenant`.
fn events_over_arrays(tenant: Uuid, rows: Vec<(EventRow, JsonText, JsonText)>) -> Statement {
    use ArrayType::{Bool, ChronoDateTimeUtc as Instant, String as Text, Uuid as Id};
    let kinds = [
        Id, Id, Text, Text, Text, Bool, Text, Text, Instant, Instant, Id, Text, Text, Bool, Text,
        Bool,
    ];
    let columns = array_columns(rows, kinds, |(row, properties, context)| {
        let [name, has_name] = flagged(row.name);
        let [user_id, has_user_id] = flagged(row.user_id);
        let [anonymous_id, has_anonymous_id] = flagged(row.anonymous_id);
        [
            row.id.into(),
            row.profile_id.into(),
            row.message_id.into(),
            row.kind.into(),
            name,
            has_name,
            properties.into_string().into(),
            context.into_string().into(),
            row.timestamp.into(),
            row.received_at.into(),
            row.source_id.unwrap_or_else(Uuid::nil).into(),
            row.channel.into(),
            user_id,
            has_user_id,
            anonymous_id,
            has_anonymous_id,
        ]
    });
    let values: Vec<Value> = std::iter::once(tenant.into()).chain(columns).collect();
    Statement::from_sql_and_values(DbBackend::Postgres, EVENTS_OVER_ARRAYS, values)
}

/// The append-only per-batch counts, folded into `ingest_stats` by [`compact_stats`].
const DELTAS: &str = "ingest_stat_deltas";

/// Re-points everything stored under `merged` to `survivor`: identities, events, group links;
/// drops the merged profile's consents (the caller upserts the merged result on the survivor);
/// and flattens tombstones that pointed at `merged`.
pub async fn move_profile_rows(tx: &TenantTx, merged: Uuid, survivor: Uuid) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    identities::Entity::update_many()
        .col_expr(identities::Column::ProfileId, Expr::value(survivor))
        .filter(identities::Column::TenantId.eq(tenant))
        .filter(identities::Column::ProfileId.eq(merged))
        .exec(tx.conn())
        .await?;
    events::Entity::update_many()
        .col_expr(events::Column::ProfileId, Expr::value(survivor))
        .filter(events::Column::TenantId.eq(tenant))
        .filter(events::Column::ProfileId.eq(merged))
        .exec(tx.conn())
        .await?;
    let memberships = profile_groups::Entity::find()
        .filter(profile_groups::Column::TenantId.eq(tenant))
        .filter(profile_groups::Column::ProfileId.eq(merged))
        .all(tx.conn())
        .await?;
    if !memberships.is_empty() {
        let rows = memberships.iter().map(|row| profile_groups::ActiveModel {
            tenant_id: Set(tenant),
            profile_id: Set(survivor),
            group_id: Set(row.group_id.clone()),
            joined_at: Set(row.joined_at),
        });
        profile_groups::Entity::insert_many(rows)
            .on_conflict_do_nothing_on([
                profile_groups::Column::TenantId,
                profile_groups::Column::ProfileId,
                profile_groups::Column::GroupId,
            ])
            .exec(tx.conn())
            .await?;
        profile_groups::Entity::delete_many()
            .filter(profile_groups::Column::TenantId.eq(tenant))
            .filter(profile_groups::Column::ProfileId.eq(merged))
            .exec(tx.conn())
            .await?;
    }
    // The history of the merged profile's consents goes with them.
    consent_history::Entity::update_many()
        .col_expr(consent_history::Column::ProfileId, Expr::value(survivor))
        .filter(consent_history::Column::TenantId.eq(tenant))
        .filter(consent_history::Column::ProfileId.eq(merged))
        .exec(tx.conn())
        .await?;
    consents::Entity::delete_many()
        .filter(consents::Column::TenantId.eq(tenant))
        .filter(consents::Column::ProfileId.eq(merged))
        .exec(tx.conn())
        .await?;
    profiles::Entity::update_many()
        .col_expr(profiles::Column::MergedInto, Expr::value(survivor))
        .filter(profiles::Column::TenantId.eq(tenant))
        .filter(profiles::Column::MergedInto.eq(merged))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Moves a set of events to another profile (splitting a wrong merge).
pub async fn move_events(tx: &TenantTx, event_ids: &[Uuid], profile_id: Uuid) -> StoreResult<()> {
    for chunk in event_ids.chunks(CHUNK) {
        events::Entity::update_many()
            .col_expr(events::Column::ProfileId, Expr::value(profile_id))
            .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()))
            .filter(events::Column::Id.is_in(chunk.iter().copied()))
            .exec(tx.conn())
            .await?;
    }
    Ok(())
}

/// Moves one identity to another profile, with its value sealed again for that profile.
pub async fn move_identity(
    tx: &TenantTx,
    kind: &str,
    lookup: &str,
    profile_id: Uuid,
    value: &str,
) -> StoreResult<()> {
    identities::Entity::update_many()
        .col_expr(identities::Column::ProfileId, Expr::value(profile_id))
        .col_expr(identities::Column::Value, Expr::value(value.to_owned()))
        .filter(identities::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(identities::Column::Kind.eq(kind))
        .filter(identities::Column::Lookup.eq(lookup))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Per-source ingestion counts of the tenant: one row per source and outcome, exact (the folded
/// counts plus the deltas not folded yet).
pub async fn stats(tx: &TenantTx) -> StoreResult<Vec<ingest_stats::Model>> {
    let tenant = tx.tenant_id().as_uuid();
    let mut rows = ingest_stats::Entity::find()
        .filter(ingest_stats::Column::TenantId.eq(tenant))
        .all(tx.conn())
        .await?;
    let pending = Query::select()
        .column(Alias::new("source_id"))
        .column(Alias::new("outcome"))
        .expr(Expr::cust("CAST(SUM(count) AS BIGINT)"))
        .expr(Expr::cust("MAX(at)"))
        .from(DELTAS)
        .and_where(Expr::col(Alias::new("tenant_id")).eq(tenant))
        .group_by_columns([Alias::new("source_id"), Alias::new("outcome")])
        .to_owned();
    for row in tx.conn().query_all(&pending).await? {
        let source_id: Uuid = row.try_get_by_index(0)?;
        let outcome: String = row.try_get_by_index(1)?;
        let count: i64 = row.try_get_by_index(2)?;
        let at: DateTime<Utc> = row.try_get_by_index(3)?;
        match rows
            .iter_mut()
            .find(|stat| stat.source_id == source_id && stat.outcome == outcome)
        {
            Some(stat) => {
                stat.count += count;
                stat.updated_at = Ord::max(stat.updated_at, at);
            }
            None => rows.push(ingest_stats::Model {
                tenant_id: tenant,
                source_id,
                outcome,
                count,
                updated_at: at,
            }),
        }
    }
    Ok(rows)
}

/// Folds the tenant's pending count deltas into `ingest_stats`, in one transaction: the deltas
/// this deletes are exactly the ones it adds, so a count is never lost nor counted twice, even
/// when two processes fold at once (the second finds the rows gone).
pub async fn compact_stats(tx: &TenantTx) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    let delete = Query::delete()
        .from_table(DELTAS)
        .and_where(Expr::col(Alias::new("tenant_id")).eq(tenant))
        .returning(
            Query::returning().columns(["source_id", "outcome", "count", "at"].map(Alias::new)),
        )
        .to_owned();
    let mut sums: std::collections::BTreeMap<(Uuid, String), (i64, DateTime<Utc>)> =
        Default::default();
    for row in tx.conn().query_all(&delete).await? {
        let source_id: Uuid = row.try_get_by_index(0)?;
        let outcome: String = row.try_get_by_index(1)?;
        let count: i64 = row.try_get_by_index(2)?;
        let at: DateTime<Utc> = row.try_get_by_index(3)?;
        let sum = sums.entry((source_id, outcome)).or_insert((0, at));
        sum.0 += count;
        sum.1 = Ord::max(sum.1, at);
    }
    if sums.is_empty() {
        return Ok(());
    }
    let rows =
        sums.into_iter().map(
            |((source_id, outcome), (count, at))| ingest_stats::ActiveModel {
                tenant_id: Set(tenant),
                source_id: Set(source_id),
                outcome: Set(outcome),
                count: Set(count),
                updated_at: Set(at),
            },
        );
    ingest_stats::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::columns([
                ingest_stats::Column::TenantId,
                ingest_stats::Column::SourceId,
                ingest_stats::Column::Outcome,
            ])
            .value(
                ingest_stats::Column::Count,
                Expr::col((ingest_stats::Entity, ingest_stats::Column::Count)).add(Expr::col((
                    Alias::new("excluded"),
                    ingest_stats::Column::Count,
                ))),
            )
            .update_column(ingest_stats::Column::UpdatedAt)
            .to_owned(),
        )
        .exec(tx.conn())
        .await?;
    Ok(())
}

pub use ingest_stats::Model as StatRow;

/// The identities with these (kind, lookup) pairs.
///
/// On SQLite one query per kind, each a range of the primary key `(tenant_id, kind, lookup)`:
/// SQLite does not split an OR of several kinds into index lookups and would scan every identity
/// of the tenant. PostgreSQL turns the one query into a bitmap OR of primary-key lookups.
pub async fn identities_by_keys(
    tx: &TenantTx,
    backend: super::Backend,
    keys: &[(String, String)],
) -> StoreResult<Vec<IdentityRow>> {
    if backend == super::Backend::Postgres || keys.is_empty() {
        return super::profiles::identities_by_keys(tx, keys).await;
    }
    let mut by_kind: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (kind, lookup) in keys {
        by_kind.entry(kind).or_default().push(lookup);
    }
    let mut found = Vec::new();
    for (kind, lookups) in by_kind {
        for chunk in lookups.chunks(CHUNK) {
            found.extend(
                identities::Entity::find()
                    .filter(identities::Column::TenantId.eq(tx.tenant_id().as_uuid()))
                    .filter(identities::Column::Kind.eq(kind))
                    .filter(identities::Column::Lookup.is_in(chunk.iter().copied()))
                    .all(tx.conn())
                    .await?,
            );
        }
    }
    Ok(found)
}

/// The (profile, kind, lookup) of every identity of these profiles, in no particular order.
pub async fn identity_keys_of(
    tx: &TenantTx,
    profile_ids: &[Uuid],
) -> StoreResult<Vec<(Uuid, String, String)>> {
    if tx.backend() == super::Backend::Postgres {
        let key = super::keyed::KeyColumn::Uuid("profile_id", profile_ids.to_vec());
        return super::keyed::tuples::<(Uuid, String, String)>(
            tx,
            "identities",
            "profile_id, kind, lookup",
            vec![key],
            super::keyed::Probe::All,
        )
        .await;
    }
    let mut found = Vec::new();
    for chunk in profile_ids.chunks(CHUNK) {
        found.extend(
            identities::Entity::find()
                .select_only()
                .column(identities::Column::ProfileId)
                .column(identities::Column::Kind)
                .column(identities::Column::Lookup)
                .filter(identities::Column::TenantId.eq(tx.tenant_id().as_uuid()))
                .filter(identities::Column::ProfileId.is_in(chunk.iter().copied()))
                .into_tuple::<(Uuid, String, String)>()
                .all(tx.conn())
                .await?,
        );
    }
    Ok(found)
}

/// Serializes concurrent batches that carry the same new identifiers. The caller passes only the
/// identifiers it did not find, and looks them up again once this returns true: a batch holding
/// one of the locks may have linked it meanwhile. Identifiers already linked need no lock: their
/// profile's row is locked instead (`profiles::load` with `lock`).
///
/// On PostgreSQL every identifier maps to a transaction-scoped advisory lock (a 64-bit hash of
/// tenant, kind and lookup), taken in ascending order so that two batches can never wait on each
/// other in a cycle. A second batch carrying a new identifier then waits for the first to commit
/// and finds its profile, instead of creating a twin and retrying. A hash collision only makes
/// two unrelated identifiers queue behind each other. SQLite needs nothing: its write
/// transactions are serialized already.
pub async fn lock_identities(
    tx: &TenantTx,
    backend: super::Backend,
    keys: &[(String, String)],
) -> StoreResult<bool> {
    if backend != super::Backend::Postgres || keys.is_empty() {
        return Ok(false);
    }
    let tenant = tx.tenant_id().as_uuid();
    let mut hashes: Vec<i64> = keys
        .iter()
        .map(|(kind, lookup)| {
            use sha2::Digest;
            let mut hasher = sha2::Sha256::new();
            hasher.update(tenant.as_bytes());
            hasher.update(kind.as_bytes());
            hasher.update([0u8]);
            hasher.update(lookup.as_bytes());
            let digest = hasher.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest[..8]);
            i64::from_be_bytes(first)
        })
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    let array = sea_orm::Value::Array(
        sea_orm::sea_query::ArrayType::BigInt,
        Some(Box::new(
            hashes
                .into_iter()
                .map(|hash| sea_orm::Value::BigInt(Some(hash)))
                .collect(),
        )),
    );
    tx.conn()
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(k) FROM (SELECT k FROM unnest($1::bigint[]) AS k ORDER BY k) AS ordered",
            [array],
        ))
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    //! The events insert and the profile upsert keep every column as given, on both engines: on
    //! PostgreSQL they bind one array a column, where a missing value travels as a flag
    //! ([`EVENTS_OVER_ARRAYS`], [`PROFILES_OVER_ARRAYS`]).

    use super::*;
    use crate::store::entity::profile_state;
    use crate::store::{scratch, Store};
    use chrono::TimeZone;
    use serde_json::json;

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 2, 10, 0, second).unwrap()
    }

    fn event(tenant: Uuid, profile: Uuid, message_id: &str, full: bool) -> EventRow {
        EventRow {
            tenant_id: tenant,
            id: Uuid::new_v4(),
            profile_id: profile,
            message_id: message_id.to_owned(),
            kind: if full { "track" } else { "identify" }.to_owned(),
            name: full.then(|| "Order Completed".to_owned()),
            properties: if full {
                json!({"total": 12.5, "items": [{"sku": "a-1"}], "note": "ünïcode \"quoted\""})
            } else {
                json!({})
            },
            context: json!({"ip": "203.0.113.9", "library": {"name": "analytics.js"}}),
            timestamp: at(1),
            received_at: at(2),
            source_id: full.then(Uuid::new_v4),
            channel: "web".to_owned(),
            user_id: full.then(|| "user-1".to_owned()),
            anonymous_id: full.then(String::new),
        }
    }

    /// Writes a profile and three events (every optional value present; none present; an empty
    /// anonymous id, which is a value, not a missing one), reads them back, then writes one of
    /// their message ids again.
    async fn round_trip(store: &Store) -> (Vec<EventRow>, Vec<EventRow>, StoreError) {
        let tenant = scratch::add_tenant(store, "events-insert").await;
        let tenant_uuid = tenant.as_uuid();
        let profile = Uuid::new_v4();
        let mut written = vec![
            event(tenant_uuid, profile, "m-1", true),
            event(tenant_uuid, profile, "m-2", false),
            event(tenant_uuid, profile, "m-3", true),
        ];
        written[2].user_id = None;
        let set = WriteSet {
            profiles: vec![ProfileRow {
                tenant_id: tenant_uuid,
                id: profile,
                traits: json!({}),
                trait_clock: json!({}),
                channels: json!(["web"]),
                first_seen_at: at(1),
                last_seen_at: at(1),
                event_count: 3,
                merged_into: None,
                created_at: at(2),
                updated_at: at(2),
            }],
            events: written.clone(),
            ..WriteSet::default()
        };
        let tx = store.begin(tenant).await.unwrap();
        apply(&tx, set, at(2)).await.unwrap();
        tx.commit().await.unwrap();

        let tx = store.begin(tenant).await.unwrap();
        let mut stored = events::Entity::find()
            .filter(events::Column::TenantId.eq(tenant_uuid))
            .all(tx.conn())
            .await
            .unwrap();
        stored.sort_by(|a, b| a.message_id.cmp(&b.message_id));
        let again = WriteSet {
            events: vec![event(tenant_uuid, profile, "m-2", true)],
            ..WriteSet::default()
        };
        let duplicate = apply(&tx, again, at(3)).await.unwrap_err();
        (written, stored, duplicate)
    }

    fn check((written, stored, duplicate): (Vec<EventRow>, Vec<EventRow>, StoreError)) {
        assert_eq!(
            stored, written,
            "every column as written, missing values missing"
        );
        assert_eq!(stored[1].name, None);
        assert_eq!(stored[1].source_id, None);
        assert_eq!(stored[0].anonymous_id.as_deref(), Some(""));
        assert!(
            matches!(duplicate, StoreError::Raced(Race::MessageStored)),
            "a stored message id is a race the caller retries: {duplicate:?}"
        );
    }

    #[tokio::test]
    async fn events_keep_every_column_and_a_stored_message_id_is_a_race_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch::on_sqlite(dir.path(), 2).await;
        check(round_trip(&store).await);
    }

    #[tokio::test]
    async fn events_keep_every_column_and_a_stored_message_id_is_a_race_on_postgres() {
        let outcome = scratch::on_postgres("cdp_events_insert", 2, |store| async move {
            round_trip(&store).await
        })
        .await;
        if let Some(outcome) = outcome {
            check(outcome);
        }
    }

    fn profile_row(tenant: Uuid, id: Uuid, second: u32, traits: serde_json::Value) -> ProfileRow {
        ProfileRow {
            tenant_id: tenant,
            id,
            traits,
            trait_clock: json!({"plan": at(second).to_rfc3339()}),
            channels: json!(["web"]),
            first_seen_at: at(second),
            last_seen_at: at(second),
            event_count: i64::from(second),
            merged_into: None,
            created_at: at(second),
            updated_at: at(second),
        }
    }

    /// Creates two profiles (one with a stage and orders), then upserts them again: the first
    /// with new traits, more orders and no stage, the second merged into the first.
    async fn upsert_twice(store: &Store) -> Vec<profile_state::Model> {
        let tenant = scratch::add_tenant(store, "profiles-upsert").await;
        let t = tenant.as_uuid();
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        let created = WriteSet {
            profiles: vec![
                profile_row(t, first, 1, json!({"plan": "free"})),
                profile_row(t, second, 2, json!({})),
            ],
            orders: vec![(first, 1, 10.0)],
            stages: HashMap::from([(first, "acquisition".to_owned())]),
            ..WriteSet::default()
        };
        let tx = store.begin(tenant).await.unwrap();
        apply(&tx, created, at(2)).await.unwrap();
        tx.commit().await.unwrap();
        let mut merged = profile_row(t, second, 5, json!({}));
        merged.merged_into = Some(first);
        let changed = WriteSet {
            // The creation time of a stored profile stays what it was.
            profiles: vec![profile_row(t, first, 4, json!({"plan": "pro"})), merged],
            orders: vec![(first, 2, 5.5)],
            ..WriteSet::default()
        };
        let tx = store.begin(tenant).await.unwrap();
        apply(&tx, changed, at(6)).await.unwrap();
        let mut rows = profile_state::Entity::find()
            .filter(profile_state::Column::TenantId.eq(t))
            .all(tx.conn())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        rows.sort_by_key(|row| row.first_seen_at);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, first);
        assert_eq!(rows[1].merged_into, Some(first));
        rows
    }

    fn check_upserts(rows: Vec<profile_state::Model>) {
        let (first, second) = (&rows[0], &rows[1]);
        assert_eq!(first.traits, json!({"plan": "pro"}));
        assert_eq!(first.event_count, 4);
        assert_eq!((first.first_seen_at, first.last_seen_at), (at(4), at(4)));
        assert_eq!(first.merged_into, None);
        assert_eq!((first.order_count, first.total_revenue), (3, 15.5));
        assert_eq!(first.stage.as_deref(), Some("acquisition"), "kept");
        assert_eq!(first.stage_since, Some(at(2)), "since its creation");
        assert_eq!((second.order_count, second.total_revenue), (0, 0.0));
        assert_eq!((second.stage.as_deref(), second.stage_since), (None, None));
    }

    #[tokio::test]
    async fn profiles_upsert_whole_and_add_orders_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch::on_sqlite(dir.path(), 2).await;
        check_upserts(upsert_twice(&store).await);
    }

    #[tokio::test]
    async fn profiles_upsert_whole_and_add_orders_on_postgres() {
        let outcome = scratch::on_postgres("cdp_profiles_upsert", 2, |store| async move {
            upsert_twice(&store).await
        })
        .await;
        if let Some(rows) = outcome {
            check_upserts(rows);
        }
    }

    #[test]
    fn the_postgres_insert_binds_one_array_a_column_whatever_the_rows() {
        let tenant = Uuid::new_v4();
        let rows = |count: usize| {
            (0..count)
                .map(|index| {
                    let row = event(
                        tenant,
                        Uuid::new_v4(),
                        &format!("m-{index}"),
                        index % 2 == 0,
                    );
                    let properties = JsonText::of(&row.properties);
                    let context = JsonText::of(&row.context);
                    (row, properties, context)
                })
                .collect::<Vec<_>>()
        };
        let one = events_over_arrays(tenant, rows(1));
        let many = events_over_arrays(tenant, rows(40));
        assert_eq!(one.sql, many.sql, "one text, prepared once a connection");
        assert_eq!(many.values.map(|values| values.0.len()), Some(17));
    }
}
