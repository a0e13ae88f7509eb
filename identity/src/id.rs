//! Mesh identities as SPIFFE-style URIs: what a certificate says its holder is.
//!
//! `spiffe://<trust-domain>/region/<r>/agent/<id>`, `.../region/<r>/sidecar/<id>`,
//! `spiffe://<trust-domain>/control-plane/<replica>` and `spiffe://<trust-domain>/user/<name>`.
//! Every segment follows the mesh's DNS-label rule, so an identity never needs escaping and a
//! region in an identity is spelled exactly as a region anywhere else.

use std::fmt;
use std::str::FromStr;

use meridian_common::names::{validate_dns_label, NameError};

/// The URI scheme of every identity.
const SCHEME: &str = "spiffe://";

/// Why a string is not a mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("trust domain {domain:?}: {problem}")]
    TrustDomain { domain: String, problem: String },
    #[error("{segment} {value:?}: {source}")]
    Segment {
        segment: &'static str,
        value: String,
        #[source]
        source: NameError,
    },
    #[error("path {0:?} is none of /region/R/agent/ID, /region/R/sidecar/ID, /control-plane/ID, /user/NAME")]
    Path(String),
}

/// A trust domain: the mesh's name, the authority part of every identity in it. Lowercase
/// letters, digits, `.`, `-` and `_`, 1..=255 characters (the SPIFFE rule).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(domain: &str) -> Result<Self, IdError> {
        let problem = if domain.is_empty() {
            Some("must not be empty".to_string())
        } else if domain.len() > 255 {
            Some(format!(
                "must be at most 255 characters (got {})",
                domain.len()
            ))
        } else {
            domain
                .chars()
                .find(|c| {
                    !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
                })
                .map(|bad| format!("must consist of a-z, 0-9, '.', '-' and '_' (found {bad:?})"))
        };
        match problem {
            Some(problem) => Err(IdError::TrustDomain {
                domain: domain.to_owned(),
                problem,
            }),
            None => Ok(Self(domain.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a holder of a mesh certificate is, within its trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The agent `id` of `region`: it may speak for that region only.
    Agent { region: String, id: String },
    /// A sidecar of `region` (its gateway listener serves that region's functions).
    Sidecar { region: String, id: String },
    /// A control-plane replica.
    ControlPlane { replica: String },
    /// A person or a system calling the API (roles per namespace come with the credential).
    User { name: String },
}

impl Role {
    /// The region the holder may speak for, if it is bound to one.
    pub fn region(&self) -> Option<&str> {
        match self {
            Self::Agent { region, .. } | Self::Sidecar { region, .. } => Some(region),
            Self::ControlPlane { .. } | Self::User { .. } => None,
        }
    }
}

/// A full identity: trust domain and role; displayed and parsed as its URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: TrustDomain,
    pub role: Role,
}

fn segment(segment: &'static str, value: &str) -> Result<String, IdError> {
    validate_dns_label(value).map_err(|source| IdError::Segment {
        segment,
        value: value.to_owned(),
        source,
    })?;
    Ok(value.to_owned())
}

impl Identity {
    pub fn agent(trust_domain: &TrustDomain, region: &str, id: &str) -> Result<Self, IdError> {
        Ok(Self {
            trust_domain: trust_domain.clone(),
            role: Role::Agent {
                region: segment("region", region)?,
                id: segment("agent id", id)?,
            },
        })
    }

    pub fn sidecar(trust_domain: &TrustDomain, region: &str, id: &str) -> Result<Self, IdError> {
        Ok(Self {
            trust_domain: trust_domain.clone(),
            role: Role::Sidecar {
                region: segment("region", region)?,
                id: segment("sidecar id", id)?,
            },
        })
    }

    pub fn control_plane(trust_domain: &TrustDomain, replica: &str) -> Result<Self, IdError> {
        Ok(Self {
            trust_domain: trust_domain.clone(),
            role: Role::ControlPlane {
                replica: segment("replica", replica)?,
            },
        })
    }

    pub fn user(trust_domain: &TrustDomain, name: &str) -> Result<Self, IdError> {
        Ok(Self {
            trust_domain: trust_domain.clone(),
            role: Role::User {
                name: segment("user", name)?,
            },
        })
    }

    /// The URI, as written into a certificate's subject alternative name.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.trust_domain)?;
        match &self.role {
            Role::Agent { region, id } => write!(f, "/region/{region}/agent/{id}"),
            Role::Sidecar { region, id } => write!(f, "/region/{region}/sidecar/{id}"),
            Role::ControlPlane { replica } => write!(f, "/control-plane/{replica}"),
            Role::User { name } => write!(f, "/user/{name}"),
        }
    }
}

impl FromStr for Identity {
    type Err = IdError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdError::Scheme(uri.to_owned()))?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        let trust_domain = TrustDomain::new(domain)?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["region", region, "agent", id] => Self::agent(&trust_domain, region, id),
            ["region", region, "sidecar", id] => Self::sidecar(&trust_domain, region, id),
            ["control-plane", replica] => Self::control_plane(&trust_domain, replica),
            ["user", name] => Self::user(&trust_domain, name),
            _ => Err(IdError::Path(format!("/{path}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain() -> TrustDomain {
        TrustDomain::new("meridian.local").unwrap()
    }

    #[test]
    fn identities_round_trip_through_their_uri() {
        for identity in [
            Identity::agent(&domain(), "us-east", "us-east-1").unwrap(),
            Identity::sidecar(&domain(), "eu-west", "sc-7").unwrap(),
            Identity::control_plane(&domain(), "cp-0").unwrap(),
            Identity::user(&domain(), "admin").unwrap(),
        ] {
            let uri = identity.uri();
            assert_eq!(uri.parse::<Identity>().unwrap(), identity, "{uri}");
        }
        assert_eq!(
            Identity::agent(&domain(), "us-east", "a1").unwrap().uri(),
            "spiffe://meridian.local/region/us-east/agent/a1"
        );
        assert_eq!(
            Identity::sidecar(&domain(), "us-east", "a1")
                .unwrap()
                .role
                .region(),
            Some("us-east")
        );
    }

    #[test]
    fn malformed_identities_name_what_is_wrong() {
        for (uri, want) in [
            (
                "https://meridian.local/user/a",
                "does not start with spiffe://",
            ),
            ("spiffe://Meridian/user/a", "trust domain \"Meridian\""),
            ("spiffe:///user/a", "trust domain \"\""),
            ("spiffe://m/region/US/agent/a", "region \"US\""),
            ("spiffe://m/region/us/agent/../x", "path"),
            ("spiffe://m/region/us/agent/a/extra", "path"),
            ("spiffe://m/region/us/agent/", "agent id \"\""),
            ("spiffe://m/gateway/x", "path"),
            ("spiffe://m", "path"),
        ] {
            let error = uri.parse::<Identity>().unwrap_err().to_string();
            assert!(error.contains(want), "{uri}: {error}");
        }
    }
}
