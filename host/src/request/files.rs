//! Static files: a server's folder (`servers[].static`), answered by tower-http's
//! `ServeDir` for a GET or HEAD that no plugin route takes, then the SPA fallback for
//! navigation requests.
//!
//! `ServeDir` does the serving: `Content-Type` by extension, `Range` (206), HEAD, `ETag`
//! and `Last-Modified` with their 304s and 412s, precompressed `.br` and `.gz` siblings
//! chosen by `Accept-Encoding` (with `Vary`). This module adds what it leaves to its
//! user: which requests reach it ([`check_path`]), the index file, the fallback,
//! `Cache-Control`, and a backend ([`Confined`]) that opens nothing outside the folder,
//! whatever symlinks in it point at (`ServeDir`'s own backend follows them anywhere).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::header::{HeaderValue, ACCEPT, CACHE_CONTROL, VARY};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tower_http::services::fs::{
    Backend, DefaultServeDirFallback, ServeDir, ServeFileSystemResponseBody,
};

use super::http::{error, Body, StreamFailed};
use crate::boundary::repeats::Repeats;
use crate::control::config::{covers, StaticSite};
use crate::operations::recording::ServerMeter;

mod cache;

use cache::{Cache, Keep, Opened as OpenedFile};

/// A server's static files, as configured: built once per config change, shared by
/// every request.
pub struct Site {
    pub config: StaticSite,
    dir: ServeDir<DefaultServeDirFallback, Confined>,
    /// `dir`'s backend, for a `ServeDir` that says which file it read.
    backend: Confined,
    /// Files kept in memory; `None` with `cache_mb` 0.
    cache: Option<Cache>,
    /// Where its hits are counted.
    meter: &'static ServerMeter,
    /// For files other than HTML.
    cache_control: HeaderValue,
    /// The index file's name as it goes in a URL path.
    index: Option<String>,
    /// The fallback file's URL path.
    fallback: Option<Uri>,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("config", &self.config)
            .finish()
    }
}

impl Site {
    pub fn new(server: &Arc<str>, config: &StaticSite, meter: &'static ServerMeter) -> Arc<Site> {
        let backend = Confined {
            root: config.root.as_path().into(),
            server: server.clone(),
            refusals: Arc::default(),
            opened: None,
        };
        let dir = serve_dir(config, backend.clone());
        let cache_control = match config.max_age_s {
            0 => HeaderValue::from_static("no-cache"),
            n => HeaderValue::try_from(format!("max-age={n}"))
                .unwrap_or(HeaderValue::from_static("no-cache")),
        };
        // `ServeDir` decodes the path it is given; the config's names may hold any
        // character.
        let encode = |path: &str| utf8_percent_encode(path, IN_PATH).to_string();
        Arc::new(Site {
            config: config.clone(),
            dir,
            backend,
            cache: Cache::new(config.cache_bytes),
            meter,
            cache_control,
            index: config.index.as_deref().map(encode),
            fallback: config
                .spa_fallback
                .as_deref()
                .and_then(|file| Uri::try_from(format!("/{}", encode(file))).ok()),
        })
    }

    /// The answer to `parts` from the files kept in memory, if it can be given from
    /// there (see `files/cache.rs`): no allocation but the response's, one `stat`.
    pub fn cached(&self, parts: &Parts) -> Option<Response<Body>> {
        let response = self.cache.as_ref()?.answer(parts)?;
        self.meter.static_cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(response)
    }

