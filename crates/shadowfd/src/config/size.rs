//! Human-readable sizes: `512M`, `2G`, `1GiB`, `1.5G`, `4096`.

/// A byte count as configuration spells it: parses `512M`, `2G`, `1GiB`,
/// `1.5G`, `4096` ([`std::str::FromStr`]) and displays for people
/// (`300.0 MiB`, `4 KiB`, `17 B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    /// Why the text is not a size, and what is accepted.
    type Err = String;
    fn from_str(s: &str) -> Result<Size, String> {
        parse_size(s).map(Size)
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

/// Parses a size. `K`, `M`, `G`, `T` and `KiB`, `MiB`, `GiB`, `TiB` are powers
/// of 1024; `KB`, `MB`, `GB`, `TB` are powers of 1000; a trailing `B` and
/// surrounding spaces are allowed; case does not matter. The result is rounded
/// down to a whole byte.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size; expected e.g. 512M, 2G, 1GiB or a number of bytes".into());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(
            "not a size: expected a number with an optional unit, e.g. 512M, 2G, 1GiB or 4096"
                .into(),
        );
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?}; use K, M, G, T (powers of 1024), KiB..TiB, or KB..TB (powers of 1000)"
            ));
        }
    };
    if num.is_empty() || num.matches('.').count() > 1 {
        return Err("not a number; expected e.g. 512M, 2G, 1GiB or a number of bytes".into());
    }
    let value = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| "not a number".to_string())?;
        let v = f * mult as f64;
        if !v.is_finite() || v >= u64::MAX as f64 {
            return Err("too large".into());
        }
        v as u64
    } else {
        let n: u64 = num.parse().map_err(|_| "too large".to_string())?;
        n.checked_mul(mult).ok_or_else(|| "too large".to_string())?
    };
    Ok(value)
}

/// Formats bytes for people: `300.0 MiB`, `4 KiB`, `17 B`.
pub(crate) fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v.fract() == 0.0 {
        format!("{} {}", v as u64, UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// The shortest exact `--max-size` spelling at or above `n` (`512M`, `3G`).
pub(crate) fn suggest_size(n: u64) -> String {
    for (unit, m) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if n >= m {
            return format!("{}{unit}", n.div_ceil(m));
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1gib").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 64k ").unwrap(), 64 << 10);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("10B").unwrap(), 10);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "banana",
            "",
            "12Q",
            "1.2.3M",
            "M",
            "-5",
            "99999999999999999999",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(300 << 20), "300 MiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(17), "17 B");
        assert_eq!(suggest_size(300 << 20), "300M");
        assert_eq!(suggest_size((1 << 30) + 1), "2G");
    }
}
