//! The operator-facing gRPC services: `FunctionService` (validate, then store in etcd),
//! `MeshService` (agents and the routing tables they are sent), `ScaleService` (placements,
//! the scale state agents report, and the scheduler leader) and `ControlPlaneService` (the
//! replicas registered in etcd, with the leader marked).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use meridian_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::page::{page_size, PageBuilder, PageToken};
use crate::spec::{FunctionKey, FunctionSpec, Runtime, SpecError, SpecLimits, DEFAULT_NAMESPACE};
use crate::store::{PutOutcome, Record, RecordKey, Store, StoreError};
use crate::table::{RegionTable, Tables};
use crate::trace::{ChangeSpan, Tracing, APPLY_SPAN, DELETE_SPAN};

/// The gRPC status of a store error. Only what may succeed when retried is UNAVAILABLE: a
/// request etcd refuses as such, or a quota, gets a code clients do not retry.
fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::NotFound => Status::not_found("not found"),
        StoreError::Conflict { expected, current } => Status::failed_precondition(format!(
            "the function's version is {current}, not the expected {expected}: read it again and retry"
        )),
        StoreError::QuotaExceeded { .. } => {
            Status::invalid_argument(format!("metadata.namespace: {error}"))
        }
        StoreError::Refused(reason) => Status::failed_precondition(format!(
            "etcd refused the request ({reason}); retrying the same request cannot succeed"
        )),
        StoreError::Compacted(revision) => Status::aborted(format!(
            "etcd compacted revision {revision}, which this listing reads; list again from the first page"
        )),
        error => Status::unavailable(format!("etcd is unavailable: {error}")),
    }
}

fn invalid(error: SpecError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// A parsed Kubernetes-style equality label selector: `a=b,c!=d,e,!f`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl std::str::FromStr for LabelSelector {
    type Err = SpecError;

    fn from_str(selector: &str) -> Result<Self, Self::Err> {
        let mut requirements = Vec::new();
        for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = |problem: &str| SpecError {
                field: "labelSelector".into(),
                problem: format!("{part:?}: {problem}"),
            };
            let valid_token = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
            };
            let requirement = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let (key, value) = match &requirement {
                Requirement::Equals(k, v) | Requirement::NotEquals(k, v) => (k, Some(v)),
                Requirement::Exists(k) | Requirement::NotExists(k) => (k, None),
            };
            if !valid_token(key) {
                return Err(bad("invalid label key"));
            }
            if let Some(value) = value {
                if !value.is_empty() && !valid_token(value) {
                    return Err(bad("invalid label value"));
                }
            }
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }
}

