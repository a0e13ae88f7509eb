//! Runtime tests with real processes (`sh -c ...`). An instance's "readiness" is simulated by
//! the test itself: it binds the instance's address (the process is a plain `sleep`), which keeps
//! the tests free of anything but `sh` and `sleep`. The allowed command roots are `/usr/bin` and
//! `/bin`, where those live; run as root, the tests run instances as `nobody`, like an agent
//! with `--run-as nobody`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::records::{group_has_live_members, process_start_time, records_path, ProcessRecord};
use super::*;

const WAIT: Duration = Duration::from_secs(10);

/// The user instances run as when the tests run as root.
const RUN_AS: &str = "nobody";

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Roots where `sh`, `sleep` and `id` are; as root, instances run as [`RUN_AS`].
fn policy() -> CommandPolicy {
    let roots = [PathBuf::from("/usr/bin"), PathBuf::from("/bin")];
    let run_as = running_as_root().then(|| RunAs::lookup(RUN_AS).unwrap());
    CommandPolicy::new(&roots, run_as).unwrap()
}

/// A state directory that [`RUN_AS`] can traverse to its working directory: under the temp dir
/// when every directory above it lets others through (a `TMPDIR` under `/root` does not), else
/// under `/tmp`.
fn state_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let temp = std::env::temp_dir();
    let traversable = temp
        .ancestors()
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    let base = if traversable {
        temp
    } else {
        PathBuf::from("/tmp")
    };
    tempfile::tempdir_in(base).unwrap()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn config(dir: &Path) -> RuntimeConfig {
    RuntimeConfig {
        state_dir: dir.to_owned(),
        policy: policy(),
        instance_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        region: "eu-west".into(),
        stop_grace: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(10),
        adoption_hold: Duration::from_secs(10),
    }
}

fn shell(script: &str) -> ProcessRuntime {
    ProcessRuntime {
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        env: HashMap::new(),
        readiness_path: String::new(),
    }
}

fn key() -> FunctionKey {
    FunctionKey::new("default", "hello")
}

async fn start(dir: &Path) -> Runtime {
    Runtime::start(config(dir), Arc::new(NoDrainGate))
        .await
        .unwrap()
}

/// Polls the snapshots until `condition` holds; panics with the last snapshot after [`WAIT`].
async fn wait_for<F>(runtime: &Runtime, what: &str, mut condition: F) -> Arc<Snapshot>
where
    F: FnMut(&Snapshot) -> bool,
{
    let mut rx = runtime.subscribe();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let snapshot = Arc::clone(&rx.borrow_and_update());
        if condition(&snapshot) {
            return snapshot;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!("timed out waiting for {what}; last snapshot: {snapshot:#?}");
        }
    }
}

fn function<'a>(snapshot: &'a Snapshot, key: &FunctionKey) -> Option<&'a FunctionRuntime> {
    snapshot.functions.get(key)
}

