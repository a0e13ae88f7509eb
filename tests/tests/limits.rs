//! End-to-end bounds on what input can grow: oversized specs and control characters are refused
//! naming the field and the limit, a namespace quota holds, 20,000 functions reach every
//! region's sidecars in parts and route (and are listed by the CLI and loaded by a new replica),
//! and a record in etcd that cannot be decoded is skipped and reported instead of bricking a
//! replica.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use http::StatusCode;
use meridian_control_plane::spec::FunctionKey;
use meridian_control_plane::store::Store;
use meridian_proto::v1::function_spec::Runtime;
use meridian_proto::v1::{
    ApplyFunctionRequest, FunctionSpec, ListFunctionsRequest, ListReplicasRequest, ProcessRuntime,
};
use meridian_tests::{
    external_spec, free_port, metric_value, output_text, poll_until, region_ip, routing_table,
    Agent, AgentOpts, ControlPlane, ControlPlaneOpts, Etcd, Sidecar, SidecarOpts, TestBackend,
    REGIONS,
};
use tonic::Code;

/// The key prefix the control plane uses by default.
const PREFIX: &str = "/meridian/v1/";

fn process_spec(name: &str) -> FunctionSpec {
    FunctionSpec {
        name: name.to_string(),
        namespace: "default".to_string(),
        runtime: Some(Runtime::Process(ProcessRuntime {
            command: "sample_function".to_string(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn process(spec: &mut FunctionSpec) -> &mut ProcessRuntime {
    match &mut spec.runtime {
        Some(Runtime::Process(process)) => process,
        _ => unreachable!("process_spec builds a process runtime"),
    }
}

/// Applies `spec`; the refusal's code and message, or `None` when it was accepted.
async fn refusal(cp: &ControlPlane, spec: FunctionSpec) -> Result<Option<(Code, String)>> {
    let answer = cp
        .functions()
        .await?
        .apply(ApplyFunctionRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await;
    Ok(answer
        .err()
        .map(|status| (status.code(), status.message().to_string())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_over_a_limit_or_with_control_characters_are_refused_naming_the_field() -> Result<()>
{
    tokio::time::timeout(Duration::from_secs(60), over_limits())
        .await
        .context("the test took more than its 60 s budget")?
}

async fn over_limits() -> Result<()> {
    let etcd = Etcd::start().await?;
    let cp = ControlPlane::start(
        &etcd.url(),
        ControlPlaneOpts {
            extra_args: vec!["--max-functions-per-namespace".into(), "3".into()],
            ..Default::default()
        },
    )
    .await?;

    let megabyte = "a".repeat(1024 * 1024);
    let mut one_mb_args = process_spec("big-args");
    process(&mut one_mb_args).args = vec![megabyte.clone()];
    let mut three_mb_env = process_spec("big-env");
    process(&mut three_mb_env).env = (0..3)
        .map(|i| (format!("VAR{i}"), megabyte.clone()))
        .collect();
    // Every field under its own limit, the whole over 256 KiB: 3 regions of 64 URLs of 2,000
    // bytes.
    let many_urls: Vec<(String, String)> = ["us-east", "eu-west", "ap-south"]
        .iter()
        .flat_map(|region| {
            (0..64).map(move |i| {
                (
                    (*region).to_string(),
                    format!("http://127.0.1.1:{}/{}", 9000 + i, "p".repeat(1970)),
                )
            })
        })
        .collect();
    let pairs: Vec<(&str, &str)> = many_urls
        .iter()
        .map(|(r, u)| (r.as_str(), u.as_str()))
        .collect();
    let whole_spec = external_spec("many-urls", &pairs);
    let long_url = external_spec(
        "long-url",
        &[(
            "us-east",
            &format!("http://127.0.1.1:9000/{}", "u".repeat(2100)),
        )],
    );
    let many_labels = FunctionSpec {
        labels: (0..65)
            .map(|i| (format!("l{i}"), "v".to_string()))
            .collect(),
        ..external_spec("labels", &[("us-east", "http://127.0.1.1:9000")])
    };
    let mut nul_command = process_spec("nul-command");
    process(&mut nul_command).command = "sample_function\0--evil".to_string();
    let mut cr_arg = process_spec("cr-arg");
    process(&mut cr_arg).args = vec!["ok".into(), "line\rbreak".into()];
    let mut lf_env = process_spec("lf-env");
    process(&mut lf_env).env = [("GREETING".to_string(), "a\nb".to_string())]
        .into_iter()
        .collect();
    let crlf_url = external_spec(
        "crlf-url",
        &[("us-east", "http://127.0.1.1:9000/\r\nX-Evil: 1")],
    );
    let mut dotdot_command = process_spec("dotdot");
    process(&mut dotdot_command).command = "../../bin/sh".to_string();

    // (case, spec, what the INVALID_ARGUMENT message must contain)
    let cases: Vec<(&str, FunctionSpec, Vec<&str>)> = vec![
        (
            "1 MB of args",
            one_mb_args,
            vec!["spec.runtime.process.args", "65536", "--max-args-bytes"],
        ),
        (
            "3 MB of env",
            three_mb_env,
            vec!["spec.runtime.process.env", "65536"],
        ),
        (
            "a spec over 256 KiB",
            whole_spec,
            vec!["spec:", "262144", "--max-spec-bytes"],
        ),
        (
            "a URL over 2 KiB",
            long_url,
            vec!["spec.runtime.external.regions[0].urls[0]", "2048"],
        ),
        ("65 labels", many_labels, vec!["metadata.labels", "64"]),
        (
            "NUL in the command",
            nul_command,
            vec!["spec.runtime.process.command", "control character"],
        ),
        (
            "CR in an argument",
            cr_arg,
            vec!["spec.runtime.process.args[1]", "control character"],
        ),
        (
            "LF in an environment value",
            lf_env,
            vec!["spec.runtime.process.env", "GREETING"],
        ),
        (
            "CR LF in a URL",
            crlf_url,
            vec!["spec.runtime.external.regions[0].urls[0]"],
        ),
        (
            ".. in the command",
            dotdot_command,
            vec!["spec.runtime.process.command", ".."],
        ),
    ];
    let mut failures = Vec::new();
    for (case, spec, wanted) in cases {
        match refusal(&cp, spec).await? {
            None => failures.push(format!("{case}: accepted")),
            Some((code, message)) => {
                if code != Code::InvalidArgument || !wanted.iter().all(|w| message.contains(w)) {
                    failures.push(format!(
                        "{case}: want INVALID_ARGUMENT naming {wanted:?}, got {code:?}: {message}"
                    ));
                } else {
                    eprintln!("{case}: {message}");
                }
            }
        }
    }
    ensure!(failures.is_empty(), "{failures:#?}");

    // The quota: 3 per namespace here. An update of a stored function is not a new one.
    let mut functions = cp.functions().await?;
    for name in ["q1", "q2", "q3"] {
        let spec = external_spec(name, &[("us-east", "http://127.0.1.1:9000")]);
        ensure!(
            refusal(&cp, spec).await?.is_none(),
            "{name} is within the quota"
        );
    }
    let (code, message) = refusal(
        &cp,
        external_spec("q4", &[("us-east", "http://127.0.1.1:9000")]),
    )
    .await?
    .context("a 4th function in a namespace with a quota of 3 was accepted")?;
    ensure!(
        code == Code::InvalidArgument
            && message.contains("metadata.namespace")
            && message.contains('3')
            && message.contains("--max-functions-per-namespace"),
        "over the quota: want INVALID_ARGUMENT naming metadata.namespace and the limit, got {code:?}: {message}"
    );
    let update = external_spec("q1", &[("us-east", "http://127.0.1.1:9001")]);
    ensure!(
        refusal(&cp, update).await?.is_none(),
        "updating a stored function is not over the quota"
    );
    let other = FunctionSpec {
        namespace: "other".into(),
        ..external_spec("q4", &[("us-east", "http://127.0.1.1:9000")])
    };
    ensure!(
        refusal(&cp, other).await?.is_none(),
        "the quota is per namespace"
    );

    // The CLI says the same for a manifest, and nothing refused was stored.
    let dir = tempfile::tempdir()?;
    let manifest = dir.path().join("big.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: meridian.dev/v1\nkind: Function\nmetadata:\n  name: big\nspec:\n  runtime:\n    process:\n      command: sample_function\n      args: [\"{}\"]\n",
            "a".repeat(100 * 1024)
        ),
    )?;
    let out = cp
        .ctl(["apply", "-f", manifest.to_str().context("utf-8 path")?])
        .await?;
    let text = output_text(&out);
    ensure!(
        !out.status.success()
            && text.contains("spec.runtime.process.args")
            && text.contains("65536"),
        "meridianctl apply of 100 KiB of args: {text}"
    );
    let stored = functions
        .list(ListFunctionsRequest {
            all_namespaces: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .functions;
    let mut names: Vec<String> = stored
        .iter()
        .filter_map(|f| f.spec.as_ref())
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect();
    names.sort();
    ensure!(
        names == ["default/q1", "default/q2", "default/q3", "other/q4"],
        "stored: {names:?}"
    );
    Ok(())
}

/// Functions per namespace in the scale test: the default quota, in two namespaces.
const PER_NAMESPACE: usize = 10_000;
const NAMESPACES: [&str; 2] = ["bulk-a", "bulk-b"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_functions_route_in_every_region() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(300), twenty_thousand())
        .await
        .context("the test took more than its 300 s budget")?
}

async fn twenty_thousand() -> Result<()> {
    let etcd = Etcd::start().await?;
    let backends = {
        let mut backends = Vec::new();
        for (index, region) in REGIONS.iter().enumerate() {
            let ip = region_ip(index);
            backends
                .push(TestBackend::start(SocketAddr::from((ip, free_port(ip)?)), region).await?);
        }
        backends
    };
    let urls: Vec<(String, String)> = REGIONS
        .iter()
        .zip(&backends)
        .map(|(region, backend)| ((*region).to_string(), backend.url()))
        .collect();
    let pairs: Vec<(&str, &str)> = urls.iter().map(|(r, u)| (r.as_str(), u.as_str())).collect();

    // Seeded through the control plane's store before any replica runs: what is measured here
    // is a table of 20,000 functions loaded, compiled and pushed, not 20,000 API round trips.
    let started = Instant::now();
    let store = Store::connect(&[etcd.url()], PREFIX, Duration::from_secs(10)).await?;
    let specs: Vec<FunctionSpec> = NAMESPACES
        .iter()
        .flat_map(|namespace| {
            let pairs = pairs.clone();
            (0..PER_NAMESPACE).map(move |i| FunctionSpec {
                namespace: (*namespace).to_string(),
                ..external_spec(&format!("f{i:05}"), &pairs)
            })
        })
        .collect();
    futures::stream::iter(specs)
        .map(|spec| {
            let store = store.clone();
            async move {
                let key = FunctionKey {
                    namespace: spec.namespace.clone(),
                    name: spec.name.clone(),
                };
                store
                    .put_function(&key, &spec, None, false)
                    .await
                    .with_context(|| format!("storing {key}"))
            }
        })
        .buffer_unordered(64)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let total = PER_NAMESPACE * NAMESPACES.len();
    eprintln!("stored {total} functions in {:?}", started.elapsed());

    let started = Instant::now();
    // The binary's default lease TTL (10 s), not the tests' usual 2 s: on a loaded 2-core
    // machine, writing the 60,000 endpoint records of the external URLs can delay a 2 s
    // keep-alive past its lease, and the test is about table size, not lease timing.
    let cp = ControlPlane::start(
        &etcd.url(),
        ControlPlaneOpts {
            agent_lease_ttl_secs: 10,
            ..ControlPlaneOpts::replica("cp-0")
        },
    )
    .await?;
    let cp_urls = [cp.url()];
    let agents = futures::future::try_join_all(
        REGIONS
            .iter()
            .enumerate()
            .map(|(index, region)| Agent::start(index, region, &cp_urls, AgentOpts::default())),
    )
    .await?;
    let mut sidecars = Vec::new();
    for agent in &agents {
        sidecars.push(
            Sidecar::start(
                agent.region_index(),
                agent.region(),
                &agent.url(),
                SidecarOpts::default(),
            )
            .await?,
        );
    }

    // The 10,001st in a namespace is over the default quota.
    let (code, message) = refusal(
        &cp,
        FunctionSpec {
            namespace: NAMESPACES[0].to_string(),
            ..external_spec("one-too-many", &pairs)
        },
    )
    .await?
    .context("the 10,001st function of a namespace was accepted")?;
    ensure!(
        code == Code::InvalidArgument && message.contains("10000"),
        "{code:?}: {message}"
    );
    // One more, in another namespace, applied through the API once the big table is out: a
    // delta on 20,000 functions.
    refusal(
        &cp,
        FunctionSpec {
            namespace: "late".to_string(),
            ..external_spec("latecomer", &pairs)
        },
    )
    .await?
    .map_or(Ok(()), |(code, message)| {
        Err(anyhow::anyhow!("latecomer refused: {code:?}: {message}"))
    })?;

    // Every region's sidecar routes the first, a middle and the last function of each namespace
    // to its own region's backend.
    let probes: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|ns| {
            [0, PER_NAMESPACE / 2, PER_NAMESPACE - 1]
                .map(|i| format!("f{i:05}.{ns}"))
                .into_iter()
        })
        .chain(["latecomer.late".to_string()])
        .collect();
    for sidecar in &sidecars {
        let client = sidecar.client();
        let region = sidecar.region().to_string();
        poll_until(
            Duration::from_secs(120),
            &format!("{region}'s sidecar to route all {total} functions"),
            || {
                let client = client.clone();
                let probes = probes.clone();
                let region = region.clone();
                async move {
                    for host in &probes {
                        let reply = client.get(host, "/").await?;
                        ensure!(
                            reply.status == StatusCode::OK
                                && reply.region() == Some(region.as_str()),
                            "{host} via {region}: {}",
                            reply.describe()
                        );
                    }
                    Ok(())
                }
            },
        )
        .await?;
        let routes = sidecar.routes().await?;
        let loaded = routes["functions"].as_array().map_or(0, Vec::len);
        ensure!(
            loaded >= total,
            "{region}'s sidecar holds {loaded} functions, want {total}"
        );
    }
    eprintln!(
        "every region's sidecar routes {total} functions {:?} after the mesh started",
        started.elapsed()
    );

    // The CLI lists them all (paged), and `get routes` shows the whole region.
    let out = cp.ctl(["get", "functions", "-A"]).await?;
    let text = output_text(&out);
    ensure!(out.status.success(), "get functions -A: {text}");
    let listed = text
        .lines()
        .filter(|l| NAMESPACES.iter().any(|ns| l.starts_with(ns)))
        .count();
    ensure!(
        listed == total,
        "get functions -A listed {listed} of {total}"
    );
    let out = cp.ctl(["get", "routes", "us-east", "-o", "json"]).await?;
    ensure!(
        out.status.success(),
        "get routes us-east: {}",
        output_text(&out)
    );
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let count = routes_in(&routes);
    ensure!(
        count >= total,
        "get routes listed {count} functions, want {total}"
    );

    // A new replica loads them from etcd (in pages) and serves the same table.
    let fresh = ControlPlane::start(&etcd.url(), ControlPlaneOpts::replica("cp-new")).await?;
    let table = poll_until(
        Duration::from_secs(60),
        "the new replica to serve the whole us-east table",
        || async {
            let table = routing_table(&mut fresh.mesh().await?, "us-east").await?;
            ensure!(
                table.functions.len() >= total,
                "{} functions",
                table.functions.len()
            );
            Ok(table)
        },
    )
    .await?;
    eprintln!(
        "the new replica serves {} functions in us-east",
        table.functions.len()
    );
    Ok(())
}

/// The number of functions in `get routes -o json` output, whatever its nesting.
fn routes_in(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Object(map) => map
            .get("functions")
            .and_then(serde_json::Value::as_array)
            .map_or_else(|| map.values().map(routes_in).sum(), Vec::len),
        serde_json::Value::Array(items) => items.iter().map(routes_in).sum(),
        _ => 0,
    }
}

/// `etcdctl put key value` against `etcd`.
fn etcd_put(etcd: &Etcd, key: &str, value: &[u8]) -> Result<()> {
    use std::io::Write;
    // The value goes through stdin-free `put`, so it must be an argument: etcdctl takes raw
    // bytes from the OS argument, which cannot hold NUL. Bytes that are not protobuf suffice.
    let value = std::str::from_utf8(value).context("the value must be an OS argument")?;
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.url(), "put", key, value])
        .output()
        .context("running etcdctl (Debian's etcd-client package)")?;
    std::io::stderr().write_all(&out.stderr)?;
    ensure!(out.status.success(), "etcdctl put {key} failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_is_skipped_and_reported_and_a_new_replica_starts() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(60), undecodable())
        .await
        .context("the test took more than its 60 s budget")?
}

async fn undecodable() -> Result<()> {
    let etcd = Etcd::start().await?;
    let first = ControlPlane::start(&etcd.url(), ControlPlaneOpts::replica("cp-0")).await?;
    let mut functions = first.functions().await?;
    functions
        .apply(ApplyFunctionRequest {
            spec: Some(external_spec(
                "good",
                &[("us-east", "http://127.0.1.1:9000")],
            )),
            ..Default::default()
        })
        .await?;

    // A record written behind the API's back: not protobuf (0xff 0xff is no valid tag).
    let broken_key = format!("{PREFIX}functions/default/broken");
    etcd_put(
        &etcd,
        &broken_key,
        "\u{7f}\u{7f}\u{7f} not a function".as_bytes(),
    )?;

    // The running replica sees it in its watch; a new replica loads past it.
    let second = ControlPlane::start(&etcd.url(), ControlPlaneOpts::replica("cp-1")).await?;
    for cp in [&first, &second] {
        let replica = cp.replica_id().to_string();
        let skipped = poll_until(
            Duration::from_secs(20),
            &format!("{replica} to report the skipped record"),
            || async {
                let skipped = cp
                    .channel()
                    .await
                    .map(meridian_proto::v1::control_plane_service_client::ControlPlaneServiceClient::new)?
                    .list_replicas(ListReplicasRequest {})
                    .await?
                    .into_inner()
                    .skipped_records;
                ensure!(
                    skipped.iter().any(|r| r.key == broken_key),
                    "skipped: {skipped:?}"
                );
                Ok(skipped)
            },
        )
        .await?;
        ensure!(skipped.len() == 1, "{replica} skipped {skipped:?}");
        let metrics = cp.metrics().await?;
        ensure!(
            metric_value(&metrics, "meridian_etcd_skipped_records") == Some(1.0),
            "{replica}: meridian_etcd_skipped_records is not 1:\n{metrics}"
        );
        let out = cp.ctl(["status"]).await?;
        let text = output_text(&out);
        ensure!(
            text.contains(&broken_key) && text.contains("skipped"),
            "{replica}: meridianctl status must name the skipped record: {text}"
        );
        // It serves the rest.
        let listed = cp
            .functions()
            .await?
            .list(ListFunctionsRequest::default())
            .await?
            .into_inner()
            .functions;
        let names: Vec<&str> = listed
            .iter()
            .filter_map(|f| f.spec.as_ref())
            .map(|s| s.name.as_str())
            .collect();
        ensure!(names == ["good"], "{replica} lists {names:?}");
        let table = routing_table(&mut cp.mesh().await?, "us-east").await?;
        ensure!(
            table
                .functions
                .iter()
                .any(|f| f.name == "good" && !f.tiers.is_empty()),
            "{replica}: good is not routed: {table:?}"
        );
    }
    ensure!(
        second.process().log().contains(&broken_key),
        "the new replica's log must name the key it skipped:\n{}",
        second.process().log_tail(30)
    );

    // Overwriting the record through the API clears the report.
    functions
        .apply(ApplyFunctionRequest {
            spec: Some(external_spec(
                "broken",
                &[("us-east", "http://127.0.1.1:9000")],
            )),
            ..Default::default()
        })
        .await?;
    poll_until(
        Duration::from_secs(20),
        "the skipped report to clear",
        || async {
            let metrics = second.metrics().await?;
            ensure!(
                metric_value(&metrics, "meridian_etcd_skipped_records") == Some(0.0),
                "still skipped"
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}
