//! Configuration propagation as one trace, received by a real OTLP/gRPC receiver: an Apply sent
//! to one control-plane replica with a caller's `traceparent` is ONE trace holding the API's
//! `meridian.apply` span (a child of the caller's span, with the etcd revision it committed)
//! and a `meridian.push` span for EVERY agent (children of the apply span), including the agents
//! held by the other replica, which learns the trace context from etcd. The push's context
//! reaches the agent in `RoutingUpdate.trace_context`: every agent's `meridian.agent.apply` and
//! `meridian.agent.ack` spans are children of its push span, and a refused push ends its span
//! with an error and the reason. A Delete through the other replica, without a caller's context, is a
//! trace of its own rooted at its `meridian.delete` span. The placements a traced Apply of a
//! process function causes are written under a `meridian.schedule` span (the apply span's
//! child), and their pushes are its children. With the `OTEL_*` variables unset, no trace key is
//! written to etcd and updates carry no trace context. `meridianctl apply` with the `OTEL_*`
//! variables set starts the trace: the API's apply span is the child of the CLI's span.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use futures::future::try_join_all;
use meridian_proto::v1::control_plane_service_client::ControlPlaneServiceClient;
use meridian_proto::v1::{
    function_spec, ApplyFunctionRequest, DeleteFunctionRequest, FunctionSpec, ListAgentsRequest,
    ListReplicasRequest, Placement, ProcessRuntime, RoutingUpdate,
};
use meridian_tests::otlp::{
    find, new_traceparent, parse_traceparent, OtlpReceiver, ReceivedSpan, KIND_CONSUMER,
    KIND_PRODUCER, KIND_SERVER, STATUS_ERROR,
};
use meridian_tests::{
    external_spec, meridianctl_with_env, output_text, poll_until, probe_hello, region_index, Agent,
    AgentOpts, ControlPlane, ControlPlaneOpts, Etcd, RawAgent,
};

const KEY_PREFIX: &str = "/meridian/v1/";
/// Where the API writes the trace of the last traced change.
const TRACE_KEY: &str = "/meridian/v1/propagation/trace";

fn otel_env(receiver: &OtlpReceiver, service: &str) -> Vec<(String, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
        ("OTEL_SERVICE_NAME".into(), service.into()),
        // Export within a fifth of a second instead of five: the test waits for it.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
    ]
}

fn cp_service(id: &str) -> String {
    format!("meridian-control-plane-{id}")
}

/// Starts a replica with id `id`, exporting to `receiver` when given.
async fn start_cp(etcd: &Etcd, id: &str, receiver: Option<&OtlpReceiver>) -> Result<ControlPlane> {
    ControlPlane::start(
        &etcd.url(),
        ControlPlaneOpts {
            env: receiver.map_or_else(Vec::new, |r| otel_env(r, &cp_service(id))),
            ..ControlPlaneOpts::replica(id)
        },
    )
    .await
}

/// Starts one agent per (region, replica) in `plan`, each knowing only that replica and
/// exporting its spans to `receiver`.
async fn start_traced_agents(
    receiver: &OtlpReceiver,
    plan: &[(&str, &ControlPlane)],
) -> Result<Vec<Agent>> {
    try_join_all(plan.iter().map(|(region, cp)| {
        let index = region_index(region).unwrap_or_default();
        let env = otel_env(receiver, &format!("meridian-agent-{region}"));
        let urls = vec![cp.url()];
        async move {
            Agent::start(
                index,
                region,
                &urls,
                AgentOpts {
                    env,
                    ..Default::default()
                },
            )
            .await
        }
    }))
    .await
}

/// (region, agent id) of each agent.
fn agent_ids(agents: &[Agent]) -> Vec<(String, String)> {
    agents
        .iter()
        .map(|a| (a.region().to_owned(), a.agent_id().to_owned()))
        .collect()
}

