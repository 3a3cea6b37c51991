//! Each fill thread's bounce buffer: the source is read into it, and it is
//! installed from there with `UFFDIO_COPY`. At most [`PIECE`] bytes a thread
//! (fills of larger runs go piece by piece), and given back when a worker
//! parks or a `populate` returns, so idle threads hold no fill memory.

use std::cell::RefCell;

/// The most a fill reads and installs at once.
pub(crate) const PIECE: usize = 1 << 20;

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's buffer, at least `len` (≤ [`PIECE`]) bytes.
pub(crate) fn with<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    debug_assert!(len <= PIECE);
    BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0);
            }
            f(&mut v[..len])
        }
        // A fill inside a fill on one thread (a source that faults on a
        // shadow of the same engine): a buffer of its own.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// Frees this thread's buffer.
pub(crate) fn release() {
    BUF.with(|b| {
        if let Ok(mut v) = b.try_borrow_mut() {
            *v = Vec::new();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_on_demand_and_is_released() {
        with(4096, |b| assert_eq!(b.len(), 4096));
        with(100, |b| {
            assert_eq!(b.len(), 100);
            // Nested use gets a buffer of its own.
            with(10, |c| assert_eq!(c.len(), 10));
        });
        release();
        BUF.with(|b| assert_eq!(b.borrow().capacity(), 0));
    }
}