fn instances_in(snapshot: &Snapshot, state: InstanceState) -> Vec<InstanceInfo> {
    function(snapshot, &key())
        .map(|f| {
            f.instances
                .iter()
                .filter(|i| i.state == state)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Serves HTTP on `address`: 200 for `GET /healthz`, 404 for anything else. Answering on the
/// port also makes a TCP readiness probe pass.
async fn serve_health(address: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(address).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let status = if buf[..n].starts_with(b"GET /healthz ") {
                    "200 OK"
                } else {
                    "404 Not Found"
                };
                let response = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    })
}

/// Waits for one STARTING instance (of those not in `known`) and makes it ready.
async fn make_one_ready(
    runtime: &Runtime,
    known: &mut Vec<String>,
) -> (InstanceInfo, tokio::task::JoinHandle<()>) {
    let snapshot = wait_for(runtime, "a new starting instance", |s| {
        instances_in(s, InstanceState::Starting)
            .iter()
            .any(|i| !known.contains(&i.id))
    })
    .await;
    let instance = instances_in(&snapshot, InstanceState::Starting)
        .into_iter()
        .find(|i| !known.contains(&i.id))
        .unwrap();
    known.push(instance.id.clone());
    // The test answers the readiness probe itself, so readiness could come before the shell
    // has exec'd its command, and the cmdline recorded at readiness would be the shell's: a
    // real instance serves its own probe, after its exec. Wait for the exec.
    wait_for_exec(instance.pid).await;
    let server = serve_health(instance.address).await;
    let id = instance.id.clone();
    wait_for(runtime, "the instance to be ready", |s| {
        instances_in(s, InstanceState::Ready)
            .iter()
            .any(|i| i.id == id)
    })
    .await;
    (instance, server)
}

/// Waits (up to [`WAIT`]) until a `sh -c 'exec …'` instance has exec'd its command.
async fn wait_for_exec(pid: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let cmdline = records::read_cmdline(pid).unwrap_or_default();
        let before_exec = matches!(
            cmdline.as_slice(),
            [sh, c, script] if sh == "sh" && c == "-c" && script.starts_with("exec ")
        );
        if !before_exec {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pid {pid} never exec'd: {cmdline:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The first `count` log lines of `key`'s instances (of `instance` only if given): the backlog,
/// then new lines as the agent reads them; panics after [`WAIT`].
async fn first_lines(
    runtime: &Runtime,
    key: &FunctionKey,
    instance: Option<&str>,
    count: usize,
) -> Vec<LogLine> {
    let mut follow = runtime
        .logs(key, instance.map(str::to_owned), 1000, true)
        .unwrap();
    let mut lines = Vec::new();
    while lines.len() < count {
        match tokio::time::timeout(WAIT, follow.next()).await {
            Ok(Some(line)) => lines.push(line),
            _ => panic!("timed out waiting for {count} log lines; got {lines:?}"),
        }
    }
    lines
}

fn pid_alive(pid: u32) -> bool {
    // A reaped child has no /proc entry; a zombie would still have one, but the runtime reaps.
    process_start_time(pid).is_some()
}

/// A gate the test opens by hand; remembers who asked.
#[derive(Default)]
struct ManualGate {
    open: Mutex<Option<watch::Sender<bool>>>,
    asked: Mutex<Vec<String>>,
}

impl ManualGate {
    fn new() -> Arc<Self> {
        let gate = Arc::new(Self::default());
        *gate.open.lock().unwrap() = Some(watch::channel(false).0);
        gate
    }

    fn open(&self) {
        if let Some(open) = self.open.lock().unwrap().as_ref() {
            open.send_replace(true);
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl DrainGate for ManualGate {
    fn drained(&self, instance_id: &str) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.asked.lock().unwrap().push(instance_id.to_owned());
        let mut open = self.open.lock().unwrap().as_ref().unwrap().subscribe();
        Box::pin(async move {
            let _ = open.wait_for(|open| *open).await;
        })
    }
}

#[test]
fn the_handle_is_cheap_to_share() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Runtime>();
}

#[tokio::test]
async fn instance_gets_its_env_logs_and_becomes_ready() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    let mut process = shell(
        "echo \"port=$PORT host=$HOST region=$REGION id=$INSTANCE_ID fn=$MERIDIAN_FUNCTION \
         foo=$FOO agent_env=$CARGO_MANIFEST_DIR\"; echo err >&2; echo \"pwd=$(pwd)\"; exec sleep 30",
    );
    process.env.insert("FOO".into(), "bar".into());
    // The agent's own environment is not passed on (only PATH, HOME and the like); cargo sets
    // CARGO_MANIFEST_DIR for the test process.
    runtime.set(key(), process, 1);

    let mut known = Vec::new();
    let (instance, _server) = make_one_ready(&runtime, &mut known).await;
    assert!(instance.id.starts_with("hello-"));
    assert_eq!(instance.id.len(), "hello-".len() + 6);
    assert!(instance.id["hello-".len()..]
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_eq!(instance.address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert!(pid_alive(instance.pid));

    let snapshot = runtime.snapshot();
    let status = function(&snapshot, &key()).unwrap();
    assert_eq!(status.ready(), 1);
    assert_eq!(status.starts, 1);
    assert!(status.cold_start.is_some());
    assert!(status.cold_start_ms() >= 1);
    assert!(status.instances[0].ready.is_some());

    // The agent reads the log file as it grows: the lines may still be on their way.
    let lines = first_lines(&runtime, &key(), None, 3).await;
    let work_dir = dir
        .path()
        .join("instances/default/hello")
        .join(&instance.id);
    let expected = format!(
        "port={} host=127.0.0.1 region=eu-west id={} fn=default/hello foo=bar agent_env=",
        instance.address.port(),
        instance.id
    );
    // Stdout and stderr share the log file: in the order written, named "output" (the file
    // cannot tell them apart).
    let texts: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
    let pwd = format!("pwd={}", work_dir.display());
    assert_eq!(texts, [expected.as_str(), "err", pwd.as_str()], "{lines:?}");
    assert!(lines.iter().all(|l| l.stream == "output"), "{lines:?}");
    assert!(lines.iter().all(|l| l.region == "eu-west"));

    let log_file = dir
        .path()
        .join("logs/default/hello")
        .join(format!("{}.log", instance.id));
    // The instance writes the file itself (it is its stdout and stderr); the shell may still be
    // writing: poll it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = std::fs::read_to_string(&log_file).unwrap_or_default();
        if (text.contains(&expected) && text.contains("err\n") && text.contains(&pwd))
            || tokio::time::Instant::now() >= deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(text.contains(&expected), "{text}");
    assert!(text.contains("err\n"), "{text}");
    assert_eq!(text, format!("{expected}\nerr\n{pwd}\n"));

    // The record is written beside the start, not before readiness is reported: poll it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let records = loop {
        let records = records::read(&records_path(dir.path())).unwrap();
        if records.len() == 1 || tokio::time::Instant::now() >= deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].pid, instance.pid);
    assert_eq!(records[0].instance, instance.id);
    assert_eq!(records[0].function, "default/hello");

    runtime.shutdown().await;
    assert!(!pid_alive(instance.pid));
    assert!(records::read(&records_path(dir.path())).unwrap().is_empty());
    assert!(!work_dir.exists());
}

#[tokio::test]
async fn http_readiness_needs_a_2xx_on_the_path() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    let mut healthy = shell("exec sleep 30");
    healthy.readiness_path = "/healthz".into();
    runtime.set(key(), healthy, 1);
    let mut known = Vec::new();
    make_one_ready(&runtime, &mut known).await;

    let other = FunctionKey::new("default", "other");
    let mut wrong_path = shell("exec sleep 30");
    wrong_path.readiness_path = "/missing".into();
    runtime.set(other.clone(), wrong_path, 1);
    let snapshot = wait_for(&runtime, "other starting", |s| {
        function(s, &other).is_some_and(|f| f.starting() == 1)
    })
    .await;
    let instance = function(&snapshot, &other).unwrap().instances[0].clone();
    let _server = serve_health(instance.address).await;
    // The port accepts, but /missing answers 404: it stays STARTING.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = runtime.snapshot();
    assert_eq!(function(&status, &other).unwrap().starting(), 1);
    assert_eq!(function(&status, &other).unwrap().ready(), 0);
    runtime.shutdown().await;
}

#[tokio::test]
async fn crash_loop_is_reported_with_the_last_exit_and_lines() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    runtime.set(key(), shell("echo starting; echo boom >&2; exit 3"), 1);
    let snapshot = wait_for(&runtime, "CrashLoopBackOff", |s| {
        function(s, &key()).is_some_and(|f| f.error.is_some())
    })
    .await;
    let status = function(&snapshot, &key()).unwrap();
    assert_eq!(
        status.error.as_deref(),
        Some("CrashLoopBackOff: exit code 3")
    );
    assert!(status.restarts >= 3, "{status:?}");
    assert_eq!(status.last_exit.as_deref(), Some("exit code 3"));
    assert_eq!(status.last_log_lines, vec!["starting", "boom"]);
    assert_eq!(status.starts, 0);

    // Each restart is a new instance id, and carries the slot's restart count.
    let snapshot = wait_for(&runtime, "a restarted instance", |s| {
        function(s, &key()).is_some_and(|f| f.instances.iter().any(|i| i.restarts >= 3))
    })
    .await;
    assert!(function(&snapshot, &key()).unwrap().instances.len() <= 1);

    // Logs of the exited instances stay readable.
    let lines: Vec<LogLine> = runtime
        .logs(&key(), None, 10, false)
        .unwrap()
        .collect()
        .await;
    let instances: std::collections::BTreeSet<_> = lines.iter().map(|l| &l.instance).collect();
    assert!(instances.len() >= 3, "{lines:?}");
    runtime.shutdown().await;
}

fn crash(snapshot: &Snapshot, key: &FunctionKey) -> CrashState {
    snapshot.crashes.get(key).copied().unwrap_or_default()
}

#[tokio::test]
async fn failed_starts_and_the_restart_backoff_are_published_for_sidecars() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    // Exits before it is ready, again and again: failed starts, each waited out in backoff.
    runtime.set(key(), shell("exit 3"), 1);
    let snapshot = wait_for(&runtime, "two failed starts in restart backoff", |s| {
        crash(s, &key()).failed_starts >= 2 && crash(s, &key()).restart_backoff
    })
    .await;
    assert!(function(&snapshot, &key()).unwrap().instances.is_empty());

    // Killed by a signal after it was ready: no failed start, but a restart in backoff, and
    // no more backoff once the replacement runs.
    let other = FunctionKey::new("default", "other");
    runtime.set(other.clone(), shell("exec sleep 30"), 1);
    let snapshot = wait_for(&runtime, "other starting", |s| {
        function(s, &other).is_some_and(|f| f.starting() == 1)
    })
    .await;
    let first = function(&snapshot, &other).unwrap().instances[0].clone();
    let _server = serve_health(first.address).await;
    let snapshot = wait_for(&runtime, "other ready", |s| {
        function(s, &other).is_some_and(|f| f.ready() == 1)
    })
    .await;
    assert_eq!(crash(&snapshot, &other), CrashState::default());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(first.pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let snapshot = wait_for(&runtime, "the restart backoff after the kill", |s| {
        crash(s, &other).restart_backoff
    })
    .await;
    assert_eq!(crash(&snapshot, &other).failed_starts, 0);
    let status = function(&snapshot, &other).unwrap();
    assert!(status.instances.is_empty(), "{status:?}");
    let snapshot = wait_for(&runtime, "the replacement", |s| {
        function(s, &other).is_some_and(|f| f.starting() == 1)
    })
    .await;
    assert!(!crash(&snapshot, &other).restart_backoff);
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_command_that_cannot_start_is_an_error_retried_with_backoff() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    let process = ProcessRuntime {
        command: "/nonexistent/meridian-test-command".into(),
        ..ProcessRuntime::default()
    };
    runtime.set(key(), process, 1);
    let snapshot = wait_for(&runtime, "the start error", |s| {
        function(s, &key()).is_some_and(|f| f.error.is_some())
    })
    .await;
    let error = function(&snapshot, &key()).unwrap().error.clone().unwrap();
    assert!(
        error.starts_with("cannot start: command \"/nonexistent/meridian-test-command\": "),
        "{error}"
    );
    // Backoff, not a spin: attempts at 0, 0.2, 0.6, 1.4 s... Each attempt opens its log file
    // before the spawn, so the files count the attempts.
    let began = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let attempts = std::fs::read_dir(dir.path().join("logs/default/hello"))
        .unwrap()
        .count();
    let elapsed = began.elapsed();
    assert!(
        (2..=4).contains(&attempts),
        "{attempts} attempts in {elapsed:?}"
    );
    let snapshot = runtime.snapshot();
    let status = function(&snapshot, &key()).unwrap();
    // Spawn failures are not exits.
    assert_eq!(status.restarts, 0);
    assert!(status.instances.is_empty());

    // A fixed spec clears the error.
    runtime.set(key(), shell("exec sleep 30"), 1);
    let mut known = Vec::new();
    make_one_ready(&runtime, &mut known).await;
    assert_eq!(function(&runtime.snapshot(), &key()).unwrap().error, None);
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_crash_after_ready_restarts_under_a_new_id() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    // Exits as soon as its "port" is answered (the test binds it): ready, then a crash.
    runtime.set(key(), shell("sleep 0.5; exit 1"), 1);
    let mut known = Vec::new();
    let (first, _server) = make_one_ready(&runtime, &mut known).await;
    let snapshot = wait_for(&runtime, "a replacement", |s| {
        function(s, &key()).is_some_and(|f| f.instances.iter().any(|i| i.id != first.id))
    })
    .await;
    let status = function(&snapshot, &key()).unwrap();
    assert_eq!(status.restarts, 1);
    assert_eq!(status.last_exit.as_deref(), Some("exit code 1"));
    // It had become ready: not a CrashLoopBackOff.
    assert_eq!(status.error, None);
    assert_eq!(status.instances[0].restarts, 1);
    runtime.shutdown().await;
}

#[tokio::test]
async fn scale_down_drains_through_the_gate_then_stops() {
    let dir = state_dir();
    let gate = ManualGate::new();
    let runtime = Runtime::start(config(dir.path()), gate.clone())
        .await
        .unwrap();
    runtime.set(key(), shell("exec sleep 30"), 2);
    let mut known = Vec::new();
    let (_a, _server_a) = make_one_ready(&runtime, &mut known).await;
    let (_b, _server_b) = make_one_ready(&runtime, &mut known).await;

    runtime.set(key(), shell("exec sleep 30"), 1);
    let snapshot = wait_for(&runtime, "one draining", |s| {
        instances_in(s, InstanceState::Draining).len() == 1
    })
    .await;
    let draining = instances_in(&snapshot, InstanceState::Draining)[0].clone();
    assert_eq!(instances_in(&snapshot, InstanceState::Ready).len(), 1);
    // Held by the gate.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(pid_alive(draining.pid));
    assert_eq!(gate.asked(), vec![draining.id.clone()]);

    gate.open();
    wait_for(&runtime, "the drained instance gone", |s| {
        function(s, &key()).is_some_and(|f| f.instances.len() == 1)
    })
    .await;
    assert!(!pid_alive(draining.pid));
    runtime.shutdown().await;
}

#[tokio::test]
async fn drain_is_bounded_by_the_timeout_and_starting_instances_stop_at_once() {
    let dir = state_dir();
    let gate = ManualGate::new();
    let mut config = config(dir.path());
    config.drain_timeout = Duration::from_millis(300);
    let runtime = Runtime::start(config, gate.clone()).await.unwrap();
    runtime.set(key(), shell("exec sleep 30"), 1);
    let mut known = Vec::new();
    let (ready, _server) = make_one_ready(&runtime, &mut known).await;

    // A never-ready instance is not routed to: it stops without asking the gate.
    let starting_key = FunctionKey::new("default", "slow");
    runtime.set(starting_key.clone(), shell("exec sleep 30"), 1);
    wait_for(&runtime, "slow starting", |s| {
        function(s, &starting_key).is_some_and(|f| f.starting() == 1)
    })
    .await;
    runtime.remove(&starting_key);
    wait_for(&runtime, "slow gone", |s| {
        function(s, &starting_key).is_none()
    })
    .await;

    let began = Instant::now();
    runtime.remove(&key());
    wait_for(&runtime, "hello gone", |s| function(s, &key()).is_none()).await;
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert_eq!(gate.asked(), vec![ready.id.clone()]);
    assert!(!pid_alive(ready.pid));
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_changed_spec_starts_new_instances_before_draining_old_ones() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    runtime.set(key(), shell("exec sleep 30"), 1);
    let mut known = Vec::new();
    let (old, _old_server) = make_one_ready(&runtime, &mut known).await;

    runtime.set(key(), shell("exec sleep 31"), 1);
    let snapshot = wait_for(&runtime, "the new instance starting", |s| {
        instances_in(s, InstanceState::Starting).len() == 1
    })
    .await;
    // The old one keeps serving while the new one starts.
    let ready = instances_in(&snapshot, InstanceState::Ready);
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].id, old.id);

    let (new, _new_server) = make_one_ready(&runtime, &mut known).await;
    let snapshot = wait_for(&runtime, "only the new one", |s| {
        function(s, &key()).is_some_and(|f| f.instances.len() == 1 && f.ready() == 1)
    })
    .await;
    assert_eq!(function(&snapshot, &key()).unwrap().instances[0].id, new.id);
    assert!(!pid_alive(old.pid));
    runtime.shutdown().await;
}

