//! A static site's files kept in memory (`servers[].static.cache_mb`): a file asked for
//! again is answered at once, on the request's thread, with one `stat`, instead of
//! `ServeDir`'s trips to the blocking pool (a look at the path, an open, then a read per
//! 64 KiB), which cost several times what the answer itself does.
//!
//! - **What is kept**: the response `ServeDir` made for a `GET` with no `Range` and no
//!   precondition that came out `200`, headers and body, for a file of at most
//!   [`MAX_FILE`] whose last change was at least [`SETTLED`] before it was opened (a file
//!   still being written is not kept; an answer that will not be kept is streamed as
//!   usual, never read whole). It is keyed by the request's path as sent and its
//!   `Accept-Encoding` value as sent (so the precompressed sibling `ServeDir` chose is
//!   chosen again), with the file's identity read from the very descriptor `ServeDir`
//!   read the body from: device, inode, size, modification and change times.
//! - **When it answers**: a `GET` or `HEAD` whose path and `Accept-Encoding` (at most one
//!   such header) match an entry, with no `Range`, `If-Range`, `If-Match` or
//!   `If-Unmodified-Since`, and no `If-Modified-Since` unless an `If-None-Match` comes
//!   with it (which then decides, as in `ServeDir`: 304 when a tag matches). First it
//!   looks the file up again by its path (a `stat`, which follows symlinks as the open
//!   did): any difference in the identity (a write, a `chmod`, a file renamed over it, a
//!   symlink pointed elsewhere) drops the entry and the request goes to `ServeDir`,
//!   which checks the folder and keeps the new file. An entry whose request sent an
//!   `Accept-Encoding` also checks the identity of the file's folder, which changes
//!   when a precompressed sibling is added or removed there.
//! - **Bounds**: at most the site's budget in bodies, keys and headers (plus
//!   [`OVERHEAD`] per entry for the rest); an entry that does not fit makes room by
//!   dropping others, in no particular order; at most [`VARIANTS`] `Accept-Encoding`
//!   values per path, each at most [`MAX_ACCEPT_ENCODING`] bytes and copied (a request's
//!   value may be a slice of its connection's read buffer, which it would keep alive). A
//!   change to the server's `static` settings builds a new site, with an empty cache.
//! - **What it does not see**: a change that leaves the file's inode and times as they
//!   were (a file system whose timestamps are coarser than a second, such as FAT, or
//!   an NFS client's cached attributes), and folders moved out of the root and linked
//!   back in (the file is the same file, unchanged, that was served at that path; a
//!   file not kept yet is refused there). Set `cache_mb` to 0 for such a root.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT_ENCODING, CACHE_CONTROL, ETAG, IF_MATCH, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE, VARY,
};
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::request::http::Body;

/// The largest file kept.
pub const MAX_FILE: u64 = 1 << 20;
/// How long ago a file must have last changed to be kept: one changed more recently may
/// still be being written, or change again within the file system's clock tick.
pub const SETTLED: Duration = Duration::from_secs(1);
/// What an entry counts for besides its body, key and headers (its file's paths and the
/// structures that hold it).
const OVERHEAD: u64 = 512;
/// The longest `Accept-Encoding` value an entry is kept for (browsers send about 30
/// bytes).
const MAX_ACCEPT_ENCODING: usize = 128;
/// The most `Accept-Encoding` values kept for one path.
const VARIANTS: usize = 8;

pub struct Cache {
    budget: u64,
    kept: RwLock<Kept>,
}

#[derive(Default)]
struct Kept {
    by_path: FxHashMap<Box<str>, SmallVec<[Arc<Entry>; 2]>>,
    bytes: u64,
}

/// One file's response, as `ServeDir` made it for one `Accept-Encoding` value.
pub struct Entry {
    /// The length of its path and `Accept-Encoding`, for its size.
    key_bytes: u64,
    accept_encoding: Option<HeaderValue>,
    /// The file the body was read from (a precompressed sibling's, if it was chosen).
    file: PathBuf,
    identity: Identity,
    /// The file's folder and its identity, when the request sent an `Accept-Encoding`.
    folder: Option<(PathBuf, Identity)>,
    headers: HeaderMap,
    body: Bytes,
}

/// What tells one version of a file (or folder) from another.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Identity {
    pub fn of(meta: &Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Looks `path` up again (following symlinks).
    fn now(path: &std::path::Path) -> Option<Identity> {
        std::fs::metadata(path).ok().map(|meta| Identity::of(&meta))
    }

    /// Whether its last change (of contents or of anything else) was at least
    /// [`SETTLED`] before `at`.
    pub fn settled(&self, at: SystemTime) -> bool {
        let Ok(now) = at.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let at = |(secs, nanos): (i64, i64)| {
            u64::try_from(secs)
                .ok()
                .map(|secs| Duration::new(secs, nanos.clamp(0, 999_999_999) as u32))
        };
        [self.modified, self.changed]
            .into_iter()
            .all(|t| at(t).is_some_and(|t| t + SETTLED <= now))
    }
}

