//! A small HTTP load generator for the read scenarios, over loopback.
//!
//! Two modes:
//! - closed loop ([`closed`]): C connections, each sending its next request as soon as the
//!   previous answer has arrived, for a fixed time; it measures throughput;
//! - open loop ([`open`]): requests start on a fixed schedule (R a second) whatever the answers
//!   do, and each latency runs from the request's *scheduled* start, so that a slow answer
//!   cannot hide the requests it delays (no coordinated omission); it measures latency at a
//!   given rate.
//!
//! Every answer's body is read and checked: a status other than 200, a body that is not JSON,
//! a GraphQL `errors` entry or a failed shape check counts, and the run reports the counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

/// Builds the `n`-th request of a run.
pub type MakeRequest = Arc<dyn Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync>;
/// Checks one answer's JSON body (beyond GraphQL `errors`); `Err` counts as a bad answer.
pub type CheckBody = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// What is sent, and how an answer is judged.
#[derive(Clone)]
pub struct Target {
    pub make: MakeRequest,
    pub check: CheckBody,
}

/// What one run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub elapsed: Duration,
    pub requests: u64,
    /// Entries of GraphQL `errors` arrays, summed over all answers.
    pub graphql_errors: u64,
    /// Answers that were not 200, not JSON, or failed the shape check, and requests not sent.
    pub failures: u64,
    pub first_failure: Option<String>,
    /// Requests sent before the clock started (closed loop only).
    pub warmups: u64,
    latencies: Vec<Duration>,
}

/// The figures of a run, as they go into the JSON lines.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub requests: u64,
    pub seconds: f64,
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub graphql_errors: u64,
    pub failures: u64,
}

impl Outcome {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at quantile `q` (0 to 1), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index].as_secs_f64() * 1e3
    }

    pub fn figures(&self) -> Figures {
        Figures {
            requests: self.requests,
            seconds: crate::harness::round(self.elapsed.as_secs_f64(), 2),
            per_s: crate::harness::round(self.per_second(), 1),
            p50_ms: crate::harness::round(self.quantile_ms(0.50), 2),
            p99_ms: crate::harness::round(self.quantile_ms(0.99), 2),
            max_ms: crate::harness::round(self.quantile_ms(1.0), 2),
            graphql_errors: self.graphql_errors,
            failures: self.failures,
        }
    }

    fn add(&mut self, answer: Answer, latency: Duration) {
        self.requests += 1;
        self.latencies.push(latency);
        self.graphql_errors += answer.graphql_errors;
        if let Some(reason) = answer.failure {
            self.failures += 1;
            self.first_failure.get_or_insert(reason);
        }
    }

    /// Two runs of the same target as one: their requests over their summed time.
    pub fn joined(mut self, other: Outcome) -> Outcome {
        self.elapsed += other.elapsed;
        self.warmups += other.warmups;
        self.merge(other);
        self
    }

    fn merge(&mut self, other: Outcome) {
        self.requests += other.requests;
        self.graphql_errors += other.graphql_errors;
        self.failures += other.failures;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        self.latencies.extend(other.latencies);
    }
}

/// One answer, judged.
struct Answer {
    graphql_errors: u64,
    failure: Option<String>,
}

async fn send(client: &reqwest::Client, target: &Target, n: u64) -> Answer {
    let failed = |reason: String| Answer {
        graphql_errors: 0,
        failure: Some(reason),
    };
    let response = match (target.make)(client, n).send().await {
        Ok(response) => response,
        Err(error) => return failed(format!("not sent: {error}")),
    };
    let status = response.status();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) => return failed(format!("{status}, body unreadable: {error}")),
    };
    if status != reqwest::StatusCode::OK {
        let shown: String = String::from_utf8_lossy(&body).chars().take(300).collect();
        return failed(format!("{status}: {shown}"));
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => return failed(format!("not JSON: {error}")),
    };
    let graphql_errors = value
        .get("errors")
        .map(|errors| errors.as_array().map_or(1, |list| list.len().max(1) as u64))
        .unwrap_or(0);
    let failure = if graphql_errors > 0 {
        Some(format!(
            "GraphQL errors: {}",
            value["errors"]
                .to_string()
                .chars()
                .take(300)
                .collect::<String>()
        ))
    } else {
        (target.check)(&value).err()
    };
    Answer {
        graphql_errors,
        failure,
    }
}

/// A client for `connections` concurrent connections to one host.
pub fn client(connections: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .build()?)
}

/// Closed loop: `connections` workers send one request after another for `duration`; requests
/// still in flight at the end are counted when they finish (the clock stops at the last answer).
pub async fn closed(target: &Target, connections: usize, duration: Duration) -> Outcome {
    let client = match client(connections) {
        Ok(client) => client,
        Err(error) => {
            return Outcome {
                failures: 1,
                first_failure: Some(error.to_string()),
                ..Outcome::default()
            }
        }
    };
    // Warm up: open the connections and fill the server's caches, outside the clock.
    let mut warmups = Vec::new();
    for worker in 0..connections {
        let (client, target) = (client.clone(), target.clone());
        warmups.push(tokio::spawn(async move {
            for n in 0..5 {
                send(&client, &target, 1_000_000 + (worker * 5 + n) as u64).await;
            }
        }));
    }
    for warmup in warmups {
        let _ = warmup.await;
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (client, target, next) = (client.clone(), target.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut outcome = Outcome::default();
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let answer = send(&client, &target, n).await;
                outcome.add(answer, sent.elapsed());
            }
            outcome
        }));
    }
    let mut total = Outcome::default();
    for worker in workers {
        match worker.await {
            Ok(outcome) => total.merge(outcome),
            Err(error) => {
                total.failures += 1;
                total.first_failure.get_or_insert(error.to_string());
            }
        }
    }
    total.elapsed = started.elapsed();
    total.warmups = connections as u64 * 5;
    total
}

/// Open loop: request `n` starts at `start + n / rate`, for `duration`; its latency runs from that
/// scheduled instant to its checked answer. The clock stops at the last answer.
pub async fn open(target: &Target, rate: u32, duration: Duration) -> Outcome {
    let total_requests = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let client = match client(256) {
        Ok(client) => client,
        Err(error) => {
            return Outcome {
                failures: 1,
                first_failure: Some(error.to_string()),
                ..Outcome::default()
            }
        }
    };
    // Warm up a few connections outside the clock.
    for n in 0..20 {
        send(&client, target, 2_000_000 + n).await;
    }
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total_requests as usize);
    for n in 0..total_requests {
        let scheduled = started + interval.mul_f64(n as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, target, outcome) = (client.clone(), target.clone(), outcome.clone());
        tasks.push(tokio::spawn(async move {
            let answer = send(&client, &target, n).await;
            let latency = scheduled.elapsed();
            if let Ok(mut outcome) = outcome.lock() {
                outcome.add(answer, latency);
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed();
    let mut total = match Arc::try_unwrap(outcome) {
        Ok(mutex) => mutex.into_inner().unwrap_or_default(),
        Err(shared) => shared
            .lock()
            .map(|mut outcome| std::mem::take(&mut *outcome))
            .unwrap_or_default(),
    };
    total.elapsed = elapsed;
    total
}
