//! `bench-push`: how fast a function change reaches every agent, and what the control plane costs.
//!
//! Starts a real etcd and one real control plane, connects N simulated agents from this process
//! (each a real `AgentService.Connect` stream that applies updates and acks them), applies a
//! stream of function changes one at a time, and prints p50/p99/max of the time from Apply
//! returning to the last agent acking that version, plus the control plane's RSS and CPU.
//!
//! Usage: bench-push [--agents N] [--functions F] [--changes C] [--regions R] [--streams-per-conn S]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use meridian_proto::v1 as pb;
use meridian_tests::{ControlPlane, ControlPlaneOpts, Etcd};
use pb::agent_service_client::AgentServiceClient;
use pb::function_service_client::FunctionServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

const REGION_NAMES: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// A count of at least 1.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// Push latency and cost of one control plane with many agents.
#[derive(Debug, Parser)]
#[command(name = "bench-push")]
struct Options {
    /// Agents connected to the control plane.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one())]
    agents: usize,
    /// Functions in the mesh.
    #[arg(long, default_value_t = 100, value_parser = at_least_one())]
    functions: usize,
    /// Changes applied and timed.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Regions the agents are spread over.
    #[arg(long, default_value_t = 3, value_parser = at_least_one())]
    regions: usize,
    /// Agent streams sharing one HTTP/2 connection.
    #[arg(long = "streams-per-conn", default_value_t = 100, value_parser = at_least_one())]
    streams_per_connection: usize,
}

fn region(index: usize) -> String {
    match REGION_NAMES.get(index) {
        Some(name) => (*name).to_string(),
        None => format!("region-{index}"),
    }
}

fn spec(name: &str, regions: usize, generation: usize) -> pb::FunctionSpec {
    pb::FunctionSpec {
        name: name.into(),
        labels: [("generation".to_string(), generation.to_string())]
            .into_iter()
            .collect(),
        runtime: Some(pb::function_spec::Runtime::External(pb::ExternalRuntime {
            regions: (0..regions)
                .map(|i| pb::ExternalRegion {
                    region: region(i),
                    urls: vec![format!("http://127.0.{}.1:9000", i + 1)],
                })
                .collect(),
        })),
        ..Default::default()
    }
}

/// An acknowledgement seen by a simulated agent.
struct AckEvent {
    agent: usize,
    version: i64,
    at: Instant,
}

/// What a simulated agent keeps of its table across reconnects: the version and the function
/// names. (Ten thousand full copies of the routes would measure this process, not the
/// control plane.)
#[derive(Default)]
struct HeldTable {
    version: i64,
    functions: HashSet<(String, String)>,
}

/// One simulated agent: like a real one, it reconnects with capped, jittered backoff when its
/// stream fails (e.g. when the control plane sheds load during a connection storm).
async fn simulated_agent(
    index: usize,
    channel: Channel,
    region: String,
    acks: mpsc::UnboundedSender<AckEvent>,
) {
    let mut held = HeldTable::default();
    let mut ceiling_ms = 100u64;
    loop {
        match agent_session(index, channel.clone(), &region, &acks, &mut held).await {
            Ok(()) => return,
            Err(error) => {
                if acks.is_closed() {
                    return;
                }
                // Deterministic jitter (index-based) keeps the bench reproducible.
                let delay = (index as u64 * 7919) % ceiling_ms.max(1);
                ceiling_ms = (ceiling_ms * 2).min(5000);
                if ceiling_ms >= 5000 {
                    eprintln!("simulated agent {index} retrying: {error:#}");
                }
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
        }
    }
}

async fn agent_session(
    index: usize,
    channel: Channel,
    region: &str,
    acks: &mpsc::UnboundedSender<AckEvent>,
    held: &mut HeldTable,
) -> Result<()> {
    let (sender, receiver) = mpsc::channel(16);
    sender
        .send(pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                api_address: Default::default(),
                agent_id: format!("sim-{index}"),
                region: region.to_string(),
                zone: format!("{region}-a"),
                cloud: "bench".into(),
                // Simulated hosts run no gateway; real ones would add one endpoint per host.
                gateway: String::new(),
                last_version: held.version,
                command_policy: None,
            })),
        })
        .await?;
    // Heartbeats, as a real agent sends them: the control plane drops silent streams.
    let beats = sender.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let beat = pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat::default())),
            };
            if beats.send(beat).await.is_err() {
                break;
            }
        }
    });
    let mut client = AgentServiceClient::new(channel);
    let mut inbound = client
        .connect(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let table = &mut held.functions;
    // Inside a multi-part update (all parts but the last have `more` set).
    let mut assembling = false;
    while let Some(message) = inbound.message().await? {
        let Some(pb::control_message::Kind::Update(update)) = message.kind else {
            continue;
        };
        // Apply it as an agent would, so that the cost of big updates is real.
        if update.full && !assembling {
            table.clear();
        }
        assembling = update.more;
        for removed in update.removed {
            table.remove(&(removed.namespace, removed.name));
        }
        for route in update.functions {
            table.insert((route.namespace, route.name));
        }
        if update.more {
            // A part of a large update: acknowledged when its last part is applied.
            continue;
        }
        held.version = update.version;
        sender
            .send(pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Ack(pb::Ack {
                    version: update.version,
                })),
            })
            .await?;
        let _ = acks.send(AckEvent {
            agent: index,
            version: update.version,
            at: Instant::now(),
        });
    }
    Ok(())
}

