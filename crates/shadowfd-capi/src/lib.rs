//! The C ABI of shadowfd: `libshadowfd.so` / `libshadowfd.a` and
//! `include/shadowfd.h` (generated from this file by cbindgen; the header's
//! comments are these doc comments). docs/c-api.md is the guide.
//!
//! Every exported function catches panics (`catch_unwind`), so no Rust panic
//! crosses into C; a failure returns a negative errno (or NULL) and leaves a
//! message for `shadowfd_last_error` in a thread-local.
#![allow(non_camel_case_types)]

mod client;
mod errors;
mod map;
mod registry;
mod source;

use errors::{Failure, guard, in_callback_refusal};
use libc::{c_char, c_int, c_void};
use sfd::{Config, Engine, Mode, Shadow, Share};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::ptr::NonNull;

pub use client::shadowfd_client;
pub use map::*;
pub use source::{shadowfd_meta, shadowfd_source_ops};

/// `shadowfd_engine_mode`: shadows of this engine are filled lazily
/// (userfaultfd).
pub const SHADOWFD_MODE_LAZY: c_int = 1;
/// `shadowfd_engine_mode`: shadows of this engine are sealed copies made at
/// open.
pub const SHADOWFD_MODE_EAGER: c_int = 2;

/// `shadowfd_map` flags: `MAP_SHARED` (the default, value 0).
pub const SHADOWFD_MAP_SHARED: c_int = 0;
/// `shadowfd_map` flags: `MAP_PRIVATE`, as `ld.so` maps a segment.
pub const SHADOWFD_MAP_PRIVATE: c_int = 1;

/// `shadowfd_source_ops.flags`: the library never runs two callbacks of
/// this source at once (it holds a mutex around each call).
pub const SHADOWFD_SOURCE_SERIALIZED: u32 = 1;

/// Configuration for an engine: defaults, then the `SHADOWFD_*` environment,
/// then `shadowfd_config_set`. Opaque.
pub struct shadowfd_config {
    inner: Config,
}

/// An engine: the validated configuration and, in lazy mode, the
/// fault-service threads every lazy shadow of the engine shares. Opaque.
pub struct shadowfd_engine {
    inner: Engine,
}

/// A shadow of one source: made by an engine (`shadowfd_open_*`), or a file
/// opened on a server through a client (`shadowfd_client_open`). Opaque.
pub struct shadowfd_shadow {
    inner: ShadowKind,
}

/// What a `shadowfd_shadow` holds.
enum ShadowKind {
    /// An engine's shadow, in this process.
    Local(Shadow),
    /// A file opened on a `shadowfd serve` server.
    Remote(sfd::remote::RemoteFile),
}

impl shadowfd_shadow {
    /// The engine's shadow, or a failure saying `func` does not apply to a
    /// client shadow.
    fn local(&self, func: &str) -> Result<&Shadow, Failure> {
        match &self.inner {
            ShadowKind::Local(s) => Ok(s),
            ShadowKind::Remote(f) => Err(client::unsupported(func, f)),
        }
    }

    fn size(&self) -> u64 {
        match &self.inner {
            ShadowKind::Local(s) => s.size(),
            ShadowKind::Remote(f) => f.size(),
        }
    }

    fn name(&self) -> String {
        match &self.inner {
            ShadowKind::Local(s) => s.name().to_string(),
            ShadowKind::Remote(f) => format!("{:?} (served)", f.path()),
        }
    }
}

// The header promises that engines and shadows may be used from several
// threads at once, and mappings unmapped from any thread.
const _: () = {
    const fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<Engine>();
    shared_across_threads::<Shadow>();
    shared_across_threads::<sfd::Mapping>();
    shared_across_threads::<sfd::Registration>();
    shared_across_threads::<sfd::remote::Client>();
    shared_across_threads::<sfd::remote::RemoteFile>();
    shared_across_threads::<sfd::remote::RemoteMapping>();
};

