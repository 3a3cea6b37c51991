//! The shared-shadow table's entries: one per source identity, holding a
//! lazy or eager shadow (or the sealed descriptor of the one-shadow
//! [`serve`]), with its users and attached ranges counted.

use super::*;

/// What a shadow entry holds.
pub(super) enum Held {
    Shadow(Shadow),
    /// A sealed read-only descriptor (the one-shadow [`serve`] of an eager
    /// or materialized shadow).
    Sealed {
        fd: OwnedFd,
        meta: SourceMeta,
        name: String,
    },
}

/// Identity of a source: container (device, or image identity), inode,
/// size, mtime.
pub(super) type Key = (u64, u64, u64, u64, i64, i64);

pub(super) struct Entry {
    pub(super) id: u64,
    pub(super) key: Key,
    pub(super) held: Held,
    /// Open handles on it, over all clients.
    pub(super) users: AtomicUsize,
    /// Lazy ranges attached to it, over all clients (counted here, so that
    /// STATS never waits on the shadow's own locks).
    pub(super) attached: AtomicUsize,
    pub(super) last_used: Mutex<Instant>,
}

impl Entry {
    pub(super) fn meta(&self) -> &SourceMeta {
        match &self.held {
            Held::Shadow(s) => s.meta(),
            Held::Sealed { meta, .. } => meta,
        }
    }
    pub(super) fn name(&self) -> &str {
        match &self.held {
            Held::Shadow(s) => s.name(),
            Held::Sealed { name, .. } => name,
        }
    }
    pub(super) fn size(&self) -> u64 {
        self.meta().size
    }
    pub(super) fn lazy(&self) -> Option<&Arc<LazyShadow>> {
        match &self.held {
            Held::Shadow(Shadow {
                kind: Kind::Lazy(l),
                ..
            }) => Some(l),
            _ => None,
        }
    }
    pub(super) fn resident(&self) -> u64 {
        match &self.held {
            Held::Shadow(Shadow {
                kind: Kind::Lazy(l),
                ..
            }) => l.resident_bytes(),
            Held::Shadow(s) => s.resident_bytes().unwrap_or(0),
            Held::Sealed { meta, .. } => meta.size,
        }
    }
    pub(super) fn stats(&self) -> Stats {
        match &self.held {
            Held::Shadow(s) => s.stats(),
            Held::Sealed { meta, .. } => Stats {
                bytes_filled: meta.size,
                resident_bytes: meta.size,
                ..Stats::default()
            },
        }
    }
    pub(super) fn mode(&self) -> &'static str {
        match &self.held {
            Held::Shadow(s) if s.mode() == crate::Mode::Lazy => "lazy",
            _ => "eager",
        }
    }
    pub(super) fn sealed_fd(&self) -> Result<OwnedFd> {
        match &self.held {
            Held::Shadow(s) => s.reopen_readonly(),
            Held::Sealed { fd, .. } => fd
                .try_clone()
                .map_err(|e| Error::sys("duplicate the shadow descriptor", e)),
        }
    }
    pub(super) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        match &self.held {
            Held::Shadow(s) => s.read_at(buf, offset),
            Held::Sealed { fd, meta, .. } => {
                let n = (buf.len() as u64).min(meta.size.saturating_sub(offset)) as usize;
                let f = std::fs::File::from(
                    fd.try_clone()
                        .map_err(|e| Error::sys("duplicate the shadow descriptor", e))?,
                );
                f.read_exact_at(&mut buf[..n], offset)
                    .map_err(|e| Error::sys("read the shadow", e))?;
                Ok(n)
            }
        }
    }
}

pub(super) fn entry_materialize(e: &Entry) -> Result<()> {
    match &e.held {
        Held::Shadow(s) => s.materialize(),
        Held::Sealed { .. } => Ok(()),
    }
}