    /// What the cache counts as held: bodies, keys and headers, and a little more each.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.as_ref().map_or(0, Cache::bytes)
    }

    /// Opens the file `request` names (under the request timeout), and keeps it in
    /// memory if `keep` says how and it may be.
    async fn open(&self, request: Request<()>, timeout: Duration, keep: Option<Keep>) -> Opened {
        let html = is_html(request.uri().path());
        let read = async {
            match keep {
                None => Ok(self.finish(self.dir.clone().try_call(request).await?, html)),
                Some(keep) => self.open_to_keep(request, keep, html).await,
            }
        };
        match tokio::time::timeout(timeout, read).await {
            Err(_) => Opened::Failed(error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!("the file did not open within {} ms", timeout.as_millis()),
            )),
            Ok(Ok(response)) if response.status() == StatusCode::NOT_FOUND => Opened::Missing,
            Ok(Ok(response)) => Opened::Found(response),
            Ok(Err(e)) if is_missing(&e) => Opened::Missing,
            Ok(Err(e)) => {
                tracing::error!(root = %self.config.root.display(), "cannot read a static file: {e}");
                Opened::Failed(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the file could not be read",
                ))
            }
        }
    }

    /// [`Site::open`] for a request the cache may keep: `ServeDir` with a backend that
    /// notes the file it read the body from, and the body read whole if the file is
    /// small enough to keep.
    async fn open_to_keep(
        &self,
        request: Request<()>,
        keep: Keep,
        html: bool,
    ) -> io::Result<Response<Body>> {
        let cache = self.cache.as_ref().expect("only a site with a cache keeps");
        let opened = Arc::new(Mutex::new(None));
        let backend = Confined {
            opened: Some(opened.clone()),
            ..self.backend.clone()
        };
        let response = serve_dir(&self.config, backend).try_call(request).await?;
        let response = self.finish(response, html);
        let read = opened.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(read) =
            read.filter(|read| response.status() == StatusCode::OK && cache.may_keep(&keep, read))
        else {
            return Ok(response);
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
        cache.keep(keep, read, &parts.headers, &body);
        Ok(Response::from_parts(parts, Body::bytes(body)))
    }

    /// `ServeDir`'s response with the site's caching rules: HTML is revalidated every
    /// time (a new deploy is seen at once, for a 304 when nothing changed), other files
    /// are kept for `max_age_s`.
    fn finish(
        &self,
        response: Response<ServeFileSystemResponseBody>,
        html: bool,
    ) -> Response<Body> {
        let mut response = response.map(|body| Body::File(Box::new(FileBody(body))));
        let status = response.status();
        let headers = response.headers_mut();
        if matches!(
            status,
            StatusCode::OK | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
        ) {
            let cache_control = if html {
                HeaderValue::from_static("no-cache")
            } else {
                self.cache_control.clone()
            };
            headers.insert(CACHE_CONTROL, cache_control);
        }
        // A 304 stands for the response it replaces, which varies by encoding.
        if status == StatusCode::NOT_MODIFIED {
            headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
        }
        response
    }
}

/// What opening a file came to.
enum Opened {
    Found(Response<Body>),
    /// No such file in the folder (or one refused for being outside it).
    Missing,
    Failed(Response<Body>),
}

/// What answers a request that no file answers.
pub enum Otherwise {
    /// The host's 404: no route and no file.
    NotFound,
    /// The server's plugin is not available (its 503).
    Unavailable(Response<Body>),
}

/// Answers a GET or HEAD from the site: the file the path names (a path ending in `/`:
/// its index file), else the SPA fallback for a navigation request, else `otherwise`.
/// A path that could name something outside the folder is refused with 400.
pub async fn serve(
    site: Arc<Site>,
    parts: Parts,
    otherwise: Otherwise,
    timeout: Duration,
) -> Response<Body> {
    if let Err(why) = check_path(parts.uri.path()) {
        return error(StatusCode::BAD_REQUEST, &why);
    }
    let fallback = site
        .fallback
        .as_ref()
        .filter(|_| is_navigation(&parts) && !site.config.excepts(parts.uri.path()))
        .map(|uri| {
            // A copy of the request for the fallback file: only navigation requests
            // (pages, not their assets) pay for it.
            let mut request = Request::new(());
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = parts.headers.clone();
            request
        });
    let keep = site
        .cache
        .as_ref()
        .and_then(|cache| cache.wants(&parts, || site.file_for(parts.uri.path())));
    let (method, uri) = (parts.method.clone(), parts.uri.clone());
    let mut request = Request::from_parts(parts, ());
    if let Some(index) = site.index.as_deref().filter(|_| uri.path().ends_with('/')) {
        match Uri::try_from(format!("{}{index}", uri.path())) {
            Ok(with_index) => *request.uri_mut() = with_index,
            Err(_) => return error(StatusCode::BAD_REQUEST, "invalid path"),
        }
    }
    match site.open(request, timeout, keep).await {
        Opened::Found(response) | Opened::Failed(response) => return response,
        Opened::Missing => {}
    }
    if let Some(request) = fallback {
        match site.open(request, timeout, None).await {
            Opened::Found(response) | Opened::Failed(response) => return response,
            Opened::Missing => {}
        }
    }
    match otherwise {
        Otherwise::NotFound => {
            let message = format!("no route or file for {method} {}", uri.path());
            error(StatusCode::NOT_FOUND, &message)
        }
        Otherwise::Unavailable(response) => response,
    }
}

