//! Turns a SIGBUS inside a shadow mapping into a clear message and exit 1:
//! a lazy page that could not be read from its source is poisoned, and the
//! CLI is the consumer that touches it.
//!
//! `cat` also registers how far its output has got ([`set_written`]): the
//! handler first writes the bytes of the mapping between that point and the
//! faulting page (all filled, since `cat` touches pages in order), so that
//! stdout ends exactly at the offset the message names.
//!
//! A SIGBUS anywhere else (outside the watched mapping, or sent with
//! `kill`) gets the default action: the process dies by SIGBUS, as it would
//! without the handler.
//!
//! Why the page could not be filled is known to the library, which a signal
//! handler may not call (it takes locks). So the handler passes the offset
//! through a pipe to a thread started by [`watch`], which asks the library
//! ([`shadowfd::Shadow::unfillable_cause`]), reports the cause and exits;
//! the faulting thread waits in the handler meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

static BASE: AtomicUsize = AtomicUsize::new(0);
static LEN: AtomicUsize = AtomicUsize::new(0);
/// Bytes of the mapping already written to stdout, plus one; 0 when the
/// command does not stream the mapping to stdout.
static WRITTEN: AtomicUsize = AtomicUsize::new(0);
/// Whether the message also goes to stdout as `{"error": ...}` (`--json`).
static JSON: AtomicBool = AtomicBool::new(false);
/// Write end of the pipe to the explaining thread, or -1.
static EXPLAIN: AtomicI32 = AtomicI32::new(-1);

/// The message for a page that could not be filled at `off`.
fn message(off: u64, cause: Option<String>) -> String {
    match cause {
        Some(c) => {
            format!("the shadow could not be filled at offset {off}: {c}; the page raises SIGBUS")
        }
        None => format!("the shadow could not be filled at offset {off}; the page raises SIGBUS"),
    }
}

/// Reports `msg` on stderr (and as JSON on stdout with `--json`).
fn report(msg: &str) {
    write_all_raw(2, format!("shadowfd: error: {msg}\n").as_bytes());
    if JSON.load(Ordering::SeqCst) {
        let v = serde_json::json!({ "error": msg });
        write_all_raw(1, format!("{v}\n").as_bytes());
    }
}

/// Why a local shadow's page at an offset could not be filled.
pub fn local_cause(shadow: Arc<shadowfd::Shadow>) -> Explain {
    Box::new(move |off| shadow.unfillable_cause(off).map(|c| c.to_string()))
}

/// Says why the page at an offset of the watched mapping raised SIGBUS.
pub type Explain = Box<dyn Fn(u64) -> Option<String> + Send>;

/// Marks `map`, a mapping of a file from offset 0, as the mapping whose
/// SIGBUS is explained, by `explain`.
pub fn watch(map: &[u8], explain: Explain) {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
        let rd = fds[0];
        let spawned = std::thread::Builder::new()
            .name("shadowfd-sigbus".into())
            .spawn(move || {
                let mut b = [0u8; 8];
                // SAFETY: reads 8 bytes into a live buffer from our pipe.
                let n = unsafe { libc::read(rd, b.as_mut_ptr().cast(), 8) };
                if n != 8 {
                    return;
                }
                let off = u64::from_le_bytes(b);
                report(&message(off, explain(off)));
                // The blocks of an s3:// object fetched before this page
                // go to the disk cache first (bounded).
                crate::object::finish_cache_writes();
                // SAFETY: ends the process; the faulting thread waits in the
                // handler and nothing else needs to run.
                unsafe { libc::_exit(1) }
            });
        if spawned.is_ok() {
            EXPLAIN.store(fds[1], Ordering::SeqCst);
        }
    }
    BASE.store(map.as_ptr() as usize, Ordering::SeqCst);
    LEN.store(map.len(), Ordering::SeqCst);
    // SAFETY: installs a handler that only calls async-signal-safe functions
    // (write, sigaction, raise, _exit) and reads atomics; sa_mask/flags are
    // initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// Says that the first `n` bytes of the watched mapping are on stdout (and
/// nothing of it is buffered): on a SIGBUS, the bytes from `n` up to the
/// faulting page are written before the message. Only for a caller that
/// touches the mapping's pages in order, so that they are all filled.
pub fn set_written(n: usize) {
    WRITTEN.store(n + 1, Ordering::SeqCst);
}

/// Also reports a SIGBUS on stdout as one JSON object with an `error` field.
pub fn report_in_json() {
    JSON.store(true, Ordering::SeqCst);
}

fn fmt_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// `write(2)` all of `p` to `fd`, retrying short writes and EINTR; gives up
/// on any other error (a closed pipe, ...). Async-signal-safe.
fn write_all_raw(fd: libc::c_int, mut p: &[u8]) {
    while !p.is_empty() {
        // SAFETY: write(2) is async-signal-safe; `p` is a live byte slice.
        let n = unsafe { libc::write(fd, p.as_ptr().cast(), p.len()) };
        if n > 0 {
            p = &p[n as usize..];
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return;
        }
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    let base = BASE.load(Ordering::SeqCst);
    let len = LEN.load(Ordering::SeqCst);
    // A fault raised by the kernel (si_code > 0) inside our mapping.
    let ours = code > 0 && base != 0 && addr >= base && addr < base + len;
    if !ours {
        // Not ours to explain: the default action, as if no handler were
        // installed. The signal is blocked while this handler runs, so the
        // raised one is delivered on return (and a fault, re-executed,
        // raises it again under the default action).
        // SAFETY: sigaction and raise are async-signal-safe; `sa` is
        // initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
            libc::raise(sig);
        }
        return;
    }
    // SAFETY: sysconf is async-signal-safe in practice (it reads a value the
    // kernel passed at exec); a page size is never negative.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    // The poisoned unit is the page: name its start.
    let off = (addr - base) / page * page;
    let written = WRITTEN.load(Ordering::SeqCst);
    if written > 0 && written - 1 < off {
        // SAFETY: bytes [written-1, off) of the watched mapping lie before
        // the faulting page and were touched in order before it, so they are
        // filled and readable; the mapping lives until the process exits.
        let pending = unsafe {
            std::slice::from_raw_parts((base + written - 1) as *const u8, off - (written - 1))
        };
        write_all_raw(1, pending);
    }
    let pipe = EXPLAIN.load(Ordering::SeqCst);
    if pipe >= 0 {
        let b = (off as u64).to_le_bytes();
        // SAFETY: write(2) of 8 live bytes to our pipe is async-signal-safe.
        if unsafe { libc::write(pipe, b.as_ptr().cast(), 8) } == 8 {
            // The explaining thread reports and exits the process.
            loop {
                // SAFETY: pause(2) is async-signal-safe.
                unsafe { libc::pause() };
            }
        }
    }
    let mut num = [0u8; 20];
    let num = fmt_u64(off as u64, &mut num);
    // The message holds no character that JSON would need escaped.
    let msg: [&[u8]; 3] = [
        b"the shadow could not be filled at offset ",
        num,
        b"; the page raises SIGBUS",
    ];
    write_all_raw(2, b"shadowfd: error: ");
    for p in msg {
        write_all_raw(2, p);
    }
    write_all_raw(2, b"\n");
    if JSON.load(Ordering::SeqCst) {
        write_all_raw(1, b"{\"error\":\"");
        for p in msg {
            write_all_raw(1, p);
        }
        write_all_raw(1, b"\"}\n");
    }
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(1) }
}
