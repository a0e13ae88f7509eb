//! Test support for the control plane's real-etcd tests: a throwaway single-member etcd on
//! loopback (the same fast-election flags as the end-to-end harness) and polling helpers.
//!
//! When no `etcd` binary is installed (`$MERIDIAN_TEST_ETCD`, else `etcd` on the PATH) a test
//! prints why and passes without running: these tests need a real etcd and cannot fake one.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meridian_control_plane::store::Store;
use tempfile::TempDir;

/// A running etcd; killed on drop.
pub struct Etcd {
    child: tokio::process::Child,
    url: String,
    data: TempDir,
}

impl Etcd {
    /// Starts etcd, or returns `None` (after saying why) when it is not installed.
    pub async fn start() -> Result<Option<Etcd>> {
        let Some(program) = etcd_program() else {
            eprintln!(
                "SKIPPED: no etcd binary (set MERIDIAN_TEST_ETCD or install it: apt-get install \
                 -y etcd-server); this test needs a real etcd"
            );
            return Ok(None);
        };
        for _attempt in 0..3 {
            let data = tempfile::Builder::new()
                .prefix("meridian-cp-etcd-")
                .tempdir()?;
            let client = free_port()?;
            let peer = free_port()?;
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(data.path().join("etcd.log"))?;
            let child = tokio::process::Command::new(&program)
                .args(["--name", "e1", "--data-dir"])
                .arg(data.path().join("member"))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("e1={peer_url}")])
                .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", program.display()))?;
            let mut etcd = Etcd {
                child,
                url: client_url,
                data,
            };
            match etcd.wait_ready().await {
                Ok(()) => return Ok(Some(etcd)),
                // A port taken between the check and etcd's bind: try other ports.
                Err(_) if etcd.log().contains("address already in use") => continue,
                Err(error) => bail!("etcd did not start: {error:#}\n{}", etcd.log()),
            }
        }
        bail!("etcd could not find free ports in 3 attempts")
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A new client (its own connection) on a key prefix.
    pub async fn store(&self, prefix: &str) -> Result<Store> {
        Ok(Store::connect(&[self.url()], prefix, Duration::from_secs(3)).await?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("etcd.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let url = self.url();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("etcd exited: {status}");
            }
            let probe = async {
                let store = Store::connect(
                    std::slice::from_ref(&url),
                    "/probe/",
                    Duration::from_secs(1),
                )
                .await?;
                store.leader().await?;
                anyhow::Ok(())
            };
            if probe.await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("etcd not ready within 15s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn etcd_program() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MERIDIAN_TEST_ETCD") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Polls `check` every 20 ms until it returns `Some`, at most `within`.
pub async fn poll<T, F, Fut>(within: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
