//! Instance output: the line splitter for what the log files' tails read, and the in-memory
//! registry behind the Logs API (the last lines of each instance, with their stream name, and a
//! feed of new lines).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use meridian_proto::v1::LogLine;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_stream::wrappers::BroadcastStream;

use super::{FunctionKey, LogStream, RuntimeError};

/// Lines kept in memory per instance (the Logs API's largest tail).
pub const RING_LINES: usize = 1000;
/// Bytes kept in memory per instance, whatever the line count.
pub const RING_BYTES: usize = 1 << 20;
/// A longer line is cut here (the rest up to the newline is dropped).
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Logs of exited instances stay available this long.
pub const EXITED_RETENTION: Duration = Duration::from_secs(600);
/// New lines buffered per function for slow followers; a follower that lags more skips lines.
const FEED_CAPACITY: usize = 4096;

/// The stream a line came from, as the Logs API names it (`LogLine.stream`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStream {
    /// Stdout and stderr in one file: a process instance writes both to its log file (so that
    /// it outlives the agent with its output), which keeps their order but cannot tell them
    /// apart.
    Output,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Output => "output",
        }
    }
}

/// Cuts bytes into lines as they arrive: without the newline, invalid UTF-8 replaced, cut at
/// [`MAX_LINE_BYTES`] (the rest up to the newline dropped). A line may arrive in pieces; a last
/// line without a newline is only given by [`LineSplitter::finish`].
#[derive(Debug, Default)]
pub struct LineSplitter {
    line: Vec<u8>,
    /// Dropping everything up to the next newline (reading started mid-line).
    skipping: bool,
}

impl LineSplitter {
    /// Adds `bytes`; pushes every line they complete to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(index) => {
                    self.take(&bytes[..index]);
                    if !self.skipping {
                        out.push(String::from_utf8_lossy(&self.line).into_owned());
                    }
                    self.line.clear();
                    self.skipping = false;
                    bytes = &bytes[index + 1..];
                }
                None => {
                    self.take(bytes);
                    break;
                }
            }
        }
    }

    fn take(&mut self, chunk: &[u8]) {
        if self.skipping {
            return;
        }
        let room = MAX_LINE_BYTES.saturating_sub(self.line.len());
        self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// The last line, without a newline, if there is one.
    pub fn finish(&mut self) -> Option<String> {
        let line = (!self.skipping && !self.line.is_empty())
            .then(|| String::from_utf8_lossy(&self.line).into_owned());
        self.reset();
        line
    }

    /// Drops what arrives up to the next newline.
    pub fn skip_to_newline(&mut self) {
        self.line.clear();
        self.skipping = true;
    }

    /// Forgets a partial line.
    pub fn reset(&mut self) {
        self.line.clear();
        self.skipping = false;
    }
}

struct InstanceLog {
    lines: VecDeque<(OutputStream, String)>,
    bytes: usize,
    exited: Option<Instant>,
}

struct FunctionLogs {
    instances: BTreeMap<String, InstanceLog>,
    feed: broadcast::Sender<LogLine>,
}

impl FunctionLogs {
    fn new() -> Self {
        Self {
            instances: BTreeMap::new(),
            feed: broadcast::channel(FEED_CAPACITY).0,
        }
    }
}

/// Shared by the runtime handle (readers) and the instance tasks (writers). One short-held
/// mutex: writers push one line at a time, readers copy a tail.
pub struct LogRegistry {
    region: String,
    functions: Mutex<HashMap<FunctionKey, FunctionLogs>>,
}

