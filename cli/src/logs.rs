//! `meridianctl logs`: finds the agents that may run a function (MeshService.ListAgents), dials
//! each one's AgentApiService at the API address it advertised, and merges their Logs streams
//! into lines prefixed `[<region>/<instance>] `.
//!
//! Instances run on agents, not on the control plane, so there is no single place to ask: every
//! agent (of `--region`, if given) is asked, and one that cannot be reached is reported and
//! skipped rather than failing the command.

use std::io::Write;

use meridian_proto::v1 as wire;
use meridian_proto::v1::agent_api_service_client::AgentApiServiceClient;
use thiserror::Error;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::args::LogsArgs;
use crate::client::{dial, error_chain, normalize_address, reason, ControlPlane};
use crate::commands::CommandError;
use crate::instances::log_text;

/// Lines buffered between the agents' streams and the terminal; a slow terminal slows the
/// streams (HTTP/2 flow control) instead of growing memory.
const LINE_BUFFER: usize = 1024;

#[derive(Debug, Error)]
pub enum LogsError {
    #[error("no agents are connected{}", in_region(.region.as_deref()))]
    NoAgents { region: Option<String> },
    #[error(
        "none of the {count} agent(s){} advertises an API address (agent flag --api-address), \
         so no logs can be fetched",
        in_region(.region.as_deref())
    )]
    NoApiAddress {
        count: usize,
        region: Option<String>,
    },
    /// Every agent failed; a warning per agent said why.
    #[error("no agent answered ({count} asked)")]
    NoAnswer { count: usize },
    #[error(
        "no agent{} has {what} (running, or exited in the last 10 minutes)",
        in_region(.region.as_deref())
    )]
    NotFound {
        what: String,
        region: Option<String>,
    },
}

fn in_region(region: Option<&str>) -> String {
    region.map_or(String::new(), |r| format!(" in region {r}"))
}

/// An agent to ask, from ListAgents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTarget {
    pub agent_id: String,
    pub region: String,
    /// Normalized: `http://host:port`.
    pub address: String,
}

/// The agents with an API address, sorted by (region, agent id): the order `logs` prints them
/// in when not following.
pub fn targets(agents: &[wire::AgentStatus]) -> Vec<AgentTarget> {
    let mut out: Vec<AgentTarget> = agents
        .iter()
        .filter(|a| !a.api_address.trim().is_empty())
        .map(|a| AgentTarget {
            agent_id: a.agent_id.clone(),
            region: a.region.clone(),
            address: normalize_address(&a.api_address),
        })
        .collect();
    out.sort_by(|a, b| (&a.region, &a.agent_id).cmp(&(&b.region, &b.agent_id)));
    out
}

/// `[us-east/hello-3fa2c1] listening on 127.0.1.1:40123`: the region the line names (else the
/// agent's), the instance, and the line with control characters made visible.
pub fn format_line(agent_region: &str, line: &wire::LogLine) -> String {
    let region = if line.region.is_empty() {
        agent_region
    } else {
        &line.region
    };
    let region = if region.is_empty() { "-" } else { region };
    let instance = if line.instance.is_empty() {
        "-"
    } else {
        &line.instance
    };
    let text = log_text(&line.line);
    // An empty line stays empty after its prefix: no trailing blank.
    let separator = if text.is_empty() { "" } else { " " };
    format!("[{region}/{instance}]{separator}{text}\n")
}

/// `warning: agent us-east-1 (us-east) at http://127.0.1.1:7101: <why>`; the command goes on
/// with the other agents.
pub fn warning_line(target: &AgentTarget, why: &str) -> String {
    format!(
        "warning: agent {} ({}) at {}: {why}\n",
        target.agent_id, target.region, target.address
    )
}

/// What one agent's task reports.
enum Event {
    Line(usize, wire::LogLine),
    /// The agent answered NOT_FOUND: it runs no such function (or instance).
    NotFound,
    /// The agent could not be reached, refused, or its stream broke.
    Failed(usize, String),
    /// The stream ended normally.
    Done(usize),
}

/// A status as one line: a transport failure's cause, or the server's answer kubectl style.
fn status_text(status: &Status) -> String {
    use std::error::Error as _;
    match status.source() {
        Some(source) => format!("unreachable: {}", error_chain(source)),
        None => format!(
            "Error from agent ({}): {}",
            reason(status.code()),
            status.message()
        ),
    }
}

