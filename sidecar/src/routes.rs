//! The routing state the request path reads: compiled from a `RoutingTable` (validated first,
//! every error naming its field), immutable once built, swapped whole.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderValue, Method};
use meridian_common::names::{validate_dns_label, NameError};
use meridian_proto::v1 as pb;

use crate::budget::{BudgetRegistry, RetryBudget};
use crate::endpoints::{parse_address, AddressError, Clock, EndpointRegistry, EndpointState};
use crate::metrics::{FunctionStats, StatsRegistry, TierStats};

/// The namespace of a function addressed by its bare name.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Policy defaults, as the control plane documents them for unset fields.
pub const DEFAULT_TIMEOUT_MS: u32 = 15_000;
pub const DEFAULT_PER_TRY_TIMEOUT_MS: u32 = 5_000;
pub const DEFAULT_MAX_RETRIES: u32 = 2;
pub const MAX_RETRIES_LIMIT: u32 = 5;
/// Longest host the lookup considers: `<63-char name>.<63-char namespace>`.
const MAX_HOST_LEN: usize = 127;

/// FNV-1a: host names are short, and the map's keys come from the control plane, not from
/// clients (lookups cannot grow it), so SipHash's flooding resistance buys nothing here.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

type HostMap = HashMap<Box<str>, usize, BuildHasherDefault<Fnv>>;

/// Why a table cannot be compiled: the reason the sidecar reports to its agent (which Nacks
/// it), always naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("region {got:?} is not this sidecar's region {want:?}")]
    WrongRegion { got: String, want: String },
    #[error("{field} {value:?} is not a DNS-1123 label")]
    BadName {
        field: String,
        value: String,
        #[source]
        source: NameError,
    },
    #[error("{field}: duplicate function {namespace}/{name}")]
    Duplicate {
        field: String,
        namespace: String,
        name: String,
    },
    #[error("{field} {value:?} is not host:port")]
    BadAddress {
        field: String,
        value: String,
        #[source]
        source: AddressError,
    },
    #[error("{field} {value}: {why}")]
    BadPolicy {
        field: String,
        value: String,
        why: &'static str,
    },
    #[error("{field} {value:?} is not an upper-case HTTP method")]
    BadMethod { field: String, value: String },
    #[error("{field}: region {region:?} already has a tier")]
    DuplicateTier { field: String, region: String },
    #[error("{field}: a local tier must be this sidecar's region {want:?}, not {got:?}")]
    LocalElsewhere {
        field: String,
        got: String,
        want: String,
    },
    #[error("{field}: a remote tier must not be this sidecar's own region {region:?}")]
    RemoteSelf { field: String, region: String },
}

impl TableError {
    /// The whole error chain on one line: what the agent forwards as the Nack reason.
    pub fn reason(&self) -> String {
        crate::error_chain(self)
    }
}

/// A function's routing policy, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub timeout: Duration,
    pub per_try_timeout: Duration,
    pub max_retries: u32,
    /// Methods retried besides the idempotent ones.
    pub retryable_methods: Vec<Method>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(u64::from(DEFAULT_TIMEOUT_MS)),
            per_try_timeout: Duration::from_millis(u64::from(DEFAULT_PER_TRY_TIMEOUT_MS)),
            max_retries: DEFAULT_MAX_RETRIES,
            retryable_methods: Vec::new(),
        }
    }
}

impl Policy {
    /// Idempotent by HTTP semantics (GET, HEAD, OPTIONS, PUT, DELETE), or named by the policy.
    pub fn retryable(&self, method: &Method) -> bool {
        matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        ) || self.retryable_methods.contains(method)
    }
}

/// Where a tier's position comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Local,
    /// The spec's failover order: kept as sent.
    Explicit,
    /// Ordered by the data plane: by probe round-trip time.
    Measured,
}

impl Order {
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Local => "local",
            Order::Explicit => "explicit",
            Order::Measured => "measured",
        }
    }
}

