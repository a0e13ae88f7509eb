//! A child process owned by a test: restartable with the same command line, killed on drop, its
//! output kept in a log file that is printed when it is dropped.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::time::Instant;

/// How many lines of a log are printed when its process is dropped.
const LOG_TAIL_LINES: usize = 400;

/// A child process with a fixed command line.
pub struct Process {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    starts: u32,
    log_path: PathBuf,
    log_dir: Option<TempDir>,
}

impl Process {
    /// Starts `program args`, stdout and stderr appended to a fresh log file.
    pub fn spawn(name: &str, program: &Path, args: Vec<OsString>) -> Result<Self> {
        Process::spawn_with_env(name, program, args, &[])
    }

    /// Like [`Process::spawn`], with extra environment variables (set after the hermetic
    /// clean-up, so they may be `MERIDIAN_*` ones).
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: Vec<OsString>,
        env: &[(&str, String)],
    ) -> Result<Self> {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("meridian-log-{name}-"))
            .tempdir()
            .context("creating a log directory")?;
        let log_path = log_dir.path().join(format!("{name}.log"));
        let mut process = Process {
            name: name.to_string(),
            program: program.to_path_buf(),
            args,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect(),
            child: None,
            exit: None,
            starts: 0,
            log_path,
            log_dir: Some(log_dir),
        };
        process.start()?;
        Ok(process)
    }

    /// Starts the process again with the same command line. It must not be running.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        writeln!(
            log,
            "===== start #{} of {}: {} {}",
            self.starts,
            self.name,
            self.program.display(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        )?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        hermetic_env(&mut cmd);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        self.exit = None;
        Ok(())
    }

    /// The name given at spawn (used in messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps the process if it has exited; returns its exit status then.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.exit = Some(status);
                    self.child = None;
                }
                Ok(None) => return None,
                Err(_) => {
                    // Cannot happen for a child we own; treat it as gone.
                    self.child = None;
                }
            }
        }
        self.exit
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.try_exit();
        self.child.is_some()
    }

    /// Sends `sig` to the process, if it runs.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if let Some(pid) = self.pid() {
            let pid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
            match signal::kill(pid, sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(anyhow!("sending {sig} to {}: {e}", self.name)),
            }
        }
        Ok(())
    }

    /// SIGKILL, then reap. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.exit = child.wait().ok();
        }
    }

    /// SIGTERM, then wait up to `grace` for the exit; SIGKILL after that (and report it).
    pub async fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if !self.is_running() {
            return self
                .exit
                .ok_or_else(|| anyhow!("{} was never started", self.name));
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait_exit(grace).await {
            Ok(status) => Ok(status),
            Err(_) => {
                self.kill();
                bail!(
                    "{} did not exit within {grace:?} of SIGTERM; killed it",
                    self.name
                )
            }
        }
    }

    /// Waits up to `within` for the process to exit on its own.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {within:?}", self.name);
            }
            // Polling the child for its exit: there is no async wait on a std Child.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// An error saying the process exited, with the end of its log.
    pub fn exited_error(&self, status: ExitStatus) -> anyhow::Error {
        anyhow!(
            "{} exited ({status}); end of its log:\n{}",
            self.name,
            self.log_tail(40)
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        // libtest captures this and shows it only when the test fails (by panic or by Err).
        eprintln!(
            "----- log of {} ({}), last {LOG_TAIL_LINES} lines -----\n{}\n----- end of log of {} -----",
            self.name,
            self.log_path.display(),
            self.log_tail(LOG_TAIL_LINES),
            self.name
        );
        if std::thread::panicking() {
            if let Some(dir) = self.log_dir.take() {
                let kept = dir.keep();
                eprintln!("log of {} kept in {}", self.name, kept.display());
            }
        }
    }
}

/// Removes every `MERIDIAN_*` and `OTEL_*` variable a developer may have set, so that children
/// see only the flags a test passes (and export traces only where a test asks); sets plain logs.
pub(crate) fn hermetic_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("MERIDIAN_") || key_text.starts_with("OTEL_") {
            cmd.env_remove(key);
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd.env("NO_COLOR", "1");
}
