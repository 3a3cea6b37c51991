//! A file opened through a server: its handle, identity, reads and the
//! entry to mapping it.

use super::*;

pub(super) struct FileInner {
    pub(super) client: Client,
    pub(super) handle: u64,
    pub(super) path: String,
    pub(super) size: u64,
    pub(super) device: u64,
    pub(super) inode: u64,
    pub(super) mtime: (i64, i64),
    pub(super) shadow_id: u64,
    pub(super) lazy: bool,
    /// A file read whole by SMALL (handle 0, no shadow): its bytes.
    pub(super) inline: Option<Vec<u8>>,
    /// The link count, when SMALL said it (OPEN's reply has none).
    pub(super) nlink: Option<u64>,
    /// For an inline file: the same path opened the ordinary way, at the
    /// first need of a handle (mapping it, STATS).
    pub(super) opened: std::sync::OnceLock<RemoteFile>,
}

impl Drop for FileInner {
    fn drop(&mut self) {
        if self.inline.is_none() && !self.client.server_gone() {
            let f = Frame::new(wire::CLOSE, self.handle, 0, 0, 0);
            let _ = self.client.call(&f, "CLOSE", false);
        }
    }
}

/// A file opened on a server (a handle); closed when the last clone and
/// the last mapping of it are dropped.
#[derive(Clone)]
pub struct RemoteFile {
    pub(super) inner: Arc<FileInner>,
}

impl RemoteFile {
    /// Size in bytes (the source's size when the shadow was made).
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The path it was opened by.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// The handle number on the connection (0 for a file read whole by
    /// [`Client::small`], which has none until it is mapped).
    pub fn handle(&self) -> u64 {
        self.inner.handle
    }

    /// The link count, if the server said it ([`Client::small`] does;
    /// OPEN does not).
    pub fn nlink(&self) -> Option<u64> {
        self.inner.nlink
    }

    /// The file's bytes, if [`Client::small`] read it whole.
    pub fn inline_bytes(&self) -> Option<&[u8]> {
        self.inner.inline.as_deref()
    }

    /// The file with a handle: itself, or for an inline file the same path
    /// opened the ordinary way (once). That one is what the server serves
    /// now: if the file changed since SMALL read it (only possible when
    /// the tree is not immutable), its size and bytes are the new ones.
    pub(super) fn with_handle(&self) -> Result<RemoteFile> {
        if self.inner.inline.is_none() {
            return Ok(self.clone());
        }
        if let Some(f) = self.inner.opened.get() {
            return Ok(f.clone());
        }
        let f = self.inner.client.open(&self.inner.path)?;
        Ok(self.inner.opened.get_or_init(|| f).clone())
    }

    /// The source's identity: (device, inode, mtime seconds, mtime ns).
    pub fn identity(&self) -> (u64, u64, i64, i64) {
        let i = &self.inner;
        (i.device, i.inode, i.mtime.0, i.mtime.1)
    }

    /// The server's id of the shared shadow: clients that get the same id
    /// share one shadow (and one read of the source per chunk).
    pub fn shadow_id(&self) -> u64 {
        self.inner.shadow_id
    }

    /// Whether the server's shadow is lazy.
    pub fn is_lazy_shadow(&self) -> bool {
        self.inner.lazy
    }

    /// Reads up to `buf.len()` bytes at `offset` through FILL (no mapping):
    /// the server fills the range and sends the bytes, 1 MiB per request.
    /// Short only at the end of the file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if let Some(b) = &self.inner.inline {
            let from = offset.min(b.len() as u64) as usize;
            let n = buf.len().min(b.len() - from);
            buf[..n].copy_from_slice(&b[from..from + n]);
            return Ok(n);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            if at >= self.inner.size {
                break;
            }
            let want = ((buf.len() - done) as u64).min(wire::MAX_FILL);
            let f = Frame::new(wire::FILL, self.inner.handle, at, want, 0);
            let (r, _) = self
                .inner
                .client
                .call(&f, &format!("FILL at {at}"), false)?;
            let n = r.payload.len().min(buf.len() - done);
            if n == 0 {
                break;
            }
            buf[done..done + n].copy_from_slice(&r.payload[..n]);
            done += n;
        }
        Ok(done)
    }

    /// This shadow's counters as JSON (docs/protocol.md, STATS).
    pub fn stats_json(&self) -> Result<String> {
        let this = self.with_handle()?;
        let f = Frame::new(wire::STATS, this.inner.handle, 0, 0, 0);
        let (r, _) = this.inner.client.call(&f, "STATS", false)?;
        String::from_utf8(r.payload).map_err(|_| protocol("STATS reply is not UTF-8"))
    }

    /// Maps the whole file read-only (`MAP_PRIVATE`): lazily through this
    /// client's userfaultfd if it has one, else as a sealed descriptor.
    pub fn map(&self) -> Result<RemoteMapping> {
        self.map_options().map()
    }

    /// Options for mapping part of the file:
    /// `file.map_options().offset(o).len(n).map()`, or at an address the
    /// caller reserved with [`RemoteMapOptions::map_fixed`]. A part is
    /// attached with its file offset (protocol version 4).
    pub fn map_options(&self) -> RemoteMapOptions<'_> {
        RemoteMapOptions::new(self)
    }
}
