//! Served descriptors across `exec` (docs/run.md, "Descriptors across
//! exec").
//!
//! A served descriptor is a placeholder (`O_PATH` of `/dev/null`) that only
//! this shim knows the meaning of, so a new image would see nothing but the
//! placeholder. At every exec, the table of served descriptors without
//! `FD_CLOEXEC` goes to the new image in `SHADOWFD_RUN_FDS`, a
//! comma-separated list of `FD:f:OFFSET:HEXPATH` (a file, its offset) and
//! `FD:d:0:HEXPATH` (a directory). The new image's shim adopts, at load,
//! each listed descriptor that is still a placeholder: same path, same
//! offset, read-only. So `cmd < PREFIX/f`, `cmd 3< PREFIX/f` and a worker
//! forked and exec'd with inherited descriptors read what they would
//! natively.
//!
//! Entry points: `execve`, `execv`, `execvp`, `execvpe`, `fexecve`,
//! `posix_spawn` and `posix_spawnp` pass an environment with the variable
//! set (glibc execs with internal calls no preload sees, so each is wrapped
//! here); `execl`, `execlp`, `system` and `popen` exec with `environ`, whose
//! entry is brought up to date first (replacing its value, added at load:
//! one pointer stored, the array never moved; see cwd.rs for the same with
//! the working directory).

use crate::env::env;
use crate::twins::resolve;
use crate::{Busy, vfork};
use std::ffi::{CStr, CString, c_char, c_int};
use std::sync::atomic::AtomicUsize;

const FDS_VAR: &str = "SHADOWFD_RUN_FDS";

unsafe extern "C" {
    static mut environ: *const *const c_char;
    static mut stdin: *mut libc::FILE;
}

fn raw_fcntl(fd: c_int, cmd: c_int) -> c_int {
    // SAFETY: F_GETFD/F_GETFL take no argument and touch no memory.
    unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd) as c_int }
}

/// Whether `fd` is one of this shim's placeholders: an `O_PATH`
/// descriptor of `/dev/null` (character device 1:3).
fn is_placeholder(fd: c_int) -> bool {
    let fl = raw_fcntl(fd, libc::F_GETFL);
    if fl < 0 || fl & libc::O_PATH == 0 {
        return false;
    }
    // SAFETY: an all-zero stat is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of a descriptor into a live buffer.
    let r = unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) };
    r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
}

