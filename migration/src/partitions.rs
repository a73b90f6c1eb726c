//! Time partitions of the events table on PostgreSQL (opt-in: `cdp events partition`), see
//! `docs/adr/0011-event-partitions.md`.
//!
//! The conversion turns `events` into a table partitioned by range of `timestamp`, with one
//! partition per interval, a DEFAULT partition for everything outside the created ranges, the
//! primary key `(tenant_id, id, timestamp)`, and duplicate detection moved to
//! [`MESSAGE_IDS`] (kept by statement triggers on `events`, so that every writer keeps it: the
//! write path, restores, erasure and retention). It also installs the functions the scheduler
//! calls to create partitions ahead and retire expired ones. They are `SECURITY DEFINER`: the
//! service role may not run DDL, the owner of the tables does it on its behalf, and only through
//! these functions.
//!
//! Guarantees: the conversion runs in one transaction and keeps every event and every message
//! id; retiring a partition lowers the event counts of the profiles that lose events and forgets
//! exactly their message ids, in the transaction that drops it.

use sea_orm_migration::sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait,
};

/// The register of message ids of a partitioned events table: `(tenant_id, message_id)` unique.
pub const MESSAGE_IDS: &str = "event_message_ids";

/// The partition that takes every event outside the ranges of the other partitions.
pub const DEFAULT_PARTITION: &str = "events_default";

/// Partitions created ahead of the current interval by the scheduler (and the conversion).
pub const AHEAD: i32 = 3;

/// The width of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Day,
    Week,
    Month,
}

impl Interval {
    /// The unit as PostgreSQL's `date_trunc` and `interval` name it.
    pub fn unit(self) -> &'static str {
        match self {
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
        }
    }

    pub fn parse(text: &str) -> Option<Interval> {
        match text {
            "day" => Some(Interval::Day),
            "week" => Some(Interval::Week),
            "month" => Some(Interval::Month),
            _ => None,
        }
    }
}

/// True when `events` is a partitioned table (PostgreSQL only; never on SQLite).
pub async fn is_partitioned(db: &impl ConnectionTrait) -> Result<bool, DbErr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(false);
    }
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table
                            WHERE partrelid = to_regclass('events'))",
        ))
        .await?;
    Ok(match row {
        Some(row) => row.try_get_by_index::<bool>(0)?,
        None => false,
    })
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversion {
    pub events: i64,
    pub partitions: i64,
}

/// Converts `events` into a partitioned table, in one transaction. Run as the owner of the
/// tables (like the migrations). Fails, changing nothing, when the table is partitioned already.
pub async fn convert_events(
    db: &DatabaseConnection,
    interval: Interval,
) -> Result<Conversion, DbErr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Err(DbErr::Custom(
            "partitioning the events table needs PostgreSQL".to_owned(),
        ));
    }
    let tx = db.begin().await?;
    if is_partitioned(&tx).await? {
        return Err(DbErr::Custom(
            "the events table is partitioned already".to_owned(),
        ));
    }
    tx.execute_unprepared(&functions_sql(interval)).await?;
    tx.execute_unprepared(CONVERT_SQL).await?;
    let row = tx
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT (SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass),
                    (SELECT count(*) FROM events)",
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("no answer".to_owned()))?;
    let partitions: i64 = row.try_get_by_index(0)?;
    let events: i64 = row.try_get_by_index(1)?;
    tx.commit().await?;
    Ok(Conversion { events, partitions })
}

/// The conversion itself (after [`functions_sql`]). The owner is subject to row-level security
/// on these tables (it is forced); it lifts that for itself inside this transaction only, to
/// copy every tenant's rows.
const CONVERT_SQL: &str = r#"
DO $convert$
DECLARE
  index_definitions text[];
  foreign_keys text[];
  statement text;
  name text;
  start timestamptz;
