//! The connection every statement of a [`super::TenantTx`] runs on: the transaction itself, with
//! one change on SQLite. A `LIMIT ?` or `OFFSET ?` whose value is bound makes SQLite mark the
//! prepared statement as depending on that parameter, and SQLite then re-prepares (parses and
//! plans) it on every execution after a bind, although sqlx keeps it in its statement cache.
//! sea-orm binds every limit, `.one()`'s `LIMIT 1` included, so on SQLite each of those
//! statements was compiled anew on every run: a profile of the read path (`cdp-bench read`)
//! found `sqlite3Reprepare` under about 15 % of the process's CPU.
//!
//! So on SQLite an integer bound to a `LIMIT` or `OFFSET` is written into the SQL text as a
//! literal before the statement is sent. The statement text then varies only with the limit's
//! value (a handful of values per call site), so it stays in sqlx's statement cache and is
//! prepared once per connection and value. PostgreSQL is left as built: it plans each execution
//! anyway (`plan_cache_mode`, see `Store::connect`) and has no such re-preparation.
//!
//! Guarantees: only a bare `?` directly after the keyword `LIMIT` or `OFFSET`, outside quotes,
//! whose value is an integer, is replaced; a statement with numbered or named parameters or
//! with comments is sent unchanged, as is every statement on PostgreSQL.

use std::future::Future;
use std::pin::Pin;

use sea_orm::sea_query::{Value, Values};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, ExecResult, QueryResult, Statement,
    StreamTrait,
};

/// A tenant transaction's connection (see the module documentation).
pub(crate) struct Conn {
    tx: DatabaseTransaction,
}

impl Conn {
    pub(crate) fn new(tx: DatabaseTransaction) -> Conn {
        Conn { tx }
    }

    pub(crate) async fn commit(self) -> Result<(), DbErr> {
        self.tx.commit().await
    }

    fn shape(&self, statement: Statement) -> Statement {
        match ConnectionTrait::get_database_backend(&self.tx) {
            DbBackend::Sqlite => literal_limits(statement),
            _ => statement,
        }
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Conn {
    fn get_database_backend(&self) -> DbBackend {
        ConnectionTrait::get_database_backend(&self.tx)
    }

    async fn execute_raw(&self, statement: Statement) -> Result<ExecResult, DbErr> {
        self.tx.execute_raw(self.shape(statement)).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.tx.execute_unprepared(sql).await
    }

    async fn query_one_raw(&self, statement: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.tx.query_one_raw(self.shape(statement)).await
    }

    async fn query_all_raw(&self, statement: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.tx.query_all_raw(self.shape(statement)).await
    }

    fn support_returning(&self) -> bool {
        self.tx.support_returning()
    }
}

impl StreamTrait for Conn {
    type Stream<'a> = <DatabaseTransaction as StreamTrait>::Stream<'a>;

    fn get_database_backend(&self) -> DbBackend {
        ConnectionTrait::get_database_backend(&self.tx)
    }

    fn stream_raw<'a>(
        &'a self,
        statement: Statement,
    ) -> Pin<Box<dyn Future<Output = Result<Self::Stream<'a>, DbErr>> + 'a + Send>> {
        self.tx.stream_raw(self.shape(statement))
    }
}

/// The integer a bound value holds, if it is one.
fn integer(value: &Value) -> Option<i128> {
    Some(match value {
        Value::TinyInt(Some(n)) => i128::from(*n),
        Value::SmallInt(Some(n)) => i128::from(*n),
        Value::Int(Some(n)) => i128::from(*n),
        Value::BigInt(Some(n)) => i128::from(*n),
        Value::TinyUnsigned(Some(n)) => i128::from(*n),
        Value::SmallUnsigned(Some(n)) => i128::from(*n),
        Value::Unsigned(Some(n)) => i128::from(*n),
        Value::BigUnsigned(Some(n)) => i128::from(*n),
        _ => return None,
    })
}

/// `statement` with every integer bound to a `LIMIT ?` or `OFFSET ?` written as a literal (see
/// the module documentation); unchanged when there is none or the text is not plain `?` SQL.
pub(crate) fn literal_limits(statement: Statement) -> Statement {
    let Some(Values(values)) = &statement.values else {
        return statement;
    };
    let sql = &statement.sql;
    if !(sql.contains("LIMIT ?") || sql.contains("OFFSET ?")) {
        return statement;
    }
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut kept: Vec<Value> = Vec::with_capacity(values.len());
    let mut index = 0;
    let mut quote: Option<u8> = None;
    let mut start = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if let Some(open) = quote {
            if byte == open {
                quote = None;
            }
            continue;
        }
        match byte {
            b'\'' | b'"' | b'`' => quote = Some(byte),
            // Numbered or named parameters, or comments: leave the statement as it is.
            b'$' | b':' | b'@' => return statement,
            b'-' if bytes.get(at + 1) == Some(&b'-') => return statement,
            b'/' if bytes.get(at + 1) == Some(&b'*') => return statement,
            b'?' => {
                if bytes.get(at + 1).is_some_and(u8::is_ascii_digit) {
                    return statement;
                }
                let Some(value) = values.get(index) else {
                    return statement;
                };
                let before = sql[..at].trim_end();
                let keyword = before.ends_with("LIMIT") || before.ends_with("OFFSET");
                match integer(value).filter(|_| keyword) {
                    Some(n) => {
                        out.push_str(&sql[start..at]);
                        out.push_str(&n.to_string());
                        start = at + 1;
                    }
                    None => kept.push(value.clone()),
                }
                index += 1;
            }
            _ => {}
        }
    }
    if quote.is_some() || index != values.len() {
        return statement;
    }
    out.push_str(&sql[start..]);
    Statement {
        sql: out,
        values: Some(Values(kept)),
        db_backend: statement.db_backend,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::entity::profiles;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect, QueryTrait};

