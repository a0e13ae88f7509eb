//! Instance log files on disk. An instance's stdout and stderr are its log file itself, opened
//! `O_APPEND` by the agent and handed to the process, so the instance needs nothing the agent
//! holds to keep writing: it outlives the agent with its logs. The agent tails the file
//! ([`LogTail`]) into the Logs API's ring, rotates it at a size cap by copy and truncate, and
//! prunes the files of exited instances to the newest few per function, so that a
//! crash-looping or chatty function cannot fill the agent's disk.
//!
//! Rotation copies the file to `<id>.log.1` and truncates it; `O_APPEND` writers go on at the
//! new end. What the instance writes between the end of the copy and the truncation (a window
//! of microseconds) is lost, from the file and from the ring, as with logrotate's
//! `copytruncate`. A file that grew far past the cap while no agent watched it is rotated to its
//! last [`LOG_FILE_MAX_BYTES`] only. The cap is checked at every read (at most
//! [`TAIL_POLL_MAX`] apart), so a file may pass it by what the instance writes in that time.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::logs::LineSplitter;

/// An instance's log file is rotated at this size: `<id>.log` is copied to `<id>.log.1`
/// (replacing the one before) and truncated, so one instance keeps about twice this on disk.
pub const LOG_FILE_MAX_BYTES: u64 = 10 << 20;
/// Log files of exited instances kept per function, the newest; older ones are removed when an
/// instance of the function starts.
pub const EXITED_LOG_FILES_KEPT: usize = 10;
/// The tail reads again this soon after it read something...
pub const TAIL_POLL_MIN: Duration = Duration::from_millis(10);
/// ...and backs off to this while the file stays quiet.
pub const TAIL_POLL_MAX: Duration = Duration::from_millis(200);

/// The suffix of an instance's current log file.
const LOG_SUFFIX: &str = ".log";
/// The suffix of its rotated log file.
const ROTATED_SUFFIX: &str = ".log.1";
/// One read of a log file.
const READ_CHUNK: usize = 64 * 1024;

/// Opens (or creates) an instance's log file for its stdout and stderr: write-only, `O_APPEND`
/// (every write lands at the end, whatever rotation did), created 0600 (`fs_modes::FILE_MODE`)
/// and owned by the agent in its 0700 `logs/`: the instance writes through the descriptor it is
/// given and can open neither this file nor any other instance's.
pub fn open_for_instance(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(crate::fs_modes::FILE_MODE)
        .open(path)
}

/// Follows one instance's log file: what was appended since the last read, as lines, and the
/// rotation at the cap. The agent's own descriptor is for reading and truncating only.
pub struct LogTail {
    path: PathBuf,
    file: File,
    offset: u64,
    max_bytes: u64,
    splitter: LineSplitter,
}

