//! The etcd adapter: key layout, typed records, optimistic-concurrency writes, leases, the
//! scheduler election and its fenced writes, and a resumable watch. Architecture Invariant: this
//! is the only module that imports `etcd_client`.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use meridian_proto::v1 as pb;
use prost::Message;

use crate::spec::FunctionKey;

/// etcd refuses transactions with more operations than this (its default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// Bytes of values per status transaction; etcd refuses requests over 1.5 MiB by default
/// (`--max-request-bytes`), and scale reports carry log lines.
const MAX_TXN_BYTES: usize = 1024 * 1024;

/// Placement writes per fenced transaction: each adds one compare to the election compare, and
/// etcd also bounds the compares of a transaction by `--max-txn-ops`.
pub const MAX_FENCED_WRITES: usize = 64;

/// Records read per etcd request when loading a range. A page this size of ordinary records is
/// tens of KB; a page of records near the spec limit is halved until it fits [`MAX_READ_BYTES`].
pub const PAGE_RECORDS: usize = 500;

/// The largest etcd answer this client decodes: generous, because a page is cut by count, not
/// size; a page that still does not fit is read again in halves.
const MAX_READ_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or did not answer: worth retrying.
    #[error("etcd request failed: {0}")]
    Etcd(#[source] etcd_client::Error),
    /// etcd answered that the request itself is wrong (too large, too many operations):
    /// retrying the same request cannot help.
    #[error("etcd refused the request: {0}")]
    Refused(String),
    /// A create would take the namespace over its quota of functions.
    #[error("namespace {namespace:?} already has {count} functions, the most it may hold (--max-functions-per-namespace {limit})")]
    QuotaExceeded {
        namespace: String,
        count: usize,
        limit: usize,
    },
    #[error("the stored version is {current}, not the expected {expected}")]
    Conflict { expected: i64, current: i64 },
    #[error("not found")]
    NotFound,
    #[error("the watch fell behind etcd's compaction at revision {0}")]
    Compacted(i64),
    #[error("the watch was closed by etcd: {0}")]
    WatchClosed(String),
    #[error("the lease expired")]
    LeaseLost,
}

impl From<etcd_client::Error> for StoreError {
    fn from(error: etcd_client::Error) -> Self {
        match &error {
            etcd_client::Error::GRpcStatus(status)
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                ) =>
            {
                Self::Refused(status.message().to_owned())
            }
            etcd_client::Error::GRpcStatus(status)
                if status.code() == tonic::Code::OutOfRange
                    && status.message().contains("compacted") =>
            {
                Self::Compacted(0)
            }
            _ => Self::Etcd(error),
        }
    }
}

impl StoreError {
    /// Whether the same request may succeed later (etcd unreachable, a lost race).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Etcd(_) | Self::WatchClosed(_) | Self::LeaseLost)
    }
}

/// Whether an etcd error is our client refusing an answer larger than it decodes.
fn answer_too_large(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::OutOfRange && status.message().contains("message length too large"))
}

/// The end of the key range of everything that starts with `prefix` (etcd's prefix rule: the
/// prefix with its last byte below 0xff incremented).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (never for our keys): the range has no end.
    vec![0]
}

/// The key right after `key` in etcd's order: where a page continues.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// A function as stored: the normalized spec and its versions.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFunction {
    pub spec: pb::FunctionSpec,
    pub version: i64,
    pub created_version: i64,
}

impl From<&StoredFunction> for pb::Function {
    fn from(stored: &StoredFunction) -> Self {
        Self {
            spec: Some(stored.spec.clone()),
            version: stored.version,
            created_version: stored.created_version,
        }
    }
}

/// What a key under the prefix names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    Function(FunctionKey),
    Agent {
        region: String,
        agent_id: String,
    },
    Endpoint {
        function: FunctionKey,
        region: String,
        id: String,
    },
    AgentStatus {
        region: String,
        agent_id: String,
    },
    /// `placements/<ns>/<name>`: the scheduler's output for one function.
    Placement(FunctionKey),
    /// `status/scale/<ns>/<name>/<region>/<agent-id>`: one agent's scale report of a function.
    Scale {
        function: FunctionKey,
        region: String,
        agent_id: String,
    },
    /// `election/scheduler`: the scheduler leader's key.
    Leader,
    /// `propagation/trace`: the trace of the last traced change (tracing on only).
    ChangeTrace,
    /// `replicas/<replica-id>`: a running control-plane replica, on its lease.
    Replica {
        replica_id: String,
    },
}

impl RecordKey {
    /// Whether a change of this key can change a routing table. Acknowledgements, scale
    /// reports, elections and change traces never do.
    pub fn affects_routing(&self) -> bool {
        !matches!(
            self,
            Self::AgentStatus { .. }
                | Self::Scale { .. }
                | Self::Leader
                | Self::ChangeTrace
                | Self::Replica { .. }
        )
    }
}

/// A decoded value.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Function(StoredFunction),
    Agent(pb::AgentStatus),
    Endpoint(pb::Endpoint),
    AgentStatus(pb::AgentStatus),
    Placement(StoredPlacement),
    Scale(pb::RegionScale),
    Leader(LeaderRecord),
    ChangeTrace(pb::ChangeTrace),
    Replica(pb::ReplicaInfo),
}

/// A placement as stored, with its mod revision (what a fenced write compares against).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPlacement {
    pub placement: pb::FunctionPlacement,
    pub version: i64,
}

/// Who holds the scheduler election key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderRecord {
    /// The replica id the leader wrote as the key's value.
    pub replica: String,
    /// The key's create revision: the revision at which this leader was elected. Every fenced
    /// write compares against it, so a leader elected later never matches an earlier one.
    pub elected_version: i64,
    /// The leader's own lease, which holds the key.
    pub lease: i64,
}

