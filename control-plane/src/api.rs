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

use crate::spec::{FunctionKey, FunctionSpec, SpecError, DEFAULT_NAMESPACE};
use crate::store::{PutOutcome, Record, RecordKey, Store, StoreError};
use crate::table::Tables;
use crate::trace::{ChangeSpan, Tracing, APPLY_SPAN, DELETE_SPAN};

fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::NotFound => Status::not_found("not found"),
        StoreError::Conflict { expected, current } => Status::failed_precondition(format!(
            "the function's version is {current}, not the expected {expected}: read it again and retry"
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

/// `FunctionService`: every write is validated whole before etcd is touched.
#[derive(Debug, Clone)]
pub struct FunctionApi {
    store: Store,
    /// Spans of changes, and their trace written with them; `None` when export is off.
    tracing: Option<Arc<Tracing>>,
}

impl FunctionApi {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            tracing: None,
        }
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
        let spec = FunctionSpec::try_from(spec).map_err(invalid)?;
        if request.expected_version < 0 {
            return Err(Status::invalid_argument(
                "expectedVersion: must not be negative",
            ));
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
        let (functions, version) = self
            .store
            .list_functions(namespace.as_deref())
            .await
            .map_err(store_status)?;
        let functions = functions
            .iter()
            .filter(|f| selector.matches(&f.spec.labels))
            .map(pb::Function::from)
            .collect();
        Ok(Response::new(pb::ListFunctionsResponse {
            functions,
            version,
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

/// `MeshService`: the view operators use to see whether the mesh is in sync.
#[derive(Debug, Clone)]
pub struct MeshApi {
    store: Store,
    tables: watch::Receiver<Arc<Tables>>,
}

impl MeshApi {
    pub fn new(store: Store, tables: watch::Receiver<Arc<Tables>>) -> Self {
        Self { store, tables }
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
                }
            }
            agent.newest_version = tables
                .regions
                .get(&region)
                .map(|t| t.version)
                .unwrap_or_default();
            agent.in_sync = agent.acked_version > 0 && agent.acked_version >= agent.newest_version;
            result.push(agent);
        }
        Ok(Response::new(pb::ListAgentsResponse { agents: result }))
    }

    async fn get_routing_table(
        &self,
        request: Request<pb::GetRoutingTableRequest>,
    ) -> Result<Response<pb::RoutingTable>, Status> {
        let region = request.into_inner().region;
        meridian_common::names::validate_dns_label(&region)
            .map_err(|e| Status::invalid_argument(format!("region: {region:?} {e}")))?;
        let tables = self.tables.borrow().clone();
        match tables.regions.get(&region) {
            Some(table) => Ok(Response::new(table.to_proto())),
            None => Err(Status::not_found(format!(
                "region {region:?} has no agents and no function names it"
            ))),
        }
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
        let keys = self.store.keys();
        let ns = namespace.as_deref();
        let functions_prefix = keys.functions(ns);
        let placements_prefix = keys.placements(ns);
        let scales_prefix = keys.scales(ns, name.filter(|_| ns.is_some()));
        let agents_prefix = keys.agents();
        let (functions, placements, scales, agents) = tokio::try_join!(
            self.store.load(&functions_prefix),
            self.store.load(&placements_prefix),
            self.store.load(&scales_prefix),
            self.store.load(&agents_prefix),
        )
        .map_err(store_status)?;
        if let Some(name) = name {
            let exists = functions
                .records
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
        let functions = group_instances(
            functions.records,
            placements.records,
            scales.records,
            &registered,
            name,
        );
        Ok(Response::new(pb::ListInstancesResponse { functions }))
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
}

impl ControlPlaneApi {
    pub fn new(store: Store) -> Self {
        Self { store }
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
        Ok(Response::new(mark_leader(replicas, leader)))
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
