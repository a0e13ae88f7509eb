//! Readiness of a starting instance: its port accepts a TCP connection, or `GET <path>` answers
//! 2xx. Polled fast at first because cold start counts every millisecond.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

/// Poll interval during the first [`FAST_PHASE`] after spawn.
pub const FAST_INTERVAL: Duration = Duration::from_millis(5);
pub const FAST_PHASE: Duration = Duration::from_secs(1);
/// Poll interval afterwards.
pub const SLOW_INTERVAL: Duration = Duration::from_millis(50);
/// One probe (connect, request, status line) gives up after this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The interval before the next probe, `since_spawn` after the spawn.
pub fn poll_interval(since_spawn: Duration) -> Duration {
    if since_spawn < FAST_PHASE {
        FAST_INTERVAL
    } else {
        SLOW_INTERVAL
    }
}

/// Resolves once the instance at `address` is ready. `path` empty: TCP connect; else HTTP.
pub async fn wait_ready(address: SocketAddr, path: &str, spawned: Instant) {
    loop {
        if probe(address, path).await {
            return;
        }
        sleep(poll_interval(spawned.elapsed())).await;
    }
}

/// One probe.
pub async fn probe(address: SocketAddr, path: &str) -> bool {
    timeout(PROBE_TIMEOUT, probe_inner(address, path))
        .await
        .unwrap_or(false)
}

async fn probe_inner(address: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(address).await else {
        return false;
    };
    if path.is_empty() {
        return true;
    }
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: meridian-agent\r\n\
         Connection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // Only the status line matters: "HTTP/1.1 200 OK".
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    status_is_success(&head)
}

fn status_is_success(head: &[u8]) -> bool {
    let line = String::from_utf8_lossy(head);
    let mut parts = line.split_whitespace();
    let version_ok = parts.next().is_some_and(|v| v.starts_with("HTTP/1."));
    let code = parts.next().and_then(|code| code.parse::<u16>().ok());
    version_ok && code.is_some_and(|code| (200..300).contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-response-per-connection HTTP server answering `status` to everything.
    async fn http_server(status: u16) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        address
    }

    #[test]
    fn polls_fast_first_then_slower() {
        assert_eq!(poll_interval(Duration::ZERO), FAST_INTERVAL);
        assert_eq!(poll_interval(Duration::from_millis(999)), FAST_INTERVAL);
        assert_eq!(poll_interval(Duration::from_secs(1)), SLOW_INTERVAL);
    }

    #[test]
    fn status_lines() {
        assert!(status_is_success(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_is_success(b"HTTP/1.0 204 No Content\r\n"));
        assert!(!status_is_success(b"HTTP/1.1 503 Busy\r\n"));
        assert!(!status_is_success(b"HTTP/1.1 301 Moved\r\n"));
        assert!(!status_is_success(b"SSH-2.0\r\n"));
        assert!(!status_is_success(b""));
    }

    #[tokio::test]
    async fn tcp_probe_needs_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        assert!(probe(address, "").await);
        drop(listener);
        assert!(!probe(address, "").await);
    }

    #[tokio::test]
    async fn http_probe_needs_2xx() {
        assert!(probe(http_server(200).await, "/healthz").await);
        assert!(probe(http_server(200).await, "healthz").await);
        assert!(!probe(http_server(500).await, "/healthz").await);
    }
}
