//! A restricted kernel, as containers make it: a seccomp filter, installed
//! in a child before `exec` (or on a child test process itself), that fails
//! `userfaultfd(2)` and/or the `USERFAULTFD_IOC_NEW` ioctl on
//! `/dev/userfaultfd` with a chosen errno. (Containers usually lack the
//! device node; blocking its ioctl is the same for a process that runs as
//! root here and could open it.)
//!
//! The BPF program is hand-written from [`Rules`]:
//!
//! ```text
//!     ld  [arch]
//!     jeq NATIVE_ARCH ? +1 : +0
//!     ret KILL_PROCESS                       another ABI: refuse
//!     ld  [nr]
//!   syscall rule Deny:
//!     jeq __NR_userfaultfd ? +0 : +1
//!     ret ERRNO(errno)
//!   syscall rule DenyUnlessUserModeOnly:
//!     jeq __NR_userfaultfd ? +0 : +4
//!     ld  [args[0] low 32 bits]              the flags
//!     jset UFFD_USER_MODE_ONLY ? +1 : +0
//!     ret ERRNO(errno)
//!     ret ALLOW
//!   devnode rule:
//!     jeq __NR_ioctl ? +0 : +4
//!     ld  [args[1] low 32 bits]              the request
//!     jeq USERFAULTFD_IOC_NEW ? +0 : +1
//!     ret ERRNO(errno)
//!     ret ALLOW
//!     ret ALLOW
//! ```

use std::os::unix::process::CommandExt;
use std::process::Command;

#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

/// `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: u32 = 0xAA << 8;

// Offsets in `struct seccomp_data` (little-endian: low halves of args).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16;
const OFF_ARG1_LO: u32 = 16 + 8;

const UFFD_USER_MODE_ONLY: u32 = 1;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Whether this architecture is supported by the filter below.
pub fn supported() -> bool {
    cfg!(any(target_arch = "x86_64", target_arch = "aarch64"))
}

/// What happens to `userfaultfd(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallRule {
    Deny,
    /// Denied unless the flags ask for `UFFD_USER_MODE_ONLY`.
    DenyUnlessUserModeOnly,
}

/// A filter: the errno, the syscall rule, and whether the devnode ioctl is denied.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub errno: i32,
    pub syscall: SyscallRule,
    pub devnode: bool,
}

impl Rules {
    /// Everything denied: no userfaultfd at all.
    pub fn none(errno: i32) -> Rules {
        Rules {
            errno,
            syscall: SyscallRule::Deny,
            devnode: true,
        }
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn program(r: Rules) -> Vec<libc::sock_filter> {
    let deny = libc::SECCOMP_RET_ERRNO | (r.errno as u32 & libc::SECCOMP_RET_DATA);
    let allow = libc::SECCOMP_RET_ALLOW;
    let mut v = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, NATIVE_ARCH, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
    ];
    let uffd = libc::SYS_userfaultfd as u32;
    match r.syscall {
        SyscallRule::Deny => v.extend([jump(JEQ_K, uffd, 0, 1), stmt(RET_K, deny)]),
        SyscallRule::DenyUnlessUserModeOnly => v.extend([
            jump(JEQ_K, uffd, 0, 4),
            stmt(LD_W_ABS, OFF_ARG0_LO),
            jump(JSET_K, UFFD_USER_MODE_ONLY, 1, 0),
            stmt(RET_K, deny),
            stmt(RET_K, allow),
        ]),
    }
    if r.devnode {
        v.extend([
            jump(JEQ_K, libc::SYS_ioctl as u32, 0, 4),
            stmt(LD_W_ABS, OFF_ARG1_LO),
            jump(JEQ_K, USERFAULTFD_IOC_NEW, 0, 1),
            stmt(RET_K, deny),
            stmt(RET_K, allow),
        ]);
    }
    v.push(stmt(RET_K, allow));
    v
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn program(_r: Rules) -> Vec<libc::sock_filter> {
    unreachable!("seccomp test filter: unsupported architecture")
}

/// Loads `filter` for the calling thread (all threads with `TSYNC`).
/// Only async-signal-safe calls, no allocation: usable after `fork`.
fn apply(filter: &[libc::sock_filter], flags: libc::c_ulong) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel
    // copies the program.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd`'s process deny userfaultfd with `errno` (before `exec`).
pub fn deny_userfaultfd(cmd: &mut Command, errno: i32) {
    restrict(cmd, Rules::none(errno));
}

/// Applies `rules` to `cmd`'s process (before `exec`).
pub fn restrict(cmd: &mut Command, rules: Rules) {
    let filter = program(rules);
    // SAFETY: the closure runs in the forked child before exec; `apply`
    // makes only async-signal-safe system calls on memory the closure owns
    // and allocates nothing.
    unsafe {
        cmd.pre_exec(move || apply(&filter, 0));
    }
}

/// Applies `rules` to this whole process (all threads) from now on.
pub fn install_here(rules: Rules) -> std::io::Result<()> {
    const SECCOMP_FILTER_FLAG_TSYNC: libc::c_ulong = 1;
    apply(&program(rules), SECCOMP_FILTER_FLAG_TSYNC)
}
