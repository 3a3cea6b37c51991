//! `shadowfd run`: runs a command with the files of a served tree visible
//! under a path prefix, through the `LD_PRELOAD` shim
//! `libshadowfd_preload.so` (docs/run.md).

use crate::Common;
use clap::Args;
use shadowfd::remote::{Client, Server, ServerOptions};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Args)]
pub struct RunArgs {
    /// Serve the regular files beneath this directory, or the objects under
    /// s3://BUCKET/PREFIX/ (an embedded server).
    #[arg(long, value_name = "DIR|URL", conflicts_with_all = ["image", "socket"])]
    root: Option<PathBuf>,
    /// Serve the files inside this ext2/ext3/ext4 image (an embedded server).
    #[arg(long, value_name = "IMG", conflicts_with = "socket")]
    image: Option<PathBuf>,
    /// Use a running `shadowfd serve` on this socket instead of an embedded server.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The absolute path prefix under which the command sees the served files,
    /// e.g. /shadow (PREFIX/a/b is the served a/b). Need not exist on the host.
    #[arg(long, value_name = "PREFIX", required = true)]
    mount: PathBuf,
    #[command(flatten)]
    object: crate::object::ObjectOpts,
    #[command(flatten)]
    common: Common,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

/// The preload library: `$SHADOWFD_PRELOAD`, else `libshadowfd_preload.so`
/// next to this executable, else in `../lib` or `../lib/shadowfd` of it.
pub(crate) fn preload_lib() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SHADOWFD_PRELOAD") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "SHADOWFD_PRELOAD={} is not a file; point it at libshadowfd_preload.so",
                p.display()
            ))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let tried = [
        dir.to_path_buf(),
        dir.join("../lib"),
        dir.join("../lib/shadowfd"),
    ];
    for d in &tried {
        let p = d.join("libshadowfd_preload.so");
        if p.is_file() {
            return p
                .canonicalize()
                .map_err(|e| format!("resolving {}: {e}", p.display()));
        }
    }
    Err(format!(
        "libshadowfd_preload.so not found next to {} (nor in ../lib, ../lib/shadowfd); \
         build it with `cargo build -p shadowfd-preload` (same profile) or set SHADOWFD_PRELOAD",
        exe.display()
    ))
}

/// `name` found the way execvp would find it.
fn resolve_cmd(name: &OsStr) -> Result<PathBuf, String> {
    let p = Path::new(name);
    if name.as_bytes().contains(&b'/') {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("{}: no such file", p.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for d in std::env::split_paths(&path) {
        let c = d.join(p);
        if let Ok(m) = std::fs::metadata(&c) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(c);
            }
        }
    }
    Err(format!("{}: command not found in PATH", p.display()))
}

/// Refuses what the shim cannot reach: a statically linked executable (no
/// PT_INTERP: nothing loads the shim) and a set-user/group-ID one (the
/// dynamic linker ignores LD_PRELOAD for it). A `#!` script is judged by
/// its interpreter.
fn check_cmd(path: &Path, depth: u32) -> Result<(), String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    let mode = meta.permissions().mode();
    if mode & 0o6000 != 0 {
        return Err(format!(
            "{shown} is set-user-ID or set-group-ID: the dynamic linker ignores LD_PRELOAD for it, \
             so it would not see the served files; refusing to run it"
        ));
    }
    let mut f = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let mut head = Vec::new();
    (&mut f)
        .take(256)
        .read_to_end(&mut head)
        .map_err(|e| format!("reading {shown}: {e}"))?;
    if head.starts_with(b"#!") {
        if depth > 3 {
            return Err(format!("{shown}: too many levels of #! interpreters"));
        }
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or_default();
        let interp = line
            .split(|b| b.is_ascii_whitespace())
            .find(|w| !w.is_empty())
            .ok_or_else(|| format!("{shown}: empty #! line"))?;
        return check_cmd(Path::new(OsStr::from_bytes(interp)), depth + 1);
    }
    if !head.starts_with(b"\x7fELF") {
        return Err(format!(
            "{shown} is neither an ELF executable nor a #! script"
        ));
    }
    if has_interp(&mut f).map_err(|e| format!("reading the ELF headers of {shown}: {e}"))? {
        Ok(())
    } else {
        Err(format!(
            "{shown} is statically linked (no PT_INTERP): LD_PRELOAD cannot reach it, so it \
             would not see the served files; refusing to run it"
        ))
    }
}

