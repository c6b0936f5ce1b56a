//! One token bucket: a budget of tokens that refills linearly over time, an optional one-time
//! burst on top, and debt left behind by requests larger than the whole bucket.
//!
//! All arithmetic is integer: tokens and nanoseconds are `u64`, products of the two are `u128`
//! (which holds `u64::MAX * u64::MAX`), so no size or refill time can overflow or lose tokens to
//! rounding.

use std::time::{Duration, Instant};

use crate::config::TokenBucketConfig;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The longest refill time a bucket accepts: `u64::MAX` nanoseconds, about 584 years.
pub const MAX_REFILL_TIME: Duration = Duration::from_nanos(u64::MAX);

/// Why a bucket's parameters were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BucketError {
    /// A bucket that holds no tokens could never grant anything.
    #[error(
        "token bucket size is 0 (refill time {refill_time:?}): a bucket must hold at least one \
         token; leave the limit out to disable it"
    )]
    ZeroSize {
        /// The refill time given with it.
        refill_time: Duration,
    },
    /// A bucket must take some time to refill, or it would not limit anything.
    #[error(
        "token bucket of {size} tokens has a refill time of 0: it must take some time to refill"
    )]
    ZeroRefillTime {
        /// The size given with it.
        size: u64,
    },
    /// The refill time does not fit in 64 bits of nanoseconds.
    #[error("token bucket refill time {refill_time:?} is too long: at most {MAX_REFILL_TIME:?}")]
    RefillTimeTooLong {
        /// The refill time given.
        refill_time: Duration,
    },
}

/// Checks a bucket's parameters; returns the refill time in nanoseconds.
pub(crate) fn validate(size: u64, refill_time: Duration) -> Result<u64, BucketError> {
    if size == 0 {
        return Err(BucketError::ZeroSize { refill_time });
    }
    if refill_time.is_zero() {
        return Err(BucketError::ZeroRefillTime { size });
    }
    u64::try_from(refill_time.as_nanos())
        .map_err(|_| BucketError::RefillTimeTooLong { refill_time })
}

/// The outcome of [`TokenBucket::reduce`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BucketReduction {
    /// The tokens were taken.
    Success,
    /// Not enough tokens yet; nothing was taken.
    Failure,
    /// The request was larger than the whole bucket, so it could never have been served from the
    /// budget: it was granted anyway, and the bucket is now in debt. The value is the debt as a
    /// multiple of the bucket size, i.e. how many refill times pass before the bucket grants
    /// anything again.
    OverConsumption(f64),
}

