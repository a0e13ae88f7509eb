//! Command-line syntax: kubectl-like verbs and flags (clap derive).

use clap::{Args, Parser, Subcommand};

use crate::output::Format;

/// meridianctl controls a Meridian mesh: apply, list, describe and delete functions, see which
/// agents hold which routing table, how process functions are scaled, and their logs.
#[derive(Debug, Parser)]
#[command(name = "meridianctl", version, about, long_about = None)]
pub struct Cli {
    /// Control-plane address: http://host:port or host:port.
    #[arg(
        long,
        env = "MERIDIAN_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7000",
        global = true,
        value_name = "ADDR"
    )]
    pub control_plane: String,

    /// Namespace of the functions [default: default, or the manifest's for apply].
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    pub namespace: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update functions from a YAML or JSON file (validated as a whole first).
    Apply(ApplyArgs),
    /// List functions, process instances, agents or a region's routes.
    Get(GetArgs),
    /// Show one function in detail: its spec, routes in each region and, for a process
    /// function, where it is placed and how each region scales it.
    Describe {
        #[command(subcommand)]
        resource: NamedResource,
    },
    /// Delete a function.
    Delete {
        #[command(subcommand)]
        resource: NamedResource,
    },
    /// Print the logs of a process function's instances, from every agent that runs them.
    Logs(LogsArgs),
    /// The mesh at a glance: control-plane replicas and the scheduler leader, agents and their
    /// sync state per region, functions with ready/desired per region, and a one-line verdict.
    /// Exits 0 even when it shows problems; 1 only when the control plane cannot be reached.
    Status(StatusArgs),
    /// Where the next request for a function from a region would go, and why: each tier, each
    /// endpoint's and region's health and ejection state, as the region's sidecars see them.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The function's name.
    pub name: String,

    /// The region the request would start from (its agents' sidecars are asked).
    #[arg(long, value_name = "REGION")]
    pub from: String,

    /// Output format (`text` is the table view).
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest file; `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: String,

    /// Only validate on the server and show what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,

    #[command(subcommand)]
    pub resource: GetResource,
}

#[derive(Debug, Subcommand)]
pub enum GetResource {
    /// Functions of a namespace (or all namespaces), or one by name.
    #[command(visible_alias = "function", alias = "fn")]
    Functions {
        /// Only this function.
        name: Option<String>,

        /// List functions of every namespace.
        #[arg(short = 'A', long, conflicts_with = "name")]
        all_namespaces: bool,

        /// Label selector, e.g. `team=web,tier!=batch,env`.
        #[arg(short = 'l', long, conflicts_with = "name", value_name = "SELECTOR")]
        selector: Option<String>,
    },
    /// Scale state of process functions: one row per function, region and agent.
    #[command(visible_alias = "instance", alias = "inst")]
    Instances {
        /// Only this function.
        name: Option<String>,

        /// List instances of every namespace.
        #[arg(short = 'A', long, conflicts_with = "name")]
        all_namespaces: bool,
    },
    /// Agents, their routing-table versions and whether they are in sync.
    #[command(visible_alias = "agent")]
    Agents {
        /// Only agents of this region.
        #[arg(long, value_name = "REGION")]
        region: Option<String>,
    },
    /// The routing table a region's agents are sent.
    #[command(visible_alias = "route")]
    Routes {
        /// The region.
        region: String,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The function's name.
    pub name: String,

    /// Only agents of this region.
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,

    /// Only this instance (e.g. hello-3fa2c1).
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,

    /// Lines to show from the end of each instance's log first.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub tail: u32,

    /// Keep streaming new lines as they are written (until interrupted).
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum NamedResource {
    /// A function, by name.
    #[command(visible_alias = "functions", alias = "fn")]
    Function {
        /// The function's name.
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_kubectl_like_lines() {
        let cli = Cli::try_parse_from([
            "meridianctl",
            "get",
            "functions",
            "-A",
            "-o",
            "yaml",
            "-l",
            "team=web",
        ])
        .expect("parses");
        match cli.command {
            Command::Get(GetArgs {
                output: Format::Yaml,
                resource:
                    GetResource::Functions {
                        name: None,
                        all_namespaces: true,
                        selector: Some(selector),
                    },
            }) => assert_eq!(selector, "team=web"),
            other => panic!("{other:?}"),
        }

        let cli = Cli::try_parse_from(["meridianctl", "-n", "prod", "delete", "fn", "hello"])
            .expect("parses");
        assert_eq!(cli.namespace.as_deref(), Some("prod"));

        assert!(
            Cli::try_parse_from(["meridianctl", "get", "functions", "x", "-A"]).is_err(),
            "a name across all namespaces is refused"
        );
        assert!(Cli::try_parse_from(["meridianctl", "get", "functions", "-o", "wide"]).is_err());
    }

    #[test]
    fn parses_explain() {
        let cli = Cli::try_parse_from([
            "meridianctl",
            "explain",
            "--from",
            "us-east",
            "hello",
            "-n",
            "prod",
            "-o",
            "text",
        ])
        .expect("parses");
        assert_eq!(cli.namespace.as_deref(), Some("prod"));
        match cli.command {
            Command::Explain(args) => {
                assert_eq!(
                    (args.name.as_str(), args.from.as_str()),
                    ("hello", "us-east")
                );
                assert_eq!(args.output, Format::Table);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["meridianctl", "explain", "hello"]).is_err(),
            "--from is required"
        );
    }

    #[test]
    fn parses_status() {
        let cli = Cli::try_parse_from(["meridianctl", "status"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Status(StatusArgs {
                output: Format::Table
            })
        ));
        let cli = Cli::try_parse_from(["meridianctl", "status", "-o", "yaml"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Status(StatusArgs {
                output: Format::Yaml
            })
        ));
        assert!(Cli::try_parse_from(["meridianctl", "status", "extra"]).is_err());
    }

    #[test]
    fn parses_instances_and_logs() {
        let cli = Cli::try_parse_from(["meridianctl", "get", "instances", "-A", "-o", "json"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Get(GetArgs {
                output: Format::Json,
                resource: GetResource::Instances {
                    name: None,
                    all_namespaces: true
                },
            })
        ));
        assert!(Cli::try_parse_from(["meridianctl", "get", "instances", "x", "-A"]).is_err());

        let cli = Cli::try_parse_from([
            "meridianctl",
            "logs",
            "hello",
            "-n",
            "prod",
            "--region",
            "us-east",
            "--instance",
            "hello-3fa2c1",
            "--tail",
            "5",
            "-f",
        ])
        .expect("parses");
        assert_eq!(cli.namespace.as_deref(), Some("prod"));
        match cli.command {
            Command::Logs(args) => {
                assert_eq!(args.name, "hello");
                assert_eq!(args.region.as_deref(), Some("us-east"));
                assert_eq!(args.instance.as_deref(), Some("hello-3fa2c1"));
                assert_eq!(args.tail, 5);
                assert!(args.follow);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["meridianctl", "logs", "hello"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Logs(LogsArgs {
                tail: 100,
                follow: false,
                ..
            })
        ));
        assert!(
            Cli::try_parse_from(["meridianctl", "logs", "hello", "--tail", "0"]).is_err(),
            "the agent reads 0 as its default, so 0 is refused rather than misread"
        );
    }
}
