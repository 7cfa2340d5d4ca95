//! Subcommands of the `fusion` binary: thin adapters onto the libraries.

pub mod compare;
pub mod data_driven;
pub mod demo;
pub mod embed;
pub mod eval;
pub mod generate;
pub mod merge;
pub mod methods;
pub mod moe;
pub mod search;
pub mod serve;
pub mod zoo;

/// Parses a size such as `5GB`, `500MB`, `2GiB` or a plain byte count (the
/// same syntax as the gateway's configuration).
pub fn parse_size(s: &str) -> Result<u64, String> {
    gateway::config::parse_bytes(s)
}

/// Parses a count such as `1B`, `100M`, `50k` or a plain number.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('b') | Some('g') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a count (e.g. 1B, 100M, 50k)"))?;
    if !(x.is_finite() && x >= 1.0) {
        return Err(format!("`{s}` must be at least 1"));
    }
    Ok((x * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2MiB").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("-1GB").is_err());
        assert_eq!(parse_count("1B").unwrap(), 1_000_000_000);
        assert_eq!(parse_count("2.5M").unwrap(), 2_500_000);
        assert!(parse_count("abc").is_err());
    }
}