/// A token bucket. It holds up to `size` tokens and starts full; `size` tokens accrue every
/// `refill_time`, in whole tokens, with the remainder carried exactly. A one-time burst is spent
/// before the budget and never refills.
///
/// Every method that depends on time has an `_at` form that takes the current instant, so that
/// tests can drive the clock; the plain forms read the monotonic clock ([`Instant::now`]).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_nanos: u64,
    initial_one_time_burst: u64,
    one_time_burst: u64,
    budget: u64,
    /// Tokens granted beyond the budget by an over-consumption; paid by refills before the budget
    /// grows again. Non-zero only while `budget` is 0.
    debt: u64,
    /// Progress towards the next whole token, in token-nanoseconds: `elapsed * size` accumulates
    /// here and each `refill_nanos` of it is one token. Always below `refill_nanos`.
    partial: u128,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket of `size` tokens, refilled every `refill_time`, with `one_time_burst` extra
    /// tokens to spend once.
    pub fn new(size: u64, one_time_burst: u64, refill_time: Duration) -> Result<Self, BucketError> {
        Self::new_at(size, one_time_burst, refill_time, Instant::now())
    }

    /// [`TokenBucket::new`] with the clock reading `now`.
    pub fn new_at(
        size: u64,
        one_time_burst: u64,
        refill_time: Duration,
        now: Instant,
    ) -> Result<Self, BucketError> {
        let refill_nanos = validate(size, refill_time)?;
        Ok(Self {
            size,
            refill_nanos,
            initial_one_time_burst: one_time_burst,
            one_time_burst,
            budget: size,
            debt: 0,
            partial: 0,
            last_update: now,
        })
    }

    /// A bucket built from a configuration, with the clock reading `now`.
    pub fn from_config_at(config: &TokenBucketConfig, now: Instant) -> Result<Self, BucketError> {
        Self::new_at(config.size, config.one_time_burst, config.refill_time(), now)
    }

    /// How many tokens the bucket holds when full.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How long an empty bucket takes to fill.
    pub fn refill_time(&self) -> Duration {
        Duration::from_nanos(self.refill_nanos)
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// The one-time burst as configured.
    pub fn initial_one_time_burst(&self) -> u64 {
        self.initial_one_time_burst
    }

    /// The budget as of the last update (call [`TokenBucket::budget_at`] to refill first).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The budget once the refills up to `now` are counted.
    pub fn budget_at(&mut self, now: Instant) -> u64 {
        self.refill_at(now);
        self.budget
    }

    /// Tokens owed after an over-consumption, as of the last update.
    pub fn debt(&self) -> u64 {
        self.debt
    }

    /// Credits the tokens that accrued since the last update: first to the debt, then to the
    /// budget, up to `size`. An instant earlier than the last update counts as no time.
    pub fn refill_at(&mut self, now: Instant) {
        let Some(elapsed) = now.checked_duration_since(self.last_update) else {
            return;
        };
        self.last_update = now;
        if self.budget == self.size {
            // A full bucket accrues nothing; the remainder must not carry over either.
            self.partial = 0;
            return;
        }
        let elapsed_nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // partial < refill_nanos <= u64::MAX and elapsed * size <= u64::MAX^2, so the sum is
        // below u128::MAX.
        let progress = self.partial + u128::from(elapsed_nanos) * u128::from(self.size);
        let refill = u128::from(self.refill_nanos);
        self.partial = progress % refill;
        let mut tokens = u64::try_from(progress / refill).unwrap_or(u64::MAX);
        let paid = tokens.min(self.debt);
        self.debt -= paid;
        tokens -= paid;
        self.budget = self.budget.saturating_add(tokens).min(self.size);
        if self.budget == self.size {
            self.partial = 0;
        }
    }

    /// Takes `tokens` at the current time. See [`TokenBucket::reduce_at`].
    pub fn reduce(&mut self, tokens: u64) -> BucketReduction {
        self.reduce_at(tokens, Instant::now())
    }

    /// Takes `tokens`, spending the one-time burst first and then the budget.
    ///
    /// A request that does not fit fails and takes nothing, unless it is larger than a full
    /// bucket (after the burst): such a request could never fit, so it is granted once the bucket
    /// has no debt, and the bucket owes the difference ([`BucketReduction::OverConsumption`]).
    /// While in debt, only the one-time burst (if an update granted a new one) can serve requests.
    pub fn reduce_at(&mut self, tokens: u64, now: Instant) -> BucketReduction {
        self.refill_at(now);
        if tokens <= self.one_time_burst {
            self.one_time_burst -= tokens;
            return BucketReduction::Success;
        }
        let rest = tokens - self.one_time_burst;
        if self.debt > 0 {
            return BucketReduction::Failure;
        }
        if rest <= self.budget {
            self.one_time_burst = 0;
            self.budget -= rest;
            return BucketReduction::Success;
        }
        if rest > self.size {
            self.one_time_burst = 0;
            self.debt = rest - self.budget;
            self.budget = 0;
            #[allow(clippy::cast_precision_loss)] // a ratio for information; precision is moot
            let ratio = self.debt as f64 / self.size as f64;
            return BucketReduction::OverConsumption(ratio);
        }
        BucketReduction::Failure
    }

    /// How long from `now` until [`TokenBucket::reduce_at`] of `tokens` stops failing: zero if it
    /// would succeed (or over-consume) now.
    pub fn time_until_at(&mut self, tokens: u64, now: Instant) -> Duration {
        self.refill_at(now);
        if tokens <= self.one_time_burst {
            return Duration::ZERO;
        }
        let rest = tokens - self.one_time_burst;
        let needed = if rest > self.size {
            // Granted as soon as the debt is paid.
            self.debt
        } else {
            // The debt first, then the budget up to `rest` (budget is 0 while in debt).
            self.debt + rest.saturating_sub(self.budget)
        };
        self.accrual_time(needed)
    }

    /// How long from the last update until the debt is paid.
    pub fn time_until_debt_paid(&self) -> Duration {
        self.accrual_time(self.debt)
    }

    /// How long until `needed` more tokens have accrued, counting the partial token in progress.
    fn accrual_time(&self, needed: u64) -> Duration {
        if needed == 0 {
            return Duration::ZERO;
        }
        // needed >= 1 and partial < refill_nanos, so this does not underflow; both factors are
        // u64, so the product fits.
        let work = u128::from(needed) * u128::from(self.refill_nanos) - self.partial;
        duration_from_nanos(work.div_ceil(u128::from(self.size)))
    }

    /// Gives `tokens` back (say, what a request took before a later check refused it): first to
    /// the debt, then to the budget up to `size`, then to the one-time burst up to its configured
    /// value. Never raises anything above what the configuration allows.
    pub fn replenish(&mut self, tokens: u64) {
        let mut tokens = tokens;
        let paid = tokens.min(self.debt);
        self.debt -= paid;
        tokens -= paid;
        let room = self.size - self.budget;
        let to_budget = tokens.min(room);
        self.budget += to_budget;
        tokens -= to_budget;
        self.one_time_burst =
            self.one_time_burst.saturating_add(tokens).min(self.initial_one_time_burst);
        if self.budget == self.size {
            self.partial = 0;
        }
    }

    /// Changes the bucket's parameters in place, keeping as much of its state as the new
    /// parameters allow:
    ///
    /// - refills up to `now` at the old rate, then accrues at the new one, carrying the partial
    ///   token over as the same fraction of a token;
    /// - keeps the budget, capped at the new size (it neither jumps to full nor empties);
    /// - keeps any debt;
    /// - keeps what is left of the one-time burst if `one_time_burst` equals the configured one
    ///   (so re-applying the same configuration grants nothing), and otherwise grants the new
    ///   `one_time_burst` afresh.
    ///
    /// On error nothing changes.
    pub fn update_at(
        &mut self,
        size: u64,
        one_time_burst: u64,
        refill_time: Duration,
        now: Instant,
    ) -> Result<(), BucketError> {
        let refill_nanos = validate(size, refill_time)?;
        self.refill_at(now);
        // partial < old refill_nanos, so the result is below the new refill_nanos.
        self.partial = self.partial * u128::from(refill_nanos) / u128::from(self.refill_nanos);
        self.size = size;
        self.refill_nanos = refill_nanos;
        self.budget = self.budget.min(size);
        if self.budget == size {
            self.partial = 0;
        }
        if one_time_burst != self.initial_one_time_burst {
            self.initial_one_time_burst = one_time_burst;
            self.one_time_burst = one_time_burst;
        }
        Ok(())
    }
}

