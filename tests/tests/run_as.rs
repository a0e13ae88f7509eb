//! No code as root (issue 10), end to end with the real binaries: an agent running as root runs
//! instances as its `--run-as` user (`nobody` in the harness) and only commands under its allowed
//! command roots (the harness's functions dir). A root shell outside the roots never starts, and
//! `meridianctl get instances` and `describe function` say why; the sample function, named by
//! its bare name (looked up in the roots), runs as `nobody` without supplementary groups and
//! with no_new_privs, and can neither read the agent's state files nor list its state directory,
//! as the instance itself reports. The API refuses the shell up front once the agent has
//! announced its roots; stored while the agent was down, it still never starts. Only as root: otherwise the agent has nobody to switch to, and
//! the test says so and passes.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meridian_proto::v1::{function_spec, ApplyFunctionRequest};
use meridian_tests::command_policy::{
    functions_dir, instance_ids, open_temp_dir, running_as_root, RUN_AS,
};
use meridian_tests::{
    apply, describe_scale, instance_processes, output_text, poll_until, wait_scale, Mesh,
    ProcessFunction,
};
use tokio::time::Instant;
use tonic::Code;

/// The whole test's budget.
const BUDGET: Duration = Duration::from_secs(60);
/// How long each step may take.
const STEP: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_agent_runs_no_code_as_root() -> Result<()> {
    if !running_as_root() {
        eprintln!(
            "skipped: the tests do not run as root, so the agent runs instances as the test \
             user and there is no root to keep them from"
        );
        return Ok(());
    }
    tokio::time::timeout(BUDGET, scenario())
        .await
        .with_context(|| format!("the test took more than {BUDGET:?}"))?
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .mode()
        & 0o7777)
}

