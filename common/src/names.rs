//! The DNS-1123 label rule that names of regions, namespaces, functions and agents follow.

/// Why a name is not a DNS-1123 label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most 63 characters (got {0})")]
    TooLong(usize),
    #[error("must consist of lowercase letters, digits and '-' (found {0:?})")]
    BadCharacter(char),
    #[error("must start and end with a lowercase letter or digit")]
    BadEdge,
}

/// Checks that `name` is a DNS-1123 label: 1..=63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn validate_dns_label(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 63 {
        return Err(NameError::TooLong(name.len()));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::BadCharacter(bad));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::BadEdge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_labels() {
        for ok in ["a", "us-east", "fn-1", "0abc", &"x".repeat(63)] {
            assert_eq!(validate_dns_label(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_non_labels() {
        assert_eq!(validate_dns_label(""), Err(NameError::Empty));
        assert_eq!(
            validate_dns_label(&"x".repeat(64)),
            Err(NameError::TooLong(64))
        );
        assert_eq!(validate_dns_label("US"), Err(NameError::BadCharacter('U')));
        assert_eq!(validate_dns_label("a_b"), Err(NameError::BadCharacter('_')));
        assert_eq!(validate_dns_label("-a"), Err(NameError::BadEdge));
        assert_eq!(validate_dns_label("a-"), Err(NameError::BadEdge));
    }
}
