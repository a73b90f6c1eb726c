//! Reading and writing a tenant's rows of any table, for backups: the tables come from the
//! database catalog (every table with a `tenant_id` column), and every value is typed by its
//! column's type, so that rows move between SQLite and PostgreSQL unchanged.
//!
//! Guarantees: rows are read, deleted and inserted only through a [`TenantTx`] and filtered by
//! its tenant; every inserted row takes its `tenant_id` from the transaction; the table and column
//! names written into SQL come from the catalog of the database at hand, never from a file; every
//! value is a bound parameter.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use domain::TenantId;
use futures::StreamExt;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Order, Query};
use sea_orm::{
    AccessMode, ConnectionTrait, DbBackend, IsolationLevel, QueryResult, Statement, StreamTrait,
    TransactionOptions, TransactionTrait, Value,
};
use uuid::Uuid;

use super::entity::tenants;
use super::{Backend, Store, StoreError, StoreResult, TenantTx};

/// The column that makes a table a tenant table.
pub const TENANT_COLUMN: &str = "tenant_id";

/// The registry of tenants, which every tenant table references and which is not a tenant table.
const TENANTS: &str = "tenants";

/// Bound parameters per insert statement: well under the limits of both databases (SQLite 32766,
/// PostgreSQL 65535).
const PARAMETERS_PER_STATEMENT: usize = 8_000;

/// The type of a column, as far as a backup cares: one variant per kind of value, whatever the
/// database calls it (`uuid` on PostgreSQL is `uuid_text`, stored as a blob, on SQLite).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    Uuid,
    Text,
    Boolean,
    /// `bits` is the width the database stores (16, 32 or 64); SQLite's integers are 64 bits.
    Integer {
        bits: u8,
    },
    /// `bits` is 32 or 64.
    Float {
        bits: u8,
    },
    Json,
    /// A timestamp with a time zone, read and written in UTC.
    Timestamp,
    Bytes,
    /// A type backups do not handle; the name is the database's.
    Other(String),
}

impl ColumnType {
    /// Maps a catalog type name: PostgreSQL's `pg_type.typname`, or SQLite's declared type as
    /// SeaORM's schema builder writes it.
    fn from_catalog(backend: Backend, declared: &str) -> ColumnType {
        let declared = declared.trim().to_ascii_lowercase();
        match backend {
            Backend::Postgres => match declared.as_str() {
                "uuid" => ColumnType::Uuid,
                "text" | "varchar" | "bpchar" | "citext" | "name" => ColumnType::Text,
                "bool" => ColumnType::Boolean,
                "int2" => ColumnType::Integer { bits: 16 },
                "int4" => ColumnType::Integer { bits: 32 },
                "int8" => ColumnType::Integer { bits: 64 },
                "float4" => ColumnType::Float { bits: 32 },
                "float8" => ColumnType::Float { bits: 64 },
                "json" | "jsonb" => ColumnType::Json,
                "timestamptz" => ColumnType::Timestamp,
                "bytea" => ColumnType::Bytes,
                _ => ColumnType::Other(declared),
            },
            // The order of the tests matters: `uuid_text`, `jsonb_text` and
            // `timestamp_with_timezone_text` all contain `text`.
            Backend::Sqlite => {
                if declared.contains("uuid") {
                    ColumnType::Uuid
                } else if declared.contains("json") {
                    ColumnType::Json
                } else if declared.starts_with("timestamp_with_timezone")
                    || declared == "timestamptz"
                {
                    ColumnType::Timestamp
                } else if declared.contains("time") || declared.contains("date") {
                    ColumnType::Other(declared)
                } else if declared.starts_with("bool") {
                    ColumnType::Boolean
                } else if declared.contains("int") {
                    ColumnType::Integer { bits: 64 }
                } else if declared.starts_with("double")
                    || declared.starts_with("float")
                    || declared.starts_with("real")
                {
                    ColumnType::Float { bits: 64 }
                } else if declared.contains("char")
                    || declared.contains("text")
                    || declared.contains("clob")
                {
                    ColumnType::Text
                } else if declared.contains("blob") || declared.contains("binary") {
                    ColumnType::Bytes
                } else {
                    ColumnType::Other(declared)
                }
            }
        }
    }
}

/// A column of a tenant table (never `tenant_id`, which the transaction supplies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub column_type: ColumnType,
    pub nullable: bool,
    /// True when the database fills the column when an insert leaves it out.
    pub has_default: bool,
}

