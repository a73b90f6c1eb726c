//! Customer analytics rules that do not need a database: what counts as an order and what it is
//! worth, and the thresholds of the computed attributes.
//!
//! Guarantees: [`order_value`] is a total, deterministic function of an event's name and
//! properties and never returns a value that is not finite. The store's bulk recomputation
//! (`store::analytics::recompute_order_totals`) applies the same rule in SQL, so the totals that
//! ingestion maintains and the totals recomputed from the events agree.

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Value};

/// The event name of a completed order (the Segment e-commerce spec).
pub const ORDER_COMPLETED: &str = "Order Completed";

/// A profile is at churn risk when the time since it was last seen exceeds this many mean gaps
/// between its events.
pub const CHURN_MULTIPLE: f64 = 3.0;

/// The value of an event as an order, or `None` when the event is not an order.
///
/// An event is an order when its name is exactly [`ORDER_COMPLETED`] (case-sensitive, as event
/// names are everywhere else). Its value is the `revenue` property when that is a JSON number,
/// otherwise the `total` property when that is a JSON number, otherwise 0. Strings are not read as
/// numbers (`"42"` is not a number), and a number that does not fit a finite double counts as
/// absent.
pub fn order_value(event_name: &str, properties: &Map<String, Value>) -> Option<f64> {
    if event_name != ORDER_COMPLETED {
        return None;
    }
    let finite = |key: &str| {
        properties
            .get(key)
            .and_then(Value::as_f64)
            .filter(|value| value.is_finite())
    };
    Some(finite("revenue").or_else(|| finite("total")).unwrap_or(0.0))
}

const MICROSECONDS_PER_DAY: i64 = 86_400 * 1_000_000;

/// Whole days from `last_seen_at` to `now`, as the condition language's `days_since_last_seen`
/// computes them: `floor((now - last_seen_at) / 24 hours)` at microsecond precision, negative
/// when `last_seen_at` lies in the future.
pub fn days_since(now: DateTime<Utc>, last_seen_at: DateTime<Utc>) -> i64 {
    let elapsed = now
        .trunc_subsecs(6)
        .timestamp_micros()
        .saturating_sub(last_seen_at.trunc_subsecs(6).timestamp_micros());
    elapsed.div_euclid(MICROSECONDS_PER_DAY)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn properties(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn an_order_is_worth_its_revenue_then_its_total_then_nothing() {
        let cases = [
            (json!({"revenue": 42.5, "total": 50}), Some(42.5)),
            (json!({"revenue": 0, "total": 50}), Some(0.0)),
            (json!({"revenue": -10, "total": 50}), Some(-10.0)),
            (json!({"total": 50}), Some(50.0)),
            (json!({"revenue": null, "total": 7}), Some(7.0)),
            (json!({"revenue": "42", "total": 7}), Some(7.0)),
            (json!({"revenue": "42", "total": "7"}), Some(0.0)),
            (json!({"revenue": {"amount": 3}}), Some(0.0)),
            (json!({}), Some(0.0)),
            (json!({"Revenue": 9}), Some(0.0)),
        ];
        for (input, expected) in cases {
            assert_eq!(
                order_value(ORDER_COMPLETED, &properties(input.clone())),
                expected,
                "{input}"
            );
        }
    }

    #[test]
    fn only_order_completed_is_an_order() {
        let revenue = properties(json!({"revenue": 10}));
        for name in [
            "order completed",
            "Order Completed ",
            "Order Placed",
            "Checkout Started",
            "",
        ] {
            assert_eq!(order_value(name, &revenue), None, "{name:?}");
        }
        assert_eq!(order_value("Order Completed", &revenue), Some(10.0));
    }

    #[test]
    fn days_since_counts_whole_days_and_floors_the_future() {
        let at = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .map(|instant| instant.with_timezone(&Utc))
                .unwrap_or_default()
        };
        let now = at("2026-03-10T12:00:00Z");
        let cases = [
            ("2026-03-10T12:00:00Z", 0),
            ("2026-03-09T12:00:00.000001Z", 0),
            ("2026-03-09T12:00:00Z", 1),
            ("2026-02-28T00:00:00Z", 10),
            ("2026-03-10T12:00:00.000001Z", -1),
            ("2026-03-12T12:00:00Z", -2),
        ];
        for (last_seen_at, days) in cases {
            assert_eq!(days_since(now, at(last_seen_at)), days, "{last_seen_at}");
        }
    }
}
