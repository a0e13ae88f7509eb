//! Function specs as the control plane understands them: validated domain types converted from
//! the wire `FunctionSpec` with `TryFrom`, and back into a normalized wire spec for storage.
//!
//! Every error names the JSON field path the user wrote (`spec.placement.regions[1].maxInstances`),
//! which is also the YAML path `meridianctl` reads, so a message points at the line to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use meridian_common::address::parse_host_opt_port;
use meridian_common::names::validate_dns_label;
use meridian_proto::v1 as pb;

pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_MAX_INSTANCES: u32 = 10;
pub const MAX_INSTANCES_LIMIT: u32 = 1000;
pub const DEFAULT_TARGET_CONCURRENCY: u32 = 10;
pub const DEFAULT_IDLE_SECONDS: u32 = 300;
pub const DEFAULT_TIMEOUT_MS: u32 = 15_000;
pub const DEFAULT_PER_TRY_TIMEOUT_MS: u32 = 5_000;
/// One hour: a longer whole-request deadline is almost certainly a unit mistake.
pub const MAX_TIMEOUT_MS: u32 = 3_600_000;
pub const DEFAULT_MAX_RETRIES: u32 = 2;
pub const MAX_RETRIES_LIMIT: u32 = 5;
/// Fixed bounds on the parts of a spec that have no configurable limit: generous for any real
/// function, and small enough that no list or string can grow a record without bound.
pub const MAX_COMMAND_BYTES: usize = 4096;
pub const MAX_READINESS_PATH_BYTES: usize = 2048;
/// Regions of an external runtime or a placement, and entries of `failoverOrder`.
pub const MAX_REGIONS: usize = 64;
/// URLs of one region of an external runtime.
pub const MAX_URLS_PER_REGION: usize = 64;
pub const MAX_RETRYABLE_METHODS: usize = 16;

/// The limits the API enforces on what a spec may grow, before anything is stored. Configurable
/// on the control plane (`--max-spec-bytes` and friends); stored specs are never judged by them
/// again, so lowering a limit never takes a running function out of the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecLimits {
    /// Encoded size of the whole spec. Default 256 KiB, well under etcd's 1.5 MiB request limit.
    pub spec_bytes: usize,
    /// Sum of the lengths of `spec.runtime.process.args`. Default 64 KiB.
    pub args_bytes: usize,
    /// Sum of the lengths of the names and values of `spec.runtime.process.env`. Default 64 KiB.
    pub env_bytes: usize,
    /// Labels in `metadata.labels`. Default 64.
    pub labels: usize,
    /// Length of one URL of `spec.runtime.external`. Default 2 KiB.
    pub url_bytes: usize,
    /// Functions one namespace may hold. Default 10,000.
    pub functions_per_namespace: usize,
}

impl Default for SpecLimits {
    fn default() -> Self {
        Self {
            spec_bytes: 256 * 1024,
            args_bytes: 64 * 1024,
            env_bytes: 64 * 1024,
            labels: 64,
            url_bytes: 2 * 1024,
            functions_per_namespace: 10_000,
        }
    }
}