BEGIN
  IF EXISTS (SELECT 1 FROM pg_constraint WHERE confrelid = 'events'::regclass AND contype = 'f') THEN
    RAISE EXCEPTION 'a foreign key references events: a partitioned events table cannot keep it';
  END IF;
  LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
  ALTER TABLE events NO FORCE ROW LEVEL SECURITY;
  ALTER TABLE event_message_ids NO FORCE ROW LEVEL SECURITY;

  -- The secondary indexes and foreign keys, to create again on the partitioned table. The unique
  -- message-id index is replaced by event_message_ids and a plain index.
  SELECT COALESCE(array_agg(pg_get_indexdef(i.indexrelid)), '{}') INTO index_definitions
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
  WHERE i.indrelid = 'events'::regclass AND NOT i.indisprimary
    AND c.relname <> 'ux_events_message_id';
  SELECT COALESCE(array_agg(format('ALTER TABLE events ADD CONSTRAINT %I %s', conname,
                                   pg_get_constraintdef(oid))), '{}')
    INTO foreign_keys
  FROM pg_constraint WHERE conrelid = 'events'::regclass AND contype = 'f';

  ALTER TABLE events RENAME TO events_unpartitioned;
  FOR name IN SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = 'events_unpartitioned'::regclass LOOP
    EXECUTE format('ALTER INDEX %I RENAME TO %I', name, left(name, 40) || '_unpartitioned');
  END LOOP;

  CREATE TABLE events (LIKE events_unpartitioned INCLUDING DEFAULTS)
    PARTITION BY RANGE ("timestamp");
  ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (tenant_id, id, "timestamp");
  CREATE TABLE events_default PARTITION OF events DEFAULT;

  -- One partition per interval that holds events, then the current one and those ahead.
  FOR start IN SELECT DISTINCT cdp_events_interval_start("timestamp") FROM events_unpartitioned LOOP
    PERFORM cdp_events_add_partition(start);
  END LOOP;
  PERFORM cdp_events_create_partitions(now(), 3);

  CREATE TRIGGER events_remember_message_ids AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION cdp_events_remember_message_ids();
  CREATE TRIGGER events_forget_message_ids AFTER DELETE ON events
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION cdp_events_forget_message_ids();

  INSERT INTO events SELECT * FROM events_unpartitioned;
  DROP TABLE events_unpartitioned;

  FOREACH statement IN ARRAY index_definitions LOOP
    EXECUTE statement;
  END LOOP;
  CREATE INDEX ix_events_message_id ON events (tenant_id, message_id);
  FOREACH statement IN ARRAY foreign_keys LOOP
    EXECUTE statement;
  END LOOP;

  ALTER TABLE events ENABLE ROW LEVEL SECURITY;
  ALTER TABLE events FORCE ROW LEVEL SECURITY;
  CREATE POLICY tenant_isolation ON events
    USING (tenant_id = current_setting('app.tenant_id')::uuid)
    WITH CHECK (tenant_id = current_setting('app.tenant_id')::uuid);
  GRANT SELECT, INSERT, UPDATE, DELETE ON events TO cdp_app;
  ALTER TABLE event_message_ids FORCE ROW LEVEL SECURITY;
END
$convert$;
"#;

/// The functions of a partitioned events table, for one interval.
fn functions_sql(interval: Interval) -> String {
    FUNCTIONS_SQL.replace("{unit}", interval.unit())
}

