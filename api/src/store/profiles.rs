//! Profiles and what hangs off them: identities, consents, groups and the merge ledger (reads).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::ArrayType;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use uuid::Uuid;

use super::entity::{
    consents, groups, identities, merge_ledger, profile_groups, profile_state, profiles,
    segment_members,
};
use super::{Backend, StoreResult, TenantTx};

pub use consents::Model as ConsentRow;
pub use groups::Model as GroupRow;
pub use identities::Model as IdentityRow;
pub use merge_ledger::Model as LedgerRow;
pub use profiles::Model as ProfileRow;

/// Identities with these (kind, lookup) pairs.
pub async fn identities_by_keys(
    tx: &TenantTx,
    keys: &[(String, String)],
) -> StoreResult<Vec<IdentityRow>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    if tx.backend() == Backend::Postgres {
        let (kinds, lookups) = keys.iter().cloned().unzip();
        let keys = vec![
            super::keyed::KeyColumn::Text("kind", kinds),
            super::keyed::KeyColumn::Text("lookup", lookups),
        ];
        return super::keyed::models::<identities::Entity>(tx, keys, super::keyed::Probe::One)
            .await;
    }
    let mut by_kind: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (kind, lookup) in keys {
        by_kind.entry(kind).or_default().push(lookup);
    }
    let mut any = Condition::any();
    for (kind, lookups) in by_kind {
        any = any.add(
            Condition::all()
                .add(identities::Column::Kind.eq(kind))
                .add(identities::Column::Lookup.is_in(lookups)),
        );
    }
    Ok(identities::Entity::find()
        .filter(identities::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(any)
        .all(tx.conn())
        .await?)
}

/// Every identity of these profiles.
pub async fn identities_of(tx: &TenantTx, profile_ids: &[Uuid]) -> StoreResult<Vec<IdentityRow>> {
    if profile_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(identities::Entity::find()
        .filter(identities::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(identities::Column::ProfileId.is_in(profile_ids.iter().copied()))
        .order_by_asc(identities::Column::Kind)
        .order_by_asc(identities::Column::CreatedAt)
        .all(tx.conn())
        .await?)
}

/// Loads profiles by id. With `lock`, on PostgreSQL the rows are locked for update in id order,
/// so that concurrent batches touching the same profiles serialize without deadlocking.
pub async fn load(
    tx: &TenantTx,
    backend: Backend,
    ids: &BTreeSet<Uuid>,
    lock: bool,
) -> StoreResult<Vec<ProfileRow>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    if backend == Backend::Postgres {
        // One primary-key probe per id, in id order (the set is ordered), so that the rows are
        // locked in the order every batch locks them.
        let keys = vec![super::keyed::KeyColumn::Uuid(
            "id",
            ids.iter().copied().collect(),
        )];
        let probe = if lock {
            super::keyed::Probe::OneForUpdate
        } else {
            super::keyed::Probe::One
        };
        return super::keyed::models::<profiles::Entity>(tx, keys, probe).await;
    }
    Ok(profiles::Entity::find()
        .filter(profiles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profiles::Column::Id.is_in(ids.iter().copied()))
        .order_by_asc(profiles::Column::Id)
        .all(tx.conn())
        .await?)
}

/// Which columns of a profile a read decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Columns {
    All,
    /// All but the trait clock (the timestamp of each trait, which only the write path merges
    /// by): it is answered as an empty JSON object without being read or decoded. A row read
    /// so must never be written back.
    Shown,
}

impl Columns {
    fn apply(
        self,
        query: sea_orm::Select<profiles::Entity>,
        backend: Backend,
    ) -> sea_orm::Select<profiles::Entity> {
        match self {
            Columns::All => query,
            Columns::Shown => {
                super::without_json_column(query, profiles::Column::TraitClock, "{}", backend)
            }
        }
    }
}

/// A profile by id, following a merge to its survivor.
pub async fn get_resolved(tx: &TenantTx, id: Uuid) -> StoreResult<Option<ProfileRow>> {
    get_resolved_as(tx, id, Columns::All).await
}

/// [`get_resolved`] for reads that answer the profile: without its trait clock (an empty
/// object), so the row must not be written back.
pub async fn get_resolved_shown(tx: &TenantTx, id: Uuid) -> StoreResult<Option<ProfileRow>> {
    get_resolved_as(tx, id, Columns::Shown).await
}

async fn get_resolved_as(
    tx: &TenantTx,
    id: Uuid,
    columns: Columns,
) -> StoreResult<Option<ProfileRow>> {
    let Some(row) = get_raw(tx, id, columns).await? else {
        return Ok(None);
    };
    match row.merged_into {
        Some(survivor) => get_raw(tx, survivor, columns).await,
        None => Ok(Some(row)),
    }
}

