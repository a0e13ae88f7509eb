//! The agent's process runtime with real processes: agent restarts leave no orphan and no
//! double instance (a killed agent's instances are adopted by its next start, a stopped agent's
//! are stopped with it), bad commands are reported without disturbing other functions or
//! spinning, and `meridianctl get instances` / `logs` show what runs.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use meridian_tests::{
    apply, describe_scale, instance_processes, output_text, poll_until, wait_scale, AgentOpts,
    Mesh, ProcessFunction,
};
use tokio::time::Instant;

/// Waits until us-east reports `ready` instances of `name` and exactly those processes run
/// (a report of a previous agent may linger briefly); returns their pids.
async fn running(cp: &str, name: &str, ready: u32) -> Result<BTreeSet<u32>> {
    poll_until(
        Duration::from_secs(20),
        &format!("{ready} ready instances of {name}, reported and running"),
        || async {
            let scale = meridian_tests::region_scale(cp, name, "us-east").await?;
            ensure!(
                scale.ready == ready && scale.starting == 0 && scale.draining == 0,
                "{}",
                describe_scale(&scale)
            );
            let reported: BTreeSet<u32> = scale.instances.iter().map(|i| i.pid).collect();
            let processes: BTreeSet<u32> =
                instance_processes("default", name).into_keys().collect();
            ensure!(
                reported == processes,
                "reported {reported:?}, running {processes:?}"
            );
            Ok(reported)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_leaves_no_orphan_and_no_double_instance() -> Result<()> {
    let mut mesh = Mesh::start(1, &["us-east"]).await?;
    let cp = mesh.cp().url();
    let function = ProcessFunction {
        min_instances: 2,
        ..ProcessFunction::sample("steady")
    };
    apply(&mut mesh.cp().functions().await?, function.spec()?).await?;
    let before = running(&cp, "steady", 2).await?;
    let processes: BTreeSet<u32> = instance_processes("default", "steady")
        .into_keys()
        .collect();
    ensure!(
        processes == before,
        "processes {processes:?} vs reported {before:?}"
    );

    // SIGKILL: the agent has no chance to stop its instances. They serve on, and the next
    // agent adopts them: the same two, no third, none killed.
    mesh.agents[0].kill();
    mesh.agents[0].restart().await?;
    let after: BTreeSet<u32> = instance_processes("default", "steady")
        .into_keys()
        .collect();
    ensure!(
        after == before,
        "instances before the kill {before:?}, after the restart {after:?}"
    );
    let reported = running(&cp, "steady", 2).await?;
    ensure!(
        reported == after,
        "reported {reported:?} but running {after:?}"
    );
    let scale = meridian_tests::region_scale(&cp, "steady", "us-east").await?;
    ensure!(scale.restarts == 0, "{}", describe_scale(&scale));

    // A graceful stop stops the instances with the agent.
    mesh.agents[0].stop().await?;
    let left = instance_processes("default", "steady");
    ensure!(
        left.is_empty(),
        "instances outlived a stopped agent: {left:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_are_reported_and_do_not_disturb_other_functions() -> Result<()> {
    // `sh` must be allowed for the crash loop to be a crash loop (not a refusal).
    let mesh = Mesh::start_with(1, &["us-east"], |_, _| AgentOpts {
        command_roots: vec!["/usr/bin".into(), "/bin".into()],
        ..AgentOpts::default()
    })
    .await?;
    let cp = mesh.cp().url();
    let mut functions = mesh.cp().functions().await?;
    let missing = ProcessFunction {
        min_instances: 1,
        command: Some(("/usr/bin/meridian-missing".into(), Vec::new())),
        ..ProcessFunction::sample("ghost")
    };
    let crashing = ProcessFunction {
        min_instances: 1,
        command: Some((
            "sh".into(),
            vec!["-c".into(), "echo boom on stderr >&2; exit 3".into()],
        )),
        ..ProcessFunction::sample("crashy")
    };
    let healthy = ProcessFunction {
        min_instances: 1,
        ..ProcessFunction::sample("fine")
    };
    for function in [&missing, &crashing, &healthy] {
        apply(&mut functions, function.spec()?).await?;
    }

    let ghost = wait_scale(
        &cp,
        "ghost",
        "us-east",
        Duration::from_secs(20),
        "the missing command to be reported",
        |s| s.error.contains("/usr/bin/meridian-missing"),
    )
    .await?;
    println!("ghost: {}", describe_scale(&ghost));
    ensure!(ghost.ready == 0, "{}", describe_scale(&ghost));

    let crashy = wait_scale(
        &cp,
        "crashy",
        "us-east",
        Duration::from_secs(20),
        "the crash loop to be reported with the exit code and the output",
        |s| {
            s.error.contains("CrashLoopBackOff")
                && s.last_exit.contains("exit code 3")
                && s.last_log_lines
                    .iter()
                    .any(|l| l.contains("boom on stderr"))
        },
    )
    .await?;
    println!("crashy: {}", describe_scale(&crashy));
    running(&cp, "fine", 1).await?;

    // Backing off, not spinning: a few restarts in three seconds, not hundreds.
    let start = Instant::now();
    let first = crashy.restarts;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = meridian_tests::region_scale(&cp, "crashy", "us-east").await?;
    let per_sec = f64::from(later.restarts.saturating_sub(first)) / start.elapsed().as_secs_f64();
    println!(
        "crashy restarts: {first} then {} ({per_sec:.1}/s)",
        later.restarts
    );
    ensure!(
        per_sec < 3.0,
        "restarting {per_sec:.1} times a second: {}",
        describe_scale(&later)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridianctl_shows_instances_and_their_logs() -> Result<()> {
    let mesh = Mesh::start(1, &["us-east"]).await?;
    let cp = mesh.cp();
    let function = ProcessFunction {
        min_instances: 1,
        ..ProcessFunction::sample("chatty")
    };
    apply(&mut cp.functions().await?, function.spec()?).await?;
    running(&cp.url(), "chatty", 1).await?;

    let listed = cp.ctl(["get", "instances"]).await?;
    let text = output_text(&listed);
    ensure!(listed.status.success(), "get instances failed: {text}");
    ensure!(
        text.contains("chatty") && text.contains("us-east"),
        "get instances must list chatty in us-east:\n{text}"
    );

    let logs = poll_until(Duration::from_secs(10), "the instance's log", || async {
        let out = cp.ctl(["logs", "chatty", "--tail", "20"]).await?;
        let text = output_text(&out);
        ensure!(out.status.success(), "logs failed: {text}");
        ensure!(text.contains("listening"), "no start-up line yet:\n{text}");
        Ok(text)
    })
    .await?;
    println!("{logs}");
    Ok(())
}