/// Whether `fd` stays open across an exec.
fn survives(fd: c_int) -> bool {
    let f = raw_fcntl(fd, libc::F_GETFD);
    f >= 0 && f & libc::FD_CLOEXEC == 0
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// The value of `SHADOWFD_RUN_FDS` for an exec now (in a `vfork` child:
/// its parent's tables with its own changes applied).
fn handed() -> String {
    let mut parts = Vec::new();
    for (fd, h) in vfork::view() {
        if !survives(fd) {
            continue;
        }
        match h {
            vfork::Handed::File(path, pos) => parts.push(format!("{fd}:f:{pos}:{}", hex(&path))),
            vfork::Handed::Dir(path) => parts.push(format!("{fd}:d:0:{}", hex(&path))),
        }
    }
    parts.join(",")
}

/// At load: adopts the served descriptors the image before the exec handed
/// over, then leaves `SHADOWFD_RUN_FDS` in `environ` empty (present, so
/// that [`sync_environ`] only replaces its value).
pub(crate) fn adopt() {
    if env().is_none() {
        return;
    }
    let v = crate::env::getenv(c"SHADOWFD_RUN_FDS").unwrap_or_default();
    for item in v.split(',').filter(|s| !s.is_empty()) {
        let mut it = item.splitn(4, ':');
        let (Some(fd), Some(kind), Some(pos), Some(path)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let (Ok(fd), Ok(pos), Some(path)) = (fd.parse::<c_int>(), pos.parse::<u64>(), unhex(path))
        else {
            continue;
        };
        // A descriptor closed or replaced on the way (a spawn's file
        // actions) is not ours any more.
        if fd < 0 || !is_placeholder(fd) {
            continue;
        }
        match kind {
            "f" => {
                crate::fdtable::adopt_file(fd, path, pos);
                if fd == 0 {
                    // glibc reads `stdin` with internal calls: make it a
                    // stream that reads through the shim, as `fopen` does.
                    let f = crate::stdio::cookie_stream(0);
                    if !f.is_null() {
                        // SAFETY: at load, one thread; `stdin` is glibc's
                        // (or the program's copy-relocated) stream pointer.
                        unsafe { stdin = f };
                    }
                }
            }
            "d" => crate::dirfd::adopt(fd, &path),
            _ => {}
        }
    }
    // At load, before other threads run.
    crate::env::setenv(c"SHADOWFD_RUN_FDS", c"", true);
}

/// Brings `SHADOWFD_RUN_FDS` in `environ` up to date, before a call that
/// execs with `environ` through glibc's internal calls.
fn sync_environ() {
    if env().is_none() {
        return;
    }
    let Some(_b) = Busy::enter() else {
        return;
    };
    let v = handed();
    if crate::env::getenv(c"SHADOWFD_RUN_FDS").as_deref() == Some(v.as_str()) {
        return;
    }
    let v = CString::new(v).unwrap_or_default();
    // The variable was added at load, so glibc replaces one pointer and
    // never moves the array.
    crate::env::setenv(c"SHADOWFD_RUN_FDS", &v, true);
}

/// An environment for an exec: the caller's, with this shim's variables
/// (working directory, served descriptors) as they are now.
struct ExecEnv {
    _own: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

/// `envp` with this shim's variables set; `None` outside `shadowfd run`
/// (or inside the shim, or without an environment): pass `envp` as it is.
///
/// # Safety
/// `envp` is null or a NULL-terminated array of NUL-terminated strings.
unsafe fn exec_env(envp: *const *const c_char) -> Option<ExecEnv> {
    if envp.is_null() || env().is_none() {
        return None;
    }
    let _b = Busy::enter()?;
    let cwd_eq = format!("{}=", crate::cwd::CWD_VAR);
    let fds_eq = format!("{FDS_VAR}=");
    let mut ptrs: Vec<*const c_char> = Vec::new();
    let mut i = 0;
    loop {
        // SAFETY: the caller's promise.
        let p = unsafe { *envp.add(i) };
        if p.is_null() {
            break;
        }
        // SAFETY: as above.
        let b = unsafe { CStr::from_ptr(p) }.to_bytes();
        if !b.starts_with(cwd_eq.as_bytes()) && !b.starts_with(fds_eq.as_bytes()) {
            ptrs.push(p);
        }
        i += 1;
    }
    let mut own = Vec::new();
    if let Some(r) = crate::cwd::vcwd() {
        own.push(CString::new(format!("{cwd_eq}{}", crate::route::full(&r))).unwrap_or_default());
    }
    let h = handed();
    if !h.is_empty() {
        own.push(CString::new(format!("{fds_eq}{h}")).unwrap_or_default());
    }
    ptrs.extend(own.iter().map(|c| c.as_ptr()));
    ptrs.push(std::ptr::null());
    Some(ExecEnv { _own: own, ptrs })
}

type ExecveFn =
    unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;

twins! {
    /// With `envp` carrying this shim's variables as they are now (`execvpe`
    /// takes a file name to look up in `PATH`).
    [execve, execvpe] fn(
        path: *const c_char,
        argv: *const *const c_char,
        envp: *const *const c_char,
    ) -> c_int,
    real: ExecveFn => {
        // SAFETY: the caller's environment (an exec's contract).
        let e = unsafe { exec_env(envp) };
        let envp = e.as_ref().map_or(envp, |e| e.ptrs.as_ptr());
        // SAFETY: forwarding, with an environment that lives until the call
        // returns (only on failure).
        unsafe { real(path, argv, envp) }
    }
}

/// # Safety
/// libc's `execv` (`execve` with `environ`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: as execve, with this process's environment.
    unsafe { execve(path, argv, environ) }
}

/// # Safety
/// libc's `execvp` (`execvpe` with `environ`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: as execvpe, with this process's environment.
    unsafe { execvpe(file, argv, environ) }
}

/// # Safety
/// libc's `fexecve`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fexecve(
    fd: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: fexecve's contract.
    let e = unsafe { exec_env(envp) };
    let envp = e.as_ref().map_or(envp, |e| e.ptrs.as_ptr());
    // SAFETY: forwarding.
    unsafe {
        real!(
            "fexecve",
            unsafe extern "C" fn(c_int, *const *const c_char, *const *const c_char) -> c_int
        )(fd, argv, envp)
    }
}

type SpawnFn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *const c_char,
    *const *const c_char,
) -> c_int;

twins! {
    /// With this shim's variables in `envp` (`posix_spawnp` takes a file
    /// name to look up in `PATH`).
    [posix_spawn, posix_spawnp] fn(
        pid: *mut libc::pid_t,
        path: *const c_char,
        fa: *const libc::posix_spawn_file_actions_t,
        attr: *const libc::posix_spawnattr_t,
        argv: *const *const c_char,
        envp: *const *const c_char,
    ) -> c_int,
    real: SpawnFn => {
        // SAFETY: the caller's environment (posix_spawn's contract).
        let e = unsafe { exec_env(envp) };
        let envp = e.as_ref().map_or(envp, |e| e.ptrs.as_ptr());
        // SAFETY: forwarding.
        unsafe { real(pid, path, fa, attr, argv, envp) }
    }
}

/// # Safety
/// libc's `system`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn system(cmd: *const c_char) -> c_int {
    sync_environ();
    // SAFETY: forwarding.
    unsafe { real!("system", unsafe extern "C" fn(*const c_char) -> c_int)(cmd) }
}

