//! Ready for Citus: the migrated PostgreSQL schema is distributable by `tenant_id`, checked in the
//! catalog (pg_constraint, pg_index, pg_class), and the Citus section of `docs/operations.md`
//! names exactly the tables the catalog has. Citus itself is not installed where these tests run:
//! this holds the schema to the rules Citus imposes on distributed and reference tables, it does
//! not run on Citus.

use std::collections::BTreeSet;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

use crate::support::{postgres_admin_url, Backend, TestDb};

/// Tables without a `tenant_id` column, each with the reason it needs none. On Citus they are
/// reference tables (copied to every worker) or stay on the coordinator.
pub const GLOBAL_TABLES: [(&str, &str); 2] = [
    (
        "tenants",
        "the tenant registry (slug, name, settings); every tenant table references it, so it is \
         a reference table",
    ),
    (
        "seaql_migrations",
        "the migrator's bookkeeping; read only by `cdp migrate` and at startup, stays on the \
         coordinator (a local table)",
    ),
];

/// Indexes of tenant tables that do not lead with `tenant_id`, with the reason. Every request of
/// the service names its tenant; only the background workers' queues are read across tenants.
pub const INDEX_EXCEPTIONS: [(&str, &str); 2] = [
    (
        "ix_email_outbox_due",
        "the outbox worker claims due emails of every tenant at once (a system transaction, \
         FOR UPDATE SKIP LOCKED); on Citus that claim is a multi-shard query (see the Citus \
         section of docs/operations.md)",
    ),
    (
        "ix_webhook_deliveries_due",
        "the webhook worker claims due deliveries of every tenant at once, like the outbox",
    ),
];

/// Rows of one catalog query, as strings.
async fn strings(db: &DatabaseConnection, sql: &str) -> Vec<Vec<String>> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|error| panic!("{error}: {sql}"))
        .into_iter()
        .map(|row| {
            (0..)
                .map_while(|index| row.try_get_by_index::<String>(index).ok())
                .collect()
        })
        .collect()
}

/// The tables of the public schema (partitions excluded: they follow their parent), split into
/// those with a `tenant_id` column and the others.
pub async fn tables(db: &DatabaseConnection) -> (BTreeSet<String>, BTreeSet<String>) {
    let rows = strings(
        db,
        "SELECT c.relname::text,
                CASE WHEN EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                                  AND a.attname = 'tenant_id' AND NOT a.attisdropped)
                     THEN 'tenant' ELSE 'global' END
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
         ORDER BY 1",
    )
    .await;
    let mut tenant = BTreeSet::new();
    let mut global = BTreeSet::new();
    for row in rows {
        if row[1] == "tenant" {
            tenant.insert(row[0].clone());
        } else {
            global.insert(row[0].clone());
        }
    }
    (tenant, global)
}