impl SpecLimits {
    /// Checks a wire spec against the limits, naming the field and the limit (and the flag
    /// that sets it) on the first one exceeded. Runs before validation, so an oversized spec is
    /// refused for its size whatever else is wrong with it.
    pub fn check(&self, spec: &pb::FunctionSpec) -> Result<(), SpecError> {
        let over = |field: &str, size: usize, limit: usize, flag: &str| {
            SpecError::new(
                field,
                format!("{size} bytes, more than the limit of {limit} bytes ({flag})"),
            )
        };
        if spec.labels.len() > self.labels {
            return Err(SpecError::new(
                "metadata.labels",
                format!(
                    "{} labels, more than the limit of {} (--max-labels)",
                    spec.labels.len(),
                    self.labels
                ),
            ));
        }
        match &spec.runtime {
            Some(pb::function_spec::Runtime::Process(process)) => {
                let args: usize = process.args.iter().map(String::len).sum();
                if args > self.args_bytes {
                    return Err(over(
                        "spec.runtime.process.args",
                        args,
                        self.args_bytes,
                        "--max-args-bytes",
                    ));
                }
                let env: usize = process.env.iter().map(|(k, v)| k.len() + v.len()).sum();
                if env > self.env_bytes {
                    return Err(over(
                        "spec.runtime.process.env",
                        env,
                        self.env_bytes,
                        "--max-env-bytes",
                    ));
                }
            }
            Some(pb::function_spec::Runtime::External(external)) => {
                for (index, region) in external.regions.iter().enumerate() {
                    for (url_index, url) in region.urls.iter().enumerate() {
                        if url.len() > self.url_bytes {
                            return Err(over(
                                &format!(
                                    "spec.runtime.external.regions[{index}].urls[{url_index}]"
                                ),
                                url.len(),
                                self.url_bytes,
                                "--max-url-bytes",
                            ));
                        }
                    }
                }
            }
            None => {}
        }
        let size = prost::Message::encoded_len(spec);
        if size > self.spec_bytes {
            return Err(over("spec", size, self.spec_bytes, "--max-spec-bytes"));
        }
        Ok(())
    }
}

/// A spec field that is wrong, and why. Displays as `field.path: problem`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: String,
    pub problem: String,
}

impl SpecError {
    fn new(field: impl Into<String>, problem: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            problem: problem.to_string(),
        }
    }
}

