//! Random reads of a large served file through a mapping the shim keeps,
//! instead of one FILL round trip to the server's session per read.
//!
//! A descriptor of a served file of at least [`MIN_SIZE`] bytes whose
//! reads jump around (a read that does not start where the last one of the
//! descriptor ended, the second time) gets a lazy mapping of the whole
//! file, made once, registered with this process's userfaultfd like the
//! program's own mappings: its faults are answered by the server's fault
//! service on the reading thread's CPU. A random read is then copied out
//! of it by the kernel, with `process_vm_readv` on this process, so that a
//! page the server cannot provide (poisoned: a source error) fails the call
//! with `EFAULT` instead of raising `SIGBUS` in the program: the read then
//! goes through FILL, which answers `EIO` as a native read would.
//! Sequential reads keep the FILL read-ahead (`readahead.rs`): a window of
//! up to 1 MiB per request costs less than a system call per small read.
//!
//! Where the userfaultfd serves only faults taken in user mode (an
//! unprivileged process under `vm.unprivileged_userfaultfd=0`), the
//! kernel's copy cannot fault a page in and fails with `EFAULT`: after
//! [`GIVE_UP`] such failures with no success the descriptor goes back to
//! FILL for good. A forked child does not inherit the mapping (served
//! mappings are `MADV_DONTFORK`): each process's descriptors start afresh
//! (`fork.rs` makes new entries).

use parking_lot::Mutex;
use shadowfd::RemoteMapping;
use shadowfd::remote::RemoteFile;

/// Files smaller than this are read through FILL (and read-ahead) only.
pub(crate) const MIN_SIZE: u64 = 1 << 20;

/// `EFAULT`s in a row, with no copy that worked, that stop the mapped path.
const GIVE_UP: u32 = 4;

/// The mapped read path of one open file description (shared by `dup`s).
#[derive(Default)]
pub(crate) struct MapRead {
    state: Mutex<State>,
}

#[derive(Default)]
enum State {
    /// No mapping yet; `jumps` random reads seen, and where the last read
    /// ended.
    #[default]
    Untried,
    Watching {
        jumps: u32,
        next: u64,
    },
    On {
        map: RemoteMapping,
        next: u64,
        faults: u32,
    },
    Off,
}

impl MapRead {
    /// Reads `buf.len()` bytes of `file` at `off` through the mapping if
    /// this read is one for it; `None`: read it the usual way.
    pub(crate) fn read(&self, file: &RemoteFile, buf: &mut [u8], off: u64) -> Option<usize> {
        if file.size() < MIN_SIZE || file.inline_bytes().is_some() || buf.is_empty() {
            return None;
        }
        let mut st = self.state.lock();
        let end = off.saturating_add(buf.len() as u64);
        let (jumps, next) = match &mut *st {
            State::Off => return None,
            State::Untried => {
                *st = State::Watching {
                    jumps: 0,
                    next: end,
                };
                return None;
            }
            State::On { next, .. } => {
                let sequential = *next == off;
                *next = end;
                if sequential {
                    return None;
                }
                return copy(&mut st, buf, off);
            }
            State::Watching { jumps, next } => (*jumps, *next),
        };
        let jumps = jumps + u32::from(next != off);
        if next == off || jumps < 2 {
            *st = State::Watching { jumps, next: end };
            return None;
        }
        // The second jump: worth a mapping.
        match file.map() {
            Ok(map) if map.is_lazy() && map.len() as u64 == file.size() => {
                *st = State::On {
                    map,
                    next: off,
                    faults: 0,
                };
                copy(&mut st, buf, off)
            }
            _ => {
                *st = State::Off;
                None
            }
        }
    }
}

/// Copies out of the mapping of `st` (`State::On`).
fn copy(st: &mut State, buf: &mut [u8], off: u64) -> Option<usize> {
    let State::On { map, faults, next } = st else {
        return None;
    };
    let len = map.len() as u64;
    if off >= len {
        return Some(0);
    }
    let n = (buf.len() as u64).min(len - off) as usize;
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: n,
    };
    let remote = libc::iovec {
        // SAFETY: `off < len`: the address is inside the mapping.
        iov_base: unsafe { map.as_ptr().add(off as usize) } as *mut libc::c_void,
        iov_len: n,
    };
    // SAFETY: `local` is `n` writable bytes of `buf`; `remote` names `n`
    // bytes of this process's own mapping, which lives while `st` is
    // locked; the kernel checks both and copies, or fails with EFAULT.
    let got = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if got > 0 {
        *faults = 0;
        *next = off + got as u64;
        return Some(got as usize);
    }
    // A page the server could not provide, or a userfaultfd that serves
    // no kernel-mode fault: FILL says which (EIO, or the bytes).
    *faults += 1;
    if *faults >= GIVE_UP {
        *st = State::Off;
    }
    None
}