/// A tenant table as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    /// The columns in their declared order, without `tenant_id`.
    pub columns: Vec<Column>,
    /// The primary key's columns after `tenant_id`, in key order.
    pub primary_key: Vec<String>,
    /// The other tenant tables this one references by a foreign key.
    pub parents: BTreeSet<String>,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|column| column.name == name)
    }
}

/// One value of a row, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Uuid(Uuid),
    Text(String),
    Boolean(bool),
    Integer(i64),
    Float(f64),
    Json(serde_json::Value),
    Timestamp(DateTime<Utc>),
    Bytes(Vec<u8>),
}

/// Opens a read-only transaction of one tenant that sees one consistent snapshot of every table
/// (REPEATABLE READ on PostgreSQL; on SQLite a read transaction in WAL mode already does).
pub async fn begin_snapshot(store: &Store, tenant_id: TenantId) -> StoreResult<TenantTx> {
    let options = match store.backend {
        Backend::Postgres => TransactionOptions {
            isolation_level: Some(IsolationLevel::RepeatableRead),
            access_mode: Some(AccessMode::ReadOnly),
            sqlite_transaction_mode: None,
        },
        Backend::Sqlite => TransactionOptions {
            isolation_level: None,
            access_mode: None,
            sqlite_transaction_mode: None,
        },
    };
    let tx = store.db.begin_with_options(options).await?;
    store.bind_tenant(&tx, tenant_id, false).await?;
    Ok(TenantTx::new(tx, tenant_id, store.origin))
}

fn db_backend(tx: &TenantTx) -> DbBackend {
    ConnectionTrait::get_database_backend(tx.conn())
}

/// Every tenant table of the database (every table with a `tenant_id` column), parents before
/// children: inserting in this order and deleting in the reverse order satisfies every foreign
/// key. Ties are broken by name, so the order is the same on every database with this schema.
pub async fn tenant_tables(tx: &TenantTx) -> StoreResult<Vec<Table>> {
    let backend = tx.backend();
    let (columns_sql, foreign_keys_sql) = match backend {
        Backend::Sqlite => (
            r#"SELECT m.name, p.name, p.type, p."notnull", p.dflt_value IS NOT NULL, p.pk
               FROM sqlite_master m JOIN pragma_table_info(m.name) p
               WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'
               ORDER BY m.name, p.cid"#,
            r#"SELECT m.name, f."table"
               FROM sqlite_master m JOIN pragma_foreign_key_list(m.name) f
               WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'"#,
        ),
        // The system catalogs, not information_schema: they list every table whatever the
        // current role may read, so that no tenant table can hide from a backup.
        Backend::Postgres => (
            "SELECT c.relname::text, a.attname::text, t.typname::text,
                    CASE WHEN a.attnotnull THEN 1 ELSE 0 END,
                    CASE WHEN a.atthasdef THEN 1 ELSE 0 END,
                    COALESCE(array_position(i.indkey::int2[], a.attnum), 0)::int4
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
               AND NOT c.relispartition
             ORDER BY c.relname, a.attnum",
            "SELECT c.relname::text, p.relname::text
             FROM pg_constraint k
             JOIN pg_class c ON c.oid = k.conrelid
             JOIN pg_class p ON p.oid = k.confrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE k.contype = 'f' AND n.nspname = current_schema()",
        ),
    };
    let db_backend = db_backend(tx);
    let rows = tx
        .conn()
        .query_all_raw(Statement::from_string(db_backend, columns_sql))
        .await?;
    let mut tables: BTreeMap<String, Table> = BTreeMap::new();
    let mut keys: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    let mut has_tenant_column: BTreeSet<String> = BTreeSet::new();
    for row in rows {
        let table: String = row.try_get_by_index(0)?;
        let name: String = row.try_get_by_index(1)?;
        let declared: String = row.try_get_by_index(2)?;
        let not_null: i64 = integer_at(&row, 3)?;
        let has_default: i64 = integer_at(&row, 4)?;
        let key_position: i64 = integer_at(&row, 5)?;
        let entry = tables.entry(table.clone()).or_insert_with(|| Table {
            name: table.clone(),
            columns: Vec::new(),
            primary_key: Vec::new(),
            parents: BTreeSet::new(),
        });
        if name == TENANT_COLUMN {
            has_tenant_column.insert(table);
            continue;
        }
        if key_position > 0 {
            keys.entry(table)
                .or_default()
                .push((key_position, name.clone()));
        }
        entry.columns.push(Column {
            name,
            column_type: ColumnType::from_catalog(backend, &declared),
            nullable: not_null == 0,
            has_default: has_default != 0,
        });
    }
    tables.retain(|name, _| has_tenant_column.contains(name));
    for (table, mut columns) in keys {
        if let Some(entry) = tables.get_mut(&table) {
            columns.sort();
            entry.primary_key = columns.into_iter().map(|(_, name)| name).collect();
        }
    }
    let foreign_keys = tx
        .conn()
        .query_all_raw(Statement::from_string(db_backend, foreign_keys_sql))
        .await?;
    for row in foreign_keys {
        let child: String = row.try_get_by_index(0)?;
        let parent: String = row.try_get_by_index(1)?;
        if child != parent && parent != TENANTS && tables.contains_key(&parent) {
            if let Some(entry) = tables.get_mut(&child) {
                entry.parents.insert(parent);
            }
        }
    }
    parents_first(tables)
}

