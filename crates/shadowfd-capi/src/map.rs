//! Mapping shadows into this process: `shadowfd_map` and `shadowfd_unmap`,
//! `shadowfd_register` of a caller's own mapping, and the descriptor to map
//! (`shadowfd_mapping_fd`).

use super::*;

/// Maps `len` bytes of the shadow from `offset`, read-only, and stores the
/// address in `*out`. `offset` must be a multiple of the page size; `len` 0
/// means "to the end of the shadow"; a range past the end is -ERANGE.
/// `flags` is `SHADOWFD_MAP_SHARED` (0) or `SHADOWFD_MAP_PRIVATE`.
///
/// `fixed_addr_or_null` NULL lets the kernel pick the address. Otherwise it
/// must be page-aligned and the page-rounded range must be address space the
/// caller reserved (e.g. `mmap(PROT_NONE)`), not in use by another
/// `shadowfd_map` or `shadowfd_register` (-EEXIST): the mapping replaces the
/// reservation there (`MAP_FIXED`).
///
/// A lazy mapping is registered with the engine before it becomes readable:
/// first touches are filled from the source; a page that cannot be read
/// raises SIGBUS, as an I/O error under a file mapping does. Lazy mappings
/// follow `mremap`, `munmap` and `fork` like file mappings (a child is served
/// through its own userfaultfd), where the kernel grants fork events
/// (`CAP_SYS_PTRACE`); without them they are `MADV_DONTFORK`.
///
/// A client shadow (`shadowfd_client_open`) is mapped whole: `offset` 0 and
/// `len` 0 or its size (another range inside it is -EOPNOTSUPP), with
/// `fixed_addr_or_null` NULL (else -EOPNOTSUPP). Both flags give the same
/// read-only view (a private mapping of the server's sealed memfd). It is
/// lazy where the client has a userfaultfd and the server's shadow is lazy,
/// filled by the server on first touch, else a sealed copy; a page the
/// server cannot provide, and every unfilled page once the server is gone,
/// raises SIGBUS (never zeros, never a hang).
///
/// Ownership: the library keeps the mapping (keyed by its address) until
/// `shadowfd_unmap(*out, len)`. Never `munmap` it yourself. It stays valid
/// after `shadowfd_shadow_free` and `shadowfd_engine_free` (or
/// `shadowfd_client_free`). Returns 0 or a
/// negative errno. Thread-safety: any thread. Refused (-EDEADLK) inside a
/// source callback.
///
/// # Safety
/// `shadow` is NULL or live; `out` is NULL or writable; a non-NULL
/// `fixed_addr_or_null` names a range as described above, which no other
/// thread touches until this returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_map(
    shadow: *mut shadowfd_shadow,
    offset: u64,
    len: usize,
    flags: c_int,
    fixed_addr_or_null: *mut c_void,
    out: *mut *mut c_void,
) -> c_int {
    const F: &str = "shadowfd_map";
    guard(|| {
        in_callback_refusal(F)?;
        // SAFETY: the caller vouches for the pointer.
        let s = unsafe { handle(F, "shadow", shadow) }?;
        if out.is_null() {
            return Err(Failure::einval(format!("{F}: out is NULL")));
        }
        let share = match flags {
            SHADOWFD_MAP_SHARED => Share::Shared,
            SHADOWFD_MAP_PRIVATE => Share::Private,
            _ => {
                return Err(Failure::einval(format!(
                    "{F}: unknown flags {flags:#x}; use SHADOWFD_MAP_SHARED (0) or \
                     SHADOWFD_MAP_PRIVATE"
                )));
            }
        };
        let size = s.size();
        let len = if len == 0 {
            size.saturating_sub(offset)
        } else {
            len as u64
        };
        if len == 0 && offset <= size {
            return Err(Failure::einval(format!(
                "{F}: nothing to map: the shadow of {} is {size} bytes and the range from \
                 offset {offset} is empty",
                s.name()
            )));
        }
        let local = match &s.inner {
            ShadowKind::Local(l) => l,
            ShadowKind::Remote(f) => {
                let m = client::map(F, f, offset, len, fixed_addr_or_null)?;
                let addr = m.as_ptr() as *mut c_void;
                registry::insert_remote(m);
                // SAFETY: checked non-null above; the caller vouches it is
                // writable.
                unsafe { out.write(addr) };
                return Ok(0);
            }
        };
        let opts = local.map_options().offset(offset).len(len).share(share);
        let mapping = match NonNull::new(fixed_addr_or_null.cast::<u8>()) {
            None => opts.map()?,
            Some(at) => {
                let rounded = registry::round_up(len)?;
                registry::check_free(F, at.as_ptr() as usize, rounded)?;
                // SAFETY: the caller vouches the range is its own reservation
                // and untouched during the call; the registry says no
                // tracked mapping or registration is there.
                unsafe { opts.map_fixed(at) }?
            }
        };
        let addr = mapping.as_ptr() as *mut c_void;
        registry::insert_mapping(mapping);
        // SAFETY: checked non-null above; the caller vouches it is writable.
        unsafe { out.write(addr) };
        Ok(0)
    })
}