/// # Safety
/// libc's `popen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn popen(cmd: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    sync_environ();
    // SAFETY: forwarding.
    let f = unsafe {
        real!(
            "popen",
            unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE
        )(cmd, mode)
    };
    if !f.is_null() {
        // A new host descriptor (made with internal calls).
        // SAFETY: a live stream.
        crate::fdtable::fresh(unsafe { libc::fileno(f) });
    }
    f
}

/// `execl` and `execlp` are variadic, which Rust cannot define: each is a
/// naked trampoline that saves the argument registers, brings `environ`
/// up to date ([`sync_environ`]), and jumps to glibc's (which execs with
/// `environ`), arguments untouched. x86-64 only; elsewhere they are not
/// intercepted (docs/run.md).
#[cfg(target_arch = "x86_64")]
macro_rules! environ_trampoline {
    ($name:ident, $prep:ident, $sym:literal) => {
        /// Brings `environ` up to date; glibc's definition to jump to.
        extern "C" fn $prep() -> usize {
            static P: AtomicUsize = AtomicUsize::new(0);
            sync_environ();
            resolve(&P, concat!($sym, "\0"))
        }

        /// # Safety
        /// libc's variadic function of this name; its arguments are passed
        /// on untouched.
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name() {
            // At entry rsp is 8 mod 16: seven pushes align it for the call.
            // rax (al: vector registers used) and the six argument
            // registers are restored before the jump; r11 is scratch.
            core::arch::naked_asm!(
                "push rax",
                "push rdi",
                "push rsi",
                "push rdx",
                "push rcx",
                "push r8",
                "push r9",
                "call {prep}",
                "mov r11, rax",
                "pop r9",
                "pop r8",
                "pop rcx",
                "pop rdx",
                "pop rsi",
                "pop rdi",
                "pop rax",
                "jmp r11",
                prep = sym $prep,
            )
        }
    };
}

#[cfg(target_arch = "x86_64")]
environ_trampoline!(execl, execl_prep, "execl");
#[cfg(target_arch = "x86_64")]
environ_trampoline!(execlp, execlp_prep, "execlp");

/// `execle(path, arg0, ..., NULL, envp)`: variadic, with its environment
/// after the NULL, so it cannot jump to glibc's with `environ` brought up
/// to date as `execl` does. A naked trampoline saves the five argument
/// registers after `path` next to each other and calls [`execle_args`]
/// with where they and the stack arguments are; that one gathers `argv`
/// and `envp` and calls this shim's [`execve`], which hands the served
/// descriptors over. It returns only on failure, with `errno` set.
/// x86-64 only.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execle() {
    // At entry rsp is 8 mod 16. rbp, then the five registers and 8 bytes
    // of padding: 16-aligned for the call. The registers land in memory
    // in argument order: rsi at [rbp-40] up to r9 at [rbp-8]; the stack
    // arguments start at [rbp+16], past the return address.
    core::arch::naked_asm!(
        "push rbp",
        "mov rbp, rsp",
        "push r9",
        "push r8",
        "push rcx",
        "push rdx",
        "push rsi",
        "sub rsp, 8",
        "lea rsi, [rbp-40]",
        "lea rdx, [rbp+16]",
        "call {args}",
        "leave",
        "ret",
        args = sym execle_args,
    )
}

/// The most arguments [`execle_args`] gathers before it gives up with
/// `E2BIG` (far above what the kernel accepts: each takes at least a NUL
/// byte of `ARG_MAX`).
#[cfg(target_arch = "x86_64")]
const EXECLE_MAX_ARGS: usize = 1 << 21;

/// # Safety
/// Called only by [`execle`]: `regs` holds its five register arguments
/// after `path`, in order, and `stack` its stack arguments; together they
/// are `arg0, ..., NULL, envp` as `execle`'s contract says.
#[cfg(target_arch = "x86_64")]
unsafe extern "C" fn execle_args(
    path: *const c_char,
    regs: *const *const c_char,
    stack: *const *const c_char,
) -> c_int {
    // SAFETY: within the arguments the caller passed, by execle's
    // contract (the list ends with NULL and then envp).
    let at = |i: usize| unsafe {
        if i < 5 {
            *regs.add(i)
        } else {
            *stack.add(i - 5)
        }
    };
    let mut argv: Vec<*const c_char> = Vec::new();
    loop {
        if argv.len() >= EXECLE_MAX_ARGS {
            crate::set_errno(libc::E2BIG);
            return -1;
        }
        let a = at(argv.len());
        argv.push(a);
        if a.is_null() {
            break;
        }
    }
    let envp = at(argv.len()) as *const *const c_char;
    // SAFETY: execve's contract: argv is NULL-terminated, and envp is the
    // caller's.
    unsafe { execve(path, argv.as_ptr(), envp) }
}
