//! The persisted routing table, `<state-dir>/routing-table.pb`: what a restarted agent serves
//! before (or without) any control plane. Writes are atomic so a crash never leaves half a table.
//! The directory and the file have the modes of `fs_modes`: instances (another user) can read
//! neither the table nor the directory's listing.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use meridian_proto::v1::RoutingTable;
use prost::Message;

use crate::fs_modes;
use crate::table::{Table, TableError};

/// The table's file name inside the state directory.
pub const TABLE_FILE: &str = "routing-table.pb";
/// Written, synced, then renamed over [`TABLE_FILE`]. A fixed name, so that a temp file left by
/// a crash is simply overwritten by the next save.
const TEMP_FILE: &str = ".routing-table.pb.tmp";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path} (or give it and its files their modes)")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot move corrupt {path} aside")]
    MoveAside {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The state directory. Cheap to clone; every method is blocking file I/O (call it from
/// `spawn_blocking` on async paths).
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Uses `dir`, creating it (and its parents) if missing, with mode 0711; files left in it
    /// with a wider mode than 0600 (by an agent from before the modes were fixed) are narrowed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        let error = |source| StateError::CreateDir {
            path: dir.clone(),
            source,
        };
        fs_modes::ensure_dir(&dir, fs_modes::STATE_DIR_MODE).map_err(error)?;
        let tightened = fs_modes::tighten_files(&dir).map_err(error)?;
        if tightened > 0 {
            tracing::info!(dir = %dir.display(), files = tightened, "narrowed the modes of files in the state directory to 0600");
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn table_path(&self) -> PathBuf {
        self.dir.join(TABLE_FILE)
    }

    /// The persisted table for `region`, if there is a usable one. A corrupt file is moved aside
    /// (see [`StateStore::load_at`]).
    pub fn load(&self, region: &str) -> Result<Option<Table>, StateError> {
        self.load_at(region, SystemTime::now())
    }

    /// Like [`StateStore::load`], with the clock that names a corrupt file
    /// (`routing-table.pb.corrupt-<unix-secs>`) passed in.
    pub fn load_at(&self, region: &str, now: SystemTime) -> Result<Option<Table>, StateError> {
        let path = self.table_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let reason = match RoutingTable::decode(bytes.as_slice()) {
            Ok(wire) => match Table::from_wire(wire, region) {
                Ok(table) => return Ok(Some(table)),
                // Not corrupt, just another region's (the agent's --region changed): not ours to
                // serve, and the next accepted table overwrites it.
                Err(error @ TableError::WrongRegion { .. }) => {
                    tracing::warn!(path = %path.display(), reason = %error.reason(),
                        "ignoring persisted routing table; starting with no table");
                    return Ok(None);
                }
                Err(error) => error.reason(),
            },
            Err(error) => format!("cannot decode: {error}"),
        };
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let aside = self.dir.join(format!("{TABLE_FILE}.corrupt-{secs}"));
        fs::rename(&path, &aside).map_err(|source| StateError::MoveAside {
            path: path.clone(),
            source,
        })?;
        tracing::warn!(path = %path.display(), moved_to = %aside.display(), %reason,
            "persisted routing table is corrupt; moved aside, starting with no table");
        Ok(None)
    }

    /// Replaces the persisted table atomically: temp file in the same directory, fsync, rename,
    /// fsync of the directory (so the rename itself survives a power loss).
    pub fn save(&self, table: &RoutingTable) -> Result<(), StateError> {
        let temp = self.dir.join(TEMP_FILE);
        let result = write_synced(&temp, &table.encode_to_vec())
            .and_then(|()| fs::rename(&temp, self.table_path()))
            .and_then(|()| File::open(&self.dir)?.sync_all());
        result.map_err(|source| {
            // Best effort: a leftover temp file is harmless (overwritten next time) but untidy.
            let _ = fs::remove_file(&temp);
            StateError::Write {
                path: self.table_path(),
                source,
            }
        })
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = fs_modes::create_private_file(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_proto::v1::FunctionRoute;
    use std::time::Duration;

    fn wire(version: i64, names: &[&str]) -> RoutingTable {
        RoutingTable {
            local_generation: Default::default(),
            version,
            region: "us-east".into(),
            functions: names
                .iter()
                .map(|name| FunctionRoute {
                    namespace: "default".into(),
                    name: (*name).into(),
                    function_version: version,
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn missing_dir_is_created_and_empty_state_loads_as_none() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/lib/agent");
        let store = StateStore::open(&dir).unwrap();
        assert!(dir.is_dir());
        assert_eq!(store.load("us-east").unwrap(), None);
    }

    #[test]
    fn the_directory_is_0711_and_the_table_0600() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        // tempfile makes it 0700: instances could not reach their working directories.
        let store = StateStore::open(tmp.path()).unwrap();
        assert_eq!(mode(tmp.path()), 0o711);
        store.save(&wire(1, &["a"])).unwrap();
        assert_eq!(mode(&store.table_path()), 0o600);
        // A table written by an older agent (0644) is narrowed when the store opens, before
        // any new save.
        fs::set_permissions(store.table_path(), fs::Permissions::from_mode(0o644)).unwrap();
        let store = StateStore::open(tmp.path()).unwrap();
        assert_eq!(mode(&store.table_path()), 0o600);
        // So is a temp file left with a wider mode: the next save writes a fresh one.
        let temp = tmp.path().join(TEMP_FILE);
        fs::write(&temp, b"half").unwrap();
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o644)).unwrap();
        store.save(&wire(2, &["a"])).unwrap();
        assert_eq!(mode(&store.table_path()), 0o600);
    }

    #[test]
    fn save_then_load_roundtrips() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::open(tmp.path()).unwrap();
        store.save(&wire(3, &["a", "b"])).unwrap();
        store.save(&wire(4, &["c"])).unwrap();
        let table = store.load("us-east").unwrap().unwrap();
        assert_eq!(table.to_wire(), wire(4, &["c"]));
    }

    #[test]
    fn atomic_write_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::open(tmp.path()).unwrap();
        // A temp file left behind by a crash mid-write is overwritten, then renamed away.
        fs::write(tmp.path().join(TEMP_FILE), b"half a table").unwrap();
        store.save(&wire(1, &["a"])).unwrap();
        assert_eq!(dir_entries(tmp.path()), [TABLE_FILE]);
        let bytes = fs::read(store.table_path()).unwrap();
        assert_eq!(
            RoutingTable::decode(bytes.as_slice()).unwrap(),
            wire(1, &["a"])
        );
    }

    #[test]
    fn undecodable_file_is_moved_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::open(tmp.path()).unwrap();
        fs::write(store.table_path(), [0xff, 0xff, 0xff, 0x07]).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(store.load_at("us-east", now).unwrap(), None);
        assert_eq!(
            dir_entries(tmp.path()),
            ["routing-table.pb.corrupt-1700000000"]
        );
        // The next save starts afresh.
        store.save(&wire(2, &["a"])).unwrap();
        assert_eq!(store.load("us-east").unwrap().unwrap().version(), 2);
    }

    #[test]
    fn table_failing_checks_is_moved_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::open(tmp.path()).unwrap();
        store.save(&wire(5, &["a", "a"])).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(42);
        assert_eq!(store.load_at("us-east", now).unwrap(), None);
        assert_eq!(dir_entries(tmp.path()), ["routing-table.pb.corrupt-42"]);
    }

    #[test]
    fn other_regions_table_is_ignored_not_moved() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::open(tmp.path()).unwrap();
        store.save(&wire(5, &["a"])).unwrap();
        assert_eq!(store.load("eu-west").unwrap(), None);
        assert_eq!(dir_entries(tmp.path()), [TABLE_FILE]);
    }
}