impl LogRegistry {
    pub fn new(region: String) -> Self {
        Self {
            region,
            functions: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<FunctionKey, FunctionLogs>> {
        // A panic while holding this lock cannot leave the maps inconsistent beyond one line.
        self.functions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the function known, so that following its logs works before any instance runs.
    pub fn register_function(&self, key: &FunctionKey) {
        self.lock()
            .entry(key.clone())
            .or_insert_with(FunctionLogs::new);
    }

    pub fn register_instance(&self, key: &FunctionKey, instance: &str) {
        let mut functions = self.lock();
        let logs = functions
            .entry(key.clone())
            .or_insert_with(FunctionLogs::new);
        logs.instances.insert(
            instance.to_owned(),
            InstanceLog {
                lines: VecDeque::new(),
                bytes: 0,
                exited: None,
            },
        );
    }

    pub fn push(&self, key: &FunctionKey, instance: &str, stream: OutputStream, line: String) {
        let mut functions = self.lock();
        let Some(logs) = functions.get_mut(key) else {
            return;
        };
        if logs.feed.receiver_count() > 0 {
            // No receiver is the common case; an error only means the last one just left.
            let _ = logs.feed.send(LogLine {
                instance: instance.to_owned(),
                stream: stream.as_str().to_owned(),
                line: line.clone(),
                region: self.region.clone(),
            });
        }
        if let Some(log) = logs.instances.get_mut(instance) {
            log.bytes += line.len();
            log.lines.push_back((stream, line));
            while log.lines.len() > RING_LINES || log.bytes > RING_BYTES {
                match log.lines.pop_front() {
                    Some((_, old)) => log.bytes -= old.len(),
                    None => break,
                }
            }
        }
    }

    /// Marks an instance exited (its lines stay for [`EXITED_RETENTION`]) and drops the logs of
    /// instances that exited longer ago.
    pub fn mark_exited(&self, key: &FunctionKey, instance: &str, now: Instant) {
        let mut functions = self.lock();
        if let Some(log) = functions
            .get_mut(key)
            .and_then(|logs| logs.instances.get_mut(instance))
        {
            log.exited = Some(now);
        }
        for logs in functions.values_mut() {
            logs.instances.retain(|_, log| match log.exited {
                Some(exited) => now.saturating_duration_since(exited) < EXITED_RETENTION,
                None => true,
            });
        }
    }

    /// The instances of `key` that have not exited (their log files must stay).
    pub fn live_instances(&self, key: &FunctionKey) -> HashSet<String> {
        self.lock().get(key).map_or_else(HashSet::new, |logs| {
            logs.instances
                .iter()
                .filter(|(_, log)| log.exited.is_none())
                .map(|(id, _)| id.clone())
                .collect()
        })
    }

    /// The last `count` lines of an instance, stream names dropped (for status).
    pub fn last_lines(&self, key: &FunctionKey, instance: &str, count: usize) -> Vec<String> {
        let functions = self.lock();
        let Some(log) = functions
            .get(key)
            .and_then(|logs| logs.instances.get(instance))
        else {
            return Vec::new();
        };
        let skip = log.lines.len().saturating_sub(count);
        log.lines
            .iter()
            .skip(skip)
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// Whether any instance (live or retained) has this id.
    pub fn knows_instance(&self, instance: &str) -> bool {
        self.lock()
            .values()
            .any(|logs| logs.instances.contains_key(instance))
    }

    /// The last `tail` lines of each instance (or of `instance` only), then, if `follow`, new
    /// lines as they are written. Tail and feed are taken under one lock, so no line is missed
    /// or repeated between them.
    pub fn stream(
        &self,
        key: &FunctionKey,
        instance: Option<String>,
        tail: usize,
        follow: bool,
        now: Instant,
    ) -> Result<LogStream, RuntimeError> {
        let functions = self.lock();
        let logs = functions
            .get(key)
            .ok_or_else(|| RuntimeError::UnknownFunction(key.to_string()))?;
        let retained = |log: &InstanceLog| match log.exited {
            Some(exited) => now.saturating_duration_since(exited) < EXITED_RETENTION,
            None => true,
        };
        if let Some(id) = &instance {
            if !logs.instances.get(id).is_some_and(retained) {
                return Err(RuntimeError::UnknownInstance {
                    function: key.to_string(),
                    instance: id.clone(),
                });
            }
        }
        let mut backlog = Vec::new();
        for (id, log) in &logs.instances {
            if instance.as_ref().is_some_and(|wanted| wanted != id) || !retained(log) {
                continue;
            }
            let skip = log.lines.len().saturating_sub(tail);
            backlog.extend(log.lines.iter().skip(skip).map(|(stream, line)| LogLine {
                instance: id.clone(),
                stream: stream.as_str().to_owned(),
                line: line.clone(),
                region: self.region.clone(),
            }));
        }
        let backlog = futures::stream::iter(backlog);
        if !follow {
            return Ok(backlog.boxed());
        }
        let feed = BroadcastStream::new(logs.feed.subscribe()).filter_map(move |item| {
            // A lagging follower skips what it missed rather than ending.
            let line = item.ok().filter(|line| {
                instance
                    .as_ref()
                    .is_none_or(|wanted| *wanted == line.instance)
            });
            std::future::ready(line)
        });
        Ok(backlog.chain(feed).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FunctionKey {
        FunctionKey::new("default", "hello")
    }

    /// Every line of `input`, the last one also without a newline, fed in pieces of `piece`
    /// bytes.
    fn split(input: &[u8], piece: usize) -> Vec<String> {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        for chunk in input.chunks(piece) {
            splitter.push(chunk, &mut lines);
        }
        lines.extend(splitter.finish());
        lines
    }

    #[test]
    fn splits_lines_keeps_a_last_partial_line_and_cuts_long_ones() {
        for piece in [1, 3, 1 << 20] {
            assert_eq!(split(b"a\nb\n\nc", piece), vec!["a", "b", "", "c"]);
            assert_eq!(split(b"bad \xff\n", piece), vec!["bad \u{fffd}"]);
        }
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let mut input = long.clone();
        input.extend_from_slice(b"\nnext\n");
        for piece in [7, 1 << 20] {
            let lines = split(&input, piece);
            assert_eq!(lines.len(), 2);
            assert_eq!(lines[0].len(), MAX_LINE_BYTES);
            assert_eq!(lines[1], "next");
        }
    }

    #[test]
    fn a_splitter_can_skip_to_the_next_line() {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        splitter.skip_to_newline();
        splitter.push(b"f a line\nwhole\npart", &mut lines);
        assert_eq!(lines, ["whole"]);
        splitter.reset();
        assert_eq!(splitter.finish(), None);
        splitter.skip_to_newline();
        splitter.push(b"no newline", &mut lines);
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn ring_keeps_the_last_lines() {
        let registry = LogRegistry::new("r".into());
        registry.register_instance(&key(), "hello-000001");
        for n in 0..RING_LINES + 5 {
            registry.push(&key(), "hello-000001", OutputStream::Output, n.to_string());
        }
        let last = registry.last_lines(&key(), "hello-000001", 2);
        assert_eq!(
            last,
            vec![(RING_LINES + 3).to_string(), (RING_LINES + 4).to_string()]
        );
    }

    #[tokio::test]
    async fn tail_then_follow_filters_by_instance_and_names_the_stream() {
        let registry = LogRegistry::new("eu".into());
        registry.register_instance(&key(), "hello-000001");
        registry.register_instance(&key(), "hello-000002");
        registry.push(&key(), "hello-000001", OutputStream::Output, "one".into());
        registry.push(&key(), "hello-000001", OutputStream::Output, "two".into());
        registry.push(&key(), "hello-000002", OutputStream::Output, "other".into());

        let all: Vec<LogLine> = registry
            .stream(&key(), None, 1, false, Instant::now())
            .unwrap()
            .collect()
            .await;
        let texts: Vec<_> = all
            .iter()
            .map(|l| (l.instance.as_str(), l.line.as_str()))
            .collect();
        assert_eq!(
            texts,
            vec![("hello-000001", "two"), ("hello-000002", "other")]
        );
        assert!(all.iter().all(|l| l.stream == "output"), "{all:?}");
        assert_eq!(all[0].region, "eu");

        let mut follow = registry
            .stream(
                &key(),
                Some("hello-000001".into()),
                10,
                true,
                Instant::now(),
            )
            .unwrap();
        assert_eq!(follow.next().await.unwrap().line, "one");
        assert_eq!(follow.next().await.unwrap().line, "two");
        registry.push(
            &key(),
            "hello-000002",
            OutputStream::Output,
            "skip me".into(),
        );
        registry.push(&key(), "hello-000001", OutputStream::Output, "three".into());
        assert_eq!(follow.next().await.unwrap().line, "three");
    }

    #[tokio::test(start_paused = true)]
    async fn exited_instances_are_served_for_ten_minutes() {
        let registry = LogRegistry::new("r".into());
        registry.register_instance(&key(), "hello-000001");
        registry.push(&key(), "hello-000001", OutputStream::Output, "bye".into());
        registry.mark_exited(&key(), "hello-000001", Instant::now());
        let later = Instant::now() + EXITED_RETENTION - Duration::from_secs(1);
        assert!(registry
            .stream(&key(), Some("hello-000001".into()), 5, false, later)
            .is_ok());
        let expired = Instant::now() + EXITED_RETENTION;
        assert!(matches!(
            registry.stream(&key(), Some("hello-000001".into()), 5, false, expired),
            Err(RuntimeError::UnknownInstance { .. })
        ));
        assert!(matches!(
            registry.stream(
                &FunctionKey::new("default", "nope"),
                None,
                5,
                false,
                expired
            ),
            Err(RuntimeError::UnknownFunction(_))
        ));
    }
}