/// Whether every agent in `ids` (region, agent id) holds its region's newest table, as the
/// replica holding its stream sees it (says which does not otherwise). Only that replica can
/// tell: two replicas may label the same table with different versions.
async fn in_sync(cps: &[&ControlPlane], ids: &[(String, String)]) -> Result<()> {
    let mut views = Vec::new();
    for cp in cps {
        let agents = cp
            .mesh()
            .await?
            .list_agents(ListAgentsRequest::default())
            .await?
            .into_inner()
            .agents;
        views.push((cp.replica_id().to_owned(), agents));
    }
    for (region, id) in ids {
        let synced = views.iter().any(|(replica, agents)| {
            agents.iter().any(|a| {
                &a.region == region && &a.agent_id == id && &a.replica == replica && a.in_sync
            })
        });
        ensure!(synced, "{region}/{id} is not in sync yet: {views:?}");
    }
    Ok(())
}

/// Waits until every agent in `ids` holds its region's newest table, so that the next change
/// is pushed to each at once, not after an ack of something older (latest wins: a push that
/// waited could carry a later, untraced change instead).
async fn wait_in_sync(cps: &[&ControlPlane], ids: &[(String, String)]) -> Result<()> {
    poll_until(
        Duration::from_secs(30),
        "every agent to hold its region's newest table",
        || in_sync(cps, ids),
    )
    .await
}

/// [`wait_in_sync`] with a hand-driven agent among `ids`: it acks what it is sent meanwhile,
/// as a real agent would.
async fn settle(
    cps: &[&ControlPlane],
    ids: &[(String, String)],
    probe: &mut RawAgent,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Reading with a short timeout is both the probe's work and the pause between checks.
        while let Ok(update) = probe.next_update(Duration::from_millis(20)).await {
            if !update.more {
                probe.ack(update.version).await?;
            }
        }
        match in_sync(cps, ids).await {
            Ok(()) => return Ok(()),
            Err(error) if tokio::time::Instant::now() > deadline => {
                return Err(error.context("agents and the probe did not settle within 30 s"))
            }
            Err(_) => {}
        }
    }
}

/// Waits until `cp` lists every agent in `ids` (region, agent id) with an acked version.
async fn wait_synced(cp: &ControlPlane, ids: &[(String, String)]) -> Result<()> {
    poll_until(
        Duration::from_secs(30),
        "every agent to ack a table",
        || async move {
            let agents = cp
                .mesh()
                .await?
                .list_agents(ListAgentsRequest::default())
                .await?
                .into_inner()
                .agents;
            for (region, id) in ids {
                ensure!(
                    agents
                        .iter()
                        .any(|a| &a.region == region && &a.agent_id == id && a.acked_version > 0),
                    "{region}/{id} has not acked yet: {agents:?}"
                );
            }
            Ok(())
        },
    )
    .await
}

/// Applies `hello` (external, a URL in each of `regions`) through `cp`, with `traceparent` in
/// the request metadata when given; returns the function's version (the commit's revision).
async fn apply_hello(
    cp: &ControlPlane,
    regions: &[&str],
    traceparent: Option<&str>,
) -> Result<i64> {
    let urls: Vec<(&str, String)> = regions
        .iter()
        .map(|region| (*region, format!("http://{region}.example:9000")))
        .collect();
    let urls: Vec<(&str, &str)> = urls.iter().map(|(r, u)| (*r, u.as_str())).collect();
    let mut request = tonic::Request::new(ApplyFunctionRequest {
        spec: Some(external_spec("hello", &urls)),
        ..Default::default()
    });
    if let Some(traceparent) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse()?);
    }
    let function = cp
        .functions()
        .await?
        .apply(request)
        .await?
        .into_inner()
        .function
        .ok_or_else(|| anyhow!("Apply answered without the function"))?;
    Ok(function.version)
}