/// SQLite returns its pragma flags as integers of any width; PostgreSQL as `int4`.
fn integer_at(row: &QueryResult, index: usize) -> StoreResult<i64> {
    row.try_get_by_index::<i64>(index)
        .or_else(|_| row.try_get_by_index::<i32>(index).map(i64::from))
        .map_err(StoreError::from)
}

/// Orders tables so that every table comes after the tables it references (Kahn's algorithm,
/// smallest name first among the ready ones).
fn parents_first(mut tables: BTreeMap<String, Table>) -> StoreResult<Vec<Table>> {
    let mut ordered = Vec::with_capacity(tables.len());
    let mut placed: BTreeSet<String> = BTreeSet::new();
    while !tables.is_empty() {
        let ready = tables
            .values()
            .find(|table| table.parents.iter().all(|parent| placed.contains(parent)))
            .map(|table| table.name.clone());
        let Some(name) = ready else {
            let names: Vec<&str> = tables.keys().map(String::as_str).collect();
            return Err(StoreError::corrupt(format!(
                "the foreign keys of these tenant tables form a cycle: {}",
                names.join(", ")
            )));
        };
        if let Some(table) = tables.remove(&name) {
            placed.insert(name);
            ordered.push(table);
        }
    }
    Ok(ordered)
}

