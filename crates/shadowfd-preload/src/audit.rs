//! Shared libraries from the served tree, through the dynamic linker's
//! auditing interface (`LD_AUDIT`, rtld-audit(7)); docs/run.md, "Shared
//! libraries".
//!
//! `ld.so` opens and maps the objects it loads (`DT_NEEDED`, `dlopen`)
//! with its own internal system calls, which no `LD_PRELOAD` sees. It does
//! ask an audit module about every name it is about to open
//! (`la_objsearch`), and opens whatever name the module answers. `shadowfd
//! run` loads this same library as the audit module: for a name under the
//! prefix it answers `/proc/self/fd/N`, where `N` is a sealed descriptor of
//! the whole file from the server (MAP in sealed mode: the server
//! materializes the shadow once and shares it by identity with every
//! process that maps it). A library is small and mapped
//! `MAP_PRIVATE|PROT_EXEC`, which a lazy userfaultfd mapping cannot serve:
//! the eager sealed shadow is the right one.
//!
//! The module runs in its own link namespace, with its own copy of libc
//! and of this library's statics: it has a connection of its own (opened
//! on first use, again after a fork) and shares nothing with the shim in
//! the program's namespace. A name not under the prefix is answered
//! unchanged; one under it that the served tree does not hold is skipped
//! (NULL), as a missing file would be; any other failure is skipped with
//! one line on stderr naming `shadowfd run` and the reason.

use crate::env::{env, normalize};
use shadowfd::remote::wire::{self, Frame};
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_uint};
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set when `ld.so` calls [`la_version`]: this copy of the library is the
/// audit module, not the shim.
static AUDITING: AtomicBool = AtomicBool::new(false);

/// A library handed to `ld.so`: the sealed descriptor and its identity
/// (checked before reuse: a program may have closed the number since).
struct Lib {
    fd: RawFd,
    dev: u64,
    ino: u64,
    name: CString,
}

struct Audit {
    pid: i64,
    conn: Option<UnixStream>,
    libs: HashMap<String, Lib>,
}

static STATE: Mutex<Option<Audit>> = Mutex::new(None);

fn pid() -> i64 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::syscall(libc::SYS_getpid) }
}

fn identity(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: an all-zero stat is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat into a live buffer.
    let r = unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) };
    (r == 0).then_some((st.st_dev, st.st_ino))
}

/// Why a load failed: (protocol code if the server refused, message).
type Why = (Option<u64>, String);

fn call(s: &UnixStream, f: &Frame) -> Result<(Frame, Option<std::os::fd::OwnedFd>), Why> {
    wire::send(s, f, None).map_err(|e| (None, e.to_string()))?;
    let (r, fd) = wire::recv(s).map_err(|e| (None, format!("the server did not answer: {e}")))?;
    if r.kind == wire::ERROR {
        return Err((Some(r.a), String::from_utf8_lossy(&r.payload).into_owned()));
    }
    if r.kind != f.kind | wire::REPLY {
        return Err((None, format!("unexpected reply kind {:#x}", r.kind)));
    }
    Ok((r, fd))
}

fn connect(socket: &str) -> Result<UnixStream, Why> {
    let s = UnixStream::connect(socket)
        .map_err(|e| (None, format!("cannot reach the server at {socket}: {e}")))?;
    let t = Some(std::time::Duration::from_secs(60));
    let _ = s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t));
    call(&s, &Frame::new(wire::HELLO, wire::VERSION, 0, 0, 0))?;
    Ok(s)
}

/// A sealed descriptor of the served file `rel` (close-on-exec).
fn fetch(s: &UnixStream, rel: &str) -> Result<RawFd, Why> {
    let open = Frame::new(wire::OPEN, 0, 0, 0, 0).with_payload(rel.as_bytes().to_vec());
    let (r, _) = call(s, &open)?;
    let handle = r.a;
    let mapped = call(s, &Frame::new(wire::MAP, handle, wire::MAP_SEALED, 0, 0));
    let _ = call(s, &Frame::new(wire::CLOSE, handle, 0, 0, 0));
    let (r, fd) = mapped?;
    if r.b == 0 {
        return Err((None, "the file is empty".into()));
    }
    let fd = fd.ok_or((None, "the MAP reply carried no descriptor".to_string()))?;
    let fd = fd.into_raw_fd();
    // SAFETY: sets a flag on a descriptor this module owns.
    unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(fd)
}

/// The name `ld.so` should open for the served `rel`, or why not.
fn lookup(rel: &str) -> Result<*const c_char, Why> {
    let env = env().ok_or((None, "no server in the environment".to_string()))?;
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let me = pid();
    if g.as_ref().is_none_or(|a| a.pid != me) {
        // A forked child: the parent's connection is the parent's (never
        // used or closed here); its descriptors are the child's copies.
        if let Some(old) = g.take() {
            std::mem::forget(old.conn);
            *g = Some(Audit {
                pid: me,
                conn: None,
                libs: old.libs,
            });
        } else {
            *g = Some(Audit {
                pid: me,
                conn: None,
                libs: HashMap::new(),
            });
        }
    }
    let a = g.as_mut().expect("set above");
    if let Some(l) = a.libs.get(rel) {
        if identity(l.fd) == Some((l.dev, l.ino)) {
            return Ok(l.name.as_ptr());
        }
        a.libs.remove(rel);
    }
    if a.conn.is_none() {
        let low = crate::conn::LowFds::reserve();
        let c = connect(&env.socket);
        drop(low);
        a.conn = Some(c?);
    }
    let s = a.conn.as_ref().expect("connected above");
    let fd = match fetch(s, rel) {
        Ok(fd) => fd,
        Err((None, m)) => {
            // The connection may be broken: the next load connects anew.
            a.conn = None;
            return Err((None, m));
        }
        Err(e) => return Err(e),
    };
    let (dev, ino) = identity(fd).ok_or((None, "fstat of the sealed descriptor".to_string()))?;
    let name = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    let p = name.as_ptr();
    a.libs.insert(rel.to_string(), Lib { fd, dev, ino, name });
    Ok(p)
}