/// Connects a hand-driven agent `probe` of `region` to `cp`, once the replica holds its etcd
/// lease (until then it sends agents away with UNAVAILABLE) and has sent it a first table.
async fn connect_probe(cp: &ControlPlane, region: &str) -> Result<RawAgent> {
    poll_until(
        Duration::from_secs(15),
        "the replica to accept an agent and send it a table",
        || async move {
            let mut probe =
                RawAgent::connect(cp.channel().await?, probe_hello(region, "probe", 0)).await?;
            let first = update_at(&mut probe, 1).await?;
            probe.ack(first.version).await?;
            Ok(probe)
        },
    )
    .await
}

/// Reads updates from `probe` (acking older ones) until one at or past `version` arrives.
async fn update_at(probe: &mut RawAgent, version: i64) -> Result<RoutingUpdate> {
    loop {
        let update = probe.next_update(Duration::from_secs(15)).await?;
        if update.version >= version && !update.more {
            return Ok(update);
        }
        if !update.more {
            probe.ack(update.version).await?;
        }
    }
}

/// Whether `push` sent a table at or past `revision`. A push is of the table at the revision the
/// replica's cache reached: a change coalesced with the next one (within a few milliseconds)
/// is pushed as the later revision, still carrying the change's trace.
fn at_or_after(push: &ReceivedSpan, revision: i64) -> bool {
    push.attr("meridian.table.version")
        .and_then(|version| version.parse::<i64>().ok())
        .is_some_and(|version| version >= revision)
}

/// The spans of one propagation.
#[derive(Debug)]
struct Propagation {
    apply: ReceivedSpan,
    /// By agent id.
    pushes: BTreeMap<String, ReceivedSpan>,
    /// The real agents' (apply, ack) spans, by agent id.
    agent_spans: BTreeMap<String, (ReceivedSpan, ReceivedSpan)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_is_one_trace_with_a_push_and_an_ack_span_from_every_agent() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let etcd = Etcd::start().await?;
    let (cp0, cp1) = tokio::try_join!(
        start_cp(&etcd, "cp-0", Some(&receiver)),
        start_cp(&etcd, "cp-1", Some(&receiver))
    )?;
    // Each agent knows one replica only, so that the replica taking the Apply (cp-0) is not
    // the one pushing to us-east and ap-south: their pushes join the trace through etcd.
    let plan = [("us-east", &cp1), ("eu-west", &cp0), ("ap-south", &cp1)];
    let agents = start_traced_agents(&receiver, &plan).await?;
    // A hand-driven agent on cp-1 shows what goes over the wire, and refuses the traced table.
    let mut probe = connect_probe(&cp1, "eu-west").await?;
    let mut ids = agent_ids(&agents);
    ids.push(("eu-west".into(), "probe".into()));
    wait_synced(&cp0, &ids).await?;
    settle(&[&cp0, &cp1], &ids, &mut probe).await?;

    let (trace_id, caller_span, traceparent) = new_traceparent();
    let revision = apply_hello(
        &cp0,
        &["us-east", "eu-west", "ap-south"],
        Some(&traceparent),
    )
    .await?;

    // The update the probe gets carries the context of its own push span, in the same trace.
    let update = update_at(&mut probe, revision).await?;
    let pushed = update
        .trace_context
        .get("traceparent")
        .and_then(|value| parse_traceparent(value))
        .ok_or_else(|| anyhow!("update without a traceparent: {update:?}"))?;
    ensure!(
        pushed.0 == trace_id,
        "the update's trace is {pushed:?}, not {trace_id}"
    );
    probe.nack(update.version, "refused by the test").await?;

