//! Properties of the condition language: every valid condition survives a trip through its JSON
//! form, parsing and evaluation never panic, and evaluation depends only on what
//! `Condition::dependencies` says it depends on.
#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Duration, FixedOffset, SecondsFormat, TimeZone, Utc};
use domain::condition::{
    parse, Attribute, Condition, CountComparison, CountOp, EventFact, EventName, Op, Operand,
    ProfileFacts, PropertyPredicate, Window, MAX_NODES,
};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Map, Value};

const KEYS: [&str; 5] = ["a", "b", "c", "plan", "tags"];
const EVENT_NAMES: [&str; 3] = ["Order Completed", "Page Viewed", "Signed Up"];
const STAGES: [&str; 3] = ["new", "active", "dormant"];
const PURPOSES: [&str; 2] = ["email_marketing", "sms"];

fn base_now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

/// Seconds from `base_now`: mostly the last two months, where windows and `now` move answers,
/// sometimes up to about a year back.
fn offset_seconds() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => -60 * 86_400i64..2 * 86_400,
        1 => -400 * 86_400i64..-60 * 86_400,
    ]
}

/// An instant near `base_now`, written with or without fractions and offsets.
fn instant_text() -> impl Strategy<Value = String> {
    (offset_seconds(), 0..1_000_000i64, 0..3usize, -12..14i32).prop_map(
        |(seconds, micros, format, offset_hours)| {
            let instant = base_now() + Duration::seconds(seconds) + Duration::microseconds(micros);
            let offset = FixedOffset::east_opt(offset_hours * 3600).unwrap();
            match format {
                0 => instant.to_rfc3339_opts(SecondsFormat::Secs, true),
                1 => instant.to_rfc3339_opts(SecondsFormat::Micros, true),
                _ => instant
                    .with_timezone(&offset)
                    .to_rfc3339_opts(SecondsFormat::Millis, false),
            }
        },
    )
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3..4i64).prop_map(Value::from),
        select(vec![-2.5f64, 0.5, 1.0, 3.0]).prop_map(Value::from),
        select(vec!["", "a", "ab", "pro", "1", "Paris"]).prop_map(Value::from),
        instant_text().prop_map(Value::from),
    ]
}

fn window() -> impl Strategy<Value = Window> {
    prop_oneof![
        (1..60i64).prop_map(Duration::days),
        (60..400i64).prop_map(Duration::days),
        (1..2000i64).prop_map(Duration::hours),
        (1..100_000i64).prop_map(Duration::seconds),
    ]
    .prop_map(|duration| Window::from_duration(duration).unwrap())
}

fn path() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(select(KEYS.to_vec()).prop_map(str::to_owned), 1..3)
}

/// An operator with an operand it takes.
fn comparison() -> impl Strategy<Value = (Op, Operand)> {
    let order_op = select(vec![Op::Gt, Op::Gte, Op::Lt, Op::Lte]);
    prop_oneof![
        select(vec![Op::Exists, Op::NotExists]).prop_map(|op| (op, Operand::Absent)),
        (select(vec![Op::Eq, Op::Neq, Op::Contains]), scalar())
            .prop_map(|(op, value)| (op, Operand::Value(value))),
        select(vec!["", "a", "P", "pro", "2026"])
            .prop_map(|prefix| (Op::StartsWith, Operand::Value(Value::from(prefix)))),
        prop::collection::vec(scalar(), 0..4)
            .prop_map(|items| (Op::In, Operand::Value(Value::Array(items)))),
        (
            order_op,
            prop_oneof![
                (-3..40i64).prop_map(|n| Operand::Value(Value::from(n))),
                Just(Operand::Value(Value::from(0.5))),
                instant_text().prop_map(|text| Operand::Value(Value::from(text))),
                window().prop_map(Operand::Ago),
            ]
        ),
    ]
}