/// A C string argument, or a failure naming it.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
unsafe fn arg_bytes<'a>(func: &str, what: &str, p: *const c_char) -> Result<&'a [u8], Failure> {
    if p.is_null() {
        return Err(Failure::einval(format!("{func}: {what} is NULL")));
    }
    // SAFETY: non-null, and the caller vouches for the terminating NUL.
    Ok(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// Like [`arg_bytes`], as UTF-8 text.
///
/// # Safety
/// As [`arg_bytes`].
unsafe fn arg_str<'a>(func: &str, what: &str, p: *const c_char) -> Result<&'a str, Failure> {
    // SAFETY: forwarded from the caller.
    let b = unsafe { arg_bytes(func, what, p) }?;
    std::str::from_utf8(b)
        .map_err(|_| Failure::einval(format!("{func}: {what} is not valid UTF-8")))
}

/// A reference from a handle pointer, or a failure naming it.
///
/// # Safety
/// `p` is NULL or a live handle of type `T` from this library.
unsafe fn handle<'a, T>(func: &str, what: &str, p: *const T) -> Result<&'a T, Failure> {
    // SAFETY: the caller vouches `p` is NULL or a live handle.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::einval(format!("{func}: {what} is NULL")))
}

/// A new configuration: the defaults, overridden by the `SHADOWFD_*`
/// environment variables (as the CLI reads them). Returns NULL, with a
/// message for `shadowfd_last_error`, if a variable is malformed.
///
/// Ownership: the caller owns the result and frees it with
/// `shadowfd_config_free`. Thread-safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn shadowfd_config_new() -> *mut shadowfd_config {
    guard(|| {
        let inner = Config::from_env()?;
        Ok(Box::into_raw(Box::new(shadowfd_config { inner })))
    })
}

/// Sets one value by the name of its command-line flag: `mode` (auto, lazy,
/// eager), `max-size`, `memory-budget`, `chunk`, `readahead` (sizes such as
/// `512M`, `2G`, `1GiB`, `4096`), `workers` (a number), `stale` (detect,
/// strict), `workset` (off, record, replay, auto; docs/worksets.md),
/// `workset-dir` (a directory), `workset-window` (`30s`, `2m`),
/// `workset-max` (a size) or `workset-prefetch` (a size, or `all`). Parsed as the CLI parses its flags; ranges are checked by
/// `shadowfd_engine_new`. Setting `memory-budget` while `max-size` still has
/// its default lowers the cap to the budget where that is smaller.
///
/// Returns 0, or -EINVAL (unknown key, malformed value, NULL argument).
/// Ownership: borrows all three arguments. Thread-safety: not on the same
/// config from two threads at once.
///
/// # Safety
/// `config` is NULL or from `shadowfd_config_new` and not freed; `key` and
/// `value` are NULL or NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_config_set(
    config: *mut shadowfd_config,
    key: *const c_char,
    value: *const c_char,
) -> c_int {
    const F: &str = "shadowfd_config_set";
    guard(|| {
        // SAFETY: the caller vouches for the pointer; no other thread uses
        // this config during the call.
        let c = unsafe { config.as_mut() }
            .ok_or_else(|| Failure::einval(format!("{F}: config is NULL")))?;
        // SAFETY: the caller vouches for the strings.
        let (k, v) = unsafe { (arg_str(F, "key", key)?, arg_str(F, "value", value)?) };
        c.inner.set(k, v)?;
        Ok(0)
    })
}

/// Frees a configuration. NULL is ignored. Engines made from it are not
/// affected. Thread-safety: not while another thread uses `config`.
///
/// # Safety
/// `config` is NULL or from `shadowfd_config_new` and not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_config_free(config: *mut shadowfd_config) {
    guard(|| {
        if !config.is_null() {
            // SAFETY: made by Box::into_raw in shadowfd_config_new and, as
            // the caller vouches, not freed before.
            drop(unsafe { Box::from_raw(config) });
        }
        Ok(())
    })
}