/// The outcome of one campaign for the scheduler election key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    /// We created the key at this revision (our `elected_version`).
    Elected { elected_version: i64 },
    /// Someone else holds it; `observed` is the revision we saw it at (watch from after it).
    Taken { leader: LeaderRecord, observed: i64 },
}

/// One placement write of the scheduler: put (or delete, with `placement: None`) if the key's
/// mod revision is still `expected_version` (0: absent).
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementWrite {
    pub function: FunctionKey,
    pub expected_version: i64,
    pub placement: Option<pb::FunctionPlacement>,
}

/// The outcome of a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedWrite {
    /// Applied at this revision (the new mod revision of every key written).
    Written { revision: i64 },
    /// The election key is no longer the one we created: we are not the leader. Nothing written.
    Fenced,
    /// We still lead, but a placement changed since we read it. Nothing written.
    Conflict,
}

/// One change seen by a watch: a put (with the new record) or a delete.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: RecordKey,
    /// `None` for a delete.
    pub record: Option<Record>,
    /// For a delete of a function: what was stored before.
    pub previous: Option<Record>,
    pub revision: i64,
    /// A put whose value cannot be decoded: reported, and treated as a delete (`record` is
    /// `None`), so that every replica serves the same state whether it loaded or watched it.
    pub undecodable: Option<pb::SkippedRecord>,
}

/// Everything under the prefix at one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub records: Vec<(RecordKey, Record)>,
    pub revision: i64,
    /// Records that could not be decoded, left out of `records`.
    pub skipped: Vec<pb::SkippedRecord>,
}

/// One page of a paged read.
#[derive(Debug, Default)]
pub struct Page {
    pub records: Vec<(RecordKey, Record)>,
    /// The revision every page of the read is taken at.
    pub revision: i64,
    pub skipped: Vec<pb::SkippedRecord>,
    /// The raw key of the last record read (decoded or not), where the next page starts
    /// after; `None` when the range is exhausted.
    pub next_after: Option<String>,
}

/// A function deleted: the version it had, and the revision of the delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub version: i64,
    pub revision: i64,
}

/// The outcome of an Apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Configured,
    Unchanged,
}

/// Key layout under the prefix (default `/meridian/v1/`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    /// The prefix every key starts with (ending in `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key range that routing tables depend on: `agents/`, `endpoints/` and `functions/`,
    /// but not `status/`, which sorts after them and changes with every acknowledgement.
    pub fn routing_range(&self) -> (String, String) {
        (self.prefix.clone(), format!("{}status/", self.prefix))
    }

    pub fn function(&self, key: &FunctionKey) -> String {
        format!("{}functions/{}/{}", self.prefix, key.namespace, key.name)
    }

    /// All functions, or those of one namespace.
    pub fn functions(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) => format!("{}functions/{ns}/", self.prefix),
            None => format!("{}functions/", self.prefix),
        }
    }

    pub fn agent(&self, region: &str, agent_id: &str) -> String {
        format!("{}agents/{region}/{agent_id}", self.prefix)
    }

    pub fn agents(&self) -> String {
        format!("{}agents/", self.prefix)
    }

    pub fn endpoint(&self, function: &FunctionKey, region: &str, id: &str) -> String {
        format!(
            "{}endpoints/{}/{}/{region}/{id}",
            self.prefix, function.namespace, function.name
        )
    }

    pub fn agent_status(&self, region: &str, agent_id: &str) -> String {
        format!("{}status/agents/{region}/{agent_id}", self.prefix)
    }

    pub fn agent_statuses(&self) -> String {
        format!("{}status/agents/", self.prefix)
    }

    pub fn placement(&self, key: &FunctionKey) -> String {
        format!("{}placements/{}/{}", self.prefix, key.namespace, key.name)
    }

    /// All placements, or those of one namespace.
    pub fn placements(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) => format!("{}placements/{ns}/", self.prefix),
            None => format!("{}placements/", self.prefix),
        }
    }

    pub fn scale(&self, function: &FunctionKey, region: &str, agent_id: &str) -> String {
        format!(
            "{}status/scale/{}/{}/{region}/{agent_id}",
            self.prefix, function.namespace, function.name
        )
    }

    /// The prefix of scale reports: all, one namespace's, or one function's.
    pub fn scales(&self, namespace: Option<&str>, name: Option<&str>) -> String {
        match (namespace, name) {
            (Some(ns), Some(name)) => format!("{}status/scale/{ns}/{name}/", self.prefix),
            (Some(ns), None) => format!("{}status/scale/{ns}/", self.prefix),
            (None, _) => format!("{}status/scale/", self.prefix),
        }
    }

    /// The scheduler election key. It sorts inside the routing range; the cache ignores it.
    pub fn leader(&self) -> String {
        format!("{}election/scheduler", self.prefix)
    }

    /// The trace of the last traced change. It sorts inside the routing range (before
    /// `status/`), so every replica's cache watch sees it at the revision of the change it was
    /// written with. One key, overwritten: it never grows.
    pub fn change_trace(&self) -> String {
        format!("{}propagation/trace", self.prefix)
    }

    /// A replica's registration. It sorts inside the routing range; the cache ignores it.
    pub fn replica(&self, replica_id: &str) -> String {
        format!("{}replicas/{replica_id}", self.prefix)
    }

    pub fn replicas(&self) -> String {
        format!("{}replicas/", self.prefix)
    }

    /// Parses a full key back into what it names; `None` for keys of no known kind.
    pub fn parse(&self, key: &[u8]) -> Option<RecordKey> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let owned = |s: &str| s.to_owned();
        match parts.as_slice() {
            ["functions", ns, name] => Some(RecordKey::Function(FunctionKey {
                namespace: owned(ns),
                name: owned(name),
            })),
            ["agents", region, id] => Some(RecordKey::Agent {
                region: owned(region),
                agent_id: owned(id),
            }),
            ["endpoints", ns, name, region, id] => Some(RecordKey::Endpoint {
                function: FunctionKey {
                    namespace: owned(ns),
                    name: owned(name),
                },
                region: owned(region),
                id: owned(id),
            }),
            ["status", "agents", region, id] => Some(RecordKey::AgentStatus {
                region: owned(region),
                agent_id: owned(id),
            }),
            ["placements", ns, name] => Some(RecordKey::Placement(FunctionKey {
                namespace: owned(ns),
                name: owned(name),
            })),
            ["status", "scale", ns, name, region, id] => Some(RecordKey::Scale {
                function: FunctionKey {
                    namespace: owned(ns),
                    name: owned(name),
                },
                region: owned(region),
                agent_id: owned(id),
            }),
            ["election", "scheduler"] => Some(RecordKey::Leader),
            ["propagation", "trace"] => Some(RecordKey::ChangeTrace),
            ["replicas", id] => Some(RecordKey::Replica {
                replica_id: owned(id),
            }),
            _ => None,
        }
    }
}