fn leaf() -> impl Strategy<Value = Condition> {
    let event_name = prop_oneof![
        3 => select(EVENT_NAMES.to_vec()).prop_map(|name| EventName::Named(name.to_owned())),
        1 => Just(EventName::Any),
    ];
    let predicate = (path(), comparison()).prop_map(|(path, (op, value))| PropertyPredicate {
        path,
        op,
        value,
    });
    let count =
        (select(CountOp::ALL.to_vec()), 0..4u32).prop_map(|(op, n)| CountComparison { op, n });
    prop_oneof![
        (path(), comparison()).prop_map(|(path, (op, value))| Condition::Trait { path, op, value }),
        (select(Attribute::ALL.to_vec()), comparison())
            .prop_map(|(name, (op, value))| Condition::Attribute { name, op, value }),
        (
            event_name,
            prop::collection::vec(predicate, 0..3),
            prop_oneof![Just(CountComparison::default()), count],
            prop::option::of(window()),
        )
            .prop_map(|(name, filters, count, within)| Condition::Event {
                name,
                filters,
                count,
                within,
            }),
        select(STAGES.to_vec()).prop_map(|stage| Condition::Stage(stage.to_owned())),
        select(PURPOSES.to_vec()).prop_map(|purpose| Condition::Consent(purpose.to_owned())),
    ]
}

/// Leaves about time, mixed with ordinary leaves: a condition that ignores time must not move.
fn timely_leaf() -> impl Strategy<Value = Condition> {
    let order_op = || select(vec![Op::Gt, Op::Gte, Op::Lt, Op::Lte]);
    let number = (-3..60i64).prop_map(|n| Operand::Value(Value::from(n)));
    let instant_operand = prop_oneof![
        window().prop_map(Operand::Ago),
        instant_text().prop_map(|text| Operand::Value(Value::from(text))),
    ];
    let seen = select(vec![Attribute::FirstSeenAt, Attribute::LastSeenAt]);
    let count =
        (select(CountOp::ALL.to_vec()), 0..3u32).prop_map(|(op, n)| CountComparison { op, n });
    prop_oneof![
        (order_op(), number).prop_map(|(op, value)| Condition::Attribute {
            name: Attribute::DaysSinceLastSeen,
            op,
            value,
        }),
        (seen, order_op(), instant_operand.clone())
            .prop_map(|(name, op, value)| Condition::Attribute { name, op, value }),
        (path(), order_op(), instant_operand).prop_map(|(path, op, value)| Condition::Trait {
            path,
            op,
            value
        }),
        (
            select(EVENT_NAMES.to_vec()),
            count,
            prop::option::of(window())
        )
            .prop_map(|(name, count, within)| Condition::Event {
                name: EventName::Named(name.to_owned()),
                filters: Vec::new(),
                count,
                within,
            }),
        leaf(),
    ]
}

fn nodes(condition: &Condition) -> usize {
    match condition {
        Condition::All(items) | Condition::Any(items) => 1 + items.iter().map(nodes).sum::<usize>(),
        Condition::Not(inner) => 1 + nodes(inner),
        Condition::Event { filters, .. } => 1 + filters.len(),
        _ => 1,
    }
}

/// A valid condition: at most six levels deep and within the node limit.
fn condition() -> impl Strategy<Value = Condition> {
    leaf()
        .prop_recursive(5, 48, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Condition::All),
                prop::collection::vec(inner.clone(), 0..4).prop_map(Condition::Any),
                inner.prop_map(|inner| Condition::Not(Box::new(inner))),
            ]
        })
        .prop_filter("within the node limit", |condition| {
            nodes(condition) <= MAX_NODES
        })
}

/// A JSON value for traits and properties: scalars, arrays and one level of objects.
fn fact_value() -> impl Strategy<Value = Value> {
    let flat = prop_oneof![
        4 => scalar(),
        1 => prop::collection::vec(scalar(), 0..3).prop_map(Value::Array),
    ];
    prop_oneof![
        4 => flat.clone(),
        1 => prop::collection::btree_map(select(KEYS.to_vec()), flat, 0..3).prop_map(|map| {
            Value::Object(map.into_iter().map(|(key, value)| (key.to_owned(), value)).collect())
        }),
    ]
}

fn fact_map() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(select(KEYS.to_vec()), fact_value(), 0..5).prop_map(|map| {
        map.into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect()
    })
}

