//! Personal data in traits and event properties: which keys hold it, the sealed form it is
//! stored in, how conditions on it are limited and rewritten to compare blind indexes, and how
//! it is masked for principals without PII access.
//!
//! A personal value is never stored as it came: it is stored as a sealed object
//! `{"bi": BLIND, "ct": CIPHERTEXT}`, where `BLIND` is a keyed hash of the value (equal values,
//! equal hashes) and `CIPHERTEXT` the value encrypted. This module knows the shape, not the keys:
//! the caller passes the hashing function. Because the blind index sits at a fixed path inside
//! the sealed object, a condition `email eq "a@b.c"` becomes `email.bi eq BLIND("a@b.c")` and is
//! then evaluated by the ordinary evaluator in memory and by the ordinary SQL compiler alike.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::condition::{Condition, ConditionError, Op, Operand, PropertyPredicate};

/// The field of a sealed value that holds its blind index.
pub const BLIND_FIELD: &str = "bi";
/// The field of a sealed value that holds its ciphertext.
pub const CIPHER_FIELD: &str = "ct";

/// Trait and property keys that hold personal data in every tenant. A tenant adds its own.
pub const DEFAULT_KEYS: [&str; 13] = [
    "email",
    "phone",
    "name",
    "firstName",
    "lastName",
    "first_name",
    "last_name",
    "address",
    "birthday",
    "username",
    "ip",
    "ssn",
    // The earlier identifier an alias message names (stored in the alias event's properties).
    "previousId",
];

/// Operators a condition may apply to a personal value: those a blind index can answer.
pub const ALLOWED_OPS: [Op; 5] = [Op::Eq, Op::Neq, Op::In, Op::Exists, Op::NotExists];

/// The keys (top-level trait or property names) that hold personal data for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PiiKeys {
    // Invariant: holds every key of DEFAULT_KEYS.
    keys: BTreeSet<String>,
}

impl Default for PiiKeys {
    fn default() -> Self {
        PiiKeys::with_extra(&[])
    }
}

impl PiiKeys {
    /// The default keys and the tenant's own.
    pub fn with_extra(extra: &[String]) -> PiiKeys {
        let mut keys: BTreeSet<String> = DEFAULT_KEYS.iter().map(|key| (*key).to_owned()).collect();
        keys.extend(
            extra
                .iter()
                .map(|key| key.trim().to_owned())
                .filter(|key| !key.is_empty()),
        );
        PiiKeys { keys }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(String::as_str)
    }
}

/// Whether a stored value is in the sealed form.
pub fn is_sealed(value: &Value) -> bool {
    sealed_parts(value).is_some()
}

/// The blind index and ciphertext of a sealed value.
pub fn sealed_parts(value: &Value) -> Option<(&str, &str)> {
    let map = value.as_object()?;
    if map.len() != 2 {
        return None;
    }
    Some((
        map.get(BLIND_FIELD)?.as_str()?,
        map.get(CIPHER_FIELD)?.as_str()?,
    ))
}

/// Builds the sealed form of a value.
pub fn sealed(blind: String, ciphertext: String) -> Value {
    let mut map = Map::new();
    map.insert(BLIND_FIELD.to_owned(), Value::String(blind));
    map.insert(CIPHER_FIELD.to_owned(), Value::String(ciphertext));
    Value::Object(map)
}

/// The canonical form a personal value's blind index is computed from: its JSON text, which is
/// also what is sealed. The same value written by a message and named in a condition gives the
/// same text.
pub fn canonical(value: &Value) -> String {
    crate::json::text(value)
}

/// Checks that a condition only compares personal values in ways a blind index can answer, and
/// rewrites those comparisons to the blind index: `{"trait": "email", "op": "eq", "value": V}`
/// becomes a comparison of `email.bi` with `blind(V)`; `in` maps every element; `exists` and
/// `not_exists` stay on the key itself. Event property predicates are treated the same way.
///
/// Refuses, naming the node like the parser does (`condition.all[0].op`): any other operator on
/// a personal key, and any path into a personal value (`address.city`), which is sealed whole.
pub fn blind_condition(
    condition: &Condition,
    keys: &PiiKeys,
    blind: &dyn Fn(&Value) -> String,
) -> Result<Condition, ConditionError> {
    rewrite(condition, keys, blind, "condition")
}

