//! Segment conditions in SQL: one query per [`Condition`] that selects every live profile of the
//! tenant for which [`Condition::evaluate`] holds, on SQLite and PostgreSQL.
//!
//! Guarantees: every value, JSON key, JSON path, instant and count reaches the database as a bound
//! parameter; the SQL text is assembled from fixed fragments only. Every table is filtered by the
//! transaction's tenant. Every leaf is TRUE or FALSE, never NULL, so `NOT` follows rule 1 of the
//! condition language. An event condition becomes an `EXISTS` or `NOT EXISTS` test when it asks
//! for at least one or for no matching event; otherwise one `GROUP BY` aggregate, inner-joined
//! with its `HAVING` count when it is a top-level `AND` term that zero does not satisfy, else
//! left-joined to the profiles, so that a profile without matching events counts zero.
//!
//! How facts map to the rules (what the in-memory facts builder must do for the two to agree):
//! - `first_seen_at` and `last_seen_at` are strings, written as [`instant_fact_text`] writes them
//!   (`2026-01-01T10:00:00.123456Z`: UTC, always six fractional digits). `eq`, `neq`, `contains`,
//!   `starts_with` and `in` compare that text; the order operators compare the stored instant.
//! - `event_count`, `total_revenue`, `order_count`, `rfm_recency`, `rfm_frequency`,
//!   `rfm_monetary` are numbers (missing when the column is NULL); `rfm_score` is
//!   `rfm_recency * 100 + rfm_frequency * 10 + rfm_monetary`, missing when any of the three is
//!   missing; `churn_risk` is a boolean; `stage` is the `stage` column (missing when NULL).
//! - An event's name is the `name` column; an event whose name is NULL counts only for `$any`.
//!
//! Known deviations from the in-memory rules (all outside what the application stores):
//! - Numbers are converted to double precision by the database (`float8in` on PostgreSQL,
//!   SQLite's own text-to-real conversion); serde_json's parser may round a decimal with more than
//!   about 17 significant digits to an adjacent double (it does not use the `float_roundtrip`
//!   feature), so such a literal may compare differently by one unit in the last place. A JSON
//!   number outside the double range (which serde_json refuses, so it never comes from the
//!   application) makes the PostgreSQL query fail instead of comparing.
//! - `{"ago": D}` and `within` bounds before the year 0001 (only when `now` itself is within 100
//!   years of it) are not representable in SQL and are clamped to 0001-01-01.
//! - Strings containing U+0000 cannot be stored in PostgreSQL `jsonb` at all.
//!
//! Assumptions the exactness rests on: SQLite 3.45 or later (the bundled library is newer), whose
//! JSON paths read escapes inside quoted keys (keys with `"` or `\`); timestamps on SQLite stored
//! as sqlx writes `DateTime<Utc>` (`YYYY-MM-DDTHH:MM:SS[.fraction]+00:00`, read at microsecond
//! precision, extra digits truncated); PostgreSQL 14 or later, where `EXTRACT(EPOCH ...)` is
//! exact (`days_since_last_seen`), and a deterministic default collation (text `=` is byte-wise).
//! An order comparison of a JSON or `stage` string with an instant evaluates a small scalar
//! subquery per row (the text is bound once, then validated by rule 7 and converted, never
//! raising); event counts are one aggregate per event condition, not a subquery per profile
//! (the `EXISTS` tests are planned as semi-joins, anti-joins, a hashed set or an index probe).

use chrono::{DateTime, NaiveDate, SecondsFormat, SubsecRound, Utc};
use domain::condition::{
    parse_instant, Attribute, Condition, CountOp, EventName, Op, Operand, PropertyPredicate,
};
use sea_orm::{ConnectionTrait, Statement, Value};
use serde_json::Value as Json;
use uuid::Uuid;

use super::{Backend, StoreResult, TenantTx};

/// The text of an instant attribute (`first_seen_at`, `last_seen_at`) as the condition language
/// sees it: UTC with `Z` and exactly six fractional digits, truncated to microseconds.
pub fn instant_fact_text(instant: DateTime<Utc>) -> String {
    instant
        .trunc_subsecs(6)
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Ids of the live profiles (not merged away) of the transaction's tenant that satisfy
/// `condition` at `now`, in id order; `only` restricts to these ids, `limit` caps the count.
pub async fn matching_profiles(
    tx: &TenantTx,
    backend: Backend,
    condition: &Condition,
    now: DateTime<Utc>,
    only: Option<&[Uuid]>,
    limit: Option<u64>,
) -> StoreResult<Vec<Uuid>> {
    if only.is_some_and(<[Uuid]>::is_empty) || limit == Some(0) {
        return Ok(Vec::new());
    }
    let tenant = tx.tenant_id().as_uuid();
    let (sql, values) = build(backend, tenant, condition, now, only, limit, Shape::Ids);
    let rows = tx
        .conn()
        .query_all_raw(Statement::from_sql_and_values(
            db_backend(backend),
            sql,
            values,
        ))
        .await?;
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.try_get_by_index::<Uuid>(0)?);
    }
    Ok(ids)
}

/// How many live profiles of the transaction's tenant satisfy `condition` at `now`.
pub async fn count_matching(
    tx: &TenantTx,
    backend: Backend,
    condition: &Condition,
    now: DateTime<Utc>,
) -> StoreResult<u64> {
    let tenant = tx.tenant_id().as_uuid();
    let (sql, values) = build(backend, tenant, condition, now, None, None, Shape::Count);
    let row = tx
        .conn()
        .query_one_raw(Statement::from_sql_and_values(
            db_backend(backend),
            sql,
            values,
        ))
        .await?;
    let count = match row {
        Some(row) => row.try_get_by_index::<i64>(0)?,
        None => 0,
    };
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The query selecting the ids of the tenant's live profiles that satisfy `condition` at `now`,
/// in id order, with its bound values.
pub fn compile(
    backend: Backend,
    tenant_id: Uuid,
    condition: &Condition,
    now: DateTime<Utc>,
) -> (String, Vec<Value>) {
    build(backend, tenant_id, condition, now, None, None, Shape::Ids)
}

pub(crate) fn db_backend(backend: Backend) -> sea_orm::DbBackend {
    match backend {
        Backend::Sqlite => sea_orm::DbBackend::Sqlite,
        Backend::Postgres => sea_orm::DbBackend::Postgres,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Ids,
    Count,
    /// The ids, unordered, for embedding as `IN (...)` in a larger statement.
    Subquery,
}

/// Stands for a placeholder while fragments are assembled; replaced by `?` or `$n` at the end.
/// SQL text is only ever built from fixed fragments, so it cannot occur otherwise.
const MARK: char = '\u{1}';

/// A fragment of SQL with the values of its placeholders, in text order.
#[derive(Default)]
pub(crate) struct Sql {
    text: String,
    values: Vec<Value>,
}

impl Sql {
    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    pub(crate) fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.text.push(MARK);
        self.values.push(value.into());
        self
    }

    pub(crate) fn append(&mut self, other: Sql) {
        self.text.push_str(&other.text);
        self.values.extend(other.values);
    }

    pub(crate) fn render(self, backend: Backend) -> (String, Vec<Value>) {
        let mut text = String::with_capacity(self.text.len() + 3 * self.values.len());
        let mut n = 0usize;
        for c in self.text.chars() {
            if c == MARK {
                n += 1;
                match backend {
                    Backend::Sqlite => text.push('?'),
                    Backend::Postgres => {
                        text.push('$');
                        text.push_str(&n.to_string());
                    }
                }
            } else {
                text.push(c);
            }
        }
        (text, self.values)
    }
}

/// The ids of the tenant's live profiles that satisfy `condition` at `now` (restricted to `only`
/// when given), unordered, as a fragment to embed in a larger statement: `x IN (<fragment>)`.
pub(crate) fn ids_subquery(
    backend: Backend,
    tenant: Uuid,
    condition: &Condition,
    now: DateTime<Utc>,
    only: Option<&[Uuid]>,
) -> Sql {
    fragment(backend, tenant, condition, now, only, None, Shape::Subquery)
}

fn build(
    backend: Backend,
    tenant: Uuid,
    condition: &Condition,
    now: DateTime<Utc>,
    only: Option<&[Uuid]>,
    limit: Option<u64>,
    shape: Shape,
) -> (String, Vec<Value>) {
    fragment(backend, tenant, condition, now, only, limit, shape).render(backend)
}

fn fragment(
    backend: Backend,
    tenant: Uuid,
    condition: &Condition,
    now: DateTime<Utc>,
    only: Option<&[Uuid]>,
    limit: Option<u64>,
    shape: Shape,
) -> Sql {
    let mut compiler = Compiler {
        backend,
        tenant,
        now: now.trunc_subsecs(6),
        only,
        joins: Sql::default(),
        aliases: 0,
    };
    let mut predicate = Sql::default();
    compiler.condition(&mut predicate, condition, true);

    let mut sql = Sql::default();
    sql.push(match shape {
        Shape::Ids => "SELECT p.id FROM profiles p",
        Shape::Count => "SELECT COUNT(*) FROM profiles p",
        Shape::Subquery => "SELECT p.id FROM profiles p",
    });
    sql.append(std::mem::take(&mut compiler.joins));
    sql.push(" WHERE p.tenant_id = ")
        .bind(tenant)
        .push(" AND p.merged_into IS NULL");
    if let Some(ids) = only {
        sql.push(" AND ");
        in_list(&mut sql, "p.id", ids);
    }
    sql.push(" AND ");
    sql.append(predicate);
    if shape == Shape::Ids {
        sql.push(" ORDER BY p.id");
        if let Some(limit) = limit {
            sql.push(" LIMIT ")
                .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        }
    }
    sql
}

fn in_list(sql: &mut Sql, column: &str, ids: &[Uuid]) {
    sql.push(column).push(" IN (");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.bind(*id);
    }
    sql.push(")");
}

