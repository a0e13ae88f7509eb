//! A restarted agent adopts the instances that kept serving while it was down. An agent killed
//! with SIGKILL under steady load through its region's sidecar, then started again on the same
//! state dir, takes its live instances over: the same ids and pids, no restart, no failed
//! request, and their logs go on (in the file and through `meridianctl logs`). One stopped with
//! SIGTERM and `--keep-instances-on-exit` leaves them to the next start too. And a record the
//! restarted agent cannot vouch for is reaped when the process is its own (it stopped answering
//! its readiness probe, or runs another command line than recorded) and never signalled when the
//! pid now belongs to a stranger. Real etcd, control plane, agents, sidecar and sample function.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use meridian_proto::v1::{function_spec, EndpointState, FunctionSpec};
use meridian_tests::command_policy::instance_ids;
use meridian_tests::http::{Load, LoadSpec};
use meridian_tests::{
    apply, describe_scale, instance_leaders, metric_value, output_text, poll_until,
    process_running, process_start_time, region_scale, wait_scale, Agent, AgentOpts, Mesh,
    ProcessFunction, Relay, SidecarOpts, World,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

/// Every test here must finish well within a minute.
const BUDGET: Duration = Duration::from_secs(45);

/// Runs a test body within [`BUDGET`].
async fn within_budget(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(BUDGET, test)
        .await
        .with_context(|| format!("the test took longer than its budget of {BUDGET:?}"))?
}

/// The sample function with a companion in its process group that writes a line every 100 ms
/// (`tick <unix ms>`), so that its log must keep growing. `exec "$0"` makes the instance's
/// process the sample function itself, as recorded.
const TICKER: &str = r#"while :; do echo "tick $(date +%s%3N)"; sleep 0.1; done & exec "$0""#;

fn ticking_spec(function: &ProcessFunction) -> Result<FunctionSpec> {
    let mut spec = function.spec()?;
    let Some(function_spec::Runtime::Process(process)) = spec.runtime.as_mut() else {
        bail!("the sample spec is not a process function");
    };
    let sample = std::mem::take(&mut process.command);
    process.command = "sh".into();
    process.args = vec!["-c".into(), TICKER.into(), sample];
    Ok(spec)
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// The READY instances of `name` in the local tier the agent serves its sidecars: what the
/// running agent itself booked (never a report left by its predecessor).
async fn served_instances(agent: &Agent, name: &str) -> Result<BTreeSet<String>> {
    let table = agent.table().await?.context("the agent serves no table")?;
    let route = table
        .functions
        .iter()
        .find(|f| f.name == name)
        .with_context(|| format!("no route for {name}"))?;
    Ok(route
        .tiers
        .iter()
        .filter(|tier| tier.local)
        .flat_map(|tier| &tier.endpoints)
        .filter(|endpoint| endpoint.state == EndpointState::Ready as i32)
        .map(|endpoint| endpoint.id.clone())
        .collect())
}

/// `meridian_instance_restarts` of `name` on the agent's own `/metrics`.
async fn restarts_metric(agent: &Agent, name: &str) -> Result<f64> {
    let metrics = agent.metrics().await?;
    let series = format!(
        "meridian_instance_restarts_total{{namespace=\"default\",function=\"{name}\",region=\"{}\"}}",
        agent.region()
    );
    metric_value(&metrics, &series).with_context(|| format!("no {series} in:\n{metrics}"))
}

/// Waits until `name` has `count` instance processes and returns them (pid → instance id).
async fn leaders(name: &str, count: usize) -> Result<BTreeMap<u32, String>> {
    poll_until(
        Duration::from_secs(20),
        &format!("{count} instance processes of {name}"),
        || async {
            let found = instance_leaders("default", name);
            ensure!(found.len() == count, "instance processes: {found:?}");
            Ok(found)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_under_load_adopts_its_live_instances_with_no_restart_and_no_failure(
) -> Result<()> {
    within_budget(async {
        let began = Instant::now();
        // `sh` for the ticker: /usr/bin and /bin are allowed next to the sample function.
        let mut world = World::start_with_agents(
            &["us-east"],
            Relay::new(),
            SidecarOpts::default(),
            |_, _| AgentOpts {
                command_roots: vec!["/usr/bin".into(), "/bin".into()],
                ..AgentOpts::default()
            },
        )
        .await?;
        let cp = world.mesh.cp().url();
        let function = ProcessFunction {
            min_instances: 2,
            max_instances: 2,
            ..ProcessFunction::sample("steady")
        };
        world.apply(ticking_spec(&function)?).await?;
        wait_scale(
            &cp,
            "steady",
            "us-east",
            Duration::from_secs(20),
            "two ready instances",
            |s| s.ready == 2 && s.starting == 0,
        )
        .await?;
        world
            .wait_served("us-east", "steady", "us-east", Duration::from_secs(10))
            .await?;
        let before = leaders("steady", 2).await?;
        let ids: BTreeSet<String> = before.values().cloned().collect();
        ensure!(
            served_instances(&world.mesh.agents[0], "steady").await? == ids,
            "the agent serves other instances than run: {before:?}"
        );

        // 100 requests a second through the sidecar, open loop, across the kill and restart.
        let load = Load::start(
            &world.sidecar("us-east").client(),
            LoadSpec::get("steady", 100, Duration::from_secs(10)),
        );
        // Pacing, not waiting for state: two seconds of load before the kill.
        tokio::time::sleep_until(load.started() + Duration::from_secs(2)).await;
        let logs: Vec<_> = ids
            .iter()
            .map(|id| world.mesh.agents[0].instance_log("default", "steady", id))
            .collect();
        let sizes_at_kill: Vec<u64> = logs
            .iter()
            .map(|log| std::fs::metadata(log).map_or(0, |m| m.len()))
            .collect();
        world.mesh.agents[0].kill();
        let down = Instant::now();
        // With no agent at all, the instances write on: their stdout is the file itself.
        poll_until(
            Duration::from_secs(5),
            "the instances' logs to grow while no agent runs",
            || async {
                for (log, size) in logs.iter().zip(&sizes_at_kill) {
                    let now = std::fs::metadata(log)?.len();
                    ensure!(now > *size, "{} still {now} bytes", log.display());
                }
                Ok(())
            },
        )
        .await?;
        world.mesh.agents[0].restart().await?;
        let down_for = down.elapsed();
        let restarted_at_ms = unix_ms();

        // The same processes under the same ids, booked READY by the restarted agent.
        let after = instance_leaders("default", "steady");
        ensure!(
            after == before,
            "instances before the kill {before:?}, after the restart {after:?}"
        );
        let served = served_instances(&world.mesh.agents[0], "steady").await?;
        ensure!(
            served == ids,
            "the restarted agent serves {served:?}, not the adopted {ids:?}"
        );

        let report = load.finish().await?;
        let failures = report.failures();
        ensure!(failures.is_empty(), "requests failed: {}", report.summary());
        ensure!(
            report.outcomes.len() >= 990,
            "too few requests: {}",
            report.summary()
        );

        let restarts = restarts_metric(&world.mesh.agents[0], "steady").await?;
        ensure!(restarts == 0.0, "the restarted agent counts {restarts} restarts");
        // An adopted instance is no cold start (it started long before this agent).
        let metrics = world.mesh.agents[0].metrics().await?;
        let cold_starts = metrics
            .lines()
            .find(|line| line.starts_with("meridian_instance_cold_start_seconds_count"))
            .with_context(|| format!("no cold-start count in:\n{metrics}"))?;
        ensure!(
            cold_starts.ends_with(" 0"),
            "the restarted agent counts adopted instances as cold starts: {cold_starts}"
        );
        let scale = wait_scale(
            &cp,
            "steady",
            "us-east",
            Duration::from_secs(10),
            "the adopted instances reported",
            |s| {
                s.ready == 2
                    && s.restarts == 0
                    && s.instances.iter().map(|i| i.id.clone()).collect::<BTreeSet<_>>() == ids
            },
        )
        .await?;
        let still = instance_leaders("default", "steady");
        ensure!(still == before, "instances changed after the load: {still:?}");

        // Their logs go on: lines stamped after the restart, through `meridianctl logs`.
        let shown = poll_until(
            Duration::from_secs(10),
            "lines written after the restart in meridianctl logs",
            || async {
                let out = world.mesh.cp().ctl(["logs", "steady", "--tail", "30"]).await?;
                let text = output_text(&out);
                ensure!(out.status.success(), "logs failed: {text}");
                let mut after_restart = BTreeMap::new();
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    let Some((prefix, stamp)) = line.split_once("] tick ") else {
                        continue;
                    };
                    let (Some(id), Ok(stamp)) =
                        (prefix.strip_prefix("[us-east/"), stamp.parse::<u128>())
                    else {
                        continue;
                    };
                    if stamp > restarted_at_ms {
                        *after_restart.entry(id.to_string()).or_insert(0) += 1;
                    }
                }
                ensure!(
                    ids.iter().all(|id| after_restart.contains_key(id)),
                    "lines after the restart by instance: {after_restart:?}\n{text}"
                );
                Ok(after_restart)
            },
        )
        .await?;
        let grown: Vec<u64> = logs
            .iter()
            .map(|log| std::fs::metadata(log).map_or(0, |m| m.len()))
            .collect();
        ensure!(
            grown.iter().zip(&sizes_at_kill).all(|(now, then)| now > then),
            "log sizes at the kill {sizes_at_kill:?}, now {grown:?}"
        );

        println!(
            "agent down {down_for:?}; {}; instances before {before:?}, after {still:?}; \
             restarts {restarts}; tick lines after the restart {shown:?}; log bytes {sizes_at_kill:?} \
             -> {grown:?}; {}; test took {:?}",
            report.summary(),
            describe_scale(&scale),
            began.elapsed()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_with_keep_instances_on_exit_leaves_instances_to_the_next_start() -> Result<()> {
    within_budget(async {
        let mut mesh = Mesh::start_with(1, &["us-east"], |_, _| AgentOpts {
            extra_args: vec!["--keep-instances-on-exit".into()],
            ..AgentOpts::default()
        })
        .await?;
        let function = ProcessFunction {
            min_instances: 1,
            ..ProcessFunction::sample("kept")
        };
        apply(&mut mesh.cp().functions().await?, function.spec()?).await?;
        wait_scale(
            &mesh.cp().url(),
            "kept",
            "us-east",
            Duration::from_secs(20),
            "one ready instance",
            |s| s.ready == 1 && s.starting == 0,
        )
        .await?;
        let before = leaders("kept", 1).await?;

        // SIGTERM: the agent exits, its instance stays, and the next start adopts it.
        mesh.agents[0].restart().await?;
        let log = mesh.agents[0].process().log();
        ensure!(
            log.contains("leaving the ready function instances running"),
            "the agent did not say it left its instances: {log}"
        );
        let after = instance_leaders("default", "kept");
        ensure!(after == before, "before {before:?}, after {after:?}");
        let ids: BTreeSet<String> = before.values().cloned().collect();
        let served = served_instances(&mesh.agents[0], "kept").await?;
        ensure!(served == ids, "served {served:?}, adopted {ids:?}");
        let restarts = restarts_metric(&mesh.agents[0], "kept").await?;
        ensure!(restarts == 0.0, "{restarts} restarts");
        Ok(())
    })
    .await
}

/// A child of the test in a process group of its own: `sleep 60`, as `uid` if given.
fn spawn_sleep(ids: Option<(u32, u32)>) -> Result<std::process::Child> {
    let mut command = std::process::Command::new("sleep");
    command.arg("60").process_group(0);
    if let Some((uid, gid)) = ids {
        command.uid(uid).gid(gid);
    }
    command.spawn().context("spawning sleep")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_reaps_what_it_cannot_vouch_for_and_never_kills_a_stranger() -> Result<()>
{
    within_budget(async {
        let mut mesh = Mesh::start(1, &["us-east"]).await?;
        let cp = mesh.cp().url();
        let function = ProcessFunction {
            min_instances: 2,
            ..ProcessFunction::sample("wary")
        };
        apply(&mut mesh.cp().functions().await?, function.spec()?).await?;
        wait_scale(
            &cp,
            "wary",
            "us-east",
            Duration::from_secs(20),
            "two ready",
            |s| s.ready == 2 && s.starting == 0,
        )
        .await?;
        let before = leaders("wary", 2).await?;
        let mut instances = before.iter();
        let (good_pid, good_id) = instances.next().context("no instance")?;
        let (stuck_pid, stuck_id) = instances.next().context("no second instance")?;
        mesh.agents[0].kill();
        // One stops answering: its port still accepts connections, its /healthz never answers.
        // (Stopped only now: a group that the agent's death orphans while one of its members is
        // stopped gets SIGHUP from the kernel, which would end it before the test begins.)
        kill(Pid::from_raw(i32::try_from(*stuck_pid)?), Signal::SIGSTOP)?;
        let mut records = mesh.agents[0].instance_records()?;
        let template = records
            .iter()
            .find(|r| r["instance"] == good_id.as_str())
            .cloned()
            .context("the good instance is not recorded")?;
        let mut forged = |instance: &str, pid: u32, start_time: u64| {
            let mut record = template.clone();
            record["instance"] = instance.into();
            record["pid"] = pid.into();
            record["pgid"] = pid.into();
            record["start_time"] = start_time.into();
            records.push(record);
        };
        // A stranger has a recorded pid now: the record's start time is not the stranger's.
        let mut stranger = spawn_sleep(None)?;
        let stranger_start = process_start_time(stranger.id()).context("stranger gone")?;
        forged("wary-5712a9", stranger.id(), stranger_start + 12_345);
        // Ours by pid and start time, but it runs another command line than recorded.
        let mut changed = spawn_sleep(Some(instance_ids()?))?;
        let changed_start = process_start_time(changed.id()).context("changed gone")?;
        forged("wary-c0ffee", changed.id(), changed_start);
        // Recorded, and gone.
        let mut gone = std::process::Command::new("true").spawn()?;
        let gone_pid = gone.id();
        gone.wait()?;
        forged("wary-90e000", gone_pid, 1);
        mesh.agents[0].write_instance_records(&records)?;

        mesh.agents[0].restart().await?;
        // The good one is adopted, the stuck one reaped and replaced.
        let now = poll_until(
            Duration::from_secs(20),
            "the good instance adopted and a replacement for the stuck one",
            || async {
                let now = instance_leaders("default", "wary");
                ensure!(now.len() == 2, "{now:?}");
                ensure!(
                    now.get(good_pid) == Some(good_id),
                    "good one not there: {now:?}"
                );
                ensure!(
                    !now.contains_key(stuck_pid),
                    "stuck one still there: {now:?}"
                );
                Ok(now)
            },
        )
        .await?;
        ensure!(
            !process_running(*stuck_pid),
            "the instance that failed readiness still runs"
        );
        let reported = wait_scale(
            &cp,
            "wary",
            "us-east",
            Duration::from_secs(20),
            "the adopted and the replacement reported",
            |s| {
                let reported: BTreeSet<u32> = s.instances.iter().map(|i| i.pid).collect();
                s.ready == 2 && reported == now.keys().copied().collect()
            },
        )
        .await
        .with_context(|| {
            format!(
                "expected the instances {now:?}; running now: {:?}",
                instance_leaders("default", "wary")
            )
        })?;
        ensure!(
            !reported
                .instances
                .iter()
                .any(|i| i.id == "wary-5712a9" || i.id == "wary-c0ffee"),
            "a forged record was adopted: {}",
            describe_scale(&reported)
        );
        // Ours but another command line: killed. The stranger: untouched.
        let status = poll_until(Duration::from_secs(10), "the changed one killed", || {
            let exited = changed.try_wait();
            async move {
                match exited? {
                    Some(status) => Ok(status),
                    None => bail!("still running"),
                }
            }
        })
        .await?;
        ensure!(status.signal() == Some(9), "changed one ended {status:?}");
        ensure!(
            stranger.try_wait()?.is_none(),
            "the stranger holding a recorded pid was killed"
        );
        let log = mesh.agents[0].process().log();
        for said in [
            "not ready within",
            "its command line",
            "now names another process",
            "forgot a recorded instance without signalling it",
            "adopted an instance left running by the previous agent",
        ] {
            ensure!(
                log.contains(said),
                "the agent's log does not say {said:?}:\n{log}"
            );
        }
        let scale = region_scale(&cp, "wary", "us-east").await?;
        println!(
            "adopted {good_id} ({good_pid}), reaped {stuck_id} ({stuck_pid}) and the changed \
             one ({status}), stranger {} left alone; {}",
            stranger.id(),
            describe_scale(&scale)
        );
        stranger.kill()?;
        stranger.wait()?;
        Ok(())
    })
    .await
}
