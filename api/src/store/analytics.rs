//! Customer analytics in SQL: order totals, RFM scores and churn risk recomputed in bulk on the
//! profile rows, daily segment sizes, and the read-only aggregates behind the analytics queries
//! (stage funnel, segment overlap, size history, RFM grid).
//!
//! Guarantees: every statement is fixed SQL text with bound parameters (`$n`, which both
//! PostgreSQL and sqlx's SQLite driver number the same way); every table is filtered by the
//! transaction's tenant and writes take `tenant_id` from the transaction. The recomputations run
//! entirely in the database, never load profiles into memory, and write only the rows whose
//! values change, so that running them again changes nothing and the ids they return are exactly
//! the changed profiles. Only live profiles (not merged away) are scored or counted.
//!
//! Assumptions: SQLite 3.39 or later (`IS DISTINCT FROM`, `UPDATE … FROM`, `RETURNING`,
//! `unixepoch(…, 'subsec')`; the bundled library is newer). On SQLite, timestamps are stored as
//! sqlx writes a `DateTime<Utc>` (RFC 3339, `+00:00`, the shortest of 0, 3, 6 or 9 fractional
//! digits), so comparing and ordering the text compares and orders the instants; elapsed times
//! are measured with `unixepoch(…, 'subsec')`, at millisecond precision (PostgreSQL: microsecond).

use chrono::{DateTime, NaiveDate, Utc};
use domain::analytics::{CHURN_MULTIPLE, ORDER_COMPLETED};
use sea_orm::{ConnectionTrait, QueryResult, Statement, Value};
use uuid::Uuid;

use super::{Backend, StoreError, StoreResult, TenantTx};

fn statement(tx: &TenantTx, sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(tx.conn().get_database_backend(), sql, values)
}

async fn query(tx: &TenantTx, sql: &str, values: Vec<Value>) -> StoreResult<Vec<QueryResult>> {
    Ok(tx.conn().query_all_raw(statement(tx, sql, values)).await?)
}

fn ids_of(rows: Vec<QueryResult>) -> StoreResult<Vec<Uuid>> {
    let mut ids = rows
        .into_iter()
        .map(|row| row.try_get_by_index::<Uuid>(0).map_err(StoreError::from))
        .collect::<StoreResult<Vec<Uuid>>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// Seconds from `earlier` to `later` (two SQL expressions that are instants) as a double.
fn seconds_between(backend: Backend, later: &str, earlier: &str) -> String {
    match backend {
        Backend::Postgres => {
            format!("CAST(EXTRACT(EPOCH FROM ({later} - {earlier})) AS double precision)")
        }
        Backend::Sqlite => {
            format!("(unixepoch({later}, 'subsec') - unixepoch({earlier}, 'subsec'))")
        }
    }
}

/// The value of an order event `e` (see `domain::analytics::order_value`): `revenue` when it is a
/// JSON number, else `total` when it is a JSON number, else 0.
fn order_value_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => {
            "CASE WHEN jsonb_typeof(e.properties -> 'revenue') = 'number' \
                  THEN CAST(e.properties ->> 'revenue' AS double precision) \
                  WHEN jsonb_typeof(e.properties -> 'total') = 'number' \
                  THEN CAST(e.properties ->> 'total' AS double precision) \
                  ELSE 0.0 END"
        }
        Backend::Sqlite => {
            "CASE WHEN json_type(e.properties, '$.\"revenue\"') IN ('integer', 'real') \
                  THEN CAST(json_extract(e.properties, '$.\"revenue\"') AS REAL) \
                  WHEN json_type(e.properties, '$.\"total\"') IN ('integer', 'real') \
                  THEN CAST(json_extract(e.properties, '$.\"total\"') AS REAL) \
                  ELSE 0.0 END"
        }
    }
}

