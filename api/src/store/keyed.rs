//! Lookups by a list of keys on PostgreSQL, one index probe per key.
//!
//! `WHERE tenant_id = $1 AND key IN (…)` is planned from the table's statistics. Before a table
//! has any (a young table, a bulk load the autovacuum has not caught up with, or a server run
//! with `autovacuum = off`), PostgreSQL guesses that a tenant holds a handful of rows and scans
//! all of the tenant's rows through some `(tenant_id, …)` index, filtering them by the list: the
//! write path's duplicate check then read every event of the tenant for each batch (6.6 ms a
//! batch at 20,000 events, growing with the tenant). Written as one index probe per key
//! (`unnest` of the keys, each joined laterally to a subquery that cannot be flattened), each
//! key costs one probe when the table has no statistics at all.
//!
//! The shape fixes the join, not the index. When the table was analyzed before a tenant existed
//! (docs/PERFORMANCE.md, "A young tenant in an analyzed table"), PostgreSQL estimates that tenant
//! at one row from the statistics, every `(tenant_id, …)` index looks as good as the key's, and
//! with the tenant written as a plain parameter it probed through another one
//! (`ix_profiles_stage`, `ix_profiles_merged_into`, `ix_identities_profile`), reading all of the
//! tenant's rows for each key until the next `ANALYZE` saw the tenant. So the tenant is compared
//! with `(SELECT $1::uuid)`, a value computed once when the statement runs, which the planner
//! cannot look up in the statistics: it estimates an average tenant's share of the table, and
//! the index that matches the whole key (one row) is the only cheap one, whatever the statistics
//! say about this tenant.

use sea_orm::sea_query::ArrayType;
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement, TryGetableMany, Value};
use uuid::Uuid;

use super::{StoreResult, TenantTx};

/// Whole rows of `E`'s table, one probe per key, as `E`'s models.
pub(super) async fn models<E: EntityTrait>(
    tx: &TenantTx,
    keys: Vec<KeyColumn<'_>>,
    probe: Probe,
) -> StoreResult<Vec<E::Model>> {
    models_of::<E>(tx, "*", keys, probe).await
}

/// [`models`] reading only `columns` (a select list that names every field of `E::Model`, with
/// its alias where it is an expression).
pub(super) async fn models_of<E: EntityTrait>(
    tx: &TenantTx,
    columns: &str,
    keys: Vec<KeyColumn<'_>>,
    probe: Probe,
) -> StoreResult<Vec<E::Model>> {
    let table = E::default().table_name();
    let mut out = Vec::new();
    for keys in runs(tx, keys) {
        let statement = statement(tx.tenant_id().as_uuid(), table, columns, keys, probe);
        out.extend(E::find().from_raw_sql(statement).all(tx.conn()).await?);
    }
    Ok(out)
}

/// `columns` of `table`, one probe per key, each row read as the tuple `T`.
pub(super) async fn tuples<T: TryGetableMany>(
    tx: &TenantTx,
    table: &str,
    columns: &str,
    keys: Vec<KeyColumn<'_>>,
    probe: Probe,
) -> StoreResult<Vec<T>> {
    let mut out = Vec::new();
    for keys in runs(tx, keys) {
        let statement = statement(tx.tenant_id().as_uuid(), table, columns, keys, probe);
        for row in tx.conn().query_all_raw(statement).await? {
            out.push(row.try_get_many_by_index::<T>()?);
        }
    }
    Ok(out)
}

/// The keys cut, in their order, into runs whose arrays fit one statement on the wire
/// (`store::wire`); probes that lock keep locking in the keys' order across the runs.
fn runs<'a>(tx: &TenantTx, keys: Vec<KeyColumn<'a>>) -> Vec<Vec<KeyColumn<'a>>> {
    split(keys, super::wire::bound(tx))
}

