//! The GraphQL API: the only module that names `async_graphql`.
//!
//! Guarantees: every error carries `extensions.code` (one of the contract's codes); internal
//! errors are logged in full and returned opaque; the tenant always comes from the principal in
//! the request context, never from an argument.

mod accounts;
mod analytics;
mod campaigns;
pub mod compiled;
mod customers;
mod document;
pub mod documents;
mod fifo;
pub mod limits;
mod loaders;
pub mod persisted;
mod privacy;
mod segments;
mod subscriptions;
pub mod transport;
mod types;
mod webhooks;

use async_graphql::{
    Error, ErrorExtensions, MergedObject, MergedSubscription, Response, Schema, ServerError,
};

use crate::auth::Principal;
use crate::config::{AbuseLimits, GraphqlLimits};
use crate::service::{AppState, RequestMeta, ServiceError};

#[derive(MergedObject, Default)]
pub struct Query(
    accounts::AccountsQuery,
    customers::CustomersQuery,
    analytics::AnalyticsQuery,
    segments::SegmentsQuery,
    webhooks::WebhooksQuery,
    campaigns::CampaignsQuery,
    privacy::PrivacyQuery,
);

#[derive(MergedObject, Default)]
pub struct Mutation(
    accounts::AccountsMutation,
    customers::CustomersMutation,
    segments::SegmentsMutation,
    webhooks::WebhooksMutation,
    campaigns::CampaignsMutation,
    privacy::PrivacyMutation,
);

#[derive(MergedSubscription, Default)]
pub struct Subscription(
    subscriptions::LiveSubscription,
    campaigns::CampaignsSubscription,
);

pub type CdpSchema = Schema<Query, Mutation, Subscription>;

/// Per-request context: who is asking, and from where.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub principal: Option<Principal>,
    /// Set when the request carried credentials that were refused: operations that need a
    /// principal then answer UNAUTHENTICATED with this message, instead of "sign in first".
    pub auth_error: Option<String>,
    pub meta: RequestMeta,
    /// The request's batch loader of profile fields, made when first asked.
    pub loaders: loaders::ProfileLoaderSlot,
}

/// The schema that serves requests, with the limits of the configuration. Introspection and
/// suggestions may be off here (`CDP_GRAPHQL_INTROSPECTION`, `CDP_GRAPHQL_SUGGESTIONS`); [`sdl`]
/// builds its own schema, so `cdp schema` prints the SDL either way.
pub fn build_schema(state: AppState, limits: &GraphqlLimits, abuse: &AbuseLimits) -> CdpSchema {
    let admission = limits::Admission {
        limits: field_limits(abuse),
        max_selections: limits.max_complexity,
    };
    let plan_limits = limits.compiled_plans.then_some(compiled::Limits {
        max_depth: limits.max_depth,
        max_complexity: limits.max_complexity,
        admission,
    });
    let mut builder = Schema::build(
        Query::default(),
        Mutation::default(),
        Subscription::default(),
    )
    .data(state)
    .limit_depth(limits.max_depth)
    .limit_complexity(limits.max_complexity)
    // Checked by the transports before each operation runs (`limits::admit`).
    .data(admission)
    // Filled and read by the transports (`transport::Caches::of`).
    .data(transport::Caches::new(
        limits.apq_capacity,
        documents::CAPACITY,
        plan_limits,
    ));
    if !abuse.graphql_introspection {
        builder = builder.disable_introspection();
    }
    if !abuse.graphql_suggestions {
        builder = builder.disable_suggestions();
    }
    builder.finish()
}

/// The per-operation field limits of the configuration.
pub fn field_limits(abuse: &AbuseLimits) -> limits::FieldLimits {
    limits::FieldLimits {
        max_root_fields: abuse.graphql_max_root_fields,
        max_account_fields: abuse.graphql_max_account_fields,
        introspection: abuse.graphql_introspection,
    }
}

/// The SDL of the schema, as `cdp schema` prints it. Needs no database.
pub fn sdl() -> String {
    Schema::build(
        Query::default(),
        Mutation::default(),
        Subscription::default(),
    )
    .finish()
    .sdl()
}

/// Converts a service error into a GraphQL error with the contract's code.
pub(crate) fn service_error(error: ServiceError) -> Error {
    let code = match &error {
        ServiceError::Unauthenticated(_) => "UNAUTHENTICATED",
        ServiceError::Forbidden(_) => "FORBIDDEN",
        ServiceError::NotFound(_) => "NOT_FOUND",
        ServiceError::BadInput { .. } => "BAD_USER_INPUT",
        ServiceError::Conflict(_) => "CONFLICT",
        ServiceError::RateLimited { .. } => "RATE_LIMITED",
        ServiceError::Unexpected(_) => "INTERNAL",
    };
    match error {
        ServiceError::Unexpected(inner) => {
            let reference = uuid::Uuid::new_v4();
            tracing::error!(%reference, error = ?inner, "internal error");
            Error::new(format!("internal error (reference {reference})"))
                .extend_with(|_, extensions| extensions.set("code", code))
        }
        ServiceError::BadInput { field, message } => {
            Error::new(message).extend_with(|_, extensions| {
                extensions.set("code", code);
                extensions.set("field", field.clone());
            })
        }
        ServiceError::RateLimited { retry_after_secs } => Error::new(error.to_string())
            .extend_with(|_, extensions| {
                extensions.set("code", code);
                extensions.set("retryAfter", retry_after_secs);
            }),
        other => {
            Error::new(other.to_string()).extend_with(|_, extensions| extensions.set("code", code))
        }
    }
}

/// Gives every error that has no code (parse and validation errors, limits, variable coercion)
/// the code BAD_USER_INPUT, so that clients can always switch on `extensions.code`.
pub fn ensure_error_codes(mut response: Response) -> Response {
    for error in &mut response.errors {
        add_code(error);
    }
    response
}

/// Masks email-like and phone-like text in error messages (see `domain::pii::mask_free_text`).
pub fn mask_error_messages(mut response: Response) -> Response {
    for error in &mut response.errors {
        error.message = domain::pii::mask_free_text(&error.message);
    }
    response
}

fn add_code(error: &mut ServerError) {
    let has_code = error
        .extensions
        .as_ref()
        .is_some_and(|extensions| extensions.get("code").is_some());
    if !has_code {
        error
            .extensions
            .get_or_insert_with(Default::default)
            .set("code", "BAD_USER_INPUT");
    }
}

/// The error of a request over its rate: RATE_LIMITED with `retryAfter` in seconds, the shape
/// the login throttle uses too.
pub(crate) fn rate_limited_error(retry_after_secs: u64) -> ServerError {
    let message = format!("too many requests; try again in {retry_after_secs} s");
    let mut error = ServerError::new(message, None);
    let extensions = error.extensions.get_or_insert_with(Default::default);
    extensions.set("code", "RATE_LIMITED");
    extensions.set("retryAfter", retry_after_secs);
    error
}

/// A standalone error response (for failures before execution, such as a too-large batch).
pub fn error_response(message: &str, code: &str) -> Response {
    let mut error = ServerError::new(message, None);
    error
        .extensions
        .get_or_insert_with(Default::default)
        .set("code", code);
    Response::from_errors(vec![error])
}

/// Re-exports for the HTTP layer, which builds requests and responses without naming
/// async-graphql types itself.
pub use async_graphql::{BatchRequest, BatchResponse, Data};