impl LogTail {
    /// Follows `path` from `offset` (a spawned instance: where its file ended before it
    /// started; past the end counts as the end).
    pub fn open_at(path: PathBuf, max_bytes: u64, offset: u64) -> io::Result<LogTail> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let offset = offset.min(file.metadata()?.len());
        let mut splitter = LineSplitter::default();
        if !at_line_start(&file, offset)? {
            splitter.skip_to_newline();
        }
        Ok(LogTail {
            path,
            file,
            offset,
            max_bytes,
            splitter,
        })
    }

    /// Follows `path` from its end less `backlog` bytes, from the first line start there: an
    /// adopted instance's recent lines (written before and while no agent ran) are shown.
    pub fn open_recent(path: PathBuf, max_bytes: u64, backlog: u64) -> io::Result<LogTail> {
        let len = std::fs::metadata(&path)?.len();
        LogTail::open_at(path, max_bytes, len.saturating_sub(backlog))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what was appended (rotating first if the file reached the cap) and returns the
    /// complete lines. A file that shrank under it (the instance truncated its own output) is
    /// followed from its start again.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        let len = self.file.metadata()?.len();
        if len < self.offset {
            self.offset = 0;
        }
        if len >= self.max_bytes {
            self.rotate(&mut lines)?;
        } else {
            self.offset = read_lines(&self.file, self.offset, &mut self.splitter, &mut lines)?;
        }
        Ok(lines)
    }

    /// A last line without its newline (the instance is gone, nothing will complete it).
    pub fn finish(&mut self) -> Option<String> {
        self.splitter.finish()
    }

    /// Copies the file to `<id>.log.1` (only its last `max_bytes`, from a line start, if it grew
    /// past twice the cap), truncates it at once, then takes the lines not read yet from the
    /// copy.
    fn rotate(&mut self, lines: &mut Vec<String>) -> io::Result<()> {
        let rotated = rotated_path(&self.path);
        let mut temp = rotated.as_os_str().to_owned();
        temp.push(".tmp");
        let temp = PathBuf::from(temp);
        let len = self.file.metadata()?.len();
        let from = if len > self.max_bytes.saturating_mul(2) {
            let cut = len - self.max_bytes;
            if at_line_start(&self.file, cut)? {
                cut
            } else {
                next_line_start(&self.file, cut)?
            }
        } else {
            0
        };
        let copy = create_copy(&temp)?;
        copy_to_end(&self.file, from, &copy)?;
        // Straight after the copy: what is written in between is lost (see the module's
        // documentation).
        self.file.set_len(0)?;
        if self.offset < from {
            // The bytes in between are dropped; `from` starts a line.
            self.splitter.reset();
        }
        read_lines(
            &copy,
            self.offset.max(from) - from,
            &mut self.splitter,
            lines,
        )?;
        drop(copy);
        std::fs::rename(&temp, &rotated)?;
        self.offset = 0;
        Ok(())
    }
}

/// A fresh 0600 file for reading and writing; a leftover of an interrupted rotation is removed
/// first (`O_CREAT` would keep its mode).
fn create_copy(path: &Path) -> io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(crate::fs_modes::FILE_MODE)
        .open(path)
}

/// Whether `offset` is 0 or follows a newline.
fn at_line_start(file: &File, offset: u64) -> io::Result<bool> {
    if offset == 0 {
        return Ok(true);
    }
    let mut byte = [0u8; 1];
    let n = file.read_at(&mut byte, offset - 1)?;
    Ok(n == 1 && byte[0] == b'\n')
}

/// The offset after the first newline at or after `at` (the end if there is none).
fn next_line_start(file: &File, mut at: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok(at);
        }
        if let Some(i) = buf[..n].iter().position(|b| *b == b'\n') {
            return Ok(at + i as u64 + 1);
        }
        at += n as u64;
    }
}

/// Copies `source` from `from` to its end to the start of `target`.
fn copy_to_end(source: &File, from: u64, target: &File) -> io::Result<()> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut at = from;
    loop {
        let n = source.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok(());
        }
        target.write_all_at(&buf[..n], at - from)?;
        at += n as u64;
    }
}