/// Where a compared value comes from.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// The value at a (non-empty) path in a JSON column.
    Json {
        column: &'static str,
        path: &'a [String],
    },
    /// An element of a JSON array being scanned: `el.x` (jsonb) on PostgreSQL, the `json_each`
    /// row `el` on SQLite.
    Element,
    /// A numeric column or expression without parameters; NULL is missing.
    Number(&'static str),
    /// A boolean column.
    Boolean(&'static str),
    /// A text column; NULL is missing.
    Text(&'static str),
    /// A timestamp column: a string (its [`instant_fact_text`]) that is always an instant.
    Instant(&'static str),
    /// `days_since_last_seen`.
    DaysSince,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Boolean,
    Number,
    String,
}

struct Compiler<'q> {
    backend: Backend,
    tenant: Uuid,
    now: DateTime<Utc>,
    only: Option<&'q [Uuid]>,
    joins: Sql,
    aliases: usize,
}

const PG_INSTANT_PATTERN: &str = "'^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$'";

fn sql_op(op: Op) -> Option<&'static str> {
    match op {
        Op::Gt => Some(" > "),
        Op::Gte => Some(" >= "),
        Op::Lt => Some(" < "),
        Op::Lte => Some(" <= "),
        _ => None,
    }
}

/// Whether a count of `count` satisfies `op n`.
fn count_holds(op: CountOp, n: u32, count: u32) -> bool {
    match op {
        CountOp::Eq => count == n,
        CountOp::Neq => count != n,
        CountOp::Gt => count > n,
        CountOp::Gte => count >= n,
        CountOp::Lt => count < n,
        CountOp::Lte => count <= n,
    }
}

fn count_op(op: CountOp) -> &'static str {
    match op {
        CountOp::Eq => " = ",
        CountOp::Neq => " <> ",
        CountOp::Gt => " > ",
        CountOp::Gte => " >= ",
        CountOp::Lt => " < ",
        CountOp::Lte => " <= ",
    }
}

/// A SQLite JSON path naming `path` key by key. Keys are quoted; inside quotes SQLite (3.45 and
/// later) reads JSON escapes, so `"` and `\` are written as JSON escapes.
fn sqlite_path(path: &[String]) -> String {
    let mut out = String::from("$");
    for key in path {
        out.push_str(".\"");
        for c in key.chars() {
            match c {
                '"' => out.push_str("\\u0022"),
                '\\' => out.push_str("\\\\"),
                other => out.push(other),
            }
        }
        out.push('"');
    }
    out
}

/// The earliest instant SQL handles everywhere.
fn floor_instant(instant: DateTime<Utc>) -> DateTime<Utc> {
    let floor = NaiveDate::from_ymd_opt(1, 1, 1)
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|naive| naive.and_utc())
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    instant.max(floor)
}

