//! What function instances may run, and as whom: the operator's `--allowed-command-root`
//! directories, the `--run-as` user, and the resolution of a spec's command to the canonical
//! path the runtime executes. Whoever can apply a function chooses its command; this policy is
//! what keeps that from meaning "any program, as root, on every agent".

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::unistd::{Uid, User};

/// The user instances are switched to (a root agent's `--run-as`): its uid and primary gid,
/// with no supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

impl RunAs {
    /// Looks up a `--run-as` value: a user name, or a numeric uid. Either must have a passwd
    /// entry, which gives the primary group (and the name instances see as `USER`).
    pub fn lookup(user: &str) -> Result<RunAs, PolicyError> {
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        };
        let entry = found
            .map_err(|source| PolicyError::LookUp {
                user: user.to_owned(),
                source,
            })?
            .ok_or_else(|| PolicyError::UnknownUser {
                user: user.to_owned(),
            })?;
        Ok(RunAs {
            name: entry.name,
            uid: entry.uid.as_raw(),
            gid: entry.gid.as_raw(),
        })
    }

    /// The user name (`USER` of instances).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The primary group.
    pub fn gid(&self) -> u32 {
        self.gid
    }
}

/// Which commands instances may run and as whom. Built once at start-up; an agent announces it
/// (the roots, the user) and the runtime applies it to every spawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandPolicy {
    /// Canonical (symlinks resolved), without duplicates, in the operator's order.
    allowed_roots: Vec<PathBuf>,
    /// `None`: instances run as the agent's own user (an unprivileged agent).
    run_as: Option<RunAs>,
}

/// Why the agent cannot start with the policy its flags describe. Every message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "the agent runs as root: give --run-as USER (the unprivileged user function instances \
         run as); instances never run as root"
    )]
    RootWithoutRunAs,
    #[error("invalid --run-as {user:?}: instances never run as root (uid 0)")]
    RunAsRoot { user: String },
    #[error("invalid --run-as {user:?}: its primary group is root (gid 0)")]
    RunAsRootGroup { user: String },
    #[error("invalid --run-as {user:?}: no such user")]
    UnknownUser { user: String },
    #[error("invalid --run-as {user:?}: cannot look the user up")]
    LookUp {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error(
        "invalid --run-as {user:?}: the agent runs as uid {agent_uid}, not as root, so it can \
         only run instances as itself (drop --run-as, or run the agent as root)"
    )]
    NotPrivileged { user: String, agent_uid: u32 },
    #[error("invalid --allowed-command-root {}: cannot resolve it", root.display())]
    Root {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid --allowed-command-root {}: not a directory", root.display())]
    RootNotDirectory { root: PathBuf },
}

/// Why a command may not run. Shown after `cannot start: command "<command>": ` in the
/// function's status (`meridianctl get instances`, `describe`).
#[derive(Debug, thiserror::Error)]
pub enum CommandRefused {
    #[error("no allowed command roots are configured (--allowed-command-root)")]
    NoRoots,
    #[error("the command is empty")]
    Empty,
    #[error("`..` is not allowed in a command")]
    ParentDir,
    #[error("outside the allowed command roots ({})", list(.roots))]
    Outside { roots: Vec<PathBuf> },
    #[error("not found under the allowed command roots ({})", list(.roots))]
    NotFound { roots: Vec<PathBuf> },
    #[error(
        "resolves to {}, outside the allowed command root {}",
        .resolved.display(),
        .root.display()
    )]
    Escapes { resolved: PathBuf, root: PathBuf },
    #[error("{} is not an executable regular file", .path.display())]
    NotExecutable { path: PathBuf },
    #[error("cannot inspect {}", .path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn list(roots: &[PathBuf]) -> String {
    let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    roots.join(", ")
}

impl CommandPolicy {
    /// A policy with `roots` (each canonicalized: it must exist and be a directory; duplicates
    /// after canonicalization are dropped) and instances run as `run_as` (`None`: as the agent).
    pub fn new(roots: &[PathBuf], run_as: Option<RunAs>) -> Result<Self, PolicyError> {
        let mut allowed_roots: Vec<PathBuf> = Vec::new();
        for root in roots {
            let canonical = root.canonicalize().map_err(|source| PolicyError::Root {
                root: root.clone(),
                source,
            })?;
            if !canonical.is_dir() {
                return Err(PolicyError::RootNotDirectory { root: root.clone() });
            }
            if !allowed_roots.contains(&canonical) {
                allowed_roots.push(canonical);
            }
        }
        Ok(Self {
            allowed_roots,
            run_as,
        })
    }