    let agent_ids: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    let real_agents: Vec<(String, String)> = agents
        .iter()
        .map(|a| (a.region().to_owned(), a.agent_id().to_owned()))
        .collect();
    let propagation = receiver
        .wait_for(
            Duration::from_secs(20),
            "the apply span and a push span for every agent",
            |spans| {
                let trace: Vec<ReceivedSpan> = spans
                    .iter()
                    .filter(|s| s.trace_id == trace_id)
                    .cloned()
                    .collect();
                let apply = find(&trace, &cp_service("cp-0"), "meridian.apply", |_| true)
                    .ok_or_else(|| anyhow!("no apply span yet in trace {trace_id}: {trace:#?}"))?
                    .clone();
                let mut pushes = BTreeMap::new();
                for id in &agent_ids {
                    let push = trace
                        .iter()
                        .find(|s| {
                            s.name == "meridian.push"
                                && s.attr("meridian.agent") == Some(id)
                                && at_or_after(s, revision)
                        })
                        .ok_or_else(|| {
                            anyhow!("no push span for {id} yet in trace {trace_id}: {trace:#?}")
                        })?;
                    pushes.insert(id.clone(), push.clone());
                }
                let mut agent_spans = BTreeMap::new();
                for (region, id) in &real_agents {
                    let service = format!("meridian-agent-{region}");
                    // The agent applies the version its push sent.
                    let pushed = pushes
                        .get(id)
                        .and_then(|p: &ReceivedSpan| p.attr("meridian.table.version"));
                    let at_revision = |s: &ReceivedSpan| s.attr("meridian.table.version") == pushed;
                    let missing = |what: &str| {
                        anyhow!("no {what} span from {id} yet in trace {trace_id}: {trace:#?}")
                    };
                    let apply = find(&trace, &service, "meridian.agent.apply", at_revision)
                        .ok_or_else(|| missing("apply"))?;
                    let ack = find(&trace, &service, "meridian.agent.ack", at_revision)
                        .ok_or_else(|| missing("ack"))?;
                    agent_spans.insert(id.clone(), (apply.clone(), ack.clone()));
                }
                Ok(Propagation {
                    apply,
                    pushes,
                    agent_spans,
                })
            },
        )
        .await?;
    eprintln!("{propagation:#?}");
    let Propagation {
        apply,
        pushes,
        agent_spans,
    } = &propagation;

    // The apply span continues the caller's trace and names the revision of the commit.
    ensure!(apply.kind == KIND_SERVER, "{apply:#?}");
    ensure!(apply.parent_span_id == caller_span, "{apply:#?}");
    for (key, want) in [
        ("meridian.function", "hello"),
        ("meridian.namespace", "default"),
        ("meridian.outcome", "created"),
        ("meridian.replica", "cp-0"),
        ("meridian.etcd.revision", revision.to_string().as_str()),
    ] {
        ensure!(
            apply.attr(key) == Some(want),
            "{key} of the apply span: {apply:#?}"
        );
    }

    // Every push is the apply span's child, from the replica holding that agent's stream.
    for (region, cp) in &plan {
        let agent = format!("{region}-1");
        let push = &pushes[&agent];
        ensure!(
            push.service == cp_service(cp.replica_id()),
            "{agent} is held by {}: {push:#?}",
            cp.replica_id()
        );
        ensure!(push.attr("meridian.region") == Some(*region), "{push:#?}");
        ensure!(
            push.attr("meridian.push.result") == Some("ack"),
            "{push:#?}"
        );
        ensure!(push.status_code != STATUS_ERROR, "{push:#?}");
    }
    for (id, push) in pushes {
        ensure!(push.kind == KIND_PRODUCER, "{push:#?}");
        ensure!(
            push.parent_span_id == apply.span_id,
            "the push to {id} is not a child of the apply span: {push:#?}"
        );
        for key in ["meridian.push.full", "meridian.push.parts"] {
            ensure!(push.attr(key).is_some(), "{key} missing: {push:#?}");
        }
    }

