//! SMALL (protocol version 6): what several paths are and, for each small
//! regular file, its bytes, read from the source straight into the reply.
//! No handle and no shadow is made, and nothing of it stays in the server
//! once the reply is sent: a consumer that reads many small files whole
//! (`tar`, `cp -r`, `diff -r`) pays one request for up to
//! [`wire::SMALL_MAX_PATHS`] of them instead of STAT, OPEN, FILL and CLOSE
//! each (docs/protocol.md, SMALL).

use super::*;

/// Runs `f` as one request for the served image's staleness check
/// ([`crate::source::image::batch`]).
fn one_look<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "image")]
    {
        crate::source::image::batch(f)
    }
    #[cfg(not(feature = "image"))]
    {
        f()
    }
}

impl Inner {
    /// Answers SMALL: `a` = the largest size to send inline (at most
    /// [`wire::SMALL_MAX_FILE`]), `b` = the number of paths in the payload.
    pub(super) fn small(&self, conn: &Conn, f: &Frame) -> (Frame, Option<OwnedFd>) {
        if conn.version < 6 {
            return refuse(
                f.kind,
                wire::E_VERSION,
                format!(
                    "SMALL needs protocol version 6 and this session chose version {}; \
                     send HELLO with a = 6, or use STAT, OPEN and FILL",
                    conn.version
                ),
            );
        }
        if f.b == 0 || f.b > wire::SMALL_MAX_PATHS as u64 {
            return refuse(
                f.kind,
                wire::E_RANGE,
                format!(
                    "SMALL of {} paths; send 1 to {} per request",
                    f.b,
                    wire::SMALL_MAX_PATHS
                ),
            );
        }
        let paths = match wire::parse_paths(&f.payload, f.b) {
            Ok(p) => p,
            Err(e) => {
                return refuse(
                    f.kind,
                    wire::E_PROTOCOL,
                    format!(
                        "SMALL's payload is malformed: {e}; each path is a u16 length and its bytes"
                    ),
                );
            }
        };
        let cap = f.a.min(wire::SMALL_MAX_FILE);
        // Room for the records of every path, with the bytes of as many
        // files as fit (one allocation per request, not one per file).
        let most = (paths.len() * wire::SMALL_RECORD_HEAD)
            .saturating_add(paths.len().saturating_mul(cap as usize))
            .min(wire::SMALL_REPLY_BYTES);
        let mut out = Vec::with_capacity(most);
        let mut count = 0u64;
        // One look at whether a served image changed, for the whole
        // request: every record comes from the image as it was then.
        one_look(|| {
            for path in paths {
                if !self.small_record(&mut out, path, cap, count == 0) {
                    // The rest waits for another request.
                    break;
                }
                count += 1;
            }
        });
        (
            Frame::new(wire::SMALL | wire::REPLY, count, 0, 0, 0).with_payload(out),
            None,
        )
    }

    /// Appends one path's record to `out`: its STAT, and its bytes if it is
    /// a regular file of at most `cap` bytes that reads whole and
    /// unchanged. False, with nothing appended, if the record would take
    /// the payload past [`wire::SMALL_REPLY_BYTES`] (unless it is the
    /// `first`: every reply answers at least one path).
    fn small_record(&self, out: &mut Vec<u8>, path: &[u8], cap: u64, first: bool) -> bool {
        let fits = |out: &Vec<u8>, n: usize| {
            first || out.len() + wire::SMALL_RECORD_HEAD + n <= wire::SMALL_REPLY_BYTES
        };
        let s = match self.path_stat(path) {
            Ok(s) => s,
            Err((code, msg)) => {
                let r = wire::SmallRecord {
                    code,
                    kind: 0,
                    inline: false,
                    size: 0,
                    device: 0,
                    inode: 0,
                    mtime: (0, 0),
                    nlink: 0,
                    data: msg.into_bytes(),
                };
                if !fits(out, r.data.len()) {
                    return false;
                }
                wire::put_small(out, &r);
                return true;
            }
        };
        let mut r = wire::SmallRecord {
            code: 0,
            kind: s.kind,
            inline: false,
            size: s.size,
            device: s.device,
            inode: s.inode,
            mtime: (s.mtime.sec, s.mtime.nsec as u64),
            nlink: s.nlink,
            data: Vec::new(),
        };
        let small = s.kind == wire::KIND_FILE && s.size <= cap;
        if !fits(out, if small { s.size as usize } else { 0 }) {
            return false;
        }
        if small {
            // Read straight into the payload, after the head.
            let start = out.len();
            r.inline = true;
            wire::put_small_head(out, &r, s.size);
            let at = out.len();
            out.resize(at + s.size as usize, 0);
            if self.read_whole(path, &s, &mut out[at..]) {
                return true;
            }
            out.truncate(start);
            r.inline = false;
        }
        wire::put_small(out, &r);
        true
    }

    /// Reads the file at `path` whole into `buf` (its size), if its source
    /// is the one `s` describes (inode, size, mtime) before and after. False
    /// otherwise (changed, unreadable, or a one-file server): the client
    /// then opens it the ordinary way, which reports any error.
    fn read_whole(&self, path: &[u8], s: &tree::PathStat, buf: &mut [u8]) -> bool {
        self.try_read_whole(path, s, buf).is_some()
    }

    fn try_read_whole(&self, path: &[u8], s: &tree::PathStat, buf: &mut [u8]) -> Option<()> {
        let rel = tree::relative(path).ok()?;
        // Each opener reads the source's metadata as it opens it.
        let (source, meta): (Arc<dyn Source>, SourceMeta) = match &self.tree {
            TreeImpl::Tree(t) => {
                let o = t.open(rel).ok()?;
                (o.source, o.meta)
            }
            TreeImpl::Single(_) => return None,
        };
        let source = match &self.opts.source_hook {
            Some(h) => h(source),
            None => source,
        };
        let same = |m: &SourceMeta| {
            m.inode == s.inode && m.size == s.size && m.mtime == s.mtime && m.device == s.device
        };
        if !same(&meta) || buf.len() as u64 != s.size {
            return None;
        }
        let mut done = 0;
        while done < buf.len() {
            match source.read_at(&mut buf[done..], done as u64) {
                Ok(0) => return None,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        same(&source.fill_metadata().ok()?).then_some(())
    }
}