    /// The policy of an agent whose effective uid is `agent_uid`, from its `--run-as` and
    /// `--allowed-command-root` flags. Fails closed:
    /// - a root agent must be given `--run-as`, naming a user other than root (uid and primary
    ///   group both non-zero): instances are switched to it;
    /// - an unprivileged agent runs instances as itself, so `--run-as` may only name itself.
    pub fn for_agent(
        run_as: Option<&str>,
        roots: &[PathBuf],
        agent_uid: u32,
    ) -> Result<Self, PolicyError> {
        let user = run_as.map(RunAs::lookup).transpose()?;
        if let Some(user) = &user {
            if user.uid == 0 {
                return Err(PolicyError::RunAsRoot {
                    user: user.name.clone(),
                });
            }
            if user.gid == 0 {
                return Err(PolicyError::RunAsRootGroup {
                    user: user.name.clone(),
                });
            }
        }
        let switch_to = match (agent_uid, user) {
            (0, None) => return Err(PolicyError::RootWithoutRunAs),
            (0, Some(user)) => Some(user),
            (_, None) => None,
            (agent_uid, Some(user)) if user.uid == agent_uid => None,
            (agent_uid, Some(user)) => {
                return Err(PolicyError::NotPrivileged {
                    user: user.name,
                    agent_uid,
                })
            }
        };
        Self::new(roots, switch_to)
    }

    /// The canonical roots, in the order commands are looked up in them.
    pub fn allowed_roots(&self) -> &[PathBuf] {
        &self.allowed_roots
    }

    /// The user instances are switched to; `None` when they run as the agent's own user.
    pub fn run_as(&self) -> Option<&RunAs> {
        self.run_as.as_ref()
    }

    /// The name of [`CommandPolicy::run_as`].
    pub fn run_as_name(&self) -> Option<&str> {
        self.run_as.as_ref().map(RunAs::name)
    }

    /// The canonical path to execute for a spec's `command`, or why it may not run.
    ///
    /// - An absolute command is canonicalized (every symlink resolved) and must lie under a
    ///   root.
    /// - A relative one (no `..`) is looked up in the roots in order, not in `PATH`; the first
    ///   root that has it decides, and its canonical path must still lie under that root (a
    ///   symlink out of the root is refused).
    /// - Either way it must be a regular file with an execute bit.
    ///
    /// A missing absolute command outside every root is reported as outside, not as missing:
    /// whether a path exists on the agent's host is not the caller's business.
    pub fn resolve(&self, command: &str) -> Result<PathBuf, CommandRefused> {
        if self.allowed_roots.is_empty() {
            return Err(CommandRefused::NoRoots);
        }
        if command.is_empty() {
            return Err(CommandRefused::Empty);
        }
        let path = Path::new(command);
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(CommandRefused::ParentDir);
        }
        if path.is_absolute() {
            let lexical_root = self.allowed_roots.iter().find(|r| path.starts_with(r));
            let resolved = match (path.canonicalize(), lexical_root) {
                (Ok(resolved), _) => resolved,
                (Err(_), None) => return Err(self.outside()),
                (Err(_), Some(_)) => return Err(self.not_found()),
            };
            if !self.allowed_roots.iter().any(|r| resolved.starts_with(r)) {
                return Err(match lexical_root {
                    Some(root) => CommandRefused::Escapes {
                        resolved,
                        root: root.clone(),
                    },
                    None => self.outside(),
                });
            }
            return executable(resolved);
        }
        for root in &self.allowed_roots {
            // Not there (or not reachable): try the next root, as PATH lookup does.
            let Ok(resolved) = root.join(path).canonicalize() else {
                continue;
            };
            if !resolved.starts_with(root) {
                return Err(CommandRefused::Escapes {
                    resolved,
                    root: root.clone(),
                });
            }
            return executable(resolved);
        }
        Err(self.not_found())
    }

    fn outside(&self) -> CommandRefused {
        CommandRefused::Outside {
            roots: self.allowed_roots.clone(),
        }
    }

    fn not_found(&self) -> CommandRefused {
        CommandRefused::NotFound {
            roots: self.allowed_roots.clone(),
        }
    }
}

