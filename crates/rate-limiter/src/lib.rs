//! Rate limits for devices: caps on the bytes and the operations a device serves per unit of
//! time, so that one VM's disk or network cannot starve its neighbours. Virtio devices (block,
//! net, rng) ask a [`RateLimiter`] before serving each request; the host daemon changes the limits
//! of a running VM from its own thread through a [`RateLimiterHandle`] ([`RateLimiter::handle`]),
//! or the device's thread itself with [`RateLimiter::update_buckets`].
//!
//! # The model
//!
//! Each limit is a [`TokenBucket`]. A token is one byte (bandwidth) or one request (ops).
//!
//! - **Budget and refill.** The bucket holds up to `size` tokens and starts full. Tokens accrue
//!   linearly, `size` of them every `refill_time`, counted in whole tokens with the remainder
//!   carried exactly (integer arithmetic, no drift). A full bucket accrues nothing, so idle time
//!   buys at most one bucketful.
//! - **One-time burst.** An extra `one_time_burst` tokens, spent before the budget and never
//!   refilled: a VM can, say, boot fast and then settle to the limit.
//! - **Refusal.** A request that does not fit takes nothing. The limiter arms a timer for the
//!   moment it will fit, refuses everything until then, and the device waits on the timer's file
//!   descriptor.
//! - **Debt.** A request larger than a full bucket could never fit. Instead of stalling the
//!   device forever, it is granted, once, and the bucket goes into debt: refills pay the debt
//!   before the budget grows again, so the average rate still holds.
//!
//! A bucket with `size = 10 MiB` and `refill_time = 1 s` thus allows 10 MiB/s on average and
//! bursts of up to 10 MiB after idling, plus its one-time burst once.
//!
//! # Syntax
//!
//! [`RateLimiterConfig`] parses (and displays) a comma-separated list of options, any of them
//! optional, in any order; the empty string means no limits:
//!
//! | option | value | meaning |
//! |---|---|---|
//! | `bandwidth` | `AMOUNT[/PERIOD]` | `AMOUNT` bytes per `PERIOD` (default `1s`) |
//! | `bandwidth_burst` | `AMOUNT` | a one-time burst of bytes (needs `bandwidth`) |
//! | `ops` | `AMOUNT[/PERIOD]` | `AMOUNT` operations per `PERIOD` (default `1s`) |
//! | `ops_burst` | `AMOUNT` | a one-time burst of operations (needs `ops`) |
//!
//! `AMOUNT` is a whole number with an optional binary unit `K`, `M`, `G` or `T` (1K = 1024);
//! bandwidth amounts may add `B` or `iB` (`64KiB`, `512B`). `PERIOD` is a whole number with a
//! unit `ms`, `s`, `m` or `h` (`100ms`, `1s`, `2m`); the number may be left out (`10M/s`). The
//! period is also the bucket's refill time, so it sets how large a burst the limit tolerates:
//! `1M/1s` and `100K/100ms` have nearly the same rate, but the second lets through at most 100 KiB
//! at once. Errors start with the option at fault (`ops: invalid period '1d': unknown unit`).
//!
//! ```
//! use rate_limiter::{RateLimiterConfig, TokenBucketConfig};
//!
//! let config: RateLimiterConfig =
//!     "bandwidth=10M/1s,bandwidth_burst=50M,ops=1000/1s,ops_burst=100".parse().unwrap();
//! assert_eq!(
//!     config.bandwidth,
//!     Some(TokenBucketConfig { size: 10 << 20, one_time_burst: 50 << 20, refill_time_ms: 1000 })
//! );
//! assert_eq!(
//!     config.ops,
//!     Some(TokenBucketConfig { size: 1000, one_time_burst: 100, refill_time_ms: 1000 })
//! );
//!
//! let config: RateLimiterConfig = "ops=500/100ms".parse().unwrap();
//! assert_eq!(config.bandwidth, None);
//! assert_eq!(config.to_string(), "ops=500/100ms");
//!
//! let error = "bandwidth=0/1s".parse::<RateLimiterConfig>().unwrap_err();
//! assert!(error.to_string().starts_with("bandwidth: token bucket size is 0"));
//! ```
//!
//! # Use in a device
//!
//! ```
//! use std::os::unix::io::AsRawFd;
//! use rate_limiter::{BucketUpdate, RateLimiter, TokenBucketConfig, TokenType};
//!
//! let mut limiter = RateLimiter::new(&"bandwidth=1M/1s,ops=100/1s".parse().unwrap()).unwrap();
//! let request_len = 4096;
//! // Before serving a request: one operation, then its bytes.
//! if limiter.consume(1, TokenType::Ops) {
//!     if limiter.consume(request_len, TokenType::Bytes) {
//!         // serve the request
//!     } else {
//!         // Refused: give the operation back, stop serving the queue, and wait for
//!         // `limiter.as_raw_fd()` to become readable, then call `limiter.event_handler()`
//!         // and retry.
//!         limiter.manual_replenish(1, TokenType::Ops);
//!     }
//! }
//! let _timer_fd = limiter.as_raw_fd();
//!
//! // The host daemon doubles the bandwidth and lifts the ops limit of the running device.
//! let faster = TokenBucketConfig { size: 2 << 20, one_time_burst: 0, refill_time_ms: 1000 };
//! limiter.update_buckets(BucketUpdate::Update(faster), BucketUpdate::Disabled).unwrap();
//! assert!(limiter.bucket(TokenType::Ops).is_none());
//!
//! // The same from another thread: a handle stores the new limits and fires the limiter's timer
//! // at once, so a device waiting on `limiter.as_raw_fd()` wakes, calls `event_handler()` (which
//! // applies them) and retries. `None` lifts every limit.
//! let handle = limiter.handle();
//! std::thread::spawn(move || handle.update(None).unwrap()).join().unwrap();
//! assert!(limiter.consume(u64::MAX, TokenType::Bytes));
//! assert!(limiter.is_unlimited());
//! ```
//!
//! # Live updates
//!
//! A [`RateLimiterHandle`] is `Clone + Send + Sync`. [`RateLimiterHandle::update`] replaces both
//! limits (a bucket left out is removed, a new one starts full, a changed one keeps its budget as
//! [`RateLimiter::update_buckets`] describes) and arms the limiter's timer to fire at once. The
//! limiter applies the newest stored limits before its next [`RateLimiter::consume`] and in
//! [`RateLimiter::event_handler`]; a device that skips `consume` while [`RateLimiter::is_unlimited`]
//! calls [`RateLimiter::apply_pending_updates`] first. No update is lost: a limiter that arms
//! its timer for a refusal after a handle stored limits re-arms it to fire at once.
//!
//! # Testing with a clock
//!
//! Every method that reads the clock has an `_at` form taking the current [`std::time::Instant`]
//! ([`TokenBucket::reduce_at`], [`RateLimiter::consume_at`], ...), so that tests drive time
//! themselves and never sleep. The clock is monotonic.

mod bucket;
mod config;
mod limiter;

pub use bucket::{BucketError, BucketReduction, TokenBucket, MAX_REFILL_TIME};
pub use config::{ConfigParseError, RateLimiterConfig, TokenBucketConfig};
pub use limiter::{
    BucketUpdate, RateLimiter, RateLimiterError, RateLimiterHandle, TokenType, MAX_TIMER_DELAY,
    MIN_TIMER_DELAY,
};