/// Undoes `shadowfd_map` or `shadowfd_register`: `addr` is the address they
/// were given or returned and `len` the length they were given (or that
/// length rounded up to a page; for a map with `len` 0, the mapped length).
///
/// - A mapping from `shadowfd_map` is unregistered and unmapped; one made at
///   a fixed address turns back into a `PROT_NONE` reservation, which stays
///   the caller's to release.
/// - A range from `shadowfd_register` is unregistered, then `munmap`ped.
///
/// A mapping the caller moved or cut (`mremap`, `munmap`) is still undone
/// at the address and length it was made with: only what is still its own
/// is unregistered and unmapped; a part moved elsewhere stays the caller's
/// to `munmap`. Undo it before the old address can be handed out again (in
/// a threaded program, before another thread maps): a new mapping made
/// over it replaces the old one in the library's books.
///
/// Returns 0, or -EINVAL if no mapping or registration starts at `addr` or
/// `len` does not match it (nothing is changed then). Thread-safety: any
/// thread; no thread may touch the range during or after the call.
///
/// # Safety
/// Nothing may use the range any more.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_unmap(addr: *mut c_void, len: usize) -> c_int {
    guard(|| {
        registry::remove("shadowfd_unmap", addr as usize, len, registry::Undo::Unmap)?;
        Ok(0)
    })
}

/// Registers a mapping the caller made of `shadowfd_mapping_fd`: `len`
/// bytes at `addr` (page-aligned; `len` may end mid-page) showing the
/// shadow from `offset` (page-aligned), made `PROT_READ`, `MAP_PRIVATE` or
/// `MAP_SHARED`, `MAP_FIXED` or not. From now on faults on it are filled
/// from the source, as for `shadowfd_map`. Pages the range showed before
/// are dropped first (they are faulted and checked again); a `MAP_SHARED`
/// range of a lazy shadow is replaced in place by an equivalent mapping the
/// kernel lets the engine register. For an eager shadow nothing needs
/// registering, but the range is tracked all the same.
///
/// Ownership: the library keeps the registration until
/// `shadowfd_unregister(addr, len)` (which leaves the mapping to the caller)
/// or `shadowfd_unmap(addr, len)` (which also unmaps it). Returns 0 or a
/// negative errno (-EEXIST if the range overlaps one already tracked).
/// Thread-safety: any thread. Refused (-EDEADLK) inside a source callback.
///
/// # Safety
/// `shadow` is NULL or live; `addr..addr+len` (page-rounded) is a read-only
/// mapping the caller made of `shadowfd_mapping_fd(shadow)` at `offset`,
/// which no other thread touches until this returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_register(
    shadow: *mut shadowfd_shadow,
    addr: *mut c_void,
    len: usize,
    offset: u64,
) -> c_int {
    const F: &str = "shadowfd_register";
    guard(|| {
        in_callback_refusal(F)?;
        // SAFETY: the caller vouches for the pointer.
        let s = unsafe { handle(F, "shadow", shadow) }?.local(F)?;
        let at = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| Failure::einval(format!("{F}: addr is NULL")))?;
        if len == 0 {
            return Err(Failure::einval(format!("{F}: len is 0")));
        }
        let rounded = registry::round_up(len as u64)?;
        registry::check_free(F, at.as_ptr() as usize, rounded)?;
        // SAFETY: the caller vouches for the range (see # Safety above).
        let reg = unsafe { s.register(at, len as u64, offset) }?;
        registry::insert_registration(at.as_ptr() as usize, rounded, reg);
        Ok(0)
    })
}

/// Drops the registration `shadowfd_register` made for `addr` and `len`,
/// and leaves the mapping in place for the caller to `munmap`. Touching an
/// unfilled page of a lazy shadow's range afterwards shows zeros or, for a
/// range that was `MAP_SHARED`, whatever the memfd holds: unmap it first.
/// Returns 0 or -EINVAL (nothing registered there; a `shadowfd_map` mapping,
/// which takes `shadowfd_unmap`). Thread-safety: any thread.
///
/// # Safety
/// No thread may touch the range during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_unregister(addr: *mut c_void, len: usize) -> c_int {
    guard(|| {
        registry::remove(
            "shadowfd_unregister",
            addr as usize,
            len,
            registry::Undo::Unregister,
        )?;
        Ok(0)
    })
}

/// The descriptor to `mmap` the shadow with before `shadowfd_register`.
/// Borrowed: it belongs to the shadow, stays valid until
/// `shadowfd_shadow_free`, and must not be closed or handed to another
/// process (for a lazy shadow it shows zeros where nothing was filled yet;
/// `shadowfd_fd` is the descriptor to hand out). -EINVAL for NULL.
/// Thread-safety: any thread.
///
/// # Safety
/// `shadow` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shadowfd_mapping_fd(shadow: *const shadowfd_shadow) -> c_int {
    guard(|| {
        // SAFETY: the caller vouches for the pointer.
        let s = unsafe { handle("shadowfd_mapping_fd", "shadow", shadow) }?;
        Ok(s.local("shadowfd_mapping_fd")?.mapping_fd().as_raw_fd())
    })
}