/// Tracks the newest version each agent acked.
struct AckTracker {
    acked: Vec<i64>,
    events: mpsc::UnboundedReceiver<AckEvent>,
}

impl AckTracker {
    /// Waits until every agent acked at least `version`; returns when the last one did.
    async fn wait_all(&mut self, version: i64, within: Duration) -> Result<Instant> {
        let deadline = tokio::time::Instant::now() + within;
        let mut behind = self.acked.iter().filter(|v| **v < version).count();
        let mut last = Instant::now();
        while behind > 0 {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .with_context(|| {
                    format!("{behind} agents did not ack version {version} within {within:?}")
                })?
                .context("all simulated agents stopped")?;
            let slot = &mut self.acked[event.agent];
            if *slot < version && event.version >= version {
                behind -= 1;
                last = event.at;
            }
            *slot = (*slot).max(event.version);
        }
        Ok(last)
    }
}

/// Resident set size and peak of a process, in MiB, from /proc.
fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// User + system CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat format")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the command.
    Ok((ticks(11) + ticks(12)) / 100.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = Options::parse();
    println!("bench-push: {options:?}");

    let etcd = Etcd::start().await?;
    // The production lease TTL, not the tests' short one: that is what a fleet runs with.
    let cp_options = ControlPlaneOpts {
        agent_lease_ttl_secs: 10,
        ..ControlPlaneOpts::default()
    };
    let cp = ControlPlane::start(&etcd.url(), cp_options).await?;
    let pid = cp.process().pid().context("control plane has no pid")?;
    let mut functions = FunctionServiceClient::new(cp.channel().await?);

    let mut last_version = 0;
    for f in 0..options.functions {
        let response = functions
            .apply(pb::ApplyFunctionRequest {
                spec: Some(spec(&format!("fn-{f}"), options.regions, 0)),
                ..Default::default()
            })
            .await?
            .into_inner();
        last_version = response.function.map(|f| f.version).unwrap_or_default();
    }

    let connect_started = Instant::now();
    let (ack_sender, ack_events) = mpsc::unbounded_channel();
    let mut channel = None;
    for index in 0..options.agents {
        if index % options.streams_per_connection == 0 {
            channel = Some(
                Endpoint::from_shared(cp.url())?
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await?,
            );
        }
        let channel = channel.clone().context("no channel")?;
        let acks = ack_sender.clone();
        let region = region(index % options.regions);
        tokio::spawn(simulated_agent(index, channel, region, acks));
    }
    drop(ack_sender);
    let mut tracker = AckTracker {
        acked: vec![0; options.agents],
        events: ack_events,
    };
    tracker
        .wait_all(last_version, Duration::from_secs(300))
        .await?;
    let connect_time = connect_started.elapsed();
    let (rss_connected, _) = memory_mib(pid)?;
    println!(
        "{} agents connected and holding {} functions after {}; control plane RSS {:.1} MiB",
        options.agents,
        options.functions,
        ms(connect_time),
        rss_connected
    );

    let cpu_before = cpu_seconds(pid)?;
    let changes_started = Instant::now();
    let mut latencies = Vec::with_capacity(options.changes);
    for change in 0..options.changes {
        let name = format!("fn-{}", change % options.functions);
        let response = functions
            .apply(pb::ApplyFunctionRequest {
                spec: Some(spec(&name, options.regions, change + 1)),
                ..Default::default()
            })
            .await?
            .into_inner();
        let applied = Instant::now();
        let version = response.function.map(|f| f.version).unwrap_or_default();
        let last_ack = tracker.wait_all(version, Duration::from_secs(60)).await?;
        latencies.push(last_ack.saturating_duration_since(applied));
    }
    let wall = changes_started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let (rss, peak) = memory_mib(pid)?;
    latencies.sort();

    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| agents (simulated, real gRPC streams) | {} |",
        options.agents
    );
    println!("| functions | {} |", options.functions);
    println!("| changes applied (one at a time) | {} |", options.changes);
    println!(
        "| Apply returned → every agent acked: p50 | {} |",
        ms(percentile(&latencies, 50.0))
    );
    println!("| p99 | {} |", ms(percentile(&latencies, 99.0)));
    println!(
        "| max | {} |",
        ms(latencies.last().copied().unwrap_or_default())
    );
    println!("| control plane RSS after the changes | {rss:.1} MiB (peak {peak:.1} MiB) |");
    println!(
        "| control plane CPU during the changes | {cpu:.2} s over {:.2} s wall ({:.1} ms per change) |",
        wall.as_secs_f64(),
        cpu * 1000.0 / options.changes.max(1) as f64
    );
    println!(
        "| initial connect + full sync of all agents | {} |",
        ms(connect_time)
    );
    Ok(())
}
