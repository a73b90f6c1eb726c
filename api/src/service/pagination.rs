//! Relay-style pagination: `first` is bounded, cursors are opaque.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use uuid::Uuid;

use super::{ServiceError, ServiceResult};

pub const DEFAULT_PAGE: i32 = 50;
pub const MAX_PAGE: i32 = 500;

/// One page of results and what a client needs to fetch the next.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// Each item with its cursor.
    pub items: Vec<(T, String)>,
    pub has_next_page: bool,
    /// How many items the whole listing holds; `None` when the caller did not ask (counting
    /// can read every matching row).
    pub total_count: Option<u64>,
}

impl<T> Page<T> {
    /// A page with nothing on it; its total is 0 when `counted`, else not known.
    pub fn empty(counted: bool) -> Page<T> {
        Page {
            items: Vec::new(),
            has_next_page: false,
            total_count: counted.then_some(0),
        }
    }

    pub fn end_cursor(&self) -> Option<String> {
        self.last_cursor().map(str::to_owned)
    }

    /// The cursor of the last item, borrowed.
    pub fn last_cursor(&self) -> Option<&str> {
        self.items.last().map(|(_, cursor)| cursor.as_str())
    }
}

/// Validates `first` (1..=500).
pub fn page_size(first: Option<i32>) -> ServiceResult<u64> {
    let first = first.unwrap_or(DEFAULT_PAGE);
    if !(0..=MAX_PAGE).contains(&first) {
        return Err(ServiceError::bad_input(
            "first",
            format!("first must be between 0 and {MAX_PAGE}"),
        ));
    }
    Ok(first as u64)
}

pub fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("id:{id}"))
}

pub fn decode_cursor(cursor: Option<&str>) -> ServiceResult<Option<Uuid>> {
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    let invalid = || ServiceError::bad_input("after", "after is not a cursor returned by this API");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let id = text.strip_prefix("id:").ok_or_else(invalid)?;
    Uuid::parse_str(id).map(Some).map_err(|_| invalid())
}

/// Builds a page from rows fetched with `limit + 1`, which tells whether another page follows.
pub fn build_page<R, T>(
    mut rows: Vec<R>,
    limit: u64,
    total_count: Option<u64>,
    id_of: impl Fn(&R) -> Uuid,
    convert: impl Fn(R) -> T,
) -> Page<T> {
    let has_next_page = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let items = rows
        .into_iter()
        .map(|row| {
            let cursor = encode_cursor(id_of(&row));
            (convert(row), cursor)
        })
        .collect();
    Page {
        items,
        has_next_page,
        total_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let id = Uuid::new_v4();
        assert_eq!(decode_cursor(Some(&encode_cursor(id))).unwrap(), Some(id));
        assert!(decode_cursor(Some("not a cursor")).is_err());
        assert!(page_size(Some(501)).is_err());
        assert_eq!(page_size(None).unwrap(), 50);
    }
}
