//! Kubernetes-style resource quantities, as users write them in specs and on
//! the command line: memory `"256Mi"`, `"1G"`, `"1500000"`; CPU `"500m"`,
//! `"0.5"`, `"2"`.

/// Why a quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not a number with a known suffix.
    #[error("{0:?} is not a quantity (examples: {1})")]
    Unparsable(String, &'static str),
    /// Zero or negative.
    #[error("{0:?} must be positive")]
    NotPositive(String),
    /// Larger than any host could grant.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

const MEMORY_EXAMPLES: &str = "256Mi, 1Gi, 512M, 1000000";
const CPU_EXAMPLES: &str = "500m, 0.5, 2";

/// Parses a memory quantity into bytes.
pub fn parse_memory(s: &str) -> Result<u64, QuantityError> {
    let unparsable = || QuantityError::Unparsable(s.to_string(), MEMORY_EXAMPLES);
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(unparsable()),
    };
    let value = parse_decimal(number).ok_or_else(unparsable)?;
    let bytes = value * multiplier as f64;
    if bytes < 1.0 {
        return Err(QuantityError::NotPositive(s.to_string()));
    }
    if bytes >= u64::MAX as f64 {
        return Err(QuantityError::TooLarge(s.to_string()));
    }
    Ok(bytes as u64)
}

/// Parses a CPU quantity into thousandths of a CPU.
pub fn parse_cpu_millis(s: &str) -> Result<u64, QuantityError> {
    let unparsable = || QuantityError::Unparsable(s.to_string(), CPU_EXAMPLES);
    let t = s.trim();
    let millis = match t.strip_suffix('m') {
        Some(n) if !n.contains('.') => parse_decimal(n).ok_or_else(unparsable)?,
        Some(_) => return Err(unparsable()),
        None => parse_decimal(t).ok_or_else(unparsable)? * 1000.0,
    };
    if millis < 1.0 {
        return Err(QuantityError::NotPositive(s.to_string()));
    }
    // No host has a million CPUs; refusing early keeps quota arithmetic in range.
    if millis > 1e9 {
        return Err(QuantityError::TooLarge(s.to_string()));
    }
    Ok(millis.round() as u64)
}

/// A plain non-negative decimal: digits with at most one dot, no sign, no exponent.
fn parse_decimal(s: &str) -> Option<f64> {
    let valid = !s.is_empty()
        && s != "."
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && s.bytes().filter(|&b| b == b'.').count() <= 1;
    if valid {
        s.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("256Mi"), Ok(256 << 20));
        assert_eq!(parse_memory("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory("512M"), Ok(512_000_000));
        assert_eq!(parse_memory("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_memory("1000000"), Ok(1_000_000));
        assert_eq!(parse_memory(" 64Ki "), Ok(65536));
        for bad in ["", "Mi", "-1Mi", "1.2.3", "12XB", "1e6", "ten"] {
            assert!(
                matches!(parse_memory(bad), Err(QuantityError::Unparsable(..))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_memory("0"),
            Err(QuantityError::NotPositive(_))
        ));
        assert!(matches!(
            parse_memory("99999999999Ti"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert_eq!(parse_cpu_millis("0.25"), Ok(250));
        for bad in ["", "m", "1.5m", "-1", "abc", "2 cpus"] {
            assert!(
                matches!(parse_cpu_millis(bad), Err(QuantityError::Unparsable(..))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_cpu_millis("0m"),
            Err(QuantityError::NotPositive(_))
        ));
        assert_eq!(
            parse_cpu_millis("lots").unwrap_err().to_string(),
            "\"lots\" is not a quantity (examples: 500m, 0.5, 2)"
        );
    }
}
