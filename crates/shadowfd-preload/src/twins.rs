//! The next definition of a libc function (`real!`), and the exported
//! entry points of one C type and one behaviour generated from one body
//! (`twins!`: the `foo`/`foo64` twins, `stat`/`lstat`, ...). Declared
//! first in lib.rs (`#[macro_use]`), so every module can use both.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Resolves the next definition of a libc function once, as a typed
/// function pointer.
macro_rules! real {
    (@sym $name:ident, $ty:ty) => {
        real!(@at concat!(stringify!($name), "\0"), $ty)
    };
    ($name:literal, $ty:ty) => {
        real!(@at concat!($name, "\0"), $ty)
    };
    (@at $cname:expr, $ty:ty) => {{
        static P: ::std::sync::atomic::AtomicUsize = ::std::sync::atomic::AtomicUsize::new(0);
        let p = $crate::twins::resolve(&P, $cname);
        #[allow(unused_unsafe)]
        // SAFETY: `p` is glibc's definition of this symbol, whose C type is
        // `$ty`.
        let f = unsafe { std::mem::transmute::<usize, $ty>(p) };
        f
    }};
}

/// The `foo`/`foo64` twins (and other names of one C type and one
/// behaviour, such as `stat`/`lstat`): one exported `extern "C"` function
/// a name, each running the same body with `$real` bound to the next
/// definition of its own name.
///
/// ```ignore
/// twins! {
///     /// What they do.
///     [pread, pread64] fn(fd: c_int, buf: *mut c_void, n: SizeT, off: OffT) -> SsizeT,
///     real: PreadFn => { /* the body, calling real(...) to forward */ }
/// }
/// ```
macro_rules! twins {
    ($(#[$m:meta])* [$($name:ident),+ $(,)?] $($sig:tt)*) => {
        twins!(@each [$(#[$m])*] [$($name),+] ($($sig)*));
    };
    (@each [$($attrs:tt)*] [] ($($sig:tt)*)) => {};
    (@each [$($attrs:tt)*] [$name:ident $(, $more:ident)*] ($($sig:tt)*)) => {
        twins!(@one [$($attrs)*] $name $($sig)*);
        twins!(@each [$($attrs)*] [$($more),*] ($($sig)*));
    };
    (
        @one [$(#[$m:meta])*] $name:ident
        fn($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty,
        $real:ident: $rty:ty => $body:block
    ) => {
        $(#[$m])*
        ///
        /// # Safety
        #[doc = concat!("libc's `", stringify!($name), "`.")]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            let $real: $rty = real!(@sym $name, $rty);
            $body
        }
    };
}

/// The next definition of `name` (NUL-terminated), cached in `slot`.
pub(crate) fn resolve(slot: &AtomicUsize, name: &'static str) -> usize {
    let p = slot.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    // SAFETY: a NUL-terminated symbol name; dlsym has no other precondition.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) } as usize;
    if p == 0 {
        // Nothing to fall back on: say so and stop.
        let msg = format!(
            "shadowfd-preload: no next definition of {}\n",
            name.trim_end_matches('\0')
        );
        // SAFETY: writes a live buffer to stderr.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        std::process::abort();
    }
    slot.store(p, Ordering::Relaxed);
    p
}
