//! Rate limits of the collection API, per tenant and per api key, in messages per second
//! (GCRA through `governor`; a burst of five seconds' worth). Kept per process.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

#[derive(Default)]
pub struct RateLimits {
    limiters: Mutex<HashMap<Uuid, (u32, Arc<DefaultDirectRateLimiter>)>>,
}

impl RateLimits {
    fn limiter(&self, scope: Uuid, per_second: NonZeroU32) -> Arc<DefaultDirectRateLimiter> {
        let mut limiters = self
            .limiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match limiters.get(&scope) {
            Some((rate, limiter)) if *rate == per_second.get() => limiter.clone(),
            _ => {
                let burst =
                    per_second.saturating_mul(NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN));
                let limiter = Arc::new(RateLimiter::direct(
                    Quota::per_second(per_second).allow_burst(burst),
                ));
                limiters.insert(scope, (per_second.get(), limiter.clone()));
                limiter
            }
        }
    }

    /// Takes `messages` from the budget of every scope, or says how long to wait.
    /// A rate of 0 means no limit.
    pub fn check(&self, scopes: &[Uuid], per_second: u32, messages: usize) -> Result<(), Duration> {
        let Some(rate) = NonZeroU32::new(per_second) else {
            return Ok(());
        };
        let wanted = u32::try_from(messages.max(1)).unwrap_or(u32::MAX);
        for scope in scopes {
            let limiter = self.limiter(*scope, rate);
            // A request larger than the whole burst takes the whole burst.
            let burst = rate.get().saturating_mul(5);
            let cells = NonZeroU32::new(wanted.min(burst)).unwrap_or(NonZeroU32::MIN);
            match limiter.check_n(cells) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    return Err(not_until.wait_time_from(DefaultClock::default().now()))
                }
                Err(_) => return Err(Duration::from_secs(1)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_over_its_budget_is_told_to_wait() {
        let limits = RateLimits::default();
        let tenant = Uuid::new_v4();
        assert!(
            limits.check(&[tenant], 10, 50).is_ok(),
            "the burst is five seconds' worth"
        );
        let wait = limits.check(&[tenant], 10, 10).unwrap_err();
        assert!(wait > Duration::ZERO);
        assert!(
            limits.check(&[Uuid::new_v4()], 10, 10).is_ok(),
            "other tenants are unaffected"
        );
        assert!(
            limits.check(&[tenant], 0, 1_000_000).is_ok(),
            "0 means no limit"
        );
    }
}