/// Reads `file` from `from` to its end into `splitter`; returns the new offset.
fn read_lines(
    file: &File,
    from: u64,
    splitter: &mut LineSplitter,
    lines: &mut Vec<String>,
) -> io::Result<u64> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut at = from;
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok(at);
        }
        splitter.push(&buf[..n], lines);
        at += n as u64;
    }
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

    /// Appends as an instance does: through its own `O_APPEND` descriptor.
    fn append(file: &mut File, text: &str) {
        use std::io::Write;
        file.write_all(text.as_bytes()).unwrap();
    }

    #[tokio::test]
    async fn rotates_at_the_cap_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i-1.log");
        let mut out = open_for_instance(&path).unwrap();
        let mut tail = LogTail::open_at(path.clone(), 20, 0).unwrap();
        append(&mut out, "aaaaaaaaa\nbbbbbbbbb\n");
        // 10 bytes a line: two reach the cap of 20; the read that sees it rotates.
        assert_eq!(tail.poll().unwrap(), ["aaaaaaaaa", "bbbbbbbbb"]);
        assert_eq!(read(&path).await, "");
        assert_eq!(
            read(&dir.path().join("i-1.log.1")).await,
            "aaaaaaaaa\nbbbbbbbbb\n"
        );
        // The instance's descriptor goes on at the new end.
        append(&mut out, "ccccccccc\nddddddddd\neeeee\n");
        assert_eq!(tail.poll().unwrap(), ["ccccccccc", "ddddddddd", "eeeee"]);
        assert_eq!(read(&path).await, "");
        assert_eq!(
            read(&dir.path().join("i-1.log.1")).await,
            "ccccccccc\nddddddddd\neeeee\n"
        );
        append(&mut out, "ffff\n");
        assert_eq!(tail.poll().unwrap(), ["ffff"]);
        assert_eq!(read(&path).await, "ffff\n");
        // A line over the cap is rotated whole, instead of being cut or looping.
        append(&mut out, &format!("{}\n", "x".repeat(30)));
        assert_eq!(tail.poll().unwrap(), ["x".repeat(30)]);
        append(&mut out, "y\n");
        assert_eq!(tail.poll().unwrap(), ["y"]);
        assert_eq!(read(&path).await, "y\n");
        assert_eq!(
            read(&dir.path().join("i-1.log.1")).await,
            format!("ffff\n{}\n", "x".repeat(30))
        );
        // Both files, the rotated one and the current one, are the agent's alone.
        use std::os::unix::fs::PermissionsExt;
        for file in [path.clone(), dir.path().join("i-1.log.1")] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o600, "{}", file.display());
        }
        assert!(!dir.path().join("i-1.log.1.tmp").exists());
    }

    #[tokio::test]
    async fn reopening_counts_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i-2.log");
        tokio::fs::write(&path, "0123456789012345\n").await.unwrap();
        let mut out = open_for_instance(&path).unwrap();
        let mut tail = LogTail::open_recent(path.clone(), 20, 1 << 20).unwrap();
        append(&mut out, "next\n");
        // 22 bytes: over the cap at the first read.
        assert_eq!(tail.poll().unwrap(), ["0123456789012345", "next"]);
        assert_eq!(read(&path).await, "");
        append(&mut out, "after\n");
        assert_eq!(tail.poll().unwrap(), ["after"]);
        assert_eq!(read(&path).await, "after\n");
    }

    #[tokio::test]
    async fn an_adopted_file_is_followed_from_its_recent_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i-3.log");
        tokio::fs::write(&path, "old line one\nold line two\nlast\n")
            .await
            .unwrap();
        // A backlog of 10 bytes lands inside "old line two": from the next line on.
        let mut tail = LogTail::open_recent(path.clone(), 1 << 20, 10).unwrap();
        assert_eq!(tail.poll().unwrap(), ["last"]);
        // Exactly at a line start: that line is kept.
        let mut tail = LogTail::open_recent(path.clone(), 1 << 20, 5).unwrap();
        assert_eq!(tail.poll().unwrap(), ["last"]);
        let mut out = open_for_instance(&path).unwrap();
        append(&mut out, "partial");
        assert!(tail.poll().unwrap().is_empty());
        append(&mut out, " line\nand a last one");
        assert_eq!(tail.poll().unwrap(), ["partial line"]);
        assert_eq!(tail.finish().as_deref(), Some("and a last one"));
    }

    #[tokio::test]
    async fn a_file_far_past_the_cap_keeps_its_last_part_from_a_line_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i-4.log");
        // 10 lines of 10 bytes with a cap of 20: more than twice the cap.
        let text: String = (0..10).map(|i| format!("line-{i:04}\n")).collect();
        tokio::fs::write(&path, &text).await.unwrap();
        let mut tail = LogTail::open_at(path.clone(), 20, 0).unwrap();
        // The last 20 bytes start at a line: the last two lines, which are also all the ring
        // gets (the rest is dropped).
        assert_eq!(tail.poll().unwrap(), ["line-0008", "line-0009"]);
        assert_eq!(
            read(&dir.path().join("i-4.log.1")).await,
            "line-0008\nline-0009\n"
        );
        assert_eq!(read(&path).await, "");
    }

    #[tokio::test]
    async fn a_file_the_instance_truncated_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i-5.log");
        let mut out = open_for_instance(&path).unwrap();
        let mut tail = LogTail::open_at(path.clone(), 1 << 20, 0).unwrap();
        append(&mut out, "one\ntwo\n");
        assert_eq!(tail.poll().unwrap(), ["one", "two"]);
        out.set_len(0).unwrap();
        append(&mut out, "3\n");
        assert_eq!(tail.poll().unwrap(), ["3"]);
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
