//! Throttling of failed logins per account (tenant slug and email), kept in this process.
//! With several replicas each keeps its own count, so the effective limit is per replica; the
//! constant-time verification makes guessing slow regardless.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LoginThrottle {
    max_failures: u32,
    window: Duration,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginThrottle {
    pub fn new(max_failures: u32, window: Duration) -> LoginThrottle {
        LoginThrottle {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn key(slug: &str, email: &str) -> String {
        format!(
            "{}\u{0}{}",
            slug.trim().to_lowercase(),
            email.trim().to_lowercase()
        )
    }

    /// `Err(retry_after)` when the account has failed too often within the window.
    pub fn check(&self, slug: &str, email: &str, now: Instant) -> Result<(), Duration> {
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match failures.get(&Self::key(slug, email)) {
            Some((count, since))
                if *count >= self.max_failures && now.duration_since(*since) < self.window =>
            {
                Err(self.window - now.duration_since(*since))
            }
            _ => Ok(()),
        }
    }

    pub fn record_failure(&self, slug: &str, email: &str, now: Instant) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if failures.len() > 100_000 {
            // Bound the memory an attacker can make us hold: forget expired entries.
            let window = self.window;
            failures.retain(|_, (_, since)| now.duration_since(*since) < window);
        }
        let entry = failures.entry(Self::key(slug, email)).or_insert((0, now));
        if now.duration_since(entry.1) >= self.window {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    pub fn record_success(&self, slug: &str, email: &str) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        failures.remove(&Self::key(slug, email));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_failures_lock_the_account_for_the_window() {
        let throttle = LoginThrottle::new(3, Duration::from_secs(60));
        let start = Instant::now();
        for _ in 0..3 {
            assert!(throttle.check("acme", "a@b.co", start).is_ok());
            throttle.record_failure("acme", "A@b.co", start);
        }
        assert!(throttle.check("acme", "a@b.co", start).is_err());
        assert!(throttle.check("acme", "other@b.co", start).is_ok());
        assert!(throttle
            .check("acme", "a@b.co", start + Duration::from_secs(61))
            .is_ok());
    }
}
