//! Rate limits as plain values, and their command-line syntax (see the crate documentation for
//! the grammar).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::bucket::{validate, BucketError};

/// One token bucket's parameters: `size` tokens accrue every `refill_time_ms` milliseconds, and
/// `one_time_burst` extra tokens may be spent once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenBucketConfig {
    /// Tokens (bytes or operations) that a full bucket holds and that accrue per refill time.
    pub size: u64,
    /// Extra tokens, spent before the bucket's own and never refilled.
    pub one_time_burst: u64,
    /// How long an empty bucket takes to fill, in milliseconds.
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// The refill time as a `Duration`.
    pub fn refill_time(&self) -> Duration {
        Duration::from_millis(self.refill_time_ms)
    }

    /// Checks that a bucket can be built from these parameters.
    pub fn validate(&self) -> Result<(), BucketError> {
        validate(self.size, self.refill_time()).map(|_| ())
    }
}

/// The limits of one device; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RateLimiterConfig {
    /// Bytes per period.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests) per period.
    pub ops: Option<TokenBucketConfig>,
}

/// Why a rate-limit string was refused. Each message starts with the option at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigParseError {
    /// An option this syntax does not have.
    #[error(
        "unknown rate limit option '{0}' (expected bandwidth, bandwidth_burst, ops or ops_burst)"
    )]
    UnknownOption(String),
    /// An item without `=value`, or an empty item.
    #[error("rate limit option '{0}' has no value (expected OPTION=VALUE)")]
    MissingValue(String),
    /// The same option twice.
    #[error("{0} is given more than once")]
    Duplicate(&'static str),
    /// A burst for a limit that is not set.
    #[error("{option} is given without {limit}: a burst needs a limit to add to")]
    BurstWithoutLimit {
        /// The burst option.
        option: &'static str,
        /// The limit it belongs to.
        limit: &'static str,
    },
    /// An amount that is not a whole number with an optional unit, or too large.
    #[error("{option}: invalid amount '{value}': {reason}")]
    BadAmount {
        /// The option at fault.
        option: &'static str,
        /// The text given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A period that is not a whole number with a unit, zero, or too large.
    #[error("{option}: invalid period '{value}': {reason}")]
    BadPeriod {
        /// The option at fault.
        option: &'static str,
        /// The text given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Well-formed values that make no bucket (a rate of 0, or a period of centuries).
    #[error("{option}: {source}")]
    Invalid {
        /// The option at fault.
        option: &'static str,
        /// Why the bucket was refused.
        #[source]
        source: BucketError,
    },
}

const BANDWIDTH: &str = "bandwidth";
const BANDWIDTH_BURST: &str = "bandwidth_burst";
const OPS: &str = "ops";
const OPS_BURST: &str = "ops_burst";

impl FromStr for RateLimiterConfig {
    type Err = ConfigParseError;

    /// Parses `bandwidth=10M/1s,bandwidth_burst=50M,ops=1000/1s,ops_burst=100`; any subset of
    /// the options, in any order; an empty string means no limits.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut bandwidth = None;
        let mut bandwidth_burst = None;
        let mut ops = None;
        let mut ops_burst = None;
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        for item in text.split(',') {
            let item = item.trim();
            let Some((key, value)) = item.split_once('=') else {
                return Err(ConfigParseError::MissingValue(item.to_string()));
            };
            let (key, value) = (key.trim(), value.trim());
            let (option, slot, is_rate) = match key {
                BANDWIDTH => (BANDWIDTH, &mut bandwidth, true),
                BANDWIDTH_BURST => (BANDWIDTH_BURST, &mut bandwidth_burst, false),
                OPS => (OPS, &mut ops, true),
                OPS_BURST => (OPS_BURST, &mut ops_burst, false),
                _ => return Err(ConfigParseError::UnknownOption(key.to_string())),
            };
            if slot.is_some() {
                return Err(ConfigParseError::Duplicate(option));
            }
            let bytes = option == BANDWIDTH || option == BANDWIDTH_BURST;
            *slot = Some(if is_rate {
                parse_rate(option, value, bytes)?
            } else {
                (parse_amount(option, value, bytes)?, 0)
            });
        }
        Ok(Self {
            bandwidth: bucket(BANDWIDTH, bandwidth, BANDWIDTH_BURST, bandwidth_burst)?,
            ops: bucket(OPS, ops, OPS_BURST, ops_burst)?,
        })
    }
}

/// Puts a parsed rate and burst together into a checked bucket configuration.
fn bucket(
    limit: &'static str,
    rate: Option<(u64, u64)>,
    burst_option: &'static str,
    burst: Option<(u64, u64)>,
) -> Result<Option<TokenBucketConfig>, ConfigParseError> {
    let Some((size, refill_time_ms)) = rate else {
        return match burst {
            Some(_) => Err(ConfigParseError::BurstWithoutLimit { option: burst_option, limit }),
            None => Ok(None),
        };
    };
    let one_time_burst = burst.map_or(0, |(amount, _)| amount);
    let config = TokenBucketConfig { size, one_time_burst, refill_time_ms };
    config.validate().map_err(|source| ConfigParseError::Invalid { option: limit, source })?;
    Ok(Some(config))
}

/// `AMOUNT[/PERIOD]` into (amount, period in ms); the period defaults to one second.
fn parse_rate(
    option: &'static str,
    value: &str,
    bytes: bool,
) -> Result<(u64, u64), ConfigParseError> {
    match value.split_once('/') {
        Some((amount, period)) => {
            Ok((parse_amount(option, amount.trim(), bytes)?, parse_period(option, period.trim())?))
        }
        None => Ok((parse_amount(option, value, bytes)?, 1000)),
    }
}

/// A whole number with an optional binary unit K, M, G or T (and, for bytes, an optional "iB"
/// or "B" after it, or "B" alone).
fn parse_amount(option: &'static str, value: &str, bytes: bool) -> Result<u64, ConfigParseError> {
    let bad = |reason| ConfigParseError::BadAmount { option, value: value.to_string(), reason };
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() {
        return Err(bad("expected a whole number, optionally followed by K, M, G or T"));
    }
    let number: u64 = digits.parse().map_err(|_| bad("the number is too large"))?;
    let mut unit = unit.to_ascii_uppercase();
    if bytes {
        if let Some(prefix) = unit.strip_suffix("IB").or_else(|| unit.strip_suffix('B')) {
            unit = prefix.to_string();
        }
    }
    let shift = match unit.as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad("unknown unit (use K, M, G or T)")),
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| bad("too large"))
}