async fn get_raw(tx: &TenantTx, id: Uuid, columns: Columns) -> StoreResult<Option<ProfileRow>> {
    Ok(columns
        .apply(profiles::Entity::find(), tx.backend())
        .filter(profiles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profiles::Column::Id.eq(id))
        .one(tx.conn())
        .await?)
}

/// Live profiles by id (no tombstones), in the order asked.
pub async fn get_many(tx: &TenantTx, ids: &[Uuid]) -> StoreResult<Vec<ProfileRow>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = profiles::Entity::find()
        .filter(profiles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profiles::Column::Id.is_in(ids.iter().copied()))
        .all(tx.conn())
        .await?;
    Ok(ids
        .iter()
        .filter_map(|id| rows.iter().find(|row| row.id == *id).cloned())
        .collect())
}

/// Ids of the profiles merged into this one.
pub async fn merged_ids(tx: &TenantTx, id: Uuid) -> StoreResult<Vec<Uuid>> {
    Ok(profiles::Entity::find()
        .select_only()
        .column(profiles::Column::Id)
        .filter(profiles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profiles::Column::MergedInto.eq(id))
        .order_by_asc(profiles::Column::Id)
        .into_tuple::<Uuid>()
        .all(tx.conn())
        .await?)
}

/// The profiles merged into each of `survivors`, as (merged id, survivor) pairs in merged id
/// order.
pub async fn merged_into(tx: &TenantTx, survivors: &[Uuid]) -> StoreResult<Vec<(Uuid, Uuid)>> {
    if survivors.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Uuid, Option<Uuid>)> = profiles::Entity::find()
        .select_only()
        .column(profiles::Column::Id)
        .column(profiles::Column::MergedInto)
        .filter(profiles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profiles::Column::MergedInto.is_in(survivors.iter().copied()))
        .order_by_asc(profiles::Column::Id)
        .into_tuple()
        .all(tx.conn())
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, survivor)| Some((id, survivor?)))
        .collect())
}

/// Filters of the profile list.
#[derive(Debug, Default, Clone)]
pub struct ProfileFilter {
    /// (dot path, scalar JSON value) pairs that must all equal.
    pub trait_equals: Vec<(Vec<String>, serde_json::Value)>,
    pub seen_after: Option<DateTime<Utc>>,
    pub seen_before: Option<DateTime<Utc>>,
    /// Restricts to these ids; None means no restriction.
    pub only_ids: Option<Vec<Uuid>>,
    /// Members of this segment.
    pub segment_id: Option<Uuid>,
    /// Profiles in this lifecycle stage.
    pub stage: Option<String>,
}

fn trait_condition(backend: Backend, path: &[String], value: &serde_json::Value) -> Expr {
    match backend {
        Backend::Postgres => {
            // jsonb_extract_path(traits, VARIADIC $1::text[]) = $2::jsonb, all parameters bound.
            Expr::cust_with_values(
                "jsonb_extract_path(traits, VARIADIC CAST($1 AS text[])) = CAST($2 AS jsonb)",
                [
                    super::array_of(ArrayType::String, path.iter().cloned()),
                    sea_orm::Value::String(Some(value.to_string())),
                ],
            )
        }
        Backend::Sqlite => {
            let json_path = format!(
                "${}",
                path.iter()
                    .map(|part| format!(".\"{}\"", part.replace('"', "\\\"")))
                    .collect::<String>()
            );
            // json_extract returns SQL values; compare them with the value converted the same way
            // (json_extract of the value itself), and require the same JSON type.
            let json_path = sea_orm::Value::String(Some(json_path));
            let value = sea_orm::Value::String(Some(value.to_string()));
            Expr::cust_with_values(
                "(json_type(traits, ?) = json_type(?) AND json_extract(traits, ?) IS json_extract(?, '$'))",
                [json_path.clone(), value.clone(), json_path, value],
            )
        }
    }
}

fn filtered(
    tx: &TenantTx,
    backend: Backend,
    filter: &ProfileFilter,
) -> sea_orm::Select<profiles::Entity> {
    let mut query = profiles::Entity::find()
        .filter(profiles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profiles::Column::MergedInto.is_null());
    for (path, value) in &filter.trait_equals {
        query = query.filter(trait_condition(backend, path, value));
    }
    if let Some(after) = filter.seen_after {
        query = query.filter(profiles::Column::LastSeenAt.gte(after));
    }
    if let Some(before) = filter.seen_before {
        query = query.filter(profiles::Column::LastSeenAt.lt(before));
    }
    if let Some(ids) = &filter.only_ids {
        query = query.filter(profiles::Column::Id.is_in(ids.iter().copied()));
    }
    if let Some(segment_id) = filter.segment_id {
        query = query.filter(
            profiles::Column::Id.in_subquery(
                sea_orm::sea_query::Query::select()
                    .column(segment_members::Column::ProfileId)
                    .from(segment_members::Entity)
                    .and_where(segment_members::Column::TenantId.eq(tx.tenant_id().as_uuid()))
                    .and_where(segment_members::Column::SegmentId.eq(segment_id))
                    .to_owned(),
            ),
        );
    }
    if let Some(stage) = &filter.stage {
        query = query.filter(profile_state::Column::Stage.eq(stage.clone()));
    }
    query
}

