//! Checks the deployment files without Docker or systemd (neither runs here, CI may lack them):
//! `deploy/compose/compose.yaml` and `prometheus.yml` (every service has an image, dependencies
//! and scrape targets name real services and ports, host ports are unique, every Meridian daemon
//! exports traces and is scraped, every flag is one the real binary accepts) and `deploy/systemd/`
//! (units complete and hardened, example env files name variables the binaries read). Compose's
//! own validation (`docker compose config`, or Debian's `docker-compose`, which needs no Docker
//! engine) must pass; when `promtool` or `systemd-analyze` is on the PATH, their checks run too.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use meridian_tests::{bin, workspace_root};
use serde_yaml_ng::{Mapping, Value};

/// The binaries that run as daemons: each must export traces and be scraped.
const DAEMONS: [&str; 3] = [
    "meridian-control-plane",
    "meridian-agent",
    "meridian-sidecar",
];

/// The regions of the compose layout.
const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// compose.yaml, parsed, with its `<<` merge keys applied (as Compose does).
fn compose() -> Result<Value> {
    let path = deploy_dir().join("compose/compose.yaml");
    let mut value: Value = serde_yaml_ng::from_str(&read(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    value.apply_merge().context("applying the merge keys")?;
    Ok(value)
}

fn services(compose: &Value) -> Result<&Mapping> {
    compose
        .get("services")
        .and_then(Value::as_mapping)
        .context("compose.yaml has no services mapping")
}

fn service_names(services: &Mapping) -> BTreeSet<String> {
    services
        .keys()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

/// A scalar as text (ports may be written as numbers).
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn scalars(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_sequence)
        .map(|seq| seq.iter().filter_map(scalar).collect())
        .unwrap_or_default()
}

/// The words a service runs: its command list, or the words of `sh -c "exec ..."`.
fn command_words(service: &Value) -> Vec<String> {
    let words = match service.get("command") {
        Some(Value::String(line)) => line.split_whitespace().map(str::to_owned).collect(),
        other => scalars(other),
    };
    match words.as_slice() {
        [shell, dash_c, script] if shell == "sh" && dash_c == "-c" => script
            .split_whitespace()
            .skip_while(|word| *word == "exec")
            .map(str::to_owned)
            .collect(),
        _ => words,
    }
}

/// The binary a service runs (the file name of the first word of its command).
fn binary(service: &Value) -> Option<String> {
    let program = command_words(service).into_iter().next()?;
    Some(program.rsplit('/').next().unwrap_or(&program).to_owned())
}

/// The value of `--name=value` or `--name value` in a service's command.
fn flag(service: &Value, name: &str) -> Option<String> {
    let words = command_words(service);
    let prefix = format!("{name}=");
    for (i, word) in words.iter().enumerate() {
        if let Some(value) = word.strip_prefix(&prefix) {
            return Some(value.to_owned());
        }
        if word == name {
            return words.get(i + 1).cloned();
        }
    }
    None
}

/// A service's environment, from the mapping or the `KEY=VALUE` list form.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        Some(Value::Mapping(map)) => map
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar(v).unwrap_or_default())))
            .collect(),
        Some(Value::Sequence(seq)) => seq
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|entry| entry.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The services a service depends on, from the list or the mapping form.
fn depends_on(service: &Value) -> Vec<String> {
    match service.get("depends_on") {
        Some(Value::Mapping(map)) => map
            .keys()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        other => scalars(other),
    }
}

/// One published port: the host port (when one is fixed) and the container port.
#[derive(Debug)]
struct Published {
    host: Option<u16>,
    container: u16,
}

fn parse_port(text: &str, what: &str) -> Result<u16> {
    text.parse()
        .with_context(|| format!("{what}: {text:?} is not a port number"))
}