fn decode(key: &RecordKey, kv: &etcd_client::KeyValue) -> Result<Record, prost::DecodeError> {
    let value = kv.value();
    Ok(match key {
        RecordKey::Function(_) => Record::Function(StoredFunction {
            spec: pb::FunctionSpec::decode(value)?,
            version: kv.mod_revision(),
            created_version: kv.create_revision(),
        }),
        RecordKey::Agent { .. } => Record::Agent(pb::AgentStatus::decode(value)?),
        RecordKey::Endpoint { .. } => Record::Endpoint(pb::Endpoint::decode(value)?),
        RecordKey::AgentStatus { .. } => Record::AgentStatus(pb::AgentStatus::decode(value)?),
        RecordKey::Placement(_) => Record::Placement(StoredPlacement {
            placement: pb::FunctionPlacement::decode(value)?,
            version: kv.mod_revision(),
        }),
        RecordKey::Scale { .. } => Record::Scale(pb::RegionScale::decode(value)?),
        // Plain text, so that `etcdctl get` shows who leads.
        RecordKey::Leader => Record::Leader(LeaderRecord {
            replica: String::from_utf8_lossy(value).into_owned(),
            elected_version: kv.create_revision(),
            lease: kv.lease(),
        }),
        RecordKey::ChangeTrace => Record::ChangeTrace(pb::ChangeTrace::decode(value)?),
        RecordKey::Replica { .. } => Record::Replica(pb::ReplicaInfo::decode(value)?),
    })
}

/// A handle on etcd. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("keys", &self.keys).finish()
    }
}

impl Store {
    /// Connects to etcd. Requests time out after `request_timeout` so that a dead etcd turns
    /// into an error instead of a hang.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        request_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(request_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(Self {
            client,
            keys: Keys::new(prefix),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn decode_kv(&self, kv: &etcd_client::KeyValue) -> Option<(RecordKey, Record)> {
        self.decode_entry(kv)?.ok()
    }

    /// Decodes a key-value; `None` for keys of no known kind, `Err` (logged with the key) for a
    /// value that cannot be decoded.
    fn decode_entry(
        &self,
        kv: &etcd_client::KeyValue,
    ) -> Option<Result<(RecordKey, Record), pb::SkippedRecord>> {
        let key = self.keys.parse(kv.key())?;
        Some(match decode(&key, kv) {
            Ok(record) => Ok((key, record)),
            Err(error) => {
                let raw = String::from_utf8_lossy(kv.key()).into_owned();
                // A value we cannot read must not take the whole mesh down: skip it, loudly.
                tracing::error!(key = %raw, %error, "skipping undecodable value in etcd");
                Err(pb::SkippedRecord {
                    key: raw,
                    error: format!("cannot decode: {error}"),
                    revision: kv.mod_revision(),
                })
            }
        })
    }

    /// Everything under `prefix` (a full key prefix from [`Keys`]) at one revision, read in
    /// pages.
    pub async fn load(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        self.load_range((
            prefix.to_owned(),
            String::from_utf8_lossy(&prefix_end(prefix)).into_owned(),
        ))
        .await
    }

