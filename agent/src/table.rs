//! The routing table the agent holds, and the pure rules for applying full tables and deltas to
//! it. Every error here is a reason to Nack: the caller keeps its old table.

use std::collections::BTreeMap;

use meridian_common::names::{validate_dns_label, NameError};
use meridian_proto::v1::{FunctionRoute, RoutingTable, RoutingUpdate};

use meridian_common::address::{parse_host_port, AddressError};

/// `(namespace, name)`: how a function is identified within a table.
pub type FunctionKey = (String, String);

/// Why an update (or a persisted table) is refused. The display text, with its source, is the
/// Nack reason: see [`TableError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("delta base {base} does not match held version {held}")]
    BaseMismatch { base: i64, held: i64 },
    /// A table older than the one held: its sender is behind (e.g. a replica whose cache lags).
    #[error("table version {version} is older than the held version {held}")]
    Older { version: i64, held: i64 },
    #[error("table is for region {got:?}, this agent serves region {want:?}")]
    WrongRegion { got: String, want: String },
    #[error("duplicate function {namespace}/{name}")]
    Duplicate { namespace: String, name: String },
    #[error("{field} {value:?} is not a DNS-1123 label")]
    BadName {
        field: String,
        value: String,
        #[source]
        source: NameError,
    },
    #[error("{field} {value:?} is not host:port")]
    BadAddress {
        field: String,
        value: String,
        #[source]
        source: AddressError,
    },
}

impl TableError {
    /// The whole error chain on one line, as sent in a Nack and logged.
    pub fn reason(&self) -> String {
        crate::error_chain(self)
    }
}

/// A routing table the agent accepted (or loaded): every function checked, keyed uniquely.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    version: i64,
    region: String,
    functions: BTreeMap<FunctionKey, FunctionRoute>,
}

