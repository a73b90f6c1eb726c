//! Black-box tests of the running service over real HTTP, WebSocket and SMTP, against SQLite and,
//! when `CDP_TEST_POSTGRES_URL` is set, PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod abuse;
mod accounts;
mod analytics;
mod backup;
mod bad_input;
mod browser;
mod campaigns;
mod citus;
mod collect;
mod compiled;
mod http_surface;
mod import;
mod isolation;
mod operate;
mod operator;
mod outbox;
mod partitions;
mod privacy;
mod read_path;
mod security;
mod segments;
mod subscriptions;
mod support;
mod tidy;
mod tls;
mod unify;
mod webhooks;
