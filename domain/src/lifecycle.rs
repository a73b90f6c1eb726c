//! Lifecycle stages: an ordered model of named conditions; a profile's stage is the first stage
//! whose condition holds (shared contract `schema.graphql`, `lifecycleModel`).
//!
//! Guarantees: a [`LifecycleModel`] is valid by construction: 1 to [`MAX_STAGES`] stages, keys
//! unique and of the form `[a-z][a-z0-9_]{0,39}`, names non-empty, and no stage condition depends
//! on the stage itself (which would make the stage defined in terms of itself). [`stage_of`] is a
//! pure function of the model, the profile's facts and `now`.
//!
//! # The default model
//!
//! Every tenant starts with [`LifecycleModel::default_model`], five stages evaluated in this
//! order (an "order" is a `track` event named `Order Completed`, the Segment e-commerce spec; it
//! also feeds the `order_count` attribute):
//!
//! | key | condition | meaning |
//! |---|---|---|
//! | `acquisition` | no order yet, seen in the last 90 days | a new or prospective customer |
//! | `activation` | exactly one order, seen in the last 90 days | made a first purchase |
//! | `growth` | at least 3 orders in the last 90 days | buys often and recently |
//! | `retention` | at least 2 orders, seen in the last 90 days | a repeat customer |
//! | `dormant` | everything else, which is: not seen for 90 days | a silent customer |
//!
//! `growth` comes before `retention` so that a frequent buyer is in `growth`; `dormant` is the
//! catch-all, so every profile has a stage under the default model. A custom model need not have
//! a catch-all: a profile that matches no stage has no stage (`null`).

use serde_json::{json, Value};

use crate::condition::{self, Condition, ConditionError};

/// At most this many stages in a model.
pub const MAX_STAGES: usize = 20;

/// One stage of a model, in evaluation order.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub key: String,
    pub name: String,
    pub condition: Condition,
}

/// An ordered, validated list of stages.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleModel {
    stages: Vec<Stage>,
}

/// A stage as a caller submits it, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct StageInput {
    pub key: String,
    pub name: String,
    pub condition: Value,
}

/// Why a model was refused: `field` is the path of the first offending value, such as
/// `stages[2].key` or `stages[0].condition.all[1].op`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ModelError {
    pub field: String,
    pub reason: String,
}

fn model_error(field: impl Into<String>, reason: impl Into<String>) -> ModelError {
    ModelError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some('a'..='z'))
        && key.len() <= 40
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

impl LifecycleModel {
    /// Validates a submitted model. Errors name the first bad value in input order.
    pub fn new(inputs: &[StageInput]) -> Result<LifecycleModel, ModelError> {
        if inputs.is_empty() {
            return Err(model_error("stages", "a model needs at least one stage"));
        }
        if inputs.len() > MAX_STAGES {
            return Err(model_error(
                "stages",
                format!("a model has at most {MAX_STAGES} stages"),
            ));
        }
        let mut stages: Vec<Stage> = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.iter().enumerate() {
            let at = format!("stages[{index}]");
            if !valid_key(&input.key) {
                return Err(model_error(
                    format!("{at}.key"),
                    "expected a key of 1 to 40 characters: a lower-case letter, then lower-case \
                     letters, digits or _",
                ));
            }
            if stages.iter().any(|stage| stage.key == input.key) {
                return Err(model_error(
                    format!("{at}.key"),
                    format!("the key {:?} is used by an earlier stage", input.key),
                ));
            }
            let name = input.name.trim();
            if name.is_empty() || name.chars().count() > 100 {
                return Err(model_error(
                    format!("{at}.name"),
                    "expected a name of 1 to 100 characters",
                ));
            }
            let condition =
                condition::parse(&input.condition).map_err(|ConditionError { path, reason }| {
                    model_error(format!("{at}.{path}"), reason)
                })?;
            if condition.dependencies().depends_on_stage() {
                return Err(model_error(
                    format!("{at}.condition"),
                    "a stage condition cannot depend on the lifecycle stage itself",
                ));
            }
            stages.push(Stage {
                key: input.key.clone(),
                name: name.to_owned(),
                condition,
            });
        }
        Ok(LifecycleModel { stages })
    }

    /// The model every tenant starts with (see the module docs).
    pub fn default_model() -> LifecycleModel {
        let active = json!({"attribute": "last_seen_at", "op": "gte", "value": {"ago": "90d"}});
        let frequent = json!({"event": "Order Completed", "count": {"gte": 3}, "within": "90d"});
        let inputs = [
            (
                "acquisition",
                "Acquisition",
                json!({"all": [
                    {"attribute": "order_count", "op": "eq", "value": 0},
                    active.clone(),
                ]}),
            ),
            (
                "activation",
                "Activation",
                json!({"all": [
                    {"attribute": "order_count", "op": "eq", "value": 1},
                    active.clone(),
                ]}),
            ),
            ("growth", "Growth", frequent),
            (
                "retention",
                "Retention",
                json!({"all": [
                    {"attribute": "order_count", "op": "gte", "value": 2},
                    active,
                ]}),
            ),
            ("dormant", "Dormant", json!({"all": []})),
        ]
        .map(|(key, name, condition)| StageInput {
            key: key.to_owned(),
            name: name.to_owned(),
            condition,
        });
        match LifecycleModel::new(&inputs) {
            Ok(model) => model,
            Err(error) => unreachable!("the default lifecycle model is valid: {error}"),
        }
    }

    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The stage with this key and its position.
    pub fn position(&self, key: &str) -> Option<usize> {
        self.stages.iter().position(|stage| stage.key == key)
    }