/// Every way the schema breaks the rules of distribution by `tenant_id`, one line each, naming
/// the table and the constraint or index.
pub async fn violations(db: &DatabaseConnection) -> Vec<String> {
    let (tenant_tables, global_tables) = tables(db).await;
    let mut found = Vec::new();

    let allowed: BTreeSet<&str> = GLOBAL_TABLES.iter().map(|(name, _)| *name).collect();
    for table in &global_tables {
        if !allowed.contains(table.as_str()) {
            found.push(format!(
                "{table}: has no tenant_id column and is not on the list of global tables"
            ));
        }
    }

    // Primary keys: one per tenant table, with tenant_id.
    let keys = strings(
        db,
        "SELECT c.relname::text, COALESCE(k.conname::text, ''), COALESCE(k.contype::text, ''),
                CASE WHEN k.oid IS NULL THEN 'none'
                     WHEN (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = c.oid
                           AND a.attname = 'tenant_id') = ANY (k.conkey) THEN 'yes'
                     ELSE 'no' END
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN pg_constraint k ON k.conrelid = c.oid AND k.contype IN ('p', 'u', 'x')
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
    )
    .await;
    let mut with_primary_key = BTreeSet::new();
    for row in &keys {
        let (table, constraint, kind, has_tenant) = (&row[0], &row[1], &row[2], &row[3]);
        if !tenant_tables.contains(table) {
            continue;
        }
        if kind == "p" {
            with_primary_key.insert(table.clone());
        }
        if has_tenant == "no" {
            let what = match kind.as_str() {
                "p" => "primary key",
                "u" => "unique constraint",
                _ => "exclusion constraint",
            };
            found.push(format!("{table}: {what} {constraint} lacks tenant_id"));
        }
    }
    for table in &tenant_tables {
        if !with_primary_key.contains(table) {
            found.push(format!("{table}: has no primary key"));
        }
    }

    // Indexes, unique or not (the ones behind constraints included): every unique index must
    // hold tenant_id, and every index should lead with it, so that every lookup it serves stays
    // inside one tenant, i.e. on one Citus shard.
    let indexes = strings(
        db,
        "SELECT c.relname::text, i.relname::text,
                CASE WHEN x.indisunique THEN 'unique' ELSE 'plain' END,
                CASE WHEN t.attnum = ANY (x.indkey::int2[]) THEN 'yes' ELSE 'no' END,
                CASE WHEN x.indkey[0] = t.attnum THEN 'yes' ELSE 'no' END
         FROM pg_index x
         JOIN pg_class c ON c.oid = x.indrelid
         JOIN pg_class i ON i.oid = x.indexrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         JOIN pg_attribute t ON t.attrelid = c.oid AND t.attname = 'tenant_id'
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
    )
    .await;
    let exceptions: BTreeSet<&str> = INDEX_EXCEPTIONS.iter().map(|(name, _)| *name).collect();
    for row in &indexes {
        let (table, index, unique, has_tenant, leads) =
            (&row[0], &row[1], &row[2], &row[3], &row[4]);
        if unique == "unique" && has_tenant == "no" {
            found.push(format!("{table}: unique index {index} lacks tenant_id"));
        }
        if leads == "no" && !exceptions.contains(index.as_str()) {
            found.push(format!(
                "{table}: index {index} does not lead with tenant_id (a lookup through it may \
                 cross tenants, i.e. shards)"
            ));
        }
    }

    // Foreign keys: between tenant tables, tenant_id on both sides and paired with each other;
    // from a tenant table to a global one only to `tenants` (a reference table); never from a
    // global table to a tenant table (Citus refuses a reference table pointing at a distributed
    // one).
    let foreign_keys = strings(
        db,
        "SELECT c.relname::text, k.conname::text, p.relname::text,
                CASE WHEN EXISTS (
                    SELECT 1 FROM unnest(k.conkey, k.confkey) AS pair(child, parent)
                    JOIN pg_attribute ca ON ca.attrelid = k.conrelid AND ca.attnum = pair.child
                    JOIN pg_attribute pa ON pa.attrelid = k.confrelid AND pa.attnum = pair.parent
                    WHERE ca.attname = 'tenant_id' AND pa.attname = 'tenant_id')
                     THEN 'yes' ELSE 'no' END
         FROM pg_constraint k
         JOIN pg_class c ON c.oid = k.conrelid
         JOIN pg_class p ON p.oid = k.confrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE k.contype = 'f' AND n.nspname = 'public' AND NOT c.relispartition
           AND k.conparentid = 0",
    )
    .await;
    for row in &foreign_keys {
        let (child, constraint, parent, paired) = (&row[0], &row[1], &row[2], &row[3]);
        match (
            tenant_tables.contains(child),
            tenant_tables.contains(parent),
        ) {
            (true, true) if paired == "no" => found.push(format!(
                "{child}: foreign key {constraint} to {parent} does not pair tenant_id with \
                 tenant_id"
            )),
            (true, false) if parent != "tenants" => found.push(format!(
                "{child}: foreign key {constraint} points at {parent}, which is neither a tenant \
                 table nor the tenants reference table"
            )),
            (false, true) => found.push(format!(
                "{child}: foreign key {constraint} from a global table to the tenant table \
                 {parent}"
            )),
            _ => {}
        }
    }
    found
}

/// The table names listed in a fenced block that follows `marker` in a Markdown text, in order.
fn listed_after(doc: &str, marker: &str) -> Vec<String> {
    let start = doc
        .find(marker)
        .unwrap_or_else(|| panic!("docs/operations.md has no {marker:?}"));
    let rest = &doc[start..];
    let open = rest.find("```").expect("a fenced block after the marker") + 3;
    let body = &rest[open..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let close = body.find("```").expect("the fenced block ends");
    body[..close]
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            // Lines read `SELECT create_distributed_table('profiles', 'tenant_id', ...);`.
            let quoted = line.split('\'').nth(1).unwrap_or(line);
            quoted.to_owned()
        })
        .collect()
}