/// One endpoint of a tier, as this table version sees it.
#[derive(Debug)]
pub struct Endpoint {
    pub id: String,
    pub zone: String,
    /// The table's state name (READY, STARTING, ...).
    pub state: &'static str,
    /// READY (or unspecified): may be sent traffic.
    pub routable: bool,
    pub shared: Arc<EndpointState>,
}

#[derive(Debug)]
pub struct Tier {
    pub region: String,
    /// `meridian-region` value for responses from this tier that lack one.
    pub region_header: HeaderValue,
    pub local: bool,
    pub order: Order,
    pub ready_instances: u32,
    pub endpoints: Vec<Endpoint>,
    pub stats: Arc<TierStats>,
}

#[derive(Debug)]
pub struct FunctionRoute {
    pub namespace: String,
    pub name: String,
    pub version: i64,
    pub policy: Policy,
    /// Local tier first, then the table's order.
    pub tiers: Vec<Tier>,
    /// What the local agent runs for this function.
    pub workload: Workload,
    /// The local tier has an endpoint that may be sent traffic (READY by the table; ejection
    /// does not count: an ejected instance is running, just failing).
    pub local_ready: bool,
    /// Expected spawn-to-ready time of a local instance; zero when unknown.
    pub cold_start: Duration,
    /// Local instances that exited before they became ready, in a row (the agent's count).
    pub local_failed_starts: u32,
    /// The local agent waits out a restart backoff before it starts the next instance.
    pub local_restart_backoff: bool,
    stats: Arc<FunctionStats>,
    budget: Arc<RetryBudget>,
}

impl FunctionRoute {
    /// A request now would find no ready local instance although the agent could start one:
    /// the activator's case (hold, or route to a warm remote region, and ask for an instance).
    /// Two field reads: this is on every request's path.
    pub fn needs_activation(&self) -> bool {
        !self.local_ready && self.workload == Workload::Process { activatable: true }
    }

    /// The local agent runs this function's instances (its load is reported to the agent).
    pub fn is_process(&self) -> bool {
        matches!(self.workload, Workload::Process { .. })
    }

    /// The local tier, if the function has one (it is always first).
    pub fn local_tier(&self) -> Option<&Tier> {
        self.tiers.first().filter(|tier| tier.local)
    }

    pub fn stats(&self) -> &Arc<FunctionStats> {
        &self.stats
    }

    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// How the outbound listener addresses the function: `name`, or `name.namespace` outside
    /// the default namespace (also the `function` label of metrics).
    pub fn label(&self) -> &str {
        &self.stats.label
    }
}

/// What the local agent runs for a function, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Nothing the local agent starts: an external function, or one hosted in other regions.
    None,
    /// Process instances the local agent starts and stops. `activatable`: the table gives scale
    /// bounds that allow an instance here (`scale` present, `max_instances > 0`), so asking the
    /// agent to activate one can help; a process route without bounds is not placed here.
    Process { activatable: bool },
}

impl Workload {
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::None => "none",
            Workload::Process { .. } => "process",
        }
    }
}

/// Why a host does not name a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// Not `<function>` or `<function>.<namespace>` made of DNS labels.
    Malformed(&'static str),
    /// Well formed, but no such function in the table.
    Unknown,
}

/// A compiled table. Never changes; a new table yields a new state.
#[derive(Debug)]
pub struct RoutingState {
    version: i64,
    /// The agent's counter of local-tier changes at the same version.
    local_generation: u64,
    region: String,
    clock: Clock,
    /// When the state was swapped in, in [`Clock`] nanoseconds (when it was compiled, until
    /// [`RoutingState::mark_applied`]). Read only by `/metrics`.
    applied_at: u64,
    functions: Vec<Arc<FunctionRoute>>,
    /// `name.namespace`, and `name` for the default namespace -> index in `functions`.
    hosts: HostMap,
    /// Every remote gateway of any tier, once each: what the prober probes.
    gateways: Vec<Arc<EndpointState>>,
    /// The functions the local agent runs: what the load sampler reads every few ms.
    processes: Vec<Arc<FunctionRoute>>,
}