    // Each agent applied and acknowledged the table in its push's trace.
    for (id, (agent_apply, agent_ack)) in agent_spans {
        let push = &pushes[id];
        for span in [agent_apply, agent_ack] {
            ensure!(
                span.parent_span_id == push.span_id,
                "{} of {id} is not a child of its push span {}: {span:#?}",
                span.name,
                push.span_id
            );
            ensure!(span.attr("meridian.agent") == Some(id), "{span:#?}");
            ensure!(span.status_code != STATUS_ERROR, "{span:#?}");
        }
        ensure!(agent_apply.kind == KIND_CONSUMER, "{agent_apply:#?}");
        ensure!(
            agent_apply.attr("meridian.table.functions") == Some("1"),
            "{agent_apply:#?}"
        );
        ensure!(
            agent_ack.attr("meridian.agent.result") == Some("ack"),
            "{agent_ack:#?}"
        );
    }

    // The probe's push is the span whose context it was sent, ended by its refusal.
    let refused = &pushes["probe"];
    ensure!(refused.span_id == pushed.1, "{refused:#?} vs {pushed:?}");
    ensure!(
        refused.status_code == STATUS_ERROR
            && refused.attr("meridian.push.result") == Some("nack")
            && refused.status_message.contains("refused by the test"),
        "{refused:#?}"
    );

