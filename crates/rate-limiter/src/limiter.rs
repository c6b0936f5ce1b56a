//! A device's rate limiter: a bandwidth bucket and an operations bucket, and the timer that
//! wakes the device when a refused request would fit.

use std::fmt;
use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::errno;
use vmm_sys_util::timerfd::TimerFd;

use crate::bucket::{BucketError, BucketReduction, TokenBucket};
use crate::config::{RateLimiterConfig, TokenBucketConfig};

/// The shortest wait the timer is armed for. Shorter waits are rounded up to it, so that a fast
/// limit costs at most one wake-up per this interval; tokens keep accruing meanwhile, so this
/// adds latency, not a lower rate (a bucket cannot fill in less than the 1 ms minimum refill time
/// the configuration allows).
pub const MIN_TIMER_DELAY: Duration = Duration::from_micros(100);

/// The longest wait the timer is armed for. A request that needs longer (a huge debt at a slow
/// rate) wakes the device this often, retries, and is refused and re-armed again.
pub const MAX_TIMER_DELAY: Duration = Duration::from_secs(24 * 3600);

/// How soon a [`RateLimiterHandle`] makes the timer fire to wake the device: at once (a zero
/// delay would disarm it).
const WAKE_NOW: Duration = Duration::from_nanos(1);

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Bytes transferred.
    Bytes,
    /// Operations (requests), whatever their size.
    Ops,
}

impl fmt::Display for TokenType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenType::Bytes => "bandwidth",
            TokenType::Ops => "ops",
        })
    }
}

/// What [`RateLimiter::update_buckets`] does to one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BucketUpdate {
    /// Leave it as it is.
    #[default]
    None,
    /// Remove it: that kind of token becomes unlimited.
    Disabled,
    /// Create it, or change it in place (see [`TokenBucket::update_at`] for what is kept).
    Update(TokenBucketConfig),
}