impl RoutingState {
    pub fn version(&self) -> i64 {
        self.version
    }

    pub fn local_generation(&self) -> u64 {
        self.local_generation
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Records that the state is being applied now (called just before it is swapped in).
    pub fn mark_applied(&mut self) {
        self.applied_at = self.clock.now();
    }

    /// Time since the state was applied (see [`RoutingState::mark_applied`]).
    pub fn age(&self) -> Duration {
        Duration::from_nanos(self.clock.now().saturating_sub(self.applied_at))
    }

    pub fn functions(&self) -> impl Iterator<Item = &Arc<FunctionRoute>> {
        self.functions.iter()
    }

    pub fn gateways(&self) -> &[Arc<EndpointState>] {
        &self.gateways
    }

    /// The functions whose instances the local agent runs (workload Process), in table order.
    pub fn process_functions(&self) -> &[Arc<FunctionRoute>] {
        &self.processes
    }

    /// The function a Host / :authority names: `<fn>` (default namespace) or `<fn>.<ns>`, any
    /// `:port` ignored, case-insensitive. No allocation: lower-cased on the stack.
    pub fn lookup(&self, host: &str) -> Result<&Arc<FunctionRoute>, HostError> {
        let mut buf = [0u8; MAX_HOST_LEN];
        let key = normalize_host(host, &mut buf)?;
        self.hosts
            .get(key)
            .and_then(|index| self.functions.get(*index))
            .ok_or(HostError::Unknown)
    }
}

/// Strips the port, lower-cases into `buf`, and checks the shape `<label>[.<label>]`.
fn normalize_host<'b>(host: &str, buf: &'b mut [u8; MAX_HOST_LEN]) -> Result<&'b str, HostError> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) => {
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HostError::Malformed("the port is not a number"));
            }
            name
        }
        None => host,
    };
    // A fully qualified name may end with a dot.
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(HostError::Malformed("the host is empty"));
    }
    if name.len() > MAX_HOST_LEN {
        return Err(HostError::Malformed("the host is too long"));
    }
    let out = buf
        .get_mut(..name.len())
        .ok_or(HostError::Malformed("the host is too long"))?;
    for (slot, byte) in out.iter_mut().zip(name.bytes()) {
        let lower = byte.to_ascii_lowercase();
        if !(lower.is_ascii_lowercase() || lower.is_ascii_digit() || lower == b'-' || lower == b'.')
        {
            return Err(HostError::Malformed(
                "the host may contain only letters, digits, '-' and '.'",
            ));
        }
        *slot = lower;
    }
    let key =
        std::str::from_utf8(out).map_err(|_| HostError::Malformed("the host is not ASCII"))?;
    let mut labels = 0;
    for label in key.split('.') {
        labels += 1;
        if labels > 2 {
            return Err(HostError::Malformed(
                "expected <function> or <function>.<namespace>",
            ));
        }
        if validate_dns_label(label).is_err() {
            return Err(HostError::Malformed(
                "function and namespace must be DNS-1123 labels",
            ));
        }
    }
    Ok(key)
}