impl Compiler<'_> {
    fn pg(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// `condition` as a predicate that is TRUE or FALSE. `conjunct` says that the predicate is
    /// the whole WHERE clause or one of its top-level `AND` terms (reached from the root through
    /// `all` only), where a row that fails it is dropped whatever else holds.
    fn condition(&mut self, out: &mut Sql, condition: &Condition, conjunct: bool) {
        match condition {
            Condition::All(items) | Condition::Any(items) => {
                let conjunct = conjunct && matches!(condition, Condition::All(_));
                let (joiner, empty) = match condition {
                    Condition::All(_) => (" AND ", "TRUE"),
                    _ => (" OR ", "FALSE"),
                };
                if items.is_empty() {
                    out.push(empty);
                    return;
                }
                out.push("(");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(joiner);
                    }
                    self.condition(out, item, conjunct);
                }
                out.push(")");
            }
            Condition::Not(inner) => {
                out.push("(NOT ");
                self.condition(out, inner, false);
                out.push(")");
            }
            Condition::Trait { path, op, value } => {
                if path.is_empty() {
                    // An empty path finds nothing (rule 3).
                    out.push(if *op == Op::NotExists {
                        "TRUE"
                    } else {
                        "FALSE"
                    });
                } else {
                    let src = Src::Json {
                        column: "p.traits",
                        path,
                    };
                    self.compare(out, src, *op, value);
                }
            }
            Condition::Attribute { name, op, value } => {
                let src = match name {
                    Attribute::FirstSeenAt => Src::Instant("p.first_seen_at"),
                    Attribute::LastSeenAt => Src::Instant("p.last_seen_at"),
                    Attribute::EventCount => Src::Number("p.event_count"),
                    Attribute::Stage => Src::Text("p.stage"),
                    Attribute::DaysSinceLastSeen => Src::DaysSince,
                    Attribute::RfmRecency => Src::Number("p.rfm_recency"),
                    Attribute::RfmFrequency => Src::Number("p.rfm_frequency"),
                    Attribute::RfmMonetary => Src::Number("p.rfm_monetary"),
                    Attribute::RfmScore => {
                        Src::Number("(CAST(p.rfm_recency AS BIGINT) * 100 + CAST(p.rfm_frequency AS BIGINT) * 10 + CAST(p.rfm_monetary AS BIGINT))")
                    }
                    Attribute::ChurnRisk => Src::Boolean("p.churn_risk"),
                    Attribute::TotalRevenue => Src::Number("p.total_revenue"),
                    Attribute::OrderCount => Src::Number("p.order_count"),
                };
                self.compare(out, src, *op, value);
            }
            Condition::Event {
                name,
                filters,
                count,
                within,
            } => self.event(out, name, filters, count.op, count.n, *within, conjunct),
            Condition::Stage(key) => {
                out.push("COALESCE(p.stage = ")
                    .bind(key.clone())
                    .push(", FALSE)");
            }
            Condition::Consent(purpose) => {
                out.push("EXISTS (SELECT 1 FROM consents c WHERE c.tenant_id = ")
                    .bind(self.tenant)
                    .push(" AND c.profile_id = p.id AND c.purpose = ")
                    .bind(purpose.clone())
                    .push(" AND c.granted = TRUE)");
            }
        }
    }

    /// An event condition, in the cheapest of three shapes that all count the same events:
    /// - "at least one" (`gte 1`, `gt 0`) and "none" (`lt 1`, `lte 0`, `eq 0`) are a correlated
    ///   `EXISTS` or `NOT EXISTS`: a semi-join or anti-join at the top level, elsewhere a hashed
    ///   set or a probe of the events index per profile. Never `IN (…)`: under a `NOT` that is a
    ///   `NOT IN`, which PostgreSQL cannot turn into an anti-join and, when the set outgrows
    ///   `work_mem`, rescans per profile (measured: minutes at 1,000,000 profiles);
    /// - a count that zero does not satisfy, as a top-level `AND` term (`conjunct`), is an inner
    ///   join to the profiles having that count (`GROUP BY … HAVING`), so the database may start
    ///   from the few matching events instead of reading every profile;
    /// - anything else is a `LEFT JOIN` to the per-profile counts, where a profile without
    ///   events counts zero.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        out: &mut Sql,
        name: &EventName,
        filters: &[PropertyPredicate],
        op: CountOp,
        n: u32,
        within: Option<domain::condition::Window>,
        conjunct: bool,
    ) {
        let exists = match (op, n) {
            (CountOp::Gte, 1) | (CountOp::Gt, 0) => Some(true),
            (CountOp::Lt, 1) | (CountOp::Lte, 0) | (CountOp::Eq, 0) => Some(false),
            _ => None,
        };
        if let Some(exists) = exists {
            out.push(if exists {
                "(EXISTS (SELECT 1 FROM events e WHERE e.tenant_id = "
            } else {
                "(NOT EXISTS (SELECT 1 FROM events e WHERE e.tenant_id = "
            })
            .bind(self.tenant)
            .push(" AND e.profile_id = p.id");
            self.event_filter(out, name, filters, within, false);
            out.push("))");
            return;
        }
        self.aliases += 1;
        let alias = format!("ev{}", self.aliases);
        let inner = conjunct && !count_holds(op, n, 0);
        let mut join = Sql::default();
        join.push(if inner {
            " JOIN (SELECT e.profile_id AS profile_id FROM events e WHERE e.tenant_id = "
        } else {
            " LEFT JOIN (SELECT e.profile_id AS profile_id, COUNT(*) AS n FROM events e WHERE e.tenant_id = "
        })
        .bind(self.tenant);
        self.event_filter(&mut join, name, filters, within, true);
        join.push(" GROUP BY e.profile_id");
        if inner {
            join.push(" HAVING COUNT(*)")
                .push(count_op(op))
                .bind(i64::from(n));
        }
        join.push(") ")
            .push(&alias)
            .push(" ON ")
            .push(&alias)
            .push(".profile_id = p.id");
        self.joins.append(join);
        if inner {
            // The join keeps only the profiles with that count.
            out.push("TRUE");
        } else {
            out.push("(COALESCE(")
                .push(&alias)
                .push(".n, 0)")
                .push(count_op(op))
                .bind(i64::from(n))
                .push(")");
        }
    }

    /// The `AND …` terms selecting the events `e` an event condition counts (after the tenant);
    /// `restrict` adds the `only` ids (a correlated test needs none).
    fn event_filter(
        &mut self,
        join: &mut Sql,
        name: &EventName,
        filters: &[PropertyPredicate],
        within: Option<domain::condition::Window>,
        restrict: bool,
    ) {
        if let EventName::Named(name) = name {
            join.push(" AND e.name = ").bind(name.clone());
        }
        if let Some(ids) = self.only.filter(|_| restrict) {
            join.push(" AND ");
            in_list(join, "e.profile_id", ids);
        }
        if let Some(window) = within {
            let since = floor_instant(
                self.now
                    .checked_sub_signed(window.duration())
                    .unwrap_or(DateTime::<Utc>::MIN_UTC),
            );
            let now = self.now;
            if self.pg() {
                join.push(" AND e.\"timestamp\" >= CAST(")
                    .bind(since)
                    .push(" AS timestamptz) AND e.\"timestamp\" <= CAST(")
                    .bind(now)
                    .push(" AS timestamptz)");
            } else {
                // A coarse test on the stored text first (it can use the indexes): the text
                // starts with the whole seconds, so these are necessary conditions.
                join.push(" AND e.\"timestamp\" >= ")
                    .bind(since.format("%Y-%m-%dT%H:%M:%S").to_string());
                if let Some(next) = now.checked_add_signed(chrono::Duration::seconds(1)) {
                    join.push(" AND e.\"timestamp\" < ")
                        .bind(next.format("%Y-%m-%dT%H:%M:%S").to_string());
                }
                join.push(" AND ");
                sqlite_micros(join, "e.\"timestamp\"");
                join.push(" >= ")
                    .bind(since.timestamp_micros())
                    .push(" AND ");
                sqlite_micros(join, "e.\"timestamp\"");
                join.push(" <= ").bind(now.timestamp_micros());
            }
        }
        for filter in filters {
            join.push(" AND ");
            if filter.path.is_empty() {
                join.push(if filter.op == Op::NotExists {
                    "TRUE"
                } else {
                    "FALSE"
                });
            } else {
                let src = Src::Json {
                    column: "e.properties",
                    path: &filter.path,
                };
                self.compare(join, src, filter.op, &filter.value);
            }
        }
    }

    /// `op` with `operand` applied to the value of `src` (rules 3 to 10): TRUE or FALSE.
    fn compare(&mut self, out: &mut Sql, src: Src<'_>, op: Op, operand: &Operand) {
        match op {
            Op::Exists => return self.exists(out, src),
            Op::NotExists => {
                out.push("(NOT ");
                self.exists(out, src);
                out.push(")");
                return;
            }
            _ => {}
        }
        match (op, operand) {
            (Op::Gt | Op::Gte | Op::Lt | Op::Lte, Operand::Ago(window)) => {
                let instant = self
                    .now
                    .checked_sub_signed(window.duration())
                    .unwrap_or(DateTime::<Utc>::MIN_UTC);
                self.instant_order(out, src, op, floor_instant(instant));
            }
            (_, Operand::Ago(_) | Operand::Absent) => {
                out.push("FALSE");
            }
            (Op::Eq, Operand::Value(value)) => self.equal(out, src, value, true),
            (Op::Neq, Operand::Value(value)) => self.equal(out, src, value, false),
            (Op::Gt | Op::Gte | Op::Lt | Op::Lte, Operand::Value(value)) => match value {
                Json::Number(number) => match number.as_f64() {
                    Some(number) => self.guarded(out, src, Kind::Number, |this, out| {
                        this.number(out, src);
                        out.push(sql_op(op).unwrap_or(" = ")).bind(number);
                    }),
                    None => {
                        out.push("FALSE");
                    }
                },
                Json::String(text) => match parse_instant(text) {
                    Some(instant) => self.instant_order(out, src, op, instant),
                    None => {
                        out.push("FALSE");
                    }
                },
                _ => {
                    out.push("FALSE");
                }
            },
            (Op::Contains, Operand::Value(value)) => {
                let scalar = matches!(
                    value,
                    Json::Null | Json::Bool(_) | Json::Number(_) | Json::String(_)
                );
                if !scalar {
                    out.push("FALSE");
                    return;
                }
                out.push("(");
                if let Json::String(needle) = value {
                    self.guarded(out, src, Kind::String, |this, out| {
                        if this.pg() {
                            out.push("strpos(");
                            this.text(out, src);
                            out.push(", CAST(")
                                .bind(needle.clone())
                                .push(" AS text)) > 0");
                        } else {
                            out.push("instr(");
                            this.text(out, src);
                            out.push(", ").bind(needle.clone()).push(") > 0");
                        }
                    });
                    out.push(" OR ");
                }
                self.array_contains(out, src, value);
                out.push(")");
            }
            (Op::StartsWith, Operand::Value(Json::String(prefix))) => {
                self.guarded(out, src, Kind::String, |this, out| {
                    out.push("substr(");
                    this.text(out, src);
                    out.push(", 1, length(")
                        .bind(prefix.clone())
                        .push(")) = ")
                        .bind(prefix.clone());
                });
            }
            (Op::In, Operand::Value(Json::Array(items))) if !items.is_empty() => {
                out.push("(");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(" OR ");
                    }
                    self.equal(out, src, item, true);
                }
                out.push(")");
            }
            _ => {
                out.push("FALSE");
            }
        }
    }

    /// `exists`: present and not JSON null.
    fn exists(&mut self, out: &mut Sql, src: Src<'_>) {
        match src {
            Src::Json { .. } | Src::Element => {
                out.push("COALESCE(");
                self.type_name(out, src);
                out.push(" <> 'null', FALSE)");
            }
            Src::Number(column)
            | Src::Boolean(column)
            | Src::Text(column)
            | Src::Instant(column) => {
                out.push("(").push(column).push(" IS NOT NULL)");
            }
            Src::DaysSince => {
                out.push("(p.last_seen_at IS NOT NULL)");
            }
        }
    }

    /// The JSON type name (PostgreSQL `jsonb_typeof`, SQLite `json_type`) of a JSON source.
    fn type_name(&mut self, out: &mut Sql, src: Src<'_>) {
        match (self.backend, src) {
            (Backend::Postgres, Src::Json { .. } | Src::Element) => {
                out.push("jsonb_typeof(");
                self.json_value(out, src);
                out.push(")");
            }
            (Backend::Sqlite, Src::Json { column, path }) => {
                out.push("json_type(")
                    .push(column)
                    .push(", ")
                    .bind(sqlite_path(path))
                    .push(")");
            }
            (Backend::Sqlite, Src::Element) => {
                out.push("el.type");
            }
            _ => {
                out.push("NULL");
            }
        }
    }

    /// PostgreSQL: the jsonb value of a JSON source (NULL when missing).
    fn json_value(&mut self, out: &mut Sql, src: Src<'_>) {
        match src {
            Src::Json { column, path } => {
                out.push("(").push(column);
                for key in path {
                    out.push(" -> CAST(").bind(key.clone()).push(" AS text)");
                }
                out.push(")");
            }
            _ => {
                out.push("el.x");
            }
        }
    }

    /// Whether the value is present and of `kind`; None when the source never has that kind.
    fn kind_test(&mut self, out: &mut Sql, src: Src<'_>, kind: Kind) -> bool {
        match src {
            Src::Json { .. } | Src::Element => {
                let names = match (self.backend, kind) {
                    (Backend::Postgres, Kind::Null) => "= 'null'",
                    (Backend::Postgres, Kind::Boolean) => "= 'boolean'",
                    (Backend::Postgres, Kind::Number) => "= 'number'",
                    (Backend::Postgres, Kind::String) => "= 'string'",
                    (Backend::Sqlite, Kind::Null) => "= 'null'",
                    (Backend::Sqlite, Kind::Boolean) => "IN ('true', 'false')",
                    (Backend::Sqlite, Kind::Number) => "IN ('integer', 'real')",
                    (Backend::Sqlite, Kind::String) => "= 'text'",
                };
                self.type_name(out, src);
                out.push(" ").push(names);
                true
            }
            Src::Number(column) if kind == Kind::Number => {
                out.push(column).push(" IS NOT NULL");
                true
            }
            Src::Boolean(column) if kind == Kind::Boolean => {
                out.push(column).push(" IS NOT NULL");
                true
            }
            Src::Text(column) | Src::Instant(column) if kind == Kind::String => {
                out.push(column).push(" IS NOT NULL");
                true
            }
            Src::DaysSince if kind == Kind::Number => {
                out.push("p.last_seen_at IS NOT NULL");
                true
            }
            _ => false,
        }
    }

    /// `CASE WHEN <value is of kind> THEN COALESCE(<test>, FALSE) ELSE FALSE END`: the test only
    /// sees values of that kind (PostgreSQL casts cannot fail) and the result is never NULL.
    fn guarded(
        &mut self,
        out: &mut Sql,
        src: Src<'_>,
        kind: Kind,
        test: impl FnOnce(&mut Self, &mut Sql),
    ) {
        let mut condition = Sql::default();
        if !self.kind_test(&mut condition, src, kind) {
            out.push("FALSE");
            return;
        }
        out.push("(CASE WHEN ");
        out.append(condition);
        out.push(" THEN COALESCE(");
        test(self, out);
        out.push(", FALSE) ELSE FALSE END)");
    }

    /// The value as double precision; only meaningful for numbers.
    fn number(&mut self, out: &mut Sql, src: Src<'_>) {
        match (self.backend, src) {
            (Backend::Postgres, Src::Json { .. } | Src::Element) => {
                out.push("CAST((");
                self.json_value(out, src);
                out.push(" #>> '{}') AS double precision)");
            }
            (Backend::Sqlite, Src::Json { column, path }) => {
                out.push("CAST(json_extract(")
                    .push(column)
                    .push(", ")
                    .bind(sqlite_path(path))
                    .push(") AS REAL)");
            }
            (Backend::Sqlite, Src::Element) => {
                out.push("CAST(el.value AS REAL)");
            }
            (_, Src::DaysSince) => {
                let now = self.now;
                if self.pg() {
                    out.push("CAST(floor(EXTRACT(EPOCH FROM (CAST(")
                        .bind(now)
                        .push(" AS timestamptz) - p.last_seen_at)) / 86400) AS double precision)");
                } else {
                    // Floor division of the elapsed microseconds by a day.
                    let elapsed = |out: &mut Sql| {
                        out.push("(").bind(now.timestamp_micros()).push(" - ");
                        sqlite_micros(out, "p.last_seen_at");
                        out.push(")");
                    };
                    out.push("CAST((CASE WHEN ");
                    elapsed(out);
                    out.push(" >= 0 THEN ");
                    elapsed(out);
                    out.push(" / 86400000000 ELSE -((-");
                    elapsed(out);
                    out.push(" + 86399999999) / 86400000000) END) AS REAL)");
                }
            }
            (Backend::Postgres, Src::Number(column)) => {
                out.push("CAST(").push(column).push(" AS double precision)");
            }
            (Backend::Sqlite, Src::Number(column)) => {
                out.push("CAST(").push(column).push(" AS REAL)");
            }
            _ => {
                out.push("NULL");
            }
        }
    }

    /// The value as text; only meaningful for strings.
    fn text(&mut self, out: &mut Sql, src: Src<'_>) {
        match (self.backend, src) {
            (Backend::Postgres, Src::Json { .. } | Src::Element) => {
                out.push("(");
                self.json_value(out, src);
                out.push(" #>> '{}')");
            }
            (Backend::Sqlite, Src::Json { column, path }) => {
                out.push("json_extract(")
                    .push(column)
                    .push(", ")
                    .bind(sqlite_path(path))
                    .push(")");
            }
            (Backend::Sqlite, Src::Element) => {
                out.push("el.value");
            }
            (_, Src::Text(column)) => {
                out.push(column);
            }
            (Backend::Postgres, Src::Instant(column)) => {
                out.push("to_char(")
                    .push(column)
                    .push(" AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
            }
            (Backend::Sqlite, Src::Instant(column)) => {
                out.push("(strftime('%Y-%m-%dT%H:%M:%S', ")
                    .push(column)
                    .push(") || '.' || ");
                sqlite_micro_digits(out, column);
                out.push(" || 'Z')");
            }
            _ => {
                out.push("NULL");
            }
        }
    }

    /// `eq` (or `neq` when `equal` is false) against a scalar operand (rules 4 and 5).
    fn equal(&mut self, out: &mut Sql, src: Src<'_>, operand: &Json, equal: bool) {
        let op = if equal { " = " } else { " <> " };
        match operand {
            Json::Null => {
                if equal {
                    self.guarded(out, src, Kind::Null, |_, out| {
                        out.push("TRUE");
                    });
                } else {
                    out.push("FALSE");
                }
            }
            Json::Bool(value) => {
                let wanted = *value == equal;
                match (self.backend, src) {
                    (_, Src::Json { .. } | Src::Element) | (_, Src::Boolean(_)) => {
                        self.guarded(out, src, Kind::Boolean, |this, out| {
                            match (this.backend, src) {
                                (Backend::Postgres, Src::Json { .. } | Src::Element) => {
                                    this.json_value(out, src);
                                    out.push(if wanted {
                                        " = CAST('true' AS jsonb)"
                                    } else {
                                        " = CAST('false' AS jsonb)"
                                    });
                                }
                                (Backend::Sqlite, Src::Json { .. } | Src::Element) => {
                                    this.type_name(out, src);
                                    out.push(if wanted { " = 'true'" } else { " = 'false'" });
                                }
                                (_, Src::Boolean(column)) => {
                                    out.push(column).push(if wanted {
                                        " = TRUE"
                                    } else {
                                        " = FALSE"
                                    });
                                }
                                _ => {
                                    out.push("FALSE");
                                }
                            }
                        });
                    }
                    _ => {
                        out.push("FALSE");
                    }
                }
            }
            Json::Number(number) => match number.as_f64() {
                Some(number) => self.guarded(out, src, Kind::Number, |this, out| {
                    this.number(out, src);
                    out.push(op).bind(number);
                }),
                None => {
                    out.push("FALSE");
                }
            },
            Json::String(text) => self.guarded(out, src, Kind::String, |this, out| {
                this.text(out, src);
                out.push(op).bind(text.clone());
            }),
            Json::Array(_) | Json::Object(_) => {
                out.push("FALSE");
            }
        }
    }

    /// An array value with an element `eq` to the scalar `operand` (rule 8).
    fn array_contains(&mut self, out: &mut Sql, src: Src<'_>, operand: &Json) {
        let Src::Json { column, path } = src else {
            out.push("FALSE");
            return;
        };
        if self.pg() {
            out.push("EXISTS (SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(");
            self.json_value(out, src);
            out.push(") = 'array' THEN ");
            self.json_value(out, src);
            out.push(" END) AS el(x) WHERE ");
        } else {
            out.push("EXISTS (SELECT 1 FROM json_each(")
                .push(column)
                .push(", ")
                .bind(sqlite_path(path))
                .push(") AS el WHERE json_type(")
                .push(column)
                .push(", ")
                .bind(sqlite_path(path))
                .push(") = 'array' AND ");
        }
        self.equal(out, Src::Element, operand, true);
        out.push(")");
    }

    /// The value is a string that is an instant (rule 7), in the order `op` to `instant`.
    fn instant_order(&mut self, out: &mut Sql, src: Src<'_>, op: Op, instant: DateTime<Utc>) {
        let Some(sql_op) = sql_op(op) else {
            out.push("FALSE");
            return;
        };
        match (self.backend, src) {
            (Backend::Postgres, Src::Instant(column)) => {
                out.push("COALESCE(")
                    .push(column)
                    .push(sql_op)
                    .push("CAST(")
                    .bind(instant)
                    .push(" AS timestamptz), FALSE)");
            }
            (Backend::Sqlite, Src::Instant(column)) => {
                out.push("COALESCE(");
                sqlite_micros(out, column);
                out.push(sql_op)
                    .bind(instant.timestamp_micros())
                    .push(", FALSE)");
            }
            (_, Src::Json { .. } | Src::Text(_)) => {
                self.guarded(out, src, Kind::String, |this, out| {
                    // Bind the text once, then test and convert it.
                    out.push("(SELECT ");
                    if this.pg() {
                        pg_instant_test(out, "x.t", sql_op, instant);
                    } else {
                        sqlite_instant_test(out, "x.t", sql_op, instant);
                    }
                    out.push(" FROM (SELECT ");
                    this.text(out, src);
                    out.push(" AS t) AS x)");
                });
            }
            _ => {
                out.push("FALSE");
            }
        }
    }
}