    fn sqlite(sql: &str, values: Vec<Value>) -> Statement {
        Statement::from_sql_and_values(DbBackend::Sqlite, sql, values)
    }

    #[test]
    fn a_bound_limit_and_offset_become_literals_and_the_other_values_keep_their_order() {
        let id = uuid::Uuid::new_v4();
        let built = profiles::Entity::find()
            .filter(profiles::Column::Id.eq(id))
            .limit(20)
            .offset(40)
            .build(DbBackend::Sqlite);
        assert!(built.sql.ends_with("LIMIT ? OFFSET ?"), "{}", built.sql);
        let shaped = literal_limits(built.clone());
        assert!(shaped.sql.ends_with("LIMIT 20 OFFSET 40"), "{}", shaped.sql);
        let before = built.values.expect("values").0;
        assert_eq!(shaped.values.expect("values").0, before[..before.len() - 2]);
        assert_eq!(shaped.sql.matches('?').count(), before.len() - 2);
    }

    #[test]
    fn each_branch_of_a_compound_select_gets_its_own_limit() {
        let shaped = literal_limits(sqlite(
            "SELECT * FROM (SELECT * FROM e WHERE p = ? LIMIT ?) UNION ALL \
             SELECT * FROM (SELECT * FROM e WHERE p = ? LIMIT ?)",
            vec![
                "a".into(),
                Value::BigUnsigned(Some(3)),
                "b".into(),
                Value::BigUnsigned(Some(7)),
            ],
        ));
        assert_eq!(
            shaped.sql,
            "SELECT * FROM (SELECT * FROM e WHERE p = ? LIMIT 3) UNION ALL \
             SELECT * FROM (SELECT * FROM e WHERE p = ? LIMIT 7)"
        );
        assert_eq!(
            shaped.values.expect("values").0,
            vec!["a".into(), "b".into()]
        );
    }

    #[test]
    fn quoted_marks_other_parameters_and_non_integers_are_left_alone() {
        let unchanged = [
            // A question mark inside a string is no parameter; the limit still counts as the
            // first one, so this one is rewritten.
            sqlite(
                "SELECT '?' FROM t WHERE a = ? LIMIT ?",
                vec![1.into(), 2.into()],
            ),
            sqlite(
                "SELECT * FROM t WHERE a = $1 LIMIT ?",
                vec![1.into(), 2.into()],
            ),
            sqlite(
                "SELECT * FROM t WHERE a = ?1 LIMIT ?",
                vec![1.into(), 2.into()],
            ),
            sqlite("SELECT * FROM t -- LIMIT ?\n LIMIT ?", vec![2.into()]),
            sqlite("SELECT * FROM t LIMIT ?", vec!["2".into()]),
            sqlite("SELECT * FROM t WHERE a = ?", vec![1.into()]),
        ];
        let shaped: Vec<String> = unchanged
            .iter()
            .map(|statement| literal_limits(statement.clone()).sql)
            .collect();
        assert_eq!(shaped[0], "SELECT '?' FROM t WHERE a = ? LIMIT 2");
        for (statement, shaped) in unchanged.iter().zip(&shaped).skip(1) {
            assert_eq!(&statement.sql, shaped);
        }
    }
}