/// A nanosecond count as a `Duration`, saturating at `Duration::MAX`.
fn duration_from_nanos(nanos: u128) -> Duration {
    let Ok(secs) = u64::try_from(nanos / NANOS_PER_SEC) else {
        return Duration::MAX;
    };
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, subsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn rejects_degenerate_parameters() {
        let t0 = Instant::now();
        assert_eq!(
            TokenBucket::new_at(0, 0, SEC, t0).unwrap_err(),
            BucketError::ZeroSize { refill_time: SEC }
        );
        assert_eq!(
            TokenBucket::new_at(0, 100, Duration::ZERO, t0).unwrap_err(),
            BucketError::ZeroSize { refill_time: Duration::ZERO }
        );
        assert_eq!(
            TokenBucket::new_at(5, 0, Duration::ZERO, t0).unwrap_err(),
            BucketError::ZeroRefillTime { size: 5 }
        );
        let too_long = MAX_REFILL_TIME + Duration::from_nanos(1);
        assert_eq!(
            TokenBucket::new_at(5, 0, too_long, t0).unwrap_err(),
            BucketError::RefillTimeTooLong { refill_time: too_long }
        );
        assert!(TokenBucket::new_at(5, 0, MAX_REFILL_TIME, t0).is_ok());
        let message = TokenBucket::new_at(0, 0, SEC, t0).unwrap_err().to_string();
        assert!(message.contains("size is 0"), "{message}");
    }

    #[test]
    fn starts_full_and_refills_linearly() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(1000, 0, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(1000, t0), BucketReduction::Success);
        assert_eq!(bucket.budget(), 0);
        assert_eq!(bucket.budget_at(t0 + 100 * MS), 100);
        assert_eq!(bucket.budget_at(t0 + 250 * MS), 250);
        // Never above the size.
        assert_eq!(bucket.budget_at(t0 + 10 * SEC), 1000);
    }

    #[test]
    fn fractional_tokens_carry_over() {
        // 3 tokens per second: one every 333.33 ms. Many small steps must add up exactly.
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(3, 0, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(3, t0), BucketReduction::Success);
        let mut now = t0;
        for _ in 0..1000 {
            now += MS;
            bucket.refill_at(now);
        }
        assert_eq!(bucket.budget(), 3);
        assert_eq!(bucket.reduce_at(3, now), BucketReduction::Success);
        // 7 ms steps for 1 s: 142 steps = 994 ms -> 2 tokens (at 333.3 and 666.7 ms).
        for _ in 0..142 {
            now += 7 * MS;
            bucket.refill_at(now);
        }
        assert_eq!(bucket.budget(), 2);
    }

    #[test]
    fn failure_takes_nothing() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(100, 10, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(105, t0), BucketReduction::Success);
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (0, 5));
        assert_eq!(bucket.reduce_at(6, t0), BucketReduction::Failure);
        assert_eq!((bucket.one_time_burst(), bucket.budget(), bucket.debt()), (0, 5, 0));

        // With burst left (granted by an update), a failing request takes neither the burst
        // nor the budget.
        let mut bucket = TokenBucket::new_at(100, 0, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(90, t0), BucketReduction::Success);
        bucket.update_at(100, 20, SEC, t0).unwrap();
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (20, 10));
        assert_eq!(bucket.reduce_at(40, t0), BucketReduction::Failure);
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (20, 10));
        assert_eq!(bucket.reduce_at(30, t0), BucketReduction::Success);
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (0, 0));
    }

    #[test]
    fn burst_is_spent_first_and_never_refills() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(100, 50, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(30, t0), BucketReduction::Success);
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (20, 100));
        assert_eq!(bucket.reduce_at(30, t0), BucketReduction::Success);
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (0, 90));
        // A long time later: the budget is full again, the burst stays spent.
        assert_eq!(bucket.budget_at(t0 + 3600 * SEC), 100);
        assert_eq!(bucket.one_time_burst(), 0);
        assert_eq!(bucket.reduce_at(101, t0 + 3600 * SEC), BucketReduction::OverConsumption(0.01));
    }

    #[test]
    fn over_consumption_leaves_debt_that_refills_pay() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(1000, 0, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(400, t0), BucketReduction::Success);
        // 2500 > 1000: granted, owing 2500 - 600.
        assert_eq!(bucket.reduce_at(2500, t0), BucketReduction::OverConsumption(1.9));
        assert_eq!((bucket.budget(), bucket.debt()), (0, 1900));
        assert_eq!(bucket.time_until_debt_paid(), 1900 * MS);
        // Only once: a second huge request waits for the debt.
        assert_eq!(bucket.reduce_at(5000, t0), BucketReduction::Failure);
        assert_eq!(bucket.reduce_at(1, t0), BucketReduction::Failure);
        assert_eq!(bucket.time_until_at(5000, t0), 1900 * MS);
        assert_eq!(bucket.time_until_at(1, t0), 1901 * MS);
        // Refills pay the debt before the budget grows.
        assert_eq!(bucket.budget_at(t0 + 1000 * MS), 0);
        assert_eq!(bucket.debt(), 900);
        assert_eq!(bucket.budget_at(t0 + 1950 * MS), 50);
        assert_eq!(bucket.debt(), 0);
        assert_eq!(bucket.reduce_at(50, t0 + 1950 * MS), BucketReduction::Success);
    }

    #[test]
    fn time_until_is_exact() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(1000, 0, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(1000, t0), BucketReduction::Success);
        assert_eq!(bucket.time_until_at(0, t0), Duration::ZERO);
        assert_eq!(bucket.time_until_at(250, t0), 250 * MS);
        // Half a token accrued already (0.5 ms of a 1 ms token).
        let t = t0 + Duration::from_micros(500);
        assert_eq!(bucket.time_until_at(1, t), Duration::from_micros(500));
        assert_eq!(bucket.reduce_at(1, t + Duration::from_micros(499)), BucketReduction::Failure);
        assert_eq!(bucket.reduce_at(1, t + Duration::from_micros(500)), BucketReduction::Success);
    }

    #[test]
    fn waiting_the_computed_time_always_suffices() {
        // A small deterministic generator (xorshift) drives random requests and clocks.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let t0 = Instant::now();
        for _ in 0..200 {
            let size = 1 + next(10_000);
            let refill = Duration::from_nanos(1 + next(5_000_000_000));
            let burst = next(3) * next(size);
            let mut bucket = TokenBucket::new_at(size, burst, refill, t0).unwrap();
            let mut now = t0;
            for _ in 0..50 {
                now +=
                    Duration::from_nanos(next(u64::try_from(refill.as_nanos()).unwrap() / 4 + 1));
                let tokens = 1 + next(size + size / 2);
                if bucket.reduce_at(tokens, now) == BucketReduction::Failure {
                    let wait = bucket.time_until_at(tokens, now);
                    assert!(!wait.is_zero());
                    let mut early = bucket.clone();
                    let before = now + wait - Duration::from_nanos(1);
                    assert_eq!(early.reduce_at(tokens, before), BucketReduction::Failure);
                    now += wait;
                    assert_ne!(bucket.reduce_at(tokens, now), BucketReduction::Failure);
                }
            }
        }
    }

    #[test]
    fn replenish_restores_what_was_taken() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(100, 20, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(50, t0), BucketReduction::Success);
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (0, 70));
        bucket.replenish(50);
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (20, 100));
        // Never above the configured values.
        bucket.replenish(1000);
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (20, 100));
        // Debt is paid first.
        assert_eq!(bucket.reduce_at(300, t0), BucketReduction::OverConsumption(1.8));
        bucket.replenish(100);
        assert_eq!((bucket.debt(), bucket.budget()), (80, 0));
    }

    #[test]
    fn update_keeps_the_budget() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(1000, 100, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(700, t0), BucketReduction::Success);
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (0, 400));
        // Growing keeps the budget where it was (plus what accrued at the old rate).
        bucket.update_at(5000, 100, SEC, t0 + 100 * MS).unwrap();
        assert_eq!((bucket.one_time_burst(), bucket.budget()), (0, 500));
        assert_eq!(bucket.budget_at(t0 + 200 * MS), 1000);
        // Shrinking caps it.
        bucket.update_at(300, 100, SEC, t0 + 200 * MS).unwrap();
        assert_eq!(bucket.budget(), 300);
        // A different burst is a fresh grant; the same one is not.
        bucket.update_at(300, 40, SEC, t0 + 200 * MS).unwrap();
        assert_eq!(bucket.one_time_burst(), 40);
        assert_eq!(bucket.reduce_at(30, t0 + 200 * MS), BucketReduction::Success);
        bucket.update_at(300, 40, SEC, t0 + 200 * MS).unwrap();
        assert_eq!(bucket.one_time_burst(), 10);
        // A refused update changes nothing.
        assert!(bucket.update_at(0, 0, SEC, t0 + 200 * MS).is_err());
        assert_eq!((bucket.size(), bucket.budget(), bucket.one_time_burst()), (300, 300, 10));
    }

    #[test]
    fn update_carries_the_partial_token() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(10, 0, SEC, t0).unwrap();
        assert_eq!(bucket.reduce_at(10, t0), BucketReduction::Success);
        // Half a token (50 ms of 100 ms) accrued, then the rate halves: the other half takes
        // 100 ms at the new rate of a token per 200 ms.
        bucket.update_at(10, 0, 2 * SEC, t0 + 50 * MS).unwrap();
        assert_eq!(bucket.time_until_at(1, t0 + 50 * MS), 100 * MS);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let t0 = Instant::now();
        let year = Duration::from_secs(365 * 24 * 3600);

        // u64::MAX tokens per millisecond.
        let mut bucket = TokenBucket::new_at(u64::MAX, u64::MAX, MS, t0).unwrap();
        assert_eq!(bucket.reduce_at(u64::MAX, t0), BucketReduction::Success);
        assert_eq!(bucket.reduce_at(u64::MAX, t0), BucketReduction::Success);
        assert_eq!(bucket.reduce_at(1, t0), BucketReduction::Failure);
        assert_eq!(bucket.time_until_at(u64::MAX, t0), MS);
        assert_eq!(bucket.budget_at(t0 + Duration::from_micros(500)), u64::MAX / 2);
        assert_eq!(bucket.budget_at(t0 + 100 * year), u64::MAX);

        // One token per 500 years: waits are long but exact.
        let mut bucket = TokenBucket::new_at(1, 0, 500 * year, t0).unwrap();
        assert_eq!(bucket.reduce_at(1, t0), BucketReduction::Success);
        assert_eq!(bucket.time_until_at(1, t0), 500 * year);
        // A huge debt at a slow rate saturates the wait instead of overflowing.
        let reduction = bucket.reduce_at(u64::MAX, t0 + 500 * year);
        assert!(matches!(reduction, BucketReduction::OverConsumption(_)), "{reduction:?}");
        assert_eq!(bucket.debt(), u64::MAX - 1);
        assert_eq!(bucket.time_until_debt_paid(), Duration::MAX);

        // u64::MAX tokens per 500 years, a little time passing.
        let mut bucket = TokenBucket::new_at(u64::MAX, 0, MAX_REFILL_TIME, t0).unwrap();
        assert_eq!(bucket.reduce_at(u64::MAX, t0), BucketReduction::Success);
        assert_eq!(bucket.budget_at(t0 + Duration::from_nanos(1)), 1);
        assert_eq!(bucket.budget_at(t0 + SEC), 1_000_000_000);
        assert_eq!(bucket.time_until_at(u64::MAX, t0 + SEC), MAX_REFILL_TIME - SEC);
    }

    #[test]
    fn time_going_backwards_counts_as_none() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(1000, 0, SEC, t0 + SEC).unwrap();
        assert_eq!(bucket.reduce_at(1000, t0 + SEC), BucketReduction::Success);
        assert_eq!(bucket.budget_at(t0), 0);
        assert_eq!(bucket.budget_at(t0 + SEC + 10 * MS), 10);
    }
}