#[tokio::test]
async fn shutdown_escalates_to_sigkill_after_the_grace() {
    let dir = state_dir();
    let mut config = config(dir.path());
    config.stop_grace = Duration::from_millis(400);
    let runtime = Runtime::start(config, Arc::new(NoDrainGate)).await.unwrap();
    // Ignores SIGTERM, and so does the sleep it forks (an ignored signal stays ignored).
    runtime.set(
        key(),
        shell("trap '' TERM; echo trapped; while true; do sleep 0.05; done"),
        1,
    );
    // Signals only once the trap is set.
    let mut follow = runtime.logs(&key(), None, 10, true).unwrap();
    let line = tokio::time::timeout(WAIT, follow.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.line, "trapped");
    let snapshot = wait_for(&runtime, "spawned", |s| {
        function(s, &key()).is_some_and(|f| f.instances.len() == 1)
    })
    .await;
    let pid = function(&snapshot, &key()).unwrap().instances[0].pid;
    let began = Instant::now();
    runtime.shutdown().await;
    assert!(began.elapsed() >= Duration::from_millis(400));
    assert!(!pid_alive(pid));
    assert!(!group_has_live_members(pid));
    // Nothing runs after a shutdown, and a second one returns at once.
    runtime.set(key(), shell("exec sleep 30"), 1);
    runtime.shutdown().await;
    assert!(runtime
        .snapshot()
        .functions
        .values()
        .all(|f| f.instances.is_empty()));
}

