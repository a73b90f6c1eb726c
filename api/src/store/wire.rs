//! How many rows one multi-row statement carries, so that on PostgreSQL a statement never waits
//! on the network.
//!
//! The driver (sqlx 0.9.0) leaves Nagle's algorithm on for its TCP connections
//! (transact-rs/sqlx#4335; fixed after 0.9.0, not yet released). A statement that does not fit in
//! the socket's send buffer at once (16 KiB when a connection starts) goes out in two writes, and
//! the second waits for the server's delayed acknowledgement of the first: 40 ms on Linux, inside
//! the transaction and its locks. A 100-event batch, about 150 KiB with its sealed contexts,
//! waited that long in every batch; so did the upsert of a batch's profiles (their traits and
//! trait clocks) and the insert of their sealed identities. Statements of at most
//! [`STATEMENT_BYTES`] go out in one write. On SQLite there is no network, and only the row
//! count bounds a statement (the limit of bound variables).
//!
//! The store now turns `TCP_NODELAY` on for its connections (`super::nodelay`), so where that
//! works no statement waits whatever its size; the bound stays for a process where it cannot
//! (a seccomp profile that filters `pidfd_getfd`), and costs about 3 % of ingestion where it can
//! (docs/PERFORMANCE.md).

use super::TenantTx;

/// Bytes of bound values one statement carries at most on PostgreSQL.
pub const STATEMENT_BYTES: usize = 12 * 1024;

/// `rows` cut into runs of at most `max_rows` rows and, on PostgreSQL, at most
/// [`STATEMENT_BYTES`] by `bytes` (a row larger than that alone is a run of its own).
pub(super) fn chunks<'a, T>(
    tx: &TenantTx,
    rows: &'a [T],
    max_rows: usize,
    bytes: impl Fn(&T) -> usize,
) -> Vec<&'a [T]> {
    cut(rows, max_rows, bound(tx), bytes)
}

/// Bytes one statement of `tx` may carry: [`STATEMENT_BYTES`] on PostgreSQL, no bound on SQLite.
pub(super) fn bound(tx: &TenantTx) -> usize {
    if tx.backend() == super::Backend::Postgres {
        STATEMENT_BYTES
    } else {
        usize::MAX
    }
}

/// [`chunks`], owning: the rows moved into one vector per statement, so that building the
/// statements clones no row.
pub(super) fn owned_chunks<T>(
    tx: &TenantTx,
    rows: Vec<T>,
    max_rows: usize,
    bytes: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let lengths: Vec<usize> = chunks(tx, &rows, max_rows, bytes)
        .iter()
        .map(|run| run.len())
        .collect();
    let mut rows = rows.into_iter();
    lengths
        .into_iter()
        .map(|length| rows.by_ref().take(length).collect())
        .collect()
}

pub(super) fn cut<T>(
    rows: &[T],
    max_rows: usize,
    limit: usize,
    bytes: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let (mut start, mut size) = (0, 0usize);
    for (index, row) in rows.iter().enumerate() {
        let row_bytes = if limit == usize::MAX { 0 } else { bytes(row) };
        let full = index - start >= max_rows.max(1) || size.saturating_add(row_bytes) > limit;
        if index > start && full {
            runs.push(&rows[start..index]);
            (start, size) = (index, 0);
        }
        size = size.saturating_add(row_bytes);
    }
    if start < rows.len() {
        runs.push(&rows[start..]);
    }
    runs
}

/// A JSON value bound as its text, written out once.
///
/// Bound as a `serde_json::Value`, a JSON column's value is cloned whole twice before the driver
/// writes it (the statement builder collects its values, then sea-orm's adapter to sqlx copies
/// them again), and each copy is dropped again: in ingestion, about a tenth of the service
/// process's CPU went to copying and freeing the trees of event properties, contexts and profile
/// traits (docs/PERFORMANCE.md). A string is copied flat. PostgreSQL receives the same text it
/// would have parsed from the binary `jsonb` format (a version byte and the text), through
/// `CAST($n AS jsonb)`; SQLite stores JSON as text either way.
#[derive(Debug, Clone)]
pub struct JsonText(String);

impl JsonText {
    pub fn of(value: &serde_json::Value) -> Self {
        JsonText(domain::json::text(value))
    }

    /// The text itself, for a statement that binds it as an array element.
    pub fn into_string(self) -> String {
        self.0
    }

    /// Its length on the wire, as [`domain::json::text_len`] counts it.
    pub fn bytes(&self) -> usize {
        self.0.len()
    }

    /// The value to put in a statement for `backend`.
    pub fn into_expr(self, backend: sea_orm::DbBackend) -> sea_orm::sea_query::Expr {
        use sea_orm::sea_query::{Expr, ExprTrait};
        match backend {
            sea_orm::DbBackend::Postgres => Expr::val(self.0).cast_as("jsonb"),
            _ => Expr::val(self.0),
        }
    }
}

/// A fixed-size value (a UUID, an instant, a number, a flag) as bound: at most 16 bytes and its
/// length word.
pub(super) const FIXED: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_respect_both_bounds_and_keep_every_row_in_order() {
        let rows: Vec<usize> = vec![5, 5, 5, 20, 1, 1, 1, 1, 1];
        let runs = cut(&rows, 3, 10, |size| *size);
        assert_eq!(
            runs,
            vec![
                &[5, 5][..],
                &[5][..],
                &[20][..],
                &[1, 1, 1][..],
                &[1, 1][..]
            ]
        );
        let unbounded = cut(&rows, 4, usize::MAX, |size| *size);
        assert_eq!(
            unbounded,
            vec![&[5, 5, 5, 20][..], &[1, 1, 1, 1][..], &[1][..]]
        );
        assert!(cut(&Vec::<usize>::new(), 3, 10, |size| *size).is_empty());
    }
}
