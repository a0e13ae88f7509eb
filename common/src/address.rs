//! The `host:port` rule for endpoint, gateway and URL addresses, shared by the control plane's
//! spec and hello checks and the agent's table checks, endpoint report and flags, so that a
//! spec the control plane accepts is never one an agent skips.

use std::fmt;

/// Why a string is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("must be host:port (no port found)")]
    MissingPort,
    #[error("host must not be empty")]
    EmptyHost,
    #[error("host contains {0:?}")]
    BadHost(char),
    #[error("port {0:?} is not a number in 1..=65535")]
    BadPort(String),
}

/// A parsed `host:port`. IPv6 hosts are kept without brackets and get them back on display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses `host:port` (`[v6]:port` for IPv6). The port is required and must not be 0: these are
/// addresses something connects to.
pub fn parse_host_port(value: &str) -> Result<HostPort, AddressError> {
    let (host, port) = split_host_port(value)?;
    let port = port.ok_or(AddressError::MissingPort)?;
    Ok(HostPort {
        host: host.to_owned(),
        port: parse_port(port)?,
    })
}

/// Parses `host[:port]`, filling in `default_port` when the port is absent (URL authorities).
pub fn parse_host_opt_port(value: &str, default_port: u16) -> Result<HostPort, AddressError> {
    let (host, port) = split_host_port(value)?;
    let port = match port {
        Some(port) => parse_port(port)?,
        None => default_port,
    };
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

/// Splits into host (brackets removed) and the text after the port colon, if any.
fn split_host_port(value: &str) -> Result<(&str, Option<&str>), AddressError> {
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(AddressError::BadHost('['))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or(AddressError::BadHost(']'))?),
        };
        // Inside brackets only an IPv6 literal makes sense.
        if let Some(bad) = host
            .chars()
            .find(|c| !(c.is_ascii_hexdigit() || *c == ':' || *c == '.'))
        {
            return Err(AddressError::BadHost(bad));
        }
        (host, port)
    } else {
        let (host, port) = match value.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        };
        // Hostnames and IPv4 literals; anything else (a second ':', '/', '@', spaces) means
        // a URL or a typo, not an address.
        if let Some(bad) = host
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
        {
            return Err(AddressError::BadHost(bad));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(AddressError::EmptyHost);
    }
    Ok((host, port))
}

fn parse_port(port: &str) -> Result<u16, AddressError> {
    match port.parse::<u16>() {
        // `parse` accepts a leading '+', which no address should carry.
        Ok(n) if n != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(AddressError::BadPort(port.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_port() {
        for (input, host, port) in [
            ("127.0.0.1:9000", "127.0.0.1", 9000),
            ("gw.us-east.example:15002", "gw.us-east.example", 15002),
            ("[::1]:80", "::1", 80),
            ("localhost:1", "localhost", 1),
        ] {
            let parsed = parse_host_port(input).unwrap();
            assert_eq!(parsed.host, host, "{input}");
            assert_eq!(parsed.port, port, "{input}");
            assert_eq!(parsed.to_string(), input);
        }
    }

    #[test]
    fn rejects_non_addresses() {
        assert_eq!(parse_host_port("127.0.0.1"), Err(AddressError::MissingPort));
        assert_eq!(parse_host_port(":80"), Err(AddressError::EmptyHost));
        assert_eq!(parse_host_port(""), Err(AddressError::EmptyHost));
        assert_eq!(
            parse_host_port("h:0"),
            Err(AddressError::BadPort("0".into()))
        );
        assert_eq!(
            parse_host_port("h:70000"),
            Err(AddressError::BadPort("70000".into()))
        );
        assert_eq!(
            parse_host_port("h:+80"),
            Err(AddressError::BadPort("+80".into()))
        );
        assert_eq!(
            parse_host_port("http://h:80"),
            Err(AddressError::BadHost(':'))
        );
        assert_eq!(parse_host_port("a b:80"), Err(AddressError::BadHost(' ')));
        assert_eq!(parse_host_port("[::1]80"), Err(AddressError::BadHost(']')));
    }

    #[test]
    fn default_port_fills_in() {
        let parsed = parse_host_opt_port("example.com", 80).unwrap();
        assert_eq!(parsed.to_string(), "example.com:80");
        assert_eq!(
            parse_host_opt_port("[::1]", 80).unwrap().to_string(),
            "[::1]:80"
        );
        assert_eq!(parse_host_opt_port("h:8080", 80).unwrap().port, 8080);
    }
}