/// The `ServeDir` of a site: `backend` under its root, with its index and the
/// precompressed siblings.
fn serve_dir(
    config: &StaticSite,
    backend: Confined,
) -> ServeDir<DefaultServeDirFallback, Confined> {
    ServeDir::with_backend(&config.root, backend)
        .append_index_html_on_directories(config.index.is_some())
        .precompressed_br()
        .precompressed_gzip()
}

impl Site {
    /// The file a URL path (checked by [`check_path`]) names below the root, the index
    /// file for one that ends in `/`; `None` if it names none.
    fn file_for(&self, path: &str) -> Option<PathBuf> {
        let decoded = percent_decode_str(path).decode_utf8().ok()?;
        let mut file = self.config.root.clone();
        file.extend(decoded.split('/').filter(|segment| !segment.is_empty()));
        if path.ends_with('/') {
            file.push(self.config.index.as_deref()?);
        }
        Some(file)
    }
}

/// What is percent-encoded in a path made from a file name: all but letters, digits,
/// `/` and the unreserved marks.
const IN_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Refuses a path that could name something outside the folder, or that names no file
/// at all: a segment that is `..` or `.` (encoded or not), an encoded `/` inside a
/// segment, a backslash or NUL anywhere, or bytes that do not decode to UTF-8.
pub fn check_path(path: &str) -> Result<(), String> {
    for segment in path.split('/') {
        let decoded = percent_decode_str(segment)
            .decode_utf8()
            .map_err(|_| format!("the path {path:?} is not UTF-8"))?;
        if decoded == ".." || decoded == "." {
            return Err(format!("the path {path:?} has a `{decoded}` segment"));
        }
        if decoded.contains(['/', '\\', '\0']) {
            return Err(format!(
                "the path {path:?} has an encoded `/`, a backslash or a NUL"
            ));
        }
    }
    Ok(())
}

impl StaticSite {
    /// Whether `path` is under one of the prefixes the fallback leaves alone.
    fn excepts(&self, path: &str) -> bool {
        self.fallback_except
            .iter()
            .any(|prefix| covers(prefix, path))
    }
}

/// A request for a page, as a browser makes when it navigates: a GET or HEAD that
/// accepts `text/html`.
fn is_navigation(parts: &Parts) -> bool {
    (parts.method == Method::GET || parts.method == Method::HEAD)
        && parts.headers.get_all(ACCEPT).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value.split(',').any(|range| {
                    let media = range.split(';').next().unwrap_or_default();
                    media.trim().eq_ignore_ascii_case("text/html")
                })
            })
        })
}

fn is_html(path: &str) -> bool {
    Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm"))
}

/// An error that means there is no file to serve: missing, unreadable, a path through a
/// file (`ENOTDIR`), a name the system refuses (too long, a NUL) or a symlink loop.
fn is_missing(e: &io::Error) -> bool {
    #[cfg(unix)]
    let refused_name = matches!(
        e.raw_os_error(),
        Some(libc::ENAMETOOLONG | libc::ELOOP | libc::ENOTDIR)
    );
    #[cfg(not(unix))]
    let refused_name = false;
    refused_name
        || matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput
        )
}

/// A file's body as `ServeDir` streams it (boxed in [`Body::File`]).
pub struct FileBody(ServeFileSystemResponseBody);