/// A table that passed every check: plain data, not yet bound to shared endpoint state.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSpec {
    pub version: i64,
    pub local_generation: u64,
    pub region: String,
    pub functions: Vec<FunctionSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSpec {
    pub namespace: String,
    pub name: String,
    pub version: i64,
    pub policy: Policy,
    pub tiers: Vec<TierSpec>,
    pub workload: Workload,
    pub cold_start: Duration,
    pub local_failed_starts: u32,
    pub local_restart_backoff: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TierSpec {
    pub region: String,
    pub local: bool,
    pub order: Order,
    pub ready_instances: u32,
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub address: String,
    pub authority: Authority,
    pub id: String,
    pub zone: String,
    pub state: &'static str,
    pub routable: bool,
}

impl TryFrom<&pb::RoutingTable> for TableSpec {
    type Error = TableError;

    fn try_from(table: &pb::RoutingTable) -> Result<Self, TableError> {
        label("region", &table.region)?;
        let mut seen = HashSet::new();
        let mut functions = Vec::with_capacity(table.functions.len());
        for (index, route) in table.functions.iter().enumerate() {
            let function = function_spec(index, route, &table.region)?;
            if !seen.insert((function.namespace.clone(), function.name.clone())) {
                return Err(TableError::Duplicate {
                    field: format!("functions[{index}]"),
                    namespace: function.namespace,
                    name: function.name,
                });
            }
            functions.push(function);
        }
        Ok(TableSpec {
            version: table.version,
            local_generation: table.local_generation,
            region: table.region.clone(),
            functions,
        })
    }
}

fn label(field: &str, value: &str) -> Result<(), TableError> {
    validate_dns_label(value).map_err(|source| TableError::BadName {
        field: field.to_owned(),
        value: value.to_owned(),
        source,
    })
}

fn function_spec(
    index: usize,
    route: &pb::FunctionRoute,
    region: &str,
) -> Result<FunctionSpec, TableError> {
    let path = format!("functions[{index}]");
    let namespace = if route.namespace.is_empty() {
        DEFAULT_NAMESPACE.to_owned()
    } else {
        label(&format!("{path}.namespace"), &route.namespace)?;
        route.namespace.clone()
    };
    label(&format!("{path}.name"), &route.name)?;
    let policy = policy(&path, route.policy.as_ref())?;
    let mut tiers: Vec<TierSpec> = Vec::with_capacity(route.tiers.len());
    for (t, tier) in route.tiers.iter().enumerate() {
        let tier_path = format!("{path}.tiers[{t}]");
        label(&format!("{tier_path}.region"), &tier.region)?;
        if tiers.iter().any(|seen| seen.region == tier.region) {
            return Err(TableError::DuplicateTier {
                field: format!("{tier_path}.region"),
                region: tier.region.clone(),
            });
        }
        if tier.local && tier.region != region {
            return Err(TableError::LocalElsewhere {
                field: format!("{tier_path}.local"),
                got: tier.region.clone(),
                want: region.to_owned(),
            });
        }
        if !tier.local && tier.region == region {
            return Err(TableError::RemoteSelf {
                field: format!("{tier_path}.region"),
                region: tier.region.clone(),
            });
        }
        let mut endpoints = Vec::with_capacity(tier.endpoints.len());
        for (e, endpoint) in tier.endpoints.iter().enumerate() {
            let authority =
                parse_address(&endpoint.address).map_err(|source| TableError::BadAddress {
                    field: format!("{tier_path}.endpoints[{e}].address"),
                    value: endpoint.address.clone(),
                    source,
                })?;
            let (state, routable) = match pb::EndpointState::try_from(endpoint.state) {
                Ok(pb::EndpointState::Ready) => ("READY", true),
                // A table written by hand may leave the state out: take it as ready.
                Ok(pb::EndpointState::Unspecified) => ("UNSPECIFIED", true),
                Ok(pb::EndpointState::Starting) => ("STARTING", false),
                Ok(pb::EndpointState::Draining) => ("DRAINING", false),
                Err(_) => ("UNKNOWN", false),
            };
            endpoints.push(EndpointSpec {
                address: endpoint.address.clone(),
                authority,
                id: endpoint.id.clone(),
                zone: endpoint.zone.clone(),
                state,
                routable,
            });
        }
        let order = if tier.local {
            Order::Local
        } else {
            match pb::TierOrder::try_from(tier.order) {
                Ok(pb::TierOrder::Measured) => Order::Measured,
                // Unspecified or unknown: keep the position the table gives.
                _ => Order::Explicit,
            }
        };
        tiers.push(TierSpec {
            region: tier.region.clone(),
            local: tier.local,
            order,
            ready_instances: tier.ready_instances,
            endpoints,
        });
    }
    // The local tier goes first whatever position it was sent at.
    tiers.sort_by_key(|tier| !tier.local);
    Ok(FunctionSpec {
        namespace,
        name: route.name.clone(),
        version: route.function_version,
        policy,
        tiers,
        workload: workload(route.workload.as_ref()),
        cold_start: Duration::from_millis(u64::from(route.cold_start_ms)),
        local_failed_starts: route.local_failed_starts,
        local_restart_backoff: route.local_restart_backoff,
    })
}

fn workload(workload: Option<&pb::LocalWorkload>) -> Workload {
    match workload {
        Some(pb::LocalWorkload {
            kind: Some(pb::local_workload::Kind::Process(_)),
            scale,
        }) => Workload::Process {
            activatable: scale.as_ref().is_some_and(|s| s.max_instances > 0),
        },
        _ => Workload::None,
    }
}

fn policy(path: &str, policy: Option<&pb::RoutingPolicy>) -> Result<Policy, TableError> {
    let Some(policy) = policy else {
        return Ok(Policy::default());
    };
    let bad = |field: &str, value: u32, why: &'static str| TableError::BadPolicy {
        field: format!("{path}.policy.{field}"),
        value: value.to_string(),
        why,
    };
    let timeout_ms = policy.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 {
        return Err(bad("timeoutMs", timeout_ms, "must be at least 1"));
    }
    let per_try_ms = policy
        .per_try_timeout_ms
        .unwrap_or_else(|| DEFAULT_PER_TRY_TIMEOUT_MS.min(timeout_ms));
    if per_try_ms == 0 {
        return Err(bad("perTryTimeoutMs", per_try_ms, "must be at least 1"));
    }
    if per_try_ms > timeout_ms {
        return Err(bad(
            "perTryTimeoutMs",
            per_try_ms,
            "must be at most timeoutMs",
        ));
    }
    let max_retries = policy.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
    if max_retries > MAX_RETRIES_LIMIT {
        return Err(bad("maxRetries", max_retries, "must be at most 5"));
    }
    let mut retryable_methods = Vec::with_capacity(policy.retryable_methods.len());
    for (m, name) in policy.retryable_methods.iter().enumerate() {
        // The control plane's rule (spec.rs): upper-case letters and '-' (VERSION-CONTROL).
        let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
        let method = valid
            .then(|| Method::from_bytes(name.as_bytes()).ok())
            .flatten()
            .ok_or_else(|| TableError::BadMethod {
                field: format!("{path}.policy.retryableMethods[{m}]"),
                value: name.clone(),
            })?;
        retryable_methods.push(method);
    }
    Ok(Policy {
        timeout: Duration::from_millis(u64::from(timeout_ms)),
        per_try_timeout: Duration::from_millis(u64::from(per_try_ms)),
        max_retries,
        retryable_methods,
    })
}

