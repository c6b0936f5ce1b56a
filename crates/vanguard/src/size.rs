//! Memory sizes as people write them: `512M`, `4G`: whole numbers with an optional
//! unit (K, M, G, T, with optional "iB"/"B"); a bare number means MiB, as with QEMU's `-m`.

/// Parses a size into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "invalid size '{text}': expected a number, optionally followed by K, M, G or T"
        ));
    }
    let number: u64 =
        digits.parse().map_err(|_| format!("invalid size '{text}': the number is too large"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "B" => 0,
        _ => {
            return Err(format!("invalid size '{text}': unknown unit '{unit}' (use K, M, G or T)"))
        }
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| format!("invalid size '{text}': too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn units() {
        assert_eq!(parse_size("128"), Ok(128 << 20));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4gb"), Ok(4 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096B"), Ok(4096));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(parse_size("12X").unwrap_err().contains("unknown unit 'X'"));
        assert!(parse_size("").unwrap_err().contains("expected a number"));
        assert!(parse_size("G").unwrap_err().contains("expected a number"));
        assert!(parse_size("-5M").unwrap_err().contains("expected a number"));
        assert!(parse_size("99999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_size("99999999T").unwrap_err().contains("too large"));
        assert!(parse_size("1.5G").unwrap_err().contains("unknown unit '.5G'"));
    }
}