impl LabelSelector {
    pub fn matches(&self, labels: &std::collections::HashMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

fn namespace_filter(namespace: &str, all: bool) -> Result<Option<String>, Status> {
    if all {
        return Ok(None);
    }
    let namespace = if namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        namespace
    };
    meridian_common::names::validate_dns_label(namespace)
        .map_err(|e| Status::invalid_argument(format!("namespace: {namespace:?} {e}")))?;
    Ok(Some(namespace.to_owned()))
}

/// Whether an announced command policy lets `command` start (judged lexically: the agent
/// resolves symlinks itself). A relative command is looked up inside the roots, so any root may
/// hold it.
fn policy_allows(policy: &pb::CommandPolicy, command: &str) -> bool {
    if !command.starts_with('/') {
        return !policy.allowed_roots.is_empty();
    }
    let normalized: Vec<&str> = command
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    policy.allowed_roots.iter().any(|root| {
        let root: Vec<&str> = root
            .split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .collect();
        normalized.len() > root.len() && normalized.starts_with(&root)
    })
}

/// Refuses a process function that no agent of some region it would run in may start, judging
/// by the command policies the agents announced in their Hello. A region with an agent that
/// announced none is left to its agents, which refuse what they must at start-up anyway.
pub fn check_command_roots(
    command: &str,
    regions: Option<&BTreeSet<&str>>,
    agents: impl IntoIterator<Item = pb::AgentStatus>,
) -> Result<(), SpecError> {
    let mut by_region: BTreeMap<String, Vec<pb::AgentStatus>> = BTreeMap::new();
    for agent in agents {
        by_region
            .entry(agent.region.clone())
            .or_default()
            .push(agent);
    }
    for (region, agents) in &by_region {
        if regions.is_some_and(|wanted| !wanted.contains(region.as_str())) {
            continue;
        }
        let policies: Option<Vec<&pb::CommandPolicy>> =
            agents.iter().map(|a| a.command_policy.as_ref()).collect();
        let Some(policies) = policies else { continue };
        if policies.iter().any(|policy| policy_allows(policy, command)) {
            continue;
        }
        let roots: Vec<String> = agents
            .iter()
            .zip(&policies)
            .map(|(agent, policy)| {
                if policy.allowed_roots.is_empty() {
                    format!("{} allows no commands", agent.agent_id)
                } else {
                    format!("{}: {}", agent.agent_id, policy.allowed_roots.join(", "))
                }
            })
            .collect();
        return Err(SpecError {
            field: "spec.runtime.process.command".into(),
            problem: format!(
                "{command:?} is outside the allowed command roots of every agent in region {region} ({}): they would never start it",
                roots.join("; ")
            ),
        });
    }
    Ok(())
}

/// `FunctionService`: every write is validated whole before etcd is touched.
#[derive(Debug, Clone)]
pub struct FunctionApi {
    store: Store,
    /// Spans of changes, and their trace written with them; `None` when export is off.
    tracing: Option<Arc<Tracing>>,
    limits: SpecLimits,
}

impl FunctionApi {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            tracing: None,
            limits: SpecLimits::default(),
        }
    }

    /// The limits every Apply is checked against (default: [`SpecLimits::default`]).
    pub fn with_limits(mut self, limits: SpecLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Traces every Apply and Delete (see [`crate::trace`]).
    pub fn with_tracing(mut self, tracing: Option<Arc<Tracing>>) -> Self {
        self.tracing = tracing;
        self
    }

    /// Starts the span of a change when tracing is on.
    fn change_span(
        &self,
        name: &'static str,
        metadata: &tonic::metadata::MetadataMap,
        namespace: &str,
        function: &str,
    ) -> Option<ChangeSpan> {
        let tracing = self.tracing.as_deref()?;
        let namespace = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        Some(tracing.change(name, metadata, namespace, function))
    }

    /// Validates and stores a function; returns the answer, the outcome's name and the
    /// revision it was committed at (0 when nothing was written).
    async fn apply_function(
        &self,
        request: pb::ApplyFunctionRequest,
        span: Option<&ChangeSpan>,
    ) -> Result<(pb::ApplyFunctionResponse, &'static str, i64), Status> {
        let spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        self.limits.check(&spec).map_err(invalid)?;
        let spec = FunctionSpec::try_from(spec).map_err(invalid)?;
        if request.expected_version < 0 {
            return Err(Status::invalid_argument(
                "expectedVersion: must not be negative",
            ));
        }
        if let Runtime::Process(process) = &spec.runtime {
            let agents = self.store.load(&self.store.keys().agents()).await;
            let agents = agents.map_err(store_status)?;
            let agents = agents
                .records
                .into_iter()
                .filter_map(|(_, record)| match record {
                    Record::Agent(agent) => Some(agent),
                    _ => None,
                });
            check_command_roots(&process.command, spec.hosting_regions().as_ref(), agents)
                .map_err(invalid)?;
        }
        let expected = (request.expected_version > 0).then_some(request.expected_version);
        let normalized = pb::FunctionSpec::from(&spec);
        // A dry run writes nothing, so there is no change to trace through etcd.
        let trace = span
            .filter(|_| !request.dry_run)
            .and_then(ChangeSpan::record);
        let (stored, outcome) = self
            .store
            .put_function_traced(
                &spec.key,
                &normalized,
                expected,
                request.dry_run,
                trace.as_ref(),
                Some(self.limits.functions_per_namespace),
            )
            .await
            .map_err(store_status)?;
        let (outcome, name, revision) = match outcome {
            _ if request.dry_run => (outcome_of(outcome), "dry-run", 0),
            PutOutcome::Unchanged => (pb::ApplyOutcome::Unchanged, "unchanged", 0),
            PutOutcome::Created => (pb::ApplyOutcome::Created, "created", stored.version),
            PutOutcome::Configured => (pb::ApplyOutcome::Configured, "configured", stored.version),
        };
        if !request.dry_run && outcome != pb::ApplyOutcome::Unchanged {
            tracing::info!(function = %spec.key, version = stored.version, ?outcome, "function applied");
        }
        let response = pb::ApplyFunctionResponse {
            function: Some((&stored).into()),
            outcome: outcome as i32,
        };
        Ok((response, name, revision))
    }

    /// Deletes a function; returns the answer, `deleted` and the revision of the delete.
    async fn delete_function(
        &self,
        request: pb::DeleteFunctionRequest,
        span: Option<&ChangeSpan>,
    ) -> Result<(pb::DeleteFunctionResponse, &'static str, i64), Status> {
        let key = FunctionKey::parse(&request.namespace, &request.name).map_err(invalid)?;
        let expected = (request.expected_version > 0).then_some(request.expected_version);
        let trace = span.and_then(ChangeSpan::record);
        match self
            .store
            .delete_function_traced(&key, expected, trace.as_ref())
            .await
        {
            Ok(deleted) => {
                tracing::info!(function = %key, version = deleted.version, "function deleted");
                let response = pb::DeleteFunctionResponse {
                    version: deleted.version,
                };
                Ok((response, "deleted", deleted.revision))
            }
            Err(StoreError::NotFound) => Err(Status::not_found(format!(
                "function {:?} not found in namespace {:?}",
                key.name, key.namespace
            ))),
            Err(error) => Err(store_status(error)),
        }
    }
}