/// Whether a 64- or 32-bit little-endian ELF file has a PT_INTERP header.
fn has_interp(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Error, ErrorKind, Seek, SeekFrom};
    let bad = |m: &str| Error::new(ErrorKind::InvalidData, m.to_string());
    let mut h = [0u8; 64];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut h[..52])?;
    if h[5] != 1 {
        return Err(bad("not a little-endian ELF file"));
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as u64;
    let (phoff, phentsize, phnum) = match h[4] {
        2 => {
            f.read_exact(&mut h[52..64])?;
            let phoff = u64::from_le_bytes(h[32..40].try_into().unwrap());
            (phoff, u16_at(&h, 54), u16_at(&h, 56))
        }
        1 => (u32_at(&h, 28), u16_at(&h, 42), u16_at(&h, 44)),
        _ => return Err(bad("unknown ELF class")),
    };
    if phentsize < 4 || phnum > 4096 {
        return Err(bad("implausible program headers"));
    }
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    f.seek(SeekFrom::Start(phoff))?;
    f.read_exact(&mut ph)?;
    const PT_INTERP: u64 = 3;
    Ok(ph
        .chunks(phentsize as usize)
        .any(|p| u32_at(p, 0) == PT_INTERP))
}

/// A private directory for the embedded server's socket, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, String> {
        let t = std::env::temp_dir().join("shadowfd-run.XXXXXX");
        let mut buf = t.into_os_string().into_vec();
        buf.push(0);
        // SAFETY: `buf` is a writable NUL-terminated template ending in XXXXXX.
        let r = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
        if r.is_null() {
            return Err(format!(
                "making a private directory for the server's socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        buf.pop();
        Ok(TempDir(PathBuf::from(OsString::from_vec(buf))))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the embedded server on a socket in `dir`; its accept loop runs on
/// a thread of this process and ends with it.
fn embedded_server(a: &RunArgs, dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let Some(tree) = crate::object::served_tree(a.root.as_deref(), a.image.as_deref(), &a.object)
    else {
        return Err(
            "say what to serve: --root DIR, --root s3://BUCKET/PREFIX/ or --image IMG (an \
             embedded server), or --socket PATH (a running `shadowfd serve`)"
                .into(),
        );
    };
    let tree = tree?;
    let engine = crate::object::engine_for_tree(&a.common, &tree)?;
    let server = Server::new(engine, tree, ServerOptions::default())?;
    let sock = dir.join("shadowfd.sock");
    let listener = UnixListener::bind(&sock).map_err(|e| {
        format!(
            "binding the embedded server's socket {}: {e}",
            sock.display()
        )
    })?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod 0600 {}: {e}", sock.display()))?;
    std::thread::Builder::new()
        .name("shadowfd-run-accept".into())
        .spawn(move || {
            for s in listener.incoming() {
                match s {
                    Ok(s) => {
                        if let Err(e) = server.handle(s) {
                            eprintln!("shadowfd run: dropped a connection: {e}");
                        }
                    }
                    Err(e) => eprintln!("shadowfd run: accept: {e}"),
                }
            }
        })
        .map_err(|e| format!("starting the embedded server: {e}"))?;
    Ok(sock)
}

pub fn run(a: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mount = &a.mount;
    if !mount.is_absolute()
        || mount
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || mount.components().count() < 2
    {
        return Err(format!(
            "--mount {} must be an absolute path below / without . or .., e.g. /shadow",
            mount.display()
        )
        .into());
    }
    let lib = preload_lib()?;
    let exe = resolve_cmd(&a.cmd[0])?;
    check_cmd(&exe, 0)?;
    let tmp;
    let socket = match &a.socket {
        Some(s) => s.clone(),
        None => {
            tmp = TempDir::new()?;
            embedded_server(&a, &tmp.0)?
        }
    };
    // Speak to the server once before the command starts: a set-up error
    // is reported here, never by a half-configured command.
    drop(Client::connect(&socket).map_err(|e| format!("checking the server: {e}"))?);
    // The same library is the dynamic linker's audit module: it sees the
    // loads (DT_NEEDED, dlopen) that ld.so makes with its own internal
    // calls, which no preload does (docs/run.md, "Shared libraries").
    let mut audit = lib.clone().into_os_string();
    if let Some(old) = std::env::var_os("LD_AUDIT").filter(|o| !o.is_empty()) {
        audit.push(":");
        audit.push(old);
    }
    let mut preload = lib.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut cmd = Command::new(&a.cmd[0]);
    cmd.args(&a.cmd[1..])
        .env("LD_PRELOAD", preload)
        .env("LD_AUDIT", audit)
        .env("SHADOWFD_RUN_SOCKET", &socket)
        .env("SHADOWFD_RUN_MOUNT", mount);
    // The embedded server of an image serves a tree that cannot change
    // while it runs: the shim may keep STAT answers (docs/run.md, "stat").
    if a.image.is_some() {
        cmd.env("SHADOWFD_RUN_IMMUTABLE", "1");
    } else {
        cmd.env_remove("SHADOWFD_RUN_IMMUTABLE");
    }
    // SAFETY: only async-signal-safe calls (signal) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
    }
    // The terminal's ^C and ^\ are for the command; this process waits to
    // report how it ended.
    // SAFETY: setting signal dispositions has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", a.cmd[0].to_string_lossy()))?;
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {}: {e}", a.cmd[0].to_string_lossy()))?;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