/// Recomputes `order_count` and `total_revenue` of every live profile of the tenant from its
/// "Order Completed" events (the rule of `domain::analytics::order_value`), writing only the rows
/// that change. Returns the ids of the changed profiles, in id order.
pub async fn recompute_order_totals(tx: &TenantTx) -> StoreResult<Vec<Uuid>> {
    let backend = tx.backend();
    let sql = format!(
        "WITH totals AS (
             SELECT e.profile_id AS profile_id, COUNT(*) AS orders, SUM({value}) AS revenue
             FROM events e
             WHERE e.tenant_id = $1 AND e.name = $2
             GROUP BY e.profile_id
         ), wanted AS (
             SELECT l.id AS pid, COALESCE(t.orders, 0) AS orders, COALESCE(t.revenue, 0.0) AS revenue
             FROM profiles l LEFT JOIN totals t ON t.profile_id = l.id
             WHERE l.tenant_id = $1 AND l.merged_into IS NULL
         )
         UPDATE profiles SET order_count = w.orders, total_revenue = w.revenue
         FROM wanted w
         WHERE profiles.tenant_id = $1 AND profiles.id = w.pid
           AND (profiles.order_count <> w.orders OR profiles.total_revenue <> w.revenue)
         RETURNING id",
        value = order_value_sql(backend),
    );
    let rows = query(
        tx,
        &sql,
        vec![tx.tenant_id().as_uuid().into(), ORDER_COMPLETED.into()],
    )
    .await?;
    ids_of(rows)
}

/// Recomputes the computed attributes of every live profile of the tenant at `now`, writing only
/// the rows that change:
///
/// - `mean_gap_seconds`: `(last_seen_at - first_seen_at) / (event_count - 1)` when the profile has
///   at least two events, NULL otherwise.
/// - `churn_risk`: `now - last_seen_at > CHURN_MULTIPLE × mean_gap_seconds`; false without a mean
///   gap.
/// - `rfm_recency`, `rfm_frequency`, `rfm_monetary`: quintile scores 1 to 5 among the live
///   profiles with `order_count > 0` (NULL for the others). For a value v among n buyers,
///   score = ceil(5 × c / n), where c is the number of buyers whose value is at most v (ties
///   included, the cumulative distribution). Equal values get equal scores and the highest value
///   always scores 5. Recency orders by the time of the last "Order Completed" event (later is
///   higher; `last_seen_at` when no order event is stored), frequency by `order_count`, monetary
///   by `total_revenue`.
///
/// Returns the ids, in id order, of the profiles whose RFM scores or churn risk changed (a change
/// of the mean gap alone is written but not returned).
pub async fn recompute_customer_attributes(
    tx: &TenantTx,
    now: DateTime<Utc>,
) -> StoreResult<Vec<Uuid>> {
    let backend = tx.backend();
    let tenant: Value = tx.tenant_id().as_uuid().into();

    let gap = format!(
        "(CASE WHEN event_count >= 2 THEN {} / (event_count - 1) ELSE NULL END)",
        seconds_between(backend, "last_seen_at", "first_seen_at")
    );
    let sql = format!(
        "UPDATE profiles SET mean_gap_seconds = {gap}
         WHERE tenant_id = $1 AND merged_into IS NULL AND mean_gap_seconds IS DISTINCT FROM {gap}"
    );
    tx.conn()
        .execute_raw(statement(tx, &sql, vec![tenant.clone()]))
        .await?;

    let now_sql = match backend {
        Backend::Postgres => "CAST($3 AS timestamptz)",
        Backend::Sqlite => "$3",
    };
    // Integer arithmetic: (5c + n - 1) / n is ceil(5c / n) for positive integers.
    let score = |order: &str| {
        format!("(5 * COUNT(*) OVER (ORDER BY {order}) + COUNT(*) OVER () - 1) / COUNT(*) OVER ()")
    };
    let sql = format!(
        "WITH orders AS (
             SELECT e.profile_id AS profile_id, MAX(e.\"timestamp\") AS last_order_at
             FROM events e
             WHERE e.tenant_id = $1 AND e.name = $2
             GROUP BY e.profile_id
         ), buyers AS (
             SELECT b.id AS pid, COALESCE(o.last_order_at, b.last_seen_at) AS recency_at,
                    b.order_count AS orders, b.total_revenue AS revenue
             FROM profiles b LEFT JOIN orders o ON o.profile_id = b.id
             WHERE b.tenant_id = $1 AND b.merged_into IS NULL AND b.order_count > 0
         ), scores AS (
             SELECT pid, {recency} AS r, {frequency} AS f, {monetary} AS m FROM buyers
         ), wanted AS (
             SELECT l.id AS pid, s.r AS r, s.f AS f, s.m AS m,
                    COALESCE(l.mean_gap_seconds IS NOT NULL
                             AND {elapsed} > $4 * l.mean_gap_seconds, FALSE) AS churn
             FROM profiles l LEFT JOIN scores s ON s.pid = l.id
             WHERE l.tenant_id = $1 AND l.merged_into IS NULL
         )
         UPDATE profiles
         SET rfm_recency = w.r, rfm_frequency = w.f, rfm_monetary = w.m, churn_risk = w.churn
         FROM wanted w
         WHERE profiles.tenant_id = $1 AND profiles.id = w.pid
           AND (profiles.rfm_recency IS DISTINCT FROM w.r
                OR profiles.rfm_frequency IS DISTINCT FROM w.f
                OR profiles.rfm_monetary IS DISTINCT FROM w.m
                OR profiles.churn_risk IS DISTINCT FROM w.churn)
         RETURNING id",
        recency = score("recency_at"),
        frequency = score("orders"),
        monetary = score("revenue"),
        elapsed = seconds_between(backend, now_sql, "l.last_seen_at"),
    );
    let rows = query(
        tx,
        &sql,
        vec![
            tenant,
            ORDER_COMPLETED.into(),
            now.into(),
            CHURN_MULTIPLE.into(),
        ],
    )
    .await?;
    ids_of(rows)
}

