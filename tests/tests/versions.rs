//! Versions never go back. A replica whose tables are older than the one an agent says it holds
//! (its cache lags etcd, or it serves another etcd) sends that agent no table, only `Behind`; a
//! real agent told so keeps its table and moves on to a replica that is not behind, so the table
//! it serves never goes back.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meridian_proto::v1::control_message::Kind;
use meridian_tests::{
    apply, external_spec, poll_until, probe_hello, route, Agent, AgentOpts, ControlPlane,
    ControlPlaneOpts, Etcd, RawAgent,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_agent_sends_behind_and_no_older_table() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(60), behind())
        .await
        .context("the test took more than its 60 s budget")?
}

async fn behind() -> Result<()> {
    let etcd = Etcd::start().await?;
    let cp = ControlPlane::start(&etcd.url(), ControlPlaneOpts::default()).await?;
    let stored = apply(
        &mut cp.functions().await?,
        external_spec("hello", &[("us-east", "http://127.0.1.1:9000")]),
    )
    .await?;
    // An agent that holds a table far newer than anything this replica has.
    let held = stored.version + 1_000_000;
    let mut agent =
        RawAgent::connect(cp.channel().await?, probe_hello("us-east", "probe-1", held)).await?;
    let started = Instant::now();
    let deadline = Duration::from_secs(30);
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        let message = agent.next_message(left).await?;
        match message.kind {
            Some(Kind::Update(update)) => bail!(
                "a replica behind the agent (held {held}) sent a table of version {}",
                update.version
            ),
            Some(Kind::Behind(behind)) => {
                ensure!(
                    behind.held_version == held && behind.version < held,
                    "Behind {behind:?}, the agent holds {held}"
                );
                eprintln!("Behind {behind:?} after {:?}", started.elapsed());
                return Ok(());
            }
            Some(Kind::Heartbeat(_)) | None => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_never_serves_an_older_table_and_moves_to_a_replica_that_is_not_behind(
) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), moves_on())
        .await
        .context("the test took more than its 90 s budget")?
}

async fn moves_on() -> Result<()> {
    // Replica A on an etcd with many revisions; replica B on another etcd with few, standing in
    // for a replica whose cache lags far behind.
    let etcd_a = Etcd::start().await?;
    let cp_a = ControlPlane::start(&etcd_a.url(), ControlPlaneOpts::replica("cp-a")).await?;
    let mut functions_a = cp_a.functions().await?;
    for i in 0..20 {
        apply(
            &mut functions_a,
            external_spec(&format!("f{i}"), &[("us-east", "http://127.0.1.1:9000")]),
        )
        .await?;
    }
    let etcd_b = Etcd::start().await?;
    let cp_b = ControlPlane::start(&etcd_b.url(), ControlPlaneOpts::replica("cp-b")).await?;
    apply(
        &mut cp_b.functions().await?,
        external_spec("stale", &[("us-east", "http://127.0.1.1:9000")]),
    )
    .await?;

    let state = tempfile::tempdir()?;
    let opts = || AgentOpts {
        state_dir: Some(state.path().to_path_buf()),
        ..AgentOpts::default()
    };
    let mut first = Agent::start(0, "us-east", &[cp_a.url()], opts()).await?;
    let held = poll_until(
        Duration::from_secs(20),
        "the agent to hold A's table",
        || async {
            let table = first.table().await?.context("no table yet")?;
            ensure!(route(&table, "f19").is_some(), "f19 not in the table yet");
            Ok(table.version)
        },
    )
    .await?;
    first.stop().await?;

    // Restarted pointing at B first: B is behind, so the agent keeps its table and goes to A.
    let restarted_unix_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let second = Agent::start(0, "us-east", &[cp_b.url(), cp_a.url()], opts()).await?;
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let table = second.table().await?.context("the agent serves no table")?;
        ensure!(
            table.version >= held && route(&table, "stale").is_none(),
            "the agent went back: held {held}, now serves {} (B's stale table: {})",
            table.version,
            route(&table, "stale").is_some()
        );
        seen.push(table.version);
        let on_a = cp_a.agents().await?.iter().any(|a| {
            // This agent's new session, not the record the first one left behind.
            a.agent_id == second.agent_id()
                && a.connected_since_unix_ms >= restarted_unix_ms
                && a.acked_version >= held
        });
        if on_a {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the agent did not move to replica A within 60 s; versions served: {seen:?}\n{}",
            second.process().log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = second.process().log();
    ensure!(
        log.contains("behind"),
        "the agent's log must say why it left replica B:\n{}",
        second.process().log_tail(30)
    );
    eprintln!(
        "held {held}; served {} versions, never lower; on replica A after {:?}",
        seen.len(),
        started.elapsed()
    );
    Ok(())
}