/// A new engine. Validates the configuration and resolves the mode: `lazy`
/// needs a usable userfaultfd, `auto` falls back to eager without one.
/// Returns NULL on error (`shadowfd_last_error` says which value is wrong
/// and how to fix it).
///
/// Ownership: `config` is borrowed (copied); the caller owns the engine and
/// frees it with `shadowfd_engine_free`. Thread-safety: any thread; the
/// engine may then be used from several threads at once.
///
/// # Safety
/// `config` is NULL or a live config from `shadowfd_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_engine_new(
    config: *const shadowfd_config,
) -> *mut shadowfd_engine {
    guard(|| {
        // SAFETY: the caller vouches for the pointer.
        let c = unsafe { handle("shadowfd_engine_new", "config", config) }?;
        let inner = Engine::new(c.inner.clone())?;
        Ok(Box::into_raw(Box::new(shadowfd_engine { inner })))
    })
}

/// The mode of the engine's shadows: `SHADOWFD_MODE_LAZY` or
/// `SHADOWFD_MODE_EAGER` (never "auto": that is resolved by
/// `shadowfd_engine_new`), or -EINVAL for NULL. Thread-safety: any thread.
///
/// # Safety
/// `engine` is NULL or a live engine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_engine_mode(engine: *const shadowfd_engine) -> c_int {
    guard(|| {
        // SAFETY: the caller vouches for the pointer.
        let e = unsafe { handle("shadowfd_engine_mode", "engine", engine) }?;
        Ok(match e.inner.mode() {
            Mode::Lazy => SHADOWFD_MODE_LAZY,
            _ => SHADOWFD_MODE_EAGER,
        })
    })
}

/// Frees an engine. NULL is ignored. Shadows and mappings made through it
/// stay valid: they keep the fault service running until the last of them
/// is freed or unmapped. Thread-safety: not while another thread uses
/// `engine`.
///
/// # Safety
/// `engine` is NULL or from `shadowfd_engine_new` and not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_engine_free(engine: *mut shadowfd_engine) {
    guard(|| {
        if !engine.is_null() {
            // SAFETY: made by Box::into_raw in shadowfd_engine_new and not
            // freed before (the caller's promise).
            drop(unsafe { Box::from_raw(engine) });
        }
        Ok(())
    })
}

fn new_shadow(inner: Shadow) -> *mut shadowfd_shadow {
    Box::into_raw(Box::new(shadowfd_shadow {
        inner: ShadowKind::Local(inner),
    }))
}

/// Shadows the host file at `path` (symlinks followed; only regular files).
/// A lazy open reads nothing yet; an eager one copies the file now and is
/// refused (-EFBIG) over the size cap. Returns NULL on error.
///
/// Ownership: `path` is borrowed; the caller owns the shadow and frees it
/// with `shadowfd_shadow_free`. Thread-safety: any thread, concurrently on
/// one engine. Refused (NULL, errno EDEADLK) inside a source callback.
///
/// # Safety
/// `engine` is NULL or live; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_open_path(
    engine: *mut shadowfd_engine,
    path: *const c_char,
) -> *mut shadowfd_shadow {
    const F: &str = "shadowfd_open_path";
    guard(|| {
        in_callback_refusal(F)?;
        // SAFETY: the caller vouches for both pointers.
        let (e, p) = unsafe { (handle(F, "engine", engine)?, arg_bytes(F, "path", path)?) };
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(p));
        Ok(new_shadow(e.inner.open(path)?))
    })
}

/// Shadows the file `path_in_image` (absolute, or from the image's root;
/// symlinks inside the image followed) inside the ext2/3/4 image file
/// `image`, read in user space. Otherwise as `shadowfd_open_path`.
///
/// # Safety
/// `engine` is NULL or live; `image` and `path_in_image` are NULL or
/// NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_open_image(
    engine: *mut shadowfd_engine,
    image: *const c_char,
    path_in_image: *const c_char,
) -> *mut shadowfd_shadow {
    const F: &str = "shadowfd_open_image";
    guard(|| {
        in_callback_refusal(F)?;
        // SAFETY: the caller vouches for the pointers.
        let (e, img, inner) = unsafe {
            (
                handle(F, "engine", engine)?,
                arg_bytes(F, "image", image)?,
                arg_bytes(F, "path_in_image", path_in_image)?,
            )
        };
        let img = std::ffi::OsStr::from_bytes(img);
        let inner = std::ffi::OsStr::from_bytes(inner);
        let src = sfd::source::ImageSource::open(img, inner).map_err(|e| sfd::Error::Open {
            path: e.location().into(),
            source: std::io::Error::new(e.kind(), e.reason()),
        })?;
        Ok(new_shadow(e.inner.open(src)?))
    })
}