/// The computed attributes of a profile, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributesRow {
    pub profile_id: Uuid,
    pub total_revenue: f64,
    pub order_count: i64,
    pub mean_gap_seconds: Option<f64>,
    pub rfm_recency: Option<i32>,
    pub rfm_frequency: Option<i32>,
    pub rfm_monetary: Option<i32>,
    pub churn_risk: bool,
    pub last_seen_at: DateTime<Utc>,
}

/// The computed attributes of these profiles (tombstones included, as stored), in id order.
pub async fn attributes_of(tx: &TenantTx, profile_ids: &[Uuid]) -> StoreResult<Vec<AttributesRow>> {
    let mut rows = Vec::with_capacity(profile_ids.len());
    for chunk in profile_ids.chunks(CHUNK) {
        let mut values: Vec<Value> = vec![tx.tenant_id().as_uuid().into()];
        values.extend(chunk.iter().map(|id| Value::from(*id)));
        let found = query(
            tx,
            &format!(
                "SELECT id, total_revenue, order_count, mean_gap_seconds, rfm_recency,
                        rfm_frequency, rfm_monetary, churn_risk, last_seen_at
                 FROM profiles WHERE tenant_id = $1 AND id IN ({})",
                placeholders(2, chunk.len())
            ),
            values,
        )
        .await?;
        for row in found {
            rows.push(AttributesRow {
                profile_id: row.try_get_by_index(0)?,
                total_revenue: row.try_get_by_index(1)?,
                order_count: row.try_get_by_index(2)?,
                mean_gap_seconds: row.try_get_by_index(3)?,
                rfm_recency: row.try_get_by_index(4)?,
                rfm_frequency: row.try_get_by_index(5)?,
                rfm_monetary: row.try_get_by_index(6)?,
                churn_risk: row.try_get_by_index(7)?,
                last_seen_at: row.try_get_by_index(8)?,
            });
        }
    }
    rows.sort_by_key(|row| row.profile_id);
    rows.dedup_by_key(|row| row.profile_id);
    Ok(rows)
}

/// Ids per statement in an `IN` list: well under SQLite's limit of bound variables.
const CHUNK: usize = 500;

/// `$first, $first+1, …`: `count` numbered placeholders. Only numbers enter the SQL text.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records today's size (the number of stored members) of every segment of the tenant under
/// `day`, replacing a size already recorded for that day. Returns the number of segments.
pub async fn take_segment_snapshots(tx: &TenantTx, day: NaiveDate) -> StoreResult<u64> {
    let result = tx
        .conn()
        .execute_raw(statement(
            tx,
            "INSERT INTO segment_snapshots (tenant_id, segment_id, day, size)
             SELECT s.tenant_id, s.id, $2,
                    (SELECT COUNT(*) FROM segment_members m
                     WHERE m.tenant_id = $1 AND m.segment_id = s.id)
             FROM segments s
             WHERE s.tenant_id = $1
             ON CONFLICT (tenant_id, segment_id, day) DO UPDATE SET size = excluded.size",
            vec![tx.tenant_id().as_uuid().into(), day_text(day).into()],
        ))
        .await?;
    Ok(result.rows_affected())
}

