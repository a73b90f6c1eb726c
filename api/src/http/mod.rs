//! HTTP routes (poem): GraphQL over HTTP and WebSocket, the GraphiQL page, health checks, CORS.
//!
//! Guarantees: the GraphQL body is read with a hard size limit before it is parsed; credentials
//! are checked before any operation runs; every error body carries a contract error code; every
//! route but `/graphql/ws` answers within the request timeout.

mod account;
mod client;
mod collect;
mod graphiql;
mod graphql;
mod health;
pub mod observe;
pub mod ratelimit;
mod timeout;
pub mod tls;
mod unsubscribe;

use poem::http::Method;
use poem::middleware::Cors;
use poem::{get, EndpointExt, Route};

use crate::config::CorsOrigins;
use crate::graphql::transport::SubscriptionEndpoint;
use crate::graphql::CdpSchema;
use crate::service::AppState;
use timeout::{RequestTimeout, Shape};

/// Builds every route of the service.
pub fn routes(state: AppState, schema: CdpSchema) -> poem::Route {
    let limit = state.config.abuse.request_timeout;
    let timeout = |shape| RequestTimeout { limit, shape };
    let gate_state = state.clone();
    let graphql_routes = Route::new()
        .at(
            "/",
            get(graphql::get)
                .post(graphql::post)
                .with(timeout(Shape::Graphql)),
        )
        .at(
            "/assets/:file",
            get(graphiql::asset).with(timeout(Shape::Plain)),
        )
        // No request timeout: a socket lives as long as its credentials.
        .at(
            "/ws",
            SubscriptionEndpoint {
                schema: schema.clone(),
                state: state.clone(),
            }
            .around(move |endpoint, request| {
                graphql::websocket_gate(endpoint, request, gate_state.clone())
            }),
        );
    // Browsers send analytics from customers' own sites: the collection API answers CORS
    // preflights from any origin (the write key is public by design) and admits whatever headers
    // the client libraries send (RudderStack's AnonymousId, Segment's X-Retry-Count, …).
    let collection = collect::routes().with(timeout(Shape::Plain)).with(
        Cors::new()
            .allow_methods([Method::POST, Method::OPTIONS])
            .max_age(86400),
    );
    // `/graphql` admits only the configured frontend origins.
    let graphql_routes = match cors(&state.config.cors_origins) {
        Some(cors) => graphql_routes.with(cors).boxed(),
        None => graphql_routes.boxed(),
    };
    Route::new()
        .nest("/v1", collection)
        .nest("/graphql", graphql_routes)
        .at("/healthz", get(health::healthz))
        .at("/activate", get(account::page).with(timeout(Shape::Plain)))
        .at(
            "/reset-password",
            get(account::page).with(timeout(Shape::Plain)),
        )
        .at("/readyz", get(health::readyz).with(timeout(Shape::Plain)))
        .at(
            "/metrics",
            get(observe::metrics).with(timeout(Shape::Plain)),
        )
        .at(
            "/unsubscribe",
            get(unsubscribe::show)
                .post(unsubscribe::confirm)
                .with(timeout(Shape::Plain)),
        )
}

/// The CORS policy for browser frontends, from `CDP_CORS_ORIGINS`.
pub fn cors(origins: &CorsOrigins) -> Option<Cors> {
    let base = || {
        Cors::new()
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(["authorization", "content-type", "content-encoding"])
            .max_age(600)
    };
    match origins {
        CorsOrigins::None => None,
        CorsOrigins::Any => Some(base()),
        CorsOrigins::List(list) => Some(base().allow_origins(list.iter().cloned())),
    }
}

/// Attaches the shared state and the middleware to the routes.
pub fn app(
    state: AppState,
    schema: CdpSchema,
) -> poem::endpoint::BoxEndpoint<'static, poem::Response> {
    let limits = std::sync::Arc::new(ratelimit::RateLimits::default());
    let observed = state.clone();
    routes(state.clone(), schema.clone())
        .around(move |endpoint, request| observe::around(endpoint, request, observed.clone()))
        .data(state)
        .data(schema)
        .data(limits)
        .map_to_response()
        .boxed()
}