    /// Everything in `[start, end)` at one revision, read in pages of [`PAGE_RECORDS`]: no
    /// answer grows with the number of records. Fails with [`StoreError::Compacted`] if etcd
    /// compacts the revision before the last page is read (load again).
    pub async fn load_range(&self, (start, end): (String, String)) -> Result<Snapshot, StoreError> {
        let mut snapshot = Snapshot::default();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .read_page(
                    (&start, &end),
                    after.as_deref(),
                    PAGE_RECORDS,
                    snapshot.revision,
                )
                .await?;
            snapshot.revision = page.revision;
            snapshot.records.extend(page.records);
            snapshot.skipped.extend(page.skipped);
            match page.next_after {
                Some(next) => after = Some(next),
                None => return Ok(snapshot),
            }
        }
    }

    /// One page of `[start, end)`: at most `limit` records after the raw key `after`, read at
    /// `revision` (0: now; the page says which revision it read). A page too large for the
    /// client is read again in halves, down to one record.
    pub async fn read_page(
        &self,
        (start, end): (&str, &str),
        after: Option<&str>,
        limit: usize,
        revision: i64,
    ) -> Result<Page, StoreError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_READ_BYTES);
        let from = match after {
            Some(after) => key_after(after.as_bytes()),
            None => start.as_bytes().to_vec(),
        };
        let mut limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let response = loop {
            let options = GetOptions::new()
                .with_range(end.as_bytes().to_vec())
                .with_limit(limit)
                .with_revision(revision);
            match kv.get(from.clone(), Some(options)).await {
                Ok(response) => break response,
                Err(error) if answer_too_large(&error) && limit > 1 => limit = (limit / 2).max(1),
                Err(error) => {
                    return Err(match StoreError::from(error) {
                        StoreError::Compacted(_) => StoreError::Compacted(revision),
                        other => other,
                    })
                }
            }
        };
        let mut page = Page {
            revision: if revision > 0 {
                revision
            } else {
                response.header().map(|h| h.revision()).unwrap_or_default()
            },
            ..Page::default()
        };
        for kv in response.kvs() {
            match self.decode_entry(kv) {
                Some(Ok(record)) => page.records.push(record),
                Some(Err(skipped)) => page.skipped.push(skipped),
                None => {}
            }
        }
        if response.more() {
            page.next_after = response
                .kvs()
                .last()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned());
        }
        Ok(page)
    }

    /// How many keys start with `prefix`, now.
    pub async fn count(&self, prefix: &str) -> Result<usize, StoreError> {
        let response = self
            .client
            .kv_client()
            .get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_range(prefix_end(prefix))
                        .with_count_only(),
                ),
            )
            .await?;
        Ok(usize::try_from(response.count()).unwrap_or(usize::MAX))
    }

    pub async fn get_function(&self, key: &FunctionKey) -> Result<StoredFunction, StoreError> {
        let response = self
            .client
            .kv_client()
            .get(self.keys.function(key), None)
            .await?;
        match response.kvs().first().and_then(|kv| self.decode_kv(kv)) {
            Some((_, Record::Function(stored))) => Ok(stored),
            _ => Err(StoreError::NotFound),
        }
    }

    /// Functions of one namespace (or all), sorted by key, with the revision they were read at.
    pub async fn list_functions(
        &self,
        namespace: Option<&str>,
    ) -> Result<(Vec<StoredFunction>, i64), StoreError> {
        let snapshot = self.load(&self.keys.functions(namespace)).await?;
        let functions = snapshot
            .records
            .into_iter()
            .filter_map(|(_, record)| match record {
                Record::Function(f) => Some(f),
                _ => None,
            })
            .collect();
        Ok((functions, snapshot.revision))
    }

    /// One page of functions of one namespace (or all) after `after` (exclusive), read at
    /// `revision` (0: now).
    pub async fn list_functions_page(
        &self,
        namespace: Option<&str>,
        after: Option<&FunctionKey>,
        limit: usize,
        revision: i64,
    ) -> Result<(Vec<StoredFunction>, Page), StoreError> {
        let prefix = self.keys.functions(namespace);
        let end = String::from_utf8_lossy(&prefix_end(&prefix)).into_owned();
        let after = after.map(|key| self.keys.function(key));
        let mut page = self
            .read_page((&prefix, &end), after.as_deref(), limit, revision)
            .await?;
        let functions = std::mem::take(&mut page.records)
            .into_iter()
            .filter_map(|(_, record)| match record {
                Record::Function(f) => Some(f),
                _ => None,
            })
            .collect();
        Ok((functions, page))
    }

    /// Creates or updates a function. With `expected_version`, the write happens only if the
    /// stored version is exactly that; without, it overwrites, retrying on concurrent writers.
    /// An identical spec is not rewritten (its version stays).
    pub async fn put_function(
        &self,
        key: &FunctionKey,
        spec: &pb::FunctionSpec,
        expected_version: Option<i64>,
        dry_run: bool,
    ) -> Result<(StoredFunction, PutOutcome), StoreError> {
        self.put_function_traced(key, spec, expected_version, dry_run, None, None)
            .await
    }

    /// [`Store::put_function`], writing `trace` (when given) to [`Keys::change_trace`] in the
    /// same transaction as the function, so that both have the change's revision. With
    /// `quota`, a create in a namespace that already holds that many functions is refused
    /// ([`StoreError::QuotaExceeded`]). The count is read before the write, so creates racing
    /// each other can overshoot the quota by as many as run at once.
    pub async fn put_function_traced(
        &self,
        key: &FunctionKey,
        spec: &pb::FunctionSpec,
        expected_version: Option<i64>,
        dry_run: bool,
        trace: Option<&pb::ChangeTrace>,
        quota: Option<usize>,
    ) -> Result<(StoredFunction, PutOutcome), StoreError> {
        let etcd_key = self.keys.function(key);
        let trace_put =
            trace.map(|trace| TxnOp::put(self.keys.change_trace(), trace.encode_to_vec(), None));
        let value = spec.encode_to_vec();
        let mut kv = self.client.kv_client();
        for _ in 0..5 {
            let current = kv.get(etcd_key.clone(), None).await?;
            let stored = current.kvs().first();
            let (current_version, created_version) = stored
                .map(|kv| (kv.mod_revision(), kv.create_revision()))
                .unwrap_or((0, 0));
            if let Some(expected) = expected_version {
                if expected != current_version {
                    return Err(StoreError::Conflict {
                        expected,
                        current: current_version,
                    });
                }
            }
            if let Some(stored) = stored {
                if stored.value() == value.as_slice() {
                    return Ok((
                        StoredFunction {
                            spec: spec.clone(),
                            version: current_version,
                            created_version,
                        },
                        PutOutcome::Unchanged,
                    ));
                }
            }
            let outcome = if current_version == 0 {
                PutOutcome::Created
            } else {
                PutOutcome::Configured
            };
            if let (PutOutcome::Created, Some(limit)) = (outcome, quota) {
                let count = self
                    .count(&self.keys.functions(Some(&key.namespace)))
                    .await?;
                if count >= limit {
                    return Err(StoreError::QuotaExceeded {
                        namespace: key.namespace.clone(),
                        count,
                        limit,
                    });
                }
            }
            if dry_run {
                return Ok((
                    StoredFunction {
                        spec: spec.clone(),
                        version: current_version,
                        created_version,
                    },
                    outcome,
                ));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    etcd_key.clone(),
                    CompareOp::Equal,
                    current_version,
                )])
                .and_then(
                    std::iter::once(TxnOp::put(etcd_key.clone(), value.clone(), None))
                        .chain(trace_put.clone())
                        .collect::<Vec<_>>(),
                );
            let response = kv.txn(txn).await?;
            if response.succeeded() {
                let revision = response.header().map(|h| h.revision()).unwrap_or_default();
                let created_version = if current_version == 0 {
                    revision
                } else {
                    created_version
                };
                return Ok((
                    StoredFunction {
                        spec: spec.clone(),
                        version: revision,
                        created_version,
                    },
                    outcome,
                ));
            }
            // Someone wrote in between. With an expected version that is a conflict; without
            // one, read again and retry.
            if expected_version.is_some() {
                let current = self.get_function(key).await.map(|f| f.version).unwrap_or(0);
                return Err(StoreError::Conflict {
                    expected: expected_version.unwrap_or_default(),
                    current,
                });
            }
        }
        Err(StoreError::Conflict {
            expected: 0,
            current: -1,
        })
    }

    /// Deletes a function (and nothing else: its endpoints belong to agents' leases).
    pub async fn delete_function(
        &self,
        key: &FunctionKey,
        expected_version: Option<i64>,
    ) -> Result<i64, StoreError> {
        self.delete_function_traced(key, expected_version, None)
            .await
            .map(|deleted| deleted.version)
    }

    /// [`Store::delete_function`], writing `trace` (when given) to [`Keys::change_trace`] in
    /// the same transaction as the delete.
    pub async fn delete_function_traced(
        &self,
        key: &FunctionKey,
        expected_version: Option<i64>,
        trace: Option<&pb::ChangeTrace>,
    ) -> Result<Deleted, StoreError> {
        let etcd_key = self.keys.function(key);
        let mut kv = self.client.kv_client();
        let Some(trace) = trace else {
            return self.delete_untraced(key, expected_version).await;
        };
        let trace_put = TxnOp::put(self.keys.change_trace(), trace.encode_to_vec(), None);
        // Without an expected version: whatever version exists (a missing key has version 0).
        let compare = match expected_version {
            Some(expected) => Compare::mod_revision(etcd_key.clone(), CompareOp::Equal, expected),
            None => Compare::version(etcd_key.clone(), CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([
                TxnOp::delete(etcd_key.clone(), Some(DeleteOptions::new().with_prev_key())),
                trace_put,
            ])
            .or_else([TxnOp::get(etcd_key, None)]);
        let response = kv.txn(txn).await?;
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        let found = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Delete(delete) => delete.prev_kvs().first().map(|kv| kv.mod_revision()),
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision()),
            _ => None,
        });
        match (response.succeeded(), found, expected_version) {
            (true, Some(version), _) => Ok(Deleted { version, revision }),
            (false, Some(current), Some(expected)) => {
                Err(StoreError::Conflict { expected, current })
            }
            _ => Err(StoreError::NotFound),
        }
    }

    async fn delete_untraced(
        &self,
        key: &FunctionKey,
        expected_version: Option<i64>,
    ) -> Result<Deleted, StoreError> {
        let etcd_key = self.keys.function(key);
        let mut kv = self.client.kv_client();
        match expected_version {
            None => {
                let response = kv
                    .delete(etcd_key, Some(DeleteOptions::new().with_prev_key()))
                    .await?;
                let revision = response.header().map(|h| h.revision()).unwrap_or_default();
                response
                    .prev_kvs()
                    .first()
                    .map(|kv| Deleted {
                        version: kv.mod_revision(),
                        revision,
                    })
                    .ok_or(StoreError::NotFound)
            }
            Some(expected) => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        etcd_key.clone(),
                        CompareOp::Equal,
                        expected,
                    )])
                    .and_then([TxnOp::delete(etcd_key.clone(), None)])
                    .or_else([TxnOp::get(etcd_key, None)]);
                let response = kv.txn(txn).await?;
                if response.succeeded() {
                    let revision = response.header().map(|h| h.revision()).unwrap_or_default();
                    return Ok(Deleted {
                        version: expected,
                        revision,
                    });
                }
                let current = response
                    .op_responses()
                    .into_iter()
                    .find_map(|op| match op {
                        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision()),
                        _ => None,
                    })
                    .ok_or(StoreError::NotFound)?;
                Err(StoreError::Conflict { expected, current })
            }
        }
    }

    /// Registers a replica under `lease` (its registration goes when the lease does).
    pub async fn register_replica(
        &self,
        lease: i64,
        replica: &pb::ReplicaInfo,
    ) -> Result<(), StoreError> {
        self.client
            .kv_client()
            .put(
                self.keys.replica(&replica.replica_id),
                replica.encode_to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(())
    }

    /// Removes a replica's registration (a clean shutdown).
    pub async fn deregister_replica(&self, replica_id: &str) -> Result<(), StoreError> {
        self.client
            .kv_client()
            .delete(self.keys.replica(replica_id), None)
            .await?;
        Ok(())
    }

    /// Every registered replica, sorted by replica id.
    pub async fn list_replicas(&self) -> Result<Vec<pb::ReplicaInfo>, StoreError> {
        let snapshot = self.load(&self.keys.replicas()).await?;
        Ok(snapshot
            .records
            .into_iter()
            .filter_map(|(_, record)| match record {
                Record::Replica(replica) => Some(replica),
                _ => None,
            })
            .collect())
    }

    pub async fn grant_lease(&self, ttl_secs: i64) -> Result<i64, StoreError> {
        Ok(self.client.lease_client().grant(ttl_secs, None).await?.id())
    }

    /// Keeps a lease alive until the returned handle is dropped. `lost` fires when the lease
    /// can no longer be kept (expired, or etcd unreachable for longer than the TTL).
    pub fn keep_alive(&self, lease: i64, ttl: Duration) -> LeaseGuard {
        let (lost_tx, lost_rx) = tokio::sync::watch::channel(false);
        let client = self.client.clone();
        let task = tokio::spawn(async move {
            let interval = ttl / 3;
            let mut last_ok = tokio::time::Instant::now();
            loop {
                match keep_alive_stream(client.clone(), lease, interval, &mut last_ok).await {
                    Err(StoreError::LeaseLost) => break,
                    Err(error) => {
                        tracing::warn!(lease, %error, "lease keep-alive interrupted");
                    }
                    Ok(()) => {}
                }
                if last_ok.elapsed() >= ttl {
                    break;
                }
                tokio::time::sleep(interval.min(Duration::from_millis(200))).await;
            }
            let _ = lost_tx.send(true);
        });
        LeaseGuard {
            lease,
            lost: lost_rx,
            task,
        }
    }

    /// Writes records under a lease (the agent record and its endpoints), in as few
    /// transactions as etcd allows; deletes go with them.
    /// Returns the revision of the last transaction (the mod revision of what it wrote).
    pub async fn write_leased(
        &self,
        lease: i64,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<i64, StoreError> {
        self.write_many(vec![LeasedWrite {
            lease,
            puts,
            deletes,
        }])
        .await
    }

    /// Several leased writes in as few transactions as etcd allows (group commit). The keys of
    /// the writes must be distinct.
    pub async fn write_many(&self, writes: Vec<LeasedWrite>) -> Result<i64, StoreError> {
        let mut ops: Vec<TxnOp> = Vec::new();
        for write in writes {
            let lease = write.lease;
            ops.extend(
                write
                    .puts
                    .into_iter()
                    .map(|(k, v)| TxnOp::put(k, v, Some(PutOptions::new().with_lease(lease)))),
            );
            ops.extend(write.deletes.into_iter().map(|k| TxnOp::delete(k, None)));
        }
        let mut kv = self.client.kv_client();
        let mut revision = 0;
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(MAX_TXN_OPS));
            let response = kv.txn(Txn::new().and_then(ops)).await?;
            revision = response.header().map(|h| h.revision()).unwrap_or(revision);
            ops = rest;
        }
        Ok(revision)
    }

    /// Deletes `keys` if `guard_key` still has mod revision `guard_revision`, i.e. nobody
    /// rewrote it since. Returns whether it deleted.
    pub async fn delete_if_unchanged(
        &self,
        guard_key: &str,
        guard_revision: i64,
        keys: Vec<String>,
    ) -> Result<bool, StoreError> {
        let mut kv = self.client.kv_client();
        let mut ops: Vec<TxnOp> = keys.into_iter().map(|k| TxnOp::delete(k, None)).collect();
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(MAX_TXN_OPS));
            // The guard key is deleted last, so every batch is still guarded by it.
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    guard_key.to_owned(),
                    CompareOp::Equal,
                    guard_revision,
                )])
                .and_then(ops);
            if !kv.txn(txn).await?.succeeded() {
                return Ok(false);
            }
            ops = rest;
        }
        Ok(true)
    }

    /// Writes status records (agent statuses, scale reports) under their leases and deletes
    /// those no longer reported, batched in as few transactions as etcd allows. Returns the
    /// operations of batches that failed (etcd unreachable, or the lease just expired), for
    /// the caller to retry or drop: statuses are advisory.
    pub async fn write_statuses(&self, ops: Vec<StatusOp>) -> Vec<StatusOp> {
        let mut kv = self.client.kv_client();
        let mut failed = Vec::new();
        for chunk in status_chunks(ops) {
            let txn_ops: Vec<TxnOp> = chunk
                .iter()
                .map(|op| match &op.value {
                    Some(value) => TxnOp::put(
                        op.key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(op.lease)),
                    ),
                    None => TxnOp::delete(op.key.clone(), None),
                })
                .collect();
            if let Err(error) = kv.txn(Txn::new().and_then(txn_ops)).await {
                tracing::warn!(%error, statuses = chunk.len(), "cannot write statuses");
                failed.extend(chunk);
            }
        }
        failed
    }

    /// Tries once to become the scheduler leader: creates the election key under `lease` if
    /// nobody holds it.
    pub async fn campaign(&self, replica_id: &str, lease: i64) -> Result<Campaign, StoreError> {
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                replica_id,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = self.client.kv_client().txn(txn).await?;
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        if response.succeeded() {
            return Ok(Campaign::Elected {
                elected_version: revision,
            });
        }
        match leader_from(&self.keys, &response) {
            Some(leader) => Ok(Campaign::Taken {
                leader,
                observed: revision,
            }),
            // The compare failed because the key existed, and the get ran in the same
            // transaction, so this cannot happen; campaigning again is the safe answer.
            None => Err(StoreError::NotFound),
        }
    }

    /// The current scheduler leader, if any.
    pub async fn leader(&self) -> Result<Option<LeaderRecord>, StoreError> {
        let response = self
            .client
            .kv_client()
            .get(self.keys.leader(), None)
            .await?;
        Ok(response
            .kvs()
            .first()
            .and_then(|kv| self.decode_kv(kv))
            .and_then(|(_, record)| match record {
                Record::Leader(leader) => Some(leader),
                _ => None,
            }))
    }

    /// Resolves once the election key created at `elected_version` is gone (deleted, or
    /// replaced by a newer leader), watching from `from_revision`. Errors when the watch
    /// breaks; the caller then looks again.
    pub async fn wait_leader_gone(
        &self,
        elected_version: i64,
        mut from_revision: i64,
    ) -> Result<(), StoreError> {
        loop {
            match self.watch_leader(elected_version, from_revision).await {
                Err(StoreError::Compacted(_)) => {
                    // History before the watch start is gone: look at the key itself instead.
                    let response = self
                        .client
                        .kv_client()
                        .get(self.keys.leader(), None)
                        .await?;
                    let revision = response.header().map(|h| h.revision()).unwrap_or_default();
                    let current = response.kvs().first().and_then(|kv| self.decode_kv(kv));
                    match current {
                        Some((_, Record::Leader(leader)))
                            if leader.elected_version == elected_version =>
                        {
                            from_revision = revision + 1;
                        }
                        _ => return Ok(()),
                    }
                }
                other => return other,
            }
        }
    }

    async fn watch_leader(
        &self,
        elected_version: i64,
        from_revision: i64,
    ) -> Result<(), StoreError> {
        let options = WatchOptions::new().with_start_revision(from_revision);
        let mut watch = self.start_watch(&self.keys.leader(), options).await?;
        loop {
            let batch = watch.next().await?;
            for change in batch.changes {
                match change.record {
                    Some(Record::Leader(leader)) if leader.elected_version == elected_version => {}
                    _ => return Ok(()),
                }
            }
        }
    }

    /// Revokes a lease, deleting every key it holds (resigning leadership at once).
    pub async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        self.client.lease_client().revoke(lease).await?;
        Ok(())
    }

    /// Writes placements in one transaction fenced by the election key: it applies only while
    /// the key still has create revision `elected_version` (we still lead) and every placement
    /// still has the mod revision we read. At most [`MAX_FENCED_WRITES`] writes.
    pub async fn write_placements(
        &self,
        elected_version: i64,
        writes: &[PlacementWrite],
    ) -> Result<FencedWrite, StoreError> {
        self.write_placements_traced(elected_version, writes, None)
            .await
    }

    /// [`Store::write_placements`], writing `trace` (when given) to [`Keys::change_trace`] in
    /// the same fenced transaction (it counts as one more operation).
    pub async fn write_placements_traced(
        &self,
        elected_version: i64,
        writes: &[PlacementWrite],
        trace: Option<&pb::ChangeTrace>,
    ) -> Result<FencedWrite, StoreError> {
        let leader_key = self.keys.leader();
        let mut compares = vec![Compare::create_revision(
            leader_key.clone(),
            CompareOp::Equal,
            elected_version,
        )];
        let mut ops = Vec::with_capacity(writes.len());
        for write in writes {
            let key = self.keys.placement(&write.function);
            // A missing key compares as mod revision 0.
            compares.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                write.expected_version,
            ));
            ops.push(match &write.placement {
                Some(placement) => TxnOp::put(key, placement.encode_to_vec(), None),
                None => TxnOp::delete(key, None),
            });
        }
        if let Some(trace) = trace {
            ops.push(TxnOp::put(
                self.keys.change_trace(),
                trace.encode_to_vec(),
                None,
            ));
        }
        let txn = Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else([TxnOp::get(leader_key, None)]);
        let response = self.client.kv_client().txn(txn).await?;
        if response.succeeded() {
            let revision = response.header().map(|h| h.revision()).unwrap_or_default();
            return Ok(FencedWrite::Written { revision });
        }
        match leader_from(&self.keys, &response) {
            Some(leader) if leader.elected_version == elected_version => Ok(FencedWrite::Conflict),
            _ => Ok(FencedWrite::Fenced),
        }
    }

    /// Watches everything under `prefix` from `start_revision` (inclusive).
    pub async fn watch(&self, prefix: &str, start_revision: i64) -> Result<Watch, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(start_revision);
        self.start_watch(prefix, options).await
    }

    /// Watches keys in `[start, end)` from `start_revision` (inclusive).
    pub async fn watch_range(
        &self,
        (start, end): (String, String),
        start_revision: i64,
    ) -> Result<Watch, StoreError> {
        let options = WatchOptions::new()
            .with_range(end)
            .with_prev_key()
            .with_start_revision(start_revision);
        self.start_watch(&start, options).await
    }

    async fn start_watch(&self, key: &str, options: WatchOptions) -> Result<Watch, StoreError> {
        // A watch response batches the events of a revision: a transaction of many records
        // near the spec limit is larger than tonic's 4 MiB default.
        let stream = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_READ_BYTES)
            .watch(key, Some(options))
            .await?;
        Ok(Watch {
            stream,
            keys: self.keys.clone(),
            store: self.clone(),
        })
    }
}

