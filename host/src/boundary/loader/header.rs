//! Checks a plugin library's abi_stable header before anything in it is read or called.
//!
//! abi_stable trusts the `LibHeader` a library exports: it turns its `RStr`s into `&str`s,
//! calls its function pointers and locks its mutex. A header corrupted on disk (one
//! length field) made the host allocate a terabyte or read unmapped memory and die. So
//! the loader reads the header through its own `#[repr(C)]` mirror of abi_stable 0.11's
//! layout (a unit test pins the mirror to the real types) and checks that every string
//! lies, with a bounded length and as valid UTF-8, inside the library's own readable
//! segments, and that every function pointer abi_stable calls before the plugin's
//! constructor lies inside the library's own executable segments.
//!
//! The layout of abi_stable 0.11.3 (`library/lib_header.rs`, `root_mod_trait.rs`,
//! `c_abi_testing/functions.rs`, `sabi_types/late_static_ref.rs`,
//! `external_types/parking_lot/mutex.rs`, `prefix_type.rs`):
//!
//! ```text
//! LibHeader {
//!     header: AbiHeader { magic_string: [u8; 32], abi_major: u32, abi_minor: u32 },
//!     root_mod_consts: RootModuleConsts {
//!         base_name: RStr, name: RStr, version_strings: VersionStrings(RStr),
//!         layout: IsLayoutChecked (repr(u8): Yes(&TypeLayout) = 0, No = 1),
//!         c_abi_testing_fns: &CAbiTestingFns (15 extern "C" fns),
//!     },
//!     init_globals_with: extern "C" fn(&Globals),
//!     module: LateStaticRef { pointer: AtomicPtr, lock: RMutex<()> {
//!         raw_mutex: a usize-sized parking_lot RawMutex (0 = unlocked),
//!         vtable: PrefixRef to WithMetadata { accessibility: u64, layout: &_,
//!             lock, try_lock, unlock, try_lock_for } } },
//!     constructor: extern "C" fn() -> RootModuleResult,
//! }
//! ```
#![allow(unsafe_code)]

use std::mem::size_of;

use abi_stable::library::AbiHeader;
use abi_stable::std_types::RStr;
use abi_stable::type_layout::TypeLayout;

/// The longest string the loader reads from a library's header or root module.
pub(super) const MAX_TEXT: usize = 4096;

/// An `RStr` (an `RSlice<u8>`: pointer, length).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawStr {
    pub ptr: usize,
    pub len: usize,
}

impl RawStr {
    /// The raw parts of an `RStr`, without reading what it points to.
    pub fn of(s: RStr<'_>) -> RawStr {
        RawStr {
            ptr: s.as_ptr() as usize,
            len: s.len(),
        }
    }
}

/// `abi_stable::library::AbiHeader`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct RawAbiHeader {
    pub magic_string: [u8; 32],
    pub abi_major: u32,
    pub abi_minor: u32,
}

/// `abi_stable::library::IsLayoutChecked`: a `repr(u8)` enum whose `Yes` variant (tag 0)
/// holds a `&'static TypeLayout`; `No` is tag 1.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct RawLayoutChecked {
    pub tag: u8,
    pub layout: usize,
}

const LAYOUT_CHECKED_YES: u8 = 0;
const LAYOUT_CHECKED_NO: u8 = 1;

/// `abi_stable::library::RootModuleConsts`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct RawRootModuleConsts {
    pub base_name: RawStr,
    pub name: RawStr,
    pub version: RawStr,
    pub layout: RawLayoutChecked,
    pub c_abi_testing_fns: usize,
}

/// `abi_stable::library::CAbiTestingFns`: fifteen `extern "C"` functions that
/// `AbiHeaderRef::upgrade` calls.
pub(super) type RawCAbiTestingFns = [usize; 15];

/// `abi_stable::sabi_types::LateStaticRef<_>`: the pointer, then an `RMutex<()>` (a
/// usize-sized raw mutex, `()` and a pointer to its vtable).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct RawLateStaticRef {
    pub pointer: usize,
    pub lock_state: usize,
    pub lock_vtable: usize,
}

/// What an `RMutex`'s vtable pointer points at: a prefix type's `WithMetadata` (the
/// field accessibility bits, a layout pointer, then the fields, all prefix fields).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct RawMutexVTable {
    pub field_accessibility: u64,
    pub type_layout: usize,
    pub lock: usize,
    pub try_lock: usize,
    pub unlock: usize,
    pub try_lock_for: usize,
}

/// `abi_stable::library::LibHeader`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct RawLibHeader {
    pub header: RawAbiHeader,
    pub root_mod_consts: RawRootModuleConsts,
    pub init_globals_with: usize,
    pub module: RawLateStaticRef,
    pub constructor: usize,
}

