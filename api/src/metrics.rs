//! The process's metrics, served at `/metrics` in the Prometheus text format.
//!
//! One registry per process (per [`crate::service::AppState`], so that the servers a test starts
//! side by side count apart). Labels never carry a tenant, a person or anything a client chose
//! without bound: routes are the service's own patterns and GraphQL operation names are admitted
//! up to [`MAX_OPERATION_NAMES`] distinct names, the rest counted as `other`.
//! Gauges that describe the database (outbox depth and age) are read when scraped.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Distinct GraphQL operation names a process labels; later names are counted as `other`.
pub const MAX_OPERATION_NAMES: usize = 200;

/// Request latency buckets, in seconds: 1 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Why an ingestion transaction was begun again: the `reason` label of
/// `cdp_ingest_retries_total` (its help says what each means).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestRetry {
    /// A first attempt met a stored message id; the retry looks stored messages up.
    StoredMessage,
    /// A profile owning one of the batch's identifiers was merged by a concurrent batch between
    /// the lookup and the lock.
    ProfileMerged,
    /// An identifier or message written concurrently.
    Conflict,
    /// A deadlock, serialization failure or lost connection.
    Transient,
}

impl IngestRetry {
    pub fn label(self) -> &'static str {
        match self {
            IngestRetry::StoredMessage => "stored_message",
            IngestRetry::ProfileMerged => "profile_merged",
            IngestRetry::Conflict => "conflict",
            IngestRetry::Transient => "transient",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    graphql_operations: IntCounterVec,
    graphql_duration: HistogramVec,
    graphql_compiled: IntCounter,
    operation_names: Mutex<HashSet<String>>,
    ingested: IntCounterVec,
    rejected: IntCounterVec,
    emails: IntCounterVec,
    auth_standings: IntCounterVec,
    ingest_retries: IntCounterVec,
    pub outbox_depth: IntGauge,
    pub outbox_oldest_age: Gauge,
    pub websockets: IntGauge,
    pub subscriptions: IntGauge,
    scheduler_last_tick: Gauge,
    scheduler_duration: HistogramVec,
    scheduler_ticks: IntCounterVec,
    pub draining: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // Names and label sets are constants: registering them cannot fail but on a duplicate
        // name, which would be a programming error caught by the first test that builds a state.
        fn register<C: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            collector: C,
        ) -> C {
            #[allow(clippy::expect_used)]
            registry
                .register(Box::new(collector.clone()))
                .expect("metric names are unique");
            collector
        }
        #[allow(clippy::expect_used)]
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        #[allow(clippy::expect_used)]
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )
                .expect("valid metric"),
            )
        };
        #[allow(clippy::expect_used)]
        let int_gauge = |name: &str, help: &str| {
            register(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        #[allow(clippy::expect_used)]
        let gauge = |name: &str, help: &str| {
            register(&registry, Gauge::new(name, help).expect("valid metric"))
        };
        Metrics {
            http_requests: counter(
                "cdp_http_requests_total",
                "HTTP requests answered, by route, method and status.",
                &["route", "method", "status"],
            ),
            http_duration: histogram(
                "cdp_http_request_duration_seconds",
                "Time to answer an HTTP request (to the response head), by route.",
                &["route"],
            ),
            graphql_operations: counter(
                "cdp_graphql_operations_total",
                "GraphQL operations over HTTP, by operation name and outcome (ok or error).",
                &["operation", "outcome"],
            ),
            graphql_duration: histogram(
                "cdp_graphql_operation_duration_seconds",
                "Time to execute a GraphQL operation over HTTP, by operation name.",
                &["operation"],
            ),
            #[allow(clippy::expect_used)]
            graphql_compiled: register(
                &registry,
                IntCounter::new(
                    "cdp_graphql_compiled_total",
                    "GraphQL operations over HTTP answered by a compiled plan instead of the schema's executor (ADR 0016).",
                )
                .expect("valid metric"),
            ),
            operation_names: Mutex::new(HashSet::new()),
            ingested: counter(
                "cdp_ingest_messages_total",
                "Messages of the collection API and the GraphQL write path, by outcome (accepted, duplicate, rejected).",
                &["outcome"],
            ),
            rejected: counter(
                "cdp_ingest_rejected_total",
                "Rejected messages, by reason code.",
                &["reason"],
            ),
            emails: counter(
                "cdp_emails_total",
                "Outbox emails by result: sent, retried (a failed attempt to be repeated), failed (for good), suppressed.",
                &["result"],
            ),
            auth_standings: counter(
                "cdp_auth_standings_total",
                "Access-token authentications by where the session's standing came from: cache (kept under the tenant's unchanged auth_version, ADR 0017) or database.",
                &["source"],
            ),
            ingest_retries: counter(
                "cdp_ingest_retries_total",
                "Ingestion transactions begun again, by reason: stored_message (a first attempt met a stored message id, most often a message sent before: the retry looks stored messages up), profile_merged (a profile owning one of the batch's identifiers was merged by a concurrent batch between the lookup and the lock), conflict (an identifier or message written concurrently), transient (a deadlock, serialization failure or lost connection).",
                &["reason"],
            ),
            outbox_depth: int_gauge(
                "cdp_outbox_depth",
                "Emails waiting in the outbox (QUEUED or SENDING), all tenants, when scraped.",
            ),
            outbox_oldest_age: gauge(
                "cdp_outbox_oldest_age_seconds",
                "Age of the oldest email waiting in the outbox, 0 when none, when scraped.",
            ),
            websockets: int_gauge(
                "cdp_websockets_open",
                "GraphQL WebSocket connections open on this process.",
            ),
            subscriptions: int_gauge(
                "cdp_subscriptions_active",
                "GraphQL subscriptions running on this process.",
            ),
            scheduler_last_tick: gauge(
                "cdp_scheduler_last_tick_timestamp_seconds",
                "Unix time at which this process's scheduler last finished a tick (0: never).",
            ),
            scheduler_duration: histogram(
                "cdp_scheduler_tick_duration_seconds",
                "Time a scheduler tick took, by result (ok or error).",
                &["result"],
            ),
            scheduler_ticks: counter(
                "cdp_scheduler_ticks_total",
                "Scheduler ticks by result (ok or error).",
                &["result"],
            ),
            draining: int_gauge(
                "cdp_draining",
                "1 while the process is shutting down (readiness answers 503), else 0.",
            ),
            registry,
        }
    }

    /// One answered HTTP request.
    pub fn http_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.http_requests
            .with_label_values(&[route, method, status_label(status)])
            .inc();
        self.http_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// One executed GraphQL operation (of an HTTP request; a batch counts each operation).
    pub fn graphql_operation(&self, name: Option<&str>, ok: bool, elapsed: Duration) {
        let name = self.operation_label(name);
        self.graphql_operations
            .with_label_values(&[name.as_str(), if ok { "ok" } else { "error" }])
            .inc();
        self.graphql_duration
            .with_label_values(&[name.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    /// One access-token authentication, its standing `cached` or read from the database.
    pub fn auth_standing(&self, cached: bool) {
        self.auth_standings
            .with_label_values(&[if cached { "cache" } else { "database" }])
            .inc();
    }

    /// One ingestion transaction begun again, for `reason`.
    pub fn ingest_retry(&self, reason: IngestRetry) {
        self.ingest_retries
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// How many ingestion transactions were begun again for `reason` since the process started.
    pub fn ingest_retry_count(&self, reason: IngestRetry) -> u64 {
        self.ingest_retries
            .with_label_values(&[reason.label()])
            .get()
    }

    /// How many access-token authentications took their standing from the cache (`true`) or
    /// from the database (`false`) since the process started.
    pub fn auth_standing_count(&self, cached: bool) -> u64 {
        self.auth_standings
            .with_label_values(&[if cached { "cache" } else { "database" }])
            .get()
    }

    /// One operation answered by a compiled plan (counted besides [`Metrics::graphql_operation`]).
    pub fn graphql_compiled(&self) {
        self.graphql_compiled.inc();
    }

    /// How many operations compiled plans answered since the process started.
    pub fn graphql_compiled_count(&self) -> u64 {
        self.graphql_compiled.get()
    }

    /// The label of an operation name: `anonymous`, the name, or `other` past the cap or for a
    /// name that is not a GraphQL name.
    fn operation_label(&self, name: Option<&str>) -> String {
        let Some(name) = name.filter(|name| !name.is_empty()) else {
            return "anonymous".to_owned();
        };
        let valid = name.len() <= 64
            && name.chars().enumerate().all(|(index, char)| {
                char == '_' || char.is_ascii_alphabetic() || (index > 0 && char.is_ascii_digit())
            });
        if !valid {
            return "other".to_owned();
        }
        let Ok(mut names) = self.operation_names.lock() else {
            return "other".to_owned();
        };
        if names.contains(name) {
            return name.to_owned();
        }
        if names.len() >= MAX_OPERATION_NAMES {
            return "other".to_owned();
        }
        names.insert(name.to_owned());
        name.to_owned()
    }

    /// Messages of one ingested batch.
    pub fn ingested(&self, accepted: usize, duplicates: usize, rejected: &[&str]) {
        for (outcome, count) in [
            ("accepted", accepted),
            ("duplicate", duplicates),
            ("rejected", rejected.len()),
        ] {
            if count > 0 {
                self.ingested
                    .with_label_values(&[outcome])
                    .inc_by(count as u64);
            }
        }
        for reason in rejected {
            self.rejected.with_label_values(&[reason]).inc();
        }
    }

    /// One outbox email result: `sent`, `retried`, `failed` or `suppressed`.
    pub fn email(&self, result: &'static str) {
        self.emails.with_label_values(&[result]).inc();
    }

    /// One scheduler tick that ended at `finished_unix` seconds.
    pub fn scheduler_tick(&self, ok: bool, elapsed: Duration, finished_unix: f64) {
        let result = if ok { "ok" } else { "error" };
        self.scheduler_ticks.with_label_values(&[result]).inc();
        self.scheduler_duration
            .with_label_values(&[result])
            .observe(elapsed.as_secs_f64());
        if ok {
            self.scheduler_last_tick.set(finished_unix);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding metrics this registry built into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn status_label(status: u16) -> &'static str {
    const KNOWN: &[(u16, &str)] = &[
        (200, "200"),
        (204, "204"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (413, "413"),
        (429, "429"),
        (500, "500"),
        (503, "503"),
    ];
    KNOWN
        .iter()
        .find(|(code, _)| *code == status)
        .map(|(_, label)| *label)
        .unwrap_or(match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_are_bounded_and_checked() {
        let metrics = Metrics::new();
        assert_eq!(metrics.operation_label(None), "anonymous");
        assert_eq!(metrics.operation_label(Some("Profile")), "Profile");
        assert_eq!(metrics.operation_label(Some("a b")), "other");
        assert_eq!(metrics.operation_label(Some("9lives")), "other");
        for index in 1..MAX_OPERATION_NAMES {
            assert_eq!(
                metrics.operation_label(Some(&format!("Op{index}"))),
                format!("Op{index}")
            );
        }
        assert_eq!(metrics.operation_label(Some("OneTooMany")), "other");
        // A name seen before the cap keeps its label.
        assert_eq!(metrics.operation_label(Some("Profile")), "Profile");
    }

    #[test]
    fn render_shows_counters_with_their_labels() {
        let metrics = Metrics::new();
        metrics.http_request("/v1/batch", "POST", 200, Duration::from_millis(3));
        metrics.ingested(2, 1, &["invalid_timestamp"]);
        metrics.email("sent");
        let text = metrics.render();
        assert!(text.contains(
            "cdp_http_requests_total{method=\"POST\",route=\"/v1/batch\",status=\"200\"} 1"
        ));
        assert!(text.contains("cdp_ingest_messages_total{outcome=\"accepted\"} 2"));
        assert!(text.contains("cdp_ingest_messages_total{outcome=\"rejected\"} 1"));
        assert!(text.contains("cdp_ingest_rejected_total{reason=\"invalid_timestamp\"} 1"));
        assert!(text.contains("cdp_emails_total{result=\"sent\"} 1"));
        assert!(text.contains(
            "cdp_http_request_duration_seconds_bucket{route=\"/v1/batch\",le=\"0.005\"} 1"
        ));
    }
}
