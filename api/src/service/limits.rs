//! Request rate limits per client address and per tenant (GCRA through `governor`, kept per
//! process), so that GraphQL and the collection API refuse a flood before it costs a database
//! round trip or a password hash.
//!
//! Guarantees: a refusal says how long to wait, in whole seconds, at least one; a rate of 0 means
//! no limit; keys that have been quiet for longer than their burst are forgotten, so a flood of
//! spoofed addresses cannot grow the tables without bound.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::AbuseLimits;
use domain::TenantId;

/// How long a refused client should wait before trying again, as `Retry-After` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter {
    /// Whole seconds, rounded up, at least one.
    pub seconds: u64,
}

impl RetryAfter {
    fn from_wait(wait: Duration) -> RetryAfter {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        RetryAfter {
            seconds: seconds.max(1),
        }
    }
}

/// One rate per key, with its burst.
struct Keyed<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    /// The time one request's worth of the rate takes to come back.
    interval: Duration,
    burst: NonZeroU32,
    checks: AtomicU64,
}

/// How many checks pass between two sweeps of forgotten keys.
const SWEEP_EVERY: u64 = 4096;

impl<K: Hash + Eq + Clone> Keyed<K> {
    /// `None` when the rate is 0 (no limit).
    fn new(per_minute: u32, burst_secs: u32) -> Option<Keyed<K>> {
        let rate = NonZeroU32::new(per_minute)?;
        let burst_cells = u64::from(per_minute) * u64::from(burst_secs) / 60;
        let burst = NonZeroU32::new(u32::try_from(burst_cells).unwrap_or(u32::MAX))
            .unwrap_or(NonZeroU32::MIN);
        Some(Keyed {
            limiter: RateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst)),
            interval: Duration::from_secs(60) / rate.get(),
            burst,
            checks: AtomicU64::new(0),
        })
    }

    /// Takes `cost` requests from the key's budget, or says how long to wait.
    fn check(&self, key: &K, cost: usize) -> Result<(), RetryAfter> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        let cost = u32::try_from(cost.max(1)).unwrap_or(u32::MAX);
        let cells = NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_key_n(key, cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(RetryAfter::from_wait(
                not_until.wait_time_from(self.limiter.clock().now()),
            )),
            // More than the whole burst at once can never pass: the client must send less, and
            // is told to wait until a full burst has come back.
            Err(_) => Err(RetryAfter::from_wait(self.interval * self.burst.get())),
        }
    }
}

/// The rate limits of one process.
pub struct RequestLimits {
    graphql_per_ip: Option<Keyed<IpAddr>>,
    graphql_per_tenant: Option<Keyed<TenantId>>,
    ingest_per_ip: Option<Keyed<IpAddr>>,
}

impl RequestLimits {
    pub fn new(limits: &AbuseLimits) -> RequestLimits {
        RequestLimits {
            graphql_per_ip: Keyed::new(limits.graphql_per_ip_per_minute, limits.burst_secs),
            graphql_per_tenant: Keyed::new(limits.graphql_per_tenant_per_minute, limits.burst_secs),
            ingest_per_ip: Keyed::new(limits.ingest_per_ip_per_minute, limits.burst_secs),
        }
    }

    /// `operations` GraphQL operations (or one WebSocket connect) from `ip`.
    pub fn graphql_from_ip(&self, ip: IpAddr, operations: usize) -> Result<(), RetryAfter> {
        check(&self.graphql_per_ip, &ip, operations)
    }

    /// `operations` GraphQL operations (or one `connection_init`) of `tenant_id`.
    pub fn graphql_of_tenant(
        &self,
        tenant_id: TenantId,
        operations: usize,
    ) -> Result<(), RetryAfter> {
        check(&self.graphql_per_tenant, &tenant_id, operations)
    }

    /// One collection API request from `ip`.
    pub fn ingest_from_ip(&self, ip: IpAddr) -> Result<(), RetryAfter> {
        check(&self.ingest_per_ip, &ip, 1)
    }
}

fn check<K: Hash + Eq + Clone>(
    limit: &Option<Keyed<K>>,
    key: &K,
    cost: usize,
) -> Result<(), RetryAfter> {
    match limit {
        Some(limit) => limit.check(key, cost),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_minute: u32, burst_secs: u32) -> RequestLimits {
        let mut config =
            crate::config::Config::for_tests(std::path::Path::new("."), "sqlite::memory:");
        config.abuse.graphql_per_ip_per_minute = per_minute;
        config.abuse.graphql_per_tenant_per_minute = per_minute;
        config.abuse.ingest_per_ip_per_minute = per_minute;
        config.abuse.burst_secs = burst_secs;
        RequestLimits::new(&config.abuse)
    }

    #[test]
    fn an_address_over_its_burst_is_told_to_wait_and_others_are_not() {
        // 6 a minute with a burst of 30 seconds' worth: 3 at once, then one every 10 seconds.
        let limits = limits(6, 30);
        let ip: IpAddr = [192, 0, 2, 1].into();
        for _ in 0..3 {
            assert_eq!(limits.ingest_from_ip(ip), Ok(()));
        }
        let wait = limits.ingest_from_ip(ip).unwrap_err();
        assert!((1..=10).contains(&wait.seconds), "{wait:?}");
        assert_eq!(limits.ingest_from_ip([192, 0, 2, 2].into()), Ok(()));
        assert_eq!(
            limits.graphql_from_ip(ip, 1),
            Ok(()),
            "GraphQL and ingestion count apart"
        );
    }

    #[test]
    fn operations_count_one_by_one_and_more_than_a_burst_never_pass() {
        let limits = limits(60, 10);
        let tenant = TenantId(uuid::Uuid::new_v4());
        assert_eq!(limits.graphql_of_tenant(tenant, 10), Ok(()));
        assert!(limits.graphql_of_tenant(tenant, 1).is_err());
        let other = TenantId(uuid::Uuid::new_v4());
        let refused = limits.graphql_of_tenant(other, 11).unwrap_err();
        assert_eq!(refused.seconds, 10, "a whole burst must come back first");
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let limits = limits(0, 10);
        let ip: IpAddr = [192, 0, 2, 1].into();
        for _ in 0..10_000 {
            assert_eq!(limits.graphql_from_ip(ip, 10), Ok(()));
        }
    }
}
