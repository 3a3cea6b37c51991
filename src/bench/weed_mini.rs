//! The `weed mini` command line, one copy for the bench's gateway
//! (`bench --source s3`) and the object-store tests (`tests/object`
//! includes this file): loopback only, telemetry and the servers nobody
//! uses off, every port chosen here. Standard library only.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

/// The ports [`mini`] takes, in its order (the S3 gateway's is [`S3`]).
const PORT_FLAGS: [&str; 10] = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
];
/// How many ports [`mini`] takes.
pub const PORTS: usize = PORT_FLAGS.len();
/// Where the S3 gateway's port is among them.
pub const S3: usize = 6;

/// `n` free loopback ports (each held only while it is picked).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let ls = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    ls.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// `weed mini` with its data in `dir`, serving `bucket` to the
/// credentials (`key id`, `secret`) on `ports` ([`PORTS`] of them, from
/// [`free_ports`]), bound to 127.0.0.1 only and reporting nowhere. Its
/// standard input is closed; the caller sets its output.
pub fn mini(bin: &Path, dir: &Path, ports: &[u16], bucket: &str, creds: (&str, &str)) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("mini")
        .arg(format!("-dir={}", dir.display()))
        .args([
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]);
    for (flag, port) in PORT_FLAGS.iter().zip(ports) {
        cmd.arg(format!("-{flag}={port}"));
    }
    cmd.arg(format!("-bucket={bucket}"))
        .env("AWS_ACCESS_KEY_ID", creds.0)
        .env("AWS_SECRET_ACCESS_KEY", creds.1)
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}
