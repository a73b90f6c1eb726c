//! Checks on a GraphQL document as a whole, made before async-graphql validates it, whatever the
//! transport: its size once every fragment is expanded, the directives on any one selection, and
//! no NUL character in any string it carries. (`limits.rs` counts root fields and account
//! mutations.)
//!
//! async-graphql measures depth and complexity by expanding each fragment spread in place, with
//! no memory of fragments already measured, and `__typename` counts for nothing: thirty
//! fragments that each spread the next one twice, under any field, make it walk 2^30 selections
//! before it can refuse the query, and its executor would walk them again. Here each fragment is
//! measured once, so the check costs time linear in the document, and a document whose expansion
//! holds more selections than the complexity limit is refused before anything else walks it.
//!
//! A NUL character cannot be stored in PostgreSQL text and breaks a SQLite JSON path; refused as
//! input on both databases alike, it never reaches the store to become an internal error.
//!
//! Guarantees: a request that passes expands to at most `max_selections` selections, nests
//! selections at most [`MAX_NESTING`] deep through its fragments, has no fragment cycle, carries
//! at most [`MAX_DIRECTIVES`] directives on any one selection, and has no NUL in its variables,
//! arguments or default values. A refusal is BAD_USER_INPUT.

use async_graphql::parser::types::{Directive, ExecutableDocument, Field, Selection, SelectionSet};
use async_graphql::{Positioned, Request, ServerError, ServerResult, Value};
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;

/// Deeper nesting of selections, counting fragment spreads and inline fragments, is refused.
/// async-graphql itself refuses more than 32; this bound only keeps the measuring below from
/// recursing through a long chain of fragments.
pub const MAX_NESTING: usize = 64;

/// More directives on one field, fragment or operation are refused: real queries use one or two
/// (`@skip`, `@include`), and each one more is work, and an error, per execution.
pub const MAX_DIRECTIVES: usize = 10;

/// Deeper nesting of lists and objects in a value is refused (serde_json's own limit, which
/// already bounds the variables).
const MAX_VALUE_NESTING: usize = 128;

/// The whole-document checks of one request (see the module documentation); called by
/// `limits::admit` before async-graphql validates or runs it.
pub(super) fn check_request(request: &mut Request, max_selections: usize) -> ServerResult<()> {
    if variables_hold_nul(&request.variables) {
        return Err(refusal(NUL_MESSAGE));
    }
    // A document that does not parse is left to the schema, which says why; a parsed one is
    // kept, and async-graphql uses it instead of parsing again.
    if let Ok(document) = request.parsed_query() {
        check_document(document, max_selections)?;
    }
    Ok(())
}

/// Whether a variable's value holds a NUL character (or nests deeper than values may), which
/// [`check_request`] refuses.
pub(super) fn variables_hold_nul(variables: &async_graphql::Variables) -> bool {
    variables
        .values()
        .any(|value| holds_nul(value, 0).unwrap_or(true))
}

const NUL_MESSAGE: &str = "text must not contain the NUL character (U+0000)";

fn refusal(message: impl Into<String>) -> ServerError {
    let mut error = ServerError::new(message, None);
    error
        .extensions
        .get_or_insert_with(Default::default)
        .set("code", "BAD_USER_INPUT");
    error
}

/// Whether a value holds a NUL in a string or an object key; None when it is nested too deep to
/// look (refused as well).
fn holds_nul(value: &Value, depth: usize) -> Option<bool> {
    if depth > MAX_VALUE_NESTING {
        return None;
    }
    Some(match value {
        Value::String(text) => text.contains('\0'),
        Value::List(items) => {
            for item in items {
                if holds_nul(item, depth + 1)? {
                    return Some(true);
                }
            }
            false
        }
        Value::Object(map) => {
            for (key, item) in map {
                if key.contains('\0') || holds_nul(item, depth + 1)? {
                    return Some(true);
                }
            }
            false
        }
        _ => false,
    })
}

pub(super) fn check_document(
    document: &ExecutableDocument,
    max_selections: usize,
) -> ServerResult<()> {
    let mut measure = Measure {
        document,
        sizes: HashMap::new(),
        measuring: HashSet::new(),
    };
    let mut total: usize = 0;
    for (_, operation) in document.operations.iter() {
        for variable in &operation.node.variable_definitions {
            if let Some(default) = &variable.node.default_value {
                if holds_nul(&default.node, 0).unwrap_or(true) {
                    return Err(refusal(NUL_MESSAGE));
                }
            }
        }
        check_directives(&operation.node.directives)?;
        total = total.saturating_add(measure.selection_set(&operation.node.selection_set.node, 0)?);
    }
    // Fragments no operation uses are checked too (validation refuses them anyway); the others
    // were measured already and are not walked again.
    for (name, fragment) in &document.fragments {
        check_directives(&fragment.node.directives)?;
        measure.fragment(name.as_str(), 0)?;
    }
    if total > max_selections {
        return Err(refusal(format!(
            "Query is too complex: its fragments expand to {total} selections; the limit is {max_selections}."
        )));
    }
    Ok(())
}

/// Measures selection sets, each fragment once.
struct Measure<'a> {
    document: &'a ExecutableDocument,
    /// Expanded size of each fragment measured so far.
    sizes: HashMap<&'a str, usize>,
    /// Fragments being measured: meeting one again is a cycle.
    measuring: HashSet<&'a str>,
}

