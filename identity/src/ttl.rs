//! Lifetimes as operators write them: `90s`, `15m`, `24h`, `90d`.

use std::time::Duration;

/// Why a lifetime could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a lifetime: write a whole number and a unit, s, m, h or d (e.g. 90s, 24h, 90d)"
)]
pub struct TtlError(pub String);

/// Parses `<n><unit>` with unit `s`, `m`, `h` or `d`; zero is refused.
pub fn parse(text: &str) -> Result<Duration, TtlError> {
    let error = || TtlError(text.to_owned());
    let unit_at = text.len().checked_sub(1).ok_or_else(error)?;
    let (number, unit) = text.split_at(unit_at);
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(error());
    }
    let count: u64 = number.parse().map_err(|_| error())?;
    let seconds = match unit {
        "s" => Some(count),
        "m" => count.checked_mul(60),
        "h" => count.checked_mul(3600),
        "d" => count.checked_mul(24 * 3600),
        _ => None,
    }
    .ok_or_else(error)?;
    if seconds == 0 {
        return Err(error());
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lifetimes_and_names_bad_ones() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("90d"), Ok(Duration::from_secs(90 * 86_400)));
        for bad in [
            "",
            "d",
            "0h",
            "1.5h",
            "-1h",
            "+1h",
            "10",
            "1w",
            "h1",
            "99999999999999999999d",
        ] {
            assert_eq!(parse(bad), Err(TtlError(bad.to_owned())), "{bad}");
        }
    }
}