/// The file a kept answer is read from, as `Confined` noted it when it opened it.
pub struct Opened {
    pub path: PathBuf,
    /// Read from the open descriptor, before the body.
    pub meta: Metadata,
    /// When, a moment before the metadata was read.
    pub at: SystemTime,
}

/// What a request that may be kept brings to [`Cache::keep`], found before the file is
/// opened.
pub struct Keep {
    pub path: Box<str>,
    pub accept_encoding: Option<HeaderValue>,
    /// With an `Accept-Encoding`: the folder the file is in, and its identity.
    pub folder: Option<(PathBuf, Identity)>,
}

impl Cache {
    pub fn new(budget: u64) -> Option<Cache> {
        (budget > 0).then(|| Cache {
            budget,
            kept: RwLock::default(),
        })
    }

    /// What it holds: bodies, keys and headers, and [`OVERHEAD`] per entry.
    pub fn bytes(&self) -> u64 {
        self.kept.read().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// The largest body this cache keeps.
    pub fn max_file(&self) -> u64 {
        MAX_FILE.min(self.budget.saturating_sub(OVERHEAD))
    }

    /// The `Accept-Encoding` a request's entry is keyed by, if the request is one the
    /// cache may answer (see the module's notes): `Some(None)` for none sent.
    fn usable(parts: &Parts) -> Option<Option<&HeaderValue>> {
        if parts.method != Method::GET && parts.method != Method::HEAD {
            return None;
        }
        let h = &parts.headers;
        let if_none_match = h.get(IF_NONE_MATCH).is_some_and(|v| !v.is_empty());
        if h.contains_key(RANGE)
            || h.contains_key(IF_RANGE)
            || h.contains_key(IF_MATCH)
            || h.contains_key(IF_UNMODIFIED_SINCE)
            || !if_none_match && h.contains_key(IF_MODIFIED_SINCE)
        {
            return None;
        }
        let mut encodings = h.get_all(ACCEPT_ENCODING).iter();
        let first = encodings.next();
        encodings.next().is_none().then_some(first)
    }

    /// What a `GET` that could be kept needs to be kept, or `None` if it cannot be:
    /// `path` is its path as sent, `file` the file it names below the root.
    pub fn wants(&self, parts: &Parts, file: impl FnOnce() -> Option<PathBuf>) -> Option<Keep> {
        if parts.method != Method::GET
            || parts.headers.contains_key(IF_NONE_MATCH)
            || parts.headers.contains_key(IF_MODIFIED_SINCE)
        {
            return None;
        }
        // A copy: the request's value may be a slice of the connection's read buffer.
        let accept_encoding = match Cache::usable(parts)? {
            None => None,
            Some(v) if v.len() <= MAX_ACCEPT_ENCODING => {
                Some(HeaderValue::from_bytes(v.as_bytes()).ok()?)
            }
            Some(_) => return None,
        };
        let folder = match accept_encoding {
            None => None,
            Some(_) => {
                let folder = file()?.parent()?.to_path_buf();
                let at = SystemTime::now();
                let identity = Identity::now(&folder).filter(|i| i.settled(at))?;
                Some((folder, identity))
            }
        };
        Some(Keep {
            path: parts.uri.path().into(),
            accept_encoding,
            folder,
        })
    }

    /// The kept answer to `parts`, if there is one and its file is still the one read.
    pub fn answer(&self, parts: &Parts) -> Option<Response<Body>> {
        let accept_encoding = Cache::usable(parts)?;
        let entry = {
            let kept = self.kept.read().unwrap_or_else(|e| e.into_inner());
            let variants = kept.by_path.get(parts.uri.path())?;
            variants
                .iter()
                .find(|e| e.accept_encoding.as_ref() == accept_encoding)?
                .clone()
        };
        let current = Identity::now(&entry.file) == Some(entry.identity)
            && entry
                .folder
                .as_ref()
                .is_none_or(|(folder, identity)| Identity::now(folder) == Some(*identity));
        if !current {
            self.forget(parts.uri.path(), &entry);
            return None;
        }
        let head = parts.method == Method::HEAD;
        Some(entry.respond(head, parts.headers.get(IF_NONE_MATCH)))
    }

    /// Whether the answer read from `opened` may be kept: small enough, in the folder
    /// looked at, and settled when it was opened. Asked before the body is read, so an
    /// answer that will not be kept is streamed as usual.
    pub fn may_keep(&self, keep: &Keep, opened: &Opened) -> bool {
        let folder_matches = keep
            .folder
            .as_ref()
            .is_none_or(|(folder, _)| opened.path.parent() == Some(folder.as_path()));
        opened.meta.len() <= self.max_file()
            && folder_matches
            && Identity::of(&opened.meta).settled(opened.at)
    }

    /// Keeps `headers` and `body`, read from `opened` (see [`Cache::may_keep`]), if the
    /// body is the whole file.
    pub fn keep(&self, keep: Keep, opened: Opened, headers: &HeaderMap, body: &Bytes) {
        if body.len() as u64 != opened.meta.len() {
            return;
        }
        let entry = Arc::new(Entry {
            key_bytes: (keep.path.len() + keep.accept_encoding.as_ref().map_or(0, |v| v.len()))
                as u64,
            accept_encoding: keep.accept_encoding,
            identity: Identity::of(&opened.meta),
            file: opened.path,
            folder: keep.folder,
            headers: headers.clone(),
            body: body.clone(),
        });
        let size = entry.size();
        let mut kept = self.kept.write().unwrap_or_else(|e| e.into_inner());
        let kept = &mut *kept;
        if let Some(variants) = kept.by_path.get_mut(&keep.path) {
            let before = variants.len();
            let mut freed = 0;
            variants.retain(|e| {
                let same = e.accept_encoding == entry.accept_encoding;
                if same {
                    freed += e.size();
                }
                !same
            });
            if variants.len() == before && variants.len() >= VARIANTS {
                freed += variants.remove(0).size();
            }
            kept.bytes -= freed;
        }
        while kept.bytes + size > self.budget {
            let Some(path) = kept.by_path.keys().next().cloned() else {
                break;
            };
            if let Some(variants) = kept.by_path.remove(&path) {
                kept.bytes -= variants.iter().map(|e| e.size()).sum::<u64>();
            }
        }
        kept.bytes += size;
        kept.by_path.entry(keep.path).or_default().push(entry);
    }

    /// Drops `entry`, found out of date.
    fn forget(&self, path: &str, entry: &Arc<Entry>) {
        let mut kept = self.kept.write().unwrap_or_else(|e| e.into_inner());
        let kept = &mut *kept;
        let Some(variants) = kept.by_path.get_mut(path) else {
            return;
        };
        let before = variants.len();
        variants.retain(|e| !Arc::ptr_eq(e, entry));
        if variants.len() < before {
            kept.bytes -= entry.size();
        }
        if variants.is_empty() {
            kept.by_path.remove(path);
        }
    }
}

impl Entry {
    /// What it counts for in the budget: its body, its key, its headers and a little
    /// more for the rest.
    fn size(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        self.body.len() as u64 + self.key_bytes + headers as u64 + OVERHEAD
    }