/// Compiles tables for one region, binding them to the state that outlives each version.
#[derive(Debug, Clone)]
pub struct Compiler {
    region: String,
    endpoints: Arc<EndpointRegistry>,
    stats: Arc<StatsRegistry>,
    budgets: Arc<BudgetRegistry>,
}

impl Compiler {
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            endpoints: Arc::new(EndpointRegistry::new()),
            stats: Arc::new(StatsRegistry::default()),
            budgets: Arc::new(BudgetRegistry::default()),
        }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn endpoints(&self) -> &Arc<EndpointRegistry> {
        &self.endpoints
    }

    /// Wakes the load sampler on the first request of any function this compiler's states
    /// route (see [`crate::load::Reporter`]).
    pub fn sampler_wake(&self) -> &Arc<crate::load::SamplerWake> {
        self.stats.sampler_wake()
    }

    /// Validates `table` and builds its routing state. Off the request path.
    pub fn compile(&self, table: &pb::RoutingTable) -> Result<RoutingState, TableError> {
        if table.region != self.region {
            return Err(TableError::WrongRegion {
                got: table.region.clone(),
                want: self.region.clone(),
            });
        }
        let spec = TableSpec::try_from(table)?;
        Ok(self.build(spec))
    }

    /// Forgets shared state no live table refers to (after a swap).
    pub fn prune(&self) {
        self.endpoints.prune();
        self.stats.prune();
        self.budgets.prune();
    }

    fn build(&self, spec: TableSpec) -> RoutingState {
        let mut functions = Vec::with_capacity(spec.functions.len());
        let mut hosts =
            HostMap::with_capacity_and_hasher(spec.functions.len() * 2, Default::default());
        let mut gateways: Vec<Arc<EndpointState>> = Vec::new();
        for (index, function) in spec.functions.into_iter().enumerate() {
            let full = format!("{}.{}", function.name, function.namespace);
            let label = if function.namespace == DEFAULT_NAMESPACE {
                hosts.insert(function.name.clone().into_boxed_str(), index);
                function.name.clone()
            } else {
                full.clone()
            };
            hosts.insert(full.into_boxed_str(), index);
            let stats = self.stats.get(&function.namespace, &function.name, &label);
            let budget = self.budgets.get(&function.namespace, &function.name);
            let tiers: Vec<Tier> = function
                .tiers
                .into_iter()
                .map(|tier| {
                    let endpoints: Vec<Endpoint> = tier
                        .endpoints
                        .into_iter()
                        .map(|e| Endpoint {
                            shared: self.endpoints.get(&e.address, &e.authority),
                            id: e.id,
                            zone: e.zone,
                            state: e.state,
                            routable: e.routable,
                        })
                        .collect();
                    if !tier.local {
                        for endpoint in &endpoints {
                            if !gateways.iter().any(|g| Arc::ptr_eq(g, &endpoint.shared)) {
                                gateways.push(Arc::clone(&endpoint.shared));
                            }
                        }
                    }
                    Tier {
                        region_header: HeaderValue::from_str(&tier.region)
                            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
                        stats: stats.tier(&tier.region),
                        region: tier.region,
                        local: tier.local,
                        order: tier.order,
                        ready_instances: tier.ready_instances,
                        endpoints,
                    }
                })
                .collect();
            let local_ready = tiers
                .first()
                .filter(|tier| tier.local)
                .is_some_and(|tier| tier.endpoints.iter().any(|e| e.routable));
            functions.push(Arc::new(FunctionRoute {
                namespace: function.namespace,
                name: function.name,
                version: function.version,
                policy: function.policy,
                tiers,
                workload: function.workload,
                local_ready,
                cold_start: function.cold_start,
                local_failed_starts: function.local_failed_starts,
                local_restart_backoff: function.local_restart_backoff,
                stats,
                budget,
            }));
        }
        let processes = functions
            .iter()
            .filter(|f| f.is_process())
            .cloned()
            .collect();
        RoutingState {
            processes,
            version: spec.version,
            local_generation: spec.local_generation,
            region: spec.region,
            clock: self.endpoints.clock(),
            applied_at: self.endpoints.clock().now(),
            functions,
            hosts,
            gateways,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn endpoint(address: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: address.into(),
            id: format!("id-{address}"),
            state: pb::EndpointState::Ready as i32,
            zone: "z".into(),
        }
    }

    pub(crate) fn tier(region: &str, local: bool, addresses: &[&str]) -> pb::Tier {
        pb::Tier {
            region: region.into(),
            local,
            endpoints: addresses.iter().map(|a| endpoint(a)).collect(),
            order: if local {
                pb::TierOrder::Local as i32
            } else {
                pb::TierOrder::Explicit as i32
            },
            ready_instances: u32::try_from(addresses.len()).unwrap(),
        }
    }

    pub(crate) fn route(namespace: &str, name: &str, tiers: Vec<pb::Tier>) -> pb::FunctionRoute {
        pb::FunctionRoute {
            cold_start_ms: 0,
            local_failed_starts: 0,
            local_restart_backoff: false,
            namespace: namespace.into(),
            name: name.into(),
            function_version: 1,
            policy: None,
            tiers,
            workload: None,
        }
    }

    pub(crate) fn table(functions: Vec<pb::FunctionRoute>) -> pb::RoutingTable {
        pb::RoutingTable {
            local_generation: 0,
            version: 7,
            region: "us-east".into(),
            functions,
        }
    }

    fn sample() -> pb::RoutingTable {
        table(vec![
            route(
                "default",
                "hello",
                vec![
                    tier("us-east", true, &["127.0.1.1:9000", "127.0.1.1:9001"]),
                    tier("eu-west", false, &["127.0.2.1:15002"]),
                ],
            ),
            route(
                "team",
                "api",
                vec![tier("eu-west", false, &["127.0.2.1:15002"])],
            ),
        ])
    }

    #[test]
    fn compiles_and_looks_up_hosts() {
        let compiler = Compiler::new("us-east");
        let state = compiler.compile(&sample()).unwrap();
        assert_eq!(state.version(), 7);
        for host in [
            "hello",
            "HELLO",
            "hello:15001",
            "hello.default",
            "Hello.Default:80",
        ] {
            let f = state
                .lookup(host)
                .unwrap_or_else(|e| panic!("{host}: {e:?}"));
            assert_eq!(f.name, "hello");
        }
        assert_eq!(state.lookup("api.team").unwrap().label(), "api.team");
        assert_eq!(state.lookup("api").unwrap_err(), HostError::Unknown);
        assert_eq!(state.lookup("nope").unwrap_err(), HostError::Unknown);
        for bad in [
            "", ":80", "a.b.c", "he llo", "hello:x", "-a", "a_b", "hello:",
        ] {
            assert!(
                matches!(state.lookup(bad), Err(HostError::Malformed(_))),
                "{bad:?}"
            );
        }
        // One gateway shared by both functions: probed once.
        assert_eq!(state.gateways().len(), 1);
    }

    #[test]
    fn endpoint_state_is_shared_across_versions() {
        let compiler = Compiler::new("us-east");
        let a = compiler.compile(&sample()).unwrap();
        let b = compiler.compile(&sample()).unwrap();
        let ea = &a.lookup("hello").unwrap().tiers[0].endpoints[0].shared;
        let eb = &b.lookup("hello").unwrap().tiers[0].endpoints[0].shared;
        assert!(Arc::ptr_eq(ea, eb));
        let sa = a.lookup("hello").unwrap().stats();
        let sb = b.lookup("hello").unwrap().stats();
        assert!(Arc::ptr_eq(sa, sb));
    }

    fn reason(table: &pb::RoutingTable) -> String {
        Compiler::new("us-east")
            .compile(table)
            .unwrap_err()
            .reason()
    }

    #[test]
    fn errors_name_the_field() {
        let mut t = sample();
        t.functions[1].tiers[0].endpoints[0].address = "127.0.2.1".into();
        assert_eq!(
            reason(&t),
            "functions[1].tiers[0].endpoints[0].address \"127.0.2.1\" is not host:port: \
             must be host:port (no port found)"
        );

        let mut t = sample();
        t.functions[0].tiers[1].endpoints[0].address = "h:99999".into();
        assert!(reason(&t).starts_with("functions[0].tiers[1].endpoints[0].address"));

        let mut t = sample();
        t.functions[0].name = "Bad_Name".into();
        assert!(reason(&t).starts_with("functions[0].name \"Bad_Name\""));

        let mut t = sample();
        t.functions[1].name = "hello".into();
        t.functions[1].namespace = "default".into();
        assert_eq!(reason(&t), "functions[1]: duplicate function default/hello");

        let mut t = sample();
        t.functions[0].policy = Some(pb::RoutingPolicy {
            timeout_ms: Some(0),
            ..Default::default()
        });
        assert_eq!(
            reason(&t),
            "functions[0].policy.timeoutMs 0: must be at least 1"
        );

        let mut t = sample();
        t.functions[0].policy = Some(pb::RoutingPolicy {
            timeout_ms: Some(100),
            per_try_timeout_ms: Some(200),
            ..Default::default()
        });
        assert!(reason(&t).starts_with("functions[0].policy.perTryTimeoutMs 200"));

        let mut t = sample();
        t.functions[0].policy = Some(pb::RoutingPolicy {
            max_retries: Some(9),
            ..Default::default()
        });
        assert!(reason(&t).starts_with("functions[0].policy.maxRetries 9"));

        let mut t = sample();
        t.functions[0].policy = Some(pb::RoutingPolicy {
            retryable_methods: vec!["POST".into(), "get".into()],
            ..Default::default()
        });
        assert_eq!(
            reason(&t),
            "functions[0].policy.retryableMethods[1] \"get\" is not an upper-case HTTP method"
        );

        let mut t = sample();
        t.functions[0].tiers[1].region = "us-east".into();
        assert!(reason(&t).starts_with("functions[0].tiers[1].region"));

        let mut t = sample();
        t.functions[0].tiers[1].local = true;
        assert!(reason(&t).starts_with("functions[0].tiers[1].local"));

        let mut t = sample();
        t.region = "eu-west".into();
        assert!(reason(&t).starts_with("region \"eu-west\" is not this sidecar's region"));
    }

    #[test]
    fn policy_defaults_and_retryable_methods() {
        let mut t = sample();
        t.functions[0].policy = Some(pb::RoutingPolicy {
            timeout_ms: Some(2000),
            retryable_methods: vec!["POST".into()],
            ..Default::default()
        });
        let state = Compiler::new("us-east").compile(&t).unwrap();
        let policy = &state.lookup("hello").unwrap().policy;
        assert_eq!(policy.timeout, Duration::from_secs(2));
        assert_eq!(policy.per_try_timeout, Duration::from_secs(2));
        assert_eq!(policy.max_retries, 2);
        assert!(policy.retryable(&Method::POST));
        assert!(policy.retryable(&Method::GET));
        assert!(!policy.retryable(&Method::PATCH));
        let default = &state.lookup("api.team").unwrap().policy;
        assert_eq!(default.timeout, Duration::from_secs(15));
        assert_eq!(default.per_try_timeout, Duration::from_secs(5));
        assert!(!default.retryable(&Method::POST));
    }

    #[test]
    fn methods_the_control_plane_accepts_compile() {
        // The control plane accepts upper-case letters and '-'; a method it accepts but the
        // sidecar refused made the sidecar refuse the region's whole table (meridian-fuzz's spec
        // target; its input is fuzz/corpus/spec/regression-retryable-method-with-dash).
        let mut t = sample();
        t.functions[0].policy = Some(pb::RoutingPolicy {
            retryable_methods: vec!["VERSION-CONTROL".into(), "-".into()],
            ..Default::default()
        });
        let state = Compiler::new("us-east").compile(&t).unwrap();
        let policy = &state.lookup("hello").unwrap().policy;
        let method = Method::from_bytes(b"VERSION-CONTROL").unwrap();
        assert!(policy.retryable(&method));
        assert!(!policy.retryable(&Method::POST));
    }

    #[test]
    fn local_tier_moves_first_and_states_are_kept() {
        let mut t = table(vec![route(
            "default",
            "f",
            vec![
                tier("eu-west", false, &["127.0.2.1:15002"]),
                tier("us-east", true, &["127.0.1.1:9000"]),
            ],
        )]);
        t.functions[0].tiers[1].endpoints[0].state = pb::EndpointState::Starting as i32;
        let state = Compiler::new("us-east").compile(&t).unwrap();
        let f = state.lookup("f").unwrap();
        assert!(f.tiers[0].local);
        assert_eq!(f.tiers[0].endpoints[0].state, "STARTING");
        assert!(!f.tiers[0].endpoints[0].routable);
    }
}
