//! End-to-end bad input: broken manifests, invalid specs, unreachable control planes, bad agent
//! flags, bad hellos and a corrupt persisted table are each refused with a message that says
//! what is wrong, and none of them writes anything or crashes anything.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use meridian_proto::v1::function_service_client::FunctionServiceClient;
use meridian_proto::v1::function_spec::Runtime;
use meridian_proto::v1::{
    ApplyFunctionRequest, FunctionSpec, ListFunctionsRequest, Placement, ProcessRuntime,
    RegionPlacement, RoutingPolicy,
};
use meridian_tests::{
    external_spec, free_port, meridianctl, output_text, probe_hello, Agent, AgentOpts,
    ControlPlane, ControlPlaneOpts, Etcd, RawAgent,
};
use tonic::transport::Channel;
use tonic::Code;

const VALID: &str = "\
apiVersion: meridian.dev/v1
kind: Function
metadata:
  name: hello
spec:
  runtime:
    external:
      regions:
        - region: us-east
          urls: [\"http://127.0.1.1:9000\"]
";

/// Whether `text` has "line N" and "column M" in it.
fn has_line_and_column(text: &str) -> bool {
    let has = |word: &str| {
        text.match_indices(word).any(|(at, _)| {
            text[at + word.len()..]
                .trim_start_matches([' ', ':'])
                .starts_with(|c: char| c.is_ascii_digit())
        })
    };
    has("line") && has("column")
}

async fn stored_count(functions: &mut FunctionServiceClient<Channel>) -> Result<usize> {
    Ok(functions
        .list(ListFunctionsRequest {
            all_namespaces: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .functions
        .len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridianctl_refuses_bad_manifests_naming_the_field_and_writes_nothing() -> Result<()> {
    let etcd = Etcd::start().await?;
    let cp = ControlPlane::start(&etcd.url(), ControlPlaneOpts::default()).await?;
    let dir = tempfile::tempdir()?;

    // (case, manifest, what the message must contain)
    let cases: &[(&str, String, &[&str])] = &[
        (
            "YAML syntax error",
            VALID.replace("9000\"]", "9000\""),
            &[],
        ),
        ("unknown field", format!("{VALID}  replicas: 3\n"), &["replicas"]),
        (
            "bad name",
            VALID.replace("name: hello", "name: Hello_World"),
            &["metadata.name"],
        ),
        (
            "minInstances > maxInstances",
            format!("{VALID}  scaling:\n    minInstances: 5\n    maxInstances: 2\n"),
            &["spec.scaling.", "Instances"],
        ),
        (
            "zero timeout",
            format!("{VALID}  routing:\n    timeout: 0s\n"),
            &["spec.routing.timeout"],
        ),
        (
            "too many retries",
            format!("{VALID}  routing:\n    maxRetries: 9\n"),
            &["spec.routing.maxRetries"],
        ),
        (
            "duplicate external region",
            format!("{VALID}        - region: us-east\n          urls: [\"http://127.0.1.1:9001\"]\n"),
            &["spec.runtime.external.regions[1]"],
        ),
        (
            "duplicate placement region",
            "apiVersion: meridian.dev/v1\nkind: Function\nmetadata: {name: hello}\nspec:\n  runtime:\n    process: {command: /bin/true}\n  placement:\n    regions:\n      - region: us-east\n      - region: us-east\n"
                .to_string(),
            &["spec.placement.regions[1]"],
        ),
    ];

    let mut failures = Vec::new();
    for (case, manifest, needles) in cases {
        let path = dir.path().join("manifest.yaml");
        std::fs::write(&path, manifest)?;
        let out = cp
            .ctl([
                std::ffi::OsStr::new("apply"),
                "-f".as_ref(),
                path.as_os_str(),
            ])
            .await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            failures.push(format!("{case}: accepted\n{}", output_text(&out)));
            continue;
        }
        if *case == "YAML syntax error" && !has_line_and_column(&text) {
            failures.push(format!("{case}: no line and column in the message\n{text}"));
        }
        for needle in *needles {
            if !text.contains(needle) {
                failures.push(format!(
                    "{case}: message does not contain {needle:?}\n{text}"
                ));
            }
        }
    }
    let mut functions = cp.functions().await?;
    let count = stored_count(&mut functions).await?;
    ensure!(
        failures.is_empty() && count == 0,
        "{} of {} bad manifests misbehaved; {count} functions stored (want 0):\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );

    // The same format without the mistakes is accepted: the refusals above were about content.
    let path = dir.path().join("valid.yaml");
    std::fs::write(&path, VALID)?;
    let out = cp
        .ctl([
            std::ffi::OsStr::new("apply"),
            "-f".as_ref(),
            path.as_os_str(),
        ])
        .await?;
    ensure!(
        out.status.success(),
        "valid manifest refused: {}",
        output_text(&out)
    );
    ensure!(
        stored_count(&mut functions).await? == 1,
        "the valid manifest was not stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_apply_and_hello_refuse_bad_input_with_the_field_path() -> Result<()> {
    let etcd = Etcd::start().await?;
    let cp = ControlPlane::start(&etcd.url(), ControlPlaneOpts::default()).await?;
    let mut functions = cp.functions().await?;
    let valid = || external_spec("hello", &[("us-east", "http://127.0.1.1:9000")]);

    let bad_name = FunctionSpec {
        name: "Bad_Name".to_string(),
        ..valid()
    };
    // Placement is for process functions (external ones are placed by their URLs).
    let min_above_max = FunctionSpec {
        runtime: Some(Runtime::Process(ProcessRuntime {
            command: "/bin/true".to_string(),
            ..Default::default()
        })),
        placement: Some(Placement {
            all_regions: false,
            regions: vec![RegionPlacement {
                region: "us-east".to_string(),
                min_instances: Some(5),
                max_instances: Some(2),
            }],
        }),
        ..valid()
    };
    let too_many_retries = FunctionSpec {
        routing: Some(RoutingPolicy {
            max_retries: Some(9),
            ..Default::default()
        }),
        ..valid()
    };
    let bad_url = external_spec("hello", &[("us-east", "ftp://127.0.1.1:9000")]);
    // A host no agent can connect to (agents used to skip it after the API had accepted it).
    let bad_host = external_spec(
        "hello",
        &[
            ("us-east", "http://127.0.1.1:9000"),
            ("eu-west", "http://a,b:80"),
        ],
    );
    let cases = [
        ("bad name", bad_name, "metadata.name"),
        (
            "minInstances > maxInstances",
            min_above_max,
            "spec.placement.regions[0]",
        ),
        (
            "too many retries",
            too_many_retries,
            "spec.routing.maxRetries",
        ),
        (
            "bad URL",
            bad_url,
            "spec.runtime.external.regions[0].urls[0]",
        ),
        (
            "bad URL host",
            bad_host,
            "spec.runtime.external.regions[1].urls[0]",
        ),
    ];
    let mut failures = Vec::new();
    for (case, spec, path) in cases {
        match functions
            .apply(ApplyFunctionRequest {
                spec: Some(spec),
                ..Default::default()
            })
            .await
        {
            Ok(response) => failures.push(format!("{case}: accepted: {response:?}")),
            Err(status) => {
                if status.code() != Code::InvalidArgument || !status.message().contains(path) {
                    failures.push(format!(
                        "{case}: want INVALID_ARGUMENT naming {path}, got {:?}: {}",
                        status.code(),
                        status.message()
                    ));
                }
            }
        }
    }
    let count = stored_count(&mut functions).await?;
    ensure!(
        failures.is_empty() && count == 0,
        "{failures:#?}; {count} functions stored (want 0)"
    );

    // A hello with a region that is not a DNS label is refused, naming the field.
    let refused = async {
        let mut probe =
            RawAgent::connect(cp.channel().await?, probe_hello("Bad_Region", "probe-1", 0)).await?;
        probe.next_update(Duration::from_secs(5)).await
    }
    .await;
    let err = match refused {
        Ok(update) => anyhow::bail!("a hello with region Bad_Region got a table: {update:?}"),
        Err(err) => err,
    };
    let status = err
        .chain()
        .find_map(|e| e.downcast_ref::<tonic::Status>())
        .with_context(|| format!("want INVALID_ARGUMENT, got {err:#}"))?;
    ensure!(
        status.code() == Code::InvalidArgument && status.message().contains("hello.region"),
        "want INVALID_ARGUMENT naming hello.region, got {:?}: {}",
        status.code(),
        status.message()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridianctl_against_an_unreachable_control_plane_fails_fast_naming_it() -> Result<()> {
    // A free port: nothing listens there.
    let addr = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST)?);
    let started = Instant::now();
    let out = meridianctl([
        "--control-plane",
        &format!("http://{addr}"),
        "get",
        "functions",
    ])
    .await?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "succeeded: {}", output_text(&out));
    ensure!(took < Duration::from_secs(5), "took {took:?} (want < 5 s)");
    ensure!(
        stderr.contains(&addr) && stderr.contains("cannot reach control plane"),
        "stderr should say it cannot reach {addr}: {}",
        output_text(&out)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_a_bad_region_exits_with_code_2() -> Result<()> {
    let unreachable = format!("http://127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST)?);
    let mut agent = Agent::spawn(0, "US_East", &[unreachable], AgentOpts::default())?;
    let status = agent.wait_exit(Duration::from_secs(5)).await?;
    // Skip the harness's own first line, which quotes the command line.
    let log = agent.process().log();
    let message: String = log.lines().skip(1).collect::<Vec<_>>().join("\n");
    ensure!(
        status.code() == Some(2),
        "want exit code 2, got {status}; log:\n{log}"
    );
    ensure!(
        message.to_lowercase().contains("region"),
        "the message should name the region flag; log:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_moves_a_corrupt_persisted_table_aside_and_serves() -> Result<()> {
    let state = tempfile::tempdir()?;
    std::fs::write(state.path().join("routing-table.pb"), [0xffu8; 32])?;
    // No control plane listens here, so the agent can only have what it loaded from disk.
    let unreachable = format!("http://127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST)?);
    let mut agent = Agent::start(
        0,
        "us-east",
        &[unreachable],
        AgentOpts {
            state_dir: Some(state.path().to_path_buf()),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        agent.table().await?.is_none(),
        "an agent with a corrupt table must answer NOT_FOUND"
    );
    let names: Vec<String> = std::fs::read_dir(state.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(
        names
            .iter()
            .any(|n| n.starts_with("routing-table.pb.corrupt-")),
        "the corrupt table was not moved aside: {names:?}"
    );
    ensure!(
        !names.iter().any(|n| n == "routing-table.pb"),
        "routing-table.pb is still there: {names:?}"
    );
    ensure!(agent.is_running(), "the agent exited");
    Ok(())
}
