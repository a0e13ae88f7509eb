//! A real single-member etcd on 127.0.0.1 with its data in a temp dir, restartable on the same
//! ports and data.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{fatal, free_port, poll_until, Process};

/// How long etcd gets to become healthy (it usually needs well under a second).
const READY_WITHIN: Duration = Duration::from_secs(15);

/// One etcd member.
pub struct Etcd {
    process: Process,
    client_port: u16,
    peer_port: u16,
    data: TempDir,
}

impl Etcd {
    /// Starts etcd on fresh ports with an empty data dir and waits until `/health` says true.
    pub async fn start() -> Result<Etcd> {
        let program = etcd_program()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let data = tempfile::Builder::new()
                .prefix("meridian-etcd-")
                .tempdir()
                .context("creating etcd's data dir")?;
            let client_port = free_port(Ipv4Addr::LOCALHOST)?;
            let peer_port = free_port(Ipv4Addr::LOCALHOST)?;
            let args = etcd_args(&data.path().join("member-data"), client_port, peer_port);
            let process = Process::spawn("etcd", &program, args)?;
            let mut etcd = Etcd {
                process,
                client_port,
                peer_port,
                data,
            };
            match etcd.wait_ready().await {
                Ok(()) => return Ok(etcd),
                // Another program may have taken a port between the check and the bind.
                Err(_) if attempt < 3 && etcd.process.log().contains("address already in use") => {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The client URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The peer port.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("member-data")
    }

    /// SIGTERM and wait for the exit.
    pub async fn stop(&mut self) -> Result<()> {
        self.process.stop(Duration::from_secs(10)).await?;
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Stops etcd if it runs, starts it again on the same ports and data dir, waits until healthy.
    pub async fn restart(&mut self) -> Result<()> {
        if self.process.is_running() {
            self.stop().await?;
        }
        self.process.start()?;
        self.wait_ready().await
    }

    /// The keys under `prefix`, read with the real `etcdctl` (Debian package etcd-client).
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let output = tokio::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.url(),
                "get",
                prefix,
                "--prefix",
                "--keys-only",
            ])
            .kill_on_drop(true)
            .output()
            .await
            .context("running etcdctl (Debian package etcd-client)")?;
        ensure!(
            output.status.success(),
            "etcdctl failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Whether the etcd process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The process (for its log).
    pub fn process(&self) -> &Process {
        &self.process
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let port = self.client_port;
        let process = &mut self.process;
        poll_until(READY_WITHIN, "etcd to report healthy", || {
            let exited = process.try_exit().map(|s| process.exited_error(s));
            async move {
                if let Some(err) = exited {
                    return Err(fatal(err));
                }
                health(port).await
            }
        })
        .await
    }
}

/// The etcd binary: `$MERIDIAN_TEST_ETCD` or `etcd` on the PATH.
fn etcd_program() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MERIDIAN_TEST_ETCD") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .context(
            "etcd is not on the PATH: install it (Debian: apt-get install -y etcd-server \
             etcd-client; tests/run.sh does this)",
        )
}

/// The fast-start single-member flags from the tooling notes.
fn etcd_args(data: &std::path::Path, client: u16, peer: u16) -> Vec<OsString> {
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    [
        "--name".into(),
        "e1".into(),
        "--data-dir".into(),
        data.as_os_str().to_owned(),
        "--listen-client-urls".into(),
        client_url.clone().into(),
        "--advertise-client-urls".into(),
        client_url.into(),
        "--listen-peer-urls".into(),
        peer_url.clone().into(),
        "--initial-advertise-peer-urls".into(),
        peer_url.clone().into(),
        "--initial-cluster".into(),
        format!("e1={peer_url}").into(),
        "--heartbeat-interval".into(),
        "10".into(),
        "--election-timeout".into(),
        "100".into(),
    ]
    .into_iter()
    .collect()
}

/// One `GET /health` over plain HTTP/1.0 (no HTTP client crate needed for one request).
async fn health(port: u16) -> Result<()> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    ensure!(
        response.contains("\"health\":\"true\""),
        "etcd not healthy yet: {response}"
    );
    Ok(())
}