#[tokio::test]
async fn start_kills_recorded_orphans_but_not_reused_pids() {
    let dir = state_dir();
    let spawn_group = || {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sh")
            .args(["-c", "sleep 30 & exec sleep 30"])
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut orphan = spawn_group();
    let mut bystander = spawn_group();
    // Records as an agent before adoption wrote them: no boot id, nothing to adopt by.
    let record = |child: &std::process::Child, start_time| ProcessRecord {
        pid: child.id(),
        pgid: child.id(),
        start_time,
        instance: "hello-abcdef".into(),
        function: "default/hello".into(),
        boot_id: None,
        adoption: None,
    };
    let orphan_start = process_start_time(orphan.id()).unwrap();
    let bystander_start = process_start_time(bystander.id()).unwrap();
    records::write(
        &records_path(dir.path()),
        &[
            record(&orphan, orphan_start),
            // Same pid, another start time: a different process now; left alone.
            record(&bystander, bystander_start + 1),
        ],
    )
    .unwrap();

    let runtime = start(dir.path()).await;
    let status = tokio::task::spawn_blocking(move || orphan.wait().unwrap())
        .await
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
    assert!(bystander.try_wait().unwrap().is_none());
    assert!(records::read(&records_path(dir.path())).unwrap().is_empty());

    bystander.kill().unwrap();
    bystander.wait().unwrap();
    records::kill_group(bystander.id(), nix::sys::signal::Signal::SIGKILL);
    runtime.shutdown().await;
}

#[tokio::test]
async fn follow_sees_lines_of_instances_started_later_and_filters() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    runtime.set(key(), shell("exec sleep 30"), 0);
    let mut follow = runtime.logs(&key(), None, 10, true).unwrap();
    assert!(matches!(
        runtime.logs(&key(), Some("hello-ffffff".into()), 10, false),
        Err(RuntimeError::UnknownInstance { .. })
    ));
    assert!(matches!(
        runtime.logs(&FunctionKey::new("default", "nope"), None, 10, false),
        Err(RuntimeError::UnknownFunction(_))
    ));

    runtime.set(
        key(),
        shell("echo \"hi from $INSTANCE_ID\"; exec sleep 30"),
        1,
    );
    let line = tokio::time::timeout(WAIT, follow.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.line, format!("hi from {}", line.instance));
    let only: Vec<LogLine> = runtime
        .logs(&key(), Some(line.instance.clone()), 10, false)
        .unwrap()
        .collect()
        .await;
    assert_eq!(only.len(), 1);
    runtime.shutdown().await;
}

