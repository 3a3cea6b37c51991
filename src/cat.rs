//! `shadowfd cat`.

use crate::{CliResult, Common, Target, sigbus};
use clap::Args;
use shadowfd::Share;
use std::io::Write;

#[derive(Args)]
pub struct CatArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    common: Common,
}

pub fn run(a: CatArgs) -> CliResult {
    let engine = a.common.engine()?;
    let shadow = a.target.open(&engine)?;
    let map = shadow.map(Share::Private)?;
    sigbus::watch(&map);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Copy through a buffer: the touch happens in user mode, as a consumer's
    // would, and the buffer is plain memory for write(2).
    let mut buf = vec![0u8; 1 << 20];
    for piece in map.chunks(buf.len()) {
        buf[..piece.len()].copy_from_slice(piece);
        match out.write_all(&buf[..piece.len()]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(format!("writing to stdout: {e}").into()),
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("writing to stdout: {e}").into())
        }
        _ => Ok(()),
    }
}