/// The day of month of `t` (validated digits) is at most the length of its month.
fn day_in_month(out: &mut Sql, t: &str) {
    let year = format!("CAST(substr({t}, 1, 4) AS INTEGER)");
    out.push("substr(")
        .push(t)
        .push(", 1, 4) <> '0000' AND CAST(substr(");
    out.push(t).push(", 9, 2) AS INTEGER) <= (CASE substr(");
    out.push(t).push(", 6, 2) WHEN '02' THEN (CASE WHEN (");
    out.push(&year).push(" % 4 = 0 AND ").push(&year);
    out.push(" % 100 <> 0) OR ").push(&year);
    out.push(" % 400 = 0 THEN 29 ELSE 28 END) WHEN '04' THEN 30 WHEN '06' THEN 30 WHEN '09' THEN 30 WHEN '11' THEN 30 ELSE 31 END)");
}

/// PostgreSQL: `t` (text) is an instant and compares `op` to `instant`; never raises.
fn pg_instant_test(out: &mut Sql, t: &str, op: &str, instant: DateTime<Utc>) {
    out.push("CASE WHEN ")
        .push(t)
        .push(" ~ ")
        .push(PG_INSTANT_PATTERN)
        .push(" THEN (CASE WHEN ");
    day_in_month(out, t);
    // The local time minus the offset, as a UTC timestamp without time zone (PostgreSQL's own
    // offsets stop at 15:59, rule 7 allows up to 23:59).
    out.push(" THEN (CAST(left(").push(t);
    out.push(", length(").push(t);
    out.push(") - (CASE WHEN right(").push(t);
    out.push(", 1) = 'Z' THEN 1 ELSE 6 END)) AS timestamp) - (CASE WHEN right(")
        .push(t);
    out.push(", 1) = 'Z' THEN interval '0 minutes' ELSE (CASE WHEN substr(")
        .push(t);
    out.push(", length(").push(t);
    out.push(") - 5, 1) = '-' THEN -1 ELSE 1 END) * (CAST(substr(")
        .push(t);
    out.push(", length(").push(t);
    out.push(") - 4, 2) AS INTEGER) * 60 + CAST(right(").push(t);
    out.push(", 2) AS INTEGER)) * interval '1 minute' END))")
        .push(op)
        .push("CAST(")
        .bind(instant.naive_utc())
        .push(" AS timestamp) ELSE FALSE END) ELSE FALSE END");
}