/// Parses the short (`[IP:][HOST:]CONTAINER[/PROTO]`) and long (`target`/`published`) syntax.
fn published(entry: &Value, service: &str) -> Result<Published> {
    let what = format!("service {service}: ports entry {entry:?}");
    if let Some(map) = entry.as_mapping() {
        let container = map
            .get("target")
            .and_then(scalar)
            .with_context(|| format!("{what}: no target"))?;
        let host = map
            .get("published")
            .and_then(scalar)
            .map(|p| parse_port(&p, &what))
            .transpose()?;
        return Ok(Published {
            host,
            container: parse_port(&container, &what)?,
        });
    }
    let text = scalar(entry).with_context(|| format!("{what}: not a string"))?;
    let text = text.split('/').next().unwrap_or_default();
    ensure!(!text.contains('-'), "{what}: port ranges are not used here");
    let parts: Vec<&str> = text.rsplitn(3, ':').collect();
    match parts.as_slice() {
        [container] => Ok(Published {
            host: None,
            container: parse_port(container, &what)?,
        }),
        [container, host] | [container, host, _] => Ok(Published {
            host: Some(parse_port(host, &what)?),
            container: parse_port(container, &what)?,
        }),
        _ => bail!("{what}: cannot parse"),
    }
}

/// The container ports a service declares (`expose`, and the container side of `ports`).
fn exposed(service: &Value, name: &str) -> Result<BTreeSet<u16>> {
    let mut ports = BTreeSet::new();
    for port in scalars(service.get("expose")) {
        ports.insert(parse_port(&port, &format!("service {name}: expose"))?);
    }
    if let Some(seq) = service.get("ports").and_then(Value::as_sequence) {
        for entry in seq {
            ports.insert(published(entry, name)?.container);
        }
    }
    Ok(ports)
}

/// Splits `scheme://host:port/...` or `host:port` into host and port.
fn host_port(address: &str) -> Result<(String, u16)> {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .with_context(|| format!("{address:?} has no port"))?;
    Ok((host.to_owned(), parse_port(port, address)?))
}

/// Checks that `address` names a service of the compose file that exposes its port.
fn names_exposed_service(services: &Mapping, address: &str, context: &str) -> Result<String> {
    let (host, port) = host_port(address).with_context(|| context.to_owned())?;
    let service = services
        .get(host.as_str())
        .with_context(|| format!("{context}: {address:?} names no compose service"))?;
    let ports = exposed(service, &host)?;
    ensure!(
        ports.contains(&port),
        "{context}: {address:?}: service {host} does not expose port {port} (it exposes {ports:?})"
    );
    Ok(host)
}

/// The names of the services that run `binary`.
fn services_running(services: &Mapping, wanted: &str) -> Vec<String> {
    services
        .iter()
        .filter(|(_, service)| binary(service).as_deref() == Some(wanted))
        .filter_map(|(name, _)| name.as_str().map(str::to_owned))
        .collect()
}

fn service<'a>(services: &'a Mapping, name: &str) -> Result<&'a Value> {
    services
        .get(name)
        .with_context(|| format!("no service {name}"))
}

