//! `shadowfd probe`.

use crate::CliResult;
use clap::Args;
use shadowfd::{Access, Probe};

#[derive(Args)]
pub struct ProbeArgs {
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl ProbeArgs {
    /// Whether `--json` was given: failures are then reported in JSON too.
    pub fn json(&self) -> bool {
        self.json
    }
}

pub fn run(a: ProbeArgs) -> CliResult {
    let p = shadowfd::probe();
    let auto = if p.lazy_usable { "lazy" } else { "eager" };
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["auto_mode"] = auto.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", report(&Found::of(&p)));
    Ok(())
}

/// How a way of opening userfaultfd is named for people, and what it
/// means for lazy shadows.
fn method(a: Access) -> (&'static str, &'static str) {
    match a {
        Access::Syscall => ("userfaultfd(2)", ""),
        Access::Devnode => ("/dev/userfaultfd", ""),
        Access::SyscallUserModeOnly => (
            "userfaultfd(2) with UFFD_USER_MODE_ONLY",
            "user-mode faults only: a system call given an untouched part of a lazy \
             mapping as its buffer (write(fd, map, len)) fails with EFAULT; touch or \
             materialize it first (docs/kernel.md)",
        ),
        _ => ("another method", ""),
    }
}

/// What the text report shows of a [`Probe`].
struct Found<'a> {
    lazy_usable: bool,
    access: Option<Access>,
    feature_names: &'a [&'static str],
    /// Each method tried, in order, with its error if it failed.
    attempts: Vec<(Access, Option<&'a str>)>,
    reason: Option<&'a str>,
}

impl<'a> Found<'a> {
    fn of(p: &'a Probe) -> Found<'a> {
        Found {
            lazy_usable: p.lazy_usable,
            access: p.access,
            feature_names: &p.feature_names,
            attempts: p
                .attempts
                .iter()
                .map(|a| (a.method, a.error.as_deref()))
                .collect(),
            reason: p.reason.as_deref(),
        }
    }
}

/// The text report: the verdict and the method first, then the features,
/// then every method tried, in order, with why each failed.
fn report(p: &Found<'_>) -> String {
    use std::fmt::Write;
    let auto = if p.lazy_usable { "lazy" } else { "eager" };
    let mut out = String::new();
    match (p.lazy_usable, p.access) {
        (true, Some(acc)) => {
            let (name, limit) = method(acc);
            let _ = writeln!(out, "lazy shadows: usable, through {name}");
            if !limit.is_empty() {
                let _ = writeln!(out, "  limit: {limit}");
            }
        }
        _ => {
            let _ = writeln!(out, "lazy shadows: not usable");
            if let Some(r) = p.reason {
                let _ = writeln!(out, "  why: {r}");
            }
        }
    }
    let _ = writeln!(out, "auto mode would choose: {auto}");
    if p.access.is_some() {
        let _ = writeln!(out, "features: {}", p.feature_names.join(" "));
    }
    let _ = writeln!(out, "ways of opening userfaultfd, tried in order:");
    for &(access, error) in &p.attempts {
        let (name, _) = method(access);
        match error {
            None => {
                let _ = writeln!(out, "  {name}: ok");
            }
            Some(e) => {
                let _ = writeln!(out, "  {name}: failed: {e}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As an ordinary user under `vm.unprivileged_userfaultfd=0`: the
    /// verdict and the method come before the two refusals.
    #[test]
    fn the_verdict_comes_before_the_methods_that_failed() {
        let p = Found {
            lazy_usable: true,
            access: Some(Access::SyscallUserModeOnly),
            feature_names: &["MISSING_SHMEM", "MINOR_SHMEM", "POISON"],
            attempts: vec![
                (
                    Access::Syscall,
                    Some("Operation not permitted (os error 1)"),
                ),
                (Access::Devnode, Some("Permission denied (os error 13)")),
                (Access::SyscallUserModeOnly, None),
            ],
            reason: None,
        };
        let text = report(&p);
        let usable =
            text.find("lazy shadows: usable, through userfaultfd(2) with UFFD_USER_MODE_ONLY");
        let eperm = text.find("Operation not permitted");
        let eacces = text.find("Permission denied");
        assert!(
            usable.is_some() && eperm.is_some() && eacces.is_some(),
            "{text}"
        );
        assert!(usable < eperm && usable < eacces, "{text}");
        assert!(text.contains("EFAULT"), "{text}");
        assert!(
            text.lines()
                .nth(2)
                .unwrap()
                .starts_with("auto mode would choose: lazy"),
            "{text}"
        );
    }

    #[test]
    fn not_usable_says_why_first() {
        let p = Found {
            lazy_usable: false,
            access: None,
            feature_names: &[],
            attempts: vec![(
                Access::Syscall,
                Some("Function not implemented (os error 38)"),
            )],
            reason: Some("userfaultfd cannot be opened here"),
        };
        let text = report(&p);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("lazy shadows: not usable"), "{text}");
        assert_eq!(
            lines.next(),
            Some("  why: userfaultfd cannot be opened here"),
            "{text}"
        );
        assert_eq!(
            lines.next(),
            Some("auto mode would choose: eager"),
            "{text}"
        );
        assert!(!text.contains("features:"), "{text}");
        assert!(
            text.contains("  userfaultfd(2): failed: Function not implemented"),
            "{text}"
        );
    }
}