fn facts() -> impl Strategy<Value = ProfileFacts> {
    let attribute_value = prop_oneof![
        1 => (-3..40i64).prop_map(Value::from),
        1 => Just(Value::from(0.5)),
        3 => instant_text().prop_map(Value::from),
        1 => Just(Value::from("active")),
    ];
    let event = (select(EVENT_NAMES.to_vec()), offset_seconds(), fact_map()).prop_map(
        |(name, seconds, properties)| EventFact {
            name: name.to_owned(),
            timestamp: base_now() + Duration::seconds(seconds),
            properties,
        },
    );
    (
        fact_map(),
        prop::collection::btree_map(select(Attribute::ALL.to_vec()), attribute_value, 0..6),
        prop::option::of(select(STAGES.to_vec()).prop_map(str::to_owned)),
        prop::collection::btree_map(
            select(PURPOSES.to_vec()).prop_map(str::to_owned),
            any::<bool>(),
            0..3,
        ),
        prop::collection::vec(event, 0..8),
    )
        .prop_map(
            |(traits, attributes, stage, consents, events)| ProfileFacts {
                traits,
                attributes,
                stage,
                consents,
                events,
            },
        )
}

/// Facts dense in instants near `base_now`: every trait is an instant (or an object of instants),
/// the seen times are instants and events carry no properties, so that leaves about time often
/// find something whose answer moves with `now`.
fn timely_facts() -> impl Strategy<Value = ProfileFacts> {
    let instant = || instant_text().prop_map(Value::from);
    let trait_value = prop_oneof![
        instant(),
        prop::collection::btree_map(select(KEYS.to_vec()), instant(), 3).prop_map(|map| {
            Value::Object(
                map.into_iter()
                    .map(|(key, value)| (key.to_owned(), value))
                    .collect(),
            )
        }),
    ];
    let traits = prop::collection::vec(trait_value, KEYS.len()).prop_map(|values| {
        KEYS.iter()
            .map(|key| key.to_string())
            .zip(values)
            .collect::<Map<String, Value>>()
    });
    let event =
        (select(EVENT_NAMES.to_vec()), offset_seconds()).prop_map(|(name, seconds)| EventFact {
            name: name.to_owned(),
            timestamp: base_now() + Duration::seconds(seconds),
            properties: Map::new(),
        });
    (
        traits,
        instant(),
        instant(),
        prop::collection::vec(event, 0..8),
    )
        .prop_map(|(traits, first_seen, last_seen, events)| ProfileFacts {
            traits,
            attributes: [
                (Attribute::FirstSeenAt, first_seen),
                (Attribute::LastSeenAt, last_seen),
            ]
            .into_iter()
            .collect(),
            events,
            ..ProfileFacts::default()
        })
}

fn any_facts() -> impl Strategy<Value = ProfileFacts> {
    prop_oneof![facts(), timely_facts()]
}

fn now() -> impl Strategy<Value = DateTime<Utc>> {
    (-30 * 86_400i64..30 * 86_400, 0..1_000_000_000i64).prop_map(|(seconds, nanos)| {
        base_now() + Duration::seconds(seconds) + Duration::nanoseconds(nanos)
    })
}

