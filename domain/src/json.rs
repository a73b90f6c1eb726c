//! JSON written out as text, measured and walked without copying.
//!
//! `Value::to_string` goes through `fmt::Display`, which hands every token to a formatter through
//! a dynamic call: about two and a half times the time of `serde_json::to_string`, which appends
//! to one buffer. The write path writes every event's properties and context, every profile's
//! traits and every sealed value this way, so these helpers are what it uses.

use serde::Serialize;
use serde_json::{Map, Value};

/// `value` as JSON text.
pub fn text(value: &Value) -> String {
    infallible_text(value)
}

/// An object, given by its map, as JSON text.
pub fn object_text(map: &Map<String, Value>) -> String {
    infallible_text(map)
}

/// Only for JSON trees: their object keys are strings, so writing them into a `String` cannot
/// fail (serde_json fails only on a map key that is not a string, or on a failing writer).
fn infallible_text<T: Serialize + ?Sized>(value: &T) -> String {
    #[allow(clippy::expect_used)]
    serde_json::to_string(value).expect("a JSON tree serializes")
}

/// The length of `value` written as JSON, without writing it anywhere.
pub fn text_len(value: &Value) -> usize {
    counted(value)
}

/// [`text_len`] of an object given by its map.
pub fn object_text_len(map: &Map<String, Value>) -> usize {
    counted(map)
}

/// Only for JSON trees, as [`infallible_text`].
fn counted<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // A sink that never fails, and a tree that always serializes: nothing to report.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Nesting depth: 0 for a scalar, 1 for a flat array or object.
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => object_depth(map),
        _ => 0,
    }
}

/// [`depth`] of an object given by its map.
pub fn object_depth(map: &Map<String, Value>) -> usize {
    1 + map.values().map(depth).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_and_its_length_agree_with_display() {
        for value in [
            json!(null),
            json!("a \"quoted\" é\u{1}"),
            json!({"b": [1, 2.5, {"c": null}], "a": true}),
            json!([]),
            json!({"a": [1, "é\"x", null], "b": {"c": 2.5}}),
        ] {
            assert_eq!(text(&value), value.to_string());
            assert_eq!(text_len(&value), value.to_string().len());
            if let Some(map) = value.as_object() {
                assert_eq!(object_text_len(map), value.to_string().len());
            }
        }
    }

    #[test]
    fn depth_counts_levels_of_arrays_and_objects() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!({"a": [1, {"b": {}}]})), 4);
        let map = json!({"a": {"b": 1}});
        assert_eq!(object_depth(map.as_object().unwrap()), 2);
        assert_eq!(object_text(map.as_object().unwrap()), map.to_string());
    }
}
