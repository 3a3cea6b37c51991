//! Keeping other processes of the same user out of this one.

use crate::error::{Error, Result};

/// Makes this process non-dumpable: `prctl(PR_SET_DUMPABLE, 0)`.
///
/// **What it does.** The kernel then lets only processes with
/// `CAP_SYS_PTRACE` over this one (in practice root) reach into it: other
/// processes of the same uid get `EACCES` when they open `/proc/PID/fd/*`
/// (so they cannot reopen a shadow's memfd, `O_RDWR` or otherwise),
/// `/proc/PID/mem` or `/proc/PID/maps`, and `ptrace(2)`, `pidfd_getfd(2)`
/// and `process_vm_writev(2)` are refused. Without it, any process of the
/// same uid can reopen an eager shadow's memfd while it is being copied
/// (before it can be sealed) and write into it: shadowfd detects that after
/// sealing and refuses the copy ([`crate::Error::Tampered`]), but only this
/// call, or a uid of its own, keeps such writers out in the first place. The
/// process keeps full access to its own `/proc/self`.
///
/// **Whose job.** The embedding program's. A library should not change a
/// process-wide attribute behind its caller's back, so shadowfd never calls
/// this by itself; call it early, before the first shadow is opened. The
/// `shadowfd` CLI calls it at the start of every command that opens files.
///
/// **Out of scope.** Root, and any process with `CAP_SYS_PTRACE` over this
/// one, still gets in; nothing a process does to itself stops them.
///
/// **Side effects.** No core dump is written when the process crashes. The
/// files under `/proc/PID` become owned by root, so the user's own tools
/// (`gdb -p`, `strace -p`, profilers reading `/proc/PID/maps`) cannot attach
/// or look. Children made by `fork(2)` inherit the attribute; `execve(2)` of
/// an ordinary program makes the new program dumpable again, so a child
/// that execs and also holds shadows must call this itself.
pub fn harden_process() -> Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| Error::sys("prctl(PR_SET_DUMPABLE, 0)", e))
}