/// `path` if it is a regular file with an execute bit. Whether the instance's user may execute
/// it is for `execve` to say (reported like any spawn failure).
fn executable(path: PathBuf) -> Result<PathBuf, CommandRefused> {
    match std::fs::metadata(&path) {
        Ok(metadata) if metadata.is_file() && metadata.permissions().mode() & 0o111 != 0 => {
            Ok(path)
        }
        Ok(_) => Err(CommandRefused::NotExecutable { path }),
        Err(source) => Err(CommandRefused::Inspect { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A root with an executable `tool`, a plain file `data`, a directory `sub` holding an
    /// executable `inner`, and beside the root (outside it) an executable `outside-tool`.
    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        other_root: PathBuf,
        outside: PathBuf,
    }

    fn write_executable(path: &Path) {
        fs::write(path, b"#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        // Canonical from the start, so expected paths compare equal whatever TMPDIR is.
        let base = tmp.path().canonicalize().unwrap();
        let root = base.join("functions");
        let other_root = base.join("more");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::create_dir_all(&other_root).unwrap();
        write_executable(&root.join("tool"));
        write_executable(&root.join("sub/inner"));
        fs::write(root.join("data"), b"x").unwrap();
        write_executable(&other_root.join("only-here"));
        write_executable(&other_root.join("tool"));
        let outside = base.join("outside-tool");
        write_executable(&outside);
        Fixture {
            _tmp: tmp,
            root,
            other_root,
            outside,
        }
    }

    fn policy(roots: &[&Path]) -> CommandPolicy {
        let roots: Vec<PathBuf> = roots.iter().map(|r| r.to_path_buf()).collect();
        CommandPolicy::new(&roots, None).unwrap()
    }

    fn refusal(policy: &CommandPolicy, command: &str) -> String {
        policy.resolve(command).unwrap_err().to_string()
    }

    #[test]
    fn absolute_commands_must_resolve_under_a_root() {
        let f = fixture();
        let policy = policy(&[&f.root]);
        let tool = f.root.join("tool");
        assert_eq!(policy.resolve(tool.to_str().unwrap()).unwrap(), tool);
        let outside = f.outside.to_str().unwrap();
        assert_eq!(
            refusal(&policy, outside),
            format!("outside the allowed command roots ({})", f.root.display())
        );
        assert!(matches!(
            policy.resolve("/bin/sh"),
            Err(CommandRefused::Outside { .. })
        ));
        // A root is a directory, not a prefix: "functions2" is not under "functions".
        let sibling = PathBuf::from(format!("{}2", f.root.display()));
        fs::create_dir(&sibling).unwrap();
        write_executable(&sibling.join("tool"));
        assert!(matches!(
            policy.resolve(sibling.join("tool").to_str().unwrap()),
            Err(CommandRefused::Outside { .. })
        ));
    }

    #[test]
    fn a_missing_command_is_not_found_inside_and_outside_outside() {
        let f = fixture();
        let policy = policy(&[&f.root]);
        let missing = f.root.join("nope");
        assert_eq!(
            refusal(&policy, missing.to_str().unwrap()),
            format!(
                "not found under the allowed command roots ({})",
                f.root.display()
            )
        );
        assert!(matches!(
            policy.resolve("/nonexistent/meridian-test-command"),
            Err(CommandRefused::Outside { .. })
        ));
        assert!(matches!(
            policy.resolve("nope"),
            Err(CommandRefused::NotFound { .. })
        ));
    }

    #[test]
    fn relative_commands_are_looked_up_in_the_roots_in_order_not_in_path() {
        let f = fixture();
        let policy = policy(&[&f.root, &f.other_root]);
        // The first root that has it wins.
        assert_eq!(policy.resolve("tool").unwrap(), f.root.join("tool"));
        assert_eq!(
            policy.resolve("only-here").unwrap(),
            f.other_root.join("only-here")
        );
        assert_eq!(
            policy.resolve("sub/inner").unwrap(),
            f.root.join("sub/inner")
        );
        assert_eq!(
            policy.resolve("./sub/inner").unwrap(),
            f.root.join("sub/inner")
        );
        // `sh` is on every PATH, but not in these roots.
        assert_eq!(
            refusal(&policy, "sh"),
            format!(
                "not found under the allowed command roots ({}, {})",
                f.root.display(),
                f.other_root.display()
            )
        );
    }

    #[test]
    fn dot_dot_is_refused_wherever_it_would_lead() {
        let f = fixture();
        let policy = policy(&[&f.root]);
        for command in [
            "../outside-tool",
            "sub/../tool",
            &format!("{}/../outside-tool", f.root.display()),
            &format!("{}/sub/../tool", f.root.display()),
        ] {
            assert!(
                matches!(policy.resolve(command), Err(CommandRefused::ParentDir)),
                "{command}"
            );
        }
    }

    #[test]
    fn symlinks_are_followed_and_may_not_leave_the_root() {
        let f = fixture();
        let policy = policy(&[&f.root]);
        // Inside the root: allowed, and the canonical target is what runs.
        symlink(f.root.join("tool"), f.root.join("alias")).unwrap();
        assert_eq!(policy.resolve("alias").unwrap(), f.root.join("tool"));
        let alias = f.root.join("alias");
        assert_eq!(
            policy.resolve(alias.to_str().unwrap()).unwrap(),
            f.root.join("tool")
        );
        // Out of the root, relative or absolute: refused, naming where it leads.
        symlink(&f.outside, f.root.join("escape")).unwrap();
        let refused = refusal(&policy, "escape");
        assert_eq!(
            refused,
            format!(
                "resolves to {}, outside the allowed command root {}",
                f.outside.display(),
                f.root.display()
            )
        );
        let escape = f.root.join("escape");
        assert!(matches!(
            policy.resolve(escape.to_str().unwrap()),
            Err(CommandRefused::Escapes { .. })
        ));
        symlink("/bin", f.root.join("bin")).unwrap();
        assert!(matches!(
            policy.resolve("bin/sh"),
            Err(CommandRefused::Escapes { .. })
        ));
    }

    #[test]
    fn only_executable_regular_files_run() {
        let f = fixture();
        let policy = policy(&[&f.root]);
        assert!(matches!(
            policy.resolve("data"),
            Err(CommandRefused::NotExecutable { .. })
        ));
        assert!(matches!(
            policy.resolve("sub"),
            Err(CommandRefused::NotExecutable { .. })
        ));
        assert!(matches!(policy.resolve(""), Err(CommandRefused::Empty)));
    }

    #[test]
    fn no_roots_means_nothing_runs() {
        let policy = CommandPolicy::new(&[], None).unwrap();
        assert!(matches!(
            policy.resolve("/bin/true"),
            Err(CommandRefused::NoRoots)
        ));
        assert!(matches!(
            policy.resolve("true"),
            Err(CommandRefused::NoRoots)
        ));
    }

    #[test]
    fn roots_are_canonical_deduplicated_and_must_exist() {
        let f = fixture();
        let link = f.root.parent().unwrap().join("functions-link");
        symlink(&f.root, &link).unwrap();
        let policy = CommandPolicy::new(&[link.clone(), f.root.clone()], None).unwrap();
        assert_eq!(policy.allowed_roots(), std::slice::from_ref(&f.root));
        // A command through the link's spelling resolves to the canonical root.
        assert_eq!(
            policy.resolve(link.join("tool").to_str().unwrap()).unwrap(),
            f.root.join("tool")
        );

        let missing = f.root.join("missing-root");
        let error = CommandPolicy::new(std::slice::from_ref(&missing), None).unwrap_err();
        assert!(matches!(error, PolicyError::Root { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            format!(
                "invalid --allowed-command-root {}: cannot resolve it",
                missing.display()
            )
        );
        let error = CommandPolicy::new(&[f.root.join("tool")], None).unwrap_err();
        assert!(matches!(error, PolicyError::RootNotDirectory { .. }));
    }

    #[test]
    fn a_root_agent_must_switch_to_a_user_other_than_root() {
        let roots: Vec<PathBuf> = Vec::new();
        let error = CommandPolicy::for_agent(None, &roots, 0).unwrap_err();
        assert!(matches!(error, PolicyError::RootWithoutRunAs));
        assert!(error.to_string().contains("--run-as"), "{error}");
        for root in ["root", "0"] {
            let error = CommandPolicy::for_agent(Some(root), &roots, 0).unwrap_err();
            assert!(matches!(error, PolicyError::RunAsRoot { .. }), "{error:?}");
        }
        let nobody = User::from_name("nobody").unwrap().unwrap();
        let policy = CommandPolicy::for_agent(Some("nobody"), &roots, 0).unwrap();
        let user = policy.run_as().unwrap();
        assert_eq!(user.name(), "nobody");
        assert_eq!(user.uid(), nobody.uid.as_raw());
        assert_eq!(user.gid(), nobody.gid.as_raw());
        assert_eq!(policy.run_as_name(), Some("nobody"));
        // By uid too, named as passwd names it.
        let by_uid = nobody.uid.as_raw().to_string();
        let policy = CommandPolicy::for_agent(Some(&by_uid), &roots, 0).unwrap();
        assert_eq!(policy.run_as_name(), Some("nobody"));
        let error = CommandPolicy::for_agent(Some("no-such-user-meridian"), &roots, 0).unwrap_err();
        assert!(
            matches!(error, PolicyError::UnknownUser { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn an_unprivileged_agent_runs_instances_as_itself() {
        let roots: Vec<PathBuf> = Vec::new();
        let policy = CommandPolicy::for_agent(None, &roots, 1000).unwrap();
        assert_eq!(policy.run_as(), None);
        let nobody = User::from_name("nobody").unwrap().unwrap().uid.as_raw();
        // Naming itself is fine (and switches nothing).
        let policy = CommandPolicy::for_agent(Some("nobody"), &roots, nobody).unwrap();
        assert_eq!(policy.run_as(), None);
        let error = CommandPolicy::for_agent(Some("nobody"), &roots, nobody + 1).unwrap_err();
        assert!(
            matches!(error, PolicyError::NotPrivileged { .. }),
            "{error:?}"
        );
        let error = CommandPolicy::for_agent(Some("root"), &roots, 1000).unwrap_err();
        assert!(matches!(error, PolicyError::RunAsRoot { .. }), "{error:?}");
    }
}