/// A day as stored in `segment_snapshots.day`.
pub fn day_text(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// Which of these ids are segments of the tenant, in id order.
pub async fn existing_segments(tx: &TenantTx, segment_ids: &[Uuid]) -> StoreResult<Vec<Uuid>> {
    let mut found = Vec::new();
    for chunk in segment_ids.chunks(CHUNK) {
        let mut values: Vec<Value> = vec![tx.tenant_id().as_uuid().into()];
        values.extend(chunk.iter().map(|id| Value::from(*id)));
        let rows = query(
            tx,
            &format!(
                "SELECT id FROM segments WHERE tenant_id = $1 AND id IN ({})",
                placeholders(2, chunk.len())
            ),
            values,
        )
        .await?;
        found.extend(ids_of(rows)?);
    }
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

/// Member counts of two segments: (|a|, |b|, |a ∩ b|, |a ∪ b|).
pub async fn segment_overlap(tx: &TenantTx, a: Uuid, b: Uuid) -> StoreResult<(i64, i64, i64, i64)> {
    let rows = query(
        tx,
        "SELECT COALESCE(SUM(x.in_a), 0), COALESCE(SUM(x.in_b), 0),
                COALESCE(SUM(x.in_a * x.in_b), 0), COUNT(*)
         FROM (SELECT m.profile_id AS profile_id,
                      MAX(CASE WHEN m.segment_id = $2 THEN 1 ELSE 0 END) AS in_a,
                      MAX(CASE WHEN m.segment_id = $3 THEN 1 ELSE 0 END) AS in_b
               FROM segment_members m
               WHERE m.tenant_id = $1 AND (m.segment_id = $2 OR m.segment_id = $3)
               GROUP BY m.profile_id) x",
        vec![tx.tenant_id().as_uuid().into(), a.into(), b.into()],
    )
    .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok((0, 0, 0, 0));
    };
    Ok((
        row.try_get_by_index(0)?,
        row.try_get_by_index(1)?,
        row.try_get_by_index(2)?,
        row.try_get_by_index(3)?,
    ))
}

/// The recorded daily sizes of a segment from `first_day` on, oldest first: (day, size).
pub async fn segment_sizes(
    tx: &TenantTx,
    segment_id: Uuid,
    first_day: NaiveDate,
) -> StoreResult<Vec<(NaiveDate, i64)>> {
    let rows = query(
        tx,
        "SELECT day, size FROM segment_snapshots
         WHERE tenant_id = $1 AND segment_id = $2 AND day >= $3
         ORDER BY day",
        vec![
            tx.tenant_id().as_uuid().into(),
            segment_id.into(),
            day_text(first_day).into(),
        ],
    )
    .await?;
    let mut points = Vec::with_capacity(rows.len());
    for row in rows {
        let day: String = row.try_get_by_index(0)?;
        // A day that is not a date was not written by this module; it is skipped, not fatal.
        if let Ok(day) = NaiveDate::parse_from_str(&day, "%Y-%m-%d") {
            points.push((day, row.try_get_by_index(1)?));
        }
    }
    Ok(points)
}

/// A lifecycle stage of the tenant's model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRow {
    pub key: String,
    pub name: String,
    pub position: i32,
}

/// The tenant's lifecycle stages in model order.
pub async fn stages(tx: &TenantTx) -> StoreResult<Vec<StageRow>> {
    let rows = query(
        tx,
        "SELECT key, name, position FROM lifecycle_stages WHERE tenant_id = $1
         ORDER BY position, key",
        vec![tx.tenant_id().as_uuid().into()],
    )
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(StageRow {
                key: row.try_get_by_index(0)?,
                name: row.try_get_by_index(1)?,
                position: row.try_get_by_index(2)?,
            })
        })
        .collect()
}

/// Per (from, to) pair: the number of live profiles with a transition from → to at an instant in
/// `[since, until)`.
pub async fn transition_counts(
    tx: &TenantTx,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> StoreResult<Vec<(String, String, i64)>> {
    let rows = query(
        tx,
        &format!(
            "SELECT t.from_stage, t.to_stage, COUNT(DISTINCT t.profile_id)
             FROM lifecycle_transitions t
             JOIN profiles p ON p.tenant_id = t.tenant_id AND p.id = t.profile_id
             WHERE t.tenant_id = $1 AND p.merged_into IS NULL AND t.from_stage IS NOT NULL
               AND t.at >= {since} AND t.at < {until}
             GROUP BY t.from_stage, t.to_stage",
            since = instant_param(tx, 2),
            until = instant_param(tx, 3),
        ),
        vec![tx.tenant_id().as_uuid().into(), since.into(), until.into()],
    )
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok((
                row.try_get_by_index(0)?,
                row.try_get_by_index(1)?,
                row.try_get_by_index(2)?,
            ))
        })
        .collect()
}

