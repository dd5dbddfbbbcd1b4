//! Byte sizes and bandwidths as people write them: `64G`, `24GiB`, `512MB`, `400GB/s`.
//!
//! Suffixes `K`, `M`, `G`, `T` and `KiB`..`TiB` are binary (powers of 1024: a "64G" Mac has
//! 64 GiB); `KB`, `MB`, `GB`, `TB` are decimal, as bandwidths are quoted. A bare number is bytes
//! (sizes) or GB/s (bandwidths).

/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;

fn split_number(s: &str) -> Result<(f64, &str), String> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let num: f64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{s}`: expected a number with a unit"))?;
    if !num.is_finite() || num < 0.0 {
        return Err(format!("`{s}`: must be a non-negative number"));
    }
    Ok((num, unit.trim()))
}

fn unit_factor(unit: &str) -> Option<f64> {
    let f = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return None,
    };
    Some(f)
}

/// Parses a byte size: `64G`, `24GiB`, `1.5T`, `512MB`, `1000`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, unit) = split_number(s)?;
    let factor = unit_factor(unit)
        .ok_or_else(|| format!("`{s}`: unknown size unit `{unit}` (use K/M/G/T, KiB.., KB..)"))?;
    let bytes = num * factor;
    if bytes > u64::MAX as f64 {
        return Err(format!("`{s}`: too large"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a bandwidth into bytes/s: `400GB/s`, `400` (GB/s), `100GiB/s`, `800MB/s`.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let trimmed = s.trim();
    let body = trimmed
        .strip_suffix("/s")
        .or_else(|| trimmed.strip_suffix("ps"))
        .unwrap_or(trimmed);
    let (num, unit) = split_number(body)?;
    let factor = if unit.is_empty() {
        1e9
    } else {
        unit_factor(unit).ok_or_else(|| format!("`{s}`: unknown bandwidth unit `{unit}`"))?
    };
    let bps = num * factor;
    if bps < 1.0 || bps > u64::MAX as f64 {
        return Err(format!("`{s}`: bandwidth must be at least 1 byte/s"));
    }
    Ok(bps.round() as u64)
}

/// `12.3 GiB`, `512.0 MiB`, `900 B`: for tables and error messages.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `400 GB/s`: bandwidths are quoted in decimal units.
pub fn format_bandwidth(bytes_per_s: u64) -> String {
    format!("{:.0} GB/s", bytes_per_s as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64G").unwrap(), 64 * GIB);
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 * GIB);
        assert_eq!(parse_bytes(" 1.5 t ").unwrap(), 3 * (1 << 39));
        assert_eq!(parse_bytes("512MB").unwrap(), 512_000_000);
        assert_eq!(parse_bytes("1_000").unwrap(), 1000);
        assert!(parse_bytes("12 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_bytes("G").is_err());
        assert!(parse_bytes("-3G").is_err());
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("400GB/s").unwrap(), 400_000_000_000);
        assert_eq!(parse_bandwidth("400").unwrap(), 400_000_000_000);
        assert_eq!(parse_bandwidth("800MB/s").unwrap(), 800_000_000);
        assert_eq!(parse_bandwidth("1GiB/s").unwrap(), GIB);
        assert!(parse_bandwidth("0").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(900), "900 B");
        assert_eq!(format_bytes(64 * GIB), "64.0 GiB");
        assert_eq!(format_bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(format_bandwidth(400_000_000_000), "400 GB/s");
    }
}
