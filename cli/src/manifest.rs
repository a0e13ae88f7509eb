//! Function manifests, kubectl style: reading YAML or JSON files of one or more documents into
//! wire `FunctionSpec`s, and writing stored functions back in the same shape.
//!
//! The shape is the wire `FunctionSpec` with its JSON (lowerCamelCase) names under `metadata` and
//! `spec`, so that the field paths in the server's errors (`spec.placement.regions[1].maxInstances`)
//! are the ones the user wrote. Durations are strings ("15s") here and `*_ms` integers on the wire.
//! Every struct denies unknown fields: a typo must fail loudly rather than fall back to a default.
//! The server does the authoritative validation; this module checks only the shape.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use meridian_proto::v1 as wire;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use thiserror::Error;

use crate::duration;

/// The only apiVersion meridianctl reads and writes.
pub const API_VERSION: &str = "meridian.dev/v1";
/// The only kind there is so far.
pub const KIND_FUNCTION: &str = "Function";

/// Why a manifest file could not be turned into documents. `Display` gives the whole message,
/// starting with the file name, e.g.
/// `fn.yaml: document 2: spec.routing: unknown field `timeoutt`, expected ... at line 14 column 5`.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {context}{source}")]
    Yaml {
        file: String,
        /// "document N: " (empty when the error is not inside one document).
        context: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{file}: {context}{source}")]
    Json {
        file: String,
        /// "document N: " and the field path, e.g. "document 2: spec.routing: ".
        context: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: no documents found")]
    Empty { file: String },
}

/// One document of a manifest file, with its 1-based position in the file for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub number: usize,
    pub manifest: Manifest,
}

/// A Function resource as users write it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub api_version: ApiVersion,
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: Spec,
    /// Written by `get -o yaml|json` so that output can be applied again; ignored on apply
    /// because the server owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// `apiVersion`, checked while parsing so that the error carries a line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApiVersion;

/// `kind`, checked while parsing so that the error carries a line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kind;

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "StringMap::is_empty")]
    pub labels: StringMap,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    // YAML would otherwise want enum variants as tags (`!external`); users write the map form.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "serde_yaml_ng::with::singleton_map"
    )]
    pub runtime: Option<Runtime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
}

/// `runtime: {process: {...}}` or `runtime: {external: {...}}` (the wire oneof).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Runtime {
    Process(ProcessRuntime),
    External(ExternalRuntime),
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessRuntime {
    pub command: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "StringMap::is_empty")]
    pub env: StringMap,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalRuntime {
    #[serde(default)]
    pub regions: Vec<ExternalRegion>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalRegion {
    pub region: String,
    #[serde(default)]
    pub urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_regions: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<RegionPlacement>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegionPlacement {
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_instances: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scaling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_instances: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Routing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retryable_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_order: Vec<String>,
}

/// Server-owned fields shown by `get -o yaml|json`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Status {
    #[serde(default)]
    pub version: i64,
    #[serde(default)]
    pub created_version: i64,
}

/// A duration written as a string ("500ms", "15s", "2m"), held in whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Millis(pub u32);

/// A string-to-string map that refuses duplicate keys (serde's maps keep the last one silently)
/// and keeps its keys sorted for stable output.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct StringMap(pub BTreeMap<String, String>);

impl StringMap {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Accepts only one exact string, so that a wrong `apiVersion`/`kind` is a located parse error.
struct ExactString {
    expected: &'static str,
    what: &'static str,
}

impl Visitor<'_> for ExactString {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "the string {:?}", self.expected)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if v == self.expected {
            Ok(())
        } else {
            Err(E::custom(format!(
                "unsupported {} {v:?}, expected {:?}",
                self.what, self.expected
            )))
        }
    }
}

impl<'de> Deserialize<'de> for ApiVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ExactString {
            expected: API_VERSION,
            what: "apiVersion",
        })
        .map(|()| ApiVersion)
    }
}

impl Serialize for ApiVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(API_VERSION)
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ExactString {
            expected: KIND_FUNCTION,
            what: "kind",
        })
        .map(|()| Kind)
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(KIND_FUNCTION)
    }
}

struct MillisVisitor;

impl Visitor<'_> for MillisVisitor {
    type Value = Millis;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration string such as \"500ms\", \"15s\" or \"2m\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Millis, E> {
        duration::parse_ms(v).map(Millis).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(MillisVisitor)
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&duration::format_ms(self.0))
    }
}