/// How many live profiles the tenant has (merged tombstones are not counted).
pub async fn count_live(tx: &TenantTx) -> StoreResult<u64> {
    Ok(profiles::Entity::find()
        .filter(profiles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profiles::Column::MergedInto.is_null())
        .count(tx.conn())
        .await?)
}

/// One page of live profiles in creation order, with the number of profiles the filter matches
/// when `with_total` (counting reads every matching profile of the tenant).
pub async fn page(
    tx: &TenantTx,
    backend: Backend,
    filter: &ProfileFilter,
    after: Option<Uuid>,
    limit: u64,
    with_total: bool,
) -> StoreResult<(Vec<ProfileRow>, Option<u64>)> {
    let total = if with_total {
        Some(filtered(tx, backend, filter).count(tx.conn()).await?)
    } else {
        None
    };
    // A page answers profiles and is never written back: no trait clocks.
    let mut query = Columns::Shown
        .apply(filtered(tx, backend, filter), backend)
        .order_by_asc(profiles::Column::Id)
        .limit(limit);
    if let Some(after) = after {
        query = query.filter(profiles::Column::Id.gt(after));
    }
    Ok((query.all(tx.conn()).await?, total))
}

pub async fn consents_of(tx: &TenantTx, profile_ids: &[Uuid]) -> StoreResult<Vec<ConsentRow>> {
    if profile_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(consents::Entity::find()
        .filter(consents::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(super::any_of(
            tx.backend(),
            consents::Column::ProfileId,
            ArrayType::Uuid,
            profile_ids.iter().copied(),
        ))
        .order_by_asc(consents::Column::Purpose)
        .all(tx.conn())
        .await?)
}

/// The groups (accounts) a profile belongs to, with their traits.
pub async fn groups_of(tx: &TenantTx, profile_id: Uuid) -> StoreResult<Vec<GroupRow>> {
    let group_ids: Vec<String> = profile_groups::Entity::find()
        .select_only()
        .column(profile_groups::Column::GroupId)
        .filter(profile_groups::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profile_groups::Column::ProfileId.eq(profile_id))
        .into_tuple::<String>()
        .all(tx.conn())
        .await?;
    if group_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(groups::Entity::find()
        .filter(groups::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(groups::Column::GroupId.is_in(group_ids))
        .order_by_asc(groups::Column::GroupId)
        .all(tx.conn())
        .await?)
}

/// The groups each of `profile_ids` belongs to, as (profile id, group) pairs in group id order.
pub async fn groups_of_profiles(
    tx: &TenantTx,
    profile_ids: &[Uuid],
) -> StoreResult<Vec<(Uuid, GroupRow)>> {
    if profile_ids.is_empty() {
        return Ok(Vec::new());
    }
    let links: Vec<(Uuid, String)> = profile_groups::Entity::find()
        .select_only()
        .column(profile_groups::Column::ProfileId)
        .column(profile_groups::Column::GroupId)
        .filter(profile_groups::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profile_groups::Column::ProfileId.is_in(profile_ids.iter().copied()))
        .into_tuple()
        .all(tx.conn())
        .await?;
    if links.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: BTreeSet<String> = links.iter().map(|(_, group)| group.clone()).collect();
    let groups = groups::Entity::find()
        .filter(groups::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(groups::Column::GroupId.is_in(wanted))
        .order_by_asc(groups::Column::GroupId)
        .all(tx.conn())
        .await?;
    let mut found = Vec::with_capacity(links.len());
    for group in groups {
        for (profile_id, _) in links.iter().filter(|(_, id)| *id == group.group_id) {
            found.push((*profile_id, group.clone()));
        }
    }
    Ok(found)
}

pub async fn groups_by_ids(tx: &TenantTx, group_ids: &[String]) -> StoreResult<Vec<GroupRow>> {
    if group_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(groups::Entity::find()
        .filter(groups::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(groups::Column::GroupId.is_in(group_ids.iter().cloned()))
        .all(tx.conn())
        .await?)
}

/// Ledger entries about a profile (as survivor or as the other side), newest first.
pub async fn ledger_of(tx: &TenantTx, profile_ids: &[Uuid]) -> StoreResult<Vec<LedgerRow>> {
    if profile_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(merge_ledger::Entity::find()
        .filter(merge_ledger::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(
            Condition::any()
                .add(merge_ledger::Column::ProfileId.is_in(profile_ids.iter().copied()))
                .add(merge_ledger::Column::OtherProfileId.is_in(profile_ids.iter().copied())),
        )
        .order_by_desc(merge_ledger::Column::Id)
        .all(tx.conn())
        .await?)
}
