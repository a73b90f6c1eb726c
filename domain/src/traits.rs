//! Trait merging: per key, the value with the latest message timestamp wins, whatever the arrival
//! order. Ties are broken by message id, so that the outcome never depends on arrival order.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// When a trait key was last set: the message timestamp and message id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    pub at: DateTime<Utc>,
    pub message_id: String,
}

impl Stamp {
    /// The stored form: `RFC3339 with microseconds|message id`.
    pub fn encode(&self) -> Value {
        Value::String(format!(
            "{}|{}",
            self.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            self.message_id
        ))
    }

    pub fn decode(value: &Value) -> Option<Stamp> {
        let (at, message_id) = value.as_str()?.split_once('|')?;
        Some(Stamp {
            at: DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc),
            message_id: message_id.to_owned(),
        })
    }
}

/// Applies `incoming` traits stamped `stamp`; a key changes only when `stamp` is newer than the
/// stamp of its current value. Returns whether anything changed.
pub fn apply(
    traits: &mut Map<String, Value>,
    clock: &mut Map<String, Value>,
    incoming: &Map<String, Value>,
    stamp: &Stamp,
) -> bool {
    let mut changed = false;
    for (key, value) in incoming {
        let newer = clock
            .get(key)
            .and_then(Stamp::decode)
            .is_none_or(|current| *stamp > current);
        if newer {
            if traits.get(key) != Some(value) {
                changed = true;
            }
            traits.insert(key.clone(), value.clone());
            clock.insert(key.clone(), stamp.encode());
        }
    }
    changed
}

/// Merges another profile's traits in, key by key, keeping the newer value of each.
pub fn merge(
    traits: &mut Map<String, Value>,
    clock: &mut Map<String, Value>,
    other_traits: &Map<String, Value>,
    other_clock: &Map<String, Value>,
) {
    for (key, value) in other_traits {
        let theirs = other_clock.get(key).and_then(Stamp::decode);
        let ours = clock.get(key).and_then(Stamp::decode);
        let take = match (&theirs, &ours) {
            (_, None) => true,
            (Some(theirs), Some(ours)) => theirs > ours,
            (None, Some(_)) => false,
        };
        if take {
            traits.insert(key.clone(), value.clone());
            match theirs {
                Some(stamp) => clock.insert(key.clone(), stamp.encode()),
                None => clock.remove(key),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn stamp(minute: u32, id: &str) -> Stamp {
        Stamp {
            at: Utc.with_ymd_and_hms(2026, 1, 1, 0, minute, 0).unwrap(),
            message_id: id.to_owned(),
        }
    }

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_late_message_with_an_older_timestamp_never_overwrites() {
        let mut traits = Map::new();
        let mut clock = Map::new();
        assert!(apply(
            &mut traits,
            &mut clock,
            &object(json!({"plan": "pro", "city": "Oslo"})),
            &stamp(10, "b")
        ));
        assert!(!apply(
            &mut traits,
            &mut clock,
            &object(json!({"plan": "free"})),
            &stamp(5, "a")
        ));
        apply(
            &mut traits,
            &mut clock,
            &object(json!({"city": "Bergen", "age": 30})),
            &stamp(20, "c"),
        );
        assert_eq!(
            Value::Object(traits),
            json!({"plan": "pro", "city": "Bergen", "age": 30})
        );
    }

    #[test]
    fn merging_keeps_the_newest_value_per_key() {
        let (mut a, mut a_clock) = (Map::new(), Map::new());
        apply(
            &mut a,
            &mut a_clock,
            &object(json!({"plan": "pro", "city": "Oslo"})),
            &stamp(10, "a"),
        );
        let (mut b, mut b_clock) = (Map::new(), Map::new());
        apply(
            &mut b,
            &mut b_clock,
            &object(json!({"plan": "enterprise", "phone": "+4712345678"})),
            &stamp(20, "b"),
        );
        apply(
            &mut b,
            &mut b_clock,
            &object(json!({"city": "Bergen"})),
            &stamp(5, "c"),
        );
        merge(&mut a, &mut a_clock, &b, &b_clock);
        assert_eq!(
            Value::Object(a),
            json!({"plan": "enterprise", "city": "Oslo", "phone": "+4712345678"})
        );
        assert_eq!(
            Stamp::decode(&stamp(3, "x|y").encode()),
            Some(stamp(3, "x|y"))
        );
    }
}
