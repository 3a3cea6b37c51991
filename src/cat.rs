//! `shadowfd cat`.

use crate::{CliResult, Common, Target, sigbus};
use clap::Args;
use shadowfd::Share;
use std::io::Write;
use std::os::fd::FromRawFd;

#[derive(Args)]
pub struct CatArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    common: Common,
}

pub fn run(a: CatArgs) -> CliResult {
    let engine = a.common.engine_for(&a.target)?;
    let shadow = std::sync::Arc::new(a.target.open(&engine)?);
    let map = shadow.map(Share::Private)?;
    sigbus::watch(&map, sigbus::local_cause(shadow.clone()));
    // Unbuffered: each piece goes to fd 1 with write(2), so that when a page
    // raises SIGBUS nothing already copied is stuck in a buffer; the handler
    // writes the rest of the piece up to the bad page, and stdout ends
    // exactly at the offset it names.
    // SAFETY: fd 1 stays open for the whole process; ManuallyDrop keeps the
    // File from closing it.
    let stdout = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
    let mut out: &std::fs::File = &stdout;
    let page = shadowfd::page_size();
    // Copy through a buffer: the touch happens in user mode, as a consumer's
    // would, and the buffer is plain memory for write(2).
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0usize;
    for piece in map.chunks(buf.len()) {
        sigbus::set_written(done);
        // Touch the piece's pages in order first: the first page that cannot
        // be filled faults at its start, with every page before it filled.
        for p in (0..piece.len()).step_by(page) {
            // SAFETY: `p` is inside `piece`, a live byte slice.
            std::hint::black_box(unsafe { std::ptr::read_volatile(piece.as_ptr().add(p)) });
        }
        buf[..piece.len()].copy_from_slice(piece);
        match out.write_all(&buf[..piece.len()]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(format!("writing to stdout: {e}").into()),
        }
        done += piece.len();
    }
    // The SIGBUS watcher keeps the shadow to the end of the process, so
    // its drop would not store the working-set record.
    shadow.save_workset()?;
    Ok(())
}
