//! Limits on what one GraphQL operation may ask, checked on the parsed document before it is
//! validated or run, whatever the transport: root fields (aliases included, fragments expanded
//! as often as they are spread), and the account mutations that need no principal and cost a
//! password hash or an email (`login` and its kin). Over a WebSocket every operation also counts
//! against its tenant's request rate, as HTTP requests do in `http/graphql.rs`.
//!
//! Guarantees: a document is refused as a whole (BAD_USER_INPUT, or RATE_LIMITED with
//! `retryAfter`) before any of its fields runs; counting takes time linear in the document and
//! stops at a budget, so no document (not even one whose fragments spread each other) makes it
//! loop.

use async_graphql::parser::types::{
    ExecutableDocument, FragmentDefinition, OperationDefinition, OperationType, Selection,
    SelectionSet,
};
use async_graphql::{Name, Positioned, Request, ServerError, ServerResult};

use super::documents::ParsedDocuments;
use std::collections::HashMap;

use super::RequestContext;
use crate::service::AppState;

/// The root mutations that need no principal; each costs a password hash, an email or a new
/// session, so a document may not repeat them under aliases.
pub const ACCOUNT_FIELDS: [&str; 6] = [
    "signUp",
    "activateAccount",
    "login",
    "refreshSession",
    "requestPasswordReset",
    "resetPassword",
];

/// The limits, from `CDP_GRAPHQL_MAX_ROOT_FIELDS`, `CDP_GRAPHQL_MAX_ACCOUNT_FIELDS` and
/// `CDP_GRAPHQL_INTROSPECTION`.
#[derive(Debug, Clone, Copy)]
pub struct FieldLimits {
    pub max_root_fields: usize,
    pub max_account_fields: usize,
    /// Whether `__schema` and `__type` may be asked. The schema answers them with null when
    /// introspection is off; refusing them here says why.
    pub introspection: bool,
}

/// What one operation asks for at its root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RootCounts {
    pub root_fields: usize,
    pub account_fields: usize,
    /// `__schema` and `__type` at the root of a query.
    pub introspection_fields: usize,
    /// The count stopped at its budget: the operation is over a limit whatever the rest holds.
    pub over_budget: bool,
}

/// Counts the root of one operation, expanding inline fragments and fragment spreads.
fn count_operation(
    operation: &OperationDefinition,
    fragments: &HashMap<Name, Positioned<FragmentDefinition>>,
    limits: FieldLimits,
) -> RootCounts {
    let mut counts = RootCounts::default();
    // Every selection visited costs one step; a valid operation within the limits needs far
    // fewer, and fragments that spread each other (invalid, refused later anyway) end here.
    let mut budget = limits
        .max_root_fields
        .saturating_mul(16)
        .saturating_add(1024);
    let mut pending: Vec<&SelectionSet> = vec![&operation.selection_set.node];
    while let Some(set) = pending.pop() {
        for selection in &set.items {
            if budget == 0
                || counts.root_fields > limits.max_root_fields
                || counts.account_fields > limits.max_account_fields
            {
                counts.over_budget = budget == 0;
                return counts;
            }
            budget -= 1;
            match &selection.node {
                Selection::Field(field) => {
                    counts.root_fields += 1;
                    let name = field.node.name.node.as_str();
                    match operation.ty {
                        OperationType::Mutation if ACCOUNT_FIELDS.contains(&name) => {
                            counts.account_fields += 1;
                        }
                        OperationType::Query if matches!(name, "__schema" | "__type") => {
                            counts.introspection_fields += 1;
                        }
                        _ => {}
                    }
                }
                Selection::InlineFragment(inline) => {
                    pending.push(&inline.node.selection_set.node);
                }
                Selection::FragmentSpread(spread) => {
                    if let Some(fragment) = fragments.get(&spread.node.fragment_name.node) {
                        pending.push(&fragment.node.selection_set.node);
                    }
                }
            }
        }
    }
    counts
}

/// The counts of every operation in a document (only one of them runs, chosen by
/// `operationName`; each must keep within the limits).
pub fn count(document: &ExecutableDocument, limits: FieldLimits) -> Vec<RootCounts> {
    document
        .operations
        .iter()
        .map(|(_, operation)| count_operation(&operation.node, &document.fragments, limits))
        .collect()
}

/// Checks every operation of a document against the limits.
pub fn check(document: &ExecutableDocument, limits: FieldLimits) -> Result<(), String> {
    for counts in count(document, limits) {
        if counts.over_budget || counts.root_fields > limits.max_root_fields {
            return Err(format!(
                "an operation may select at most {} root fields, aliases and fragments included",
                limits.max_root_fields
            ));
        }
        if !limits.introspection && counts.introspection_fields > 0 {
            return Err(
                "introspection is switched off on this server (CDP_GRAPHQL_INTROSPECTION)"
                    .to_owned(),
            );
        }
        if counts.account_fields > limits.max_account_fields {
            return Err(format!(
                "an operation may hold at most {} of {}, aliases and fragments included",
                limits.max_account_fields,
                ACCOUNT_FIELDS.join(", ")
            ));
        }
    }
    Ok(())
}

/// The most account mutations any one operation of the document can run.
pub fn account_fields(document: &ExecutableDocument, limits: FieldLimits) -> usize {
    count(document, limits)
        .into_iter()
        .map(|counts| counts.account_fields)
        .max()
        .unwrap_or(0)
}

