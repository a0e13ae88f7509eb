//! The verbs: each one calls the control plane and writes what `output` renders.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use meridian_proto::v1 as wire;
use thiserror::Error;
use tonic::Code;

use crate::args::{ApplyArgs, Cli, Command, GetArgs, GetResource, NamedResource, StatusArgs};
use crate::client::{ClientError, ControlPlane};
use crate::explain::{self, ExplainError};
use crate::instances::{self, ScaleSection};
use crate::logs::{self, LogsError};
use crate::manifest::{self, Document};
use crate::output::{self, Format, RegionRoutes, RoutesSection};
use crate::status::{self, StatusInput};

const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("function {name:?} not found in namespace {namespace:?}")]
    NotFound { namespace: String, name: String },
    /// `get instances NAME` for a name the scale view does not know: no such function, or it is
    /// not a process function.
    #[error("no process function {name:?} in namespace {namespace:?}")]
    NoInstances { namespace: String, name: String },
    #[error(transparent)]
    Logs(#[from] LogsError),
    #[error(transparent)]
    Explain(#[from] ExplainError),
    /// Messages already written to stderr (one per bad document); only the exit code is left.
    #[error("{count} error(s) reported")]
    Reported { count: usize },
    #[error(transparent)]
    Output(#[from] output::OutputError),
    #[error("cannot write output: {source}")]
    Write {
        #[from]
        #[source]
        source: std::io::Error,
    },
}

impl CommandError {
    /// The full line to print on stderr, kubectl style; `None` when already printed.
    pub fn message(&self) -> Option<String> {
        match self {
            CommandError::Reported { .. } => None,
            CommandError::Client(err @ ClientError::Server { .. }) => Some(err.to_string()),
            CommandError::NotFound { .. } | CommandError::NoInstances { .. } => {
                Some(format!("Error from server (NotFound): {self}"))
            }
            other => Some(format!("error: {other}")),
        }
    }
}

/// Runs one command line, writing results to `out` and per-document problems to `err`.
pub async fn run(cli: &Cli, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), CommandError> {
    let namespace = cli.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    match &cli.command {
        Command::Apply(args) => apply(cli, args, out, err).await,
        Command::Get(args) => get(cli, args, namespace, out, err).await,
        Command::Describe {
            resource: NamedResource::Function { name },
        } => describe(cli, namespace, name, out).await,
        Command::Delete {
            resource: NamedResource::Function { name },
        } => delete(cli, namespace, name, out).await,
        Command::Logs(args) => logs::run(&cli.control_plane, namespace, args, out, err).await,
        Command::Status(args) => status(cli, args, out).await,
        Command::Explain(args) => explain::run(&cli.control_plane, namespace, args, out).await,
    }
}

/// A server's answer or its error message; a connection problem ends the command (exit 1).
fn answered<T>(result: Result<T, ClientError>) -> Result<Result<T, String>, CommandError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e @ ClientError::Server { .. }) => Ok(Err(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// `status`: every section is best effort (a server error is shown and counted as a problem);
/// only an unreachable control plane fails the command. Functions of every namespace, unless
/// `-n` names one.
async fn status(cli: &Cli, args: &StatusArgs, out: &mut dyn Write) -> Result<(), CommandError> {
    let control_plane = ControlPlane::connect(&cli.control_plane).await?;
    let all_namespaces = cli.namespace.is_none();
    let namespace = cli.namespace.clone().unwrap_or_default();
    let leader = answered(control_plane.get_leader().await)?;
    let listed = answered(control_plane.list_replicas().await)?;
    let skipped_records = listed
        .as_ref()
        .map(|r| r.skipped_records.clone())
        .unwrap_or_default();
    let replicas = listed.map(|r| r.replicas);
    let agents = answered(control_plane.list_agents("").await)?.map(|r| r.agents);
    let instances = answered(
        control_plane
            .list_instances(wire::ListInstancesRequest {
                namespace: namespace.clone(),
                all_namespaces,
                name: String::new(),
                ..Default::default()
            })
            .await,
    )?
    .map(|r| r.functions);
    let functions = answered(
        control_plane
            .list_functions(wire::ListFunctionsRequest {
                namespace,
                all_namespaces,
                label_selector: String::new(),
                ..Default::default()
            })
            .await,
    )?
    .map(|r| r.functions);
    let model = status::status(&StatusInput {
        address: control_plane.address().to_string(),
        leader,
        replicas,
        skipped_records,
        agents,
        instances,
        functions,
    });
    let text = match args.output {
        Format::Table => status::status_text(&model),
        Format::Json => status::status_json(&model)?,
        Format::Yaml => status::status_yaml(&model)?,
    };
    out.write_all(text.as_bytes())?;
    Ok(())
}

/// A document of the file, resolved to the spec that will be sent.
struct Planned {
    document: Document,
    spec: wire::FunctionSpec,
}

/// `error: fn.yaml document 2 (function "x"): <message>`.
fn document_error(file: &str, doc: &Document, message: &str) -> String {
    format!(
        "error: {file} document {} (function {:?}): {message}\n",
        doc.number, doc.manifest.metadata.name
    )
}

/// The namespace a document goes to, kubectl's rule: the document's, else `-n`, else default;
/// a document and an explicit `-n` that disagree are refused.
fn resolve_namespace(doc: &Document, flag: Option<&str>) -> Result<String, String> {
    match (doc.manifest.namespace(), flag) {
        (Some(ns), Some(flag)) if ns != flag => Err(format!(
            "the namespace from the provided object {ns:?} does not match the namespace \
             {flag:?}. You must pass '--namespace={ns}' to perform this operation."
        )),
        (Some(ns), _) => Ok(ns.to_string()),
        (None, Some(flag)) => Ok(flag.to_string()),
        (None, None) => Ok(DEFAULT_NAMESPACE.to_string()),
    }
}

/// Everything is validated (parsed, then dry-run on the server) before anything is written, so
/// that a file with one bad document changes nothing.
async fn apply(
    cli: &Cli,
    args: &ApplyArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CommandError> {
    let file = if args.file == "-" {
        "<stdin>"
    } else {
        args.file.as_str()
    };
    let documents = match manifest::read(&args.file) {
        Ok(documents) => documents,
        Err(errors) => {
            for e in &errors {
                writeln!(err, "error: {e}")?;
            }
            return Err(CommandError::Reported {
                count: errors.len(),
            });
        }
    };

    let mut errors = Vec::new();
    let mut planned = Vec::new();
    for document in documents {
        match resolve_namespace(&document, cli.namespace.as_deref()) {
            Ok(namespace) => {
                let spec = document.manifest.to_spec(&namespace);
                planned.push(Planned { document, spec });
            }
            Err(message) => errors.push(document_error(file, &document, &message)),
        }
    }
    if !errors.is_empty() {
        return report(err, &errors);
    }

    let control_plane = ControlPlane::connect(&cli.control_plane).await?;
    let mut dry_runs = Vec::new();
    for plan in &planned {
        match apply_one(&control_plane, plan, true).await? {
            Ok(response) => dry_runs.push(response),
            Err(e) => errors.push(document_error(file, &plan.document, &e)),
        }
    }
    if !errors.is_empty() {
        return report(err, &errors);
    }
    if args.dry_run {
        for (plan, response) in planned.iter().zip(&dry_runs) {
            out.write_all(output::apply_line(&plan.spec.name, response.outcome, true).as_bytes())?;
        }
        return Ok(());
    }

    // Another client may change things between the dry run and now; keep going with the other
    // documents, as kubectl does, and fail at the end.
    for plan in &planned {
        match apply_one(&control_plane, plan, false).await? {
            Ok(response) => {
                out.write_all(
                    output::apply_line(&plan.spec.name, response.outcome, false).as_bytes(),
                )?;
                out.flush()?;
            }
            Err(e) => {
                let line = document_error(file, &plan.document, &e);
                err.write_all(line.as_bytes())?;
                errors.push(line);
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CommandError::Reported {
            count: errors.len(),
        })
    }
}

/// Applies one document. An answer from the server about this document becomes its message
/// (`Ok(Err(message))`); a connection problem ends the whole command (`Err`).
async fn apply_one(
    control_plane: &ControlPlane,
    plan: &Planned,
    dry_run: bool,
) -> Result<Result<wire::ApplyFunctionResponse, String>, CommandError> {
    let request = wire::ApplyFunctionRequest {
        spec: Some(plan.spec.clone()),
        expected_version: 0,
        dry_run,
    };
    match control_plane.apply(request).await {
        Ok(response) => Ok(Ok(response)),
        // The server's message names the field (`spec.placement.regions[1].maxInstances: ...`).
        Err(ClientError::Server { status }) if status.code() == Code::InvalidArgument => {
            Ok(Err(status.message().to_string()))
        }
        Err(e @ ClientError::Server { .. }) => Ok(Err(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

fn report(err: &mut dyn Write, lines: &[String]) -> Result<(), CommandError> {
    for line in lines {
        err.write_all(line.as_bytes())?;
    }
    Err(CommandError::Reported { count: lines.len() })
}

fn not_found(e: ClientError, namespace: &str, name: &str) -> CommandError {
    if e.server_code() == Some(Code::NotFound) {
        CommandError::NotFound {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    } else {
        CommandError::Client(e)
    }
}

async fn get(
    cli: &Cli,
    args: &GetArgs,
    namespace: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CommandError> {
    let control_plane = ControlPlane::connect(&cli.control_plane).await?;
    let text = match &args.resource {
        GetResource::Functions {
            name: Some(name), ..
        } => {
            let function = control_plane
                .get_function(namespace, name)
                .await
                .map_err(|e| not_found(e, namespace, name))?;
            match args.output {
                Format::Table => output::functions_table(std::slice::from_ref(&function), false),
                Format::Json => output::function_json(&function)?,
                Format::Yaml => output::functions_yaml(std::slice::from_ref(&function))?,
            }
        }
        GetResource::Functions {
            name: None,
            all_namespaces,
            selector,
        } => {
            let response = control_plane
                .list_functions(wire::ListFunctionsRequest {
                    namespace: namespace.to_string(),
                    all_namespaces: *all_namespaces,
                    label_selector: selector.clone().unwrap_or_default(),
                    ..Default::default()
                })
                .await?;
            let functions = &response.functions;
            match args.output {
                Format::Table if functions.is_empty() => {
                    if *all_namespaces {
                        writeln!(err, "No resources found")?;
                    } else {
                        writeln!(err, "No resources found in {namespace} namespace.")?;
                    }
                    String::new()
                }
                Format::Table => output::functions_table(functions, *all_namespaces),
                Format::Json => output::functions_json(functions)?,
                Format::Yaml => output::functions_yaml(functions)?,
            }
        }
        GetResource::Instances {
            name,
            all_namespaces,
        } => {
            let response = control_plane
                .list_instances(wire::ListInstancesRequest {
                    namespace: namespace.to_string(),
                    all_namespaces: *all_namespaces,
                    name: name.clone().unwrap_or_default(),
                    ..Default::default()
                })
                .await;
            let response = match (response, name) {
                (Err(e), Some(name)) if e.server_code() == Some(Code::NotFound) => {
                    return Err(no_instances(namespace, name))
                }
                (Ok(r), Some(name)) if r.functions.is_empty() => {
                    return Err(no_instances(namespace, name))
                }
                (response, _) => response?,
            };
            match args.output {
                Format::Table if response.functions.is_empty() => {
                    if *all_namespaces {
                        writeln!(err, "No resources found")?;
                    } else {
                        writeln!(err, "No resources found in {namespace} namespace.")?;
                    }
                    String::new()
                }
                Format::Table => {
                    instances::instances_table(&response.functions, *all_namespaces, now_unix_ms())
                }
                Format::Json => instances::instances_json(&response)?,
                Format::Yaml => instances::instances_yaml(&response)?,
            }
        }
        GetResource::Agents { region } => {
            let region = region.as_deref().unwrap_or("");
            let response = control_plane.list_agents(region).await?;
            match args.output {
                Format::Table if response.agents.is_empty() => {
                    if region.is_empty() {
                        writeln!(err, "No agents found")?;
                    } else {
                        writeln!(err, "No agents found in region {region}.")?;
                    }
                    String::new()
                }
                Format::Table => output::agents_table(&response.agents, now_unix_ms()),
                Format::Json => output::agents_json(&response)?,
                Format::Yaml => output::agents_yaml(&response)?,
            }
        }
        GetResource::Routes { region } => {
            let routing = control_plane.routing_table(region).await?;
            match args.output {
                Format::Table => output::routes_table(&routing),
                Format::Json => output::routes_json(&routing)?,
                Format::Yaml => output::routes_yaml(&routing)?,
            }
        }
    };
    out.write_all(text.as_bytes())?;
    Ok(())
}

async fn describe(
    cli: &Cli,
    namespace: &str,
    name: &str,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let control_plane = ControlPlane::connect(&cli.control_plane).await?;
    let function = control_plane
        .get_function(namespace, name)
        .await
        .map_err(|e| not_found(e, namespace, name))?;
    let routes = routes_of(&control_plane, &function).await;
    let scale = scale_of(&control_plane, &function, namespace).await;
    out.write_all(output::describe_function(&function, &routes, &scale, now_unix_ms()).as_bytes())?;
    Ok(())
}

fn no_instances(namespace: &str, name: &str) -> CommandError {
    CommandError::NoInstances {
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

/// The placement and scale state of a process function. Best effort, like the routes.
async fn scale_of(
    control_plane: &ControlPlane,
    function: &wire::Function,
    namespace: &str,
) -> ScaleSection {
    let Some(spec) = &function.spec else {
        return ScaleSection::NotProcess;
    };
    if !matches!(spec.runtime, Some(wire::function_spec::Runtime::Process(_))) {
        return ScaleSection::NotProcess;
    }
    let response = control_plane
        .list_instances(wire::ListInstancesRequest {
            namespace: namespace.to_string(),
            all_namespaces: false,
            name: spec.name.clone(),
            ..Default::default()
        })
        .await;
    match response {
        Ok(response) => {
            ScaleSection::Instances(response.functions.into_iter().find(|f| f.name == spec.name))
        }
        Err(e) if e.server_code() == Some(Code::NotFound) => ScaleSection::Instances(None),
        Err(e) => ScaleSection::Unavailable(e.to_string()),
    }
}

/// The routing table of every region that has agents or that the spec names. Best effort: the
/// spec is worth showing even when the mesh view is not.
async fn routes_of(control_plane: &ControlPlane, function: &wire::Function) -> RoutesSection {
    let agents = match control_plane.list_agents("").await {
        Ok(response) => response.agents,
        Err(e) => return RoutesSection::Unavailable(e.to_string()),
    };
    let mut regions: BTreeSet<String> = agents.into_iter().map(|a| a.region).collect();
    if let Some(spec) = &function.spec {
        if let Some(wire::function_spec::Runtime::External(e)) = &spec.runtime {
            regions.extend(e.regions.iter().map(|r| r.region.clone()));
        }
        if let Some(placement) = &spec.placement {
            regions.extend(placement.regions.iter().map(|r| r.region.clone()));
        }
    }
    regions.retain(|r| !r.is_empty());
    let mut out = Vec::new();
    for region in regions {
        let table = match control_plane.routing_table(&region).await {
            Ok(table) => Ok(table),
            Err(e) if e.server_code() == Some(Code::NotFound) => {
                Err("no routing table".to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        out.push(RegionRoutes { region, table });
    }
    RoutesSection::Regions(out)
}

async fn delete(
    cli: &Cli,
    namespace: &str,
    name: &str,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let control_plane = ControlPlane::connect(&cli.control_plane).await?;
    control_plane
        .delete_function(namespace, name)
        .await
        .map_err(|e| not_found(e, namespace, name))?;
    out.write_all(output::delete_line(name).as_bytes())?;
    Ok(())
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
