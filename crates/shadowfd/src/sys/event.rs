//! eventfd and epoll handles for the fault service's sleeping workers, and
//! the CPU affinity calls that place them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) with valid flags; returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd just returned this descriptor; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter (makes it readable).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd.
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

/// Resets a non-blocking eventfd's counter.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
    unsafe {
        libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8);
    }
}

/// An epoll set.
pub(crate) struct Epoll {
    ep: OwnedFd,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 with a valid flag; returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 just returned this descriptor; we own it.
        let ep = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { ep })
    }

    /// `EPOLL_CTL_ADD` of `target` for `events`, reported with `tag`.
    pub(crate) fn add(&self, target: BorrowedFd<'_>, events: u32, tag: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, target, events, tag)
    }

    /// `EPOLL_CTL_MOD` of `target` to `events` (0: registered but never
    /// reported, and its wake-ups no longer wake this set's waiters).
    pub(crate) fn modify(&self, target: BorrowedFd<'_>, events: u32, tag: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, target, events, tag)
    }

    /// `EPOLL_CTL_DEL` of `target`.
    pub(crate) fn delete(&self, target: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, target, 0, 0)
    }

    fn ctl(
        &self,
        op: libc::c_int,
        target: BorrowedFd<'_>,
        events: u32,
        tag: u64,
    ) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: tag };
        // SAFETY: `ev` is a live epoll_event; both descriptors are open.
        let r = unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, target.as_raw_fd(), &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for events (`timeout_ms` < 0: for ever); returns the tags.
    pub(crate) fn wait(&self, out: &mut [u64], timeout_ms: i32) -> usize {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let max = out.len().min(evs.len()) as i32;
        // SAFETY: `evs` is a live array of at least `max` epoll_event structs.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), evs.as_mut_ptr(), max, timeout_ms) };
        let n = n.max(0) as usize;
        for (o, e) in out.iter_mut().zip(&evs[..n]) {
            *o = e.u64;
        }
        n
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ep.as_fd()
    }
}

/// The CPUs the calling thread may run on, in ascending order (empty if the
/// mask cannot be read).
pub(crate) fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    let Ok(set) = sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Binds the calling thread to `cpu`.
pub(crate) fn pin_to(cpu: usize) -> io::Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

/// `/proc/self/task/TID/stat` of one thread of this process, kept open:
/// each [`ThreadStat::cpu`] is one `pread` (about 7 µs here, against 23 µs
/// with the open and close).
pub(crate) struct ThreadStat {
    file: std::fs::File,
}

impl ThreadStat {
    /// Opens thread `tid`'s stat file; `None` if it is gone or there is no
    /// `/proc`.
    /// A thread of another process (a client of `serve`, whose fault
    /// messages carry its thread ids) is found as `/proc/TID`, in the same
    /// PID namespace.
    pub(crate) fn open(tid: u32) -> Option<ThreadStat> {
        let file = std::fs::File::open(format!("/proc/self/task/{tid}/stat"))
            .or_else(|_| std::fs::File::open(format!("/proc/{tid}/stat")))
            .ok()?;
        Some(ThreadStat { file })
    }

    /// The CPU the thread last ran on (`None` once it has exited).
    pub(crate) fn cpu(&self) -> Option<usize> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 1024];
        let mut n = 0;
        while n < buf.len() {
            match self.file.read_at(&mut buf[n..], n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        parse_last_cpu(&buf[..n])
    }
}

/// Field 39 (`processor`) of a `stat` line. The command name (field 2) is
/// in parentheses and may hold spaces and parentheses itself, so fields are
/// counted from the last `)`.
fn parse_last_cpu(stat: &[u8]) -> Option<usize> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // `rest` starts with field 3.
    rest.split_ascii_whitespace().nth(39 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_cpu_field_is_found_after_the_command_name() {
        let mut line = String::from("4242 (a) b (c)) S");
        for f in 4..=38 {
            line.push_str(&format!(" {f}"));
        }
        line.push_str(" 7 0 0 0\n");
        assert_eq!(parse_last_cpu(line.as_bytes()), Some(7));
        assert_eq!(parse_last_cpu(b"1 (x) S 1 2"), None);
    }

    #[test]
    fn this_thread_runs_on_an_allowed_cpu() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let tid = nix::unistd::gettid().as_raw() as u32;
        let stat = ThreadStat::open(tid).expect("own stat file");
        let cpu = stat.cpu().expect("own stat line");
        assert!(cpus.contains(&cpu), "{cpu} not in {cpus:?}");
        // Read again through the same descriptor.
        let cpu = stat.cpu().expect("own stat line again");
        assert!(cpus.contains(&cpu), "{cpu} not in {cpus:?}");
    }
}