/// The number of the tenant's rows in a table.
pub async fn count_rows(tx: &TenantTx, table: &Table) -> StoreResult<u64> {
    let query = Query::select()
        .expr(Expr::cust("COUNT(*)"))
        .from(Alias::new(&table.name))
        .and_where(Expr::col(Alias::new(TENANT_COLUMN)).eq(tx.tenant_id().as_uuid()))
        .to_owned();
    let row = tx.conn().query_one(&query).await?;
    let count = match row {
        Some(row) => integer_at(&row, 0)?,
        None => 0,
    };
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Streams the tenant's rows of a table, in primary-key order, one `Vec<Cell>` per row in the
/// order of `table.columns`, to `each`; returns the number of rows. Rows are not collected, so a
/// table of any size takes constant memory.
pub async fn read_rows<E>(
    tx: &TenantTx,
    table: &Table,
    mut each: impl FnMut(Vec<Cell>) -> Result<(), E>,
) -> Result<u64, E>
where
    E: From<StoreError>,
{
    let backend = tx.backend();
    if let Some(column) = table
        .columns
        .iter()
        .find(|column| matches!(column.column_type, ColumnType::Other(_)))
    {
        return Err(E::from(unsupported(table, column)));
    }
    let mut query = Query::select();
    query.from(Alias::new(&table.name));
    for column in &table.columns {
        query.column(Alias::new(&column.name));
    }
    query.and_where(Expr::col(Alias::new(TENANT_COLUMN)).eq(tx.tenant_id().as_uuid()));
    for key in &table.primary_key {
        query.order_by(Alias::new(key), Order::Asc);
    }
    let statement = db_backend(tx).build(&query);
    let mut stream = tx
        .conn()
        .stream_raw(statement)
        .await
        .map_err(|error| E::from(StoreError::from(error)))?;
    let mut count = 0;
    while let Some(row) = stream.next().await {
        let row = row.map_err(|error| E::from(StoreError::from(error)))?;
        let mut cells = Vec::with_capacity(table.columns.len());
        for (index, column) in table.columns.iter().enumerate() {
            cells.push(read_cell(&row, index, table, column, backend).map_err(E::from)?);
        }
        each(cells)?;
        count += 1;
    }
    Ok(count)
}

fn unsupported(table: &Table, column: &Column) -> StoreError {
    let ColumnType::Other(name) = &column.column_type else {
        return StoreError::corrupt("a supported column reported as unsupported");
    };
    StoreError::corrupt(format!(
        "column {}.{} has the type {name}, which backups do not handle yet",
        table.name, column.name
    ))
}

fn read_cell(
    row: &QueryResult,
    index: usize,
    table: &Table,
    column: &Column,
    backend: Backend,
) -> StoreResult<Cell> {
    fn cell<T>(value: Option<T>, wrap: impl FnOnce(T) -> Cell) -> Cell {
        value.map_or(Cell::Null, wrap)
    }
    let read = || -> Result<Cell, sea_orm::DbErr> {
        Ok(match (&column.column_type, backend) {
            // The service binds uuids, which SQLite stores as 16-byte blobs; a uuid written as text
            // by hand is read too.
            (ColumnType::Uuid, Backend::Sqlite) => {
                match row.try_get_by_index::<Option<Uuid>>(index) {
                    Ok(value) => cell(value, Cell::Uuid),
                    Err(blob_error) => {
                        let text: Option<String> = row.try_get_by_index(index)?;
                        match text {
                            None => Cell::Null,
                            Some(text) => {
                                Cell::Uuid(Uuid::parse_str(&text).map_err(|_| blob_error)?)
                            }
                        }
                    }
                }
            }
            (ColumnType::Uuid, Backend::Postgres) => {
                cell(row.try_get_by_index::<Option<Uuid>>(index)?, Cell::Uuid)
            }
            (ColumnType::Text, _) => cell(row.try_get_by_index(index)?, Cell::Text),
            (ColumnType::Boolean, _) => cell(row.try_get_by_index(index)?, Cell::Boolean),
            (ColumnType::Integer { bits: 16 }, Backend::Postgres) => {
                cell(row.try_get_by_index::<Option<i16>>(index)?, |value| {
                    Cell::Integer(i64::from(value))
                })
            }
            (ColumnType::Integer { bits: 32 }, Backend::Postgres) => {
                cell(row.try_get_by_index::<Option<i32>>(index)?, |value| {
                    Cell::Integer(i64::from(value))
                })
            }
            (ColumnType::Integer { .. }, _) => cell(row.try_get_by_index(index)?, Cell::Integer),
            (ColumnType::Float { bits: 32 }, Backend::Postgres) => {
                cell(row.try_get_by_index::<Option<f32>>(index)?, |value| {
                    Cell::Float(f64::from(value))
                })
            }
            (ColumnType::Float { .. }, _) => cell(row.try_get_by_index(index)?, Cell::Float),
            (ColumnType::Json, _) => cell(row.try_get_by_index(index)?, Cell::Json),
            (ColumnType::Timestamp, _) => cell(row.try_get_by_index(index)?, Cell::Timestamp),
            (ColumnType::Bytes, _) => cell(row.try_get_by_index(index)?, Cell::Bytes),
            (ColumnType::Other(_), _) => Cell::Null,
        })
    };
    read().map_err(|error| {
        StoreError::corrupt(format!(
            "cannot read {}.{} as {:?}: {error}",
            table.name, column.name, column.column_type
        ))
    })
}

/// Deletes the tenant's rows of a table; returns how many.
pub async fn delete_rows(tx: &TenantTx, table: &Table) -> StoreResult<u64> {
    let delete = Query::delete()
        .from_table(Alias::new(&table.name))
        .and_where(Expr::col(Alias::new(TENANT_COLUMN)).eq(tx.tenant_id().as_uuid()))
        .to_owned();
    Ok(tx.conn().execute(&delete).await?.rows_affected())
}

/// What an insert does with a row that conflicts with one already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExisting {
    /// The insert fails.
    Fail,
    /// The row is left out, and the existing one kept (`ON CONFLICT DO NOTHING`).
    Keep,
}