/// Shadows the object `url` (`s3://BUCKET/KEY`) in an S3-compatible store,
/// configured by the standard AWS variables (`AWS_ENDPOINT_URL`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
/// `AWS_ALLOW_HTTP`) and `SHADOWFD_OBJECT_*`; the disk chunk cache is on
/// when `SHADOWFD_CACHE_SIZE` is set (in `$XDG_CACHE_HOME/shadowfd`).
/// One HEAD pins the object's version; see docs/object-store.md.
/// Otherwise as `shadowfd_open_path`: a bad URL is `-EINVAL`, a missing
/// bucket or key `-ENOENT`, refused credentials `-EACCES`, with the message
/// naming the URL and the fix.
///
/// # Safety
/// `engine` is NULL or live; `url` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_open_url(
    engine: *mut shadowfd_engine,
    url: *const c_char,
) -> *mut shadowfd_shadow {
    const F: &str = "shadowfd_open_url";
    guard(|| {
        in_callback_refusal(F)?;
        // SAFETY: the caller vouches for both pointers.
        let (e, u) = unsafe { (handle(F, "engine", engine)?, arg_bytes(F, "url", url)?) };
        let u = std::str::from_utf8(u)
            .map_err(|_| Failure::einval(format!("{F}: the url is not valid UTF-8")))?;
        let mut cfg = sfd::source::ObjectConfig::from_env().map_err(sfd::Error::from)?;
        if std::env::var_os("SHADOWFD_CACHE_SIZE").is_some() {
            cfg.cache = sfd::source::object::CacheConfig::from_env().map_err(sfd::Error::from)?;
        }
        let src = sfd::source::ObjectSource::open_with(u, cfg).map_err(sfd::Error::from)?;
        Ok(new_shadow(e.inner.open(src)?))
    })
}

/// Shadows a source whose bytes come from C callbacks (`ops`, see
/// `shadowfd_source_ops` for what each callback must do). `stat` is called
/// once now (the size and identity at open) and again on later fills (to
/// notice a change); `read_at` when bytes are needed: at open for an eager
/// engine, on first touch for a lazy one.
///
/// Ownership: `*ops` is copied (and `ops->name` with it). `ctx` is handed
/// over in every case: `release(ctx)` (if not NULL) is called exactly once,
/// before this returns NULL on failure, or once the library no longer needs
/// the source: for an eager shadow when it is freed, for a lazy one when it
/// and every mapping of it are gone (mappings outlive the shadow, and keep
/// filling from the source). The last free (`shadowfd_shadow_free`,
/// `shadowfd_unmap`, `shadowfd_unregister`) waits for a fill of it still in
/// flight, so `release` has run when it returns; only a fill that takes
/// over 2 s lets it return first, and `release` then runs on a
/// fault-service thread when that fill ends. Returns NULL on error.
/// Thread-safety: as `shadowfd_open_path`.
///
/// # Safety
/// `engine` is NULL or live; `ops` is NULL or points to a valid
/// `shadowfd_source_ops` whose callbacks honour its contract for `ctx`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_open_source(
    engine: *mut shadowfd_engine,
    ops: *const shadowfd_source_ops,
    ctx: *mut c_void,
) -> *mut shadowfd_shadow {
    const F: &str = "shadowfd_open_source";
    // SAFETY: the caller vouches for `ops` and `ctx`; from here on the
    // source owns ctx, and releases it when dropped (on any failure below).
    let src = unsafe { source::CSource::new(F, ops, ctx) };
    guard(move || {
        let src = src?;
        in_callback_refusal(F)?;
        // SAFETY: the caller vouches for the pointer.
        let e = unsafe { handle(F, "engine", engine) }?;
        Ok(new_shadow(e.inner.open(src)?))
    })
}

