//! How a routing table travels as [`RoutingUpdate`]s: cut into parts of bounded size, collected
//! back into one update, and, on an agent's stream to its sidecars, the delta between two tables
//! and its application. Both ends of both streams (and the tests between them) use these rules,
//! so they cannot drift apart.
//!
//! Parts are bounded in functions and in encoded bytes: no message grows with the table, which
//! is what lets 20,000 functions reach every sidecar through the default 4 MiB gRPC limit.

use std::collections::HashSet;

use prost::Message;

use crate::v1::{FunctionRef, FunctionRoute, RoutingTable, RoutingUpdate};

/// How large one part may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLimits {
    /// Functions (and removals) per part, at least 1.
    pub items: usize,
    /// Encoded bytes of the functions and removals of a part. A single function larger than
    /// this still travels, alone in its part.
    pub bytes: usize,
}

/// About 1 MiB per part: well below any peer's 4 MiB decoding limit, and small enough that the
/// buffers each stream keeps (they retain their largest message's capacity) stay small.
pub const PART_BYTES: usize = 1024 * 1024;

/// An agent's stream to its sidecars: few streams, so larger parts.
pub const LOCAL_PART_LIMITS: PartLimits = PartLimits {
    items: 256,
    bytes: PART_BYTES,
};

/// More parts than any update needs: a stream that never finishes an update is refused.
pub const MAX_PARTS: usize = 16_384;

/// The largest message a Meridian peer accepts on a routing stream. Parts stay far below it;
/// the margin is for a single function near the spec size limit plus its endpoints.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Splits an update into parts within `limits` (`more` set on all but the last). Every part
/// carries the update's header (versions, generations, `full`, region); functions keep their
/// order and removals follow them. The trace context travels in the first part only.
pub fn split(update: RoutingUpdate, limits: PartLimits) -> Vec<RoutingUpdate> {
    let items = limits.items.max(1);
    let header = RoutingUpdate {
        functions: Vec::new(),
        removed: Vec::new(),
        more: true,
        trace_context: Default::default(),
        region: update.region.clone(),
        ..update
    };
    let mut parts: Vec<RoutingUpdate> = Vec::new();
    let mut current = header.clone();
    current.trace_context = update.trace_context;
    let mut count = 0;
    let mut bytes = 0;
    let mut full = |current: &mut RoutingUpdate, count: &mut usize, bytes: &mut usize, size| {
        let over = *count > 0 && (*count >= items || *bytes + size > limits.bytes);
        if over {
            parts.push(std::mem::replace(current, header.clone()));
            *count = 0;
            *bytes = 0;
        }
        *count += 1;
        *bytes += size;
    };
    for function in update.functions {
        full(&mut current, &mut count, &mut bytes, function.encoded_len());
        current.functions.push(function);
    }
    for removed in update.removed {
        full(&mut current, &mut count, &mut bytes, removed.encoded_len());
        current.removed.push(removed);
    }
    parts.push(current);
    if let Some(last) = parts.last_mut() {
        last.more = false;
    }
    parts
}

/// Why parts could not be collected into an update.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    #[error("a part of update {got} arrived before update {pending} was complete")]
    Interleaved { pending: i64, got: i64 },
    #[error("update {version} has more than {MAX_PARTS} parts")]
    TooManyParts { version: i64 },
}

impl AssembleError {
    /// The version the offending part carried (what a Nack names).
    pub fn version(&self) -> i64 {
        match self {
            Self::Interleaved { got, .. } => *got,
            Self::TooManyParts { version } => *version,
        }
    }
}

/// Collects parts into whole updates. After an error it starts afresh with the next part.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<RoutingUpdate>,
    parts: usize,
}

fn same_update(a: &RoutingUpdate, b: &RoutingUpdate) -> bool {
    a.version == b.version
        && a.base_version == b.base_version
        && a.full == b.full
        && a.local_generation == b.local_generation
        && a.base_local_generation == b.base_local_generation
        && a.region == b.region
}

impl Assembler {
    /// Adds a part; returns the whole update once its last part is in.
    pub fn push(&mut self, part: RoutingUpdate) -> Result<Option<RoutingUpdate>, AssembleError> {
        let Some(mut pending) = self.pending.take() else {
            if !part.more {
                return Ok(Some(part));
            }
            self.pending = Some(part);
            self.parts = 1;
            return Ok(None);
        };
        if !same_update(&pending, &part) {
            self.parts = 0;
            return Err(AssembleError::Interleaved {
                pending: pending.version,
                got: part.version,
            });
        }
        self.parts += 1;
        if self.parts > MAX_PARTS {
            self.parts = 0;
            return Err(AssembleError::TooManyParts {
                version: part.version,
            });
        }
        let more = part.more;
        pending.functions.extend(part.functions);
        pending.removed.extend(part.removed);
        if more {
            self.pending = Some(pending);
            return Ok(None);
        }
        pending.more = false;
        self.parts = 0;
        Ok(Some(pending))
    }