/// SQLite: the six microsecond digits of a stored timestamp text
/// (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM)`), truncated or padded.
fn sqlite_micro_digits(out: &mut Sql, t: &str) {
    out.push("substr((CASE WHEN substr(").push(t);
    out.push(", 20, 1) = '.' THEN substr(").push(t);
    out.push(", 21, length(").push(t);
    out.push(") - 20 - (CASE WHEN ").push(t);
    out.push(" GLOB '*Z' THEN 1 ELSE 6 END)) ELSE '' END) || '000000', 1, 6)");
}

/// SQLite: microseconds since the Unix epoch of a timestamp text (not validated).
fn sqlite_micros(out: &mut Sql, t: &str) {
    out.push("(CAST(strftime('%s', substr(").push(t);
    out.push(", 1, 19)) AS INTEGER) * 1000000 + CAST(");
    sqlite_micro_digits(out, t);
    out.push(" AS INTEGER) - (CASE WHEN ").push(t);
    out.push(" GLOB '*Z' THEN 0 ELSE (CASE WHEN substr(")
        .push(t);
    out.push(", -6, 1) = '-' THEN -1 ELSE 1 END) * (CAST(substr(")
        .push(t);
    out.push(", -5, 2) AS INTEGER) * 3600 + CAST(substr(")
        .push(t);
    out.push(", -2, 2) AS INTEGER) * 60) * 1000000 END))");
}