/// The shadow's size in bytes (the source's size at open; for a client
/// shadow, the size the server gave at `shadowfd_client_open`); 0 for NULL.
/// Thread-safety: any thread.
///
/// # Safety
/// `shadow` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_shadow_size(shadow: *const shadowfd_shadow) -> u64 {
    // SAFETY: the caller vouches for the pointer.
    guard(|| Ok(unsafe { shadow.as_ref() }.map_or(0, |s| s.size())))
}

/// Frees a shadow. NULL is ignored. Mappings and registrations of it stay
/// valid until `shadowfd_unmap` / `shadowfd_unregister`; descriptors from
/// `shadowfd_fd` stay valid until closed. Thread-safety: not while another
/// thread uses `shadow`.
///
/// # Safety
/// `shadow` is NULL or from a `shadowfd_open_*` and not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_shadow_free(shadow: *mut shadowfd_shadow) {
    guard(|| {
        if !shadow.is_null() {
            // SAFETY: made by Box::into_raw in new_shadow and not freed
            // before (the caller's promise).
            drop(unsafe { Box::from_raw(shadow) });
        }
        Ok(())
    })
}

/// Makes `offset..offset+len` present (fills it from the source now), for
/// `read`-style consumers and prefetch. Returns 0, or a negative errno if a
/// page in the range cannot be filled (-EIO or the errno the source gave;
/// -ENOMEM when the memory budget has no room, which may succeed later) or
/// the range is outside the shadow (-ERANGE). A no-op for eager shadows.
/// For a client shadow the server fills the range (the bytes come back
/// over the socket, 1 MiB per request, and are dropped); its errors are
/// the server's (-EIO, ...). Thread-safety: any thread. Refused (-EDEADLK)
/// inside a source callback.
///
/// # Safety
/// `shadow` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_fill(
    shadow: *mut shadowfd_shadow,
    offset: u64,
    len: u64,
) -> c_int {
    const F: &str = "shadowfd_fill";
    guard(|| {
        in_callback_refusal(F)?;
        // SAFETY: the caller vouches for the pointer.
        let s = unsafe { handle(F, "shadow", shadow) }?;
        match &s.inner {
            ShadowKind::Local(l) => l.populate(offset, len)?,
            ShadowKind::Remote(f) => client::fill(F, f, offset, len)?,
        }
        Ok(0)
    })
}

/// Reads up to `len` bytes at `offset` into `buf`, filling lazily first.
/// Returns the count read (short only at the end of the shadow, 0 at or past
/// it), or a negative errno as `shadowfd_fill`. A client shadow is read
/// through the server (FILL, 1 MiB per request), no mapping needed.
/// Thread-safety: any thread. Refused (-EDEADLK) inside a source callback.
///
/// # Safety
/// `shadow` is NULL or live; `buf` is writable for `len` bytes (it may be
/// NULL only when `len` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_read(
    shadow: *mut shadowfd_shadow,
    buf: *mut c_void,
    len: usize,
    offset: u64,
) -> i64 {
    const F: &str = "shadowfd_read";
    guard(|| {
        in_callback_refusal(F)?;
        // SAFETY: the caller vouches for the pointer.
        let s = unsafe { handle(F, "shadow", shadow) }?;
        if len == 0 {
            return Ok(0);
        }
        if buf.is_null() {
            return Err(Failure::einval(format!("{F}: buf is NULL")));
        }
        let len = len.min(i64::MAX as usize);
        // SAFETY: the caller vouches `buf` is writable for `len` bytes and
        // not otherwise borrowed during the call.
        let b = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        let n = match &s.inner {
            ShadowKind::Local(l) => l.read_at(b, offset)?,
            ShadowKind::Remote(f) => f.read_at(b, offset).map_err(client::failure)?,
        };
        Ok(n as i64)
    })
}

/// Fills the whole shadow, after which `shadowfd_fd` works and the shadow
/// no longer needs the fault service. Returns 0 or a negative errno as
/// `shadowfd_fill`. A no-op for eager shadows. Thread-safety: any thread.
/// Refused (-EDEADLK) inside a source callback.
///
/// # Safety
/// `shadow` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_materialize(shadow: *mut shadowfd_shadow) -> c_int {
    const F: &str = "shadowfd_materialize";
    guard(|| {
        in_callback_refusal(F)?;
        // SAFETY: the caller vouches for the pointer.
        let s = unsafe { handle(F, "shadow", shadow) }?;
        s.local(F)?.materialize()?;
        Ok(0)
    })
}

