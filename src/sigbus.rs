//! Turns a SIGBUS inside a shadow mapping into a clear message and exit 1:
//! a lazy page that could not be read from its source is poisoned, and the
//! CLI is the consumer that touches it.

use std::sync::atomic::{AtomicUsize, Ordering};

static BASE: AtomicUsize = AtomicUsize::new(0);
static LEN: AtomicUsize = AtomicUsize::new(0);

/// Marks `map` as the mapping whose SIGBUS is explained.
pub fn watch(map: &[u8]) {
    BASE.store(map.as_ptr() as usize, Ordering::SeqCst);
    LEN.store(map.len(), Ordering::SeqCst);
    // SAFETY: installs a handler that only calls async-signal-safe functions
    // (write, _exit) and reads atomics; sa_mask/flags are initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
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

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let base = BASE.load(Ordering::SeqCst);
    let len = LEN.load(Ordering::SeqCst);
    let mut parts: [&[u8]; 3] = [
        b"shadowfd: error: SIGBUS outside the shadow mapping\n",
        b"",
        b"",
    ];
    let mut num = [0u8; 20];
    if base != 0 && addr >= base && addr < base + len {
        parts = [
            b"shadowfd: error: the shadow could not be filled at offset ",
            fmt_u64((addr - base) as u64, &mut num),
            b" (the source failed to read there, changed under a strict policy, or the memory budget ran out); the page raises SIGBUS for every consumer\n",
        ];
    }
    for p in parts {
        // SAFETY: write(2) is async-signal-safe; `p` is a live byte slice.
        unsafe {
            libc::write(2, p.as_ptr().cast(), p.len());
        }
    }
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(1) }
}
