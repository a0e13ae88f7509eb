//! What the agent's binary tests share: running the agent and reading its log, and the command
//! policy test agents run with (`--allowed-command-root`, and `--run-as nobody` when the tests run
//! as root, since a root agent refuses to start without it).
#![allow(clippy::unwrap_used, dead_code)] // a panic is how a test reports failure

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use tonic::transport::Channel;

pub const AGENT: &str = env!("CARGO_BIN_EXE_meridian-agent");

/// The agent's stderr, line by line, from a reader thread.
pub struct Agent {
    pub child: Child,
    lines: std_mpsc::Receiver<String>,
}

impl Agent {
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(AGENT)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no log line containing {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    pub fn wait_exit(&mut self) -> i32 {
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().unwrap();
        panic!("agent did not exit within 10 s");
    }
}

impl Agent {
    /// Connects to the local routing API, once the agent logs the address it serves it on.
    pub async fn connect(&self) -> Channel {
        let line = self.wait_for("serving local routing API on ");
        let addr = line.rsplit(' ').next().unwrap().to_owned();
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Asks the agent to stop (SIGTERM), as an operator would.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM first: an agent killed outright leaves its instances running (until the next
        // agent on that state directory kills them).
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
            for _ in 0..150 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The user test agents run instances as when the tests run as root.
pub const RUN_AS: &str = "nobody";

pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A directory under which any user can reach what it is given: the temp dir when every
/// directory above it lets others through (a `TMPDIR` under `/root`, mode 0700, does not), else
/// `/tmp`.
pub fn traversable_temp_dir() -> PathBuf {
    let temp = std::env::temp_dir();
    let traversable = temp
        .ancestors()
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if traversable {
        temp
    } else {
        PathBuf::from("/tmp")
    }
}

/// A state directory for a test agent whose instances (maybe [`RUN_AS`]) can reach their working
/// directories through its parents.
pub fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("meridian-agent-test-")
        .tempdir_in(traversable_temp_dir())
        .unwrap()
}

/// Prefix of the [`functions_dir`]s, followed by the pid of the test process that made it.
const FUNCTIONS_PREFIX: &str = "meridian-agent-test-functions-";

/// The test agents' `--allowed-command-root`: a directory (0755, any user reaches it) holding a
/// hard link to (or a copy of) this test binary, which the checkout may keep where [`RUN_AS`]
/// cannot go. One per test process, kept for its lifetime; those of finished processes are
/// removed by the next one.
pub fn functions_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = traversable_temp_dir();
        remove_stale_functions_dirs(&base);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{FUNCTIONS_PREFIX}{}-", std::process::id()))
            .tempdir_in(&base)
            .unwrap()
            .keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = std::env::current_exe().unwrap();
        let target = dir.join(exe.file_name().unwrap());
        if std::fs::hard_link(&exe, &target).is_err() {
            // Another file system: a copy (it keeps the mode).
            std::fs::copy(&exe, &target).unwrap();
        }
        dir
    })
}

/// Removes the functions dirs of test processes that are gone.
fn remove_stale_functions_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(FUNCTIONS_PREFIX))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// This test binary as the agent runs it: its copy in [`functions_dir`].
pub fn test_binary_command() -> String {
    let exe = std::env::current_exe().unwrap();
    functions_dir()
        .join(exe.file_name().unwrap())
        .to_str()
        .unwrap()
        .to_owned()
}

/// The policy flags of a test agent: [`functions_dir`] as the only root, and `--run-as
/// nobody` when the tests run as root.
pub fn policy_args() -> Vec<&'static str> {
    let mut args = vec!["--allowed-command-root", functions_dir().to_str().unwrap()];
    if running_as_root() {
        args.extend(["--run-as", RUN_AS]);
    }
    args
}

/// The flags every test agent needs: region `us-east`, `state_dir`, the local API on a free port,
/// `control_plane` to dial and the [`policy_args`].
pub fn agent_args<'a>(state_dir: &'a str, control_plane: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "--region",
        "us-east",
        "--state-dir",
        state_dir,
        "--listen",
        "127.0.0.1:0",
        "--control-plane",
        control_plane,
        // The default admin port is fixed: tests run agents in parallel.
        "--admin",
        "none",
    ];
    args.extend(policy_args());
    args
}

/// A port that was free a moment ago (nothing listens on it).
pub fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
