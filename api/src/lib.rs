//! The CDP service: configuration, authentication, persistence, use cases, the GraphQL and HTTP
//! surfaces, email and background jobs. `main.rs` is a thin command line over this library, and
//! the black-box tests start the very same server through [`startup::build`].
//!
//! Layering: `graphql` and `http` call `service`, which calls `store`, `domain` and `mail`.
//! `store` is the only module that names `sea_orm`; `graphql` is the only one that names
//! `async_graphql`. A tidy test in `tests/` enforces both.

pub mod auth;
pub mod cli;
pub mod config;
pub mod config_reference;
pub mod crypto;
pub mod graphql;
pub mod http;
pub mod jobs;
pub mod mail;
pub mod metrics;
pub mod service;
pub mod startup;
pub mod store;
#[cfg(feature = "otel")]
pub mod telemetry;