fn rewrite(
    condition: &Condition,
    keys: &PiiKeys,
    blind: &dyn Fn(&Value) -> String,
    path: &str,
) -> Result<Condition, ConditionError> {
    Ok(match condition {
        Condition::All(items) => Condition::All(
            items
                .iter()
                .enumerate()
                .map(|(index, item)| rewrite(item, keys, blind, &format!("{path}.all[{index}]")))
                .collect::<Result<_, _>>()?,
        ),
        Condition::Any(items) => Condition::Any(
            items
                .iter()
                .enumerate()
                .map(|(index, item)| rewrite(item, keys, blind, &format!("{path}.any[{index}]")))
                .collect::<Result<_, _>>()?,
        ),
        Condition::Not(inner) => Condition::Not(Box::new(rewrite(
            inner,
            keys,
            blind,
            &format!("{path}.not"),
        )?)),
        Condition::Trait {
            path: trait_path,
            op,
            value,
        } => {
            let (trait_path, value) =
                rewrite_comparison(trait_path, *op, value, keys, blind, path, "trait")?;
            Condition::Trait {
                path: trait_path,
                op: *op,
                value,
            }
        }
        Condition::Event {
            name,
            filters,
            count,
            within,
        } => Condition::Event {
            name: name.clone(),
            filters: filters
                .iter()
                .enumerate()
                .map(|(index, predicate)| {
                    let node = format!("{path}.where[{index}]");
                    let (property_path, value) = rewrite_comparison(
                        &predicate.path,
                        predicate.op,
                        &predicate.value,
                        keys,
                        blind,
                        &node,
                        "property",
                    )?;
                    Ok(PropertyPredicate {
                        path: property_path,
                        op: predicate.op,
                        value,
                    })
                })
                .collect::<Result<_, ConditionError>>()?,
            count: *count,
            within: *within,
        },
        other => other.clone(),
    })
}

fn rewrite_comparison(
    key_path: &[String],
    op: Op,
    value: &Operand,
    keys: &PiiKeys,
    blind: &dyn Fn(&Value) -> String,
    node: &str,
    field: &str,
) -> Result<(Vec<String>, Operand), ConditionError> {
    let Some(first) = key_path.first() else {
        return Ok((key_path.to_vec(), value.clone()));
    };
    if !keys.contains(first) {
        return Ok((key_path.to_vec(), value.clone()));
    }
    if key_path.len() > 1 {
        return Err(ConditionError {
            path: format!("{node}.{field}"),
            reason: format!(
                "{first:?} holds personal data, which is stored encrypted as a whole: a condition may only compare the whole value, not a path into it"
            ),
        });
    }
    if !ALLOWED_OPS.contains(&op) {
        return Err(ConditionError {
            path: format!("{node}.op"),
            reason: format!(
                "{first:?} holds personal data, which is stored encrypted: only eq, neq, in, exists and not_exists are allowed on it, not {op}"
            ),
        });
    }
    match (op, value) {
        (Op::Exists | Op::NotExists, _) => Ok((key_path.to_vec(), value.clone())),
        (Op::In, Operand::Value(Value::Array(items))) => Ok((
            blind_path(first),
            Operand::Value(Value::Array(
                items
                    .iter()
                    .map(|item| Value::String(blind(item)))
                    .collect(),
            )),
        )),
        (_, Operand::Value(item)) => Ok((
            blind_path(first),
            Operand::Value(Value::String(blind(item))),
        )),
        // An operand the parser would not produce for these operators: left as it is, it never
        // holds, as documented on `Condition`.
        _ => Ok((key_path.to_vec(), value.clone())),
    }
}

fn blind_path(key: &str) -> Vec<String> {
    vec![key.to_owned(), BLIND_FIELD.to_owned()]
}

/// Masks a personal value for a principal without PII access: emails as `j***@example.com`,
/// other strings keep their first and last two characters, anything else becomes `***`.
pub fn mask(key: &str, value: &Value) -> Value {
    match value {
        Value::Null => Value::Null,
        Value::String(text) if key == "email" || text.contains('@') => {
            Value::String(crate::account::mask_email(text))
        }
        Value::String(text) => Value::String(mask_text(text)),
        _ => Value::String("***".to_owned()),
    }
}

/// Masks a string that is not an email: its first and last two characters stay when it is
/// longer than four characters.
pub fn mask_text(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() <= 4 {
        "***".to_owned()
    } else {
        format!(
            "{}***{}",
            chars[..2].iter().collect::<String>(),
            chars[chars.len() - 2..].iter().collect::<String>()
        )
    }
}

/// Masks what looks like personal data inside free text (an error message, an audit detail):
/// every word with an `@` is masked as an email, every run of seven or more digits (a phone
/// number, with its `+`) keeps only its last two digits.
pub fn mask_free_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.contains('@') {
            out.push_str(&crate::account::mask_email(word));
        } else {
            out.push_str(&mask_digit_runs(word));
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_whitespace()
            || matches!(
                c,
                '<' | '>' | '"' | '\'' | ',' | ';' | '(' | ')' | '[' | ']'
            )
        {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn mask_digit_runs(word: &str) -> String {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::with_capacity(word.len());
    let mut index = 0;
    while index < chars.len() {
        let start = index;
        if chars[index] == '+' {
            index += 1;
        }
        let digits_start = index;
        while index < chars.len() && (chars[index].is_ascii_digit() || chars[index] == '-') {
            index += 1;
        }
        let digits = chars[digits_start..index]
            .iter()
            .filter(|c| c.is_ascii_digit())
            .count();
        if digits >= 7 {
            let tail: String = chars[index.saturating_sub(2)..index].iter().collect();
            out.push_str("***");
            out.push_str(&tail);
        } else if index > start {
            out.extend(&chars[start..index]);
        } else {
            out.push(chars[index]);
            index += 1;
        }
    }
    out
}

/// Masks personal data anywhere in a JSON value: the personal keys of every object, and
/// email-like and phone-like text in every string.
pub fn mask_json(value: &Value, keys: &PiiKeys) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, item)| {
                    if keys.contains(key) && !item.is_object() {
                        (key.clone(), mask(key, item))
                    } else {
                        (key.clone(), mask_json(item, keys))
                    }
                })
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.iter().map(|item| mask_json(item, keys)).collect())
        }
        Value::String(text) => Value::String(mask_free_text(text)),
        other => other.clone(),
    }
}

