//! Retry delays: 1 s doubling up to a ceiling, each drawn from 50–100 % of its step so many
//! senders that failed together do not retry together.

use std::time::Duration;

const FIRST: Duration = Duration::from_secs(1);

/// The delays before successive retries of one thing.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Backoff {
        Backoff {
            step: FIRST.min(max),
            max,
        }
    }

    /// The next delay; `fraction` in [0, 1] picks where in 50–100 % of the step it falls.
    pub(crate) fn next_with(&mut self, fraction: f64) -> Duration {
        let fraction = fraction.clamp(0.0, 1.0);
        let delay = self.step.mul_f64(0.5 + 0.5 * fraction);
        self.step = self.step.saturating_mul(2).min(self.max);
        delay
    }

    /// The next delay, with a random jitter.
    pub(crate) fn next(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_one_second_to_the_ceiling() {
        let mut b = Backoff::new(Duration::from_secs(5));
        let steps: Vec<_> = (0..5).map(|_| b.next_with(1.0)).collect();
        assert_eq!(
            steps,
            [1, 2, 4, 5, 5].map(Duration::from_secs).to_vec(),
            "full steps"
        );
        let mut b = Backoff::new(Duration::from_secs(5));
        assert_eq!(
            b.next_with(0.0),
            Duration::from_millis(500),
            "half the step"
        );
    }

    #[test]
    fn a_ceiling_below_one_second_caps_the_first_step() {
        let mut b = Backoff::new(Duration::from_millis(40));
        assert_eq!(b.next_with(1.0), Duration::from_millis(40));
        assert_eq!(b.next_with(1.0), Duration::from_millis(40));
    }

    #[test]
    fn jitter_stays_within_half_and_full_step() {
        let mut b = Backoff::new(Duration::from_secs(300));
        let mut step = Duration::from_secs(1);
        for _ in 0..20 {
            let d = b.next();
            assert!(d >= step / 2 && d <= step, "{d:?} for step {step:?}");
            step = (step * 2).min(Duration::from_secs(300));
        }
    }
}
