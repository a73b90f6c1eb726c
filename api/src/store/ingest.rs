//! The bulk writer of the ingestion path: applies one batch's changes with a few multi-row
//! statements. It decides nothing; the service computed every row.
//!
//! Order matters and is fixed here: profiles (so that foreign keys hold), merges (re-pointing
//! rows of merged profiles), identities, events, consents, groups, the ledger, the counts
//! (appended as deltas, see [`compact_stats`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, IntoIden, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
};
use uuid::Uuid;

use super::entity::{
    consent_history, consents, events, groups, identities, ingest_stats, merge_ledger,
    profile_groups, profiles,
};
use super::wire::{self, JsonText};
use super::{StoreError, StoreResult, TenantTx};

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
    let backend = tx.conn().get_database_backend();
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
        let mut insert = Query::insert();
        insert.into_table(profiles::Entity).columns(
            PROFILE_COLUMNS.map(IntoIden::into_iden).into_iter().chain(
                [ORDER_COUNT, TOTAL_REVENUE, STAGE, STAGE_SINCE]
                    .map(|column| Alias::new(column).into_iden()),
            ),
        );
        for (row, [traits, trait_clock, channels]) in chunk {
            let (count, revenue) = orders.remove(&row.id).unwrap_or((0, 0.0));
            let stage = stages.remove(&row.id);
            let since = stage.as_ref().map(|_| now);
            insert.values_panic([
                tenant.into(),
                row.id.into(),
                traits.into_expr(backend),
                trait_clock.into_expr(backend),
                channels.into_expr(backend),
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
                        profiles::Column::TenantId
                            | profiles::Column::Id
                            | profiles::Column::CreatedAt
                    )
                }))
                .values([
                    (Alias::new(ORDER_COUNT), added(ORDER_COUNT)),
                    (Alias::new(TOTAL_REVENUE), added(TOTAL_REVENUE)),
                ])
                .to_owned(),
        );
        tx.conn().execute(&insert).await?;
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
    let backend = tx.conn().get_database_backend();
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
        for (row, properties, context) in chunk {
            insert.values_panic([
                tenant.into(),
                row.id.into(),
                row.profile_id.into(),
                row.message_id.into(),
                row.kind.into(),
                row.name.into(),
                properties.into_expr(backend),
                context.into_expr(backend),
                row.timestamp.into(),
                row.received_at.into(),
                row.source_id.into(),
                row.channel.into(),
                row.user_id.into(),
                row.anonymous_id.into(),
            ]);
        }
        tx.conn()
            .execute(&insert)
            .await
            .map_err(|error| StoreError::unique_as_race(error, Race::MessageStored))?;
    }
    Ok(())
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