async fn scenario() -> Result<()> {
    let mut mesh = Mesh::start(1, &["us-east"]).await?;
    mesh.wait_agents_synced(STEP).await?;
    let cp = &mesh.control_planes[0];
    let cp_url = cp.url();
    let state = mesh.agents[0].state_dir().to_path_buf();
    let (uid, gid) = instance_ids()?;
    let root = functions_dir()?.canonicalize()?;
    // Writable by anyone: if the shell ran, as any user, `x` would appear.
    let out = open_temp_dir("meridian-run-as-", true)?;
    let marker = out.path().join("x");

    let mut functions = cp.functions().await?;
    let shell = ProcessFunction {
        min_instances: 1,
        command: Some((
            "/bin/sh".into(),
            vec!["-c".into(), format!("id > {}", marker.display())],
        )),
        ..ProcessFunction::sample("rootshell")
    };
    // The API refuses it up front: the region's agent announced its roots in its Hello.
    let up_front = functions
        .apply(ApplyFunctionRequest {
            spec: Some(shell.spec()?),
            ..Default::default()
        })
        .await;
    match up_front {
        Ok(stored) => anyhow::bail!("the API accepted a root shell outside the roots: {stored:?}"),
        Err(status) => ensure!(
            status.code() == Code::InvalidArgument
                && status.message().contains("spec.runtime.process.command")
                && status.message().contains(&root.display().to_string()),
            "want INVALID_ARGUMENT naming the command and the agent's roots, got {:?}: {}",
            status.code(),
            status.message()
        ),
    }
    // A spec stored while no agent announced a policy (here: the region's agent is down) reaches
    // the agent anyway, and the agent refuses it itself.
    mesh.agents[0].stop().await?;
    poll_until(STEP, "the stopped agent to leave ListAgents", || async {
        let agents = mesh.control_planes[0].agents().await?;
        ensure!(agents.is_empty(), "still listed: {agents:?}");
        Ok(())
    })
    .await?;
    apply(&mut functions, shell.spec()?).await?;
    mesh.agents[0].restart().await?;
    let cp = &mesh.control_planes[0];

    // The sample function by its bare name, probing what an instance must not read: the state
    // dir's listing, the persisted table, the instance records, the logs; and its own working
    // directory, which it must read (a probe that always fails would prove nothing).
    let state_text = state.display().to_string();
    let probes = [
        ".".to_string(),
        state_text.clone(),
        format!("{state_text}/routing-table.pb"),
        format!("{state_text}/instances.json"),
        format!("{state_text}/logs"),
    ];
    let mut whoami = ProcessFunction {
        min_instances: 1,
        ..ProcessFunction::sample("whoami")
    }
    .spec()?;
    let Some(function_spec::Runtime::Process(process)) = whoami.runtime.as_mut() else {
        anyhow::bail!("the sample spec is not a process function");
    };
    process.command = "sample_function".into();
    process.env = HashMap::from([("PROBE_READ".to_string(), probes.join(","))]);
    apply(&mut functions, whoami).await?;

    // The shell is refused, at the agent, with the reason in its scale state.
    let refused = wait_scale(
        &cp_url,
        "rootshell",
        "us-east",
        STEP,
        "the root shell to be refused",
        |s| !s.error.is_empty(),
    )
    .await?;
    let refused_at = Instant::now();
    let reason = format!(
        "cannot start: command \"/bin/sh\": outside the allowed command roots ({})",
        root.display()
    );
    ensure!(refused.error == reason, "{}", describe_scale(&refused));
    ensure!(
        refused.ready == 0
            && refused.starting == 0
            && refused.instances.is_empty()
            && refused.restarts == 0,
        "a refused command has no instance and no restart: {}",
        describe_scale(&refused)
    );

    // ... and in what operators read: the real CLI.
    let listed = poll_until(STEP, "get instances to show the refusal", || async {
        let out = cp.ctl(["get", "instances"]).await?;
        let text = output_text(&out);
        ensure!(out.status.success(), "get instances failed: {text}");
        ensure!(
            text.lines()
                .any(|l| l.contains("rootshell") && l.contains(&reason)),
            "no rootshell row with {reason:?}:\n{text}"
        );
        Ok(text)
    })
    .await?;
    println!("{listed}");
    let described = cp.ctl(["describe", "function", "rootshell"]).await?;
    let text = output_text(&described);
    ensure!(described.status.success(), "describe failed: {text}");
    ensure!(
        text.contains("outside the allowed command roots") && text.contains(&reason),
        "describe must show the refusal:\n{text}"
    );

    // The sample function runs, as nobody: first as the operating system sees it.
    let scale = wait_scale(
        &cp_url,
        "whoami",
        "us-east",
        STEP,
        "the sample function to be ready",
        |s| s.ready == 1,
    )
    .await?;
    let instance = scale.instances.first().context("no instance reported")?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", instance.pid))
        .with_context(|| format!("reading the status of instance pid {}", instance.pid))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let (uid_text, gid_text) = (uid.to_string(), gid.to_string());
    ensure!(
        field("Uid:") == [uid_text.as_str(); 4],
        "real, effective, saved and fs uid must all be {RUN_AS}'s {uid}:\n{status}"
    );
    ensure!(
        field("Gid:") == [gid_text.as_str(); 4],
        "every gid must be {gid}:\n{status}"
    );
    ensure!(
        field("Groups:").is_empty(),
        "no supplementary groups:\n{status}"
    );
    ensure!(
        field("NoNewPrivs:") == ["1"],
        "no_new_privs must be set (from the agent):\n{status}"
    );

    // Then as it reports itself, through meridianctl logs.
    let last_probe = format!("probe-read {state_text}/logs: ");
    let logs = poll_until(STEP, "the instance's start-up lines", || async {
        let out = cp.ctl(["logs", "whoami", "--tail", "50"]).await?;
        let text = output_text(&out);
        ensure!(out.status.success(), "logs failed: {text}");
        ensure!(text.contains(&last_probe), "no probe lines yet:\n{text}");
        Ok(text)
    })
    .await?;
    println!("{logs}");
    let said = format!("sample_function uid={uid} gid={gid} groups=\n");
    ensure!(
        logs.contains(&said) && !logs.contains("uid=0 "),
        "the instance must say {said:?}:\n{logs}"
    );
    ensure!(
        logs.contains("probe-read .: ok"),
        "the instance must read its own working directory:\n{logs}"
    );
    for probe in &probes[1..] {
        let denied = format!("probe-read {probe}: Permission denied (os error 13)");
        ensure!(
            logs.contains(&denied),
            "the instance must be denied {probe}:\n{logs}"
        );
    }

    // The modes that make it so, as the agent left them.
    ensure!(mode(&state)? == 0o711, "state dir mode {:o}", mode(&state)?);
    for file in ["routing-table.pb", "instances.json"] {
        let path = state.join(file);
        ensure!(mode(&path)? == 0o600, "{file} mode {:o}", mode(&path)?);
    }
    ensure!(mode(&state.join("logs"))? == 0o700, "logs/ is not 0700");
    ensure!(
        mode(&state.join("instances"))? == 0o711,
        "instances/ is not 0711"
    );
    let work_dir = state.join("instances/default/whoami").join(&instance.id);
    let metadata = std::fs::metadata(&work_dir)?;
    ensure!(
        (metadata.uid(), metadata.gid(), metadata.mode() & 0o7777) == (uid, gid, 0o700),
        "the work dir must be {RUN_AS}'s, 0700: uid {} gid {} mode {:o}",
        metadata.uid(),
        metadata.gid(),
        metadata.mode() & 0o7777
    );

    // Meanwhile the shell never ran, and was retried with backoff, not in a loop: each attempt
    // opens a log file before the command is checked, so the files count the attempts (backoff
    // 0.2 s doubling: attempts at 0, 0.2, 0.6, 1.4, 3.0, 6.2 s, ...).
    let later = meridian_tests::region_scale(&cp_url, "rootshell", "us-east").await?;
    ensure!(
        later.error == reason && later.instances.is_empty() && later.restarts == 0,
        "{}",
        describe_scale(&later)
    );
    ensure!(
        instance_processes("default", "rootshell").is_empty(),
        "a rootshell process runs"
    );
    ensure!(
        !marker.exists(),
        "{} exists: the shell ran",
        marker.display()
    );
    let elapsed = refused_at.elapsed().as_secs_f64() + 1.0;
    let allowed = 2 + (elapsed / 0.2 + 1.0).log2().floor() as usize;
    let attempts = std::fs::read_dir(state.join("logs/default/rootshell"))?.count();
    ensure!(
        attempts <= allowed,
        "{attempts} attempts to start the shell in about {elapsed:.1} s (at most {allowed} with \
         backoff)"
    );
    Ok(())
}
