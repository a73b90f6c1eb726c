//! Property: identity resolution and trait merging do not depend on arrival order. Any order of
//! the same conflict-free messages ends in the same profiles (as sets of identifiers) with the
//! same traits.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use chrono::{TimeZone, Utc};
use domain::identity::{IdentityGraph, IdentityKey, IdentityRules, ANONYMOUS_ID, EMAIL, USER_ID};
use domain::traits::{self, Stamp};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// A profile's traits and their clock.
type TraitState = (Map<String, Value>, Map<String, Value>);

#[derive(Debug, Clone)]
struct TestMessage {
    identities: Vec<IdentityKey>,
    traits: Map<String, Value>,
    stamp: Stamp,
}

const USERS: u32 = 3;

/// A message of one person: every identifier it carries belongs to the same user, so that no two
/// user ids ever meet (conflicts are first-come by design and tested separately).
fn message() -> impl Strategy<Value = (u32, u32, u32, bool, bool, u32, u32)> {
    (
        0..USERS,
        0..4u32,
        0..2u32,
        any::<bool>(),
        any::<bool>(),
        0..3u32,
        0..1000u32,
    )
}

fn build(
    index: usize,
    (user, anon, email, with_user, with_email, trait_value, minute): (
        u32,
        u32,
        u32,
        bool,
        bool,
        u32,
        u32,
    ),
) -> TestMessage {
    let mut identities = vec![IdentityKey::new(
        ANONYMOUS_ID,
        format!("anon-{user}-{anon}"),
    )];
    if with_user {
        identities.push(IdentityKey::new(USER_ID, format!("user-{user}")));
    }
    if with_email {
        identities.push(IdentityKey::new(
            EMAIL,
            format!("u{user}-{email}@example.com"),
        ));
    }
    let key = if trait_value % 2 == 0 { "plan" } else { "city" };
    let traits = json!({ key: format!("value-{trait_value}-{index}") })
        .as_object()
        .unwrap()
        .clone();
    TestMessage {
        identities,
        traits,
        stamp: Stamp {
            at: Utc
                .timestamp_opt(1_700_000_000 + i64::from(minute) * 60, 0)
                .unwrap(),
            message_id: format!("m{index:04}"),
        },
    }
}

/// Applies messages in order and returns each profile as (identifiers, traits).
fn run(messages: &[TestMessage]) -> BTreeSet<(Vec<IdentityKey>, String)> {
    let rules = IdentityRules::default();
    let mut graph = IdentityGraph::default();
    let mut state: std::collections::HashMap<Uuid, TraitState> = Default::default();
    let mut next = 0u128;
    for (position, message) in messages.iter().enumerate() {
        let now = Utc
            .timestamp_opt(1_800_000_000 + position as i64, 0)
            .unwrap();
        let resolution = graph
            .resolve(&message.identities, &rules, now, || {
                next += 1;
                Uuid::from_u128(next)
            })
            .unwrap();
        assert!(resolution.conflicts.is_empty());
        for merge in &resolution.merges {
            let (merged_traits, merged_clock) = state.remove(&merge.merged).unwrap_or_default();
            let (traits, clock) = state.entry(merge.survivor).or_default();
            traits::merge(traits, clock, &merged_traits, &merged_clock);
        }
        let (profile_traits, clock) = state.entry(resolution.profile).or_default();
        traits::apply(profile_traits, clock, &message.traits, &message.stamp);
    }
    state
        .into_iter()
        .map(|(id, (traits, _))| {
            let identities = graph
                .profile(id)
                .unwrap()
                .identities
                .iter()
                .cloned()
                .collect();
            (identities, Value::Object(traits).to_string())
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_order_of_the_same_messages_ends_in_the_same_profiles_and_traits(
        raw in prop::collection::vec(message(), 1..40),
        seed in any::<u64>(),
    ) {
        let messages: Vec<TestMessage> = raw.into_iter().enumerate().map(|(index, raw)| build(index, raw)).collect();
        let expected = run(&messages);
        // A deterministic shuffle from the seed, and the reverse order.
        let mut shuffled = messages.clone();
        let mut state = seed | 1;
        for index in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(index, (state % (index as u64 + 1)) as usize);
        }
        prop_assert_eq!(&run(&shuffled), &expected);
        let reversed: Vec<_> = messages.iter().rev().cloned().collect();
        prop_assert_eq!(&run(&reversed), &expected);
    }
}
