//! Identity resolution: which profile a message belongs to, which profiles it joins, and which
//! identifiers it may not link, decided by rules that say each kind's priority and per-profile
//! limit.
//!
//! The decision is a deterministic function of the identity graph and the message. It never loses
//! data: merging moves everything to the survivor; a link that would break a limit is refused and
//! reported as a conflict instead (two different `user_id`s never end up in one profile).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub const USER_ID: &str = "user_id";
pub const ANONYMOUS_ID: &str = "anonymous_id";
pub const EMAIL: &str = "email";
pub const PHONE: &str = "phone";

/// One identifier: its kind and its lookup value (normalized; after PII encryption, a keyed hash).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub kind: String,
    pub value: String,
}

impl IdentityKey {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> IdentityKey {
        IdentityKey {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

/// How one kind of identifier behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KindRule {
    /// Higher wins: the highest-priority identifier of a message decides its profile, and in a
    /// conflict the lower-priority identifier is the one not linked.
    pub priority: u32,
    /// At most this many identifiers of the kind per profile.
    pub limit: usize,
}

/// A tenant's identity rules.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentityRules {
    pub kinds: BTreeMap<String, KindRule>,
    /// The rule for custom kinds (from `context.externalIds`) not listed in `kinds`.
    pub custom: KindRule,
}

impl Default for IdentityRules {
    fn default() -> Self {
        let kinds = [
            (
                USER_ID,
                KindRule {
                    priority: 100,
                    limit: 1,
                },
            ),
            (
                EMAIL,
                KindRule {
                    priority: 80,
                    limit: 5,
                },
            ),
            (
                PHONE,
                KindRule {
                    priority: 70,
                    limit: 5,
                },
            ),
            (
                ANONYMOUS_ID,
                KindRule {
                    priority: 10,
                    limit: 100,
                },
            ),
        ]
        .into_iter()
        .map(|(kind, rule)| (kind.to_owned(), rule))
        .collect();
        IdentityRules {
            kinds,
            custom: KindRule {
                priority: 50,
                limit: 5,
            },
        }
    }
}

impl IdentityRules {
    pub fn rule(&self, kind: &str) -> KindRule {
        self.kinds.get(kind).copied().unwrap_or(self.custom)
    }
}

/// A profile as resolution sees it: its age and its identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileNode {
    /// Orders profiles by age: the oldest survives a merge.
    pub created_at: DateTime<Utc>,
    pub identities: BTreeSet<IdentityKey>,
}

/// A merge decided by resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    pub survivor: Uuid,
    pub merged: Uuid,
    /// The identifier that joined the two profiles.
    pub via: IdentityKey,
}

/// An identifier that was not linked, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub identity: IdentityKey,
    /// The profile that owns the identifier, if any.
    pub owner: Option<Uuid>,
    /// The profile the message went to.
    pub profile: Uuid,
    /// The rule that decided, e.g. `limit:user_id=1`.
    pub rule: String,
}

/// What resolving one message decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The profile the message's data belongs to.
    pub profile: Uuid,
    /// Set when that profile is new.
    pub created: bool,
    /// Identifiers newly linked to `profile`.
    pub linked: Vec<IdentityKey>,
    /// Existing profiles merged, in order.
    pub merges: Vec<Merge>,
    pub conflicts: Vec<Conflict>,
}

/// The identity graph of the profiles a batch touches: which profile owns which identifier.
#[derive(Debug, Clone, Default)]
pub struct IdentityGraph {
    owners: HashMap<IdentityKey, Uuid>,
    profiles: HashMap<Uuid, ProfileNode>,
}

impl IdentityGraph {
    /// Adds a profile loaded from storage.
    pub fn insert_profile(&mut self, id: Uuid, node: ProfileNode) {
        for identity in &node.identities {
            self.owners.insert(identity.clone(), id);
        }
        self.profiles.insert(id, node);
    }

    pub fn owner(&self, identity: &IdentityKey) -> Option<Uuid> {
        self.owners.get(identity).copied()
    }

    pub fn profile(&self, id: Uuid) -> Option<&ProfileNode> {
        self.profiles.get(&id)
    }

    fn count(&self, id: Uuid, kind: &str) -> usize {
        self.profiles
            .get(&id)
            .map(|node| {
                node.identities
                    .iter()
                    .filter(|identity| identity.kind == kind)
                    .count()
            })
            .unwrap_or(0)
    }

    /// The first rule two profiles would break together, if any.
    pub fn merge_violation(&self, a: Uuid, b: Uuid, rules: &IdentityRules) -> Option<String> {
        let (Some(a), Some(b)) = (self.profiles.get(&a), self.profiles.get(&b)) else {
            return None;
        };
        let mut per_kind: BTreeMap<&str, BTreeSet<&IdentityKey>> = BTreeMap::new();
        for identity in a.identities.iter().chain(b.identities.iter()) {
            per_kind
                .entry(identity.kind.as_str())
                .or_default()
                .insert(identity);
        }
        per_kind.into_iter().find_map(|(kind, identities)| {
            let limit = rules.rule(kind).limit;
            (identities.len() > limit).then(|| format!("limit:{kind}={limit}"))
        })
    }