impl<'a> Measure<'a> {
    /// The number of selections in `set` with every fragment spread expanded.
    fn selection_set(&mut self, set: &'a SelectionSet, depth: usize) -> ServerResult<usize> {
        if depth > MAX_NESTING {
            return Err(refusal(format!(
                "Query is nested too deep: more than {MAX_NESTING} levels with its fragments expanded."
            )));
        }
        let mut size: usize = 0;
        for selection in &set.items {
            let inner = match &selection.node {
                Selection::Field(field) => {
                    check_field(&field.node)?;
                    self.selection_set(&field.node.selection_set.node, depth + 1)?
                }
                Selection::InlineFragment(inline) => {
                    check_directives(&inline.node.directives)?;
                    self.selection_set(&inline.node.selection_set.node, depth + 1)?
                }
                Selection::FragmentSpread(spread) => {
                    check_directives(&spread.node.directives)?;
                    self.fragment(spread.node.fragment_name.node.as_str(), depth + 1)?
                }
            };
            size = size.saturating_add(1).saturating_add(inner);
        }
        Ok(size)
    }

    fn fragment(&mut self, name: &'a str, depth: usize) -> ServerResult<usize> {
        if let Some(size) = self.sizes.get(name) {
            return Ok(*size);
        }
        // An unknown fragment is left to validation, which names it.
        let Some((name, fragment)) = self.document.fragments.get_key_value(name) else {
            return Ok(0);
        };
        let name = name.as_str();
        if !self.measuring.insert(name) {
            return Err(refusal(format!(
                "Fragment \"{name}\" spreads itself, directly or through other fragments."
            )));
        }
        let size = self.selection_set(&fragment.node.selection_set.node, depth)?;
        self.measuring.remove(name);
        self.sizes.insert(name, size);
        Ok(size)
    }
}

fn check_field(field: &Field) -> ServerResult<()> {
    check_directives(&field.directives)?;
    check_values(field.arguments.iter().map(|(_, value)| {
        // Variables stand for themselves here: they are checked as variables.
        let Ok(value) = value
            .node
            .clone()
            .into_const_with(|_| Ok::<_, Infallible>(Value::Null));
        value
    }))
}

fn check_directives(directives: &[Positioned<Directive>]) -> ServerResult<()> {
    if directives.len() > MAX_DIRECTIVES {
        return Err(refusal(format!(
            "Query has {} directives on one selection; the limit is {MAX_DIRECTIVES}.",
            directives.len()
        )));
    }
    for directive in directives {
        check_values(directive.node.arguments.iter().map(|(_, value)| {
            let Ok(value) = value
                .node
                .clone()
                .into_const_with(|_| Ok::<_, Infallible>(Value::Null));
            value
        }))?;
    }
    Ok(())
}

fn check_values(values: impl Iterator<Item = Value>) -> ServerResult<()> {
    for value in values {
        if holds_nul(&value, 0).unwrap_or(true) {
            return Err(refusal(NUL_MESSAGE));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(query: &str) -> Result<(), String> {
        let document = async_graphql::parser::parse_query(query).map_err(|e| e.to_string())?;
        check_document(&document, 100).map_err(|error| error.message)
    }

    #[test]
    fn fragments_are_measured_once_each() {
        // 2^40 selections once expanded: refused at once, not walked.
        let mut bomb = String::from("{ ...F0 } ");
        for level in 0..40 {
            bomb.push_str(&format!(
                "fragment F{level} on Query {{ ...F{} ...F{} }} ",
                level + 1,
                level + 1
            ));
        }
        bomb.push_str("fragment F40 on Query { __typename }");
        assert!(check(&bomb).unwrap_err().contains("too complex"));
        // Four spreads of a three-field fragment: 4 × (1 + 3) + 1 selections.
        let small = "{ a: me { ...U } b: me { ...U } c: me { ...U } d: me { ...U } }
                     fragment U on Me { user { email } }";
        assert!(check(small).is_ok());
        assert!(check(&format!("{{ {} }}", "__typename ".repeat(101))).is_err());
        assert!(check(&format!("{{ {} }}", "__typename ".repeat(100))).is_ok());
    }

    #[test]
    fn cycles_long_chains_and_directive_piles_are_refused() {
        let cycle = "{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }";
        assert!(check(cycle).unwrap_err().contains("spreads itself"));
        let mut chain = String::from("{ ...F0 } ");
        for level in 0..100 {
            chain.push_str(&format!(
                "fragment F{level} on Query {{ ...F{} }} ",
                level + 1
            ));
        }
        chain.push_str("fragment F100 on Query { __typename }");
        assert!(check(&chain).unwrap_err().contains("too deep"));
        let piled = format!("{{ __typename {} }}", "@skip(if: false) ".repeat(11));
        assert!(check(&piled).unwrap_err().contains("directives"));
    }

    #[test]
    fn a_nul_anywhere_in_the_document_is_refused() {
        for query in [
            r#"{ previewSegment(condition: {trait: "a\u0000"}) { size } }"#,
            r#"{ __typename @skip(if: false) profile(id: "\u0000") { id } }"#,
            r#"query($c: JSON = ["\u0000"]) { previewSegment(condition: $c) { size } }"#,
            r#"{ ...F } fragment F on Query { profile(id: "x\u0000") { id } }"#,
        ] {
            assert_eq!(check(query).unwrap_err(), NUL_MESSAGE, "{query}");
        }
        assert!(check(r#"{ profile(id: "\\u0000 is text") { id } }"#).is_ok());
    }
}
