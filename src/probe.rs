//! `shadowfd probe`.

use crate::CliResult;
use clap::Args;

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
    match p.access {
        Some(acc) => println!("userfaultfd: available via {acc:?}"),
        None => println!("userfaultfd: not available"),
    }
    if p.access == Some(shadowfd::Access::SyscallUserModeOnly) {
        println!(
            "  user-mode only: a fault the kernel takes on a lazy mapping (write(2) from it) \
             is not served and fails with EFAULT; `shadowfd run` makes the pages present \
             first in the calls it intercepts (docs/run.md)"
        );
    }
    for at in &p.attempts {
        match &at.error {
            None => println!("  {:?}: ok", at.method),
            Some(e) => println!("  {:?}: {e}", at.method),
        }
    }
    if p.access.is_some() {
        println!("features: {}", p.feature_names.join(" "));
    }
    println!(
        "lazy shadows: {}",
        if p.lazy_usable {
            "usable"
        } else {
            "not usable"
        }
    );
    if let Some(r) = &p.reason {
        println!("  why: {r}");
    }
    println!("auto mode would choose: {auto}");
    Ok(())
}