    /// Whether an update is half received.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// A function's identity within a table.
fn key(function: &FunctionRoute) -> (&str, &str) {
    (&function.namespace, &function.name)
}

/// The whole of `table` as one (unsplit) full update.
pub fn full(table: &RoutingTable) -> RoutingUpdate {
    RoutingUpdate {
        version: table.version,
        base_version: 0,
        full: true,
        region: table.region.clone(),
        functions: table.functions.clone(),
        removed: Vec::new(),
        more: false,
        trace_context: Default::default(),
        local_generation: table.local_generation,
        base_local_generation: 0,
    }
}

/// The delta that turns `old` into `new` (both sorted by namespace and name, as tables are):
/// the functions that are new or differ, and the ones that are gone.
pub fn delta(old: &RoutingTable, new: &RoutingTable) -> RoutingUpdate {
    let mut functions = Vec::new();
    let mut removed = Vec::new();
    let mut old_functions = old.functions.iter().peekable();
    for function in &new.functions {
        while let Some(previous) = old_functions.next_if(|p| key(p) < key(function)) {
            removed.push(reference(previous));
        }
        match old_functions.next_if(|p| key(p) == key(function)) {
            Some(previous) if previous == function => {}
            _ => functions.push(function.clone()),
        }
    }
    removed.extend(old_functions.map(reference));
    RoutingUpdate {
        version: new.version,
        base_version: old.version,
        full: false,
        region: new.region.clone(),
        functions,
        removed,
        more: false,
        trace_context: Default::default(),
        local_generation: new.local_generation,
        base_local_generation: old.local_generation,
    }
}

fn reference(function: &FunctionRoute) -> FunctionRef {
    FunctionRef {
        namespace: function.namespace.clone(),
        name: function.name.clone(),
    }
}

/// Why a whole update could not be applied to the table held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "delta applies to table {base_version}/{base_generation}, but the table held is {held}"
    )]
    BaseMismatch {
        base_version: i64,
        base_generation: u64,
        /// `version/generation`, or `none`.
        held: String,
    },
    #[error("the update names function {namespace}/{name} twice")]
    Duplicate { namespace: String, name: String },
}

/// Applies a whole update (full, or a delta whose base is exactly `held`'s version and local
/// generation) and returns the resulting table, sorted by namespace and name.
pub fn apply(
    held: Option<&RoutingTable>,
    update: RoutingUpdate,
) -> Result<RoutingTable, ApplyError> {
    let mut changed = update.functions;
    changed.sort_by(|a, b| key(a).cmp(&key(b)));
    if let Some(pair) = changed
        .windows(2)
        .find(|pair| key(&pair[0]) == key(&pair[1]))
    {
        return Err(ApplyError::Duplicate {
            namespace: pair[0].namespace.clone(),
            name: pair[0].name.clone(),
        });
    }
    let functions = if update.full {
        changed
    } else {
        let held = match held {
            Some(held)
                if held.version == update.base_version
                    && held.local_generation == update.base_local_generation =>
            {
                held
            }
            _ => {
                return Err(ApplyError::BaseMismatch {
                    base_version: update.base_version,
                    base_generation: update.base_local_generation,
                    held: held.map_or_else(
                        || "none".to_owned(),
                        |t| format!("{}/{}", t.version, t.local_generation),
                    ),
                })
            }
        };
        let gone: HashSet<(&str, &str)> = update
            .removed
            .iter()
            .map(|r| (r.namespace.as_str(), r.name.as_str()))
            .collect();
        let mut merged = Vec::with_capacity(held.functions.len() + changed.len());
        let mut changed = changed.into_iter().peekable();
        for function in &held.functions {
            while let Some(new) = changed.next_if(|c| key(c) < key(function)) {
                merged.push(new);
            }
            if let Some(new) = changed.next_if(|c| key(c) == key(function)) {
                merged.push(new);
            } else if !gone.contains(&key(function)) {
                merged.push(function.clone());
            }
        }
        merged.extend(changed);
        merged
    };
    Ok(RoutingTable {
        version: update.version,
        region: update.region,
        functions,
        local_generation: update.local_generation,
    })
}

/// Why a routing stream could not be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// The receiving end of a routing stream: parts in, whole tables out (for tools and tests that
/// follow an agent's `Watch`; the sidecar does the same in its own loop).
#[derive(Debug, Default)]
pub struct TableReceiver {
    parts: Assembler,
    table: Option<RoutingTable>,
}

impl TableReceiver {
    /// Takes the next part; returns the table once an update is complete.
    pub fn push(&mut self, part: RoutingUpdate) -> Result<Option<&RoutingTable>, ReceiveError> {
        let Some(update) = self.parts.push(part)? else {
            return Ok(None);
        };
        let table = apply(self.table.as_ref(), update)?;
        self.table = Some(table);
        Ok(self.table.as_ref())
    }