/// A new `O_RDONLY` descriptor of the sealed shadow memfd, the form to hand
/// to other code or processes (`SCM_RIGHTS`), `mmap` as a plain file.
/// Refused with -EBUSY while the shadow is lazy and not completely filled
/// (call `shadowfd_materialize` first): such a descriptor would show zeros
/// for unfilled pages. Ownership: the caller owns the descriptor and
/// `close`s it. Thread-safety: any thread.
///
/// # Safety
/// `shadow` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_fd(shadow: *mut shadowfd_shadow) -> c_int {
    guard(|| {
        // SAFETY: the caller vouches for the pointer.
        let s = unsafe { handle("shadowfd_fd", "shadow", shadow) }?;
        Ok(s.local("shadowfd_fd")?.reopen_readonly()?.into_raw_fd())
    })
}

fn json_string(v: &impl serde::Serialize) -> Result<*mut c_char, Failure> {
    let text = serde_json::to_string(v)
        .map_err(|e| Failure::new(libc::EIO, format!("serializing stats: {e}")))?;
    // JSON escapes control characters, so the text has no NUL byte.
    let c = CString::new(text)
        .map_err(|_| Failure::new(libc::EIO, "stats JSON held a NUL byte".into()))?;
    Ok(c.into_raw())
}

/// The shadow's counters as a JSON object (the fields of the Rust
/// `shadowfd::Stats`: bytes and chunks filled, faults, resident bytes,
/// latency percentiles, `last_error`, ...); for a client shadow, the
/// server's counters of its shadow (docs/protocol.md, STATS: `mode`,
/// `bytes_filled`, `lazy_mappings`, ...). NULL on error. Ownership: the
/// caller frees the string with `shadowfd_string_free`. Thread-safety: any
/// thread.
///
/// # Safety
/// `shadow` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_stats_json(shadow: *const shadowfd_shadow) -> *mut c_char {
    guard(|| {
        // SAFETY: the caller vouches for the pointer.
        let s = unsafe { handle("shadowfd_stats_json", "shadow", shadow) }?;
        match &s.inner {
            ShadowKind::Local(l) => json_string(&l.stats()),
            ShadowKind::Remote(f) => client::stats_json(f),
        }
    })
}

/// The counters over every lazy shadow of the engine, as JSON (zeros for an
/// eager engine). As `shadowfd_stats_json`.
///
/// # Safety
/// `engine` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_engine_stats_json(engine: *const shadowfd_engine) -> *mut c_char {
    guard(|| {
        // SAFETY: the caller vouches for the pointer.
        let e = unsafe { handle("shadowfd_engine_stats_json", "engine", engine) }?;
        json_string(&e.inner.stats())
    })
}

/// Frees a string from this library. NULL is ignored.
///
/// # Safety
/// `s` is NULL or a string from `shadowfd_stats_json` /
/// `shadowfd_engine_stats_json`, not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_string_free(s: *mut c_char) {
    guard(|| {
        if !s.is_null() {
            // SAFETY: made by CString::into_raw in json_string and not freed
            // before (the caller's promise).
            drop(unsafe { CString::from_raw(s) });
        }
        Ok(())
    })
}

/// Makes the process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`), so other
/// processes of the same uid cannot open the shadows' memfds through
/// `/proc/PID/fd` or read its memory. The embedding program's choice: call
/// it early, before opening shadows (docs/security.md has the side effects:
/// no core dumps, no `gdb -p`). Returns 0 or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn shadowfd_harden_process() -> c_int {
    guard(|| {
        sfd::harden_process()?;
        Ok(0)
    })
}

/// The message of the last failed call on this thread (which value was
/// wrong and how to fix it, as the CLI would say), or NULL if none failed.
/// Ownership: borrowed; valid until the next shadowfd call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn shadowfd_last_error() -> *const c_char {
    errors::last_error()
}