const FUNCTIONS_SQL: &str = r#"
-- The start of the interval that holds a time (UTC).
CREATE OR REPLACE FUNCTION cdp_events_interval_start(at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $fn$
  SELECT date_trunc('{unit}', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
$fn$;

-- Creates the partition of the interval starting at `lo` unless it exists, taking over the
-- rows the DEFAULT partition holds for it (PostgreSQL refuses to attach a range that the default
-- partition has rows of). Rows move between partitions of one table: their message ids stay.
CREATE OR REPLACE FUNCTION cdp_events_add_partition(lo timestamptz) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $fn$
DECLARE
  hi timestamptz := lo + interval '1 {unit}';
  name text := 'events_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD');
BEGIN
  IF to_regclass(name) IS NOT NULL THEN
    RETURN false;
  END IF;
  EXECUTE format('CREATE TABLE %I (LIKE events INCLUDING DEFAULTS)', name);
  EXECUTE format('WITH moved AS (DELETE FROM events_default
                                 WHERE "timestamp" >= $1 AND "timestamp" < $2 RETURNING *)
                  INSERT INTO %I SELECT * FROM moved', name) USING lo, hi;
  EXECUTE format('ALTER TABLE events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                 name, lo, hi);
  RETURN true;
END
$fn$;

-- Creates the partition of the interval holding `at` and the `ahead` next ones.
CREATE OR REPLACE FUNCTION cdp_events_create_partitions(at timestamptz, ahead int) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $fn$
DECLARE
  lo timestamptz := cdp_events_interval_start(at);
  created int := 0;
BEGIN
  FOR i IN 0..ahead LOOP
    IF cdp_events_add_partition(lo) THEN
      created := created + 1;
    END IF;
    lo := lo + interval '1 {unit}';
  END LOOP;
  RETURN created;
END
$fn$;

-- Drops every partition whose whole range is before `cutoff`, and deletes the rows of the
-- DEFAULT partition before it. For every tenant concerned, in this transaction, the profiles'
-- event counts go down by the events they lose and exactly those events' message ids are
-- forgotten (as deleting rows through `events` does). Returns what each profile lost.
-- Row-level security is forced for the owner too: the function names each tenant in
-- app.tenant_id before touching its rows, and restores the caller's setting at the end.
CREATE OR REPLACE FUNCTION cdp_events_retire(cutoff timestamptz)
RETURNS TABLE (partition_name text, tenant uuid, profile uuid, removed bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $fn$
DECLARE
  part record;
  t uuid;
  previous text := current_setting('app.tenant_id', true);
BEGIN
  FOR part IN
    SELECT c.relname::text AS name, b.lo, b.lo + interval '1 {unit}' AS hi
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (
      SELECT to_date(substr(c.relname, 9), 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC' AS lo) b
    WHERE i.inhparent = 'events'::regclass AND c.relname ~ '^events_p[0-9]{8}$'
      AND b.lo + interval '1 {unit}' <= cutoff
    ORDER BY b.lo
  LOOP
    -- Nothing arrives in or leaves the partition between counting and dropping it.
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', part.name);
    FOR t IN EXECUTE format('SELECT DISTINCT tenant_id FROM %I', part.name) LOOP
      PERFORM set_config('app.tenant_id', t::text, true);
      RETURN QUERY EXECUTE format(
        'WITH counted AS (SELECT profile_id, count(*) AS n FROM %I WHERE tenant_id = $1
                          GROUP BY profile_id),
              lowered AS (UPDATE profiles p SET event_count = p.event_count - counted.n
                          FROM counted WHERE p.tenant_id = $1 AND p.id = counted.profile_id
                          RETURNING p.id)
         SELECT %L::text, $1, counted.profile_id, counted.n FROM counted',
        part.name, part.name) USING t;
      DELETE FROM event_message_ids d
      WHERE d.tenant_id = t AND d."timestamp" >= part.lo AND d."timestamp" < part.hi;
    END LOOP;
    EXECUTE format('DROP TABLE %I', part.name);
    partition_name := part.name;
    tenant := NULL;
    profile := NULL;
    removed := 0;
    RETURN NEXT;
  END LOOP;

  FOR t IN SELECT DISTINCT e.tenant_id FROM events_default e WHERE e."timestamp" < cutoff LOOP
    PERFORM set_config('app.tenant_id', t::text, true);
    RETURN QUERY
      WITH gone AS (DELETE FROM events_default e WHERE e.tenant_id = t AND e."timestamp" < cutoff
                    RETURNING e.profile_id, e.message_id),
           forgotten AS (DELETE FROM event_message_ids d USING gone
                         WHERE d.tenant_id = t AND d.message_id = gone.message_id
                         RETURNING d.message_id),
           counted AS (SELECT gone.profile_id, count(*) AS n FROM gone GROUP BY gone.profile_id),
           lowered AS (UPDATE profiles p SET event_count = p.event_count - counted.n
                       FROM counted WHERE p.tenant_id = t AND p.id = counted.profile_id
                       RETURNING p.id)
      SELECT 'events_default'::text, t, counted.profile_id, counted.n FROM counted;
  END LOOP;
  PERFORM set_config('app.tenant_id', COALESCE(previous, ''), true);
END
$fn$;

-- The message-id register follows the rows of `events`: statement triggers, one set-based
-- statement per insert or delete. A message id stored twice fails the insert with a unique
-- violation, as the unique index of an unpartitioned events table does.
CREATE OR REPLACE FUNCTION cdp_events_remember_message_ids() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  INSERT INTO event_message_ids (tenant_id, message_id, "timestamp")
  SELECT tenant_id, message_id, "timestamp" FROM new_rows;
  RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION cdp_events_forget_message_ids() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  DELETE FROM event_message_ids d USING old_rows o
  WHERE d.tenant_id = o.tenant_id AND d.message_id = o.message_id;
  RETURN NULL;
END
$fn$;

REVOKE ALL ON FUNCTION cdp_events_add_partition(timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdp_events_create_partitions(timestamptz, int) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdp_events_retire(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cdp_events_create_partitions(timestamptz, int) TO cdp_app;
GRANT EXECUTE ON FUNCTION cdp_events_retire(timestamptz) TO cdp_app;
"#;