impl FileBody {
    // Kept out of the request path's code, like a plugin's stream.
    #[cold]
    #[inline(never)]
    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailed>>> {
        Pin::new(&mut self.0)
            .poll_frame(cx)
            .map_err(|e| StreamFailed::new(format!("reading the file failed: {e}")))
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// `ServeDir`'s file system, kept inside the folder: a file (or folder) is used only if
/// its real path, symlinks resolved, lies under the folder's real path, and the file
/// opened is the one at that real path (so a symlink swapped in meanwhile gains
/// nothing). Anything else is "not found". The folder's own path is resolved on every
/// look, so a `root` that is a symlink may be repointed (a deploy) while serving. Only
/// regular files are opened (never blocking: a FIFO would hold a thread).
#[derive(Clone)]
struct Confined {
    root: Arc<Path>,
    server: Arc<str>,
    refusals: Arc<Repeats<()>>,
    /// Where to note the last file opened, and its metadata (read from its descriptor).
    opened: Option<Arc<Noted>>,
}

/// The file a [`Confined`] opened last, and its metadata.
type Noted = Mutex<Option<OpenedFile>>;

type Boxed<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

impl Backend for Confined {
    type File = ConfinedFile;
    type Metadata = std::fs::Metadata;
    type OpenFuture = Boxed<ConfinedFile>;
    type MetadataFuture = Boxed<std::fs::Metadata>;

    fn open(&self, path: PathBuf) -> Self::OpenFuture {
        let this = self.clone();
        Box::pin(async move {
            let noted = this.opened.clone().map(|opened| (opened, path.clone()));
            let at = std::time::SystemTime::now();
            let (file, meta) = this.inside(path, false).await?;
            if let Some((opened, path)) = noted {
                let meta = meta.clone();
                *opened.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(OpenedFile { path, meta, at });
            }
            Ok(ConfinedFile {
                file: tokio::fs::File::from_std(file),
                meta,
            })
        })
    }

    fn metadata(&self, path: PathBuf) -> Self::MetadataFuture {
        let this = self.clone();
        Box::pin(async move { Ok(this.inside(path, true).await?.1) })
    }
}

impl Confined {
    /// Opens `path` (on the blocking pool) if it is a regular file inside the folder, or
    /// a folder inside it when `folders` is true.
    async fn inside(
        self,
        path: PathBuf,
        folders: bool,
    ) -> io::Result<(std::fs::File, std::fs::Metadata)> {
        tokio::task::spawn_blocking(move || self.open_inside(&path, folders))
            .await
            .map_err(io::Error::other)?
    }

    fn open_inside(
        &self,
        path: &Path,
        folders: bool,
    ) -> io::Result<(std::fs::File, std::fs::Metadata)> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
        let file = options.open(path)?;
        let meta = file.metadata()?;
        if !(meta.is_file() || folders && meta.is_dir()) {
            return Err(io::ErrorKind::NotFound.into());
        }
        let root = self.root.canonicalize()?;
        let real = path.canonicalize()?;
        if !real.starts_with(&root) {
            self.refused(path, &real);
            return Err(io::ErrorKind::NotFound.into());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let there = std::fs::symlink_metadata(&real)?;
            if (there.dev(), there.ino()) != (meta.dev(), meta.ino()) {
                self.refused(path, &real);
                return Err(io::ErrorKind::NotFound.into());
            }
        }
        Ok((file, meta))
    }

    /// Logs a refusal: the first in 5 s, then a count.
    fn refused(&self, path: &Path, real: &Path) {
        let line = || format!("{} is {}", path.display(), real.display());
        let server = self.server.clone();
        let summary = move |n: u64, last: &str| {
            tracing::warn!(%server, "refused {n} more static files outside the folder in the last 5 s; the last: {last}");
        };
        if self.refusals.first((), line, summary) {
            tracing::warn!(server = %self.server, root = %self.root.display(), "refused a static file outside the folder (a symlink out of it?): {}", line());
        }
    }
}

/// A file [`Confined`] opened, with the metadata it checked.
struct ConfinedFile {
    file: tokio::fs::File,
    meta: std::fs::Metadata,
}

impl tokio::io::AsyncRead for ConfinedFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncSeek for ConfinedFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

impl tower_http::services::fs::File for ConfinedFile {
    type Metadata = std::fs::Metadata;
    type MetadataFuture<'a> = std::future::Ready<io::Result<std::fs::Metadata>>;

    fn metadata(&self) -> Self::MetadataFuture<'_> {
        std::future::ready(Ok(self.meta.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_could_leave_the_folder_are_refused() {
        for bad in [
            "/../secret",
            "/a/%2e%2e/secret",
            "/%2E%2e/secret",
            "/a/..%2fsecret",
            "/a%2f..%2f..%2fsecret",
            "/a%5c..%5csecret",
            "/a\\..\\secret",
            "/secret%00.html",
            "/./index.html",
            "/%ff",
        ] {
            assert!(check_path(bad).is_err(), "{bad} was let through");
        }
        for good in [
            "/",
            "/index.html",
            "/a/b.c/d",
            "/with%20space",
            "/a..b",
            "//x",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn fallback_exceptions_cover_whole_segments() {
        let site = StaticSite {
            root: PathBuf::from("/"),
            index: None,
            spa_fallback: None,
            fallback_except: vec!["/api".to_owned()],
            max_age_s: 0,
            cache_bytes: 0,
        };
        assert!(site.excepts("/api"));
        assert!(site.excepts("/api/users"));
        assert!(!site.excepts("/apiary"));
        assert!(!site.excepts("/"));
    }
}