struct StringMapVisitor;

impl<'de> Visitor<'de> for StringMapVisitor {
    type Value = StringMap;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of strings to strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMap, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<String>()?;
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
            }
            out.insert(key, value);
        }
        Ok(StringMap(out))
    }
}

impl<'de> Deserialize<'de> for StringMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(StringMapVisitor)
    }
}

/// Reads `path` (`-` is standard input) and parses its documents; see [`parse`].
pub fn read(path: &str) -> Result<Vec<Document>, Vec<ManifestError>> {
    let (file, text) = if path == "-" {
        let file = "<stdin>".to_string();
        match std::io::read_to_string(std::io::stdin()) {
            Ok(text) => (file, text),
            Err(source) => return Err(vec![ManifestError::Read { file, source }]),
        }
    } else {
        let file = path.to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => (file, text),
            Err(source) => return Err(vec![ManifestError::Read { file, source }]),
        }
    };
    parse(&file, &text)
}

/// Parses every document of a file. `file` names it in errors and decides the format together
/// with the content: JSON for a `.json` name or text starting with `{` or `[` (an array holds
/// several documents), YAML otherwise (`---` separates documents; empty ones are skipped).
///
/// Returns every error it can find: all bad YAML documents, not only the first.
pub fn parse(file: &str, text: &str) -> Result<Vec<Document>, Vec<ManifestError>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first = text.trim_start().chars().next();
    let is_json_name = Path::new(file)
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
    let documents = if is_json_name || matches!(first, Some('{' | '[')) {
        parse_json(file, text).map_err(|e| vec![e])?
    } else {
        parse_yaml(file, text)?
    };
    if documents.is_empty() {
        return Err(vec![ManifestError::Empty {
            file: file.to_string(),
        }]);
    }
    Ok(documents)
}

fn parse_yaml(file: &str, text: &str) -> Result<Vec<Document>, Vec<ManifestError>> {
    // A syntax error leaves the YAML parser failing for good, and its document iterator would
    // then yield failing documents forever. So first find how many documents are well-formed,
    // then deserialize only those.
    let mut well_formed = 0;
    let mut syntax_error = None;
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        match de::IgnoredAny::deserialize(doc) {
            Ok(_) => well_formed += 1,
            Err(source) => {
                syntax_error = Some(source);
                break;
            }
        }
    }

    let mut documents = Vec::new();
    let mut errors = Vec::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text)
        .take(well_formed)
        .enumerate()
    {
        let number = index + 1;
        match Option::<Manifest>::deserialize(doc) {
            Ok(Some(manifest)) => documents.push(Document { number, manifest }),
            Ok(None) => {} // an empty document, e.g. after a trailing `---`
            Err(source) => errors.push(ManifestError::Yaml {
                file: file.to_string(),
                context: format!("document {number}: "),
                source,
            }),
        }
    }
    if let Some(source) = syntax_error {
        errors.push(ManifestError::Yaml {
            file: file.to_string(),
            context: format!("document {}: ", well_formed + 1),
            source,
        });
    }
    if errors.is_empty() {
        Ok(documents)
    } else {
        Err(errors)
    }
}

fn parse_json(file: &str, text: &str) -> Result<Vec<Document>, ManifestError> {
    let json_error = |context: String, source| ManifestError::Json {
        file: file.to_string(),
        context,
        source,
    };
    // An untagged enum would buffer the input and lose line numbers, so pick the shape first.
    let is_array = text.trim_start().starts_with('[');
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = if is_array {
        serde_path_to_error::deserialize::<_, Vec<Manifest>>(&mut de)
    } else {
        serde_path_to_error::deserialize::<_, Manifest>(&mut de).map(|one| vec![one])
    };
    let manifests = match parsed {
        Ok(manifests) => manifests,
        Err(err) => {
            let path = err.path().clone();
            let source = err.into_inner();
            let mut segments: Vec<&serde_path_to_error::Segment> = path.iter().collect();
            // The path ends at the offending key for unknown and duplicate fields; name the
            // object holding it instead, as the YAML errors do.
            if let Some(serde_path_to_error::Segment::Map { key }) = segments.last() {
                let message = source.to_string();
                let about_key =
                    message.starts_with("unknown field") || message.starts_with("duplicate field");
                if about_key && message.contains(&format!("`{key}`")) {
                    segments.pop();
                }
            }
            let mut segments = segments.into_iter().peekable();
            // In an array the first segment is the document's index.
            let number = match (is_array, segments.peek()) {
                (true, Some(serde_path_to_error::Segment::Seq { index })) => {
                    let number = index + 1;
                    segments.next();
                    Some(number)
                }
                (true, _) => None,
                (false, _) => Some(1),
            };
            let mut context = number.map_or_else(String::new, |n| format!("document {n}: "));
            let field = json_path(segments);
            if !field.is_empty() {
                context.push_str(&field);
                context.push_str(": ");
            }
            return Err(json_error(context, source));
        }
    };
    if let Err(source) = de.end() {
        return Err(json_error(String::new(), source));
    }
    Ok(manifests
        .into_iter()
        .enumerate()
        .map(|(index, manifest)| Document {
            number: index + 1,
            manifest,
        })
        .collect())
}