    /// The kept response, or its 304 when a tag in `if_none_match` matches its `ETag`
    /// (weak comparison, `*` matching any), with the headers `ServeDir` and the site
    /// give a 304.
    fn respond(&self, head: bool, if_none_match: Option<&HeaderValue>) -> Response<Body> {
        let etag = self.headers.get(ETAG);
        if let (Some(tags), Some(etag)) = (if_none_match.filter(|v| !v.is_empty()), etag) {
            if matches_weakly(tags.as_bytes(), etag.as_bytes()) {
                let mut response = Response::new(Body::empty());
                *response.status_mut() = StatusCode::NOT_MODIFIED;
                let headers = response.headers_mut();
                headers.insert(ETAG, etag.clone());
                for name in [LAST_MODIFIED, CACHE_CONTROL] {
                    if let Some(value) = self.headers.get(&name) {
                        headers.insert(name, value.clone());
                    }
                }
                headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
                return response;
            }
        }
        let body = match head {
            true => Body::empty(),
            false => Body::bytes(self.body.clone()),
        };
        let mut response = Response::new(body);
        *response.headers_mut() = self.headers.clone();
        response
    }
}

/// Whether the `If-None-Match` list `tags` holds `etag`, compared weakly (a `W/` on
/// either side ignored), or is `*`.
fn matches_weakly(tags: &[u8], etag: &[u8]) -> bool {
    fn weak(tag: &[u8]) -> &[u8] {
        tag.strip_prefix(b"W/").unwrap_or(tag)
    }
    if tags == b"*" {
        return true;
    }
    let etag = weak(etag);
    // Commas inside a quoted tag do not separate.
    let mut quoted = false;
    tags.split(|&b| {
        quoted ^= b == b'"';
        b == b',' && !quoted
    })
    .any(|tag| weak(tag.trim_ascii()) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_lists_are_compared_weakly() {
        let etag = b"\"5f.0000000a-400\"";
        for (tags, matches) in [
            (&b"\"5f.0000000a-400\""[..], true),
            (b"W/\"5f.0000000a-400\"", true),
            (b"\"other\", \"5f.0000000a-400\"", true),
            (b"\"a,b\",W/\"5f.0000000a-400\" ", true),
            (b"*", true),
            (b"\"5f.0000000a-401\"", false),
            (b"\"other\"", false),
            (b"\"5f.0000000a-400\"x", false),
            (b"\"a,\"5f.0000000a-400\"\"", false),
            (b"", false),
        ] {
            let tags_text = String::from_utf8_lossy(tags);
            assert_eq!(matches_weakly(tags, etag), matches, "{tags_text}");
        }
    }
}