/// Streams one agent's lines into `events`; every path ends with exactly one final event.
async fn stream_agent(
    index: usize,
    address: String,
    request: wire::LogsRequest,
    events: mpsc::Sender<Event>,
) {
    let channel = match dial(&address).await {
        Ok(channel) => channel,
        Err(e) => {
            let _ = events
                .send(Event::Failed(index, format!("unreachable: {e}")))
                .await;
            return;
        }
    };
    let mut client = AgentApiServiceClient::new(channel);
    let mut stream = match client.logs(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            use std::error::Error as _;
            let event = if status.code() == Code::NotFound && status.source().is_none() {
                Event::NotFound
            } else {
                Event::Failed(index, status_text(&status))
            };
            let _ = events.send(event).await;
            return;
        }
    };
    loop {
        let event = match stream.message().await {
            Ok(Some(line)) => Event::Line(index, line),
            Ok(None) => Event::Done(index),
            Err(status) => Event::Failed(index, format!("stream broke: {}", status_text(&status))),
        };
        let last = !matches!(event, Event::Line(..));
        // The receiver is gone only when the command is ending (e.g. stdout closed).
        if events.send(event).await.is_err() || last {
            return;
        }
    }
}

/// Runs `logs`: lines on `out` (following: as they arrive; else agent by agent in (region,
/// agent) order), warnings about agents that failed on `err`.
pub async fn run(
    control_plane_address: &str,
    namespace: &str,
    args: &LogsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CommandError> {
    let control_plane = ControlPlane::connect(control_plane_address).await?;
    let agents = control_plane
        .list_agents(args.region.as_deref().unwrap_or(""))
        .await?
        .agents;
    if agents.is_empty() {
        return Err(LogsError::NoAgents {
            region: args.region.clone(),
        }
        .into());
    }
    let targets = targets(&agents);
    if targets.is_empty() {
        return Err(LogsError::NoApiAddress {
            count: agents.len(),
            region: args.region.clone(),
        }
        .into());
    }

    let request = wire::LogsRequest {
        namespace: namespace.to_string(),
        name: args.name.clone(),
        tail_lines: args.tail,
        follow: args.follow,
        instance: args.instance.clone().unwrap_or_default(),
    };
    let (sender, mut events) = mpsc::channel(LINE_BUFFER);
    for (index, target) in targets.iter().enumerate() {
        tokio::spawn(stream_agent(
            index,
            target.address.clone(),
            request.clone(),
            sender.clone(),
        ));
    }
    drop(sender);

    let mut buffered: Vec<Vec<wire::LogLine>> = vec![Vec::new(); targets.len()];
    let (mut lines, mut answered, mut not_found) = (0usize, 0usize, 0usize);
    while let Some(event) = events.recv().await {
        match event {
            Event::Line(index, line) => {
                lines += 1;
                if args.follow {
                    out.write_all(format_line(&targets[index].region, &line).as_bytes())?;
                    out.flush()?;
                } else {
                    buffered[index].push(line);
                }
            }
            Event::Done(index) => {
                answered += 1;
                // A follow stream ends only when the agent goes away (e.g. it restarted).
                if args.follow {
                    err.write_all(warning_line(&targets[index], "log stream ended").as_bytes())?;
                }
            }
            Event::NotFound => not_found += 1,
            Event::Failed(index, why) => {
                err.write_all(warning_line(&targets[index], &why).as_bytes())?;
            }
        }
    }
    for (target, agent_lines) in targets.iter().zip(&buffered) {
        for line in agent_lines {
            out.write_all(format_line(&target.region, line).as_bytes())?;
        }
    }
    out.flush()?;

    if lines > 0 {
        return Ok(());
    }
    if answered == 0 && not_found == 0 {
        return Err(LogsError::NoAnswer {
            count: targets.len(),
        }
        .into());
    }
    if answered == 0 {
        let function = format!("function {:?} in namespace {namespace:?}", args.name);
        let what = match &args.instance {
            Some(instance) => format!("instance {instance:?} of {function}"),
            None => format!("instances of {function}"),
        };
        return Err(LogsError::NotFound {
            what,
            region: args.region.clone(),
        }
        .into());
    }
    writeln!(
        err,
        "No log lines for function {namespace}/{} ({answered} agent(s) answered).",
        args.name
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_need_an_api_address_and_are_sorted() {
        let agent = |region: &str, id: &str, api: &str| wire::AgentStatus {
            agent_id: id.into(),
            region: region.into(),
            api_address: api.into(),
            ..Default::default()
        };
        let found = targets(&[
            agent("us-east", "us-east-2", "127.0.1.1:7102"),
            agent("eu-west", "eu-west-1", "http://127.0.2.1:7101/"),
            agent("us-east", "us-east-1", ""),
            agent("ap-south", "ap-south-1", " "),
        ]);
        assert_eq!(
            found,
            [
                AgentTarget {
                    agent_id: "eu-west-1".into(),
                    region: "eu-west".into(),
                    address: "http://127.0.2.1:7101".into(),
                },
                AgentTarget {
                    agent_id: "us-east-2".into(),
                    region: "us-east".into(),
                    address: "http://127.0.1.1:7102".into(),
                },
            ]
        );
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            LogsError::NoApiAddress {
                count: 2,
                region: Some("us-east".into())
            }
            .to_string(),
            "none of the 2 agent(s) in region us-east advertises an API address (agent flag \
             --api-address), so no logs can be fetched"
        );
        assert_eq!(
            LogsError::NoAgents { region: None }.to_string(),
            "no agents are connected"
        );
    }
}