/// One loadable segment of a mapped library, at its run-time addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub start: usize,
    pub end: usize,
    pub readable: bool,
    pub executable: bool,
}

/// The loadable segments of one mapped library. Only `dl_iterate_phdr` fills one in
/// (the field is private): the checks below read memory on its word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Segments(Vec<Segment>);

impl Segments {
    /// The segments, for tests.
    #[cfg(test)]
    pub fn list(&self) -> &[Segment] {
        &self.0
    }

    /// Whether `[addr, addr + len)` lies inside one readable segment.
    pub fn readable(&self, addr: usize, len: usize) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        addr != 0
            && self
                .0
                .iter()
                .any(|s| s.readable && s.start <= addr && end <= s.end)
    }

    /// Whether `addr` lies inside an executable segment.
    pub fn executable(&self, addr: usize) -> bool {
        addr != 0
            && self
                .0
                .iter()
                .any(|s| s.executable && s.start <= addr && addr < s.end)
    }

    /// Whether `[addr, addr + size_of::<T>())` lies inside one readable segment and `addr`
    /// is aligned for `T`.
    fn holds<T>(&self, addr: usize) -> bool {
        (addr as *const T).is_aligned() && self.readable(addr, size_of::<T>())
    }

    /// The segments of the loaded object whose name (the path it was opened by) is
    /// `path`.
    #[cfg(all(unix, not(target_vendor = "apple")))]
    pub fn of_object(path: &std::path::Path) -> Option<Segments> {
        use std::os::unix::ffi::OsStrExt;
        let wanted = path.as_os_str().as_bytes();
        find_object(&mut |name, _| name == wanted)
    }

    /// The segments of the loaded object that maps `addr`.
    #[cfg(all(test, unix, not(target_vendor = "apple")))]
    pub fn containing(addr: usize) -> Option<Segments> {
        find_object(&mut |_, segments| segments.0.iter().any(|s| s.start <= addr && addr < s.end))
    }
}

/// Walks the loaded objects (`dl_iterate_phdr`) and returns the PT_LOAD segments of the
/// first one `pick` chooses, given its name and segments.
#[cfg(all(unix, not(target_vendor = "apple")))]
fn find_object(pick: &mut dyn FnMut(&[u8], &Segments) -> bool) -> Option<Segments> {
    use std::ffi::{c_int, c_void, CStr};

    struct Search<'a> {
        pick: &'a mut dyn FnMut(&[u8], &Segments) -> bool,
        found: Option<Segments>,
    }

    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the `Search` passed below, alive for the whole walk; glibc
        // hands each callback a valid `dl_phdr_info` whose `dlpi_phdr` has `dlpi_phnum`
        // entries and whose name is a C string (or null).
        let (search, info) = unsafe { (&mut *data.cast::<Search<'_>>(), &*info) };
        let name = if info.dlpi_name.is_null() {
            &[][..]
        } else {
            // SAFETY: see above.
            unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
        };
        let headers = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: see above.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let base = info.dlpi_addr as usize;
        let segments = Segments(
            headers
                .iter()
                .filter(|h| h.p_type == libc::PT_LOAD)
                .filter_map(|h| {
                    let start = base.checked_add(h.p_vaddr as usize)?;
                    Some(Segment {
                        start,
                        end: start.checked_add(h.p_memsz as usize)?,
                        readable: h.p_flags & libc::PF_R != 0,
                        executable: h.p_flags & libc::PF_X != 0,
                    })
                })
                .collect(),
        );
        if (search.pick)(name, &segments) {
            search.found = Some(segments);
            1
        } else {
            0
        }
    }

    let mut search = Search { pick, found: None };
    // SAFETY: `visit` matches the callback type and only uses `search` during the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut search as *mut Search<'_>).cast()) };
    search.found
}

/// Where dl_iterate_phdr does not exist, the segments are unknown and nothing passes.
#[cfg(not(all(unix, not(target_vendor = "apple"))))]
impl Segments {
    pub fn of_object(_path: &std::path::Path) -> Option<Segments> {
        None
    }
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Its `AbiHeader` is not this abi_stable's: another abi_stable, or corrupt magic.
    AbiStable,
    /// Something in it points outside the library, is too long, or is not what a
    /// freshly opened library holds.
    Corrupt(String),
}