    /// The last whole table.
    pub fn table(&self) -> Option<&RoutingTable> {
        self.table.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, timeout: u32) -> FunctionRoute {
        FunctionRoute {
            namespace: "default".into(),
            name: name.into(),
            function_version: i64::from(timeout),
            ..Default::default()
        }
    }

    fn table(version: i64, generation: u64, functions: Vec<FunctionRoute>) -> RoutingTable {
        RoutingTable {
            version,
            region: "us-east".into(),
            functions,
            local_generation: generation,
        }
    }

    #[test]
    fn split_bounds_items_and_bytes_and_reassembles() {
        let functions: Vec<FunctionRoute> =
            (0..1000).map(|i| route(&format!("f{i:04}"), 1)).collect();
        let update = full(&table(7, 3, functions.clone()));
        let parts = split(
            update.clone(),
            PartLimits {
                items: 64,
                bytes: 1024,
            },
        );
        assert!(parts.len() > 1000 / 64);
        for part in &parts {
            assert!(part.functions.len() <= 64);
            let bytes: usize = part.functions.iter().map(Message::encoded_len).sum();
            assert!(bytes <= 1024 || part.functions.len() == 1, "{bytes}");
            assert_eq!((part.version, part.local_generation), (7, 3));
        }
        assert!(parts[..parts.len() - 1].iter().all(|p| p.more));
        assert!(!parts[parts.len() - 1].more);
        let mut assembler = Assembler::default();
        let mut whole = None;
        for part in parts {
            assert!(whole.is_none());
            whole = assembler.push(part).unwrap();
        }
        assert_eq!(whole.unwrap(), update);
        assert!(!assembler.is_pending());
    }

    #[test]
    fn an_oversized_function_travels_alone() {
        let mut big = route("big", 1);
        big.policy = Some(crate::v1::RoutingPolicy {
            retryable_methods: vec!["X".repeat(5000)],
            ..Default::default()
        });
        let update = full(&table(1, 0, vec![route("a", 1), big, route("c", 1)]));
        let parts = split(
            update,
            PartLimits {
                items: 10,
                bytes: 1000,
            },
        );
        let sizes: Vec<usize> = parts.iter().map(|p| p.functions.len()).collect();
        assert_eq!(sizes, vec![1, 1, 1]);
    }

    #[test]
    fn interleaved_parts_are_refused() {
        let mut assembler = Assembler::default();
        let mut first = full(&table(1, 0, vec![route("a", 1)]));
        first.more = true;
        assert_eq!(assembler.push(first).unwrap(), None);
        let second = full(&table(2, 0, vec![route("b", 1)]));
        assert_eq!(
            assembler.push(second.clone()).unwrap_err(),
            AssembleError::Interleaved { pending: 1, got: 2 }
        );
        // Starts afresh afterwards.
        assert_eq!(assembler.push(second.clone()).unwrap(), Some(second));
    }

    #[test]
    fn delta_round_trips() {
        let old = table(
            5,
            1,
            vec![route("a", 1), route("b", 1), route("c", 1), route("e", 1)],
        );
        let new = table(
            6,
            2,
            vec![route("a", 1), route("b", 2), route("d", 1), route("e", 1)],
        );
        let update = delta(&old, &new);
        let names: Vec<&str> = update.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, vec!["b", "d"]);
        let removed: Vec<&str> = update.removed.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(removed, vec!["c"]);
        assert_eq!((update.base_version, update.base_local_generation), (5, 1));
        assert_eq!(apply(Some(&old), update.clone()).unwrap(), new);
        // Against another base it is refused.
        let other = table(5, 2, old.functions.clone());
        assert!(matches!(
            apply(Some(&other), update.clone()),
            Err(ApplyError::BaseMismatch { .. })
        ));
        assert!(matches!(
            apply(None, update),
            Err(ApplyError::BaseMismatch { .. })
        ));
        // Removing everything, and adding to nothing.
        let empty = table(7, 0, vec![]);
        assert_eq!(apply(Some(&new), delta(&new, &empty)).unwrap(), empty);
        assert_eq!(apply(Some(&empty), delta(&empty, &new)).unwrap(), new);
    }

    #[test]
    fn full_updates_are_sorted_and_duplicates_refused() {
        let update = full(&table(1, 0, vec![route("b", 1), route("a", 1)]));
        let applied = apply(None, update).unwrap();
        assert_eq!(applied.functions[0].name, "a");
        let update = full(&table(1, 0, vec![route("a", 1), route("a", 2)]));
        assert!(matches!(
            apply(None, update),
            Err(ApplyError::Duplicate { .. })
        ));
    }
}