fn refusal(message: String) -> ServerError {
    let mut error = ServerError::new(message, None);
    error
        .extensions
        .get_or_insert_with(Default::default)
        .set("code", "BAD_USER_INPUT");
    error
}

/// What every operation is checked against before async-graphql validates or runs it, kept in
/// the schema's data (see [`super::build_schema`]).
///
/// These checks used to be two async-graphql extensions (`prepare_request` only). Any extension
/// at all sends every field of every response through async-graphql's extension chain (a type
/// lookup and boxed futures per field); measured on `cdp-bench read`, a `profile(id)` with its
/// last 20 events (about 110 fields) served 15 to 25 % more requests a second without them. So
/// the transports call [`admit`] instead: HTTP and the WebSocket both run operations through
/// one executor (`transport::Admitted`) that checks each first.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub limits: FieldLimits,
    /// Most selections a document may expand to (`document.rs`).
    pub max_selections: usize,
}

/// Checks one operation, whatever the transport: over a WebSocket (`socket`: the socket's
/// session context and the service) it
/// counts against its tenant's request rate, as HTTP requests do in `http/graphql.rs`; then its
/// root fields and account mutations, then the document as a whole (`document.rs`). A refusal
/// is the error to answer with; the document parsed here (or copied from `documents`) is kept in
/// the request, and async-graphql uses it instead of parsing again.
pub fn admit(
    request: &mut Request,
    admission: &Admission,
    socket: Option<(&RequestContext, &AppState)>,
    documents: &ParsedDocuments,
) -> ServerResult<()> {
    if let Some((context, state)) = socket {
        if let Some(principal) = &context.principal {
            if let Err(retry) = state
                .request_limits
                .graphql_of_tenant(principal.tenant_id, 1)
            {
                return Err(super::rate_limited_error(retry.seconds));
            }
        }
        // HTTP requests got their parse when their body was read (`transport.rs`).
        documents.fill(request);
    }
    // A document that does not parse is left to the schema, which says why.
    if let Ok(document) = request.parsed_query() {
        check(document, admission.limits).map_err(refusal)?;
    }
    super::document::check_request(request, admission.max_selections)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FieldLimits = FieldLimits {
        max_root_fields: 5,
        max_account_fields: 1,
        introspection: true,
    };

    fn counts(query: &str) -> Vec<RootCounts> {
        count(&async_graphql::parser::parse_query(query).unwrap(), LIMITS)
    }

    #[test]
    fn aliases_inline_fragments_and_every_spread_count() {
        assert_eq!(
            counts("{ me { user { id } } tenant { id } }")[0].root_fields,
            2
        );
        let aliased = counts(
            "mutation { a: login(tenantSlug: \"s\", email: \"e\", password: \"p\") { accessToken }
                        b: login(tenantSlug: \"s\", email: \"e\", password: \"p\") { accessToken } }",
        );
        assert_eq!(aliased[0].account_fields, 2);
        let spread = counts(
            "mutation { ...L ...L ... on Mutation { requestPasswordReset(tenantSlug: \"s\", email: \"e\") } }
             fragment L on Mutation { login(tenantSlug: \"s\", email: \"e\", password: \"p\") { accessToken } }",
        );
        assert_eq!(
            spread[0].account_fields, 2,
            "the count stops once over the limit"
        );
        assert!(check(
            &async_graphql::parser::parse_query(
                "mutation { ...L ...L } fragment L on Mutation { login(tenantSlug: \"s\", email: \"e\", password: \"p\") { accessToken } }"
            )
            .unwrap(),
            LIMITS
        )
        .is_err());
    }

    #[test]
    fn account_fields_count_only_in_mutations_and_each_operation_alone() {
        let document = async_graphql::parser::parse_query(
            "mutation A { login(tenantSlug: \"s\", email: \"e\", password: \"p\") { accessToken } }
             mutation B { signUp(input: {tenantName: \"n\", tenantSlug: \"s\", email: \"e\"}) { tenant { id } } }
             query C { login }",
        )
        .unwrap();
        assert_eq!(check(&document, LIMITS), Ok(()));
        assert_eq!(account_fields(&document, LIMITS), 1);
    }

    #[test]
    fn too_many_root_fields_are_refused() {
        let query = format!(
            "{{ {} }}",
            (0..6)
                .map(|i| format!("a{i}: me {{ permissions }}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let document = async_graphql::parser::parse_query(&query).unwrap();
        assert!(check(&document, LIMITS)
            .unwrap_err()
            .contains("at most 5 root fields"));
    }

    #[test]
    fn introspection_is_refused_only_when_switched_off() {
        let document = async_graphql::parser::parse_query(
            "{ ... on Query { __type(name: \"Query\") { name } } __typename }",
        )
        .unwrap();
        assert_eq!(check(&document, LIMITS), Ok(()));
        let closed = FieldLimits {
            introspection: false,
            ..LIMITS
        };
        assert!(check(&document, closed)
            .unwrap_err()
            .contains("introspection is switched off"));
        let typename = async_graphql::parser::parse_query("{ __typename }").unwrap();
        assert_eq!(check(&typename, closed), Ok(()));
    }

    #[test]
    fn fragments_that_spread_each_other_end_at_the_budget() {
        let document = async_graphql::parser::parse_query(
            "{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }",
        )
        .unwrap();
        let counts = count(&document, LIMITS);
        assert!(counts[0].over_budget);
        assert!(check(&document, LIMITS).is_err());
    }
}
