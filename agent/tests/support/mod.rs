//! What the agent's binary tests share: running the agent and reading its log.
#![allow(clippy::unwrap_used, dead_code)] // a panic is how a test reports failure

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
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

/// The flags every test agent needs: region `us-east`, `state_dir`, the local API on a free port
/// and `control_plane` to dial.
pub fn agent_args<'a>(state_dir: &'a str, control_plane: &'a str) -> Vec<&'a str> {
    vec![
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
    ]
}

/// A port that was free a moment ago (nothing listens on it).
pub fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
