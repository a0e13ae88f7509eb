//! `meridian-relay`: the fault-injection relay of the tests as a process, for the one-machine
//! demo (deploy/local/run.sh). Every cross-region link goes through it with the latency it is
//! given, and can be blackholed, reset or healed over a small HTTP control API.
//!
//! How (see `tests/src/relay.rs`): for each region it serves a route tap, the `LocalRoutingService`
//! the region's sidecars subscribe to instead of the agent's. The tap passes the agent's tables
//! through with every remote gateway address replaced by a relay link from that region (a
//! listener on the region's address), and passes the sidecars' table reports back.
//!
//! Usage:
//!   meridian-relay --region us-east=127.0.1.1:7101=http://127.0.1.1:7100 ... \
//!       --latency us-east:eu-west=40 --latency us-east:ap-south=120 \
//!       --control 127.0.0.1:7199
//! Control API:
//!   GET  /links                              the links, their state and latency
//!   POST /links/FROM/TO/blackhole|reset|heal

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meridian_tests::{Relay, RouteTap};
use tokio::net::TcpListener;

/// Fault-injecting relay for cross-region links (demo and tests).
#[derive(Debug, Parser)]
#[command(name = "meridian-relay")]
struct Args {
    /// `REGION=TAP_ADDR=AGENT_URL`: serve REGION's sidecars on TAP_ADDR from the agent at
    /// AGENT_URL. Repeat per region.
    #[arg(long = "region", required = true)]
    regions: Vec<String>,
    /// `A:B=MS`: one-way latency between regions A and B, both directions. Repeatable.
    #[arg(long = "latency")]
    latencies: Vec<String>,
    /// Address of the control API.
    #[arg(long, default_value = "127.0.0.1:7199")]
    control: SocketAddr,
}

fn parse_latency(spec: &str) -> Result<(String, String, Duration)> {
    let (pair, ms) = spec
        .split_once('=')
        .with_context(|| format!("--latency {spec:?}: expected A:B=MS"))?;
    let (a, b) = pair
        .split_once(':')
        .with_context(|| format!("--latency {spec:?}: expected A:B=MS"))?;
    let ms: u64 = ms
        .parse()
        .with_context(|| format!("--latency {spec:?}: {ms:?} is not a number of ms"))?;
    Ok((a.to_string(), b.to_string(), Duration::from_millis(ms)))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let relay = Relay::new();
    for spec in &args.latencies {
        let (a, b, one_way) = parse_latency(spec)?;
        relay.set_latency(&a, &b, one_way);
    }
    let mut taps = Vec::new();
    for spec in &args.regions {
        let mut parts = spec.splitn(3, '=');
        let (Some(region), Some(listen), Some(agent)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("--region {spec:?}: expected REGION=TAP_ADDR=AGENT_URL");
        };
        let listen: SocketAddr = listen
            .parse()
            .with_context(|| format!("--region {spec:?}: bad address {listen:?}"))?;
        taps.push(RouteTap::start_on(listen, region, agent, relay.clone()).await?);
        eprintln!("route tap for {region} listening on {listen} (agent {agent})");
    }
    let control = TcpListener::bind(args.control)
        .await
        .with_context(|| format!("binding the control API on {}", args.control))?;
    eprintln!("control API listening on {}", args.control);
    loop {
        tokio::select! {
            accepted = control.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let relay = relay.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let relay = relay.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&relay, &request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(taps);
    Ok(())
}

fn handle<B>(relay: &Relay, request: &http::Request<B>) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = request
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match (request.method(), segments.as_slice()) {
        (&Method::GET, ["links"]) => {
            let mut text = String::new();
            for ((from, to), state, accepted) in relay.pairs() {
                let (forward, backward) = relay.control(&from, &to).latency();
                text.push_str(&format!(
                    "{from} -> {to}: {state}, latency {forward:?} / {backward:?}, \
                     {accepted} connections\n"
                ));
            }
            for (from, target, listen) in relay.links() {
                text.push_str(&format!("  {from}: {listen} -> {target}\n"));
            }
            reply(StatusCode::OK, text)
        }
        (&Method::POST, ["links", from, to, command]) => {
            match *command {
                "blackhole" => relay.blackhole(from, to),
                "reset" => relay.reset(from, to),
                "heal" => relay.heal(from, to),
                other => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        format!("unknown command {other:?}: blackhole, reset or heal\n"),
                    )
                }
            }
            eprintln!("link {from} -> {to}: {command}");
            reply(StatusCode::OK, format!("{from} -> {to}: {command}\n"))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "try GET /links or POST /links/<from>/<to>/blackhole|reset|heal\n".to_string(),
        ),
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