/// Masks the personal keys of a traits or properties object.
pub fn mask_object(object: &Value, keys: &PiiKeys) -> Value {
    let Some(map) = object.as_object() else {
        return object.clone();
    };
    Value::Object(
        map.iter()
            .map(|(key, value)| {
                if keys.contains(key) {
                    (key.clone(), mask(key, value))
                } else {
                    (key.clone(), value.clone())
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::condition::parse;

    fn fake_blind(value: &Value) -> String {
        format!("B({value})")
    }

    #[test]
    fn comparisons_of_personal_traits_move_to_the_blind_index() {
        let condition = parse(&json!({"all": [
            {"trait": "email", "op": "eq", "value": "a@b.c"},
            {"trait": "phone", "op": "in", "value": ["+1", "+2"]},
            {"trait": "name", "op": "exists"},
            {"trait": "plan", "op": "starts_with", "value": "pro"}
        ]}))
        .unwrap();
        let rewritten = blind_condition(&condition, &PiiKeys::default(), &fake_blind).unwrap();
        let expected = parse(&json!({"all": [
            {"trait": "email.bi", "op": "eq", "value": "B(\"a@b.c\")"},
            {"trait": "phone.bi", "op": "in", "value": ["B(\"+1\")", "B(\"+2\")"]},
            {"trait": "name", "op": "exists"},
            {"trait": "plan", "op": "starts_with", "value": "pro"}
        ]}))
        .unwrap();
        assert_eq!(rewritten, expected);
    }

    #[test]
    fn operators_a_blind_index_cannot_answer_are_refused_with_the_node_path() {
        let cases = [
            (
                json!({"all": [{"stage": "a"}, {"trait": "email", "op": "contains", "value": "@x"}]}),
                "condition.all[1].op",
            ),
            (
                json!({"not": {"trait": "address.city", "op": "eq", "value": "Berlin"}}),
                "condition.not.trait",
            ),
            (
                json!({"event": "Signed Up", "where": [{"property": "plan", "op": "exists"}, {"property": "email", "op": "starts_with", "value": "a"}]}),
                "condition.where[1].op",
            ),
            (
                json!({"any": [{"trait": "nickname", "op": "gt", "value": 3}]}),
                "condition.any[0].op",
            ),
        ];
        let keys = PiiKeys::with_extra(&["nickname".to_owned()]);
        for (condition, path) in cases {
            let parsed = parse(&condition).unwrap();
            let error = blind_condition(&parsed, &keys, &fake_blind).unwrap_err();
            assert_eq!(error.path, path, "{condition}");
            assert!(error.reason.contains("personal data"), "{}", error.reason);
        }
    }

    #[test]
    fn masking_hides_all_but_the_shape() {
        assert_eq!(
            mask("email", &json!("jane@example.com")),
            json!("j***@example.com")
        );
        assert_eq!(mask("phone", &json!("+4915112345678")), json!("+4***78"));
        assert_eq!(mask("name", &json!("Al")), json!("***"));
        assert_eq!(mask("address", &json!({"city": "Berlin"})), json!("***"));
        let traits = json!({"email": "jane@example.com", "plan": "pro"});
        assert_eq!(
            mask_object(&traits, &PiiKeys::default()),
            json!({"email": "j***@example.com", "plan": "pro"})
        );
    }

    #[test]
    fn free_text_and_nested_json_are_masked() {
        assert_eq!(
            mask_free_text("signup <jane@example.com> from +4915112345678, order 1234"),
            "signup <j***@example.com> from ***78, order 1234"
        );
        let detail = json!({"owner": "jane@example.com", "note": "call 030-1234567", "count": 3, "phone": "+4915112345678"});
        assert_eq!(
            mask_json(&detail, &PiiKeys::default()),
            json!({"owner": "j***@example.com", "note": "call ***67", "count": 3, "phone": "+4***78"})
        );
    }

    #[test]
    fn the_sealed_form_is_recognised_exactly() {
        let value = sealed("b".to_owned(), "c".to_owned());
        assert_eq!(sealed_parts(&value), Some(("b", "c")));
        assert!(!is_sealed(&json!({"bi": "b"})));
        assert!(!is_sealed(&json!({"bi": "b", "ct": "c", "x": 1})));
        assert!(!is_sealed(&json!("b")));
    }
}
