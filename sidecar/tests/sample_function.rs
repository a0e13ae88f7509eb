//! The sample function example as a real process: `START_DELAY_MS` delays listening,
//! `DELAY_MS` delays every answer but `GET /healthz`, and the timing headers are set.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use common::{get, h1};
use http::StatusCode;

/// `cargo test` builds the examples next to the test binaries' directory:
/// `<target>/<profile>/deps/<test>` -> `<target>/<profile>/examples/sample_function`.
fn sample_function() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary has no profile directory")?;
    let path = profile.join("examples").join("sample_function");
    if !path.is_file() {
        bail!("{} is missing: cargo build --examples", path.display());
    }
    Ok(path)
}

/// Kills the instance when the test ends, whatever happens.
struct Instance(Child);

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn unix_us() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

fn header_us(headers: &http::HeaderMap, name: &str) -> u64 {
    headers[name].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn delays_and_timing_headers() -> Result<()> {
    let program = sample_function()?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let spawned_us = unix_us();
    let spawned = Instant::now();
    let _instance = Instance(
        Command::new(program)
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            .env("REGION", "us-east")
            .env("INSTANCE_ID", "i-1")
            .env("START_DELAY_MS", "300")
            .env("DELAY_MS", "200")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let client = h1();
    let deadline = Instant::now() + Duration::from_secs(15);
    let headers = loop {
        if let Ok((status, headers, body)) = get(&client, addr, "x", "/healthz").await {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, "ok\n");
            break headers;
        }
        if Instant::now() > deadline {
            bail!("the sample function never answered /healthz");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        spawned.elapsed() >= Duration::from_millis(300),
        "START_DELAY_MS"
    );
    assert_eq!(headers["x-instance"], "i-1");
    let start = header_us(&headers, "x-start-unix-us");
    let ready = header_us(&headers, "x-ready-unix-us");
    let arrived = header_us(&headers, "x-arrived-unix-us");
    assert!(spawned_us <= start + 1000, "{spawned_us} {start}");
    assert!(ready >= start + 300_000, "ready {ready} start {start}");
    assert!(arrived >= ready);

    let sent = Instant::now();
    let (status, headers, body) = get(&client, addr, "x", "/").await?;
    assert!(sent.elapsed() >= Duration::from_millis(200), "DELAY_MS");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from i-1 in us-east\n");
    assert_eq!(header_us(&headers, "x-ready-unix-us"), ready);
    assert!(header_us(&headers, "x-arrived-unix-us") > arrived);
    Ok(())
}