    // A Delete through cp-1 without a caller's context: a new trace, rooted at the delete span,
    // with a push span for every real agent at the delete's revision.
    let real: Vec<(String, String)> = ids
        .iter()
        .filter(|(_, id)| id != "probe")
        .cloned()
        .collect();
    wait_in_sync(&[&cp0, &cp1], &real).await?;
    cp1.functions()
        .await?
        .delete(DeleteFunctionRequest {
            namespace: "default".into(),
            name: "hello".into(),
            ..Default::default()
        })
        .await?;
    let (delete, delete_pushes) = receiver
        .wait_for(
            Duration::from_secs(20),
            "the delete span and a push span for every agent",
            |spans| {
                let delete = find(spans, &cp_service("cp-1"), "meridian.delete", |s| {
                    s.attr("meridian.function") == Some("hello")
                })
                .ok_or_else(|| anyhow!("no delete span yet"))?
                .clone();
                let revision: i64 = delete
                    .attr("meridian.etcd.revision")
                    .ok_or_else(|| anyhow!("delete span without a revision: {delete:#?}"))?
                    .parse()?;
                let pushes = real
                    .iter()
                    .map(|(_, id)| {
                        spans
                            .iter()
                            .find(|s| {
                                s.trace_id == delete.trace_id
                                    && s.name == "meridian.push"
                                    && s.attr("meridian.agent") == Some(id)
                                    && at_or_after(s, revision)
                            })
                            .cloned()
                            .ok_or_else(|| anyhow!("no push of the delete to {id} yet"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((delete, pushes))
            },
        )
        .await?;
    ensure!(
        delete.parent_span_id.is_empty() && delete.trace_id != trace_id,
        "the delete span is not a root of its own trace: {delete:#?}"
    );
    ensure!(
        delete.attr("meridian.outcome") == Some("deleted"),
        "{delete:#?}"
    );
    for push in &delete_pushes {
        ensure!(
            push.parent_span_id == delete.span_id
                && push.attr("meridian.push.result") == Some("ack"),
            "{push:#?}"
        );
    }

    // The context crossed etcd in the changes' own transactions, as one key.
    ensure!(
        etcd.keys(&format!("{KEY_PREFIX}propagation/")).await? == vec![TRACE_KEY.to_owned()],
        "trace keys in etcd"
    );
    drop(agents);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_otel_unset_no_trace_key_is_written_and_updates_carry_no_context() -> Result<()> {
    let etcd = Etcd::start().await?;
    let cp = start_cp(&etcd, "cp-0", None).await?;
    let mut probe = connect_probe(&cp, "us-east").await?;

    // A caller's trace context is ignored, not carried.
    let (_, _, traceparent) = new_traceparent();
    let revision = apply_hello(&cp, &["us-east"], Some(&traceparent)).await?;
    let update = update_at(&mut probe, revision).await?;
    ensure!(
        update.trace_context.is_empty(),
        "trace context without tracing: {update:?}"
    );
    probe.ack(update.version).await?;
    let keys = etcd.keys(KEY_PREFIX).await?;
    ensure!(
        keys.iter().any(|k| k.ends_with("/functions/default/hello")),
        "the function is not in etcd: {keys:?}"
    );
    ensure!(
        !keys.iter().any(|k| k.contains("/propagation/")),
        "a trace key was written with tracing off: {keys:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_placements_a_traced_apply_causes_join_its_trace() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let etcd = Etcd::start().await?;
    let (cp0, cp1) = tokio::try_join!(
        start_cp(&etcd, "cp-0", Some(&receiver)),
        start_cp(&etcd, "cp-1", Some(&receiver))
    )?;
    let plan = [("us-east", &cp0), ("eu-west", &cp1)];
    let agents = start_traced_agents(&receiver, &plan).await?;
    let ids = agent_ids(&agents);
    wait_synced(&cp0, &ids).await?;
    wait_in_sync(&[&cp0, &cp1], &ids).await?;

    // A process function in every region, scaled to zero: the leader places it after the
    // Apply, in a write of its own.
    let (trace_id, _, traceparent) = new_traceparent();
    let mut request = tonic::Request::new(ApplyFunctionRequest {
        spec: Some(FunctionSpec {
            name: "worker".into(),
            runtime: Some(function_spec::Runtime::Process(ProcessRuntime {
                // The sample function by its bare name, found in the agents' command roots.
                command: meridian_tests::command_policy::SAMPLE_FUNCTION.into(),
                ..Default::default()
            })),
            placement: Some(Placement {
                all_regions: true,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse()?);
    cp0.functions().await?.apply(request).await?;

    let services = [cp_service("cp-0"), cp_service("cp-1")];
    let (apply, schedule, pushes) = receiver
        .wait_for(
            Duration::from_secs(20),
            "the schedule span and a push of the placement to every agent",
            |spans| {
                let trace: Vec<ReceivedSpan> = spans
                    .iter()
                    .filter(|s| s.trace_id == trace_id)
                    .cloned()
                    .collect();
                let apply = find(&trace, &services[0], "meridian.apply", |_| true)
                    .ok_or_else(|| anyhow!("no apply span yet: {trace:#?}"))?
                    .clone();
                let schedule = trace
                    .iter()
                    .find(|s| s.name == "meridian.schedule" && services.contains(&s.service))
                    .ok_or_else(|| anyhow!("no schedule span yet: {trace:#?}"))?
                    .clone();
                let placed: i64 = schedule
                    .attr("meridian.etcd.revision")
                    .ok_or_else(|| anyhow!("schedule span without a revision: {schedule:#?}"))?
                    .parse()?;
                let pushes = ids
                    .iter()
                    .map(|(_, id)| {
                        trace
                            .iter()
                            .find(|s| {
                                s.name == "meridian.push"
                                    && s.attr("meridian.agent") == Some(id)
                                    && at_or_after(s, placed)
                            })
                            .cloned()
                            .ok_or_else(|| {
                                anyhow!("no push of the placement to {id} yet: {trace:#?}")
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((apply, schedule, pushes))
            },
        )
        .await?;
    eprintln!("{apply:#?}\n{schedule:#?}\n{pushes:#?}");
    ensure!(
        schedule.parent_span_id == apply.span_id,
        "the schedule span is not a child of the apply span: {schedule:#?}"
    );
    ensure!(
        schedule.attr("meridian.outcome") == Some("written")
            && schedule.attr("meridian.placements") == Some("1"),
        "{schedule:#?}"
    );
    let applied_at: i64 = apply
        .attr("meridian.etcd.revision")
        .unwrap_or_default()
        .parse()?;
    let placed_at: i64 = schedule
        .attr("meridian.etcd.revision")
        .unwrap_or_default()
        .parse()?;
    ensure!(
        placed_at > applied_at,
        "placed at {placed_at}, applied at {applied_at}"
    );
    for push in &pushes {
        ensure!(
            push.parent_span_id == schedule.span_id
                && push.attr("meridian.push.result") == Some("ack"),
            "{push:#?}"
        );
    }
    drop(agents);
    Ok(())
}

/// Not propagation, but the same replicas: each registers itself on its lease, and
/// `ControlPlaneService.ListReplicas` (what `meridianctl status` can show) lists them all with
/// the scheduler leader marked; a replica that stops drops out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_is_registered_with_the_leader_marked() -> Result<()> {
    let etcd = Etcd::start().await?;
    let (mut cp0, cp1) =
        tokio::try_join!(start_cp(&etcd, "cp-0", None), start_cp(&etcd, "cp-1", None))?;
    let client = ControlPlaneServiceClient::new(cp1.channel().await?);
    let answer = poll_until(
        Duration::from_secs(15),
        "both replicas registered and a leader elected",
        || {
            let mut client = client.clone();
            async move {
                let answer = client
                    .list_replicas(ListReplicasRequest {})
                    .await?
                    .into_inner();
                ensure!(
                    answer.replicas.len() == 2 && !answer.leader.is_empty(),
                    "{answer:?}"
                );
                Ok(answer)
            }
        },
    )
    .await?;
    for (replica, cp) in answer.replicas.iter().zip([&cp0, &cp1]) {
        ensure!(
            replica.replica_id == cp.replica_id()
                && replica.address == cp.addr().to_string()
                && replica.started_unix_ms > 0
                && replica.leader == (replica.replica_id == answer.leader),
            "{answer:?}"
        );
    }
    // A clean stop deregisters at once, well within the lease TTL (a killed replica's
    // registration expires with its lease, as the control plane's own test shows).
    cp0.stop().await?;
    poll_until(Duration::from_secs(1), "cp-0's registration to go", || {
        let mut client = client.clone();
        async move {
            let answer = client
                .list_replicas(ListReplicasRequest {})
                .await?
                .into_inner();
            let ids: Vec<&str> = answer
                .replicas
                .iter()
                .map(|r| r.replica_id.as_str())
                .collect();
            ensure!(ids == ["cp-1"], "{answer:?}");
            Ok(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridianctl_apply_starts_the_propagation_trace() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let etcd = Etcd::start().await?;
    let cp = start_cp(&etcd, "cp-0", Some(&receiver)).await?;
    let dir = tempfile::tempdir()?;
    let manifest = dir.path().join("hello.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: meridian.dev/v1\nkind: Function\nmetadata: {name: hello}\nspec:\n  \
         runtime: {external: {regions: [{region: us-east, urls: [\"http://127.0.1.1:9000\"]}]}}\n",
    )?;
    let output = meridianctl_with_env(
        [
            "--control-plane",
            &cp.url(),
            "apply",
            "-f",
            &manifest.to_string_lossy(),
        ],
        &otel_env(&receiver, "meridianctl"),
    )
    .await?;
    ensure!(output.status.success(), "{}", output_text(&output));

    let (cli, apply) = receiver
        .wait_for(
            Duration::from_secs(20),
            "the CLI's span and the control plane's apply span",
            |spans| {
                let cli = find(spans, "meridianctl", "meridianctl apply", |_| true)
                    .ok_or_else(|| anyhow!("no `meridianctl apply` span yet"))?
                    .clone();
                let apply = find(spans, &cp_service("cp-0"), "meridian.apply", |s| {
                    s.trace_id == cli.trace_id
                })
                .ok_or_else(|| anyhow!("no apply span in the CLI's trace yet"))?
                .clone();
                Ok((cli, apply))
            },
        )
        .await?;
    ensure!(
        cli.parent_span_id.is_empty(),
        "the CLI's span is the root: {cli:#?}"
    );
    ensure!(
        apply.parent_span_id == cli.span_id,
        "the apply span's parent is the CLI's span: {apply:#?} {cli:#?}"
    );
    ensure!(
        apply.attr("meridian.function") == Some("hello"),
        "{apply:#?}"
    );
    Ok(())
}
