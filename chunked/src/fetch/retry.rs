//! How hard a fetch tries before it reports failure: [`RetryPolicy`], attempts and
//! exponential backoff bounded by a deadline.

use std::time::Duration;

/// How hard a fetch tries before it reports failure.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per read, the first included.
    pub attempts: u32,
    /// Give up once this much time has passed since a read's first attempt.
    pub deadline: Duration,
    /// First wait between attempts; doubles each time.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Fetches of a chunk that failed verification before it is reported corrupt.
    pub corrupt_refetches: u32,
    /// How long chunks other processes are fetching may see none published before the
    /// rest are fetched here (a frozen or stalled peer is overtaken).
    pub peer_patience: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::within(Duration::from_secs(60))
    }
}

impl RetryPolicy {
    /// Retries of a read for up to `deadline`, the one bound: as many attempts as the
    /// backoff fits in it (so the count never ends the retries before the time does).
    pub fn within(deadline: Duration) -> Self {
        let mut policy = Self {
            attempts: 1,
            deadline,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            corrupt_refetches: 1,
            peer_patience: Duration::from_secs(1),
        };
        policy.attempts = policy.attempts_within();
        policy
    }

    /// Attempts whose waits alone fit in the deadline, the first included (each attempt
    /// takes time too: the deadline comes first).
    pub(super) fn attempts_within(&self) -> u32 {
        let mut waited = Duration::ZERO;
        let mut attempts = 1u32;
        while waited < self.deadline && attempts < u32::MAX {
            let wait = self.backoff(attempts - 1);
            if wait.is_zero() {
                return u32::MAX; // no waits at all: only the deadline bounds the attempts
            }
            waited += wait;
            attempts += 1;
        }
        attempts
    }

    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        self.initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy without waits between attempts is bounded by its deadline alone, at once
    /// (the count of attempts used to be found by looping up to `u32::MAX`).
    #[test]
    fn no_backoff_leaves_the_attempts_to_the_deadline() {
        let policy = RetryPolicy {
            initial_backoff: Duration::ZERO,
            deadline: Duration::from_secs(5),
            ..RetryPolicy::default()
        };
        let t = std::time::Instant::now();
        assert_eq!(policy.attempts_within(), u32::MAX);
        // Counting to u32::MAX took seconds; a second is far from either.
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    /// The waits between the attempts a policy allows, all added up.
    fn waits(policy: &RetryPolicy) -> Duration {
        (0..policy.attempts.saturating_sub(1))
            .map(|a| policy.backoff(a))
            .sum()
    }

    #[test]
    fn retries_within_a_deadline_are_bounded_by_the_time_not_the_count() {
        for secs in [1, 10, 29, 35, 60, 600] {
            let policy = RetryPolicy::within(Duration::from_secs(secs));
            assert!(
                waits(&policy) >= policy.deadline,
                "{secs} s: {} attempts wait only {:?}",
                policy.attempts,
                waits(&policy)
            );
        }
        assert_eq!(
            RetryPolicy::default().deadline,
            Duration::from_secs(60),
            "the default bound"
        );
    }
}
