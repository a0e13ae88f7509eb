//! Paged reads of the API: page sizes and page tokens. A listing is cut into pages by count and
//! by encoded size, so no answer grows with the number of functions, and every page of one
//! listing reads the same version (an etcd revision, or a routing table's version), which the
//! token carries along with the last function the previous page held.

use std::fmt;

use tonic::Status;

use crate::spec::FunctionKey;

/// Functions per page when the request does not say.
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// The most a request may ask for.
pub const MAX_PAGE_SIZE: usize = 5000;
/// A page ends early once its functions reach about this many encoded bytes, half the 4 MiB
/// most gRPC clients accept.
pub const PAGE_BYTES: usize = 2 * 1024 * 1024;

/// The page size a request asks for, checked.
pub fn page_size(requested: u32) -> Result<usize, Status> {
    match usize::try_from(requested).unwrap_or(usize::MAX) {
        0 => Ok(DEFAULT_PAGE_SIZE),
        size if size <= MAX_PAGE_SIZE => Ok(size),
        size => Err(Status::invalid_argument(format!(
            "pageSize: {size} is more than the limit of {MAX_PAGE_SIZE}"
        ))),
    }
}

/// Where the next page of a listing starts: the version the listing reads and the last
/// function the previous page held. Opaque to clients; written `<version>:<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageToken {
    pub version: i64,
    pub after: FunctionKey,
}

impl fmt::Display for PageToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.version, self.after.namespace, self.after.name
        )
    }
}

impl PageToken {
    /// Parses a request's `page_token`; `None` for the first page.
    pub fn parse(token: &str) -> Result<Option<Self>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || {
            Status::invalid_argument(format!(
                "pageToken: {token:?} is not a token this API handed out; start from the first page"
            ))
        };
        let (version, key) = token.split_once(':').ok_or_else(bad)?;
        let version: i64 = version.parse().map_err(|_| bad())?;
        let (namespace, name) = key.split_once('/').ok_or_else(bad)?;
        if version <= 0 {
            return Err(bad());
        }
        let after = FunctionKey::parse(namespace, name).map_err(|_| bad())?;
        Ok(Some(Self { version, after }))
    }
}

/// Collects one page: items are taken while the page has room in count and bytes (the first
/// item always fits). `cut` says whether the page ended before the items did.
#[derive(Debug)]
pub struct PageBuilder<T> {
    pub items: Vec<T>,
    size: usize,
    bytes: usize,
    pub cut: bool,
}

impl<T> PageBuilder<T> {
    pub fn new(size: usize) -> Self {
        Self {
            items: Vec::new(),
            size,
            bytes: 0,
            cut: false,
        }
    }

    /// Adds an item of `bytes` encoded bytes; false (and the item is not added) once full.
    pub fn push(&mut self, item: T, bytes: usize) -> bool {
        if !self.items.is_empty()
            && (self.items.len() >= self.size || self.bytes + bytes > PAGE_BYTES)
        {
            self.cut = true;
            return false;
        }
        self.bytes += bytes;
        self.items.push(item);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_name_the_field() {
        let token = PageToken {
            version: 42,
            after: FunctionKey::parse("team-a", "f-1").unwrap(),
        };
        assert_eq!(token.to_string(), "42:team-a/f-1");
        assert_eq!(PageToken::parse(&token.to_string()).unwrap(), Some(token));
        assert_eq!(PageToken::parse("").unwrap(), None);
        for bad in ["x", "1:", "a:b/c", "0:a/b", "5:a", "5:A/b", "5:a/b/c"] {
            let status = PageToken::parse(bad).unwrap_err();
            assert!(status.message().starts_with("pageToken: "), "{bad}");
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7).unwrap(), 7);
        assert!(page_size(5001)
            .unwrap_err()
            .message()
            .starts_with("pageSize: "));
    }

    #[test]
    fn pages_end_at_the_count_or_the_bytes() {
        let mut page = PageBuilder::new(2);
        assert!(page.push(1, 10) && page.push(2, 10));
        assert!(!page.push(3, 10));
        assert!(page.cut);
        let mut page = PageBuilder::new(100);
        assert!(page.push(1, PAGE_BYTES + 1), "the first item always fits");
        assert!(!page.push(2, 1));
    }
}