/// SQLite: `t` is an instant (rule 7) and compares `op` to `instant`.
fn sqlite_instant_test(out: &mut Sql, t: &str, op: &str, instant: DateTime<Utc>) {
    // The fraction: what lies between the seconds and the zone.
    let fraction =
        format!("substr({t}, 20, length({t}) - 19 - (CASE WHEN {t} GLOB '*Z' THEN 1 ELSE 6 END))");
    out.push("COALESCE(CASE WHEN ").push(t);
    out.push(" GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]*' AND ((");
    out.push(t).push(" GLOB '*Z' AND length(").push(t);
    out.push(") >= 20) OR (length(").push(t);
    out.push(") >= 25 AND substr(").push(t);
    out.push(", -6) GLOB '[+-][0-9][0-9]:[0-9][0-9]' AND substr(")
        .push(t);
    out.push(", -5, 2) <= '23' AND substr(").push(t);
    out.push(", -2, 2) <= '59')) AND (").push(&fraction);
    out.push(" = '' OR (length(").push(&fraction);
    out.push(") BETWEEN 2 AND 7 AND ").push(&fraction);
    out.push(" GLOB '.[0-9]*' AND NOT (substr(").push(&fraction);
    out.push(", 2) GLOB '*[^0-9]*'))) AND substr(").push(t);
    out.push(", 6, 2) BETWEEN '01' AND '12' AND substr(")
        .push(t);
    out.push(", 9, 2) >= '01' AND substr(").push(t);
    out.push(", 12, 2) <= '23' AND substr(").push(t);
    out.push(", 15, 2) <= '59' AND substr(").push(t);
    out.push(", 18, 2) <= '59' THEN (CASE WHEN ");
    day_in_month(out, t);
    out.push(" THEN ");
    sqlite_micros(out, t);
    out.push(op)
        .bind(instant.timestamp_micros())
        .push(" ELSE FALSE END) ELSE FALSE END, FALSE)");
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{Duration, TimeZone};
    use domain::condition::{EventFact, ProfileFacts};
    use domain::TenantId;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::{json, Map};

    use super::*;
    use crate::store::{Store, StoreOptions};

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap() + Duration::nanoseconds(123_456_789)
    }

    fn parse(value: serde_json::Value) -> Condition {
        domain::condition::parse(&value).unwrap()
    }

    #[test]
    fn values_are_bound_never_spliced() {
        let condition = parse(json!({"all": [
            {"trait": "plan.x\"y", "op": "eq", "value": "O'Reilly; DROP TABLE profiles"},
            {"event": "Order Completed", "where": [{"property": "k", "op": "gt", "value": 3}],
             "count": {"gte": 2}, "within": "30d"},
            {"consent": "email"},
            {"stage": "active"},
        ]}));
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let (sql, values) = compile(backend, Uuid::nil(), &condition, now());
            println!("{backend:?}: {sql}\n{values:?}");
            assert!(!sql.contains("O'Reilly"));
            assert!(!sql.contains("plan"));
            assert!(!sql.contains("Order Completed"));
            assert!(!sql.contains("email"));
            assert!(!sql.contains(MARK));
            assert!(sql.contains("GROUP BY e.profile_id"));
            let placeholders = match backend {
                Backend::Sqlite => sql.matches('?').count(),
                Backend::Postgres => (1..=values.len())
                    .filter(|n| sql.contains(&format!("${n}")))
                    .count(),
            };
            assert_eq!(placeholders, values.len());
        }
    }

    #[test]
    fn empty_logic_is_constant() {
        let (sql, _) = compile(
            Backend::Sqlite,
            Uuid::nil(),
            &parse(json!({"any": []})),
            now(),
        );
        assert!(sql.ends_with("AND FALSE ORDER BY p.id"), "{sql}");
        let (sql, _) = compile(
            Backend::Postgres,
            Uuid::nil(),
            &parse(json!({"all": []})),
            now(),
        );
        assert!(sql.ends_with("AND TRUE ORDER BY p.id"), "{sql}");
    }

    #[test]
    fn sqlite_paths_quote_every_key() {
        assert_eq!(sqlite_path(&["a".into(), "b.c".into()]), "$.\"a\".\"b.c\"");
        assert_eq!(sqlite_path(&["q\"k".into()]), "$.\"q\\u0022k\"");
        assert_eq!(sqlite_path(&["b\\s".into()]), "$.\"b\\\\s\"");
    }

    #[test]
    fn instant_fact_text_is_micros_utc() {
        assert_eq!(instant_fact_text(now()), "2026-03-01T12:00:00.123456Z");
    }

    // ---- agreement with Condition::evaluate on a real database ----

    const KEYS: [&str; 8] = ["a", "b", "x.y", "q\"k", "b\\s", "", "$", "é"];

    fn strings() -> Vec<&'static str> {
        vec![
            "",
            "pro",
            "Pro",
            "pr",
            "42",
            "héllo wörld",
            "2026-03-01T12:00:00Z",
            "2026-03-01T12:00:00.123456Z",
            "2026-03-01T12:00:00.123457Z",
            "2026-02-28T23:59:59.999999+23:59",
            "2026-02-27T12:00:00-16:30",
            "2026-02-27T12:00:00+15:59",
            "2026-02-29T00:00:00Z",
            "2024-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2000-02-29T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T10:00:60Z",
            "2026-01-01T10:00:00.1234567Z",
            "2026-01-01T10:00:00.Z",
            "0001-01-01T00:00:00+01:00",
            "0001-01-01T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999-23:59",
            "2026-03-01T11:00:00.5+00:00",
            "2026-13-01T00:00:00Z",
            "2026-00-10T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-04-00T00:00:00Z",
            "2026-01-01t00:00:00z",
            "2026-01-01 00:00:00Z",
            "2026-01-01T00:00:00+24:00",
            "2026-01-01T00:00:00+01:60",
            "2026-01-01T00:00:00+0100",
            "2026-02-26T18:00:00.000000Z",
        ]
    }

    fn scalar(rng: &mut StdRng) -> Json {
        match rng.gen_range(0..10) {
            0 => Json::Null,
            1 => Json::Bool(rng.gen()),
            2 | 3 => [
                json!(0),
                json!(1),
                json!(1.0),
                json!(-2.5),
                json!(42),
                json!(1e20),
                json!(12345678901234567890u64),
                json!(0.1),
                json!(-0.0),
                json!(2),
                json!(3),
            ][rng.gen_range(0..11)]
            .clone(),
            _ => {
                let pool = strings();
                Json::String(pool[rng.gen_range(0..pool.len())].to_owned())
            }
        }
    }

    fn value(rng: &mut StdRng, depth: u32) -> Json {
        match rng.gen_range(0..10) {
            0 if depth < 2 => Json::Array(
                (0..rng.gen_range(0..4))
                    .map(|_| value(rng, depth + 1))
                    .collect(),
            ),
            1 | 2 if depth < 2 => Json::Object(object(rng, depth + 1)),
            _ => scalar(rng),
        }
    }

    fn object(rng: &mut StdRng, depth: u32) -> Map<String, Json> {
        let mut map = Map::new();
        for _ in 0..rng.gen_range(0..5) {
            map.insert(
                KEYS[rng.gen_range(0..KEYS.len())].to_owned(),
                value(rng, depth),
            );
        }
        map
    }

    fn path(rng: &mut StdRng) -> Vec<String> {
        (0..rng.gen_range(1..3))
            .map(|_| KEYS[rng.gen_range(0..KEYS.len())].to_owned())
            .collect()
    }

    fn predicate(rng: &mut StdRng) -> (Op, Operand) {
        let op = Op::ALL[rng.gen_range(0..Op::ALL.len())];
        let operand = match op {
            Op::Exists | Op::NotExists => Operand::Absent,
            Op::Eq | Op::Neq | Op::Contains => Operand::Value(scalar(rng)),
            Op::StartsWith => Operand::Value(Json::String(
                ["", "p", "pr", "pro", "2026-", "hé"][rng.gen_range(0..6)].to_owned(),
            )),
            Op::In => Operand::Value(Json::Array(
                (0..rng.gen_range(0..4)).map(|_| scalar(rng)).collect(),
            )),
            Op::Gt | Op::Gte | Op::Lt | Op::Lte => match rng.gen_range(0..3) {
                0 => Operand::Ago(
                    domain::condition::Window::parse(
                        ["1d", "3d", "12h", "90s", "36500d"][rng.gen_range(0..5)],
                    )
                    .unwrap(),
                ),
                1 => Operand::Value(
                    [
                        json!(0),
                        json!(1),
                        json!(2),
                        json!(3),
                        json!(42),
                        json!(-2.5),
                        json!(1e20),
                        json!(111),
                        json!(555),
                    ][rng.gen_range(0..9)]
                    .clone(),
                ),
                _ => {
                    let pool = strings();
                    Operand::Value(Json::String(pool[rng.gen_range(0..pool.len())].to_owned()))
                }
            },
        };
        (op, operand)
    }

    fn condition(rng: &mut StdRng, depth: u32) -> Condition {
        match rng.gen_range(0..if depth > 2 { 6 } else { 9 }) {
            0 | 1 => {
                let (op, value) = predicate(rng);
                Condition::Trait {
                    path: path(rng),
                    op,
                    value,
                }
            }
            2 => {
                let (op, value) = predicate(rng);
                let name = Attribute::ALL[rng.gen_range(0..Attribute::ALL.len())];
                Condition::Attribute { name, op, value }
            }
            3 => Condition::Event {
                name: match rng.gen_range(0..3) {
                    0 => EventName::Any,
                    1 => EventName::Named("Order".into()),
                    _ => EventName::Named("View".into()),
                },
                filters: (0..rng.gen_range(0..3))
                    .map(|_| {
                        let (op, value) = predicate(rng);
                        PropertyPredicate {
                            path: path(rng),
                            op,
                            value,
                        }
                    })
                    .collect(),
                count: domain::condition::CountComparison {
                    op: CountOp::ALL[rng.gen_range(0..CountOp::ALL.len())],
                    n: rng.gen_range(0..4),
                },
                within: [None, Some("1d"), Some("3d"), Some("90s")][rng.gen_range(0..4)]
                    .map(|w| domain::condition::Window::parse(w).unwrap()),
            },
            4 => Condition::Stage(["active", "lead"][rng.gen_range(0..2)].into()),
            5 => Condition::Consent(["email", "sms"][rng.gen_range(0..2)].into()),
            6 => Condition::All(
                (0..rng.gen_range(0..4))
                    .map(|_| condition(rng, depth + 1))
                    .collect(),
            ),
            7 => Condition::Any(
                (0..rng.gen_range(0..4))
                    .map(|_| condition(rng, depth + 1))
                    .collect(),
            ),
            _ => Condition::Not(Box::new(condition(rng, depth + 1))),
        }
    }

    struct Profile {
        id: Uuid,
        facts: ProfileFacts,
        traits: Map<String, Json>,
        first_seen: DateTime<Utc>,
        last_seen: DateTime<Utc>,
        event_count: i64,
        stage: Option<String>,
        total_revenue: f64,
        order_count: i64,
        rfm: [Option<i32>; 3],
        churn: bool,
        consents: Vec<(String, bool)>,
        events: Vec<(String, DateTime<Utc>, Map<String, Json>)>,
    }

    fn instant_near(rng: &mut StdRng) -> DateTime<Utc> {
        match rng.gen_range(0..8) {
            0 => now() - Duration::days(1),
            1 => now() - Duration::days(3),
            2 => now() - Duration::seconds(90),
            3 => now(),
            4 => now() + Duration::seconds(5),
            _ => {
                now()
                    - Duration::nanoseconds(
                        rng.gen_range(-86_400_000_000_000i64..400_000_000_000_000),
                    )
            }
        }
    }

    fn profile(rng: &mut StdRng) -> Profile {
        let traits = object(rng, 0);
        let first_seen = instant_near(rng) - Duration::days(10);
        let last_seen = instant_near(rng);
        let event_count = rng.gen_range(0..50);
        let stage = [
            None,
            Some("active"),
            Some("lead"),
            Some("2026-01-01T00:00:00Z"),
        ][rng.gen_range(0..4)]
        .map(str::to_owned);
        let total_revenue = [0.0, 1.0, 42.0, -2.5, 0.1][rng.gen_range(0..5)];
        let order_count = rng.gen_range(0..4);
        let rfm = [0, 1, 2].map(|_| {
            if rng.gen_range(0..4) == 0 {
                None
            } else {
                Some(rng.gen_range(1..6))
            }
        });
        let churn = rng.gen();
        let mut consents: Vec<(String, bool)> = Vec::new();
        for purpose in ["email", "sms"] {
            if rng.gen() {
                consents.push((purpose.to_owned(), rng.gen()));
            }
        }
        let events: Vec<_> = (0..rng.gen_range(0..5))
            .map(|_| {
                let name = ["Order", "View", "order"][rng.gen_range(0..3)].to_owned();
                let at = match rng.gen_range(0..4) {
                    0 => now() - Duration::days(1),
                    1 => now() - Duration::days(1) - Duration::nanoseconds(1000),
                    2 => now() + Duration::nanoseconds(500),
                    _ => instant_near(rng),
                };
                (name, at, object(rng, 0))
            })
            .collect();
        let mut attributes = BTreeMap::new();
        attributes.insert(
            Attribute::FirstSeenAt,
            Json::String(instant_fact_text(first_seen)),
        );
        attributes.insert(
            Attribute::LastSeenAt,
            Json::String(instant_fact_text(last_seen)),
        );
        attributes.insert(Attribute::EventCount, json!(event_count));
        attributes.insert(Attribute::TotalRevenue, json!(total_revenue));
        attributes.insert(Attribute::OrderCount, json!(order_count));
        for (name, v) in [
            Attribute::RfmRecency,
            Attribute::RfmFrequency,
            Attribute::RfmMonetary,
        ]
        .into_iter()
        .zip(rfm)
        {
            if let Some(v) = v {
                attributes.insert(name, json!(v));
            }
        }
        if let [Some(r), Some(f), Some(m)] = rfm {
            attributes.insert(Attribute::RfmScore, json!(r * 100 + f * 10 + m));
        }
        attributes.insert(Attribute::ChurnRisk, json!(churn));
        let facts = ProfileFacts {
            traits: traits.clone(),
            attributes,
            stage: stage.clone(),
            consents: consents.iter().cloned().collect(),
            events: events
                .iter()
                .map(|(name, at, properties)| EventFact {
                    name: name.clone(),
                    timestamp: *at,
                    properties: properties.clone(),
                })
                .collect(),
        };
        Profile {
            id: Uuid::new_v4(),
            facts,
            traits,
            first_seen,
            last_seen,
            event_count,
            stage,
            total_revenue,
            order_count,
            rfm,
            churn,
            consents,
            events,
        }
    }

    async fn exec(tx: &TenantTx, backend: Backend, sql: Sql) {
        let (text, values) = sql.render(backend);
        tx.conn()
            .execute_raw(Statement::from_sql_and_values(
                db_backend(backend),
                text,
                values,
            ))
            .await
            .unwrap();
    }

    fn json_param(sql: &mut Sql, backend: Backend, value: &Map<String, Json>) {
        let text = Json::Object(value.clone()).to_string();
        match backend {
            Backend::Postgres => sql.push("CAST(").bind(text).push(" AS jsonb)"),
            Backend::Sqlite => sql.bind(text),
        };
    }

    async fn insert(
        tx: &TenantTx,
        backend: Backend,
        tenant: Uuid,
        p: &Profile,
        merged_into: Option<Uuid>,
    ) {
        let mut sql = Sql::default();
        sql.push("INSERT INTO profiles (tenant_id, id, traits, trait_clock, channels, first_seen_at, last_seen_at, event_count, merged_into, created_at, updated_at, stage, total_revenue, order_count, rfm_recency, rfm_frequency, rfm_monetary, churn_risk) VALUES (")
            .bind(tenant).push(", ").bind(p.id).push(", ");
        json_param(&mut sql, backend, &p.traits);
        sql.push(", ");
        json_param(&mut sql, backend, &Map::new());
        sql.push(", ");
        json_param(&mut sql, backend, &Map::new());
        sql.push(", ")
            .bind(p.first_seen)
            .push(", ")
            .bind(p.last_seen)
            .push(", ")
            .bind(p.event_count)
            .push(", ")
            .bind(merged_into)
            .push(", ")
            .bind(now())
            .push(", ")
            .bind(now())
            .push(", ")
            .bind(p.stage.clone())
            .push(", ")
            .bind(p.total_revenue)
            .push(", ")
            .bind(p.order_count)
            .push(", ")
            .bind(p.rfm[0])
            .push(", ")
            .bind(p.rfm[1])
            .push(", ")
            .bind(p.rfm[2])
            .push(", ")
            .bind(p.churn)
            .push(")");
        exec(tx, backend, sql).await;
        for (purpose, granted) in &p.consents {
            let mut sql = Sql::default();
            sql.push("INSERT INTO consents (tenant_id, profile_id, purpose, granted, updated_at, source) VALUES (")
                .bind(tenant).push(", ").bind(p.id).push(", ").bind(purpose.clone()).push(", ")
                .bind(*granted).push(", ").bind(now()).push(", 'test')");
            exec(tx, backend, sql).await;
        }
        for (name, at, properties) in &p.events {
            let mut sql = Sql::default();
            sql.push("INSERT INTO events (tenant_id, id, profile_id, message_id, type, name, properties, context, \"timestamp\", received_at, channel) VALUES (")
                .bind(tenant).push(", ").bind(Uuid::new_v4()).push(", ").bind(p.id).push(", ")
                .bind(Uuid::new_v4().to_string()).push(", 'track', ").bind(name.clone()).push(", ");
            json_param(&mut sql, backend, properties);
            sql.push(", ");
            json_param(&mut sql, backend, &Map::new());
            sql.push(", ")
                .bind(*at)
                .push(", ")
                .bind(now())
                .push(", 'server')");
            exec(tx, backend, sql).await;
        }
    }

    async fn agreement(store: &Store, seed: u64, datasets: usize, conditions: usize) -> usize {
        let backend = store.backend();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut checked = 0;
        let mut nontrivial = 0;
        for _ in 0..datasets {
            let tenant = Uuid::new_v4();
            let other = Uuid::new_v4();
            let tx = store.begin(TenantId(tenant)).await.unwrap();
            for t in [tenant, other] {
                let mut sql = Sql::default();
                sql.push("INSERT INTO tenants (id, slug, name, settings, created_at) VALUES (")
                    .bind(t)
                    .push(", ")
                    .bind(t.to_string())
                    .push(", 'T', ");
                json_param(&mut sql, backend, &Map::new());
                sql.push(", ").bind(now()).push(")");
                exec(&tx, backend, sql).await;
            }
            let profiles: Vec<Profile> = (0..14).map(|_| profile(&mut rng)).collect();
            for p in &profiles {
                insert(&tx, backend, tenant, p, None).await;
            }
            // A tombstone and another tenant's twin must never match.
            let tomb = profile(&mut rng);
            insert(&tx, backend, tenant, &tomb, Some(profiles[0].id)).await;
            let stranger = profile(&mut rng);
            insert(&tx, backend, other, &stranger, None).await;
            tx.commit().await.unwrap();

            let tx = store.begin(TenantId(tenant)).await.unwrap();
            let mut expected_ids: Vec<Uuid> = profiles.iter().map(|p| p.id).collect();
            expected_ids.sort();
            // Real time evaluates facts loaded from the database: the loader must give the
            // evaluator what the SQL sees (a tombstone is not loaded at all).
            let mut with_tomb = expected_ids.clone();
            with_tomb.push(tomb.id);
            let everything = crate::store::facts::EventNeeds {
                any: true,
                consents: true,
                ..Default::default()
            };
            let loaded = crate::store::facts::load(&tx, &with_tomb, &everything)
                .await
                .unwrap();
            assert_eq!(loaded.len(), profiles.len());
            // Without traits (no condition reads one): the same facts, with no traits.
            let without_traits = crate::store::facts::EventNeeds {
                without_traits: true,
                ..everything.clone()
            };
            let bare = crate::store::facts::load(&tx, &with_tomb, &without_traits)
                .await
                .unwrap();
            assert!(loaded.values().any(|facts| !facts.traits.is_empty()));
            assert_eq!(bare.len(), loaded.len());
            // Events come in no particular order.
            let ordered = |facts: &ProfileFacts| {
                let mut facts = facts.clone();
                facts.events.sort_by_cached_key(|event| {
                    (
                        event.timestamp,
                        event.name.clone(),
                        Json::Object(event.properties.clone()).to_string(),
                    )
                });
                facts
            };
            for (id, facts) in &loaded {
                let mut expected = ordered(facts);
                expected.traits.clear();
                assert_eq!(bare.get(id).map(ordered), Some(expected), "{backend:?}");
            }
            for _ in 0..conditions {
                let c = condition(&mut rng, 1);
                let mut expected: Vec<Uuid> = profiles
                    .iter()
                    .filter(|p| c.evaluate(&p.facts, now()))
                    .map(|p| p.id)
                    .collect();
                expected.sort();
                let mut from_loaded: Vec<Uuid> = loaded
                    .iter()
                    .filter(|(_, facts)| c.evaluate(facts, now()))
                    .map(|(id, _)| *id)
                    .collect();
                from_loaded.sort();
                assert_eq!(
                    from_loaded,
                    expected,
                    "{backend:?}: loaded facts disagree on {}",
                    c.to_json()
                );
                let got = match matching_profiles(&tx, backend, &c, now(), None, None).await {
                    Ok(got) => got,
                    Err(error) => {
                        let (sql, values) = compile(backend, tenant, &c, now());
                        panic!(
                            "{backend:?} failed: {error}\n{}\n{sql}\n{values:?}",
                            c.to_json()
                        );
                    }
                };
                if got != expected {
                    let (sql, values) = compile(backend, tenant, &c, now());
                    for p in &profiles {
                        let e = expected.contains(&p.id);
                        if e != got.contains(&p.id) {
                            eprintln!("profile {} expected {e}: {:?}", p.id, p.facts);
                        }
                    }
                    panic!(
                        "{backend:?} disagrees on {}\n{sql}\n{values:?}",
                        c.to_json()
                    );
                }
                if !expected.is_empty() && expected.len() < profiles.len() {
                    nontrivial += 1;
                }
                let count = count_matching(&tx, backend, &c, now()).await.unwrap();
                assert_eq!(count, expected.len() as u64);
                let only = &expected_ids[..5];
                let limited = matching_profiles(&tx, backend, &c, now(), Some(only), Some(2))
                    .await
                    .unwrap();
                let want: Vec<Uuid> = expected
                    .iter()
                    .filter(|id| only.contains(id))
                    .take(2)
                    .copied()
                    .collect();
                assert_eq!(limited, want);
                checked += 1;
            }
            tx.commit().await.unwrap();
        }
        eprintln!("{backend:?}: {checked} conditions, {nontrivial} split the profiles");
        assert!(nontrivial * 4 > checked);
        checked
    }

    #[tokio::test]
    async fn agrees_with_evaluate_on_sqlite() {
        let store = Store::connect(&StoreOptions {
            url: "sqlite::memory:".into(),
            max_connections: 1,
            min_connections: 1,
        })
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let checked = agreement(&store, 7, 6, 400).await;
        assert_eq!(checked, 2400);
    }

    #[tokio::test]
    async fn agrees_with_evaluate_on_postgres() {
        let checked = crate::store::scratch::on_postgres("cdp_sqlcheck", 2, |store| async move {
            agreement(&store, 11, 6, 400).await
        })
        .await;
        if let Some(checked) = checked {
            assert_eq!(checked, 2400);
        }
    }
}