/// Formats path segments like the server does: `spec.placement.regions[1].maxInstances`.
fn json_path<'a>(segments: impl Iterator<Item = &'a serde_path_to_error::Segment>) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

impl Manifest {
    /// The namespace the document names, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.metadata
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
    }

    /// The wire spec, in `namespace` (the caller resolves the document's against `-n`).
    pub fn to_spec(&self, namespace: &str) -> wire::FunctionSpec {
        let spec = &self.spec;
        wire::FunctionSpec {
            name: self.metadata.name.clone(),
            namespace: namespace.to_string(),
            labels: self.metadata.labels.0.clone().into_iter().collect(),
            runtime: spec.runtime.as_ref().map(|runtime| match runtime {
                Runtime::Process(p) => {
                    wire::function_spec::Runtime::Process(wire::ProcessRuntime {
                        command: p.command.clone(),
                        args: p.args.clone(),
                        env: p.env.0.clone().into_iter().collect(),
                        readiness_path: p.readiness_path.clone().unwrap_or_default(),
                    })
                }
                Runtime::External(e) => {
                    wire::function_spec::Runtime::External(wire::ExternalRuntime {
                        regions: e
                            .regions
                            .iter()
                            .map(|r| wire::ExternalRegion {
                                region: r.region.clone(),
                                urls: r.urls.clone(),
                            })
                            .collect(),
                    })
                }
            }),
            placement: spec.placement.as_ref().map(|p| wire::Placement {
                all_regions: p.all_regions.unwrap_or(false),
                regions: p
                    .regions
                    .iter()
                    .map(|r| wire::RegionPlacement {
                        region: r.region.clone(),
                        min_instances: r.min_instances,
                        max_instances: r.max_instances,
                    })
                    .collect(),
            }),
            scaling: spec.scaling.as_ref().map(|s| wire::Scaling {
                min_instances: s.min_instances,
                max_instances: s.max_instances,
                target_concurrency: s.target_concurrency,
                idle_seconds: s.idle_seconds,
            }),
            routing: spec.routing.as_ref().map(|r| wire::RoutingPolicy {
                timeout_ms: r.timeout.map(|d| d.0),
                per_try_timeout_ms: r.per_try_timeout.map(|d| d.0),
                max_retries: r.max_retries,
                retryable_methods: r.retryable_methods.clone(),
                failover_order: r.failover_order.clone(),
            }),
        }
    }

    /// A stored function in manifest shape, with its versions under `status`.
    pub fn from_function(function: &wire::Function) -> Manifest {
        let mut manifest = function
            .spec
            .as_ref()
            .map(Manifest::from_spec)
            .unwrap_or_else(|| Manifest::from_spec(&wire::FunctionSpec::default()));
        manifest.status = Some(Status {
            version: function.version,
            created_version: function.created_version,
        });
        manifest
    }

    /// A wire spec in manifest shape. Stored specs are normalized (defaults filled in), so the
    /// output is a complete record that applies back to the same spec.
    pub fn from_spec(spec: &wire::FunctionSpec) -> Manifest {
        let namespace = if spec.namespace.is_empty() {
            "default".to_string()
        } else {
            spec.namespace.clone()
        };
        Manifest {
            api_version: ApiVersion,
            kind: Kind,
            metadata: Metadata {
                name: spec.name.clone(),
                namespace: Some(namespace),
                labels: StringMap(spec.labels.clone().into_iter().collect()),
            },
            spec: Spec {
                runtime: spec.runtime.as_ref().map(|runtime| match runtime {
                    wire::function_spec::Runtime::Process(p) => Runtime::Process(ProcessRuntime {
                        command: p.command.clone(),
                        args: p.args.clone(),
                        env: StringMap(p.env.clone().into_iter().collect()),
                        readiness_path: Some(p.readiness_path.clone()).filter(|s| !s.is_empty()),
                    }),
                    wire::function_spec::Runtime::External(e) => {
                        Runtime::External(ExternalRuntime {
                            regions: e
                                .regions
                                .iter()
                                .map(|r| ExternalRegion {
                                    region: r.region.clone(),
                                    urls: r.urls.clone(),
                                })
                                .collect(),
                        })
                    }
                }),
                placement: spec.placement.as_ref().map(|p| Placement {
                    all_regions: p.all_regions.then_some(true),
                    regions: p
                        .regions
                        .iter()
                        .map(|r| RegionPlacement {
                            region: r.region.clone(),
                            min_instances: r.min_instances,
                            max_instances: r.max_instances,
                        })
                        .collect(),
                }),
                scaling: spec.scaling.as_ref().map(|s| Scaling {
                    min_instances: s.min_instances,
                    max_instances: s.max_instances,
                    target_concurrency: s.target_concurrency,
                    idle_seconds: s.idle_seconds,
                }),
                routing: spec.routing.as_ref().map(|r| Routing {
                    timeout: r.timeout_ms.map(Millis),
                    per_try_timeout: r.per_try_timeout_ms.map(Millis),
                    max_retries: r.max_retries,
                    retryable_methods: r.retryable_methods.clone(),
                    failover_order: r.failover_order.clone(),
                }),
            },
            status: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(file: &str, text: &str) -> Vec<String> {
        match parse(file, text) {
            Ok(docs) => panic!("expected errors, parsed {docs:?}"),
            Err(errs) => errs.iter().map(ToString::to_string).collect(),
        }
    }

    const TWO_DOCS: &str = "\
apiVersion: meridian.dev/v1
kind: Function
metadata:
  name: hello
  namespace: default
  labels: {team: web}
spec:
  runtime:
    external:
      regions:
        - region: us-east
          urls: [\"http://127.0.1.1:9000\"]
  placement: {allRegions: true}
  scaling: {minInstances: 0, maxInstances: 10, targetConcurrency: 10, idleSeconds: 300}
  routing:
    timeout: 15s
    perTryTimeout: 500ms
    maxRetries: 2
    retryableMethods: [POST]
    failoverOrder: [eu-west, ap-south]
---
apiVersion: meridian.dev/v1
kind: Function
metadata: {name: worker}
spec:
  runtime:
    process:
      command: /usr/bin/worker
      args: [--port, \"8080\"]
      env: {MODE: fast}
      readinessPath: /healthz
  placement:
    regions:
      - {region: us-east, minInstances: 1, maxInstances: 3}
---
";

    #[test]
    fn multi_document_yaml() {
        let docs = parse("fn.yaml", TWO_DOCS).expect("parses");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].number, 1);
        assert_eq!(docs[1].number, 2);

        let hello = docs[0].manifest.to_spec("default");
        assert_eq!(hello.name, "hello");
        assert_eq!(hello.labels.get("team").map(String::as_str), Some("web"));
        let routing = hello.routing.expect("routing");
        assert_eq!(routing.timeout_ms, Some(15_000));
        assert_eq!(routing.per_try_timeout_ms, Some(500));
        assert_eq!(routing.max_retries, Some(2));
        assert_eq!(routing.failover_order, ["eu-west", "ap-south"]);
        assert!(hello.placement.expect("placement").all_regions);
        match hello.runtime {
            Some(wire::function_spec::Runtime::External(e)) => {
                assert_eq!(e.regions[0].region, "us-east");
                assert_eq!(e.regions[0].urls, ["http://127.0.1.1:9000"]);
            }
            other => panic!("runtime {other:?}"),
        }

        let worker = &docs[1].manifest;
        assert_eq!(worker.namespace(), None);
        let spec = worker.to_spec("staging");
        assert_eq!(spec.namespace, "staging");
        match spec.runtime {
            Some(wire::function_spec::Runtime::Process(p)) => {
                assert_eq!(p.command, "/usr/bin/worker");
                assert_eq!(p.args, ["--port", "8080"]);
                assert_eq!(p.env.get("MODE").map(String::as_str), Some("fast"));
                assert_eq!(p.readiness_path, "/healthz");
            }
            other => panic!("runtime {other:?}"),
        }
        let placement = spec.placement.expect("placement");
        assert_eq!(placement.regions[0].min_instances, Some(1));
        assert_eq!(placement.regions[0].max_instances, Some(3));
    }

    #[test]
    fn json_object_and_array() {
        let one = r#"{"apiVersion": "meridian.dev/v1", "kind": "Function",
            "metadata": {"name": "a"}, "spec": {"routing": {"timeout": "2m"}}}"#;
        let docs = parse("fn.txt", one).expect("object parses");
        assert_eq!(docs.len(), 1);
        let routing = docs[0]
            .manifest
            .to_spec("default")
            .routing
            .expect("routing");
        assert_eq!(routing.timeout_ms, Some(120_000));
        assert_eq!(routing.per_try_timeout_ms, None);

        let many = format!("[{one}, {}]", one.replace("\"a\"", "\"b\""));
        let docs = parse("fns", &many).expect("array parses");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].number, 2);
        assert_eq!(docs[1].manifest.metadata.name, "b");
    }

    #[test]
    fn json_by_extension_reports_json_errors() {
        // Starts like YAML, but the name says JSON.
        let errs = errors("fn.json", "apiVersion: x");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("fn.json: document 1: "), "{}", errs[0]);
        assert!(errs[0].contains("at line 1 column 1"), "{}", errs[0]);
    }

    #[test]
    fn yaml_unknown_field_has_document_path_line_and_column() {
        let text = TWO_DOCS.replace("    maxRetries: 2", "    maxRetries: 2\n    timeoutt: 3s");
        let second = text.replace(
            "metadata: {name: worker}",
            "metadata: {name: worker, nam: x}",
        );
        let errs = errors("fn.yaml", &second);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with(
                "fn.yaml: document 1: spec.routing: unknown field `timeoutt`, expected one of"
            ),
            "{}",
            errs[0]
        );
        assert!(errs[0].ends_with("at line 19 column 5"), "{}", errs[0]);
        assert!(
            errs[1].starts_with("fn.yaml: document 2: metadata: unknown field `nam`"),
            "{}",
            errs[1]
        );
        assert!(errs[1].contains("at line 25 column"), "{}", errs[1]);
    }

    #[test]
    fn json_unknown_field_has_path_line_and_column() {
        let text = "[\n{\"apiVersion\": \"meridian.dev/v1\", \"kind\": \"Function\", \"metadata\": {\"name\": \"a\"}, \"spec\": {}},\n{\"apiVersion\": \"meridian.dev/v1\", \"kind\": \"Function\", \"metadata\": {\"name\": \"b\"},\n \"spec\": {\"placement\": {\"regions\": [{\"region\": \"x\"}, {\"region\": \"y\", \"maxInstance\": 3}]}}}\n]";
        let errs = errors("fn.json", text);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with(
                "fn.json: document 2: spec.placement.regions[1]: unknown field `maxInstance`"
            ),
            "{}",
            errs[0]
        );
        assert!(errs[0].ends_with("at line 4 column 82"), "{}", errs[0]);
    }

    #[test]
    fn bad_duration_names_the_field() {
        let text = TWO_DOCS.replace("perTryTimeout: 500ms", "perTryTimeout: 5 seconds");
        let errs = errors("fn.yaml", &text);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with(
                "fn.yaml: document 1: spec.routing.perTryTimeout: invalid duration \"5 seconds\""
            ),
            "{}",
            errs[0]
        );
        assert!(errs[0].contains("at line 17 column"), "{}", errs[0]);

        let text = TWO_DOCS.replace("timeout: 15s", "timeout: 15");
        let errs = errors("fn.yaml", &text);
        assert!(
            errs[0].contains("spec.routing.timeout: invalid duration \"15\": expected a number followed by a unit"),
            "{}",
            errs[0]
        );

        let json = r#"{"apiVersion": "meridian.dev/v1", "kind": "Function",
            "metadata": {"name": "a"}, "spec": {"routing": {"timeout": "15x"}}}"#;
        let errs = errors("fn.json", json);
        assert!(
            errs[0].starts_with("fn.json: document 1: spec.routing.timeout: invalid duration \"15x\": unknown unit \"x\""),
            "{}",
            errs[0]
        );
        assert!(errs[0].contains("at line 2 column"), "{}", errs[0]);
    }

    #[test]
    fn wrong_kind_and_api_version() {
        let text = TWO_DOCS.replacen("kind: Function", "kind: Deployment", 1);
        let errs = errors("fn.yaml", &text);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with(
                "fn.yaml: document 1: kind: unsupported kind \"Deployment\", expected \"Function\" at line 2"
            ),
            "{}",
            errs[0]
        );

        let text = TWO_DOCS.replace(
            "apiVersion: meridian.dev/v1\nkind: Function\nmetadata: {",
            "apiVersion: v1\nkind: Function\nmetadata: {",
        );
        let errs = errors("fn.yaml", &text);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("fn.yaml: document 2: apiVersion: unsupported apiVersion \"v1\", expected \"meridian.dev/v1\" at line 22"),
            "{}",
            errs[0]
        );

        let errs = errors("fn.yaml", "kind: Function\nmetadata: {name: a}\nspec: {}\n");
        assert!(
            errs[0].contains("missing field `apiVersion`"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let text = "apiVersion: meridian.dev/v1\nkind: Function\nmetadata:\n  name: a\n  name: b\nspec: {}\n";
        let errs = errors("fn.yaml", text);
        assert!(errs[0].contains("duplicate field `name`"), "{}", errs[0]);
        assert!(errs[0].contains("at line"), "{}", errs[0]);

        let text = "apiVersion: meridian.dev/v1\nkind: Function\nmetadata:\n  name: a\n  labels:\n    team: web\n    team: ops\nspec: {}\n";
        let errs = errors("fn.yaml", text);
        assert!(
            errs[0].starts_with("fn.yaml: document 1: metadata.labels: duplicate key `team`"),
            "{}",
            errs[0]
        );

        let json = r#"{"apiVersion": "meridian.dev/v1", "kind": "Function",
            "metadata": {"name": "a", "labels": {"x": "1", "x": "2"}}, "spec": {}}"#;
        let errs = errors("fn.json", json);
        assert!(
            errs[0].starts_with("fn.json: document 1: metadata.labels: duplicate key `x`"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn syntax_error_stops_after_the_good_documents() {
        let text = format!("{TWO_DOCS}apiVersion: [unclosed\n");
        let errs = errors("fn.yaml", &text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("fn.yaml: document 3: "), "{}", errs[0]);
        assert!(errs[0].contains("line"), "{}", errs[0]);
    }

    #[test]
    fn empty_input_is_an_error() {
        assert_eq!(errors("fn.yaml", ""), ["fn.yaml: no documents found"]);
        assert_eq!(
            errors("fn.yaml", "---\n# nothing\n---\n"),
            ["fn.yaml: no documents found"]
        );
        assert_eq!(errors("fn.json", "[]"), ["fn.json: no documents found"]);
    }

    #[test]
    fn runtime_must_be_a_known_variant() {
        let text = "apiVersion: meridian.dev/v1\nkind: Function\nmetadata: {name: a}\nspec:\n  runtime:\n    docker: {image: x}\n";
        let errs = errors("fn.yaml", text);
        assert!(
            errs[0].contains(
                "spec.runtime: unknown variant `docker`, expected `process` or `external`"
            ),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn output_shape_round_trips_through_the_parser() {
        let docs = parse("fn.yaml", TWO_DOCS).expect("parses");
        for doc in docs {
            let spec = doc.manifest.to_spec("default");
            let function = wire::Function {
                spec: Some(spec.clone()),
                version: 7,
                created_version: 3,
            };
            let manifest = Manifest::from_function(&function);
            let yaml = serde_yaml_ng::to_string(&manifest).expect("serializes");
            let back = parse("out.yaml", &yaml).expect("reparses");
            assert_eq!(back[0].manifest.to_spec("default"), spec);
            let json = serde_json::to_string_pretty(&manifest).expect("serializes");
            let back = parse("out", &json).expect("reparses");
            assert_eq!(back[0].manifest.to_spec("default"), spec);
        }
    }
}