#[tokio::test]
async fn scale_to_zero_and_back() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    runtime.set(key(), shell("exec sleep 30"), 3);
    let snapshot = wait_for(&runtime, "three instances", |s| {
        function(s, &key()).is_some_and(|f| f.instances.len() == 3)
    })
    .await;
    let pids: Vec<u32> = function(&snapshot, &key())
        .unwrap()
        .instances
        .iter()
        .map(|i| i.pid)
        .collect();
    let ports: std::collections::BTreeSet<u16> = function(&snapshot, &key())
        .unwrap()
        .instances
        .iter()
        .map(|i| i.address.port())
        .collect();
    assert_eq!(ports.len(), 3);

    runtime.set(key(), shell("exec sleep 30"), 0);
    let snapshot = wait_for(&runtime, "zero instances", |s| {
        function(s, &key()).is_some_and(|f| f.instances.is_empty())
    })
    .await;
    // The function stays known (status, cold start) at zero.
    assert!(function(&snapshot, &key()).is_some());
    assert!(pids.iter().all(|pid| !pid_alive(*pid)));

    runtime.set(key(), shell("exec sleep 30"), 1);
    wait_for(&runtime, "one again", |s| {
        function(s, &key()).is_some_and(|f| f.instances.len() == 1)
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test]
async fn instances_run_as_the_run_as_user_in_a_private_work_dir() {
    let dir = state_dir();
    let runtime = start(dir.path()).await;
    assert_eq!(runtime.policy(), &policy());
    let state = dir.path().display().to_string();
    runtime.set(
        key(),
        shell(&format!(
            "echo \"ids=$(id -u) $(id -g) groups=$(id -G) home=$HOME user=$USER\"; \
             cat {state}/instances.json >/dev/null 2>&1 && echo read-records; \
             ls {state} >/dev/null 2>&1 && echo listed-state; \
             ls {state}/logs >/dev/null 2>&1 && echo listed-logs; \
             echo probed; exec sleep 30"
        )),
        1,
    );
    let mut known = Vec::new();
    let (instance, _server) = make_one_ready(&runtime, &mut known).await;
    let mut follow = runtime.logs(&key(), None, 10, true).unwrap();
    let mut lines = Vec::new();
    while !lines.iter().any(|l| l == "probed") {
        let line = tokio::time::timeout(WAIT, follow.next())
            .await
            .unwrap()
            .unwrap();
        lines.push(line.line);
    }
    let work_dir = dir
        .path()
        .join("instances/default/hello")
        .join(&instance.id);
    let (uid, gid, name) = match policy().run_as() {
        Some(user) => (user.uid(), user.gid(), user.name().to_owned()),
        None => (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
            std::env::var("USER").unwrap_or_default(),
        ),
    };
    let ids = lines.iter().find(|l| l.starts_with("ids=")).unwrap();
    if running_as_root() {
        // Uid and primary group of the user, and no supplementary group (id -G lists the
        // primary one only).
        assert_eq!(
            *ids,
            format!(
                "ids={uid} {gid} groups={gid} home={} user={name}",
                work_dir.display()
            )
        );
        // The agent's state is out of the instance's reach.
        assert!(!lines.iter().any(|l| l == "read-records"), "{lines:?}");
        assert!(!lines.iter().any(|l| l == "listed-state"), "{lines:?}");
        assert!(!lines.iter().any(|l| l == "listed-logs"), "{lines:?}");
    } else {
        assert!(
            ids.starts_with(&format!("ids={uid} {gid} groups=")),
            "{ids}"
        );
        assert!(
            ids.ends_with(&format!("home={} user={name}", work_dir.display())),
            "{ids}"
        );
    }

    // The modes that make it so.
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(&work_dir).unwrap();
    assert_eq!((owner.uid(), owner.gid()), (uid, gid));
    assert_eq!(mode(&work_dir), 0o700);
    assert_eq!(mode(dir.path()), 0o711);
    assert_eq!(mode(&dir.path().join("instances")), 0o711);
    assert_eq!(mode(&dir.path().join("instances/default")), 0o711);
    assert_eq!(mode(&dir.path().join("instances/default/hello")), 0o711);
    assert_eq!(mode(&dir.path().join("logs")), 0o700);
    assert_eq!(mode(&dir.path().join("logs/default/hello")), 0o700);
    let log_file = dir
        .path()
        .join("logs/default/hello")
        .join(format!("{}.log", instance.id));
    assert_eq!(mode(&log_file), 0o600);
    assert_eq!(mode(&records_path(dir.path())), 0o600);
    runtime.shutdown().await;
    assert!(!work_dir.exists());
}

#[tokio::test]
async fn commands_outside_the_roots_never_start() {
    let dir = state_dir();
    let roots = tempfile::tempdir().unwrap();
    let root = roots.path().canonicalize().unwrap();
    let mut config = config(dir.path());
    config.policy = CommandPolicy::new(std::slice::from_ref(&root), None).unwrap();
    let runtime = Runtime::start(config, Arc::new(NoDrainGate)).await.unwrap();
    let marker = dir.path().join("ran");
    let cases = [
        (
            "abs",
            "/bin/sh",
            format!("outside the allowed command roots ({})", root.display()),
        ),
        (
            "rel",
            "sh",
            format!(
                "not found under the allowed command roots ({})",
                root.display()
            ),
        ),
        (
            "dots",
            "../../bin/sh",
            "`..` is not allowed in a command".to_string(),
        ),
    ];
    for (name, command, _) in &cases {
        let process = ProcessRuntime {
            command: (*command).into(),
            args: vec!["-c".into(), format!("touch {}", marker.display())],
            ..ProcessRuntime::default()
        };
        runtime.set(FunctionKey::new("default", *name), process, 1);
    }
    let snapshot = wait_for(&runtime, "every refusal", |s| {
        cases.iter().all(|(name, _, _)| {
            function(s, &FunctionKey::new("default", *name)).is_some_and(|f| f.error.is_some())
        })
    })
    .await;
    for (name, command, reason) in &cases {
        let status = function(&snapshot, &FunctionKey::new("default", *name)).unwrap();
        assert_eq!(
            status.error.as_deref(),
            Some(format!("cannot start: command \"{command}\": {reason}").as_str())
        );
        assert!(status.instances.is_empty(), "{status:?}");
        assert_eq!(status.restarts, 0);
    }
    runtime.shutdown().await;
    assert!(!marker.exists());
}

/// A runtime with a short adoption hold, for the adoption tests.
async fn start_with_hold(dir: &Path, hold: Duration) -> Runtime {
    let mut config = config(dir);
    config.adoption_hold = hold;
    Runtime::start(config, Arc::new(NoDrainGate)).await.unwrap()
}

fn log_path_of(dir: &Path, key: &FunctionKey, id: &str) -> PathBuf {
    dir.join("logs")
        .join(&key.namespace)
        .join(&key.name)
        .join(format!("{id}.log"))
}

fn ids_and_pids(snapshot: &Snapshot, key: &FunctionKey) -> Vec<(String, u32, SocketAddr)> {
    function(snapshot, key)
        .map(|f| {
            f.instances
                .iter()
                .map(|i| (i.id.clone(), i.pid, i.address))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_released_runtime_leaves_ready_instances_to_the_next_one_which_adopts_them() {
    let dir = state_dir();
    let hold = Duration::from_secs(1);
    let first = start_with_hold(dir.path(), hold).await;
    let spec =
        shell("echo \"hello from $INSTANCE_ID\"; while true; do echo tick; sleep 0.05; done");
    first.set(key(), spec.clone(), 2);
    let mut known = Vec::new();
    let (a, _server_a) = make_one_ready(&first, &mut known).await;
    let (b, _server_b) = make_one_ready(&first, &mut known).await;
    // And one that never gets ready: it is stopped, not left behind.
    let slow = FunctionKey::new("default", "slow");
    first.set(slow.clone(), shell("exec sleep 30"), 1);
    let snapshot = wait_for(&first, "slow starting", |s| {
        function(s, &slow).is_some_and(|f| f.starting() == 1)
    })
    .await;
    let slow_pid = function(&snapshot, &slow).unwrap().instances[0].pid;
    let before = ids_and_pids(&first.snapshot(), &key());

    first.release().await;
    assert!(pid_alive(a.pid) && pid_alive(b.pid));
    assert!(!pid_alive(slow_pid));
    let recorded = records::read(&records_path(dir.path())).unwrap();
    let mut recorded_ids: Vec<&str> = recorded.iter().map(|r| r.instance.as_str()).collect();
    recorded_ids.sort_unstable();
    let mut expected_ids = vec![a.id.as_str(), b.id.as_str()];
    expected_ids.sort_unstable();
    assert_eq!(recorded_ids, expected_ids);
    assert!(recorded
        .iter()
        .all(|r| r.adoption.is_some() && r.boot_id.is_some()));

    // The instances write on while no agent runs: their stdout is the file itself.
    let log_a = log_path_of(dir.path(), &key(), &a.id);
    let size = std::fs::metadata(&log_a).unwrap().len();
    let deadline = tokio::time::Instant::now() + WAIT;
    while std::fs::metadata(&log_a).unwrap().len() <= size {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log stopped growing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let second = start_with_hold(dir.path(), hold).await;
    // Booked from the first snapshot on: same ids, pids and addresses, READY.
    let snapshot = second.snapshot();
    assert_eq!(ids_and_pids(&snapshot, &key()), before);
    let status = function(&snapshot, &key()).unwrap();
    assert_eq!(status.ready(), 2);
    assert_eq!(status.restarts, 0);
    assert!(
        status.cold_start.is_some(),
        "the recorded cold start is kept"
    );
    assert!(status.instances.iter().all(|i| i.ready.is_some()));

    // The same spec claims them: nothing new starts. (The marker's instance shows that the
    // `set` before it was handled.)
    second.set(key(), spec.clone(), 2);
    let marker = FunctionKey::new("default", "marker");
    second.set(marker.clone(), shell("exec sleep 30"), 1);
    let snapshot = wait_for(&second, "the marker's instance", |s| {
        function(s, &marker).is_some_and(|f| f.instances.len() == 1)
    })
    .await;
    assert_eq!(ids_and_pids(&snapshot, &key()), before);

    // Their logs go on: the line from before the restart, then lines read since.
    let backlog: Vec<LogLine> = second
        .logs(&key(), Some(a.id.clone()), 1000, false)
        .unwrap()
        .collect()
        .await;
    assert!(
        backlog
            .iter()
            .any(|l| l.line == format!("hello from {}", a.id)),
        "{backlog:?}"
    );
    let lines = first_lines(&second, &key(), Some(&a.id), backlog.len() + 3).await;
    assert!(lines[backlog.len()..].iter().all(|l| l.line == "tick"));

    // A lower count waits for the hold, then drains one.
    second.set(key(), spec.clone(), 1);
    let snapshot = wait_for(&second, "one instance of hello left", |s| {
        function(s, &key()).is_some_and(|f| f.instances.len() == 1)
    })
    .await;
    assert!(
        started.elapsed() >= hold,
        "drained {:?} after the start",
        started.elapsed()
    );
    let left = function(&snapshot, &key()).unwrap().instances[0].clone();
    let drained = if left.id == a.id { &b } else { &a };
    assert!(!pid_alive(drained.pid));

    // An adopted instance that dies is seen at once (its pidfd), without an exit code, and
    // replaced like any crashed instance.
    records::kill_group(left.pid, nix::sys::signal::Signal::SIGKILL);
    let snapshot = wait_for(&second, "the adopted instance's exit", |s| {
        function(s, &key()).is_some_and(|f| f.restarts == 1)
    })
    .await;
    let status = function(&snapshot, &key()).unwrap();
    assert_eq!(status.last_exit.as_deref(), Some(ADOPTED_EXIT));
    wait_for(&second, "a replacement", |s| {
        function(s, &key()).is_some_and(|f| f.instances.iter().any(|i| i.id != left.id))
    })
    .await;
    second.shutdown().await;
    assert!(!pid_alive(a.pid) && !pid_alive(b.pid));
    assert!(records::read(&records_path(dir.path())).unwrap().is_empty());
}

#[tokio::test]
async fn an_adopted_instance_of_a_changed_spec_is_replaced() {
    let dir = state_dir();
    let first = start_with_hold(dir.path(), Duration::from_secs(30)).await;
    first.set(key(), shell("exec sleep 30"), 1);
    let mut known = Vec::new();
    let (old, _old_server) = make_one_ready(&first, &mut known).await;
    first.release().await;

    let second = start_with_hold(dir.path(), Duration::from_secs(30)).await;
    second.set(key(), shell("exec sleep 31"), 1);
    // An instance of the new spec starts while the adopted one serves (the hold does not keep
    // an old spec: it only keeps instances of the current one).
    // Adoption checks readiness first, so under load the new instance may be starting before
    // the adopted one is ready again: wait for both.
    let snapshot = wait_for(
        &second,
        "the new instance starting beside the adopted one",
        |s| {
            instances_in(s, InstanceState::Starting).len() == 1
                && instances_in(s, InstanceState::Ready)
                    .iter()
                    .any(|i| i.id == old.id)
        },
    )
    .await;
    let ready = instances_in(&snapshot, InstanceState::Ready);
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].id, old.id);
    let mut known = vec![old.id.clone()];
    let (new, _new_server) = make_one_ready(&second, &mut known).await;
    let snapshot = wait_for(&second, "only the new one", |s| {
        function(s, &key()).is_some_and(|f| f.instances.len() == 1 && f.ready() == 1)
    })
    .await;
    assert_eq!(function(&snapshot, &key()).unwrap().instances[0].id, new.id);
    assert!(!pid_alive(old.pid));
    second.shutdown().await;
}

/// `sleep 30` in its own process group as the instances' user: what an agent would have left.
fn spawn_like_an_instance() -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(policy().resolve("sleep").unwrap());
    command.arg("30").process_group(0);
    if let Some(user) = policy().run_as() {
        command.uid(user.uid()).gid(user.gid());
    }
    command.spawn().unwrap()
}

/// A record of `child` as an agent would have written it for a READY instance at `address`
/// (TCP readiness).
fn adoptable_record(child: &std::process::Child, id: &str, address: SocketAddr) -> ProcessRecord {
    let pid = child.id();
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    ProcessRecord {
        pid,
        pgid: pid,
        start_time: process_start_time(pid).unwrap(),
        instance: id.into(),
        function: "default/hello".into(),
        boot_id: records::boot_id(),
        adoption: Some(records::Adoption {
            address,
            cmdline: records::read_cmdline(pid).unwrap(),
            program: policy().resolve("sleep").unwrap(),
            spec_digest: records::spec_digest(&shell("exec sleep 30")),
            readiness_path: String::new(),
            restarts: 0,
            started_unix_ms: now_ms - 1000,
            ready_unix_ms: now_ms - 900,
        }),
    }
}

/// Waits for a child of the test to exit; its status.
async fn exit_of(mut child: std::process::Child) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn start_adopts_only_what_it_can_vouch_for_reaps_its_own_and_never_signals_strangers() {
    use std::os::unix::process::ExitStatusExt;
    let dir = state_dir();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let ready_address = free();
    let _server = serve_health(ready_address).await;

    let good = spawn_like_an_instance();
    let unready = spawn_like_an_instance();
    let other_command = spawn_like_an_instance();
    let stranger = spawn_like_an_instance();
    let other_boot = spawn_like_an_instance();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();

    let mut records = vec![
        adoptable_record(&good, "hello-00000a", ready_address),
        // Ours, but nothing answers on its port.
        adoptable_record(&unready, "hello-00000b", free()),
    ];
    let mut changed = adoptable_record(&other_command, "hello-00000c", ready_address);
    changed.adoption.as_mut().unwrap().cmdline = vec!["sleep".into(), "31".into()];
    records.push(changed);
    // The pid was reused: the recorded process started at another time.
    let mut reused = adoptable_record(&stranger, "hello-00000d", ready_address);
    reused.start_time += 1;
    records.push(reused);
    // Recorded in another boot: pid and start time name someone else now.
    let mut rebooted = adoptable_record(&other_boot, "hello-00000e", ready_address);
    rebooted.boot_id = Some("00000000-0000-0000-0000-000000000000".into());
    records.push(rebooted);
    records.push(ProcessRecord {
        pid: gone_pid,
        pgid: gone_pid,
        start_time: 1,
        instance: "hello-00000f".into(),
        function: "default/hello".into(),
        boot_id: records::boot_id(),
        adoption: None,
    });
    records::write(&records_path(dir.path()), &records).unwrap();

    let began = Instant::now();
    let hold = Duration::from_secs(5);
    let runtime = start_with_hold(dir.path(), hold).await;
    // The start waits for the first round of probes only, not for the unready one's deadline.
    assert!(
        began.elapsed() < ADOPTION_READY_WITHIN,
        "{:?}",
        began.elapsed()
    );
    let snapshot = runtime.snapshot();
    let adopted = ids_and_pids(&snapshot, &key());
    let unready_address = records[1].adoption.as_ref().unwrap().address;
    assert_eq!(
        adopted,
        vec![
            ("hello-00000a".to_string(), good.id(), ready_address),
            ("hello-00000b".to_string(), unready.id(), unready_address),
        ]
    );
    // The one that answers is READY; the other STARTING, so sidecars stop sending to it.
    let status = function(&snapshot, &key()).unwrap();
    assert_eq!((status.ready(), status.starting()), (1, 1));

    // Ours but another command line: killed at once. The strangers: untouched.
    assert_eq!(exit_of(other_command).await.signal(), Some(9));
    let mut stranger = stranger;
    let mut other_boot = other_boot;
    assert!(stranger.try_wait().unwrap().is_none());
    assert!(other_boot.try_wait().unwrap().is_none());

    // Ours, and not ready by its deadline: killed then, not counted as a restart.
    assert_eq!(exit_of(unready).await.signal(), Some(9));
    assert!(began.elapsed() >= ADOPTION_READY_WITHIN);
    let snapshot = wait_for(&runtime, "the unready one gone", |s| {
        function(s, &key()).is_some_and(|f| f.instances.len() == 1)
    })
    .await;
    let status = function(&snapshot, &key()).unwrap();
    assert_eq!(status.instances[0].id, "hello-00000a");
    assert_eq!(status.restarts, 0);
    assert!(
        status
            .last_exit
            .as_deref()
            .is_some_and(|e| e.contains("not ready within")),
        "{status:?}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let recorded = records::read(&records_path(dir.path())).unwrap();
        let ids: Vec<&str> = recorded.iter().map(|r| r.instance.as_str()).collect();
        if ids == ["hello-00000a"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "recorded {ids:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stranger.try_wait().unwrap().is_none());
    assert!(other_boot.try_wait().unwrap().is_none());

    // Its function is never `set`: after the hold it is drained like a removed one.
    wait_for(&runtime, "the unclaimed function gone", |s| {
        function(s, &key()).is_none()
    })
    .await;
    assert!(began.elapsed() >= hold);
    assert_eq!(exit_of(good).await.signal(), Some(15));

    for mut child in [stranger, other_boot] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    runtime.shutdown().await;
}