async fn keep_alive_stream(
    mut client: Client,
    lease: i64,
    interval: Duration,
    last_ok: &mut tokio::time::Instant,
) -> Result<(), StoreError> {
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
    loop {
        keeper.keep_alive().await?;
        match responses.message().await? {
            Some(response) if response.ttl() > 0 => *last_ok = tokio::time::Instant::now(),
            Some(_) => return Err(StoreError::LeaseLost),
            None => return Ok(()),
        }
        tokio::time::sleep(interval).await;
    }
}

/// The election key as returned by the `get` in a failed transaction's else branch.
fn leader_from(keys: &Keys, response: &etcd_client::TxnResponse) -> Option<LeaderRecord> {
    response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => {
            get.kvs()
                .first()
                .and_then(|kv| match decode(&keys.parse(kv.key())?, kv) {
                    Ok(Record::Leader(leader)) => Some(leader),
                    _ => None,
                })
        }
        _ => None,
    })
}

/// Splits status operations into transactions etcd accepts: at most [`MAX_TXN_OPS`] operations
/// and about [`MAX_TXN_BYTES`] of values each.
fn status_chunks(ops: Vec<StatusOp>) -> Vec<Vec<StatusOp>> {
    let mut chunks = Vec::new();
    let mut chunk: Vec<StatusOp> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = op.key.len() + op.value.as_ref().map_or(0, Vec::len);
        if !chunk.is_empty() && (chunk.len() >= MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES) {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.push(op);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// A status record to put under a lease (`value: Some`) or to delete (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusOp {
    pub lease: i64,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// Puts under a lease and deletes, applied together.
#[derive(Debug, Clone, Default)]
pub struct LeasedWrite {
    pub lease: i64,
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
}

impl LeasedWrite {
    pub fn ops(&self) -> usize {
        self.puts.len() + self.deletes.len()
    }
}

/// Keeps a lease alive while held; aborts the keep-alive on drop (the lease then expires).
#[derive(Debug)]
pub struct LeaseGuard {
    pub lease: i64,
    pub lost: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A watch on a prefix yielding decoded changes in revision order.
pub struct Watch {
    stream: etcd_client::WatchStream,
    keys: Keys,
    store: Store,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// The changes of one watch response and the revision they bring the watcher to.
#[derive(Debug, Default)]
pub struct WatchBatch {
    pub changes: Vec<Change>,
    /// The revision of the last change in the batch (0 if the batch is empty).
    pub revision: i64,
}

impl Watch {
    /// The next batch of changes. Errors when the stream breaks (resume from the last revision
    /// seen + 1) or when etcd compacted past where the watch started ([`StoreError::Compacted`]:
    /// reload instead).
    pub async fn next(&mut self) -> Result<WatchBatch, StoreError> {
        loop {
            let Some(response) = self.stream.message().await? else {
                return Err(StoreError::WatchClosed("stream ended".into()));
            };
            if response.compact_revision() > 0 {
                return Err(StoreError::Compacted(response.compact_revision()));
            }
            if response.canceled() {
                return Err(StoreError::WatchClosed(response.cancel_reason().to_owned()));
            }
            if response.events().is_empty() {
                // Created or progress notification.
                continue;
            }
            let mut batch = WatchBatch::default();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                batch.revision = batch.revision.max(kv.mod_revision());
                let Some(key) = self.keys.parse(kv.key()) else {
                    continue;
                };
                let previous = event
                    .prev_kv()
                    .and_then(|prev| self.store.decode_kv(prev))
                    .map(|(_, record)| record);
                let (record, undecodable) = match event.event_type() {
                    EventType::Put => match self.store.decode_entry(kv) {
                        Some(Ok((_, record))) => (Some(record), None),
                        Some(Err(skipped)) => (None, Some(skipped)),
                        None => continue,
                    },
                    EventType::Delete => (None, None),
                };
                batch.changes.push(Change {
                    key,
                    record,
                    previous,
                    revision: kv.mod_revision(),
                    undecodable,
                });
            }
            return Ok(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let keys = Keys::new("/meridian/v1");
        let f = FunctionKey {
            namespace: "default".into(),
            name: "hello".into(),
        };
        assert_eq!(keys.function(&f), "/meridian/v1/functions/default/hello");
        assert_eq!(
            keys.parse(keys.function(&f).as_bytes()),
            Some(RecordKey::Function(f.clone()))
        );
        assert_eq!(
            keys.parse(keys.endpoint(&f, "us-east", "ext-1").as_bytes()),
            Some(RecordKey::Endpoint {
                function: f,
                region: "us-east".into(),
                id: "ext-1".into()
            })
        );
        assert_eq!(
            keys.parse(keys.agent_status("eu-west", "a1").as_bytes()),
            Some(RecordKey::AgentStatus {
                region: "eu-west".into(),
                agent_id: "a1".into()
            })
        );
        assert_eq!(
            keys.parse(keys.change_trace().as_bytes()),
            Some(RecordKey::ChangeTrace)
        );
        assert!(!RecordKey::ChangeTrace.affects_routing());
        assert_eq!(
            keys.parse(keys.replica("cp-0").as_bytes()),
            Some(RecordKey::Replica {
                replica_id: "cp-0".into()
            })
        );
        assert!(!RecordKey::Replica {
            replica_id: "cp-0".into()
        }
        .affects_routing());
        // Inside the range the cache watches, so that it sees the trace with its change.
        let (start, end) = keys.routing_range();
        assert!(start <= keys.change_trace() && keys.change_trace() < end);
        assert_eq!(keys.parse(b"/meridian/v1/unknown/x"), None);
        assert_eq!(keys.parse(b"/other/functions/a/b"), None);
    }
}