/// A whole number (1 if left out) and a unit ms, s, m or h, in milliseconds.
fn parse_period(option: &'static str, value: &str) -> Result<u64, ConfigParseError> {
    let bad = |reason| ConfigParseError::BadPeriod { option, value: value.to_string(), reason };
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let number: u64 = if digits.is_empty() {
        1
    } else {
        digits.parse().map_err(|_| bad("the number is too large"))?
    };
    let unit_ms: u64 = match unit.to_ascii_lowercase().as_str() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60 * 1000,
        "h" => 3600 * 1000,
        "" => return Err(bad("missing unit (use ms, s, m or h, as in 100ms or 1s)")),
        _ => return Err(bad("unknown unit (use ms, s, m or h)")),
    };
    let ms = number.checked_mul(unit_ms).ok_or_else(|| bad("too large"))?;
    if ms == 0 {
        return Err(bad("the period must be at least 1ms"));
    }
    Ok(ms)
}

/// Writes the configuration back in the syntax [`RateLimiterConfig::from_str`] reads, with the
/// largest units that are exact: `bandwidth=10M/1s,bandwidth_burst=50M,ops=1000/1s,ops_burst=100`.
impl fmt::Display for RateLimiterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut separator = "";
        for (limit, burst, bucket) in
            [(BANDWIDTH, BANDWIDTH_BURST, &self.bandwidth), (OPS, OPS_BURST, &self.ops)]
        {
            let Some(bucket) = bucket else { continue };
            write!(f, "{separator}{limit}=")?;
            write_amount(f, bucket.size)?;
            f.write_str("/")?;
            write_period(f, bucket.refill_time_ms)?;
            if bucket.one_time_burst != 0 {
                write!(f, ",{burst}=")?;
                write_amount(f, bucket.one_time_burst)?;
            }
            separator = ",";
        }
        Ok(())
    }
}

fn write_amount(f: &mut fmt::Formatter<'_>, amount: u64) -> fmt::Result {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if amount != 0 && amount.trailing_zeros() >= shift {
            return write!(f, "{}{unit}", amount >> shift);
        }
    }
    write!(f, "{amount}")
}

