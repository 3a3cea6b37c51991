//! The eager path: copy the whole source into a memfd at open, then seal it.
//!
//! This is what sandboxes do today, done carefully: bounded by a cap, short
//! reads handled, EOF before the recorded size is an error (never zeros),
//! and the copy is retried if the source changes while it is being read.
//!
//! # Tampering
//!
//! The memfd can be sealed only once it is written, so while the copy runs it
//! is writable, and any process allowed to open `/proc/PID/fd/N` of this
//! process (the same uid while the process is dumpable, or root) can reopen
//! it `O_RDWR` and write into it. So the copy keeps a 128-bit XXH3 digest of
//! every block *as read from the source* (the heap buffer, never the memfd),
//! and after `F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL` are
//! applied (from then on nobody can change the bytes) it reads the memfd back
//! once and compares block by block. A memfd that differs, has another size,
//! could not be write-sealed because someone still maps it writable
//! (`EBUSY`), or was sealed by someone else (`EPERM`) is refused with
//! [`Error::Tampered`], naming the first differing block when there is one.
//!
//! A tampered copy is not retried: nothing but another process writes into a
//! memfd that only this process created, so the cause is an attacker and not
//! a race to wait out; a retry would hand it another window and double the
//! cost, and could only succeed if it gave up. The caller sees the refusal at
//! once. Keeping other processes out is the embedder's part
//! ([`crate::harden_process`], or a uid of its own).

use crate::error::{Error, Result};
use crate::source::{ReadFail, Source, SourceMeta, read_full};
use crate::sys::memfd::{EAGER_SEALS, Memfd};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use std::os::fd::AsFd;
use xxhash_rust::xxh3::xxh3_128;

/// Copy unit: large enough to amortise syscalls, small enough to stay in cache.
/// Also the unit of the digests the copy is verified against.
const COPY_CHUNK: usize = 1 << 20;
/// Attempts before giving up on a source that keeps changing. (A tampered
/// memfd is never retried; see the module documentation.)
const ATTEMPTS: u32 = 3;

/// Copies `source` (whose metadata at open is `meta`) into a new sealed
/// memfd. `meta` is updated to the metadata the snapshot corresponds to.
/// `check` vets the size before every attempt (the size cap): a source that
/// grows while it is copied is checked again before the retry.
pub(crate) fn snapshot(
    source: &dyn Source,
    meta: &mut SourceMeta,
    check: impl Fn(&SourceMeta) -> Result<()>,
    progress: &dyn Fn(u64, u64),
) -> Result<Memfd> {
    let name = source.name();
    let mut buf = vec![0u8; COPY_CHUNK.min(meta.size as usize).max(1)];
    for _ in 0..ATTEMPTS {
        check(meta)?;
        if buf.len() < COPY_CHUNK.min(meta.size as usize) {
            buf.resize(COPY_CHUNK.min(meta.size as usize), 0);
        }
        let memfd = Memfd::create(&name, meta.size)?;
        let digests = copy_into(source, &memfd, meta.size, &mut buf, &name, progress)?;
        let after = source.metadata().map_err(|e| Error::SourceRead {
            what: name.clone(),
            offset: meta.size,
            source: e,
        })?;
        if after == *meta {
            seal(&memfd, &name)?;
            verify(&memfd, meta.size, &digests, &mut buf, &name)?;
            return Ok(memfd);
        }
        *meta = after;
    }
    Err(Error::SourceChanged {
        what: name,
        attempts: ATTEMPTS,
    })
}

/// Copies `size` bytes of `src` into `memfd` in blocks of `buf.len()`, and
/// returns the digest of each block as it was read from the source.
fn copy_into(
    src: &dyn Source,
    memfd: &Memfd,
    size: u64,
    buf: &mut [u8],
    name: &str,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<u128>> {
    let mut digests = Vec::with_capacity(size.div_ceil(buf.len() as u64) as usize);
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        match read_full(src, &mut buf[..n], off) {
            Ok(()) => {}
            Err(ReadFail::Eof { done }) => {
                return Err(Error::SourceShort {
                    what: name.to_string(),
                    at: off + done as u64,
                    size,
                });
            }
            Err(ReadFail::Error { done, error }) => {
                return Err(Error::SourceRead {
                    what: name.to_string(),
                    offset: off + done as u64,
                    source: error,
                });
            }
        }
        digests.push(xxh3_128(&buf[..n]));
        memfd.write_all_at(&buf[..n], off).map_err(|e| {
            if e.raw_os_error() == Some(libc::EPERM) {
                // Only seals make a write to our own memfd fail with EPERM,
                // and we have added none yet.
                tampered(
                    name,
                    format!("someone else sealed it, so writing at offset {off} failed with EPERM"),
                    None,
                )
            } else {
                Error::sys(format!("write to the memfd at offset {off}"), e)
            }
        })?;
        off += n as u64;
        progress(off, size);
    }
    Ok(digests)
}

/// Applies [`EAGER_SEALS`], telling apart the failures another process causes.
fn seal(memfd: &Memfd, name: &str) -> Result<()> {
    let seals = SealFlag::from_bits_retain(EAGER_SEALS);
    match fcntl(memfd.as_fd(), FcntlArg::F_ADD_SEALS(seals)) {
        Ok(_) => Ok(()),
        Err(Errno::EBUSY) => Err(tampered(
            name,
            "another process still maps it writable (or holds its pages pinned), so \
             F_SEAL_WRITE failed with EBUSY"
                .into(),
            None,
        )),
        Err(Errno::EPERM) => Err(tampered(
            name,
            "someone else added F_SEAL_SEAL, so its seals could not be added (EPERM)".into(),
            None,
        )),
        Err(e) => Err(Error::sys("fcntl(F_ADD_SEALS)", e)),
    }
}

/// Reads the sealed `memfd` back (one pass, in blocks of `buf.len()`) and
/// checks its size and every block against the digests of the bytes read
/// from the source.
fn verify(memfd: &Memfd, size: u64, digests: &[u128], buf: &mut [u8], name: &str) -> Result<()> {
    let len = nix::sys::stat::fstat(memfd.as_fd())
        .map_err(|e| Error::sys("fstat the sealed memfd", e))?
        .st_size as u64;
    if len != size {
        return Err(tampered(
            name,
            format!("it is {len} bytes long, not the {size} bytes copied into it"),
            Some(len.min(size)),
        ));
    }
    let mut off = 0u64;
    for &want in digests {
        let n = (size - off).min(buf.len() as u64) as usize;
        let got = read_back(memfd, &mut buf[..n], off)?;
        if got < n {
            let at = off + got as u64;
            return Err(tampered(
                name,
                format!("it ends at offset {at}, before the {size} bytes copied into it"),
                Some(at),
            ));
        }
        if xxh3_128(&buf[..n]) != want {
            let end = off + n as u64;
            return Err(tampered(
                name,
                format!(
                    "its bytes differ from those read from the source, first in the block \
                     at bytes {off}..{end}"
                ),
                Some(off),
            ));
        }
        off += n as u64;
    }
    Ok(())
}

/// `pread`s `buf` at `off` until full or end of file; the count read.
fn read_back(memfd: &Memfd, buf: &mut [u8], off: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match memfd.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let at = off + done as u64;
                return Err(Error::sys(
                    format!("read the sealed memfd back at offset {at}"),
                    e,
                ));
            }
        }
    }
    Ok(done)
}

fn tampered(name: &str, how: String, offset: Option<u64>) -> Error {
    Error::Tampered {
        what: name.to_string(),
        how,
        offset,
    }
}
