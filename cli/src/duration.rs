//! Durations as users write them in manifests ("500ms", "15s", "2m", "1m30s") and as
//! meridianctl prints them, converted to and from the wire's whole milliseconds.

use thiserror::Error;

/// Why a duration string was refused. The caller adds the field it came from.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration; write e.g. \"500ms\", \"15s\" or \"2m\"")]
    Empty,
    #[error("invalid duration {0:?}: expected a number followed by a unit (ms, s, m or h), e.g. \"15s\"")]
    Syntax(String),
    #[error("invalid duration {input:?}: unknown unit {unit:?} (use ms, s, m or h)")]
    UnknownUnit { input: String, unit: String },
    #[error("invalid duration {0:?}: longer than {max} ms", max = u32::MAX)]
    TooLong(String),
}

/// Parses a sequence of `<integer><unit>` parts (Go style, e.g. "1m30s") into milliseconds.
///
/// Only whole milliseconds exist on the wire, so fractions are refused rather than rounded.
pub fn parse_ms(input: &str) -> Result<u32, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let syntax = || DurationError::Syntax(input.to_string());
    let too_long = || DurationError::TooLong(input.to_string());
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(syntax());
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        if unit_len == 0 {
            return Err(syntax());
        }
        let (unit, after) = after.split_at(unit_len);
        let factor: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            other => {
                return Err(DurationError::UnknownUnit {
                    input: input.to_string(),
                    unit: other.to_string(),
                })
            }
        };
        let value: u64 = number.parse().map_err(|_| too_long())?;
        total = value
            .checked_mul(factor)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(too_long)?;
        rest = after;
    }
    u32::try_from(total).map_err(|_| too_long())
}

/// Formats milliseconds in the largest unit that divides them exactly, so that the text parses
/// back to the same value: 15000 -> "15s", 500 -> "500ms", 120000 -> "2m", 90000 -> "90s".
pub fn format_ms(ms: u32) -> String {
    const UNITS: [(u32, &str); 3] = [(3_600_000, "h"), (60_000, "m"), (1_000, "s")];
    if ms == 0 {
        return "0s".to_string();
    }
    for (factor, unit) in UNITS {
        if ms.is_multiple_of(factor) {
            return format!("{}{unit}", ms / factor);
        }
    }
    format!("{ms}ms")
}

/// Formats an elapsed time kubectl style, two units at most: "45s", "5m3s", "2h10m", "3d4h".
pub fn format_age_ms(elapsed_ms: i64) -> String {
    let secs = elapsed_ms.max(0) / 1000;
    let (days, hours, minutes, seconds) =
        (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        assert_eq!(parse_ms("500ms"), Ok(500));
        assert_eq!(parse_ms("15s"), Ok(15_000));
        assert_eq!(parse_ms("2m"), Ok(120_000));
        assert_eq!(parse_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_ms(" 0s "), Ok(0));
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(parse_ms(""), Err(DurationError::Empty));
        assert!(matches!(parse_ms("15"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse_ms("s"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse_ms("1.5s"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse_ms("-1s"), Err(DurationError::Syntax(_))));
        assert!(matches!(
            parse_ms("15x"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_ms("2000h"), Err(DurationError::TooLong(_))));
        assert!(matches!(
            parse_ms("99999999999999999999999s"),
            Err(DurationError::TooLong(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        for ms in [
            0, 1, 500, 1_000, 1_500, 15_000, 90_000, 120_000, 3_600_000, 5_400_000,
        ] {
            assert_eq!(parse_ms(&format_ms(ms)), Ok(ms), "{ms}");
        }
        assert_eq!(format_ms(15_000), "15s");
        assert_eq!(format_ms(500), "500ms");
        assert_eq!(format_ms(120_000), "2m");
    }

    #[test]
    fn formats_ages() {
        assert_eq!(format_age_ms(-5), "0s");
        assert_eq!(format_age_ms(45_999), "45s");
        assert_eq!(format_age_ms(303_000), "5m3s");
        assert_eq!(format_age_ms(7_800_000), "2h10m");
        assert_eq!(format_age_ms(273_600_000), "3d4h");
    }
}
