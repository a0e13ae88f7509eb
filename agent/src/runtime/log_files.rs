//! Instance log files on disk: each instance's file is rotated at a size cap, and the files of
//! exited instances are pruned to the newest few per function, so a crash-looping or chatty
//! function cannot fill the agent's disk.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncWriteExt, BufWriter};

/// An instance's log file is rotated at this size: `<id>.log` becomes `<id>.log.1` (replacing
/// the one before), so one instance keeps at most twice this on disk.
pub const LOG_FILE_MAX_BYTES: u64 = 10 << 20;
/// Log files of exited instances kept per function, the newest; older ones are removed when an
/// instance of the function starts.
pub const EXITED_LOG_FILES_KEPT: usize = 10;

/// The suffix of an instance's current log file.
const LOG_SUFFIX: &str = ".log";
/// The suffix of its rotated log file.
const ROTATED_SUFFIX: &str = ".log.1";

/// An append-only log file that rotates itself at `max_bytes`.
pub struct RotatingLog {
    path: PathBuf,
    file: BufWriter<File>,
    written: u64,
    max_bytes: u64,
}

impl RotatingLog {
    /// Opens (or creates) `path` for appending; what it holds already counts toward the cap.
    pub async fn open(path: PathBuf, max_bytes: u64) -> io::Result<Self> {
        let file = open_append(&path).await?;
        let written = file.metadata().await?.len();
        Ok(Self {
            path,
            file: BufWriter::new(file),
            written,
            max_bytes,
        })
    }

    /// Appends `line` and a newline; first rotates if the line would take the file past the cap
    /// (a line longer than the cap gets a file of its own).
    pub async fn write_line(&mut self, line: &str) -> io::Result<()> {
        let size = line.len() as u64 + 1;
        if self.written > 0 && self.written + size > self.max_bytes {
            self.rotate().await?;
        }
        self.file.write_all(line.as_bytes()).await?;
        self.file.write_all(b"\n").await?;
        self.written += size;
        Ok(())
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.file.flush().await
    }

    async fn rotate(&mut self) -> io::Result<()> {
        self.file.flush().await?;
        tokio::fs::rename(&self.path, rotated_path(&self.path)).await?;
        self.file = BufWriter::new(open_append(&self.path).await?);
        self.written = 0;
        Ok(())
    }
}

/// Opens for appending; a new file is created 0600 (`fs_modes::FILE_MODE`): an instance's output
/// is for the agent's Logs API, not for other instances.
async fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(crate::fs_modes::FILE_MODE)
        .open(path)
        .await
}

fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The instance id a file in a function's log directory belongs to, if it is a log file.
fn instance_of(file_name: &str) -> Option<&str> {
    file_name
        .strip_suffix(ROTATED_SUFFIX)
        .or_else(|| file_name.strip_suffix(LOG_SUFFIX))
        .filter(|id| !id.is_empty())
}

/// Removes the log files (current and rotated) of instances in `dir` that are not in `live`,
/// except the `keep` most recently written. Returns how many files it removed. Files it cannot
/// read or remove are left alone (a later start tries again).
pub async fn prune_exited(dir: &Path, live: &HashSet<String>, keep: usize) -> io::Result<usize> {
    let mut newest: BTreeMap<String, (SystemTime, Vec<PathBuf>)> = BTreeMap::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(instance_of) else {
            continue;
        };
        if live.contains(id) {
            continue;
        }
        let Ok(modified) = entry.metadata().await.and_then(|m| m.modified()) else {
            continue;
        };
        let slot = newest
            .entry(id.to_owned())
            .or_insert((SystemTime::UNIX_EPOCH, Vec::new()));
        slot.0 = slot.0.max(modified);
        slot.1.push(entry.path());
    }
    let mut exited: Vec<(SystemTime, Vec<PathBuf>)> = newest.into_values().collect();
    exited.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    let mut removed = 0;
    for (_, paths) in exited.into_iter().skip(keep) {
        for path in paths {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => removed += 1,
                Err(error) => {
                    tracing::debug!(path = %path.display(), %error, "cannot remove an old instance log");
                }
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(path: &Path) -> String {
        tokio::fs::read_to_string(path).await.unwrap_or_default()
    }

    #[tokio::test]
    async fn rotates_at_the_cap_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i-1.log");
        let mut log = RotatingLog::open(path.clone(), 20).await.unwrap();
        for line in ["aaaaaaaaa", "bbbbbbbbb", "ccccccccc", "ddddddddd", "eeeee"] {
            log.write_line(line).await.unwrap();
        }
        log.flush().await.unwrap();
        // 10 bytes a line: two fit in 20; the third rotated, the fifth rotated again.
        assert_eq!(read(&path).await, "eeeee\n");
        assert_eq!(
            read(&dir.path().join("i-1.log.1")).await,
            "ccccccccc\nddddddddd\n"
        );
        // A line over the cap gets a file of its own instead of looping.
        log.write_line(&"x".repeat(50)).await.unwrap();
        log.write_line("y").await.unwrap();
        log.flush().await.unwrap();
        assert_eq!(read(&path).await, "y\n");
        assert_eq!(
            read(&dir.path().join("i-1.log.1")).await,
            format!("{}\n", "x".repeat(50))
        );
        // Both files, the rotated one and the new one, are the agent's alone.
        use std::os::unix::fs::PermissionsExt;
        for file in [path.clone(), dir.path().join("i-1.log.1")] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o600, "{}", file.display());
        }
    }

    #[tokio::test]
    async fn reopening_counts_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i-2.log");
        tokio::fs::write(&path, "0123456789012345\n").await.unwrap();
        let mut log = RotatingLog::open(path.clone(), 20).await.unwrap();
        log.write_line("next").await.unwrap();
        log.flush().await.unwrap();
        assert_eq!(read(&path).await, "next\n");
    }

    #[tokio::test]
    async fn prunes_the_oldest_exited_instances_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = SystemTime::now() - std::time::Duration::from_secs(1000);
        let write = |name: &str, age_index: u64| {
            let path = dir.path().join(name);
            std::fs::write(&path, "x\n").unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(base + std::time::Duration::from_secs(age_index * 10))
                .unwrap();
        };
        // old-1 is the oldest, with a rotated file too; live-1 is older still but running.
        write("live-1.log", 0);
        write("old-1.log.1", 1);
        write("old-1.log", 2);
        write("old-2.log", 3);
        write("new-1.log", 4);
        write("new-2.log", 5);
        write("notes.txt", 0);
        let live: HashSet<String> = ["live-1".to_string()].into();
        let removed = prune_exited(dir.path(), &live, 2).await.unwrap();
        assert_eq!(removed, 3);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["live-1.log", "new-1.log", "new-2.log", "notes.txt"]);
    }
}
