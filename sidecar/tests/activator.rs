//! The activator and load reports end to end, in process over real sockets: a scripted agent
//! serves tables with process functions and records load reports and activations; requests
//! for a function without a ready local instance are held and released, time out, overflow the
//! hold queue, or go to a warm remote region.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::*;
use http::{HeaderMap, StatusCode};
use meridian_proto::v1 as pb;
use tokio::task::JoinHandle;

/// Makes `f` a process function the local agent may scale between 0 and 3 instances.
fn process(mut f: pb::FunctionRoute, cold_start_ms: u32) -> pb::FunctionRoute {
    f.workload = Some(pb::LocalWorkload {
        kind: Some(pb::local_workload::Kind::Process(pb::ProcessRuntime {
            command: "sample_function".into(),
            ..Default::default()
        })),
        scale: Some(pb::ScaleBounds {
            min_instances: 0,
            max_instances: 3,
            target_concurrency: 1,
            idle_seconds: 30,
        }),
    });
    f.cold_start_ms = cold_start_ms;
    f
}

/// `cold`: a process function scaled to zero here (a local tier without instances) and run in
/// no other region, so every request for it is held.
fn cold() -> pb::FunctionRoute {
    process(function("cold", vec![local("us-east", &[])]), 0)
}

fn at_generation(mut table: pb::RoutingTable, generation: u64) -> pb::RoutingTable {
    table.local_generation = generation;
    table
}

type Answer = JoinHandle<Result<(StatusCode, HeaderMap, String)>>;

/// Sends `GET /` for `host` to `addr` in the background.
fn spawn_get(client: &H1, addr: SocketAddr, host: &'static str) -> Answer {
    let client = client.clone();
    tokio::spawn(async move { get(&client, addr, host, "/").await })
}

/// The value of one series in the sidecar's /metrics (None when absent).
async fn metric(client: &H1, sidecar: &Sidecar, series: &str) -> Result<Option<f64>> {
    let (_, _, text) = get(client, sidecar.admin, "admin", "/metrics").await?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok()))
}