    /// What the whole model depends on: the union of its stages' dependencies.
    pub fn dependencies(&self) -> condition::Dependencies {
        let mut all = condition::Dependencies::default();
        for stage in &self.stages {
            all.absorb(&stage.condition.dependencies());
        }
        all
    }

    /// For stage `index`, the condition "this stage holds and no earlier one does", which is
    /// exactly "the profile's stage is this one". The scheduler hands it to the database.
    pub fn exclusive_condition(&self, index: usize) -> Condition {
        let mut parts = vec![self.stages[index].condition.clone()];
        for earlier in &self.stages[..index] {
            parts.push(Condition::Not(Box::new(earlier.condition.clone())));
        }
        Condition::All(parts)
    }

    /// The condition "no stage holds": such a profile has no stage.
    pub fn no_stage_condition(&self) -> Condition {
        Condition::Not(Box::new(Condition::Any(
            self.stages
                .iter()
                .map(|stage| stage.condition.clone())
                .collect(),
        )))
    }
}

/// The key of the first stage whose condition holds for the profile, if any.
pub fn stage_of<'m>(
    model: &'m LifecycleModel,
    facts: &condition::ProfileFacts,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<&'m str> {
    model
        .stages
        .iter()
        .find(|stage| stage.condition.evaluate(facts, now))
        .map(|stage| stage.key.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::condition::{Attribute, EventFact, ProfileFacts};
    use chrono::{DateTime, Duration, Utc};

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap()
    }

    fn facts(last_seen_days_ago: i64, orders: &[i64]) -> ProfileFacts {
        let mut facts = ProfileFacts::default();
        let last_seen = now() - Duration::days(last_seen_days_ago);
        facts.attributes.insert(
            Attribute::LastSeenAt,
            Value::String(last_seen.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        facts
            .attributes
            .insert(Attribute::OrderCount, json!(orders.len()));
        for days_ago in orders {
            facts.events.push(EventFact {
                name: "Order Completed".into(),
                timestamp: now() - Duration::days(*days_ago),
                properties: Default::default(),
            });
        }
        facts
    }

    #[test]
    fn default_model_stages_follow_the_documented_table() {
        let model = LifecycleModel::default_model();
        let keys: Vec<&str> = model.stages().iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "acquisition",
                "activation",
                "growth",
                "retention",
                "dormant"
            ]
        );
        let cases = [
            (facts(1, &[]), "acquisition"),
            (facts(1, &[10]), "activation"),
            (facts(1, &[10, 200]), "retention"),
            (facts(1, &[10, 20, 30]), "growth"),
            (facts(1, &[10, 20, 120]), "retention"),
            (facts(91, &[100, 120, 130]), "dormant"),
            (facts(91, &[]), "dormant"),
        ];
        for (facts, expected) in cases {
            assert_eq!(stage_of(&model, &facts, now()), Some(expected), "{facts:?}");
        }
    }

    #[test]
    fn models_are_validated_with_paths() {
        let stage = |key: &str, condition: Value| StageInput {
            key: key.into(),
            name: "Name".into(),
            condition,
        };
        let error = LifecycleModel::new(&[]).unwrap_err();
        assert_eq!(error.field, "stages");
        let error = LifecycleModel::new(&[stage("Bad Key", json!({"all": []}))]).unwrap_err();
        assert_eq!(error.field, "stages[0].key");
        let error = LifecycleModel::new(&[
            stage("a", json!({"all": []})),
            stage("a", json!({"all": []})),
        ])
        .unwrap_err();
        assert_eq!(error.field, "stages[1].key");
        let error = LifecycleModel::new(&[
            stage("a", json!({"all": []})),
            stage(
                "b",
                json!({"all": [{"trait": "x", "op": "nope", "value": 1}]}),
            ),
        ])
        .unwrap_err();
        assert_eq!(error.field, "stages[1].condition.all[0].op");
        let error = LifecycleModel::new(&[stage("a", json!({"stage": "b"}))]).unwrap_err();
        assert_eq!(error.field, "stages[0].condition");
        let mut blank = stage("a", json!({"all": []}));
        blank.name = "  ".into();
        assert_eq!(
            LifecycleModel::new(&[blank]).unwrap_err().field,
            "stages[0].name"
        );
    }

    #[test]
    fn exclusive_conditions_partition_profiles_like_stage_of() {
        let model = LifecycleModel::default_model();
        for facts in [
            facts(1, &[]),
            facts(1, &[3]),
            facts(1, &[1, 2, 3]),
            facts(95, &[]),
        ] {
            let stage = stage_of(&model, &facts, now());
            for (index, candidate) in model.stages().iter().enumerate() {
                assert_eq!(
                    model.exclusive_condition(index).evaluate(&facts, now()),
                    stage == Some(candidate.key.as_str())
                );
            }
            assert_eq!(
                model.no_stage_condition().evaluate(&facts, now()),
                stage.is_none()
            );
        }
    }
}
