//! Can this process use userfaultfd, how, and with which features?

use super::uffd_abi as sys;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

const DEVNODE: &str = "/dev/userfaultfd";

/// Features without which lazy shadows cannot work.
/// - POISON, so that a source read error reaches the consumer as SIGBUS;
///   without it the only alternatives are zeros or a hung thread.
/// - MINOR_SHMEM, so that a page that appears in the memfd without the
///   engine having filled it (another process's `fallocate`, or its
///   unregistered touch) still faults in every consumer mapping, and is
///   checked before it is mapped (docs/security.md).
pub(crate) const REQUIRED_FEATURES: u64 =
    sys::UFFD_FEATURE_MISSING_SHMEM | sys::UFFD_FEATURE_MINOR_SHMEM | sys::UFFD_FEATURE_POISON;

/// How a userfaultfd descriptor is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Access {
    /// `userfaultfd(2)` with no flags: handles user- and kernel-mode faults.
    Syscall,
    /// `ioctl(USERFAULTFD_IOC_NEW)` on `/dev/userfaultfd` (Linux 6.1+),
    /// governed by the device node's permissions.
    Devnode,
    /// `userfaultfd(2)` with `UFFD_USER_MODE_ONLY`: allowed to unprivileged
    /// users when `vm.unprivileged_userfaultfd=0`, but faults taken inside the
    /// kernel (a `write(2)` straight from a lazy mapping) fail with EFAULT.
    SyscallUserModeOnly,
}

/// One way of opening a userfaultfd that the probe tried.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Attempt {
    pub method: Access,
    /// `null` on success, else the error.
    pub error: Option<String>,
}

/// What the probe found.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Probe {
    /// The first method that worked, if any.
    pub access: Option<Access>,
    /// `UFFD_FEATURE_*` bits the kernel offers (0 if none worked).
    pub features: u64,
    /// The same bits by name.
    pub feature_names: Vec<&'static str>,
    pub attempts: Vec<Attempt>,
    /// Whether lazy shadows can be used here.
    pub lazy_usable: bool,
    /// Why lazy shadows cannot be used, and what to change; `None` if usable.
    pub reason: Option<String>,
}

pub(super) fn create(access: Access) -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    match access {
        Access::Syscall => sys::userfaultfd_syscall(flags),
        Access::SyscallUserModeOnly => sys::userfaultfd_syscall(flags | sys::UFFD_USER_MODE_ONLY),
        Access::Devnode => {
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(DEVNODE)?;
            sys::userfaultfd_devnode(dev.as_fd(), flags)
        }
    }
}

fn explain(access: Access, e: &io::Error) -> String {
    let errno = e.raw_os_error().unwrap_or(0);
    let hint = match (access, errno) {
        (Access::Devnode, libc::ENOENT) => {
            "the device node does not exist (Linux before 6.1, or not created by udev)"
        }
        (Access::Devnode, libc::EACCES | libc::EPERM) => {
            "no read/write permission on /dev/userfaultfd (grant it, e.g. with a udev rule or `chmod`, or run as a user in its group)"
        }
        (_, libc::ENOSYS) => {
            "the kernel lacks CONFIG_USERFAULTFD, or a seccomp filter blocks the syscall"
        }
        (_, libc::EPERM) => {
            "denied: vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE, or a seccomp filter"
        }
        _ => "",
    };
    if hint.is_empty() {
        e.to_string()
    } else {
        format!("{e}: {hint}")
    }
}

/// Tries, in order: `userfaultfd(2)`, `/dev/userfaultfd`, and
/// `userfaultfd(2)` with `UFFD_USER_MODE_ONLY`; then asks the kernel which
/// features it offers. Cheap (a few syscalls); no state is kept.
pub fn probe() -> Probe {
    let mut attempts = Vec::new();
    let mut found = None;
    for access in [
        Access::Syscall,
        Access::Devnode,
        Access::SyscallUserModeOnly,
    ] {
        match create(access) {
            Ok(fd) => {
                attempts.push(Attempt {
                    method: access,
                    error: None,
                });
                found = Some((access, fd));
                break;
            }
            Err(e) => attempts.push(Attempt {
                method: access,
                error: Some(explain(access, &e)),
            }),
        }
    }
    let Some((access, fd)) = found else {
        return Probe {
            access: None,
            features: 0,
            feature_names: Vec::new(),
            attempts,
            lazy_usable: false,
            reason: Some(
                "userfaultfd cannot be opened here. To enable lazy shadows, do one of: \
                 `sysctl -w vm.unprivileged_userfaultfd=1`; give the process CAP_SYS_PTRACE; \
                 grant read/write access to /dev/userfaultfd; or allow the `userfaultfd` \
                 syscall in the container's seccomp profile. Eager shadows still work."
                    .into(),
            ),
        };
    };
    // A zero-feature UFFDIO_API handshake reports everything the kernel offers.
    let features = match sys::api(fd.as_fd(), 0) {
        Ok(api) => api.features,
        Err(e) => {
            return Probe {
                access: Some(access),
                features: 0,
                feature_names: Vec::new(),
                attempts,
                lazy_usable: false,
                reason: Some(format!("UFFDIO_API handshake failed: {e}")),
            };
        }
    };
    let missing = REQUIRED_FEATURES & !features;
    let reason = (missing != 0).then(|| {
        format!(
            "the kernel's userfaultfd lacks {} (MISSING_SHMEM needs Linux 4.11+, MINOR_SHMEM 5.14+, POISON 6.6+; \
             without POISON a source read error could not be reported as SIGBUS); eager shadows still work",
            feature_names(missing).join(", ")
        )
    });
    Probe {
        access: Some(access),
        features,
        feature_names: feature_names(features),
        attempts,
        lazy_usable: reason.is_none(),
        reason,
    }
}

/// Renders `UFFD_FEATURE_*` bits as names.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    sys::FEATURE_NAMES
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect()
}