fn split(mut keys: Vec<KeyColumn<'_>>, limit: usize) -> Vec<Vec<KeyColumn<'_>>> {
    let count = keys.first().map_or(0, KeyColumn::len);
    let sizes: Vec<usize> = (0..count)
        .map(|index| keys.iter().map(|key| key.bytes(index)).sum())
        .collect();
    super::wire::cut(&sizes, usize::MAX, limit, |size| *size)
        .iter()
        .map(|run| keys.iter_mut().map(|key| key.take(run.len())).collect())
        .collect()
}

/// What follows the lateral subquery's `WHERE`: it also keeps PostgreSQL from flattening the
/// subquery into a join it would plan from statistics.
#[derive(Debug, Clone, Copy)]
pub(super) enum Probe {
    /// A unique key: at most one row per key.
    One,
    /// A unique key, the row locked for update (in the order of the keys).
    OneForUpdate,
    /// A non-unique key: every row with it.
    All,
}

/// A key column and the values to probe it with, one per key (the columns' lists run in
/// parallel).
pub(super) enum KeyColumn<'a> {
    Text(&'a str, Vec<String>),
    Uuid(&'a str, Vec<Uuid>),
}

impl<'a> KeyColumn<'a> {
    fn len(&self) -> usize {
        match self {
            KeyColumn::Text(_, values) => values.len(),
            KeyColumn::Uuid(_, values) => values.len(),
        }
    }

    /// The bytes the key at `index` adds to the statement (its value and its length word).
    fn bytes(&self, index: usize) -> usize {
        match self {
            KeyColumn::Text(_, values) => values.get(index).map_or(0, String::len) + 4,
            KeyColumn::Uuid(..) => super::wire::FIXED,
        }
    }

    /// The first `count` values, removed from this column.
    fn take(&mut self, count: usize) -> KeyColumn<'a> {
        match self {
            KeyColumn::Text(name, values) => KeyColumn::Text(name, values.drain(..count).collect()),
            KeyColumn::Uuid(name, values) => KeyColumn::Uuid(name, values.drain(..count).collect()),
        }
    }

    fn name(&self) -> &str {
        match self {
            KeyColumn::Text(name, _) | KeyColumn::Uuid(name, _) => name,
        }
    }

    fn sql_type(&self) -> &'static str {
        match self {
            KeyColumn::Text(..) => "text[]",
            KeyColumn::Uuid(..) => "uuid[]",
        }
    }

    fn into_value(self) -> Value {
        match self {
            KeyColumn::Text(_, values) => super::array_of(ArrayType::String, values),
            KeyColumn::Uuid(_, values) => super::array_of(ArrayType::Uuid, values),
        }
    }
}