/// Inserts rows into a table for the transaction's tenant. Every row holds one cell per column of
/// `columns` (columns of `table`; those left out take their default). Returns the number of rows
/// inserted, which with [`OnExisting::Keep`] leaves out the conflicting ones.
pub async fn insert_rows(
    tx: &TenantTx,
    table: &Table,
    columns: &[&Column],
    rows: &[Vec<Cell>],
    on_existing: OnExisting,
) -> StoreResult<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let tenant = tx.tenant_id().as_uuid();
    let per_statement = (PARAMETERS_PER_STATEMENT / (columns.len() + 1)).max(1);
    let mut inserted = 0;
    let row_bytes = |row: &Vec<Cell>| {
        row.iter()
            .map(|cell| match cell {
                Cell::Text(text) => text.len(),
                Cell::Json(value) => domain::json::text_len(value),
                Cell::Bytes(bytes) => bytes.len(),
                _ => super::wire::FIXED,
            })
            .sum::<usize>()
    };
    for chunk in super::wire::chunks(tx, rows, per_statement, row_bytes) {
        let mut insert = Query::insert();
        insert.into_table(Alias::new(&table.name)).columns(
            std::iter::once(TENANT_COLUMN)
                .chain(columns.iter().map(|column| column.name.as_str()))
                .map(Alias::new),
        );
        for row in chunk {
            if row.len() != columns.len() {
                return Err(StoreError::corrupt(format!(
                    "a row of {} has {} values for {} columns",
                    table.name,
                    row.len(),
                    columns.len()
                )));
            }
            let mut values: Vec<Expr> = Vec::with_capacity(columns.len() + 1);
            values.push(Expr::val(tenant));
            for (value, column) in row.iter().zip(columns) {
                values.push(Expr::val(bind(value, table, column)?));
            }
            insert.values(values).map_err(|error| {
                StoreError::corrupt(format!(
                    "cannot build an insert into {}: {error}",
                    table.name
                ))
            })?;
        }
        if on_existing == OnExisting::Keep {
            insert.on_conflict(OnConflict::new().do_nothing().to_owned());
        }
        inserted += tx.conn().execute(&insert).await?.rows_affected();
    }
    Ok(inserted)
}

/// The value to bind for a cell in a column, converted to the column's type (an integer to the
/// column's width, for example). NULLs are typed, as PostgreSQL wants.
fn bind(cell: &Cell, table: &Table, column: &Column) -> StoreResult<Value> {
    let mismatch = || {
        StoreError::corrupt(format!(
            "{}.{} is {:?}; the value {cell:?} does not fit",
            table.name, column.name, column.column_type
        ))
    };
    Ok(match (&column.column_type, cell) {
        (ColumnType::Uuid, Cell::Null) => Option::<Uuid>::None.into(),
        (ColumnType::Uuid, Cell::Uuid(value)) => (*value).into(),
        (ColumnType::Text, Cell::Null) => Option::<String>::None.into(),
        (ColumnType::Text, Cell::Text(value)) => value.clone().into(),
        (ColumnType::Boolean, Cell::Null) => Option::<bool>::None.into(),
        (ColumnType::Boolean, Cell::Boolean(value)) => (*value).into(),
        (ColumnType::Integer { bits: 16 }, Cell::Null) => Option::<i16>::None.into(),
        (ColumnType::Integer { bits: 16 }, Cell::Integer(value)) => {
            i16::try_from(*value).map_err(|_| mismatch())?.into()
        }
        (ColumnType::Integer { bits: 32 }, Cell::Null) => Option::<i32>::None.into(),
        (ColumnType::Integer { bits: 32 }, Cell::Integer(value)) => {
            i32::try_from(*value).map_err(|_| mismatch())?.into()
        }
        (ColumnType::Integer { .. }, Cell::Null) => Option::<i64>::None.into(),
        (ColumnType::Integer { .. }, Cell::Integer(value)) => (*value).into(),
        (ColumnType::Float { bits: 32 }, Cell::Null) => Option::<f32>::None.into(),
        // A float4 read from PostgreSQL widens exactly, so narrowing it again is exact too.
        #[allow(clippy::cast_possible_truncation)]
        (ColumnType::Float { bits: 32 }, Cell::Float(value)) => (*value as f32).into(),
        (ColumnType::Float { .. }, Cell::Null) => Option::<f64>::None.into(),
        (ColumnType::Float { .. }, Cell::Float(value)) => (*value).into(),
        (ColumnType::Json, Cell::Null) => Option::<serde_json::Value>::None.into(),
        (ColumnType::Json, Cell::Json(value)) => value.clone().into(),
        (ColumnType::Timestamp, Cell::Null) => Option::<DateTime<Utc>>::None.into(),
        (ColumnType::Timestamp, Cell::Timestamp(value)) => (*value).into(),
        (ColumnType::Bytes, Cell::Null) => Option::<Vec<u8>>::None.into(),
        (ColumnType::Bytes, Cell::Bytes(value)) => value.clone().into(),
        (ColumnType::Other(_), _) => return Err(unsupported(table, column)),
        _ => return Err(mismatch()),
    })
}