/// Arbitrary JSON built from the words of the language, to reach deep into the parser.
fn fuzz_json() -> impl Strategy<Value = Value> {
    let words = vec![
        "all",
        "any",
        "not",
        "trait",
        "attribute",
        "event",
        "stage",
        "consent",
        "op",
        "value",
        "where",
        "count",
        "within",
        "property",
        "ago",
        "gte",
        "eq",
        "in",
        "exists",
        "30d",
        "P1D",
        "$any",
        "a.b",
        "rfm_score",
        "2026-01-01T00:00:00Z",
    ];
    let leaf = prop_oneof![
        scalar(),
        select(words.clone()).prop_map(Value::from),
        (-2..300i64).prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 64, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(select(words.clone()), inner, 0..4).prop_map(|map| {
                Value::Object(
                    map.into_iter()
                        .map(|(key, value)| (key.to_owned(), value))
                        .collect(),
                )
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_valid_condition_survives_a_trip_through_json_and_text(condition in condition()) {
        let json = condition.to_json();
        prop_assert_eq!(parse(&json), Ok(condition.clone()));
        let text = serde_json::to_string(&json).unwrap();
        let reread: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(parse(&reread), Ok(condition));
    }

    #[test]
    fn evaluation_never_panics_and_not_inverts_it(
        condition in condition(),
        facts in facts(),
        now in now(),
    ) {
        let holds = condition.evaluate(&facts, now);
        let negated = Condition::Not(Box::new(condition.clone()));
        prop_assert_eq!(negated.evaluate(&facts, now), !holds);
        let reparsed = parse(&condition.to_json()).unwrap();
        prop_assert_eq!(reparsed.evaluate(&facts, now), holds);
    }

    #[test]
    fn a_condition_that_is_not_time_dependent_gives_the_same_answer_at_any_time(
        condition in condition(),
        facts in any_facts(),
        now in now(),
        later in now(),
    ) {
        if !condition.dependencies().time_dependent {
            prop_assert_eq!(condition.evaluate(&facts, now), condition.evaluate(&facts, later));
        }
    }

    #[test]
    fn a_single_leaf_that_is_not_time_dependent_gives_the_same_answer_at_any_time(
        condition in timely_leaf(),
        facts in any_facts(),
        now in now(),
        later in now(),
    ) {
        if !condition.dependencies().time_dependent {
            prop_assert_eq!(condition.evaluate(&facts, now), condition.evaluate(&facts, later));
        }
    }

    #[test]
    fn facts_a_condition_does_not_depend_on_do_not_change_its_answer(
        condition in condition(),
        facts in facts(),
        now in now(),
        value in fact_value(),
        timestamp_seconds in offset_seconds(),
    ) {
        let dependencies = condition.dependencies();
        let holds = condition.evaluate(&facts, now);
        let mut changed = facts.clone();
        for key in KEYS {
            if !dependencies.trait_keys.contains(key) {
                changed.traits.insert(key.to_owned(), value.clone());
            }
        }
        for name in EVENT_NAMES {
            if !dependencies.depends_on_event(name) {
                changed.events.push(EventFact {
                    name: name.to_owned(),
                    timestamp: base_now() + Duration::seconds(timestamp_seconds),
                    properties: Map::new(),
                });
            }
        }
        if !dependencies.depends_on_stage() {
            changed.stage = Some("elsewhere".to_owned());
        }
        for purpose in PURPOSES {
            if !dependencies.consent_purposes.contains(purpose) {
                changed.consents.insert(purpose.to_owned(), true);
            }
        }
        for attribute in Attribute::ALL {
            if !dependencies.attributes.contains(&attribute) {
                changed.attributes.insert(attribute, json!(7));
            }
        }
        prop_assert_eq!(condition.evaluate(&changed, now), holds);
    }

    #[test]
    fn parsing_arbitrary_json_never_panics_and_what_parses_round_trips(json in fuzz_json()) {
        if let Ok(condition) = parse(&json) {
            prop_assert_eq!(parse(&condition.to_json()), Ok(condition));
        }
    }
}

#[test]
fn the_generators_produce_time_dependent_leaves_whose_answer_moves_with_now() {
    // Without such leaves the time-dependence properties above could not fail.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut moved = 0;
    for _ in 0..1000 {
        let condition = timely_leaf().new_tree(&mut runner).unwrap().current();
        let facts = timely_facts().new_tree(&mut runner).unwrap().current();
        let earlier = base_now() - Duration::days(30);
        let later = base_now() + Duration::days(30);
        if condition.evaluate(&facts, earlier) != condition.evaluate(&facts, later) {
            assert!(condition.dependencies().time_dependent, "{condition:?}");
            moved += 1;
        }
    }
    assert!(moved > 100, "only {moved} leaves moved with now");
}

#[test]
fn the_generators_produce_deep_conditions_and_conditions_that_hold() {
    // Guards the generators themselves: properties over trivial inputs would prove nothing.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut deepest = 0;
    let mut held = 0;
    let mut failed = 0;
    for _ in 0..500 {
        let condition = condition().new_tree(&mut runner).unwrap().current();
        let facts = facts().new_tree(&mut runner).unwrap().current();
        deepest = deepest.max(depth(&condition));
        if condition.evaluate(&facts, base_now()) {
            held += 1;
        } else {
            failed += 1;
        }
    }
    assert!(deepest >= 4, "deepest generated condition: {deepest}");
    assert!(held > 50 && failed > 50, "held {held}, failed {failed}");
}

fn depth(condition: &Condition) -> usize {
    match condition {
        Condition::All(items) | Condition::Any(items) => {
            1 + items.iter().map(depth).max().unwrap_or(0)
        }
        Condition::Not(inner) => 1 + depth(inner),
        _ => 1,
    }
}