/// Polls /metrics until `series` has `value`.
async fn wait_metric(client: &H1, sidecar: &Sidecar, series: &str, value: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let current = metric(client, sidecar, series).await?;
        if current == Some(value) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{series} is {current:?}, not {value}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls /metrics until `count` requests for `cold` are held.
async fn wait_held(client: &H1, sidecar: &Sidecar, count: f64) -> Result<()> {
    wait_metric(
        client,
        sidecar,
        r#"meridian_held_requests{function="cold"}"#,
        count,
    )
    .await
}

/// Polls /routes until the gateway at `address` has a measured RTT; returns it in ms.
async fn wait_probed(client: &H1, sidecar: &Sidecar, address: SocketAddr) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, routes) = get(client, sidecar.admin, "admin", "/routes").await?;
        let routes: serde_json::Value = serde_json::from_str(&routes)?;
        let rtt = routes["gateways"].as_array().and_then(|gateways| {
            gateways.iter().find_map(|g| {
                (g["address"] == address.to_string() && g["probe"] == "up")
                    .then(|| g["rttMs"].as_f64())
                    .flatten()
            })
        });
        if let Some(rtt) = rtt {
            return Ok(rtt);
        }
        if Instant::now() > deadline {
            bail!("gateway {address} never probed up");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next_activation(agent: &mut Agent) -> Result<pb::ActivateRequest> {
    tokio::time::timeout(Duration::from_secs(10), agent.activations.recv())
        .await
        .context("no activation within 10 s")?
        .context("agent gone")
}

fn held_ms(headers: &HeaderMap) -> Option<u64> {
    headers.get("meridian-held-ms")?.to_str().ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_are_released_when_an_instance_becomes_ready() -> Result<()> {
    let client = h1();
    let mut agent = start_agent().await?;
    let sidecar = start_sidecar("us-east", agent.addr).await?;
    // Scaled to zero: a local tier without instances, no other region.
    let cold = table(4, "us-east", vec![cold()]);
    agent.tables.send_replace(Some(cold));
    wait_ready(&client, &sidecar).await?;
    assert!(agent.reports.recv().await.unwrap().accepted);

    let outbound = spawn_get(&client, sidecar.outbound, "cold");
    let activation = next_activation(&mut agent).await?;
    assert_eq!(activation.client, "sidecar-us-east");
    assert_eq!(
        (activation.namespace.as_str(), activation.name.as_str()),
        ("default", "cold")
    );
    // Another region's request on the gateway listener is held just the same.
    let gateway = spawn_get(&client, sidecar.gateway, "cold");
    wait_held(&client, &sidecar, 2.0).await?;
    let held_since = Instant::now();

    // An instance starts (same version, next local generation): still not ready, still held.
    let backend = start_backend("a", 200).await?;
    let mut starting = local("us-east", &[backend.addr]);
    starting.endpoints[0].state = pb::EndpointState::Starting as i32;
    starting.ready_instances = 0;
    agent.tables.send_replace(Some(at_generation(
        table(
            4,
            "us-east",
            vec![process(function("cold", vec![starting]), 0)],
        ),
        1,
    )));
    let report = agent.reports.recv().await.unwrap();
    assert!(report.accepted && report.version == 4, "{report:?}");
    assert!(!outbound.is_finished() && !gateway.is_finished());

    // Ready: both go through.
    let waited = held_since.elapsed();
    agent.tables.send_replace(Some(at_generation(
        table(
            4,
            "us-east",
            vec![process(
                function("cold", vec![local("us-east", &[backend.addr])]),
                12,
            )],
        ),
        2,
    )));
    for (name, answer) in [("outbound", outbound), ("gateway", gateway)] {
        let (status, headers, body) = answer.await??;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        assert_eq!(body, "hello from a\n");
        assert_eq!(headers["meridian-region"], "us-east");
        let held = held_ms(&headers).context("no meridian-held-ms")?;
        assert!(
            u128::from(held) >= waited.as_millis(),
            "{name}: held {held} ms, but waited {waited:?} after it was seen held"
        );
    }
    wait_held(&client, &sidecar, 0.0).await?;
    assert_eq!(
        metric(
            &client,
            &sidecar,
            r#"meridian_holds_total{function="cold"}"#
        )
        .await?,
        Some(2.0)
    );
    let activations = metric(
        &client,
        &sidecar,
        r#"meridian_activations_total{function="cold"}"#,
    )
    .await?;
    assert!(activations >= Some(1.0), "{activations:?}");
    // Warm now: no hold, no header.
    let (status, headers, _) = get(&client, sidecar.outbound, "cold", "/").await?;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("meridian-held-ms").is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_time_out_with_a_reason() -> Result<()> {
    let client = h1();
    let agent = start_agent().await?;
    let options = Options {
        hold_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let sidecar = start_sidecar_with("us-east", agent.addr, options).await?;
    // `quick`'s own timeout (150 ms) is shorter than the hold timeout, and caps it.
    let mut quick = process(function("quick", vec![local("us-east", &[])]), 0);
    quick.policy = Some(pb::RoutingPolicy {
        timeout_ms: Some(150),
        ..Default::default()
    });
    agent
        .tables
        .send_replace(Some(table(1, "us-east", vec![cold(), quick])));
    wait_ready(&client, &sidecar).await?;

    for (host, limit) in [("cold", 300), ("quick", 150)] {
        let started = Instant::now();
        let (status, headers, body) = get(&client, sidecar.outbound, host, "/").await?;
        let took = started.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{host}: {body}");
        assert_eq!(headers["meridian-error"], "cold-start-timeout");
        assert_eq!(headers["meridian-region"], "us-east");
        assert!(
            body.starts_with(&format!(
                "meridian: cold-start-timeout: no instance of function {host} became ready"
            )),
            "{body}"
        );
        let held = held_ms(&headers).context("no meridian-held-ms")?;
        assert!((limit - 5..limit + 1000).contains(&held), "{host}: {held}");
        assert!(took >= Duration::from_millis(limit - 5), "{host}: {took:?}");
    }
    assert_eq!(
        metric(
            &client,
            &sidecar,
            r#"meridian_cold_start_timeouts_total{function="cold"}"#
        )
        .await?,
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hold_queue_answers_at_once() -> Result<()> {
    let client = h1();
    let agent = start_agent().await?;
    let options = Options {
        hold_queue: 2,
        ..Options::default()
    };
    let sidecar = start_sidecar_with("us-east", agent.addr, options).await?;
    agent
        .tables
        .send_replace(Some(table(1, "us-east", vec![cold()])));
    wait_ready(&client, &sidecar).await?;

    let first = spawn_get(&client, sidecar.outbound, "cold");
    let second = spawn_get(&client, sidecar.outbound, "cold");
    wait_held(&client, &sidecar, 2.0).await?;
    let started = Instant::now();
    let (status, headers, body) = get(&client, sidecar.outbound, "cold", "/").await?;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["meridian-error"], "hold-queue-full");
    assert!(
        body.starts_with("meridian: hold-queue-full: function cold already has 2 requests waiting"),
        "{body}"
    );
    assert!(headers.get("meridian-held-ms").is_none(), "never held");
    assert_eq!(
        metric(
            &client,
            &sidecar,
            r#"meridian_hold_queue_full_total{function="cold"}"#
        )
        .await?,
        Some(1.0)
    );

    let backend = start_backend("a", 200).await?;
    agent.tables.send_replace(Some(at_generation(
        table(
            1,
            "us-east",
            vec![process(
                function("cold", vec![local("us-east", &[backend.addr])]),
                0,
            )],
        ),
        1,
    )));
    for answer in [first, second] {
        let (status, headers, _) = answer.await??;
        assert_eq!(status, StatusCode::OK);
        assert!(held_ms(&headers).is_some());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_remote_faster_than_a_cold_start_serves_at_once() -> Result<()> {
    let client = h1();
    let mut east_agent = start_agent().await?;
    let west_agent = start_agent().await?;
    let west_backend = start_backend("west", 200).await?;
    // A "gateway" whose every answer, health probes included, takes 60 ms: farther away than
    // a 20 ms cold start.
    let far_gateway = start_slow_backend("far", 200, Duration::from_millis(60)).await?;
    let west = start_sidecar("eu-west", west_agent.addr).await?;
    let options = Options {
        hold_timeout: Duration::from_millis(400),
        probe_timeout: Duration::from_millis(1000),
        // Bounds a hold only beyond the hold timeout, so `far` shows the plain rule: held, not
        // sent to a region slower than a cold start (`a_hold_is_bounded_by_...` has the bound).
        hold_remote_margin: Duration::from_secs(10),
        ..Options::default()
    };
    let east = start_sidecar_with("us-east", east_agent.addr, options).await?;
    west_agent.tables.send_replace(Some(table(
        1,
        "eu-west",
        vec![function(
            "cold",
            vec![local("eu-west", &[west_backend.addr])],
        )],
    )));
    east_agent.tables.send_replace(Some(table(
        1,
        "us-east",
        vec![
            // Expected cold start 5 s; eu-west answers probes in well under that.
            process(
                function(
                    "cold",
                    vec![local("us-east", &[]), remote("eu-west", west.gateway)],
                ),
                5000,
            ),
            process(
                function(
                    "far",
                    vec![local("us-east", &[]), remote("ap-south", far_gateway.addr)],
                ),
                20,
            ),
        ],
    )));
    wait_ready(&client, &west).await?;
    wait_ready(&client, &east).await?;
    let rtt = wait_probed(&client, &east, west.gateway).await?;
    assert!(rtt < 5000.0, "{rtt}");
    let far_rtt = wait_probed(&client, &east, far_gateway.addr).await?;
    assert!(far_rtt >= 20.0, "{far_rtt}");

    let started = Instant::now();
    let (status, headers, body) = get(&client, east.outbound, "cold", "/").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "hello from west\n");
    assert_eq!(headers["meridian-region"], "eu-west");
    assert!(headers.get("meridian-held-ms").is_none(), "not held");
    assert!(started.elapsed() < Duration::from_secs(2));
    // ... and an instance is asked for all the same.
    let activation = next_activation(&mut east_agent).await?;
    assert_eq!(activation.name, "cold");

    // The far region is slower than a cold start: held (then timed out here), not sent there.
    let (status, headers, body) = get(&client, east.outbound, "far", "/").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["meridian-error"], "cold-start-timeout");
    let probes_only = far_gateway.last_headers.lock().unwrap().clone();
    assert!(
        probes_only.is_none_or(|h| h.get("meridian-hop").is_none()),
        "a request went to the far region"
    );
    assert_eq!(next_activation(&mut east_agent).await?.name, "far");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_is_bounded_by_a_healthy_regions_round_trip_then_goes_there() -> Result<()> {
    let client = h1();
    let mut agent = start_agent().await?;
    // A region whose every answer, probes included, takes 60 ms: farther than a 20 ms cold
    // start, so requests are held; but never longer than 60 ms + the 50 ms margin.
    let far_gateway = start_slow_backend("far", 200, Duration::from_millis(60)).await?;
    let options = Options {
        probe_timeout: Duration::from_millis(1000),
        ..Options::default()
    };
    let east = start_sidecar_with("us-east", agent.addr, options).await?;
    agent.tables.send_replace(Some(table(
        1,
        "us-east",
        vec![process(
            function(
                "far",
                vec![local("us-east", &[]), remote("ap-south", far_gateway.addr)],
            ),
            20,
        )],
    )));
    wait_ready(&client, &east).await?;
    let rtt = wait_probed(&client, &east, far_gateway.addr).await?;
    assert!(rtt >= 20.0, "{rtt}");

    let started = Instant::now();
    let (status, headers, body) = get(&client, east.outbound, "far", "/").await?;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "hello from far\n");
    let held = held_ms(&headers).context("no meridian-held-ms: not held")?;
    let bound = rtt as u64 + 50;
    assert!(
        held + 5 >= bound && held <= bound + 100,
        "held {held} ms, bound {bound} ms"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(next_activation(&mut agent).await?.name, "far");
    assert_eq!(
        metric(
            &client,
            &east,
            r#"meridian_hold_spills_total{function="far"}"#
        )
        .await?,
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_goes_to_a_healthy_region_at_once() -> Result<()> {
    let client = h1();
    let mut east_agent = start_agent().await?;
    let west_agent = start_agent().await?;
    let west_backend = start_backend("west", 200).await?;
    let west = start_sidecar("eu-west", west_agent.addr).await?;
    let options = Options {
        hold_timeout: Duration::from_secs(5),
        ..Options::default()
    };
    let east = start_sidecar_with("us-east", east_agent.addr, options).await?;
    west_agent.tables.send_replace(Some(table(
        1,
        "eu-west",
        vec![function(
            "crashy",
            vec![local("eu-west", &[west_backend.addr])],
        )],
    )));
    // The agent says: two failed starts, and a restart backoff. A 10 s cold start would send
    // the request to eu-west anyway; 1 ms never would.
    let mut crashy = process(
        function(
            "crashy",
            vec![local("us-east", &[]), remote("eu-west", west.gateway)],
        ),
        1,
    );
    crashy.local_failed_starts = 2;
    crashy.local_restart_backoff = true;
    east_agent
        .tables
        .send_replace(Some(table(1, "us-east", vec![crashy])));
    wait_ready(&client, &west).await?;
    wait_ready(&client, &east).await?;
    wait_probed(&client, &east, west.gateway).await?;

    let (status, headers, body) = get(&client, east.outbound, "crashy", "/").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "hello from west\n");
    assert_eq!(headers["meridian-region"], "eu-west");
    assert!(headers.get("meridian-held-ms").is_none(), "held");
    assert_eq!(next_activation(&mut east_agent).await?.name, "crashy");
    assert_eq!(
        metric(
            &client,
            &east,
            r#"meridian_crash_loop_remote_total{function="crashy"}"#
        )
        .await?,
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_carry_concurrency_requests_held_and_instances() -> Result<()> {
    let client = h1();
    let mut agent = start_agent().await?;
    let options = Options {
        load_report_interval: Duration::from_millis(200),
        hold_timeout: Duration::from_millis(1500),
        ..Options::default()
    };
    let sidecar = start_sidecar_with("us-east", agent.addr, options).await?;
    let slow = start_slow_backend("slow", 200, Duration::from_millis(1200)).await?;
    let external = start_slow_backend("external", 200, Duration::from_millis(1200)).await?;
    agent.tables.send_replace(Some(at_generation(
        table(
            5,
            "us-east",
            vec![
                process(function("busy", vec![local("us-east", &[slow.addr])]), 0),
                cold(),
                // Not run by the agent: never reported.
                function("other", vec![local("us-east", &[external.addr])]),
            ],
        ),
        3,
    )));
    wait_ready(&client, &sidecar).await?;

    let busy = [
        spawn_get(&client, sidecar.outbound, "busy"),
        spawn_get(&client, sidecar.outbound, "busy"),
    ];
    let held = spawn_get(&client, sidecar.outbound, "cold");
    let _other = spawn_get(&client, sidecar.outbound, "other");

    // A whole window with both busy requests in flight and the cold one held.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut requests = std::collections::BTreeMap::<String, u64>::new();
    let report = loop {
        let report = tokio::time::timeout(Duration::from_secs(5), agent.loads.recv())
            .await?
            .context("agent gone")?;
        for f in &report.functions {
            *requests.entry(f.name.clone()).or_default() += f.requests;
        }
        let full = report
            .functions
            .iter()
            .any(|f| f.name == "busy" && f.average_concurrency >= 1.95 && f.endpoints.len() == 1);
        if full {
            break report;
        }
        if Instant::now() > deadline {
            bail!("no report with a full window: last {report:?}");
        }
    };
    assert_eq!(report.client, "sidecar-us-east");
    assert_eq!((report.table_version, report.local_generation), (5, 3));
    assert!((150..400).contains(&report.window_ms), "{report:?}");
    let mut names: Vec<&str> = report.functions.iter().map(|f| f.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["busy", "cold"], "{report:?}");
    let by_name = |name: &str| report.functions.iter().find(|f| f.name == name).unwrap();
    let busy_load = by_name("busy");
    assert_eq!(busy_load.namespace, "default");
    assert!(busy_load.average_concurrency <= 2.0, "{busy_load:?}");
    assert_eq!(
        busy_load.endpoints,
        [pb::EndpointLoad {
            id: format!("i-{}", slow.addr.port()),
            in_flight: 2
        }]
    );
    assert_eq!(busy_load.held, 0);
    let cold_load = by_name("cold");
    assert_eq!(cold_load.held, 1);
    assert!(
        (cold_load.average_concurrency - 1.0).abs() < 0.05,
        "{cold_load:?}"
    );
    assert!(cold_load.endpoints.is_empty());

    for answer in busy {
        assert_eq!(answer.await??.0, StatusCode::OK);
    }
    assert_eq!(held.await??.0, StatusCode::SERVICE_UNAVAILABLE);
    // Reports continue until one says everything is idle, then stop.
    loop {
        let report = tokio::time::timeout(Duration::from_secs(5), agent.loads.recv())
            .await?
            .context("agent gone")?;
        for f in &report.functions {
            *requests.entry(f.name.clone()).or_default() += f.requests;
        }
        let idle = report.functions.iter().all(|f| {
            f.average_concurrency == 0.0 && f.requests == 0 && f.held == 0 && f.endpoints.is_empty()
        });
        if idle {
            break;
        }
    }
    assert_eq!(requests.get("busy"), Some(&2));
    assert_eq!(requests.get("cold"), Some(&1));
    assert_eq!(requests.get("other"), None);
    // Silence for several windows.
    let quiet = tokio::time::timeout(Duration::from_millis(800), agent.loads.recv()).await;
    assert!(quiet.is_err(), "report while idle: {quiet:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_local_generation_is_reported_early_while_active() -> Result<()> {
    let client = h1();
    let mut agent = start_agent().await?;
    let sidecar = start_sidecar("us-east", agent.addr).await?;
    let slow = start_slow_backend("slow", 200, Duration::from_secs(3)).await?;
    let busy = |generation| {
        at_generation(
            table(
                9,
                "us-east",
                vec![process(
                    function("busy", vec![local("us-east", &[slow.addr])]),
                    0,
                )],
            ),
            generation,
        )
    };
    agent.tables.send_replace(Some(busy(1)));
    wait_ready(&client, &sidecar).await?;
    let _answer = spawn_get(&client, sidecar.outbound, "busy");
    let first = tokio::time::timeout(Duration::from_secs(5), agent.loads.recv())
        .await?
        .context("agent gone")?;
    assert_eq!(first.local_generation, 1);
    // A swap a third into the next 1 s window closes it: the agent hears of generation 2
    // well before the window would have ended.
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.tables.send_replace(Some(busy(2)));
    let next = tokio::time::timeout(Duration::from_secs(5), agent.loads.recv())
        .await?
        .context("agent gone")?;
    assert_eq!(next.local_generation, 2, "{next:?}");
    assert!(next.window_ms < 800, "{next:?}");
    Ok(())
}