/// Why the rate limiter failed.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// A bucket's parameters were refused.
    #[error("invalid {token_type} limit")]
    Bucket {
        /// The bucket at fault.
        token_type: TokenType,
        /// Why.
        #[source]
        source: BucketError,
    },
    /// The timerfd could not be created.
    #[error("cannot create the rate limiter's timerfd")]
    CreateTimer(#[source] errno::Error),
    /// The timerfd could not be made non-blocking.
    #[error("cannot make the rate limiter's timerfd non-blocking")]
    TimerNonBlocking(#[source] io::Error),
    /// Reading the timerfd failed for a reason other than "not expired".
    #[error("cannot read the rate limiter's timerfd")]
    ReadTimer(#[source] errno::Error),
    /// The timerfd could not be duplicated for the limiter's handles.
    #[error("cannot duplicate the rate limiter's timerfd")]
    DuplicateTimer(#[source] io::Error),
    /// A handle stored new limits but could not arm the timer to wake the device: they take
    /// effect at the device's next request, or when a pending wait ends.
    #[error("cannot wake the rate-limited device (arming its timerfd failed)")]
    WakeTimer(#[source] errno::Error),
}

/// Limits one device's I/O with up to two token buckets, one for bytes and one for operations.
///
/// The device asks [`RateLimiter::consume`] before serving each request. When a bucket refuses,
/// the limiter becomes *blocked*: it arms its timer for the moment the refused request would fit
/// and refuses every request, of either type, until then. The device stops serving its queue,
/// waits on the limiter's file descriptor ([`AsRawFd`]) in its event loop, calls
/// [`RateLimiter::event_handler`] when it becomes readable, and retries the request.
///
/// As a safety net, a request made after the deadline unblocks the limiter even if the timer's
/// event has not been handled yet.
///
/// Other threads change the limits through a [`RateLimiterHandle`] ([`RateLimiter::handle`]);
/// the limiter applies what they asked at its next request or timer event.
///
/// Methods that depend on time have an `_at` form that takes the current instant; the plain forms
/// read the monotonic clock. The timer itself always runs on the real monotonic clock.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked_until: Option<Instant>,
    remote: Arc<Remote>,
}

/// What a limiter shares with its handles.
#[derive(Debug)]
struct Remote {
    /// The newest limits a handle asked for and the limiter has not applied yet; each update
    /// replaces the one before.
    pending: Mutex<Option<RateLimiterConfig>>,
    /// Set, after `pending` is filled, to tell the limiter's thread to look at it without taking
    /// the lock on every request.
    dirty: AtomicBool,
    /// A duplicate of the limiter's timerfd (the same timer): arming it wakes the device's
    /// thread, which waits on the limiter's descriptor.
    wake: Mutex<TimerFd>,
}

/// Changes a running [`RateLimiter`]'s limits from any thread: the hook for the host daemon.
/// Cloning gives another handle to the same limiter.
///
/// [`RateLimiterHandle::update`] stores the new limits and fires the limiter's timer at once.
/// The limiter applies them before its next request ([`RateLimiter::consume`]) or when its
/// device handles the timer's event ([`RateLimiter::event_handler`]), whichever comes first,
/// exactly as [`RateLimiter::set_limits`] would: a request waiting under the old limits is
/// retried under the new ones.
#[derive(Debug, Clone)]
pub struct RateLimiterHandle {
    remote: Arc<Remote>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (it only stores values).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RateLimiterHandle {
    /// Replaces the limiter's limits with `limits`; `None` (or a configuration without buckets)
    /// removes every limit, and a bucket that did not exist is created full. Each call replaces
    /// what an earlier one left unapplied.
    ///
    /// The limits are checked here: on error nothing changes. A
    /// [`RateLimiterError::WakeTimer`] error means the limits were stored but the device was not
    /// woken: they apply at its next request, or when its pending wait ends.
    pub fn update(&self, limits: Option<RateLimiterConfig>) -> Result<(), RateLimiterError> {
        let limits = limits.unwrap_or_default();
        for (token_type, bucket) in
            [(TokenType::Bytes, limits.bandwidth), (TokenType::Ops, limits.ops)]
        {
            if let Some(config) = bucket {
                config
                    .validate()
                    .map_err(|source| RateLimiterError::Bucket { token_type, source })?;
            }
        }
        {
            let mut pending = lock(&self.remote.pending);
            *pending = Some(limits);
            self.remote.dirty.store(true, Ordering::SeqCst);
        }
        // After the store: the limiter's thread, woken, finds the new limits.
        lock(&self.remote.wake).reset(WAKE_NOW, None).map_err(RateLimiterError::WakeTimer)
    }
}

impl RateLimiter {
    /// A limiter with the given limits, its buckets full.
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        Self::new_at(config, Instant::now())
    }

    /// [`RateLimiter::new`] with the clock reading `now`.
    pub fn new_at(config: &RateLimiterConfig, now: Instant) -> Result<Self, RateLimiterError> {
        let bandwidth = config
            .bandwidth
            .map(|bucket| new_bucket(TokenType::Bytes, &bucket, now))
            .transpose()?;
        let ops = config.ops.map(|bucket| new_bucket(TokenType::Ops, &bucket, now)).transpose()?;
        let timer = TimerFd::new().map_err(RateLimiterError::CreateTimer)?;
        set_nonblocking(timer.as_raw_fd()).map_err(RateLimiterError::TimerNonBlocking)?;
        // SAFETY: `timer` owns this descriptor and outlives the borrow, which only lasts for the
        // duplication.
        let borrowed = unsafe { BorrowedFd::borrow_raw(timer.as_raw_fd()) };
        let duplicate = borrowed.try_clone_to_owned().map_err(RateLimiterError::DuplicateTimer)?;
        // SAFETY: `duplicate` is a descriptor we own, for the same timerfd; ownership passes to
        // the new TimerFd, which closes it.
        let wake = unsafe { TimerFd::from_raw_fd(duplicate.into_raw_fd()) };
        let remote = Arc::new(Remote {
            pending: Mutex::new(None),
            dirty: AtomicBool::new(false),
            wake: Mutex::new(wake),
        });
        Ok(Self { bandwidth, ops, timer, blocked_until: None, remote })
    }

    /// A handle through which other threads change this limiter's limits while it runs.
    pub fn handle(&self) -> RateLimiterHandle {
        RateLimiterHandle { remote: Arc::clone(&self.remote) }
    }

    /// Whether nothing is limited: no bucket, and not blocked. A device may skip
    /// [`RateLimiter::consume`] then (after [`RateLimiter::apply_pending_updates`], so that a
    /// handle's new limits are seen).
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none() && self.blocked_until.is_none()
    }

    /// Applies the limits a [`RateLimiterHandle`] stored, if any; returns whether it did. Cheap
    /// (one atomic load) when there are none. [`RateLimiter::consume`] and
    /// [`RateLimiter::event_handler`] call it themselves.
    pub fn apply_pending_updates(&mut self) -> bool {
        self.remote.dirty.load(Ordering::SeqCst) && self.apply_pending_updates_at(Instant::now())
    }

    /// [`RateLimiter::apply_pending_updates`] with the clock reading `now`.
    pub fn apply_pending_updates_at(&mut self, now: Instant) -> bool {
        if !self.remote.dirty.swap(false, Ordering::SeqCst) {
            return false;
        }
        let pending = lock(&self.remote.pending).take();
        // The handle checked the limits, so this cannot fail; were it to, the old limits stay.
        pending.is_some_and(|limits| self.set_limits_at(&limits, now).is_ok())
    }

    /// Replaces both limits: a bucket left out of `limits` is removed, one given is created or
    /// changed as [`RateLimiter::update_buckets`] does.
    pub fn set_limits(&mut self, limits: &RateLimiterConfig) -> Result<(), RateLimiterError> {
        self.set_limits_at(limits, Instant::now())
    }

    /// [`RateLimiter::set_limits`] with the clock reading `now`.
    pub fn set_limits_at(
        &mut self,
        limits: &RateLimiterConfig,
        now: Instant,
    ) -> Result<(), RateLimiterError> {
        let replace = |bucket: Option<TokenBucketConfig>| {
            bucket.map_or(BucketUpdate::Disabled, BucketUpdate::Update)
        };
        self.update_buckets_at(replace(limits.bandwidth), replace(limits.ops), now)
    }

    /// The bucket for `token_type`, if that type is limited.
    pub fn bucket(&self, token_type: TokenType) -> Option<&TokenBucket> {
        match token_type {
            TokenType::Bytes => self.bandwidth.as_ref(),
            TokenType::Ops => self.ops.as_ref(),
        }
    }

    fn bucket_mut(&mut self, token_type: TokenType) -> Option<&mut TokenBucket> {
        match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// Whether the limiter refuses requests until its timer fires.
    pub fn is_blocked(&self) -> bool {
        self.blocked_until.is_some()
    }

    /// When the limiter, if blocked, will accept requests again: the instant it armed its timer
    /// for.
    pub fn blocked_until(&self) -> Option<Instant> {
        self.blocked_until
    }

    /// Asks for `tokens` of `token_type` now. See [`RateLimiter::consume_at`].
    pub fn consume(&mut self, tokens: u64, token_type: TokenType) -> bool {
        self.consume_at(tokens, token_type, Instant::now())
    }

    /// Asks for `tokens` of `token_type`: `true` if the device may serve the request.
    ///
    /// Refused while blocked. When the bucket refuses, nothing is taken, and the limiter blocks
    /// until the request would fit. A request larger than the whole bucket is granted once and
    /// leaves a debt (see [`TokenBucket::reduce_at`]); the limiter then blocks until the debt is
    /// paid. A type without a bucket is unlimited.
    ///
    /// Limits stored by a [`RateLimiterHandle`] are applied first.
    pub fn consume_at(&mut self, tokens: u64, token_type: TokenType, now: Instant) -> bool {
        self.apply_pending_updates_at(now);
        if let Some(deadline) = self.blocked_until {
            if now < deadline {
                return false;
            }
            // The timer has expired too; its pending event, handled later, is harmless.
            self.blocked_until = None;
        }
        let Some(bucket) = self.bucket_mut(token_type) else {
            return true;
        };
        match bucket.reduce_at(tokens, now) {
            BucketReduction::Success => true,
            BucketReduction::OverConsumption(_) => {
                let wait = bucket.time_until_debt_paid();
                self.block(now, wait);
                true
            }
            BucketReduction::Failure => {
                let wait = bucket.time_until_at(tokens, now);
                self.block(now, wait);
                false
            }
        }
    }

    fn block(&mut self, now: Instant, wait: Duration) {
        let wait = wait.clamp(MIN_TIMER_DELAY, MAX_TIMER_DELAY);
        // The delay is within the range timerfd accepts, so arming cannot fail on its value. Were
        // it to fail anyway, the limit still holds: the limiter stays blocked until the deadline,
        // and the device's next request after it goes through.
        let _ = self.timer.reset(wait, None);
        self.blocked_until = Some(now + wait);
        // Arming replaced whatever a handle armed: if a handle stored limits meanwhile, fire at
        // once so that they are applied now rather than at the old deadline.
        if self.remote.dirty.load(Ordering::SeqCst) {
            let _ = self.timer.reset(WAKE_NOW, None);
        }
    }

    /// Gives back `tokens` of `token_type`, typically what a request took from one bucket before
    /// the other refused it. Does not unblock the limiter.
    pub fn manual_replenish(&mut self, tokens: u64, token_type: TokenType) {
        if let Some(bucket) = self.bucket_mut(token_type) {
            bucket.replenish(tokens);
        }
    }

    /// Handles the timer's event: reads the timerfd and unblocks the limiter, then applies the
    /// limits a [`RateLimiterHandle`] stored, if any (which unblocks it too). Returns whether the
    /// timer had fired; `Ok(false)` (a spurious wake-up, say after an update disarmed the timer)
    /// leaves the limiter as it was, but for a handle's limits.
    pub fn event_handler(&mut self) -> Result<bool, RateLimiterError> {
        // Read first, apply second: limits stored after the read come with a new firing.
        let read = self.timer.wait();
        let fired = match read {
            Ok(_) => {
                self.blocked_until = None;
                Ok(true)
            }
            Err(error) if error.errno() == libc::EAGAIN => Ok(false),
            Err(error) => Err(RateLimiterError::ReadTimer(error)),
        };
        self.apply_pending_updates();
        fired
    }

    /// Changes the limits while the device runs. See [`RateLimiter::update_buckets_at`].
    pub fn update_buckets(
        &mut self,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> Result<(), RateLimiterError> {
        self.update_buckets_at(bandwidth, ops, Instant::now())
    }

    /// Changes the limits while the device runs: the hook for the host daemon.
    ///
    /// A changed bucket keeps its current budget (capped at the new size), its debt and, unless
    /// the burst changes, what is left of its one-time burst; tokens accrued up to `now` count at
    /// the old rate (see [`TokenBucket::update_at`]). A new bucket starts full, as at creation.
    ///
    /// Any change unblocks the limiter and disarms its timer: the wait was computed for the old
    /// limits. The device should retry its pending requests after an update; a request that
    /// still does not fit blocks again, for a wait computed from the new limits.
    ///
    /// Both updates are checked before either is applied: on error nothing changes.
    pub fn update_buckets_at(
        &mut self,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
        now: Instant,
    ) -> Result<(), RateLimiterError> {
        for (token_type, update) in [(TokenType::Bytes, &bandwidth), (TokenType::Ops, &ops)] {
            if let BucketUpdate::Update(config) = update {
                config
                    .validate()
                    .map_err(|source| RateLimiterError::Bucket { token_type, source })?;
            }
        }
        apply(&mut self.bandwidth, TokenType::Bytes, bandwidth, now)?;
        apply(&mut self.ops, TokenType::Ops, ops, now)?;
        if bandwidth != BucketUpdate::None || ops != BucketUpdate::None {
            self.blocked_until = None;
            // Should disarming fail, the timer fires later and the event is handled as a
            // harmless wake-up.
            let _ = self.timer.clear();
        }
        Ok(())
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd, readable when the limiter may be unblocked by [`RateLimiter::event_handler`].
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

fn new_bucket(
    token_type: TokenType,
    config: &TokenBucketConfig,
    now: Instant,
) -> Result<TokenBucket, RateLimiterError> {
    TokenBucket::from_config_at(config, now)
        .map_err(|source| RateLimiterError::Bucket { token_type, source })
}

fn apply(
    slot: &mut Option<TokenBucket>,
    token_type: TokenType,
    update: BucketUpdate,
    now: Instant,
) -> Result<(), RateLimiterError> {
    match (update, slot.as_mut()) {
        (BucketUpdate::None, _) => {}
        (BucketUpdate::Disabled, _) => *slot = None,
        (BucketUpdate::Update(config), Some(bucket)) => bucket
            .update_at(config.size, config.one_time_burst, config.refill_time(), now)
            .map_err(|source| RateLimiterError::Bucket { token_type, source })?,
        (BucketUpdate::Update(config), None) => *slot = Some(new_bucket(token_type, &config, now)?),
    }
    Ok(())
}

/// Makes `fd` non-blocking, so that reading a timer that has not fired returns EAGAIN.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the status flags of a descriptor; it touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the status flags of a descriptor the caller owns.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn limits(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig { size, one_time_burst, refill_time_ms })
    }

    fn limiter_at(
        bandwidth: Option<TokenBucketConfig>,
        ops: Option<TokenBucketConfig>,
        now: Instant,
    ) -> RateLimiter {
        RateLimiter::new_at(&RateLimiterConfig { bandwidth, ops }, now).unwrap()
    }

    fn budget(limiter: &RateLimiter, token_type: TokenType) -> u64 {
        limiter.bucket(token_type).unwrap().budget()
    }

    #[test]
    fn unlimited_never_blocks() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(None, None, t0);
        for _ in 0..1000 {
            assert!(limiter.consume_at(u64::MAX, TokenType::Bytes, t0));
            assert!(limiter.consume_at(u64::MAX, TokenType::Ops, t0));
        }
        assert!(!limiter.is_blocked());
        assert!(limiter.bucket(TokenType::Bytes).is_none());
    }

    #[test]
    fn refusal_blocks_for_exactly_the_refill_needed() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(limits(1000, 0, 1000), None, t0);
        assert!(limiter.consume_at(900, TokenType::Bytes, t0));
        assert!(!limiter.consume_at(400, TokenType::Bytes, t0 + 50 * MS));
        // 150 tokens at t0 + 50 ms; 250 more take 250 ms.
        assert!(limiter.is_blocked());
        assert_eq!(limiter.blocked_until(), Some(t0 + 300 * MS));
        assert_eq!(budget(&limiter, TokenType::Bytes), 150);
        // Blocked: everything is refused, even what would fit, even the unlimited type.
        assert!(!limiter.consume_at(1, TokenType::Bytes, t0 + 299 * MS));
        assert!(!limiter.consume_at(1, TokenType::Ops, t0 + 299 * MS));
        // At the deadline the retried request fits.
        assert!(limiter.consume_at(400, TokenType::Bytes, t0 + 300 * MS));
        assert!(!limiter.is_blocked());
        assert_eq!(budget(&limiter, TokenType::Bytes), 0);
    }

    #[test]
    fn short_waits_are_rounded_up_long_ones_capped() {
        let t0 = Instant::now();
        // A token every microsecond.
        let mut limiter = limiter_at(None, limits(1000, 0, 1), t0);
        assert!(limiter.consume_at(1000, TokenType::Ops, t0));
        assert!(!limiter.consume_at(1, TokenType::Ops, t0));
        assert_eq!(limiter.blocked_until(), Some(t0 + MIN_TIMER_DELAY));

        // A token a year.
        let year = 365 * 24 * 3600 * 1000;
        let mut limiter = limiter_at(None, limits(1, 0, year), t0);
        assert!(limiter.consume_at(1, TokenType::Ops, t0));
        assert!(!limiter.consume_at(1, TokenType::Ops, t0));
        assert_eq!(limiter.blocked_until(), Some(t0 + MAX_TIMER_DELAY));
        // Waking after a day is too early: blocked again for another day.
        assert!(!limiter.consume_at(1, TokenType::Ops, t0 + MAX_TIMER_DELAY));
        assert_eq!(limiter.blocked_until(), Some(t0 + 2 * MAX_TIMER_DELAY));
    }

    #[test]
    fn over_consumption_is_granted_then_blocks_until_paid() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(limits(1 << 20, 0, 1000), None, t0);
        assert!(limiter.consume_at(3 << 20, TokenType::Bytes, t0));
        assert_eq!(limiter.bucket(TokenType::Bytes).unwrap().debt(), 2 << 20);
        assert_eq!(limiter.blocked_until(), Some(t0 + 2 * SEC));
        assert!(!limiter.consume_at(1, TokenType::Bytes, t0 + SEC));
        assert!(limiter.consume_at(1, TokenType::Ops, t0 + 2 * SEC));
        assert!(!limiter.consume_at(1, TokenType::Bytes, t0 + 2 * SEC));
        assert!(limiter.consume_at(1024, TokenType::Bytes, t0 + 2 * SEC + MS));
    }

    #[test]
    fn bytes_and_ops_are_counted_apart() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(limits(10_000, 0, 1000), limits(10, 0, 1000), t0);
        for _ in 0..10 {
            assert!(limiter.consume_at(1, TokenType::Ops, t0));
        }
        assert_eq!(budget(&limiter, TokenType::Bytes), 10_000);
        assert!(!limiter.consume_at(1, TokenType::Ops, t0));
        assert_eq!(limiter.blocked_until(), Some(t0 + 100 * MS));
        assert_eq!(budget(&limiter, TokenType::Bytes), 10_000);

        let t1 = t0 + 100 * MS;
        assert!(limiter.consume_at(10_000, TokenType::Bytes, t1));
        assert!(!limiter.consume_at(1, TokenType::Bytes, t1));
        // Bytes refill at 10 per ms; the ops bucket played no part.
        assert_eq!(limiter.blocked_until(), Some(t1 + Duration::from_micros(100)));
        assert_eq!(budget(&limiter, TokenType::Ops), 0);
        let t2 = t1 + Duration::from_micros(100);
        // By now one op has accrued (a token per 100 ms) and one byte (ten per ms).
        assert!(limiter.consume_at(1, TokenType::Ops, t2));
        assert!(limiter.consume_at(1, TokenType::Bytes, t2));
        assert!(!limiter.consume_at(1, TokenType::Ops, t2));
    }

    #[test]
    fn replenish_gives_back_what_a_request_took() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(limits(1000, 0, 1000), limits(1, 0, 1000), t0);
        assert!(limiter.consume_at(800, TokenType::Bytes, t0));
        // The usual order: one operation, then its bytes; bytes refuse, the op goes back.
        assert!(limiter.consume_at(1, TokenType::Ops, t0));
        assert!(!limiter.consume_at(500, TokenType::Bytes, t0));
        limiter.manual_replenish(1, TokenType::Ops);
        assert_eq!(budget(&limiter, TokenType::Ops), 1);
        assert!(limiter.is_blocked());
        // Replenishing an unlimited type is a no-op.
        let mut unlimited = limiter_at(None, None, t0);
        unlimited.manual_replenish(5, TokenType::Bytes);
        assert!(unlimited.bucket(TokenType::Bytes).is_none());
    }

    #[test]
    fn update_while_blocked_keeps_the_budget_and_unblocks() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(limits(1000, 0, 1000), None, t0);
        assert!(limiter.consume_at(900, TokenType::Bytes, t0));
        assert!(!limiter.consume_at(600, TokenType::Bytes, t0));
        assert_eq!(limiter.blocked_until(), Some(t0 + 500 * MS));

        // Ten times faster, at t0 + 10 ms: 100 + 10 tokens carried over, not a full bucket.
        let t1 = t0 + 10 * MS;
        let faster = limits(10_000, 0, 1000).unwrap();
        limiter.update_buckets_at(BucketUpdate::Update(faster), BucketUpdate::None, t1).unwrap();
        assert!(!limiter.is_blocked());
        assert_eq!(budget(&limiter, TokenType::Bytes), 110);
        // The retry waits for the new rate: 490 tokens at 10 per ms.
        assert!(!limiter.consume_at(600, TokenType::Bytes, t1));
        assert_eq!(limiter.blocked_until(), Some(t1 + 49 * MS));

        // An update that changes nothing leaves the limiter blocked.
        limiter.update_buckets_at(BucketUpdate::None, BucketUpdate::None, t1).unwrap();
        assert!(limiter.is_blocked());

        // Adding an ops limit creates a full bucket and unblocks.
        let ops = limits(5, 0, 1000).unwrap();
        limiter.update_buckets_at(BucketUpdate::None, BucketUpdate::Update(ops), t1).unwrap();
        assert!(!limiter.is_blocked());
        assert_eq!(budget(&limiter, TokenType::Ops), 5);
    }

    #[test]
    fn disabling_a_bucket_unblocks() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(limits(1000, 0, 1000), limits(1, 0, 1000), t0);
        assert!(limiter.consume_at(1, TokenType::Ops, t0));
        assert!(!limiter.consume_at(1, TokenType::Ops, t0));
        assert!(limiter.is_blocked());
        limiter.update_buckets_at(BucketUpdate::None, BucketUpdate::Disabled, t0).unwrap();
        assert!(!limiter.is_blocked());
        assert!(limiter.bucket(TokenType::Ops).is_none());
        for _ in 0..100 {
            assert!(limiter.consume_at(1, TokenType::Ops, t0));
        }
        assert_eq!(budget(&limiter, TokenType::Bytes), 1000);
        // The disarmed timer has nothing to read.
        assert!(!limiter.event_handler().unwrap());
    }

    #[test]
    fn refused_update_changes_nothing() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(limits(1000, 0, 1000), None, t0);
        let good = limits(5, 0, 1000).unwrap();
        let zero = TokenBucketConfig { size: 0, one_time_burst: 0, refill_time_ms: 1000 };
        let error = limiter
            .update_buckets_at(BucketUpdate::Update(good), BucketUpdate::Update(zero), t0)
            .unwrap_err();
        assert!(error.to_string().contains("invalid ops limit"), "{error}");
        assert_eq!(limiter.bucket(TokenType::Bytes).unwrap().size(), 1000);
        assert!(limiter.bucket(TokenType::Ops).is_none());

        let error =
            RateLimiter::new_at(&RateLimiterConfig { bandwidth: Some(zero), ops: None }, t0)
                .unwrap_err();
        assert!(error.to_string().contains("invalid bandwidth limit"), "{error}");
    }

    #[test]
    fn real_timer_fires_and_unblocks() {
        // 1 token per ms: a refused token arms the timer for about 1 ms.
        let mut limiter =
            RateLimiter::new(&RateLimiterConfig { bandwidth: None, ops: limits(5, 0, 5) }).unwrap();
        // Not armed yet: the handler finds nothing and does not block.
        assert!(!limiter.event_handler().unwrap());
        let mut granted = 0;
        while limiter.consume(1, TokenType::Ops) {
            granted += 1;
        }
        assert!(granted >= 5);
        assert!(limiter.is_blocked());
        let mut pollfd = libc::pollfd { fd: limiter.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: `pollfd` is a valid, exclusively borrowed array of one element for the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 1000) };
        assert_eq!(ready, 1, "the timer did not fire within a second");
        assert!(limiter.event_handler().unwrap());
        assert!(!limiter.is_blocked());
        assert!(limiter.consume(1, TokenType::Ops));
    }

    fn config(
        bandwidth: Option<TokenBucketConfig>,
        ops: Option<TokenBucketConfig>,
    ) -> Option<RateLimiterConfig> {
        Some(RateLimiterConfig { bandwidth, ops })
    }

    /// Waits up to `ms` for the limiter's timer; returns whether it fired.
    fn timer_fires_within(limiter: &RateLimiter, ms: i32) -> bool {
        let mut pollfd = libc::pollfd { fd: limiter.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: `pollfd` is a valid, exclusively borrowed array of one element for the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, ms) };
        ready == 1
    }

    #[test]
    fn handle_lifts_then_reimposes_a_different_limit() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(None, limits(1, 0, 1000), t0);
        let handle = limiter.handle();
        assert!(limiter.consume_at(1, TokenType::Ops, t0));
        assert!(!limiter.consume_at(1, TokenType::Ops, t0));
        assert!(limiter.is_blocked());

        // Lifted: the next request goes through, and every one after it.
        handle.update(None).unwrap();
        for _ in 0..1000 {
            assert!(limiter.consume_at(1, TokenType::Ops, t0));
            assert!(limiter.consume_at(1 << 30, TokenType::Bytes, t0));
        }
        assert!(limiter.is_unlimited());

        // Re-imposed, differently: a bandwidth limit where there was none, ops at 3 a second.
        // New buckets start full.
        let clone = handle.clone();
        clone.update(config(limits(1000, 0, 1000), limits(3, 0, 1000))).unwrap();
        assert!(limiter.is_unlimited(), "applied by the limiter's thread, not the handle's");
        assert!(limiter.apply_pending_updates());
        assert!(!limiter.is_unlimited());
        for _ in 0..3 {
            assert!(limiter.consume_at(1, TokenType::Ops, t0));
        }
        assert!(!limiter.consume_at(1, TokenType::Ops, t0));
        assert_eq!(limiter.blocked_until(), Some(t0 + 1000 * MS / 3 + Duration::from_nanos(1)));
        assert_eq!(limiter.bucket(TokenType::Bytes).map(TokenBucket::size), Some(1000));

        // Only the newest of several unapplied updates counts.
        handle.update(config(None, limits(7, 0, 1000))).unwrap();
        handle.update(config(limits(10, 0, 1000), None)).unwrap();
        assert!(limiter.consume_at(1, TokenType::Ops, t0));
        assert!(limiter.bucket(TokenType::Ops).is_none());
        assert_eq!(budget(&limiter, TokenType::Bytes), 10);
        assert!(!limiter.apply_pending_updates(), "nothing left to apply");
    }

    #[test]
    fn handle_refuses_bad_limits_and_changes_nothing() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(None, limits(1, 0, 1000), t0);
        let zero = TokenBucketConfig { size: 0, one_time_burst: 0, refill_time_ms: 1000 };
        let error = limiter.handle().update(config(Some(zero), None)).unwrap_err();
        assert!(error.to_string().contains("invalid bandwidth limit"), "{error}");
        assert!(!limiter.apply_pending_updates());
        assert!(!timer_fires_within(&limiter, 0), "a refused update wakes nobody");
        assert!(limiter.consume_at(1, TokenType::Ops, t0));
        assert!(!limiter.consume_at(1, TokenType::Ops, t0));
    }

    #[test]
    fn handle_wakes_a_limiter_waiting_on_its_timer() {
        // One operation a day: the second request waits (the timer is armed for a day).
        let mut limiter =
            RateLimiter::new(&RateLimiterConfig { bandwidth: None, ops: limits(1, 0, 86_400_000) })
                .unwrap();
        assert!(limiter.consume(1, TokenType::Ops));
        assert!(!limiter.consume(1, TokenType::Ops));
        assert!(!timer_fires_within(&limiter, 20));

        // Another thread lifts the limit; the waiting device wakes at once.
        let handle = limiter.handle();
        std::thread::spawn(move || handle.update(None).unwrap()).join().unwrap();
        assert!(timer_fires_within(&limiter, 1000), "the update did not wake the limiter");
        assert!(limiter.event_handler().unwrap());
        assert!(limiter.is_unlimited());
        assert!(limiter.consume(1, TokenType::Ops));

        // And again the other way: a limit where none was, taken up by the event handler.
        limiter.handle().update(config(None, limits(2, 0, 86_400_000))).unwrap();
        assert!(timer_fires_within(&limiter, 1000));
        assert!(limiter.event_handler().unwrap());
        assert_eq!(budget(&limiter, TokenType::Ops), 2);
        assert!(limiter.consume(2, TokenType::Ops));
        assert!(!limiter.consume(1, TokenType::Ops));
        // The refusal armed the timer for its own wait; nothing fires early.
        assert!(!timer_fires_within(&limiter, 20));
    }

    #[test]
    fn limits_stored_while_a_refusal_arms_the_timer_still_wake() {
        // The race the re-check in `block` closes: new limits stored after `consume` looked for
        // them but before its refusal armed the timer for the old wait. Stored by hand here, as
        // a handle's update between the two steps would leave them.
        let t0 = Instant::now();
        let mut limiter = limiter_at(None, limits(1, 0, 86_400_000), t0);
        assert!(limiter.consume_at(1, TokenType::Ops, t0));
        *lock(&limiter.remote.pending) = config(None, None);
        limiter.remote.dirty.store(true, Ordering::SeqCst);
        limiter.block(t0, Duration::from_secs(3600));
        assert!(timer_fires_within(&limiter, 1000), "the stored limits were not woken for");
        assert!(limiter.event_handler().unwrap());
        assert!(limiter.is_unlimited());
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<RateLimiterHandle>();
    }

    #[test]
    fn set_limits_replaces_both_buckets() {
        let t0 = Instant::now();
        let mut limiter = limiter_at(limits(1000, 0, 1000), None, t0);
        limiter
            .set_limits_at(&RateLimiterConfig { bandwidth: None, ops: limits(5, 0, 1000) }, t0)
            .unwrap();
        assert!(limiter.bucket(TokenType::Bytes).is_none());
        assert_eq!(budget(&limiter, TokenType::Ops), 5);
        limiter.set_limits_at(&RateLimiterConfig::default(), t0).unwrap();
        assert!(limiter.is_unlimited());
    }

    #[test]
    fn simulated_consumer_gets_the_configured_throughput() {
        // 1 MiB/s; a consumer asks for 4 KiB at a time, as fast as it is allowed, and wakes 50 us
        // after each timer deadline (event-loop latency).
        const STEP: u64 = 4096;
        let t0 = Instant::now();
        let mut limiter = limiter_at(limits(1 << 20, 0, 1000), None, t0);
        // Spend the initial full bucket first: the rate is what is measured.
        while limiter.consume_at(STEP, TokenType::Bytes, t0) {}
        let end = t0 + 10 * SEC;
        let mut transferred = 0u64;
        loop {
            let now = limiter.blocked_until().expect("blocked after a refusal")
                + Duration::from_micros(50);
            if now >= end {
                break;
            }
            while limiter.consume_at(STEP, TokenType::Bytes, now) {
                transferred += STEP;
            }
        }
        let rate = transferred as f64 / 10.0;
        let target = f64::from(1 << 20);
        assert!((rate - target).abs() / target < 0.01, "{rate} B/s, expected {target}");
        assert!(transferred <= 10 << 20);
    }
}
