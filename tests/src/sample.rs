//! The sample function (`sidecar/examples/sample_function.rs`, built by `cargo build
//! --examples`) run as a real process on a region's address: what the tests register as an
//! `external` function's instance until the agent runs instances itself.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Result};

use crate::http::MeshClient;
use crate::{bin_dir, fatal, free_port, poll_until, Process};

/// How long an instance gets to answer after it starts.
const READY_WITHIN: Duration = Duration::from_secs(15);

/// The example binary: `<target>/<profile>/examples/sample_function`.
pub fn sample_function_program() -> Result<PathBuf> {
    let path = bin_dir()?.join("examples").join("sample_function");
    if !path.is_file() {
        bail!(
            "{} does not exist: build it first: cargo build --workspace --bins --examples",
            path.display()
        );
    }
    Ok(path)
}

/// One instance of the sample function.
pub struct SampleFunction {
    process: Process,
    addr: SocketAddr,
    region: String,
    instance: String,
}

impl SampleFunction {
    /// Starts an instance on a fresh port of `ip`, answering as `region` / `instance`; waits
    /// until it answers.
    pub async fn start(ip: Ipv4Addr, region: &str, instance: &str) -> Result<SampleFunction> {
        let program = sample_function_program()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = SocketAddr::from((ip, free_port(ip)?));
            let process = Process::spawn_with_env(
                &format!("sample-{instance}"),
                &program,
                Vec::<OsString>::new(),
                &[
                    ("PORT", addr.port().to_string()),
                    ("HOST", ip.to_string()),
                    ("REGION", region.to_string()),
                    ("INSTANCE_ID", instance.to_string()),
                ],
            )?;
            let mut sample = SampleFunction {
                process,
                addr,
                region: region.to_string(),
                instance: instance.to_string(),
            };
            match sample.wait_ready().await {
                Ok(()) => return Ok(sample),
                Err(_)
                    if attempt < 3
                        && sample
                            .process
                            .log()
                            .to_lowercase()
                            .contains("address already in use") =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the URL to register.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The region it says it is in.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Its instance id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// SIGKILL (and reap).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The process (for its log).
    pub fn process(&self) -> &Process {
        &self.process
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let addr = self.addr;
        let process = &mut self.process;
        poll_until(READY_WITHIN, "the sample function to answer", || {
            let exited = process.try_exit().map(|s| process.exited_error(s));
            async move {
                if let Some(err) = exited {
                    return Err(fatal(err));
                }
                let reply = MeshClient::http1(addr).get(&addr.to_string(), "/").await?;
                ensure!(reply.status.is_success(), "{}", reply.describe());
                Ok(())
            }
        })
        .await
    }
}