/// Namespace and name of a function: its identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FunctionKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FunctionKey {
    /// Validates a key given as request fields; an empty namespace means `default`.
    pub fn parse(namespace: &str, name: &str) -> Result<Self, SpecError> {
        let namespace = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        validate_dns_label(namespace).map_err(|e| SpecError::new("namespace", e))?;
        validate_dns_label(name).map_err(|e| SpecError::new("name", e))?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// A validated function spec with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    pub key: FunctionKey,
    pub labels: BTreeMap<String, String>,
    pub runtime: Runtime,
    pub placement: Placement,
    pub scaling: Scaling,
    pub routing: RoutingPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    Process(ProcessRuntime),
    /// Region name to the URLs that serve the function there.
    External(BTreeMap<String, Vec<String>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRuntime {
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub readiness_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    AllRegions,
    /// In declaration order.
    Regions(Vec<RegionPlacement>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionPlacement {
    pub region: String,
    /// `None`: the region keeps `spec.scaling.minInstances` (see [`RegionPlacement::min`]).
    pub min_instances: Option<u32>,
    pub max_instances: u32,
}

impl RegionPlacement {
    /// The region's minimum: its own, else the function's.
    pub fn min(&self, scaling: &Scaling) -> u32 {
        self.min_instances.unwrap_or(scaling.min_instances)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaling {
    pub min_instances: u32,
    pub max_instances: u32,
    pub target_concurrency: u32,
    pub idle_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingPolicy {
    pub timeout_ms: u32,
    pub per_try_timeout_ms: u32,
    pub max_retries: u32,
    pub retryable_methods: Vec<String>,
    pub failover_order: Vec<String>,
}

impl FunctionSpec {
    /// The regions that host this function, if the spec names them (`None`: all regions).
    pub fn hosting_regions(&self) -> Option<BTreeSet<&str>> {
        match (&self.runtime, &self.placement) {
            (Runtime::External(regions), _) => Some(regions.keys().map(String::as_str).collect()),
            (Runtime::Process(_), Placement::AllRegions) => None,
            (Runtime::Process(_), Placement::Regions(list)) => {
                Some(list.iter().map(|p| p.region.as_str()).collect())
            }
        }
    }
}

fn label(field: &str, value: &str) -> Result<(), SpecError> {
    validate_dns_label(value).map_err(|e| SpecError::new(field, format!("{value:?} {e}")))
}

fn unique_regions<'a>(
    field: &str,
    regions: impl IntoIterator<Item = &'a str>,
    element: &str,
) -> Result<(), SpecError> {
    let mut seen = BTreeSet::new();
    for (index, region) in regions.into_iter().enumerate() {
        let path = if element.is_empty() {
            format!("{field}[{index}]")
        } else {
            format!("{field}[{index}].{element}")
        };
        label(&path, region)?;
        if !seen.insert(region) {
            return Err(SpecError::new(path, format!("duplicate region {region:?}")));
        }
    }
    Ok(())
}

/// Refuses control characters: NUL, CR and LF in a command, argument, variable or URL end up in
/// logs, in HTTP requests and in `exec`, where they split lines and truncate strings. A tab is
/// allowed where the value is free text (`tab_ok`).
fn no_control_characters(field: &str, value: &str, tab_ok: bool) -> Result<(), SpecError> {
    match value
        .char_indices()
        .find(|(_, c)| c.is_control() && !(tab_ok && *c == '\t'))
    {
        None => Ok(()),
        Some((index, c)) => Err(SpecError::new(
            field,
            format!("contains the control character {c:?} at byte {index}"),
        )),
    }
}

fn at_most<T>(field: &str, items: &[T], limit: usize) -> Result<(), SpecError> {
    if items.len() > limit {
        return Err(SpecError::new(
            field,
            format!("{} entries, more than the limit of {limit}", items.len()),
        ));
    }
    Ok(())
}

fn check_label_map(labels: &std::collections::HashMap<String, String>) -> Result<(), SpecError> {
    let valid = |s: &str| {
        s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    for (key, value) in labels {
        let field = format!("metadata.labels.{key}");
        if key.is_empty() || !valid(key) {
            return Err(SpecError::new(
                field,
                "label keys are 1-63 characters of letters, digits, '-', '_', '.', '/'",
            ));
        }
        if !valid(value) {
            return Err(SpecError::new(
                field,
                "label values are at most 63 characters of letters, digits, '-', '_', '.', '/'",
            ));
        }
    }
    Ok(())
}

/// Checks an `http://host:port[/path]` URL and returns its `host:port` (port 80 if absent).
pub fn url_authority(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} must start with http://"))?;
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{url:?} contains whitespace or a control character"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    if authority.contains('@') {
        return Err(format!("{url:?} must not carry credentials"));
    }
    // The agent's rule for where to connect (it skips a URL that breaks it), so a spec that is
    // accepted here routes everywhere.
    let address = parse_host_opt_port(authority, 80)
        .map_err(|problem| format!("{url:?} has an invalid address: {problem}"))?;
    Ok(address.to_string())
}

const IDEMPOTENT_METHODS: [&str; 5] = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"];

fn check_method(field: &str, method: &str) -> Result<(), SpecError> {
    let token = !method.is_empty()
        && method.len() <= 32
        && method.chars().all(|c| c.is_ascii_uppercase() || c == '-');
    if token {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("{method:?} is not an upper-case HTTP method such as POST"),
        ))
    }
}

impl TryFrom<pb::FunctionSpec> for FunctionSpec {
    type Error = SpecError;

    fn try_from(spec: pb::FunctionSpec) -> Result<Self, Self::Error> {
        let namespace = if spec.namespace.is_empty() {
            DEFAULT_NAMESPACE.to_owned()
        } else {
            spec.namespace
        };
        label("metadata.name", &spec.name)?;
        label("metadata.namespace", &namespace)?;
        check_label_map(&spec.labels)?;

        let runtime = match spec.runtime {
            None => {
                return Err(SpecError::new(
                    "spec.runtime",
                    "must set exactly one of process or external",
                ))
            }
            Some(pb::function_spec::Runtime::Process(process)) => {
                Runtime::Process(process_runtime(process)?)
            }
            Some(pb::function_spec::Runtime::External(external)) => {
                Runtime::External(external_runtime(external)?)
            }
        };

        let scaling = scaling(spec.scaling.unwrap_or_default())?;
        let placement = placement(spec.placement.unwrap_or_default(), &scaling)?;
        if let (Runtime::External(_), Placement::Regions(_)) = (&runtime, &placement) {
            return Err(SpecError::new(
                "spec.placement",
                "an external function is placed by spec.runtime.external.regions; leave placement unset",
            ));
        }
        let routing = routing(spec.routing.unwrap_or_default())?;

        Ok(Self {
            key: FunctionKey {
                namespace,
                name: spec.name,
            },
            labels: spec.labels.into_iter().collect(),
            runtime,
            placement,
            scaling,
            routing,
        })
    }
}

fn process_runtime(process: pb::ProcessRuntime) -> Result<ProcessRuntime, SpecError> {
    const FIELD: &str = "spec.runtime.process";
    let command_field = format!("{FIELD}.command");
    if process.command.trim().is_empty() {
        return Err(SpecError::new(command_field, "must not be empty"));
    }
    if process.command.len() > MAX_COMMAND_BYTES {
        return Err(SpecError::new(
            command_field,
            format!(
                "{} bytes, more than the limit of {MAX_COMMAND_BYTES}",
                process.command.len()
            ),
        ));
    }
    no_control_characters(&command_field, &process.command, false)?;
    if process.command.split('/').any(|part| part == "..") {
        return Err(SpecError::new(
            command_field,
            "must not contain '..' components: name the command inside the agents' allowed command roots",
        ));
    }
    for (index, arg) in process.args.iter().enumerate() {
        no_control_characters(&format!("{FIELD}.args[{index}]"), arg, true)?;
    }
    if !process.readiness_path.is_empty() && !process.readiness_path.starts_with('/') {
        return Err(SpecError::new(
            format!("{FIELD}.readinessPath"),
            "must start with '/'",
        ));
    }
    if process.readiness_path.len() > MAX_READINESS_PATH_BYTES {
        return Err(SpecError::new(
            format!("{FIELD}.readinessPath"),
            format!("more than {MAX_READINESS_PATH_BYTES} bytes"),
        ));
    }
    if process
        .readiness_path
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(SpecError::new(
            format!("{FIELD}.readinessPath"),
            "must not contain whitespace or control characters",
        ));
    }
    for key in process.env.keys() {
        let identifier = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !identifier {
            return Err(SpecError::new(
                format!("{FIELD}.env.{key}"),
                "environment variable names are letters, digits and '_', not starting with a digit",
            ));
        }
    }
    for (key, value) in &process.env {
        no_control_characters(&format!("{FIELD}.env.{key}"), value, true)?;
    }
    Ok(ProcessRuntime {
        command: process.command,
        args: process.args,
        env: process.env.into_iter().collect(),
        readiness_path: process.readiness_path,
    })
}

fn external_runtime(
    external: pb::ExternalRuntime,
) -> Result<BTreeMap<String, Vec<String>>, SpecError> {
    const FIELD: &str = "spec.runtime.external.regions";
    if external.regions.is_empty() {
        return Err(SpecError::new(FIELD, "must list at least one region"));
    }
    at_most(FIELD, &external.regions, MAX_REGIONS)?;
    unique_regions(
        FIELD,
        external.regions.iter().map(|r| r.region.as_str()),
        "region",
    )?;
    let mut regions = BTreeMap::new();
    for (index, region) in external.regions.into_iter().enumerate() {
        let field = format!("{FIELD}[{index}].urls");
        if region.urls.is_empty() {
            return Err(SpecError::new(field, "must list at least one URL"));
        }
        at_most(&field, &region.urls, MAX_URLS_PER_REGION)?;
        for (url_index, url) in region.urls.iter().enumerate() {
            url_authority(url).map_err(|e| SpecError::new(format!("{field}[{url_index}]"), e))?;
        }
        regions.insert(region.region, region.urls);
    }
    Ok(regions)
}

fn scaling(scaling: pb::Scaling) -> Result<Scaling, SpecError> {
    const FIELD: &str = "spec.scaling";
    let min_instances = scaling.min_instances.unwrap_or(0);
    let max_instances = scaling
        .max_instances
        .unwrap_or(DEFAULT_MAX_INSTANCES.max(min_instances));
    if max_instances == 0 {
        return Err(SpecError::new(
            format!("{FIELD}.maxInstances"),
            "must be at least 1",
        ));
    }
    if max_instances > MAX_INSTANCES_LIMIT {
        return Err(SpecError::new(
            format!("{FIELD}.maxInstances"),
            format!("must be at most {MAX_INSTANCES_LIMIT}"),
        ));
    }
    if min_instances > max_instances {
        return Err(SpecError::new(
            format!("{FIELD}.minInstances"),
            format!("{min_instances} is greater than maxInstances {max_instances}"),
        ));
    }
    let target_concurrency = scaling
        .target_concurrency
        .unwrap_or(DEFAULT_TARGET_CONCURRENCY);
    if target_concurrency == 0 {
        return Err(SpecError::new(
            format!("{FIELD}.targetConcurrency"),
            "must be at least 1",
        ));
    }
    Ok(Scaling {
        min_instances,
        max_instances,
        target_concurrency,
        idle_seconds: scaling.idle_seconds.unwrap_or(DEFAULT_IDLE_SECONDS),
    })
}

fn placement(placement: pb::Placement, scaling: &Scaling) -> Result<Placement, SpecError> {
    const FIELD: &str = "spec.placement";
    if placement.regions.is_empty() {
        return Ok(Placement::AllRegions);
    }
    if placement.all_regions {
        return Err(SpecError::new(
            FIELD,
            "set either allRegions or regions, not both",
        ));
    }
    let field = format!("{FIELD}.regions");
    at_most(&field, &placement.regions, MAX_REGIONS)?;
    unique_regions(
        &field,
        placement.regions.iter().map(|r| r.region.as_str()),
        "region",
    )?;
    let mut regions = Vec::with_capacity(placement.regions.len());
    for (index, region) in placement.regions.into_iter().enumerate() {
        let max_instances = region.max_instances.unwrap_or(scaling.max_instances);
        if max_instances > scaling.max_instances {
            return Err(SpecError::new(
                format!("{field}[{index}].maxInstances"),
                format!(
                    "{max_instances} is greater than spec.scaling.maxInstances {}",
                    scaling.max_instances
                ),
            ));
        }
        match region.min_instances {
            Some(min_instances) if min_instances > max_instances => {
                return Err(SpecError::new(
                    format!("{field}[{index}].minInstances"),
                    format!("{min_instances} is greater than maxInstances {max_instances}"),
                ));
            }
            None if scaling.min_instances > max_instances => {
                return Err(SpecError::new(
                    format!("{field}[{index}].maxInstances"),
                    format!(
                        "{max_instances} is less than spec.scaling.minInstances {}, which the region inherits (set its minInstances)",
                        scaling.min_instances
                    ),
                ));
            }
            _ => {}
        }
        regions.push(RegionPlacement {
            region: region.region,
            min_instances: region.min_instances,
            max_instances,
        });
    }
    Ok(Placement::Regions(regions))
}

fn routing(routing: pb::RoutingPolicy) -> Result<RoutingPolicy, SpecError> {
    const FIELD: &str = "spec.routing";
    let timeout_ms = routing.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(SpecError::new(
            format!("{FIELD}.timeout"),
            format!("must be greater than 0 and at most 1h (got {timeout_ms}ms)"),
        ));
    }
    let per_try_timeout_ms = routing
        .per_try_timeout_ms
        .unwrap_or(DEFAULT_PER_TRY_TIMEOUT_MS.min(timeout_ms));
    if per_try_timeout_ms == 0 {
        return Err(SpecError::new(
            format!("{FIELD}.perTryTimeout"),
            "must be greater than 0",
        ));
    }
    if per_try_timeout_ms > timeout_ms {
        return Err(SpecError::new(
            format!("{FIELD}.perTryTimeout"),
            format!("{per_try_timeout_ms}ms is longer than timeout {timeout_ms}ms"),
        ));
    }
    let max_retries = routing.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
    if max_retries > MAX_RETRIES_LIMIT {
        return Err(SpecError::new(
            format!("{FIELD}.maxRetries"),
            format!("{max_retries} is more than the limit of {MAX_RETRIES_LIMIT}"),
        ));
    }
    at_most(
        &format!("{FIELD}.retryableMethods"),
        &routing.retryable_methods,
        MAX_RETRYABLE_METHODS,
    )?;
    at_most(
        &format!("{FIELD}.failoverOrder"),
        &routing.failover_order,
        MAX_REGIONS,
    )?;
    let mut methods = BTreeSet::new();
    for (index, method) in routing.retryable_methods.iter().enumerate() {
        let field = format!("{FIELD}.retryableMethods[{index}]");
        check_method(&field, method)?;
        if !methods.insert(method.as_str()) {
            return Err(SpecError::new(
                field,
                format!("duplicate method {method:?}"),
            ));
        }
    }
    unique_regions(
        &format!("{FIELD}.failoverOrder"),
        routing.failover_order.iter().map(String::as_str),
        "",
    )?;
    Ok(RoutingPolicy {
        timeout_ms,
        per_try_timeout_ms,
        max_retries,
        retryable_methods: routing.retryable_methods,
        failover_order: routing.failover_order,
    })
}

impl RoutingPolicy {
    /// Whether a method may be retried: idempotent by HTTP semantics, or named by the policy.
    pub fn retryable(&self, method: &str) -> bool {
        IDEMPOTENT_METHODS.contains(&method) || self.retryable_methods.iter().any(|m| m == method)
    }
}

impl From<&RoutingPolicy> for pb::RoutingPolicy {
    fn from(policy: &RoutingPolicy) -> Self {
        Self {
            timeout_ms: Some(policy.timeout_ms),
            per_try_timeout_ms: Some(policy.per_try_timeout_ms),
            max_retries: Some(policy.max_retries),
            retryable_methods: policy.retryable_methods.clone(),
            failover_order: policy.failover_order.clone(),
        }
    }
}

impl From<&ProcessRuntime> for pb::ProcessRuntime {
    fn from(process: &ProcessRuntime) -> Self {
        Self {
            command: process.command.clone(),
            args: process.args.clone(),
            env: process.env.clone().into_iter().collect(),
            readiness_path: process.readiness_path.clone(),
        }
    }
}

impl From<&FunctionSpec> for pb::FunctionSpec {
    fn from(spec: &FunctionSpec) -> Self {
        let runtime = match &spec.runtime {
            Runtime::Process(process) => pb::function_spec::Runtime::Process(process.into()),
            Runtime::External(regions) => {
                pb::function_spec::Runtime::External(pb::ExternalRuntime {
                    regions: regions
                        .iter()
                        .map(|(region, urls)| pb::ExternalRegion {
                            region: region.clone(),
                            urls: urls.clone(),
                        })
                        .collect(),
                })
            }
        };
        let placement = match &spec.placement {
            Placement::AllRegions => pb::Placement {
                all_regions: true,
                regions: Vec::new(),
            },
            Placement::Regions(regions) => pb::Placement {
                all_regions: false,
                regions: regions
                    .iter()
                    .map(|r| pb::RegionPlacement {
                        region: r.region.clone(),
                        min_instances: r.min_instances,
                        max_instances: Some(r.max_instances),
                    })
                    .collect(),
            },
        };
        Self {
            name: spec.key.name.clone(),
            namespace: spec.key.namespace.clone(),
            labels: spec.labels.clone().into_iter().collect(),
            runtime: Some(runtime),
            placement: Some(placement),
            scaling: Some(pb::Scaling {
                min_instances: Some(spec.scaling.min_instances),
                max_instances: Some(spec.scaling.max_instances),
                target_concurrency: Some(spec.scaling.target_concurrency),
                idle_seconds: Some(spec.scaling.idle_seconds),
            }),
            routing: Some((&spec.routing).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn external(regions: &[(&str, &[&str])]) -> pb::FunctionSpec {
        pb::FunctionSpec {
            name: "hello".into(),
            runtime: Some(pb::function_spec::Runtime::External(pb::ExternalRuntime {
                regions: regions
                    .iter()
                    .map(|(region, urls)| pb::ExternalRegion {
                        region: (*region).into(),
                        urls: urls.iter().map(|u| (*u).to_string()).collect(),
                    })
                    .collect(),
            })),
            ..Default::default()
        }
    }

    fn process() -> pb::FunctionSpec {
        pb::FunctionSpec {
            name: "worker".into(),
            runtime: Some(pb::function_spec::Runtime::Process(pb::ProcessRuntime {
                command: "/bin/true".into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn error_field(spec: pb::FunctionSpec) -> String {
        match FunctionSpec::try_from(spec) {
            Ok(_) => panic!("spec was accepted"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn fills_defaults() {
        let spec = FunctionSpec::try_from(external(&[("us-east", &["http://127.0.1.1:9000"])]))
            .expect("valid");
        assert_eq!(spec.key.namespace, "default");
        assert_eq!(spec.scaling.max_instances, DEFAULT_MAX_INSTANCES);
        assert_eq!(spec.routing.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(spec.routing.per_try_timeout_ms, DEFAULT_PER_TRY_TIMEOUT_MS);
        assert_eq!(spec.routing.max_retries, DEFAULT_MAX_RETRIES);
        let normalized = pb::FunctionSpec::from(&spec);
        assert_eq!(
            FunctionSpec::try_from(normalized).expect("normalized spec is valid"),
            spec
        );
    }

    #[test]
    fn rejects_bad_names() {
        let mut spec = process();
        spec.name = "Hello_World".into();
        assert_eq!(error_field(spec), "metadata.name");
        let mut spec = process();
        spec.namespace = "-x".into();
        assert_eq!(error_field(spec), "metadata.namespace");
    }

    #[test]
    fn rejects_duplicate_region() {
        let spec = external(&[("us-east", &["http://a:1"]), ("us-east", &["http://b:1"])]);
        assert_eq!(error_field(spec), "spec.runtime.external.regions[1].region");
        let mut spec = process();
        spec.placement = Some(pb::Placement {
            all_regions: false,
            regions: vec![
                pb::RegionPlacement {
                    region: "eu-west".into(),
                    ..Default::default()
                },
                pb::RegionPlacement {
                    region: "eu-west".into(),
                    ..Default::default()
                },
            ],
        });
        assert_eq!(error_field(spec), "spec.placement.regions[1].region");
    }

    #[test]
    fn checks_ranges() {
        let mut spec = process();
        spec.scaling = Some(pb::Scaling {
            min_instances: Some(5),
            max_instances: Some(2),
            ..Default::default()
        });
        assert_eq!(error_field(spec), "spec.scaling.minInstances");

        let mut spec = process();
        spec.routing = Some(pb::RoutingPolicy {
            timeout_ms: Some(0),
            ..Default::default()
        });
        assert_eq!(error_field(spec), "spec.routing.timeout");

        let mut spec = process();
        spec.routing = Some(pb::RoutingPolicy {
            timeout_ms: Some(1000),
            per_try_timeout_ms: Some(2000),
            ..Default::default()
        });
        assert_eq!(error_field(spec), "spec.routing.perTryTimeout");

        let mut spec = process();
        spec.routing = Some(pb::RoutingPolicy {
            max_retries: Some(6),
            ..Default::default()
        });
        assert_eq!(error_field(spec), "spec.routing.maxRetries");

        let mut spec = process();
        spec.placement = Some(pb::Placement {
            all_regions: false,
            regions: vec![pb::RegionPlacement {
                region: "eu-west".into(),
                min_instances: Some(3),
                max_instances: Some(1),
            }],
        });
        assert_eq!(error_field(spec), "spec.placement.regions[0].minInstances");

        let mut spec = process();
        spec.scaling = Some(pb::Scaling {
            min_instances: Some(2),
            ..Default::default()
        });
        spec.placement = Some(pb::Placement {
            all_regions: false,
            regions: vec![pb::RegionPlacement {
                region: "eu-west".into(),
                min_instances: None,
                max_instances: Some(1),
            }],
        });
        assert_eq!(error_field(spec), "spec.placement.regions[0].maxInstances");
    }

    #[test]
    fn region_minimum_defaults_to_the_function_minimum() {
        let mut spec = process();
        spec.scaling = Some(pb::Scaling {
            min_instances: Some(2),
            ..Default::default()
        });
        spec.placement = Some(pb::Placement {
            all_regions: false,
            regions: vec![
                pb::RegionPlacement {
                    region: "eu-west".into(),
                    ..Default::default()
                },
                pb::RegionPlacement {
                    region: "us-east".into(),
                    min_instances: Some(0),
                    ..Default::default()
                },
            ],
        });
        let spec = FunctionSpec::try_from(spec).expect("valid");
        let Placement::Regions(regions) = &spec.placement else {
            panic!("regions expected");
        };
        assert_eq!(regions[0].min(&spec.scaling), 2);
        assert_eq!(regions[1].min(&spec.scaling), 0);
        // Normalization keeps "unset" unset, so a later change of scaling.minInstances applies.
        let normalized = pb::FunctionSpec::from(&spec);
        let placement = normalized.placement.clone().expect("placement");
        assert_eq!(placement.regions[0].min_instances, None);
        assert_eq!(placement.regions[1].min_instances, Some(0));
        assert_eq!(FunctionSpec::try_from(normalized).expect("valid"), spec);
    }

    #[test]
    fn checks_urls_and_runtime() {
        assert_eq!(
            error_field(external(&[("us-east", &["https://x:1"])])),
            "spec.runtime.external.regions[0].urls[0]"
        );
        let mut spec = process();
        spec.runtime = None;
        assert_eq!(error_field(spec), "spec.runtime");
        assert_eq!(
            url_authority("http://127.0.0.1/x"),
            Ok("127.0.0.1:80".into())
        );
        assert_eq!(url_authority("http://h:9000/"), Ok("h:9000".into()));
        assert!(url_authority("http://h:0").is_err());
        assert!(url_authority("http:///x").is_err());
        // What the agent would skip is refused here, naming the fault.
        for bad in [
            "http://a,b:80",
            "http://h:+80",
            "http://h:80:81",
            "http://[zz]:80",
        ] {
            let error = url_authority(bad).unwrap_err();
            assert!(error.contains("invalid address"), "{bad}: {error}");
        }
        assert_eq!(
            url_authority("http://[::1]:8080/x"),
            Ok("[::1]:8080".into())
        );
    }

    #[test]
    fn retry_methods() {
        let mut spec = process();
        spec.routing = Some(pb::RoutingPolicy {
            retryable_methods: vec!["post".into()],
            ..Default::default()
        });
        assert_eq!(error_field(spec), "spec.routing.retryableMethods[0]");
        let policy = RoutingPolicy {
            timeout_ms: 1,
            per_try_timeout_ms: 1,
            max_retries: 1,
            retryable_methods: vec!["POST".into()],
            failover_order: vec![],
        };
        assert!(policy.retryable("GET"));
        assert!(policy.retryable("POST"));
        assert!(!policy.retryable("PATCH"));
    }
}