fn write_period(f: &mut fmt::Formatter<'_>, ms: u64) -> fmt::Result {
    for (unit_ms, unit) in [(3_600_000, "h"), (60_000, "m"), (1000, "s")] {
        if ms != 0 && ms % unit_ms == 0 {
            return write!(f, "{}{unit}", ms / unit_ms);
        }
    }
    write!(f, "{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig { size, one_time_burst, refill_time_ms })
    }

    fn parse(text: &str) -> Result<RateLimiterConfig, ConfigParseError> {
        text.parse()
    }

    #[test]
    fn parses_the_documented_example() {
        let config = parse("bandwidth=10M/1s,bandwidth_burst=50M,ops=1000/1s,ops_burst=100");
        assert_eq!(
            config,
            Ok(RateLimiterConfig {
                bandwidth: bucket(10 << 20, 50 << 20, 1000),
                ops: bucket(1000, 100, 1000),
            })
        );
    }

    #[test]
    fn parses_units_defaults_and_order() {
        assert_eq!(parse(""), Ok(RateLimiterConfig::default()));
        assert_eq!(parse("  "), Ok(RateLimiterConfig::default()));
        assert_eq!(
            parse("bandwidth=4096"),
            Ok(RateLimiterConfig { bandwidth: bucket(4096, 0, 1000), ops: None })
        );
        assert_eq!(
            parse("ops_burst=2K, ops=500/100ms"),
            Ok(RateLimiterConfig { bandwidth: None, ops: bucket(500, 2048, 100) })
        );
        assert_eq!(parse("bandwidth=1MiB/s").unwrap().bandwidth, bucket(1 << 20, 0, 1000));
        assert_eq!(parse("bandwidth=64kb/250ms").unwrap().bandwidth, bucket(64 << 10, 0, 250));
        assert_eq!(parse("bandwidth=512B/2m").unwrap().bandwidth, bucket(512, 0, 120_000));
        assert_eq!(parse("bandwidth=1G/1h").unwrap().bandwidth, bucket(1 << 30, 0, 3_600_000));
        assert_eq!(parse("bandwidth=1T/1S").unwrap().bandwidth, bucket(1 << 40, 0, 1000));
        assert_eq!(parse("ops=1/1ms").unwrap().ops, bucket(1, 0, 1));
        assert_eq!(
            parse("bandwidth=18446744073709551615/1ms").unwrap().bandwidth,
            bucket(u64::MAX, 0, 1)
        );
        assert_eq!(
            parse("bandwidth=1/5124095h").unwrap().bandwidth,
            bucket(1, 0, 18_446_742_000_000)
        );
    }

    #[test]
    fn errors_name_the_option() {
        let error = |text: &str| parse(text).unwrap_err().to_string();
        let cases = [
            ("bw=1M", "unknown rate limit option 'bw'"),
            ("bandwidth", "'bandwidth' has no value"),
            ("bandwidth=1M,", "'' has no value"),
            ("bandwidth=1M,bandwidth=2M", "bandwidth is given more than once"),
            ("ops_burst=10", "ops_burst is given without ops"),
            ("bandwidth=1M,bandwidth_burst=x", "bandwidth_burst: invalid amount 'x': expected"),
            ("bandwidth=1.5M", "bandwidth: invalid amount '1.5M': unknown unit"),
            ("bandwidth=-1", "bandwidth: invalid amount '-1'"),
            ("bandwidth=/1s", "bandwidth: invalid amount '': expected a whole number"),
            ("ops=10KiB", "ops: invalid amount '10KiB': unknown unit"),
            (
                "ops=99999999999999999999",
                "ops: invalid amount '99999999999999999999': the number is too large",
            ),
            ("bandwidth=16777216T", "bandwidth: invalid amount '16777216T': too large"),
            ("ops=10/1", "ops: invalid period '1': missing unit"),
            ("ops=10/1d", "ops: invalid period '1d': unknown unit"),
            ("ops=10/0s", "ops: invalid period '0s': the period must be at least 1ms"),
            ("ops=10/99999999999999999h", "ops: invalid period '99999999999999999h': too large"),
            ("bandwidth=0/1s", "bandwidth: token bucket size is 0"),
            ("ops=1/5124096h", "ops: token bucket refill time"),
        ];
        for (text, expected) in cases {
            let message = error(text);
            assert!(message.contains(expected), "'{text}' gave '{message}', expected '{expected}'");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "bandwidth=10M/1s,bandwidth_burst=50M,ops=1000/1s,ops_burst=100",
            "ops=3/250ms",
            "bandwidth=1000/90m",
            "bandwidth=1536/2h,bandwidth_burst=1",
            "",
        ] {
            let config = parse(text).unwrap();
            assert_eq!(config.to_string(), text);
            assert_eq!(parse(&config.to_string()), Ok(config));
        }
    }
}
