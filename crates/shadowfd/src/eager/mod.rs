//! The eager path: copy the whole source into a memfd at open, then seal it.
//!
//! This is what sandboxes do today, done carefully: bounded by a cap, short
//! reads handled, EOF before the recorded size is an error (never zeros),
//! and the copy is retried if the source changes while it is being read.

use crate::error::{Error, Result};
use crate::source::{ReadFail, Source, SourceMeta, read_full};
use crate::sys::memfd::{EAGER_SEALS, Memfd};

/// Copy unit: large enough to amortise syscalls, small enough to stay in cache.
const COPY_CHUNK: usize = 1 << 20;
/// Attempts before giving up on a source that keeps changing.
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
        copy_into(source, &memfd, meta.size, &mut buf, &name, progress)?;
        let after = source.metadata().map_err(|e| Error::SourceRead {
            what: name.clone(),
            offset: meta.size,
            source: e,
        })?;
        if after == *meta {
            memfd.add_seals(EAGER_SEALS)?;
            return Ok(memfd);
        }
        *meta = after;
    }
    Err(Error::SourceChanged {
        what: name,
        attempts: ATTEMPTS,
    })
}

fn copy_into(
    src: &dyn Source,
    memfd: &Memfd,
    size: u64,
    buf: &mut [u8],
    name: &str,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
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
        memfd
            .write_all_at(&buf[..n], off)
            .map_err(|e| Error::sys(format!("write to the memfd at offset {off}"), e))?;
        off += n as u64;
        progress(off, size);
    }
    Ok(())
}