#[test]
fn compose_services_are_complete_and_consistent() -> Result<()> {
    let compose = compose()?;
    let services = services(&compose)?;
    let names = service_names(services);
    let volumes: BTreeSet<String> = compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|map| {
            map.keys()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();

    let mut host_ports: BTreeMap<u16, String> = BTreeMap::new();
    for (name, svc) in services {
        let name = name.as_str().context("a service name is not a string")?;
        ensure!(
            svc.get("image").is_some() || svc.get("build").is_some(),
            "service {name} has neither image nor build"
        );
        for target in depends_on(svc) {
            ensure!(target != name, "service {name} depends on itself");
            ensure!(
                names.contains(&target),
                "service {name} depends on {target}, which is not a service"
            );
        }
        if let Some(seq) = svc.get("ports").and_then(Value::as_sequence) {
            for entry in seq {
                if let Some(port) = published(entry, name)?.host {
                    if let Some(other) = host_ports.insert(port, name.to_owned()) {
                        bail!("host port {port} is published by both {other} and {name}");
                    }
                }
            }
        }
        for mount in scalars(svc.get("volumes")) {
            let source = mount.split(':').next().unwrap_or_default();
            if source.starts_with('.') || source.starts_with('/') {
                let path = deploy_dir().join("compose").join(source);
                ensure!(
                    path.exists(),
                    "service {name} mounts {source}, which does not exist ({})",
                    path.display()
                );
            } else {
                ensure!(
                    volumes.contains(source),
                    "service {name} mounts the volume {source}, not declared under volumes:"
                );
            }
        }
    }

    // The layout the issue asks for: three etcd members forming one cluster, Jaeger, Prometheus,
    // two control planes, an agent and a sidecar in each of three regions.
    let etcds = services_running(services, "etcd");
    ensure!(etcds.len() == 3, "want 3 etcd members, have {etcds:?}");
    for name in &etcds {
        let svc = service(services, name)?;
        let cluster = flag(svc, "--initial-cluster").context("etcd without --initial-cluster")?;
        for member in &etcds {
            ensure!(
                cluster.contains(&format!("{member}=http://{member}:2380")),
                "{name}'s --initial-cluster {cluster:?} lacks {member}"
            );
        }
        ensure!(
            flag(svc, "--name").as_deref() == Some(name),
            "{name}: --name must be the service name (the cluster's member names are)"
        );
    }
    let jaeger = service(services, "jaeger")?;
    let jaeger_ports = exposed(jaeger, "jaeger")?;
    ensure!(
        jaeger_ports.contains(&4317) && jaeger_ports.contains(&16686),
        "jaeger must expose OTLP 4317 and the UI 16686"
    );
    ensure!(
        host_ports.get(&16686).map(String::as_str) == Some("jaeger"),
        "the Jaeger UI must be published on host port 16686"
    );
    ensure!(
        host_ports.get(&9090).map(String::as_str) == Some("prometheus"),
        "Prometheus must be published on host port 9090"
    );
    let control_planes = services_running(services, "meridian-control-plane");
    ensure!(
        control_planes.len() == 2,
        "want 2 control planes, have {control_planes:?}"
    );
    for name in &control_planes {
        let svc = service(services, name)?;
        let endpoints = flag(svc, "--etcd-endpoints").context("--etcd-endpoints")?;
        for endpoint in endpoints.split(',') {
            let host = names_exposed_service(services, endpoint, name)?;
            ensure!(
                etcds.contains(&host),
                "{name}: {endpoint} is not an etcd member"
            );
        }
    }

    for region in REGIONS {
        let in_region = |binary: &str| -> Vec<String> {
            services_running(services, binary)
                .into_iter()
                .filter(|name| {
                    services
                        .get(name.as_str())
                        .and_then(|s| flag(s, "--region"))
                        .as_deref()
                        == Some(region)
                })
                .collect()
        };
        let (agents, sidecars) = (in_region("meridian-agent"), in_region("meridian-sidecar"));
        ensure!(
            agents.len() == 1,
            "{region}: want one agent, have {agents:?}"
        );
        ensure!(
            sidecars.len() == 1,
            "{region}: want one sidecar, have {sidecars:?}"
        );
        let (agent_name, sidecar_name) = (&agents[0], &sidecars[0]);
        let (agent, sidecar) = (
            service(services, agent_name)?,
            service(services, sidecar_name)?,
        );

        // The sidecar reads its region's agent; the agent advertises its region's sidecar
        // gateway (dialled by other regions) and dials both control planes.
        let agent_url = flag(sidecar, "--agent").context("sidecar without --agent")?;
        let host = names_exposed_service(services, &agent_url, sidecar_name)?;
        ensure!(
            &host == agent_name,
            "{sidecar_name} reads {host}, not {agent_name}"
        );
        let gateway = flag(agent, "--gateway").context("agent without --gateway")?;
        let host = names_exposed_service(services, &gateway, agent_name)?;
        ensure!(
            &host == sidecar_name,
            "{agent_name} advertises {host}'s gateway"
        );
        let (_, gateway_port) = host_port(&gateway)?;
        let listen = flag(sidecar, "--gateway").context("sidecar without --gateway")?;
        ensure!(
            host_port(&listen)?.1 == gateway_port,
            "{sidecar_name} listens for its gateway on {listen}, the agent advertises {gateway}"
        );
        let replicas = flag(agent, "--control-plane").context("--control-plane")?;
        let mut dialled = BTreeSet::new();
        for url in replicas.split(',') {
            dialled.insert(names_exposed_service(services, url, agent_name)?);
        }
        ensure!(
            dialled == control_planes.iter().cloned().collect(),
            "{agent_name} dials {dialled:?}, the control planes are {control_planes:?}"
        );
        // No code as root: the agent runs its instances as another user, from allowed roots
        // only, with every capability dropped but those that takes.
        let run_as = flag(agent, "--run-as").context("agent without --run-as")?;
        ensure!(
            run_as != "root" && run_as != "0",
            "{agent_name}: --run-as {run_as} is root"
        );
        let roots = flag(agent, "--allowed-command-root")
            .with_context(|| format!("{agent_name} without --allowed-command-root"))?;
        ensure!(
            roots.starts_with('/'),
            "{agent_name}: --allowed-command-root {roots} is not absolute"
        );
        ensure!(
            scalars(agent.get("cap_drop")) == ["ALL"],
            "{agent_name}: must drop every capability (cap_drop: [ALL]) but those it adds back"
        );
        let added: BTreeSet<String> = scalars(agent.get("cap_add"))
            .into_iter()
            .map(|c| format!("CAP_{}", c.trim_start_matches("CAP_")))
            .collect();
        let wanted: BTreeSet<String> = AGENT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
        ensure!(
            added == wanted,
            "{agent_name}: cap_add must be exactly {wanted:?}, is {added:?}"
        );
        // Function instances bind --instance-host and the sidecar, in another container, dials
        // it: it must be the agent container's own address, never loopback.
        let instance_host =
            flag(agent, "--instance-host").context("agent without --instance-host")?;
        ensure!(
            !instance_host.starts_with("127.") && instance_host != "localhost",
            "{agent_name}: --instance-host {instance_host} is unreachable from the sidecar"
        );
    }
    Ok(())
}

#[test]
fn compose_interpolation_is_escaped() -> Result<()> {
    // Compose replaces `$NAME` and `${NAME}` with the caller's environment; a `$` meant for the
    // container's shell must be written `$$`. This file uses no interpolation at all.
    let text = read(&deploy_dir().join("compose/compose.yaml"))?;
    for (number, line) in text.lines().enumerate() {
        // Comments are not interpolated.
        if line.trim_start().starts_with('#') {
            continue;
        }
        let unescaped = line.replace("$$", "");
        ensure!(
            !unescaped.contains('$'),
            "compose.yaml:{}: a lone `$` (write `$$` for the shell): {line}",
            number + 1
        );
    }
    Ok(())
}

#[test]
fn every_meridian_daemon_exports_traces_to_jaeger() -> Result<()> {
    let compose = compose()?;
    let services = services(&compose)?;
    let mut names = BTreeMap::new();
    for daemon in DAEMONS {
        let running = services_running(services, daemon);
        ensure!(!running.is_empty(), "no service runs {daemon}");
        for name in running {
            let env = environment(service(services, &name)?);
            let endpoint = env
                .get("OTEL_EXPORTER_OTLP_ENDPOINT")
                .with_context(|| format!("{name} has no OTEL_EXPORTER_OTLP_ENDPOINT"))?;
            let host = names_exposed_service(services, endpoint, &name)?;
            ensure!(host == "jaeger", "{name} exports to {host}, not jaeger");
            let service_name = env
                .get("OTEL_SERVICE_NAME")
                .with_context(|| format!("{name} has no OTEL_SERVICE_NAME"))?;
            ensure!(
                service_name.starts_with(daemon),
                "{name}: OTEL_SERVICE_NAME {service_name:?} should start with {daemon}"
            );
            names.insert(name, service_name.clone());
        }
    }
    // Regional components are told apart by service name (the failover trace crosses regions).
    for region in REGIONS {
        for daemon in ["meridian-agent", "meridian-sidecar"] {
            let wanted = format!("{daemon}-{region}");
            ensure!(
                names.values().any(|name| *name == wanted),
                "no service exports as {wanted} (have {names:?})"
            );
        }
    }
    Ok(())
}

/// The `host:port` targets of prometheus.yml's static configs.
fn scrape_targets() -> Result<Vec<String>> {
    let path = deploy_dir().join("compose/prometheus.yml");
    let config: Value = serde_yaml_ng::from_str(&read(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let mut targets = Vec::new();
    let jobs = config
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .context("prometheus.yml has no scrape_configs")?;
    for job in jobs {
        let static_configs = job
            .get("static_configs")
            .and_then(Value::as_sequence)
            .with_context(|| format!("job {job:?} has no static_configs"))?;
        for config in static_configs {
            targets.extend(scalars(config.get("targets")));
        }
    }
    Ok(targets)
}

#[test]
fn prometheus_scrapes_every_component() -> Result<()> {
    let compose = compose()?;
    let services = services(&compose)?;
    let prometheus = service(services, "prometheus")?;
    ensure!(
        scalars(prometheus.get("volumes"))
            .iter()
            .any(|mount| mount.starts_with("./prometheus.yml:/etc/prometheus/prometheus.yml")),
        "the prometheus service does not mount ./prometheus.yml as its configuration"
    );
    let targets = scrape_targets()?;
    for target in &targets {
        names_exposed_service(services, target, "prometheus.yml")?;
    }
    for daemon in DAEMONS {
        for name in services_running(services, daemon) {
            let admin = flag(service(services, &name)?, "--admin")
                .with_context(|| format!("{name} has no --admin"))?;
            let wanted = format!("{name}:{}", host_port(&admin)?.1);
            ensure!(
                targets.contains(&wanted),
                "prometheus.yml does not scrape {wanted} ({name}'s admin endpoint)"
            );
        }
    }

    // Prometheus' own check, where it is installed (Debian's `prometheus` package).
    match Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg("--syntax-only")
        .arg(deploy_dir().join("compose/prometheus.yml"))
        .output()
    {
        Ok(output) => ensure!(
            output.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) => eprintln!("promtool not run ({e}); install Debian's prometheus package for it"),
    }
    Ok(())
}

/// Runs Compose's own `config -q` (schema, interpolation, references) on `file` in the compose
/// directory: `docker compose` where the plugin is installed, else Debian's `docker-compose`.
/// `None` when neither is installed.
fn compose_config(file: &Path) -> Option<std::process::Output> {
    let dir = deploy_dir().join("compose");
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut command = if plugin {
        let mut command = Command::new("docker");
        command.arg("compose");
        command
    } else {
        Command::new("docker-compose")
    };
    command
        .current_dir(&dir)
        .arg("-f")
        .arg(file)
        .args(["config", "-q"])
        .output()
        .ok()
}

#[test]
fn compose_file_passes_compose_validation() -> Result<()> {
    let dir = deploy_dir().join("compose");
    let Some(output) = compose_config(&dir.join("compose.yaml")) else {
        bail!(
            "neither `docker compose` nor `docker-compose` is installed: install Debian's \
             docker-compose package (tests/run.sh does)"
        );
    };
    ensure!(
        output.status.success(),
        "docker compose config rejects deploy/compose/compose.yaml: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // The validator really validates: a copy with a misspelt service key is refused.
    let broken = tempfile::Builder::new()
        .prefix("compose-broken-")
        .suffix(".yaml")
        .tempfile_in(&dir)?;
    let text = read(&dir.join("compose.yaml"))?;
    ensure!(
        text.contains("\n    restart: "),
        "no restart key to misspell"
    );
    fs::write(
        broken.path(),
        text.replacen("\n    restart: ", "\n    restrat: ", 1),
    )?;
    let output = compose_config(broken.path()).context("compose validator vanished")?;
    ensure!(
        !output.status.success(),
        "docker compose config accepted a service with a misspelt key"
    );
    Ok(())
}

/// A binary's `--help` text.
fn help(binary: &str) -> Result<String> {
    let output = Command::new(bin(binary)?)
        .arg("--help")
        .output()
        .with_context(|| format!("running {binary} --help"))?;
    ensure!(output.status.success(), "{binary} --help failed");
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether `help` documents `flag` (a word of its own, e.g. `--listen <LISTEN>`).
fn documents_flag(help: &str, flag: &str) -> bool {
    help.split_whitespace()
        .any(|word| word.trim_end_matches(',') == flag)
}

/// Checks that `binary` accepts each of `flags`.
fn check_flags(binary: &str, help: &str, flags: &[String], context: &str) -> Result<()> {
    for flag in flags {
        ensure!(
            documents_flag(help, flag),
            "{context}: {binary} has no flag {flag} (see {binary} --help)"
        );
    }
    Ok(())
}

/// The `--flag` names among `words`.
fn flag_names<'a>(words: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    words
        .into_iter()
        .filter(|word| word.starts_with("--"))
        .map(|word| word.split('=').next().unwrap_or(word).to_owned())
        .collect()
}

#[test]
fn compose_flags_are_ones_the_binaries_accept() -> Result<()> {
    let compose = compose()?;
    let services = services(&compose)?;
    for daemon in DAEMONS {
        let help = help(daemon)?;
        for name in services_running(services, daemon) {
            let words = command_words(service(services, &name)?);
            let flags = flag_names(words.iter().map(String::as_str));
            check_flags(daemon, &help, &flags, &format!("compose service {name}"))?;
        }
    }
    Ok(())
}

/// A unit file's settings: section → (key, value) in order.
type Unit = BTreeMap<String, Vec<(String, String)>>;

fn parse_unit(text: &str, path: &Path) -> Result<Unit> {
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            unit.entry(name.to_owned()).or_default();
            continue;
        }
        let at = || format!("{}:{}", path.display(), number + 1);
        let current = section
            .clone()
            .with_context(|| format!("{}: setting before any section", at()))?;
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("{}: not KEY=VALUE: {line}", at()))?;
        unit.entry(current)
            .or_default()
            .push((key.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(unit)
}

fn values<'a>(unit: &'a Unit, section: &str, key: &str) -> Vec<&'a str> {
    unit.get(section)
        .map(|settings| {
            settings
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// The unit files and the binary each runs.
const UNITS: [(&str, &str); 3] = [
    ("meridian-control-plane.service", "meridian-control-plane"),
    ("meridian-agent@.service", "meridian-agent"),
    ("meridian-sidecar@.service", "meridian-sidecar"),
];

#[test]
fn systemd_units_are_complete_and_hardened() -> Result<()> {
    let dir = deploy_dir().join("systemd");
    for (file, daemon) in UNITS {
        let path = dir.join(file);
        let unit = parse_unit(&read(&path)?, &path)?;
        for section in ["Unit", "Service", "Install"] {
            ensure!(unit.contains_key(section), "{file}: no [{section}] section");
        }
        let exec = values(&unit, "Service", "ExecStart");
        ensure!(exec.len() == 1, "{file}: want one ExecStart, have {exec:?}");
        let program = exec[0].split_whitespace().next().unwrap_or_default();
        ensure!(
            program.starts_with('/') && program.rsplit('/').next() == Some(daemon),
            "{file}: ExecStart runs {program:?}, not an absolute path to {daemon}"
        );
        let env_files = values(&unit, "Service", "EnvironmentFile");
        ensure!(!env_files.is_empty(), "{file}: no EnvironmentFile=");
        // Every required environment file has an example here (env/<name>, %i = us-east).
        for env_file in env_files.iter().filter(|f| !f.starts_with('-')) {
            let name = env_file
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .replace("%i", "us-east");
            ensure!(
                dir.join("env").join(&name).is_file(),
                "{file}: {env_file} has no example deploy/systemd/env/{name}"
            );
        }
        let wanted = [
            ("Restart", "on-failure"),
            ("ProtectSystem", "strict"),
            ("NoNewPrivileges", "yes"),
        ];
        for (key, value) in wanted {
            ensure!(
                values(&unit, "Service", key) == [value],
                "{file}: want {key}={value}"
            );
        }
        let unprivileged = values(&unit, "Service", "DynamicUser") == ["yes"]
            || values(&unit, "Service", "User")
                .iter()
                .any(|u| *u != "root" && *u != "0");
        if daemon == "meridian-agent" {
            // The agent is root only to run its instances as another user.
            ensure!(
                !unprivileged,
                "{file}: an unprivileged agent runs instances as itself, able to read its state"
            );
            agent_runs_no_code_as_root(&unit, file)?;
        } else {
            ensure!(
                unprivileged,
                "{file}: runs as root (want DynamicUser=yes or User=)"
            );
        }
        ensure!(
            !values(&unit, "Install", "WantedBy").is_empty(),
            "{file}: [Install] has no WantedBy="
        );
        if daemon == "meridian-agent" {
            let state = values(&unit, "Service", "StateDirectory");
            ensure!(
                !state.is_empty(),
                "{file}: the agent needs a StateDirectory="
            );
            ensure!(
                values(&unit, "Service", "Environment")
                    .iter()
                    .any(|e| e.starts_with("MERIDIAN_STATE_DIR=%S/")
                        && state.iter().any(|s| e.ends_with(s))),
                "{file}: MERIDIAN_STATE_DIR must point into the StateDirectory"
            );
        }
    }
    systemd_analyze_verify(&dir)
}

/// The capabilities a root agent needs to run instances as its `--run-as` user: the switch
/// itself, chown of each working directory, signals to another user's processes, and removing
/// what an instance left in its directory (and giving the state directory its mode).
const AGENT_CAPABILITIES: [&str; 6] = [
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_CHOWN",
    "CAP_KILL",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
];

/// The agent unit runs as root, so: a bounding set of [`AGENT_CAPABILITIES`] only, no ambient
/// capabilities, instances run as a user that is not root from an allowed command root, and a
/// state directory that is traversable but not listable.
fn agent_runs_no_code_as_root(unit: &Unit, file: &str) -> Result<()> {
    let bounding: BTreeSet<&str> = values(unit, "Service", "CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    let wanted: BTreeSet<&str> = AGENT_CAPABILITIES.into_iter().collect();
    ensure!(
        bounding == wanted,
        "{file}: CapabilityBoundingSet must be exactly {wanted:?}, is {bounding:?}"
    );
    ensure!(
        values(unit, "Service", "AmbientCapabilities")
            .iter()
            .all(|v| v.is_empty()),
        "{file}: no ambient capabilities (instances would inherit them)"
    );
    let environment: BTreeMap<&str, &str> = values(unit, "Service", "Environment")
        .iter()
        .filter_map(|e| e.split_once('='))
        .collect();
    let run_as = environment.get("MERIDIAN_RUN_AS").copied().unwrap_or("");
    ensure!(
        !run_as.is_empty() && run_as != "root" && run_as != "0",
        "{file}: MERIDIAN_RUN_AS must name the unprivileged user instances run as, not {run_as:?}"
    );
    let roots = environment
        .get("MERIDIAN_ALLOWED_COMMAND_ROOTS")
        .copied()
        .unwrap_or("");
    ensure!(
        !roots.is_empty() && roots.split(',').all(|r| r.starts_with('/')),
        "{file}: MERIDIAN_ALLOWED_COMMAND_ROOTS must list absolute directories, not {roots:?}"
    );
    ensure!(
        values(unit, "Service", "StateDirectoryMode") == ["0711"],
        "{file}: StateDirectoryMode must be 0711 (instances traverse it, nothing lists it)"
    );
    Ok(())
}

/// `systemd-analyze verify` on copies of the units (templates instantiated for us-east, binaries
/// pointed at the built ones so that it can check they exist), where systemd-analyze exists.
fn systemd_analyze_verify(dir: &Path) -> Result<()> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not found: the units' syntax is not checked by systemd");
        return Ok(());
    }
    let scratch = tempfile::tempdir()?;
    let mut paths = Vec::new();
    for (file, daemon) in UNITS {
        let text = read(&dir.join(file))?;
        let built = bin(daemon)?;
        let text = text.replace(
            &format!("/usr/local/bin/{daemon}"),
            &built.display().to_string(),
        );
        let name = file.replace("@.", "@us-east.");
        let path = scratch.path().join(name);
        fs::write(&path, text)?;
        paths.push(path);
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(&paths)
        .output()
        .context("running systemd-analyze verify")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    Ok(())
}

/// `KEY=VALUE` lines of an environment file (comments and blank lines skipped).
fn env_file(path: &Path) -> Result<Vec<(String, String)>> {
    let mut entries = Vec::new();
    for (number, line) in read(path)?.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("{}:{}: not KEY=VALUE", path.display(), number + 1))?;
        entries.push((key.to_owned(), value.to_owned()));
    }
    Ok(entries)
}

/// A file's `KEY=VALUE` settings and the binary that reads them (`any`: shared by all).
type Settings = (String, &'static str, Vec<(String, String)>);

#[test]
fn systemd_settings_are_ones_the_binaries_read() -> Result<()> {
    let dir = deploy_dir().join("systemd");
    let helps: BTreeMap<&str, String> = DAEMONS
        .iter()
        .map(|daemon| Ok((*daemon, help(daemon)?)))
        .collect::<Result<_>>()?;
    // Each example env file and each unit's Environment= lines, with the binary that reads them.
    let mut settings: Vec<Settings> = Vec::new();
    for entry in fs::read_dir(dir.join("env"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let daemon = DAEMONS
            .iter()
            .find(|daemon| name.starts_with(daemon.trim_start_matches("meridian-")))
            .copied()
            .unwrap_or("any");
        settings.push((name, daemon, env_file(&path)?));
    }
    for (file, daemon) in UNITS {
        let path = dir.join(file);
        let unit = parse_unit(&read(&path)?, &path)?;
        let entries = values(&unit, "Service", "Environment")
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        settings.push((file.to_owned(), daemon, entries));
    }
    for (file, daemon, entries) in &settings {
        for (key, value) in entries {
            if key.starts_with("OTEL_") || key == "RUST_LOG" {
                continue;
            }
            let help = helps
                .get(daemon)
                .with_context(|| format!("{file}: {key} in a file not tied to one binary"))?;
            if key == "MERIDIAN_ARGS" {
                check_flags(daemon, help, &flag_names(value.split_whitespace()), file)?;
                continue;
            }
            ensure!(
                help.contains(&format!("env: {key}=")),
                "{file}: {daemon} does not read {key} (see {daemon} --help)"
            );
        }
    }
    Ok(())
}