/// `SELECT {columns} FROM {table}` of the tenant, for every key of `keys`, one index probe each,
/// in the order of the keys. `columns` names the table's columns as they are (`*` for all).
fn statement(
    tenant_id: Uuid,
    table: &str,
    columns: &str,
    keys: Vec<KeyColumn<'_>>,
    probe: Probe,
) -> Statement {
    let names: Vec<String> = keys
        .iter()
        .map(|key| format!("\"{}\"", key.name()))
        .collect();
    let arrays: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(n, key)| format!("${}::{}", n + 2, key.sql_type()))
        .collect();
    let matches: Vec<String> = names
        .iter()
        .map(|name| format!(" AND {name} = k.{name}"))
        .collect();
    let tail = match probe {
        Probe::One => "LIMIT 1",
        Probe::OneForUpdate => "FOR UPDATE",
        Probe::All => "OFFSET 0",
    };
    let sql = format!(
        "SELECT t.* FROM unnest({arrays}) AS k({names}) \
         CROSS JOIN LATERAL (SELECT {columns} FROM \"{table}\" \
         WHERE tenant_id = (SELECT $1::uuid){matches} {tail}) AS t",
        arrays = arrays.join(", "),
        names = names.join(", "),
        matches = matches.concat(),
    );
    let mut values = vec![Value::Uuid(Some(tenant_id))];
    values.extend(keys.into_iter().map(KeyColumn::into_value));
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::entity::profiles;
    use crate::store::{scratch, Store};
    use domain::TenantId;

    /// A new tenant of `store` with `count` profiles, each with an email identity.
    async fn tenant_with_profiles(store: &Store, slug: &str, count: usize) -> TenantId {
        let tenant = scratch::add_tenant(store, slug).await;
        let tx = store.begin(tenant).await.unwrap();
        let id = tenant.as_uuid();
        tx.raw_query_strings(&format!(
            "INSERT INTO profiles (tenant_id, id, traits, trait_clock, channels, first_seen_at, \
             last_seen_at, event_count, created_at, updated_at, stage) \
             SELECT '{id}', gen_random_uuid(), '{{}}', '{{}}', '[]', now(), \
             now() - g * interval '1 minute', 1, now(), now(), \
             (ARRAY['acquisition', 'activation', 'retention'])[1 + g % 3] \
             FROM generate_series(1, {count}) AS g"
        ))
        .await
        .unwrap();
        tx.raw_query_strings(&format!(
            "INSERT INTO identities (tenant_id, kind, lookup, value, profile_id, created_at) \
             SELECT tenant_id, 'email', md5(id::text), md5(id::text), id, now() \
             FROM profiles WHERE tenant_id = '{id}'"
        ))
        .await
        .unwrap();
        tx.commit().await.unwrap();
        tenant
    }

    /// The plan PostgreSQL makes for `statement` (with its values) in `tx`, as text.
    async fn plan(tx: &TenantTx, statement: Statement) -> String {
        let values = statement.values.map(|values| values.0).unwrap_or_default();
        let explain = Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("EXPLAIN {}", statement.sql),
            values,
        );
        let rows = tx.conn().query_all_raw(explain).await.unwrap();
        rows.iter()
            .map(|row| row.try_get_by_index::<String>(0).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A tenant created after its tables were analyzed, which the statistics do not know: its
    /// probes go through the index of their whole key, not through another `(tenant_id, …)`
    /// index that reads all of the tenant's rows for each key (with the tenant written as a
    /// plain parameter, PostgreSQL 15 chose `ix_profiles_stage` for the profiles here).
    #[tokio::test]
    async fn a_young_tenant_in_an_analyzed_table_is_probed_through_the_key_on_postgres() {
        let outcome = scratch::on_postgres("cdp_keyed", 2, |store| async move {
            tenant_with_profiles(&store, "keyed-old", 20_000).await;
            let tx = store.begin(TenantId(Uuid::new_v4())).await.unwrap();
            tx.raw_query_strings("ANALYZE profiles, identities")
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let young = tenant_with_profiles(&store, "keyed-young", 2_000).await;
            let tx = store.begin(young).await.unwrap();
            let ids: Vec<Uuid> = tx
                .raw_query_strings(&format!(
                    "SELECT id FROM profiles WHERE tenant_id = '{}' ORDER BY id DESC LIMIT 6",
                    young.as_uuid()
                ))
                .await
                .unwrap()
                .iter()
                .map(|id| id.parse().unwrap())
                .collect();
            let lookups: Vec<String> = tx
                .raw_query_strings(&format!(
                    "SELECT lookup FROM identities WHERE tenant_id = '{}' \
                     ORDER BY lookup DESC LIMIT 6",
                    young.as_uuid()
                ))
                .await
                .unwrap();
            let lock = statement(
                young.as_uuid(),
                "profiles",
                "*",
                vec![KeyColumn::Uuid("id", ids.clone())],
                Probe::OneForUpdate,
            );
            let lookup = statement(
                young.as_uuid(),
                "identities",
                "*",
                vec![
                    KeyColumn::Text("kind", vec!["email".to_owned(); lookups.len()]),
                    KeyColumn::Text("lookup", lookups.clone()),
                ],
                Probe::One,
            );
            let plans = (plan(&tx, lock).await, plan(&tx, lookup).await);
            let locked: Vec<Uuid> = models::<profiles::Entity>(
                &tx,
                vec![KeyColumn::Uuid("id", ids.clone())],
                Probe::OneForUpdate,
            )
            .await
            .unwrap()
            .into_iter()
            .map(|profile| profile.id)
            .collect();
            (ids, lookups.len(), plans, locked)
        })
        .await;
        let Some((ids, lookups, (lock, lookup), locked)) = outcome else {
            return;
        };
        assert_eq!((ids.len(), lookups), (6, 6));
        assert!(
            lock.contains("using profiles_pkey") && !lock.contains("ix_profiles"),
            "{lock}"
        );
        assert!(
            lookup.contains("using identities_pkey") && !lookup.contains("ix_identities"),
            "{lookup}"
        );
        assert_eq!(locked, ids, "every key's row, in the keys' order");
    }

    #[test]
    fn keys_split_into_runs_within_the_bound_keep_their_order_and_columns_aligned() {
        let kinds: Vec<String> = (0..300).map(|n| format!("kind-{}", n % 3)).collect();
        let lookups: Vec<String> = (0..300).map(|n| format!("{n:0>40}")).collect();
        let keys = vec![
            KeyColumn::Text("kind", kinds.clone()),
            KeyColumn::Text("lookup", lookups.clone()),
        ];
        let runs = split(keys, 4096);
        assert!(
            runs.len() > 1,
            "300 keys of about 55 bytes need several runs"
        );
        let (mut all_kinds, mut all_lookups) = (Vec::new(), Vec::new());
        for run in runs {
            let size: usize = (0..run[0].len())
                .map(|index| run.iter().map(|key| key.bytes(index)).sum::<usize>())
                .sum();
            assert!(size <= 4096, "{size}");
            match (&run[0], &run[1]) {
                (KeyColumn::Text(_, kinds), KeyColumn::Text(_, lookups)) => {
                    assert_eq!(kinds.len(), lookups.len());
                    all_kinds.extend(kinds.iter().cloned());
                    all_lookups.extend(lookups.iter().cloned());
                }
                _ => panic!("the columns keep their kinds"),
            }
        }
        assert_eq!((all_kinds, all_lookups), (kinds, lookups));
        assert_eq!(
            split(vec![KeyColumn::Uuid("id", Vec::new())], 4096).len(),
            0
        );
        assert_eq!(
            split(
                vec![KeyColumn::Uuid("id", vec![Uuid::nil(); 10])],
                usize::MAX
            )
            .len(),
            1
        );
    }

    #[test]
    fn one_probe_per_key_with_parallel_arrays() {
        let statement = statement(
            Uuid::nil(),
            "identities",
            "*",
            vec![
                KeyColumn::Text("kind", vec!["email".into(), "user_id".into()]),
                KeyColumn::Text("lookup", vec!["a".into(), "b".into()]),
            ],
            Probe::One,
        );
        assert_eq!(
            statement.sql,
            "SELECT t.* FROM unnest($2::text[], $3::text[]) AS k(\"kind\", \"lookup\") \
             CROSS JOIN LATERAL (SELECT * FROM \"identities\" \
             WHERE tenant_id = (SELECT $1::uuid) AND \"kind\" = k.\"kind\" AND \"lookup\" = k.\"lookup\" LIMIT 1) AS t"
        );
        assert_eq!(statement.values.map(|values| values.0.len()), Some(3));
    }
}