/// Per stage: the number of live profiles that were in it during `[since, until)`: those whose
/// latest transition before `since` went to it (in it when the period began), and those with a
/// transition to it in the period (entered it).
pub async fn stage_reach(
    tx: &TenantTx,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> StoreResult<Vec<(String, i64)>> {
    let since_sql = instant_param(tx, 2);
    let until_sql = instant_param(tx, 3);
    let rows = query(
        tx,
        &format!(
            "SELECT x.stage, COUNT(DISTINCT x.profile_id)
             FROM (
                 SELECT t.to_stage AS stage, t.profile_id AS profile_id
                 FROM lifecycle_transitions t
                 WHERE t.tenant_id = $1 AND t.at >= {since_sql} AND t.at < {until_sql}
                 UNION ALL
                 SELECT l.stage, l.profile_id
                 FROM (SELECT t.to_stage AS stage, t.profile_id AS profile_id,
                              ROW_NUMBER() OVER (PARTITION BY t.profile_id
                                                 ORDER BY t.at DESC, t.id DESC) AS n
                       FROM lifecycle_transitions t
                       WHERE t.tenant_id = $1 AND t.at < {since_sql}) l
                 WHERE l.n = 1
             ) x
             JOIN profiles p ON p.tenant_id = $1 AND p.id = x.profile_id
             WHERE p.merged_into IS NULL
             GROUP BY x.stage"
        ),
        vec![tx.tenant_id().as_uuid().into(), since.into(), until.into()],
    )
    .await?;
    rows.into_iter()
        .map(|row| Ok((row.try_get_by_index(0)?, row.try_get_by_index(1)?)))
        .collect()
}

/// The bound instant parameter `$n`, typed on PostgreSQL.
fn instant_param(tx: &TenantTx, n: usize) -> String {
    match tx.backend() {
        Backend::Postgres => format!("CAST(${n} AS timestamptz)"),
        Backend::Sqlite => format!("${n}"),
    }
}

/// One cell of the RFM grid.
#[derive(Debug, Clone, PartialEq)]
pub struct RfmCellRow {
    pub recency: i32,
    pub frequency: i32,
    pub profiles: i64,
    pub total_revenue: f64,
}

/// Live profiles with RFM scores, counted per (recency, frequency) pair with the sum of their
/// revenue. Only non-empty cells are returned.
pub async fn rfm_cells(tx: &TenantTx) -> StoreResult<Vec<RfmCellRow>> {
    let rows = query(
        tx,
        "SELECT rfm_recency, rfm_frequency, COUNT(*), SUM(total_revenue)
         FROM profiles
         WHERE tenant_id = $1 AND merged_into IS NULL
           AND rfm_recency IS NOT NULL AND rfm_frequency IS NOT NULL
         GROUP BY rfm_recency, rfm_frequency",
        vec![tx.tenant_id().as_uuid().into()],
    )
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(RfmCellRow {
                recency: row.try_get_by_index(0)?,
                frequency: row.try_get_by_index(1)?,
                profiles: row.try_get_by_index(2)?,
                total_revenue: row.try_get_by_index(3)?,
            })
        })
        .collect()
}

/// A lifecycle transition to record as given.
#[derive(Debug, Clone)]
pub struct NewTransition {
    pub profile_id: Uuid,
    pub from_stage: Option<String>,
    pub to_stage: String,
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// Records lifecycle transitions as given, with new ids (backfills, imports and tests; the
/// lifecycle engine records the transitions it decides itself).
pub async fn insert_transitions(tx: &TenantTx, transitions: &[NewTransition]) -> StoreResult<()> {
    for transition in transitions {
        tx.conn()
            .execute_raw(statement(
                tx,
                &format!(
                    "INSERT INTO lifecycle_transitions
                         (tenant_id, id, profile_id, from_stage, to_stage, at, reason)
                     VALUES ($1, $2, $3, $4, $5, {at}, $7)",
                    at = instant_param(tx, 6)
                ),
                vec![
                    tx.tenant_id().as_uuid().into(),
                    Uuid::now_v7().into(),
                    transition.profile_id.into(),
                    transition.from_stage.clone().into(),
                    transition.to_stage.clone().into(),
                    transition.at.into(),
                    transition.reason.clone().into(),
                ],
            ))
            .await?;
    }
    Ok(())
}