fn outcome_of(outcome: PutOutcome) -> pb::ApplyOutcome {
    match outcome {
        PutOutcome::Created => pb::ApplyOutcome::Created,
        PutOutcome::Configured => pb::ApplyOutcome::Configured,
        PutOutcome::Unchanged => pb::ApplyOutcome::Unchanged,
    }
}

/// Ends a change's span (if any) with the result of the change.
fn end_change<T>(span: Option<ChangeSpan>, result: &Result<(T, &'static str, i64), Status>) {
    let Some(span) = span else { return };
    match result {
        Ok((_, outcome, revision)) => span.committed(outcome, *revision),
        Err(status) => span.failed(status),
    }
}

#[tonic::async_trait]
impl pb::function_service_server::FunctionService for FunctionApi {
    async fn apply(
        &self,
        request: Request<pb::ApplyFunctionRequest>,
    ) -> Result<Response<pb::ApplyFunctionResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let span = request
            .spec
            .as_ref()
            .and_then(|spec| self.change_span(APPLY_SPAN, &metadata, &spec.namespace, &spec.name));
        let result = self.apply_function(request, span.as_ref()).await;
        end_change(span, &result);
        result.map(|(response, _, _)| Response::new(response))
    }

    async fn get(
        &self,
        request: Request<pb::GetFunctionRequest>,
    ) -> Result<Response<pb::Function>, Status> {
        let request = request.into_inner();
        let key = FunctionKey::parse(&request.namespace, &request.name).map_err(invalid)?;
        match self.store.get_function(&key).await {
            Ok(stored) => Ok(Response::new((&stored).into())),
            Err(StoreError::NotFound) => Err(Status::not_found(format!(
                "function {:?} not found in namespace {:?}",
                key.name, key.namespace
            ))),
            Err(error) => Err(store_status(error)),
        }
    }

    async fn list(
        &self,
        request: Request<pb::ListFunctionsRequest>,
    ) -> Result<Response<pb::ListFunctionsResponse>, Status> {
        let request = request.into_inner();
        let namespace = namespace_filter(&request.namespace, request.all_namespaces)?;
        let selector: LabelSelector = request.label_selector.parse().map_err(invalid)?;
        let size = page_size(request.page_size)?;
        let token = PageToken::parse(&request.page_token)?;
        if let (Some(token), Some(namespace)) = (&token, &namespace) {
            if token.after.namespace != *namespace {
                return Err(Status::invalid_argument(
                    "pageToken: it belongs to a listing of another namespace",
                ));
            }
        }
        let (revision, after) = match token {
            Some(token) => (token.version, Some(token.after)),
            None => (0, None),
        };
        let (functions, page) = self
            .store
            .list_functions_page(namespace.as_deref(), after.as_ref(), size, revision)
            .await
            .map_err(store_status)?;
        let mut answer = PageBuilder::new(size);
        let mut last_read: Option<FunctionKey> = None;
        for stored in functions {
            let key = FunctionKey {
                namespace: stored.spec.namespace.clone(),
                name: stored.spec.name.clone(),
            };
            if selector.matches(&stored.spec.labels) {
                let function = pb::Function::from(&stored);
                let bytes = prost::Message::encoded_len(&function);
                if !answer.push(function, bytes) {
                    break;
                }
            }
            last_read = Some(key);
        }
        // Continue after the last function this page looked at; if the page was cut short, or
        // etcd has more, there is a next page.
        let more = answer.cut || page.next_after.is_some();
        let next = match (more, last_read) {
            (true, Some(after)) => PageToken {
                version: page.revision,
                after,
            }
            .to_string(),
            // etcd has more, but every record of this page was undecodable: continue after
            // the last raw key read.
            (true, None) => page
                .next_after
                .and_then(|raw| match self.store.keys().parse(raw.as_bytes()) {
                    Some(RecordKey::Function(after)) => Some(
                        PageToken {
                            version: page.revision,
                            after,
                        }
                        .to_string(),
                    ),
                    _ => None,
                })
                .unwrap_or_default(),
            (false, _) => String::new(),
        };
        Ok(Response::new(pb::ListFunctionsResponse {
            functions: answer.items,
            version: page.revision,
            next_page_token: next,
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteFunctionRequest>,
    ) -> Result<Response<pb::DeleteFunctionResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let span = self.change_span(DELETE_SPAN, &metadata, &request.namespace, &request.name);
        let result = self.delete_function(request, span.as_ref()).await;
        end_change(span, &result);
        result.map(|(response, _, _)| Response::new(response))
    }

    type WatchStream = ReceiverStream<Result<pb::FunctionEvent, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchFunctionsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let namespace = namespace_filter(&request.namespace, request.all_namespaces)?;
        let selector: LabelSelector = request.label_selector.parse().map_err(invalid)?;
        let prefix = self.store.keys().functions(namespace.as_deref());
        let (sender, receiver) = mpsc::channel(64);

        let mut start = request.since_version + 1;
        if request.since_version <= 0 {
            let snapshot = self.store.load(&prefix).await.map_err(store_status)?;
            for (_, record) in snapshot.records {
                if let Record::Function(stored) = record {
                    if selector.matches(&stored.spec.labels) {
                        let event = pb::FunctionEvent {
                            r#type: pb::function_event::Type::Added as i32,
                            version: stored.version,
                            function: Some((&stored).into()),
                        };
                        if sender.send(Ok(event)).await.is_err() {
                            return Ok(Response::new(ReceiverStream::new(receiver)));
                        }
                    }
                }
            }
            start = snapshot.revision + 1;
        }
        let mut watch = self
            .store
            .watch(&prefix, start)
            .await
            .map_err(store_status)?;
        tokio::spawn(async move {
            loop {
                let batch = match watch.next().await {
                    Ok(batch) => batch,
                    Err(StoreError::Compacted(revision)) => {
                        let _ = sender
                            .send(Err(Status::out_of_range(format!(
                                "history before revision {revision} was compacted; list again and watch from its version"
                            ))))
                            .await;
                        return;
                    }
                    Err(error) => {
                        let _ = sender.send(Err(store_status(error))).await;
                        return;
                    }
                };
                for change in batch.changes {
                    let RecordKey::Function(_) = change.key else {
                        continue;
                    };
                    let (kind, stored) = match (change.record, change.previous) {
                        (Some(Record::Function(new)), previous) => {
                            let kind = if previous.is_some() {
                                pb::function_event::Type::Modified
                            } else {
                                pb::function_event::Type::Added
                            };
                            (kind, new)
                        }
                        (None, Some(Record::Function(old))) => {
                            (pb::function_event::Type::Deleted, old)
                        }
                        _ => continue,
                    };
                    if !selector.matches(&stored.spec.labels) {
                        continue;
                    }
                    let event = pb::FunctionEvent {
                        r#type: kind as i32,
                        version: change.revision,
                        function: Some((&stored).into()),
                    };
                    if sender.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Whether an agent is in sync: it acknowledged the newest table of its region, and every
/// sidecar watching it has loaded that table too (an agent serves a table its sidecars cannot
/// load only in appearance). Sidecars that are not connected do not count.
pub fn mark_in_sync(agent: &mut pb::AgentStatus) {
    let newest = agent.newest_version;
    let connected = agent.sidecars.iter().filter(|s| s.connected);
    let (mut total, mut loaded) = (0u32, 0u32);
    for sidecar in connected {
        total += 1;
        if sidecar.loaded_version > 0 && sidecar.loaded_version >= newest {
            loaded += 1;
        }
    }
    agent.sidecars_in_sync = loaded;
    agent.in_sync = agent.acked_version > 0 && agent.acked_version >= newest && loaded == total;
}

/// Keeps the recent routing tables a paged `GetRoutingTable` may still be reading: every page
/// of one listing is cut from the version its first page saw. Tables share their routes, so
/// holding a few costs little.
#[derive(Debug, Default)]
struct TableHistory {
    recent: std::sync::Mutex<std::collections::VecDeque<Arc<Tables>>>,
}

/// Tables a listing may still read from.
const TABLE_HISTORY: usize = 16;

impl TableHistory {
    /// Records `current` and returns the region table of `version`, if still held.
    fn find(&self, current: &Arc<Tables>, region: &str, version: i64) -> Option<Arc<RegionTable>> {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.back().is_none_or(|last| !Arc::ptr_eq(last, current)) {
            recent.push_back(Arc::clone(current));
            while recent.len() > TABLE_HISTORY {
                recent.pop_front();
            }
        }
        recent
            .iter()
            .rev()
            .filter_map(|tables| tables.regions.get(region))
            .find(|table| table.version == version)
            .cloned()
    }
}

/// `MeshService`: the view operators use to see whether the mesh is in sync.
#[derive(Debug, Clone)]
pub struct MeshApi {
    store: Store,
    tables: watch::Receiver<Arc<Tables>>,
    history: Arc<TableHistory>,
}

impl MeshApi {
    pub fn new(store: Store, tables: watch::Receiver<Arc<Tables>>) -> Self {
        Self {
            store,
            tables,
            history: Arc::default(),
        }
    }
}

/// One page of a region's table: the functions after `after`, within `size` and the page
/// bytes, and the token of the next page.
fn table_page(
    table: &RegionTable,
    after: Option<&FunctionKey>,
    size: usize,
) -> pb::RoutingTablePage {
    use std::ops::Bound;
    let start = match after {
        Some(after) => Bound::Excluded(after.clone()),
        None => Bound::Unbounded,
    };
    let mut page = PageBuilder::new(size);
    let mut last: Option<&FunctionKey> = None;
    let mut routes = table.routes.range((start, Bound::Unbounded)).peekable();
    while let Some((key, route)) = routes.peek() {
        let route: &pb::FunctionRoute = route;
        if !page.push(route.clone(), prost::Message::encoded_len(route)) {
            break;
        }
        last = Some(key);
        routes.next();
    }
    let next_page_token = match (routes.peek(), last) {
        (Some(_), Some(after)) => PageToken {
            version: table.version,
            after: after.clone(),
        }
        .to_string(),
        _ => String::new(),
    };
    pb::RoutingTablePage {
        table: Some(pb::RoutingTable {
            version: table.version,
            region: table.region.clone(),
            functions: page.items,
            local_generation: 0,
        }),
        next_page_token,
    }
}

#[tonic::async_trait]
impl pb::mesh_service_server::MeshService for MeshApi {
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let request = request.into_inner();
        let keys = self.store.keys();
        let (agents_prefix, statuses_prefix) = (keys.agents(), keys.agent_statuses());
        let (agents, statuses) = tokio::try_join!(
            self.store.load(&agents_prefix),
            self.store.load(&statuses_prefix)
        )
        .map_err(store_status)?;
        let mut status_by_agent = BTreeMap::new();
        for (key, record) in statuses.records {
            if let (RecordKey::AgentStatus { region, agent_id }, Record::AgentStatus(status)) =
                (key, record)
            {
                status_by_agent.insert((region, agent_id), status);
            }
        }
        let tables = self.tables.borrow().clone();
        let mut result = Vec::new();
        for (key, record) in agents.records {
            let (RecordKey::Agent { region, agent_id }, Record::Agent(mut agent)) = (key, record)
            else {
                continue;
            };
            if !request.region.is_empty() && request.region != region {
                continue;
            }
            if let Some(status) = status_by_agent.remove(&(region.clone(), agent_id.clone())) {
                // The status is only current if it belongs to the same connection.
                if status.connected_since_unix_ms == agent.connected_since_unix_ms {
                    agent.acked_version = status.acked_version;
                    agent.last_nack = status.last_nack;
                    agent.sidecars = status.sidecars;
                }
            }
            agent.newest_version = tables
                .regions
                .get(&region)
                .map(|t| t.version)
                .unwrap_or_default();
            mark_in_sync(&mut agent);
            result.push(agent);
        }
        Ok(Response::new(pb::ListAgentsResponse { agents: result }))
    }

    async fn get_routing_table(
        &self,
        request: Request<pb::GetRoutingTableRequest>,
    ) -> Result<Response<pb::RoutingTablePage>, Status> {
        let request = request.into_inner();
        let region = request.region;
        meridian_common::names::validate_dns_label(&region)
            .map_err(|e| Status::invalid_argument(format!("region: {region:?} {e}")))?;
        let size = page_size(request.page_size)?;
        let token = PageToken::parse(&request.page_token)?;
        let tables = self.tables.borrow().clone();
        let table = match &token {
            Some(token) => self
                .history
                .find(&tables, &region, token.version)
                .ok_or_else(|| {
                    Status::aborted(format!(
                        "the table of region {region} changed too often while it was listed (version {} is gone); list again from the first page",
                        token.version
                    ))
                })?,
            None => {
                // Remember this version for the pages that follow.
                let current = tables.regions.get(&region).cloned();
                if let Some(current) = &current {
                    let _ = self.history.find(&tables, &region, current.version);
                }
                current.ok_or_else(|| {
                    Status::not_found(format!(
                        "region {region:?} has no agents and no function names it"
                    ))
                })?
            }
        };
        Ok(Response::new(table_page(
            &table,
            token.as_ref().map(|t| &t.after),
            size,
        )))
    }
}

/// `ScaleService`: what the scheduler placed where, and what each agent runs, as stored in etcd.
#[derive(Debug, Clone)]
pub struct ScaleApi {
    store: Store,
}

impl ScaleApi {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// Groups stored records into the ListInstances answer: process functions only, sorted by
/// (namespace, name), with their placement and the scale reports of agents still registered
/// (a report outlives its agent by up to a lease TTL), sorted by (region, agent id).
pub fn group_instances(
    functions: Vec<(RecordKey, Record)>,
    placements: Vec<(RecordKey, Record)>,
    scales: Vec<(RecordKey, Record)>,
    registered: &BTreeSet<(String, String)>,
    name: Option<&str>,
) -> Vec<pb::FunctionInstances> {
    let wanted = |key: &FunctionKey| name.is_none_or(|n| n == key.name);
    let mut result: BTreeMap<FunctionKey, pb::FunctionInstances> = BTreeMap::new();
    for (key, record) in functions {
        let (RecordKey::Function(key), Record::Function(stored)) = (key, record) else {
            continue;
        };
        let process = matches!(
            stored.spec.runtime,
            Some(pb::function_spec::Runtime::Process(_))
        );
        if process && wanted(&key) {
            let entry = pb::FunctionInstances {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                ..Default::default()
            };
            result.insert(key, entry);
        }
    }
    for (key, record) in placements {
        if let (RecordKey::Placement(key), Record::Placement(stored)) = (key, record) {
            if let Some(entry) = result.get_mut(&key) {
                entry.placement = Some(stored.placement);
            }
        }
    }
    for (key, record) in scales {
        let (
            RecordKey::Scale {
                function,
                region,
                agent_id,
            },
            Record::Scale(mut scale),
        ) = (key, record)
        else {
            continue;
        };
        if !registered.contains(&(region.clone(), agent_id.clone())) {
            continue;
        }
        if let Some(entry) = result.get_mut(&function) {
            // The key is authoritative: it is what the replica derived from the session.
            scale.region = region;
            scale.agent_id = agent_id;
            entry.regions.push(scale);
        }
    }
    let mut functions: Vec<pb::FunctionInstances> = result.into_values().collect();
    for function in &mut functions {
        function
            .regions
            .sort_by(|a, b| (&a.region, &a.agent_id).cmp(&(&b.region, &b.agent_id)));
    }
    functions
}

#[tonic::async_trait]
impl pb::scale_service_server::ScaleService for ScaleApi {
    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let request = request.into_inner();
        let namespace = namespace_filter(&request.namespace, request.all_namespaces)?;
        let name = if request.name.is_empty() {
            None
        } else {
            meridian_common::names::validate_dns_label(&request.name)
                .map_err(|e| Status::invalid_argument(format!("name: {:?} {e}", request.name)))?;
            Some(request.name.as_str())
        };
        let size = page_size(request.page_size)?;
        let token = PageToken::parse(&request.page_token)?;
        let keys = self.store.keys();
        let ns = namespace.as_deref();
        let placements_prefix = keys.placements(ns);
        let scales_prefix = keys.scales(ns, name.filter(|_| ns.is_some()));
        let agents_prefix = keys.agents();
        let (revision, after) = match token {
            Some(token) => (token.version, Some(token.after)),
            None => (0, None),
        };
        // One function (any namespace with -A) is looked up whole; a listing goes a page of
        // functions at a time, joined with every placement and scale report of the scope.
        let (functions, next_after, revision) = match name {
            Some(_) => {
                let snapshot = self
                    .store
                    .load(&keys.functions(ns))
                    .await
                    .map_err(store_status)?;
                (snapshot.records, None, snapshot.revision)
            }
            None => {
                let (functions, page) = self
                    .store
                    .list_functions_page(ns, after.as_ref(), size, revision)
                    .await
                    .map_err(store_status)?;
                let last = functions.last().map(|f| FunctionKey {
                    namespace: f.spec.namespace.clone(),
                    name: f.spec.name.clone(),
                });
                let records = functions
                    .into_iter()
                    .map(|stored| {
                        let key = FunctionKey {
                            namespace: stored.spec.namespace.clone(),
                            name: stored.spec.name.clone(),
                        };
                        (RecordKey::Function(key), Record::Function(stored))
                    })
                    .collect();
                (records, page.next_after.and(last), page.revision)
            }
        };
        let (placements, scales, agents) = tokio::try_join!(
            self.store.load(&placements_prefix),
            self.store.load(&scales_prefix),
            self.store.load(&agents_prefix),
        )
        .map_err(store_status)?;
        if let Some(name) = name {
            let exists = functions
                .iter()
                .any(|(key, _)| matches!(key, RecordKey::Function(key) if key.name == name));
            if !exists {
                return Err(Status::not_found(match ns {
                    Some(ns) => format!("function {name:?} not found in namespace {ns:?}"),
                    None => format!("function {name:?} not found in any namespace"),
                }));
            }
        }
        let registered: BTreeSet<(String, String)> = agents
            .records
            .into_iter()
            .filter_map(|(key, _)| match key {
                RecordKey::Agent { region, agent_id } => Some((region, agent_id)),
                _ => None,
            })
            .collect();
        let grouped = group_instances(
            functions,
            placements.records,
            scales.records,
            &registered,
            name,
        );
        let mut page = PageBuilder::new(usize::MAX);
        let mut last_included: Option<FunctionKey> = None;
        for function in grouped {
            let key = FunctionKey {
                namespace: function.namespace.clone(),
                name: function.name.clone(),
            };
            let bytes = prost::Message::encoded_len(&function);
            if !page.push(function, bytes) {
                break;
            }
            last_included = Some(key);
        }
        let next_page_token = match (page.cut, last_included, next_after) {
            (true, Some(after), _) | (false, _, Some(after)) => PageToken {
                version: revision,
                after,
            }
            .to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListInstancesResponse {
            functions: page.items,
            next_page_token,
        }))
    }

    async fn get_leader(
        &self,
        _request: Request<pb::GetLeaderRequest>,
    ) -> Result<Response<pb::GetLeaderResponse>, Status> {
        let leader = self.store.leader().await.map_err(store_status)?;
        Ok(Response::new(match leader {
            Some(leader) => pb::GetLeaderResponse {
                leader: leader.replica,
                elected_version: leader.elected_version,
            },
            None => pb::GetLeaderResponse::default(),
        }))
    }
}

/// `ControlPlaneService`: the replicas themselves, as registered in etcd.
#[derive(Debug, Clone)]
pub struct ControlPlaneApi {
    store: Store,
    skipped: Option<watch::Receiver<Arc<Vec<pb::SkippedRecord>>>>,
}

impl ControlPlaneApi {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            skipped: None,
        }
    }

    /// `ListReplicas` also reports the records this replica's cache skipped.
    pub fn with_skipped(mut self, skipped: watch::Receiver<Arc<Vec<pb::SkippedRecord>>>) -> Self {
        self.skipped = Some(skipped);
        self
    }
}

/// Marks the leader among `replicas` (sorted by id, as etcd lists them).
pub fn mark_leader(
    mut replicas: Vec<pb::ReplicaInfo>,
    leader: Option<crate::store::LeaderRecord>,
) -> pb::ListReplicasResponse {
    let (leader, elected_version) = leader
        .map(|l| (l.replica, l.elected_version))
        .unwrap_or_default();
    for replica in &mut replicas {
        replica.leader = !leader.is_empty() && replica.replica_id == leader;
    }
    pb::ListReplicasResponse {
        replicas,
        leader,
        elected_version,
        skipped_records: Vec::new(),
    }
}

#[tonic::async_trait]
impl pb::control_plane_service_server::ControlPlaneService for ControlPlaneApi {
    async fn list_replicas(
        &self,
        _request: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        let (replicas, leader) = tokio::try_join!(self.store.list_replicas(), self.store.leader())
            .map_err(store_status)?;
        let mut response = mark_leader(replicas, leader);
        if let Some(skipped) = &self.skipped {
            response.skipped_records = skipped.borrow().to_vec();
        }
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoredFunction, StoredPlacement};
    use std::collections::HashMap;

    fn function(ns: &str, name: &str, process: bool) -> (RecordKey, Record) {
        let runtime = if process {
            pb::function_spec::Runtime::Process(pb::ProcessRuntime::default())
        } else {
            pb::function_spec::Runtime::External(pb::ExternalRuntime::default())
        };
        (
            RecordKey::Function(FunctionKey {
                namespace: ns.into(),
                name: name.into(),
            }),
            Record::Function(StoredFunction {
                spec: pb::FunctionSpec {
                    name: name.into(),
                    namespace: ns.into(),
                    runtime: Some(runtime),
                    ..Default::default()
                },
                version: 1,
                created_version: 1,
            }),
        )
    }

    fn scale(ns: &str, name: &str, region: &str, agent: &str, desired: u32) -> (RecordKey, Record) {
        (
            RecordKey::Scale {
                function: FunctionKey {
                    namespace: ns.into(),
                    name: name.into(),
                },
                region: region.into(),
                agent_id: agent.into(),
            },
            Record::Scale(pb::RegionScale {
                desired,
                ..Default::default()
            }),
        )
    }

    #[test]
    fn instances_are_grouped_sorted_and_filtered() {
        let functions = vec![
            function("default", "b", true),
            function("default", "a", true),
            function("default", "ext", false),
            function("other", "a", true),
        ];
        let placements = vec![(
            RecordKey::Placement(FunctionKey {
                namespace: "default".into(),
                name: "a".into(),
            }),
            Record::Placement(StoredPlacement {
                placement: pb::FunctionPlacement {
                    leader: "cp-1".into(),
                    ..Default::default()
                },
                version: 3,
            }),
        )];
        let scales = vec![
            scale("default", "a", "us-east", "us-east-2", 2),
            scale("default", "a", "eu-west", "eu-west-1", 1),
            scale("default", "a", "us-east", "us-east-1", 3),
            // Its agent is gone: hidden.
            scale("default", "a", "ap-south", "ap-south-1", 9),
            scale("default", "ext", "us-east", "us-east-1", 1),
        ];
        let registered: BTreeSet<(String, String)> = [
            ("us-east", "us-east-1"),
            ("us-east", "us-east-2"),
            ("eu-west", "eu-west-1"),
        ]
        .into_iter()
        .map(|(r, a)| (r.to_string(), a.to_string()))
        .collect();
        let all = group_instances(
            functions.clone(),
            placements.clone(),
            scales.clone(),
            &registered,
            None,
        );
        let names: Vec<(&str, &str)> = all
            .iter()
            .map(|f| (f.namespace.as_str(), f.name.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![("default", "a"), ("default", "b"), ("other", "a")]
        );
        let a = &all[0];
        assert_eq!(
            a.placement.as_ref().map(|p| p.leader.as_str()),
            Some("cp-1")
        );
        let regions: Vec<(&str, &str, u32)> = a
            .regions
            .iter()
            .map(|r| (r.region.as_str(), r.agent_id.as_str(), r.desired))
            .collect();
        assert_eq!(
            regions,
            vec![
                ("eu-west", "eu-west-1", 1),
                ("us-east", "us-east-1", 3),
                ("us-east", "us-east-2", 2)
            ]
        );
        assert!(all[1].placement.is_none() && all[1].regions.is_empty());

        let only_b = group_instances(functions, placements, scales, &registered, Some("b"));
        assert_eq!(only_b.len(), 1);
        assert_eq!(only_b[0].name, "b");
    }

    #[test]
    fn label_selectors() {
        let labels: HashMap<String, String> = [("team".to_string(), "web".to_string())]
            .into_iter()
            .collect();
        let sel = |s: &str| s.parse::<LabelSelector>().expect("valid selector");
        assert!(sel("").matches(&labels));
        assert!(sel("team=web").matches(&labels));
        assert!(sel("team==web").matches(&labels));
        assert!(!sel("team!=web").matches(&labels));
        assert!(sel("team").matches(&labels));
        assert!(!sel("!team").matches(&labels));
        assert!(!sel("team=web,tier=db").matches(&labels));
        let error = "te am=x".parse::<LabelSelector>().expect_err("invalid");
        assert_eq!(error.field, "labelSelector");
    }
}
