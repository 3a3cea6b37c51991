//! The other access strategy: one thread owns the `ext4-view` handle (which
//! is `Rc`-based and cannot leave its thread) and serves reads sent to it
//! over a channel. Kept for comparison with the direct path (see
//! `docs/images.md` for the figures); every read is serialised through the
//! thread, copied through `ext4-view`'s block cache, and a read that does
//! not continue the previous one seeks from the start of the file.

use super::Pread;
use crossbeam_channel::{Sender, bounded};
use std::fs::File;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;

struct Request {
    offset: u64,
    buf: Vec<u8>,
    reply: Sender<(Vec<u8>, io::Result<usize>)>,
}

/// A reader thread and the way to reach it.
pub(super) struct ThreadReader {
    tx: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl ThreadReader {
    /// Starts the thread, which loads the filesystem from `image` and opens
    /// `path` (already canonical). Fails if either step fails.
    pub fn start(image: File, path: Vec<u8>) -> io::Result<ThreadReader> {
        let (tx, rx) = bounded::<Request>(0);
        let (ready_tx, ready_rx) = bounded::<io::Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name("shadowfd-ext4".into())
            .spawn(move || {
                let opened = ext4_view::Ext4::load(Box::new(Pread(image)))
                    .and_then(|fs| fs.open(path.as_slice()));
                let mut file = match opened {
                    Ok(f) => {
                        let _ = ready_tx.send(Ok(()));
                        f
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(io::Error::other(e.to_string())));
                        return;
                    }
                };
                for mut req in rx {
                    // ext4-view can panic on some sparse files; keep serving.
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        read(&mut file, &mut req.buf, req.offset)
                    }))
                    .unwrap_or_else(|_| Err(io::Error::other("ext4-view panicked while reading")));
                    let _ = req.reply.send((req.buf, r));
                }
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(ThreadReader {
                tx: Some(tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other("the ext4 reader thread died")),
        }
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let (reply, answer) = bounded(1);
        let req = Request {
            offset,
            buf: vec![0u8; buf.len()],
            reply,
        };
        let dead = || io::Error::other("the ext4 reader thread is gone");
        self.tx
            .as_ref()
            .ok_or_else(dead)?
            .send(req)
            .map_err(|_| dead())?;
        let (data, r) = answer.recv().map_err(|_| dead())?;
        let n = r?;
        buf[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }
}

fn read(file: &mut ext4_view::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    if file.position() != offset {
        file.seek_to(offset)
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    let mut done = 0;
    while done < buf.len() {
        match file.read_bytes(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            // Hand back what was read; the error recurs on the next call.
            Err(_) if done > 0 => break,
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
    Ok(done)
}

impl Drop for ThreadReader {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