async fn owner_of_fresh_database() -> Option<(std::sync::Arc<TestDb>, DatabaseConnection)> {
    postgres_admin_url()?;
    let db = TestDb::create(Backend::Postgres).await;
    let owner = Database::connect(&db.owner_url).await.unwrap();
    Some((db, owner))
}

#[tokio::test]
async fn every_tenant_table_is_distributable_by_tenant_id() {
    let Some((_db, owner)) = owner_of_fresh_database().await else {
        eprintln!(
            "skipped: the Citus readiness checks read the PostgreSQL catalog; set \
             CDP_TEST_POSTGRES_URL to run them"
        );
        return;
    };
    let violations = violations(&owner).await;
    assert!(
        violations.is_empty(),
        "the schema is not distributable by tenant_id:\n{}",
        violations.join("\n")
    );
    let (tenant_tables, _) = tables(&owner).await;
    assert!(tenant_tables.contains("events") && tenant_tables.contains("profiles"));
}

#[tokio::test]
async fn the_citus_guide_lists_exactly_the_tables_of_the_catalog() {
    let Some((_db, owner)) = owner_of_fresh_database().await else {
        eprintln!(
            "skipped: the Citus guide is checked against the PostgreSQL catalog; set \
             CDP_TEST_POSTGRES_URL to run it"
        );
        return;
    };
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    let (tenant_tables, global_tables) = tables(&owner).await;
    assert_eq!(
        listed_after(&doc, "<!-- citus:reference -->")
            .into_iter()
            .collect::<BTreeSet<_>>(),
        global_tables
            .iter()
            .filter(|table| *table != "seaql_migrations")
            .cloned()
            .collect::<BTreeSet<_>>(),
        "the reference tables of docs/operations.md differ from the catalog"
    );
    let distributed = listed_after(&doc, "<!-- citus:distributed -->");
    assert_eq!(
        distributed.iter().cloned().collect::<BTreeSet<_>>(),
        tenant_tables,
        "the distributed tables of docs/operations.md differ from the catalog"
    );
    // Parents before children: Citus distributes a table with a foreign key only after the
    // table it references.
    let position = |table: &str| distributed.iter().position(|listed| listed == table);
    for row in strings(
        &owner,
        "SELECT DISTINCT c.relname::text, p.relname::text FROM pg_constraint k
         JOIN pg_class c ON c.oid = k.conrelid JOIN pg_class p ON p.oid = k.confrelid
         WHERE k.contype = 'f' AND c.oid <> p.oid AND NOT c.relispartition",
    )
    .await
    {
        let (child, parent) = (&row[0], &row[1]);
        if let (Some(child_at), Some(parent_at)) = (position(child), position(parent)) {
            assert!(
                parent_at < child_at,
                "docs/operations.md distributes {child} before {parent}, which it references"
            );
        }
    }
}

#[tokio::test]
async fn the_checks_catch_a_table_that_breaks_the_rules() {
    // The checks above must be able to fail: a table keyed without its tenant, a unique index
    // without it and a table that is not on the list are each named.
    let Some((_db, owner)) = owner_of_fresh_database().await else {
        eprintln!("skipped: needs CDP_TEST_POSTGRES_URL");
        return;
    };
    owner
        .execute_unprepared(
            "CREATE TABLE bad_things (tenant_id uuid NOT NULL REFERENCES tenants (id),
                                      id uuid PRIMARY KEY, code text NOT NULL);
             CREATE UNIQUE INDEX ux_bad_things_code ON bad_things (code, tenant_id);
             CREATE TABLE loose_ends (id uuid PRIMARY KEY);
             CREATE TABLE bad_children (tenant_id uuid NOT NULL, id uuid NOT NULL,
                                        thing uuid REFERENCES bad_things (id),
                                        PRIMARY KEY (tenant_id, id));",
        )
        .await
        .unwrap();
    let violations = violations(&owner).await.join("\n");
    for expected in [
        "bad_things: primary key bad_things_pkey lacks tenant_id",
        "bad_things: index ux_bad_things_code does not lead with tenant_id",
        "loose_ends: has no tenant_id column",
        "bad_children: foreign key bad_children_thing_fkey to bad_things does not pair tenant_id",
    ] {
        assert!(
            violations.contains(expected),
            "{expected:?} missing from:\n{violations}"
        );
    }
}