fn say(msg: &str) {
    let m = format!("{msg}\n");
    // SAFETY: writes a live buffer to stderr.
    unsafe { libc::write(2, m.as_ptr().cast(), m.len()) };
}

/// rtld-audit(7): the interface version this module speaks.
#[unsafe(no_mangle)]
pub extern "C" fn la_version(version: c_uint) -> c_uint {
    AUDITING.store(true, Ordering::SeqCst);
    if version == 0 { 0 } else { 1 }
}

/// rtld-audit(7): `ld.so` is about to open `name`; the answer is the name
/// it opens instead, or NULL to skip this candidate.
///
/// # Safety
/// Called by `ld.so` with a NUL-terminated name.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn la_objsearch(
    name: *const c_char,
    _cookie: *mut usize,
    _flag: c_uint,
) -> *mut c_char {
    let Some(env) = env() else {
        return name.cast_mut();
    };
    if name.is_null() {
        return name.cast_mut();
    }
    // SAFETY: ld.so's promise.
    let Ok(s) = unsafe { CStr::from_ptr(name) }.to_str() else {
        return name.cast_mut();
    };
    if !s.contains('/') {
        return match search_library_path(s, env) {
            None => name.cast_mut(),
            Some(Ok(p)) => p.cast_mut(),
            Some(Err((_, why))) => {
                say(&format!(
                    "shadowfd run: the dynamic linker cannot load {s} from the served tree: {why}"
                ));
                name.cast_mut()
            }
        };
    }
    let Some(comps) = normalize(s) else {
        return name.cast_mut();
    };
    if comps.len() < env.prefix.len() || comps[..env.prefix.len()] != env.prefix[..] {
        return name.cast_mut();
    }
    let rel = comps[env.prefix.len()..].join("/");
    match lookup(&rel) {
        Ok(p) => p.cast_mut(),
        Err((Some(wire::E_NOT_FOUND | wire::E_NOT_REGULAR | wire::E_ESCAPE), _)) => {
            std::ptr::null_mut()
        }
        Err((_, why)) => {
            say(&format!(
                "shadowfd run: the dynamic linker cannot load {s} from the served tree: {why}"
            ));
            std::ptr::null_mut()
        }
    }
}

unsafe extern "C" {
    fn dladdr1(
        addr: *const libc::c_void,
        info: *mut libc::Dl_info,
        extra: *mut *mut libc::c_void,
        flags: libc::c_int,
    ) -> libc::c_int;
    fn dlinfo(
        handle: *mut libc::c_void,
        request: libc::c_int,
        arg: *mut libc::c_void,
    ) -> libc::c_int;
}

/// Whether this copy of the library was loaded in a link namespace other
/// than the program's: it is then the audit module, and its constructors
/// leave the process alone (the shim in the program's namespace adopts
/// inherited descriptors and keeps `environ`, which both copies of libc
/// share at start).
pub(crate) fn in_audit_namespace() -> bool {
    if AUDITING.load(Ordering::Relaxed) {
        return true;
    }
    // SAFETY: all-zero Dl_info is valid; dladdr1 with RTLD_DL_LINKMAP (2)
    // stores this object's link_map, which glibc accepts as a handle for
    // dlinfo(RTLD_DI_LMID = 1), which stores an Lmid_t (a long).
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let mut lm: *mut libc::c_void = std::ptr::null_mut();
        let me = in_audit_namespace as *const libc::c_void;
        if dladdr1(me, &mut info, &mut lm, 2) == 0 || lm.is_null() {
            return false;
        }
        let mut lmid: libc::c_long = 0;
        if dlinfo(lm, 1, (&mut lmid as *mut libc::c_long).cast()) != 0 {
            return false;
        }
        lmid != 0
    }
}

/// A bare name (`DT_NEEDED libfoo.so`) that `LD_LIBRARY_PATH` finds in a
/// served directory, answered at once with the served file. `ld.so` itself
/// cannot search served directories: the first name they lack makes it
/// `stat` the directory on the host, find nothing, and never look there
/// again. So the module searches `LD_LIBRARY_PATH` in order itself: a host
/// directory that has the name ends the search (`ld.so` finds it there).
fn search_library_path(name: &str, env: &crate::env::Env) -> Option<Result<*const c_char, Why>> {
    let list = crate::env::getenv(c"LD_LIBRARY_PATH")?;
    for d in list.split([':', ';']).filter(|d| !d.is_empty()) {
        let cand = format!("{d}/{name}");
        let comps = normalize(&cand)?;
        if comps.len() >= env.prefix.len() && comps[..env.prefix.len()] == env.prefix[..] {
            match lookup(&comps[env.prefix.len()..].join("/")) {
                Err((Some(wire::E_NOT_FOUND | wire::E_NOT_REGULAR | wire::E_ESCAPE), _)) => {}
                r => return Some(r),
            }
        } else {
            let c = CString::new(cand).ok()?;
            // SAFETY: a NUL-terminated path.
            let there = unsafe {
                libc::syscall(
                    libc::SYS_faccessat,
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    libc::F_OK,
                    0,
                )
            };
            if there == 0 {
                return None;
            }
        }
    }
    None
}