    /// (older, younger) of two profiles.
    fn by_age(&self, a: Uuid, b: Uuid) -> (Uuid, Uuid) {
        let key = |id: Uuid| self.profiles.get(&id).map(|node| (node.created_at, id));
        if key(a) <= key(b) {
            (a, b)
        } else {
            (b, a)
        }
    }

    /// Moves every identifier of `merged` to `survivor` and forgets `merged`.
    pub fn merge(&mut self, survivor: Uuid, merged: Uuid) {
        let Some(node) = self.profiles.remove(&merged) else {
            return;
        };
        for identity in &node.identities {
            self.owners.insert(identity.clone(), survivor);
        }
        if let Some(target) = self.profiles.get_mut(&survivor) {
            target.identities.extend(node.identities);
            target.created_at = target.created_at.min(node.created_at);
        }
    }

    fn link(&mut self, id: Uuid, identity: &IdentityKey) {
        self.owners.insert(identity.clone(), id);
        if let Some(node) = self.profiles.get_mut(&id) {
            node.identities.insert(identity.clone());
        }
    }

    /// Moves one identifier to a new profile (undoing a wrong merge).
    pub fn split(&mut self, identity: &IdentityKey, new_id: Uuid, created_at: DateTime<Utc>) {
        if let Some(owner) = self.owners.get(identity).copied() {
            if let Some(node) = self.profiles.get_mut(&owner) {
                node.identities.remove(identity);
            }
        }
        let mut identities = BTreeSet::new();
        identities.insert(identity.clone());
        self.insert_profile(
            new_id,
            ProfileNode {
                created_at,
                identities,
            },
        );
    }