/// Checks the header a library exports at `addr` and returns the interface version
/// string it declares. Nothing in the header is read before its place is checked, and
/// nothing it points to is read or called here.
pub(super) fn check(addr: usize, segments: &Segments) -> Result<&'static str, Refusal> {
    if !segments.holds::<RawAbiHeader>(addr) || !(addr as *const RawLibHeader).is_aligned() {
        return Err(Refusal::Corrupt(format!(
            "its header symbol (at {addr:#x}) is not inside the library's readable memory"
        )));
    }
    // SAFETY: checked just above: aligned and inside a readable segment of the library.
    let abi = unsafe { &*(addr as *const AbiHeader) };
    if !abi.is_valid() {
        return Err(Refusal::AbiStable);
    }
    if !segments.holds::<RawLibHeader>(addr) {
        return Err(Refusal::Corrupt(format!(
            "its header (at {addr:#x}, {} bytes) does not fit inside the library's readable memory",
            size_of::<RawLibHeader>()
        )));
    }
    // SAFETY: checked just above. Every field is an integer, so any bytes are a value.
    let raw = unsafe { std::ptr::read(addr as *const RawLibHeader) };
    check_fields(&raw, segments).map_err(Refusal::Corrupt)
}

/// Checks the fields of a header read through the mirror (the `AbiHeader` already
/// passed): its strings, the pointers abi_stable follows and the functions it calls
/// before the plugin's constructor, and that its root module was never initialised.
/// Returns the interface version string.
pub(super) fn check_fields(
    raw: &RawLibHeader,
    segments: &Segments,
) -> Result<&'static str, String> {
    let consts = &raw.root_mod_consts;
    text(segments, "its library base name", consts.base_name)?;
    text(segments, "its interface name", consts.name)?;
    let version = text(segments, "its interface version", consts.version)?;

    match consts.layout.tag {
        LAYOUT_CHECKED_YES => {}
        LAYOUT_CHECKED_NO => {
            return Err(
                "it leaves out its root module's type layout, so its types cannot be checked"
                    .to_owned(),
            );
        }
        tag => return Err(format!("its type-layout tag is {tag}, neither 0 nor 1")),
    }
    if !segments.holds::<TypeLayout>(consts.layout.layout) {
        return Err(format!(
            "its type-layout pointer ({:#x}) does not point inside the library",
            consts.layout.layout
        ));
    }

    let fns = consts.c_abi_testing_fns;
    if !segments.holds::<RawCAbiTestingFns>(fns) {
        return Err(format!(
            "its C-ABI self-test table pointer ({fns:#x}) does not point inside the library"
        ));
    }
    // SAFETY: checked just above; integers only.
    let table = unsafe { std::ptr::read(fns as *const RawCAbiTestingFns) };
    for (i, f) in table.iter().enumerate() {
        code(segments, &format!("its C-ABI self-test function #{i}"), *f)?;
    }
    code(segments, "its globals initialiser", raw.init_globals_with)?;

    let module = &raw.module;
    if module.pointer != 0 {
        return Err(format!(
            "its root module is already set ({:#x}) in a freshly opened library",
            module.pointer
        ));
    }
    if module.lock_state != 0 {
        return Err(format!(
            "its root-module lock is not in its unlocked initial state ({:#x})",
            module.lock_state
        ));
    }
    if !segments.holds::<RawMutexVTable>(module.lock_vtable) {
        return Err(format!(
            "its root-module lock's vtable pointer ({:#x}) does not point inside the library",
            module.lock_vtable
        ));
    }
    // SAFETY: checked just above; integers only.
    let vtable = unsafe { std::ptr::read(module.lock_vtable as *const RawMutexVTable) };
    for (what, f) in [
        ("lock", vtable.lock),
        ("try_lock", vtable.try_lock),
        ("unlock", vtable.unlock),
        ("try_lock_for", vtable.try_lock_for),
    ] {
        code(
            segments,
            &format!("its root-module lock's {what} function"),
            f,
        )?;
    }
    code(segments, "its root-module constructor", raw.constructor)?;
    Ok(version)
}

/// The string `s` of the library, if it lies inside the library's readable segments, is
/// at most `MAX_TEXT` bytes long and is UTF-8.
pub(super) fn text(segments: &Segments, what: &str, s: RawStr) -> Result<&'static str, String> {
    if s.len > MAX_TEXT {
        return Err(format!(
            "{what} is {} bytes long (at most {MAX_TEXT})",
            s.len
        ));
    }
    if s.len == 0 {
        return Err(format!("{what} is empty"));
    }
    if !segments.readable(s.ptr, s.len) {
        return Err(format!(
            "{what} ({} bytes at {:#x}) is not inside the library's readable memory",
            s.len, s.ptr
        ));
    }
    // SAFETY: checked just above: the bytes lie inside a readable segment of a library
    // that is never unmapped.
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr as *const u8, s.len) };
    std::str::from_utf8(bytes).map_err(|_| format!("{what} is not valid UTF-8"))
}

/// Checks that `f` points into the library's code.
fn code(segments: &Segments, what: &str, f: usize) -> Result<(), String> {
    if segments.executable(f) {
        Ok(())
    } else {
        Err(format!("{what} ({f:#x}) is not inside the library's code"))
    }
}