/// The tenant registry's row of a tenant, as a backup records it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRecord {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub settings: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Creates the transaction's tenant with the record's slug, name, settings and creation time, or,
/// when it exists, sets its name and settings (its slug and creation time stay). Returns true
/// when it created the tenant. Fails with `Conflict` when another tenant has the slug.
pub async fn put_tenant(tx: &TenantTx, record: &TenantRecord) -> StoreResult<bool> {
    use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, NotSet, QueryFilter, Set};
    let tenant = tx.tenant_id().as_uuid();
    let existing = tenants::Entity::find_by_id(tenant).one(tx.conn()).await?;
    if existing.is_some() {
        tenants::Entity::update_many()
            .col_expr(tenants::Column::Name, Expr::value(record.name.clone()))
            .col_expr(
                tenants::Column::Settings,
                Expr::value(record.settings.clone()),
            )
            .filter(tenants::Column::Id.eq(tenant))
            .exec(tx.conn())
            .await?;
        return Ok(false);
    }
    tenants::ActiveModel {
        id: Set(tenant),
        slug: Set(record.slug.clone()),
        name: Set(record.name.clone()),
        settings: Set(record.settings.clone()),
        created_at: Set(record.created_at),
        // The database's default; the restored definitions' triggers raise it.
        definitions_version: NotSet,
    }
    .insert(tx.conn())
    .await
    .map_err(|error| StoreError::unique_as_conflict(error, "another tenant has this slug"))?;
    Ok(true)
}

/// The transaction's tenant as a backup records it.
pub async fn tenant_record(tx: &TenantTx) -> StoreResult<TenantRecord> {
    let row = super::tenants::get(tx).await?;
    Ok(TenantRecord {
        id: row.id,
        slug: row.slug,
        name: row.name,
        settings: row.settings,
        created_at: row.created_at,
    })
}

/// Looks tables up by name.
pub fn by_name(tables: &[Table]) -> HashMap<&str, &Table> {
    tables
        .iter()
        .map(|table| (table.name.as_str(), table))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, parents: &[&str]) -> Table {
        Table {
            name: name.to_owned(),
            columns: Vec::new(),
            primary_key: Vec::new(),
            parents: parents.iter().map(|parent| (*parent).to_owned()).collect(),
        }
    }

    #[test]
    fn parents_come_before_their_children_and_ties_go_by_name() {
        let tables: BTreeMap<String, Table> = [
            table("segment_members", &["segments", "profiles"]),
            table("profiles", &[]),
            table("events", &["profiles"]),
            table("segments", &[]),
            table("audit_log", &[]),
        ]
        .into_iter()
        .map(|table| (table.name.clone(), table))
        .collect();
        let order: Vec<String> = parents_first(tables)
            .unwrap()
            .into_iter()
            .map(|table| table.name)
            .collect();
        assert_eq!(
            order,
            [
                "audit_log",
                "profiles",
                "events",
                "segments",
                "segment_members"
            ]
        );
    }

    #[test]
    fn a_cycle_of_foreign_keys_is_an_error() {
        let tables: BTreeMap<String, Table> = [table("a", &["b"]), table("b", &["a"])]
            .into_iter()
            .map(|table| (table.name.clone(), table))
            .collect();
        assert!(parents_first(tables).is_err());
    }

    #[test]
    fn sqlite_declared_types_map_to_what_seaorm_writes() {
        let cases = [
            ("uuid_text", ColumnType::Uuid),
            ("jsonb_text", ColumnType::Json),
            ("json_text", ColumnType::Json),
            ("timestamp_with_timezone_text", ColumnType::Timestamp),
            (
                "timestamp_text",
                ColumnType::Other("timestamp_text".to_owned()),
            ),
            ("boolean", ColumnType::Boolean),
            ("integer", ColumnType::Integer { bits: 64 }),
            ("double", ColumnType::Float { bits: 64 }),
            ("float", ColumnType::Float { bits: 64 }),
            ("text", ColumnType::Text),
            ("varchar(20)", ColumnType::Text),
            ("blob", ColumnType::Bytes),
            ("varbinary_blob", ColumnType::Bytes),
        ];
        for (declared, expected) in cases {
            assert_eq!(
                ColumnType::from_catalog(Backend::Sqlite, declared),
                expected,
                "{declared}"
            );
        }
    }
}