impl Table {
    pub fn version(&self) -> i64 {
        self.version
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Functions in (namespace, name) order.
    pub fn functions(&self) -> impl ExactSizeIterator<Item = &FunctionRoute> {
        self.functions.values()
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&FunctionRoute> {
        self.functions.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Checks a wire table (a persisted one) as strictly as a full update for `region`.
    pub fn from_wire(table: RoutingTable, region: &str) -> Result<Self, TableError> {
        check_region(&table.region, region)?;
        Ok(Self {
            version: table.version,
            region: region.to_owned(),
            functions: collect_unique(table.functions)?,
        })
    }

    /// The wire form, functions sorted by (namespace, name) as the proto promises.
    pub fn to_wire(&self) -> RoutingTable {
        RoutingTable {
            version: self.version,
            region: self.region.clone(),
            functions: self.functions.values().cloned().collect(),
            local_generation: 0,
        }
    }
}

/// Applies `update` (full or delta) on top of `held` for an agent of `region`.
pub fn apply(
    held: Option<&Table>,
    region: &str,
    update: &RoutingUpdate,
) -> Result<Table, TableError> {
    // Versions never go back: a table older than the one held would route on older state (a
    // deleted function back, a new one gone).
    let held_version = held.map_or(0, Table::version);
    if update.version < held_version {
        return Err(TableError::Older {
            version: update.version,
            held: held_version,
        });
    }
    if update.full {
        apply_full(region, update)
    } else {
        apply_delta(held, region, update)
    }
}

/// A full table replaces whatever is held. `base_version` and `removed` are ignored.
pub fn apply_full(region: &str, update: &RoutingUpdate) -> Result<Table, TableError> {
    check_region(&update.region, region)?;
    Ok(Table {
        version: update.version,
        region: region.to_owned(),
        functions: collect_unique(update.functions.iter().cloned())?,
    })
}

/// A delta: `removed` are dropped, then `functions` are added or replaced. It must be based on
/// the held version; holding nothing counts as holding the empty table at version 0.
pub fn apply_delta(
    held: Option<&Table>,
    region: &str,
    update: &RoutingUpdate,
) -> Result<Table, TableError> {
    let held_version = held.map_or(0, Table::version);
    if update.base_version != held_version {
        return Err(TableError::BaseMismatch {
            base: update.base_version,
            held: held_version,
        });
    }
    // Deltas may leave the region empty (nothing changed about it); a different one is a bug.
    if !update.region.is_empty() {
        check_region(&update.region, region)?;
    }
    let changed = collect_unique(update.functions.iter().cloned())?;
    let mut functions = held.map(|t| t.functions.clone()).unwrap_or_default();
    for removed in &update.removed {
        let key = (removed.namespace.clone(), removed.name.clone());
        // A function both removed and changed in one delta has no single meaning.
        if changed.contains_key(&key) {
            return Err(TableError::Duplicate {
                namespace: key.0,
                name: key.1,
            });
        }
        functions.remove(&key);
    }
    functions.extend(changed);
    Ok(Table {
        version: update.version,
        region: region.to_owned(),
        functions,
    })
}

fn check_region(got: &str, want: &str) -> Result<(), TableError> {
    if got == want {
        Ok(())
    } else {
        Err(TableError::WrongRegion {
            got: got.to_owned(),
            want: want.to_owned(),
        })
    }
}

/// Checks every route and keys them, refusing a (namespace, name) seen twice.
fn collect_unique(
    routes: impl IntoIterator<Item = FunctionRoute>,
) -> Result<BTreeMap<FunctionKey, FunctionRoute>, TableError> {
    let mut functions = BTreeMap::new();
    for (index, route) in routes.into_iter().enumerate() {
        check_route(index, &route)?;
        let key = (route.namespace.clone(), route.name.clone());
        if functions.contains_key(&key) {
            return Err(TableError::Duplicate {
                namespace: key.0,
                name: key.1,
            });
        }
        functions.insert(key, route);
    }
    Ok(functions)
}

/// Names are DNS-1123 labels and endpoint addresses are `host:port`. Field paths in errors
/// point into the update as sent, e.g. `functions[2].tiers[0].endpoints[1].address`.
fn check_route(index: usize, route: &FunctionRoute) -> Result<(), TableError> {
    let label = |field: String, value: &str| {
        validate_dns_label(value).map_err(|source| TableError::BadName {
            field,
            value: value.to_owned(),
            source,
        })
    };
    label(format!("functions[{index}].namespace"), &route.namespace)?;
    label(format!("functions[{index}].name"), &route.name)?;
    for (t, tier) in route.tiers.iter().enumerate() {
        label(
            format!("functions[{index}].tiers[{t}].region"),
            &tier.region,
        )?;
        for (e, endpoint) in tier.endpoints.iter().enumerate() {
            parse_host_port(&endpoint.address).map_err(|source| TableError::BadAddress {
                field: format!("functions[{index}].tiers[{t}].endpoints[{e}].address"),
                value: endpoint.address.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_proto::v1::{Endpoint, FunctionRef, Tier};

    fn route(namespace: &str, name: &str, version: i64) -> FunctionRoute {
        FunctionRoute {
            namespace: namespace.into(),
            name: name.into(),
            function_version: version,
            tiers: vec![Tier {
                region: "us-east".into(),
                local: true,
                endpoints: vec![Endpoint {
                    address: "127.0.1.1:9000".into(),
                    id: "i-1".into(),
                    state: 1,
                    zone: "us-east-a".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn full(version: i64, functions: Vec<FunctionRoute>) -> RoutingUpdate {
        RoutingUpdate {
            version,
            full: true,
            region: "us-east".into(),
            functions,
            ..Default::default()
        }
    }

    fn delta(
        base: i64,
        version: i64,
        functions: Vec<FunctionRoute>,
        removed: &[(&str, &str)],
    ) -> RoutingUpdate {
        RoutingUpdate {
            version,
            base_version: base,
            full: false,
            more: false,
            region: "us-east".into(),
            functions,
            removed: removed
                .iter()
                .map(|(ns, n)| FunctionRef {
                    namespace: (*ns).into(),
                    name: (*n).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn names(table: &Table) -> Vec<String> {
        table
            .functions()
            .map(|f| format!("{}/{}@{}", f.namespace, f.name, f.function_version))
            .collect()
    }

    #[test]
    fn an_older_table_is_refused() {
        let held = apply_full(
            "us-east",
            &RoutingUpdate {
                version: 10,
                full: true,
                region: "us-east".into(),
                ..Default::default()
            },
        )
        .unwrap();
        let older = RoutingUpdate {
            version: 9,
            full: true,
            region: "us-east".into(),
            ..Default::default()
        };
        assert_eq!(
            apply(Some(&held), "us-east", &older),
            Err(TableError::Older {
                version: 9,
                held: 10
            })
        );
        let same = RoutingUpdate {
            version: 10,
            ..older
        };
        assert!(apply(Some(&held), "us-east", &same).is_ok());
    }

    #[test]
    fn full_table_replaces_and_sorts() {
        let update = full(7, vec![route("default", "b", 1), route("default", "a", 2)]);
        let table = apply(None, "us-east", &update).unwrap();
        assert_eq!(table.version(), 7);
        assert_eq!(table.region(), "us-east");
        assert_eq!(names(&table), ["default/a@2", "default/b@1"]);
        let wire = table.to_wire();
        assert_eq!(wire.functions[0].name, "a");
        assert_eq!(Table::from_wire(wire, "us-east").unwrap(), table);

        // A second full table drops what the first had.
        let next = apply(Some(&table), "us-east", &full(9, vec![route("x", "c", 3)])).unwrap();
        assert_eq!(names(&next), ["x/c@3"]);
    }

    #[test]
    fn delta_adds_changes_and_removes() {
        let held = apply_full(
            "us-east",
            &full(5, vec![route("default", "a", 1), route("default", "b", 1)]),
        )
        .unwrap();
        let update = delta(
            5,
            6,
            vec![route("default", "a", 2), route("default", "c", 6)],
            &[("default", "b"), ("default", "not-there")],
        );
        let next = apply(Some(&held), "us-east", &update).unwrap();
        assert_eq!(next.version(), 6);
        assert_eq!(names(&next), ["default/a@2", "default/c@6"]);
        // Pure: the held table is untouched.
        assert_eq!(held.version(), 5);
        assert_eq!(names(&held), ["default/a@1", "default/b@1"]);
    }

    #[test]
    fn delta_on_wrong_base_is_refused() {
        let held = apply_full("us-east", &full(5, vec![route("default", "a", 1)])).unwrap();
        let err = apply(Some(&held), "us-east", &delta(4, 6, vec![], &[])).unwrap_err();
        assert_eq!(err.reason(), "delta base 4 does not match held version 5");

        // Holding nothing is holding version 0.
        let err = apply(None, "us-east", &delta(5, 6, vec![], &[])).unwrap_err();
        assert_eq!(err.reason(), "delta base 5 does not match held version 0");
        let from_empty = apply(None, "us-east", &delta(0, 1, vec![route("d", "a", 1)], &[]));
        assert_eq!(names(&from_empty.unwrap()), ["d/a@1"]);
    }

    #[test]
    fn duplicates_are_refused() {
        let update = full(3, vec![route("default", "a", 1), route("default", "a", 2)]);
        let err = apply(None, "us-east", &update).unwrap_err();
        assert_eq!(err.reason(), "duplicate function default/a");

        let held = apply_full("us-east", &full(3, vec![route("default", "a", 1)])).unwrap();
        let both = delta(3, 4, vec![route("default", "a", 4)], &[("default", "a")]);
        let err = apply(Some(&held), "us-east", &both).unwrap_err();
        assert!(matches!(err, TableError::Duplicate { .. }), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        let err = apply(None, "us-east", &full(1, vec![route("Default", "a", 1)])).unwrap_err();
        assert_eq!(
            err.reason(),
            "functions[0].namespace \"Default\" is not a DNS-1123 label: must consist of \
             lowercase letters, digits and '-' (found 'D')"
        );
        let err = apply(None, "us-east", &full(1, vec![route("d", "", 1)])).unwrap_err();
        assert!(err.reason().starts_with("functions[0].name \"\""), "{err}");

        let mut bad_tier = route("d", "a", 1);
        bad_tier.tiers[0].region = "us_east".into();
        let err = apply(None, "us-east", &full(1, vec![bad_tier])).unwrap_err();
        assert!(
            err.reason().starts_with("functions[0].tiers[0].region"),
            "{err}"
        );
    }

    #[test]
    fn bad_address_is_refused_and_held_table_is_kept() {
        let held = apply_full("us-east", &full(5, vec![route("default", "a", 1)])).unwrap();
        let mut bad = route("default", "b", 6);
        bad.tiers[0].endpoints[0].address = "127.0.1.1".into();
        let err = apply(Some(&held), "us-east", &delta(5, 6, vec![bad], &[])).unwrap_err();
        assert_eq!(
            err.reason(),
            "functions[0].tiers[0].endpoints[0].address \"127.0.1.1\" is not host:port: \
             must be host:port (no port found)"
        );
        assert_eq!(held.version(), 5);
    }

    #[test]
    fn wrong_region_is_refused() {
        let mut update = full(1, vec![]);
        update.region = "eu-west".into();
        let err = apply(None, "us-east", &update).unwrap_err();
        assert!(matches!(err, TableError::WrongRegion { .. }), "{err}");

        let wire = RoutingTable {
            local_generation: Default::default(),
            version: 1,
            region: "eu-west".into(),
            functions: vec![],
        };
        assert!(Table::from_wire(wire, "us-east").is_err());

        // A delta that does not name its region is fine.
        let held = apply_full("us-east", &full(1, vec![])).unwrap();
        let mut quiet = delta(1, 2, vec![], &[]);
        quiet.region.clear();
        assert_eq!(apply(Some(&held), "us-east", &quiet).unwrap().version(), 2);
    }
}
