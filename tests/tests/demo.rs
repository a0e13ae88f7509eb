//! The README's first command, as a new user runs it: `deploy/local/run.sh` brings up the mesh
//! and serves `hello` through us-east's sidecar; killing etcd is reported and the rest keeps
//! running, and calls through the sidecar still answer; SIGTERM (as Ctrl-C) stops everything.
//! The demo binds its fixed ports (2379, 7000, 15001, ...), below the range the other tests
//! take theirs from.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use http::StatusCode;
use meridian_tests::http::MeshClient;
use meridian_tests::{poll_until, workspace_root};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The whole test's budget: the script builds nothing new (the binaries are built), starts 13
/// processes and applies the sample functions.
const BUDGET: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_keeps_serving_when_etcd_dies_and_stops_on_sigterm() -> Result<()> {
    tokio::time::timeout(BUDGET, demo())
        .await
        .with_context(|| format!("the test took more than {BUDGET:?}"))?
}

fn log_text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

async fn demo() -> Result<()> {
    if TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 7000))).is_err() {
        bail!("127.0.0.1:7000 is taken: stop the running demo (deploy/local/run.sh) first");
    }
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("run.log");
    let log = std::fs::File::create(&log_path)?;
    let root = workspace_root();
    let mut script = tokio::process::Command::new(root.join("deploy/local/run.sh"))
        .current_dir(&root)
        .env("TMPDIR", std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting deploy/local/run.sh")?;
    let script_pid =
        Pid::from_raw(i32::try_from(script.id().context("the script has no pid")?).context("pid")?);
    let result = scenario(&log_path).await;
    // As Ctrl-C does: the script's trap stops every component it started.
    let _ = kill(script_pid, Signal::SIGTERM);
    let stopped = tokio::time::timeout(Duration::from_secs(60), script.wait()).await;
    let text = log_text(&log_path);
    result.with_context(|| format!("the demo's output:\n{text}"))?;
    ensure!(
        stopped.is_ok(),
        "the script did not stop within 60 s of SIGTERM:\n{text}"
    );
    ensure!(
        text.contains("==> stopped"),
        "the script must say it stopped everything:\n{text}"
    );
    ensure!(
        TcpListener::bind(SocketAddr::from((Ipv4Addr::new(127, 0, 1, 1), 15001))).is_ok(),
        "us-east's sidecar still listens after the stop"
    );
    Ok(())
}

async fn scenario(log_path: &std::path::Path) -> Result<()> {
    poll_until(
        Duration::from_secs(200),
        "the demo to say it is running",
        || async {
            let text = log_text(log_path);
            ensure!(
                !text.contains("\nerror:"),
                "the demo failed to start:\n{text}"
            );
            ensure!(text.contains("Meridian is running"), "not yet");
            Ok(())
        },
    )
    .await?;
    let text = log_text(log_path);
    let etcd_pid: i32 = text
        .lines()
        .find_map(|l| l.strip_prefix("==> started etcd (pid "))
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .context("no 'started etcd (pid N)' line")?;

    let sidecar = SocketAddr::from((Ipv4Addr::new(127, 0, 1, 1), 15001));
    let client = MeshClient::http1(sidecar);
    let reply = client.get("hello", "/").await?;
    ensure!(
        reply.status == StatusCode::OK && reply.region() == Some("us-east"),
        "hello through us-east's sidecar: {}",
        reply.describe()
    );

    kill(Pid::from_raw(etcd_pid), Signal::SIGKILL).context("killing etcd")?;
    poll_until(
        Duration::from_secs(20),
        "the demo to report etcd's exit",
        || async {
            ensure!(log_text(log_path).contains("etcd exited"), "not yet");
            Ok(())
        },
    )
    .await?;
    for _ in 0..10 {
        let reply = client.get("hello", "/").await?;
        ensure!(
            reply.status == StatusCode::OK,
            "with etcd gone, hello through us-east's sidecar: {}",
            reply.describe()
        );
    }
    ensure!(
        !log_text(log_path).contains("==> stopping"),
        "one component's death must not stop the rest"
    );
    Ok(())
}