    /// Resolves the identifiers of one message. `new_profile` supplies the id for a profile the
    /// message creates (called at most once); `now` is its creation time.
    ///
    /// Identifiers are taken in priority order (highest first, then as given). The first one
    /// decides the profile (its owner, or a new profile). Each further one: if unowned, it is
    /// linked when the profile has room for its kind; if owned by another profile, the two merge
    /// into the older one unless together they would break a limit. Returns None when the message
    /// carries no identifier.
    pub fn resolve(
        &mut self,
        identities: &[IdentityKey],
        rules: &IdentityRules,
        now: DateTime<Utc>,
        new_profile: impl FnOnce() -> Uuid,
    ) -> Option<Resolution> {
        let mut ordered: Vec<(usize, &IdentityKey)> = identities.iter().enumerate().collect();
        ordered.sort_by_key(|(index, identity)| {
            (
                std::cmp::Reverse(rules.rule(&identity.kind).priority),
                *index,
            )
        });
        ordered.dedup_by(|a, b| a.1 == b.1);

        let mut new_profile = Some(new_profile);
        let mut fresh: Option<Uuid> = None;
        let mut target: Option<Uuid> = None;
        let mut linked = Vec::new();
        let mut merges = Vec::new();
        let mut conflicts = Vec::new();
        for (_, identity) in ordered {
            match (self.owner(identity), target) {
                (Some(owner), None) => target = Some(owner),
                (Some(owner), Some(current)) if owner == current => {}
                (Some(owner), Some(current)) => match self.merge_violation(current, owner, rules) {
                    None => {
                        let (survivor, merged) = self.by_age(current, owner);
                        self.merge(survivor, merged);
                        if Some(merged) == fresh {
                            // The profile this message just created joins an existing one: it
                            // never existed for anybody else.
                            fresh = None;
                        } else {
                            merges.push(Merge {
                                survivor,
                                merged,
                                via: identity.clone(),
                            });
                        }
                        target = Some(survivor);
                    }
                    Some(rule) => conflicts.push(Conflict {
                        identity: identity.clone(),
                        owner: Some(owner),
                        profile: current,
                        rule,
                    }),
                },
                (None, None) => {
                    let Some(make) = new_profile.take() else {
                        continue;
                    };
                    let id = make();
                    self.profiles.insert(
                        id,
                        ProfileNode {
                            created_at: now,
                            identities: BTreeSet::new(),
                        },
                    );
                    self.link(id, identity);
                    linked.push(identity.clone());
                    fresh = Some(id);
                    target = Some(id);
                }
                (None, Some(current)) => {
                    let rule = rules.rule(&identity.kind);
                    if self.count(current, &identity.kind) < rule.limit {
                        self.link(current, identity);
                        linked.push(identity.clone());
                    } else {
                        conflicts.push(Conflict {
                            identity: identity.clone(),
                            owner: None,
                            profile: current,
                            rule: format!("limit:{}={}", identity.kind, rule.limit),
                        });
                    }
                }
            }
        }
        let profile = target?;
        // Conflicts recorded against a profile that later merged now concern the survivor.
        for conflict in &mut conflicts {
            if !self.profiles.contains_key(&conflict.profile) {
                conflict.profile = profile;
            }
        }
        Some(Resolution {
            profile,
            created: fresh == Some(profile),
            linked,
            merges,
            conflicts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, minute, 0).unwrap()
    }

    fn key(kind: &str, value: &str) -> IdentityKey {
        IdentityKey::new(kind, value)
    }

    fn ids() -> impl FnMut() -> Uuid {
        let mut next = 0u128;
        move || {
            next += 1;
            Uuid::from_u128(next)
        }
    }

    #[test]
    fn an_identify_after_anonymous_browsing_joins_the_anonymous_profile() {
        let rules = IdentityRules::default();
        let mut graph = IdentityGraph::default();
        let mut next = ids();
        let first = graph
            .resolve(&[key(ANONYMOUS_ID, "a1")], &rules, at(0), &mut next)
            .unwrap();
        assert!(first.created);
        let second = graph
            .resolve(
                &[key(USER_ID, "u1"), key(ANONYMOUS_ID, "a1")],
                &rules,
                at(1),
                &mut next,
            )
            .unwrap();
        assert_eq!(second.profile, first.profile);
        assert!(!second.created);
        assert!(
            second.merges.is_empty(),
            "a profile created and absorbed in one step is no merge"
        );
        assert_eq!(second.linked, [key(USER_ID, "u1")]);
    }

    #[test]
    fn a_shared_identifier_merges_two_profiles_into_the_oldest() {
        let rules = IdentityRules::default();
        let mut graph = IdentityGraph::default();
        let mut next = ids();
        let old = graph
            .resolve(&[key(ANONYMOUS_ID, "a1")], &rules, at(0), &mut next)
            .unwrap()
            .profile;
        let young = graph
            .resolve(&[key(EMAIL, "x@y.co")], &rules, at(5), &mut next)
            .unwrap()
            .profile;
        let joined = graph
            .resolve(
                &[key(EMAIL, "x@y.co"), key(ANONYMOUS_ID, "a1")],
                &rules,
                at(9),
                &mut next,
            )
            .unwrap();
        assert_eq!(joined.profile, old);
        assert_eq!(
            joined.merges,
            [Merge {
                survivor: old,
                merged: young,
                via: key(ANONYMOUS_ID, "a1")
            }]
        );
        assert_eq!(graph.owner(&key(EMAIL, "x@y.co")), Some(old));
    }

    #[test]
    fn two_user_ids_never_merge_and_the_lower_priority_identifier_is_not_linked() {
        let rules = IdentityRules::default();
        let mut graph = IdentityGraph::default();
        let mut next = ids();
        let alice = graph
            .resolve(
                &[key(USER_ID, "alice"), key(ANONYMOUS_ID, "shared-device")],
                &rules,
                at(0),
                &mut next,
            )
            .unwrap()
            .profile;
        let bob = graph
            .resolve(
                &[key(USER_ID, "bob"), key(ANONYMOUS_ID, "shared-device")],
                &rules,
                at(1),
                &mut next,
            )
            .unwrap();
        assert_ne!(bob.profile, alice);
        assert!(bob.created);
        assert_eq!(bob.conflicts.len(), 1);
        assert_eq!(
            bob.conflicts[0].identity,
            key(ANONYMOUS_ID, "shared-device")
        );
        assert_eq!(bob.conflicts[0].owner, Some(alice));
        assert_eq!(bob.conflicts[0].rule, "limit:user_id=1");
        assert_eq!(
            graph.owner(&key(ANONYMOUS_ID, "shared-device")),
            Some(alice)
        );
    }

    #[test]
    fn a_full_profile_refuses_one_more_identifier_of_a_kind() {
        let mut rules = IdentityRules::default();
        rules.kinds.insert(
            EMAIL.to_owned(),
            KindRule {
                priority: 80,
                limit: 1,
            },
        );
        let mut graph = IdentityGraph::default();
        let mut next = ids();
        let profile = graph
            .resolve(
                &[key(USER_ID, "u"), key(EMAIL, "a@x.co")],
                &rules,
                at(0),
                &mut next,
            )
            .unwrap()
            .profile;
        let again = graph
            .resolve(
                &[key(USER_ID, "u"), key(EMAIL, "b@x.co")],
                &rules,
                at(1),
                &mut next,
            )
            .unwrap();
        assert_eq!(again.profile, profile);
        assert_eq!(again.conflicts[0].rule, "limit:email=1");
        assert_eq!(graph.owner(&key(EMAIL, "b@x.co")), None);
    }

    #[test]
    fn no_identifier_means_no_resolution() {
        let mut graph = IdentityGraph::default();
        assert!(graph
            .resolve(&[], &IdentityRules::default(), at(0), ids())
            .is_none());
    }
}
