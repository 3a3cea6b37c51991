//! What the machine, and this process's memory cgroup, can hold.

use std::path::{Path, PathBuf};

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// `MemAvailable` in bytes, if the kernel reports it.
pub(crate) fn mem_available() -> Option<u64> {
    meminfo("MemAvailable")
}

/// Where cgroup v2 (the unified hierarchy) and the cgroup v1 memory
/// controller are mounted on systems that follow the usual layout.
const V2_ROOT: &str = "/sys/fs/cgroup";
const V1_MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";

/// The process's memory cgroup paths from `/proc/self/cgroup` text: the v2
/// path (the `0::PATH` line) and the v1 memory controller's path (a line
/// whose controller list holds `memory`).
fn cgroup_paths(text: &str) -> (Option<String>, Option<String>) {
    let mut v2 = None;
    let mut v1 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else if ctrls.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_string());
        }
    }
    (v2, v1)
}

/// A limit file's value in bytes; `None` for "no limit". v2 writes `max`;
/// v1 writes a huge page-rounded number (`PAGE_COUNTER_MAX` pages), so
/// anything from 2^60 up counts as unlimited.
fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|&v| v < 1 << 60)
}

fn parse_usage(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The tightest headroom (limit minus usage) from the cgroup `rel` under
/// `root` up to `root` itself: a parent's limit binds its children too.
fn headroom_under(root: &Path, rel: &str, limit_file: &str, usage_file: &str) -> Option<u64> {
    let mut dir: PathBuf = root.join(rel.trim_start_matches('/'));
    let mut best: Option<u64> = None;
    loop {
        let limit = std::fs::read_to_string(dir.join(limit_file))
            .ok()
            .and_then(|t| parse_limit(&t));
        if let Some(limit) = limit {
            let usage = std::fs::read_to_string(dir.join(usage_file))
                .ok()
                .and_then(|t| parse_usage(&t))
                .unwrap_or(0);
            let room = limit.saturating_sub(usage);
            best = Some(best.map_or(room, |b| b.min(room)));
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            return best;
        }
    }
}

/// How many more bytes this process's memory cgroup may charge before it
/// hits its limit: `memory.max - memory.current` (cgroup v2) or
/// `memory.limit_in_bytes - memory.usage_in_bytes` (v1), the tightest of the
/// process's cgroup and its ancestors. `None` when no limit applies (or the
/// cgroup files cannot be read). Cheap enough to call as fills proceed: it
/// reads `/proc/self/cgroup` and two small files per cgroup level.
pub fn headroom() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let (v2, v1) = cgroup_paths(&text);
    let a = v2.and_then(|p| headroom_under(Path::new(V2_ROOT), &p, "memory.max", "memory.current"));
    let b = v1.and_then(|p| {
        headroom_under(
            Path::new(V1_MEMORY_ROOT),
            &p,
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
        )
    });
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// The share of the available memory the default budget takes.
pub const DEFAULT_BUDGET_DIVISOR: u64 = 4;

/// The default memory budget: a quarter of the tighter of `MemAvailable`
/// and the memory cgroup's [`headroom`] (1 GiB's quarter if neither is
/// known).
pub fn default_budget() -> u64 {
    let avail = mem_available();
    let room = match (avail, headroom()) {
        (Some(a), Some(h)) => a.min(h),
        (a, h) => a.or(h).unwrap_or(1 << 30),
    };
    room / DEFAULT_BUDGET_DIVISOR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_from_v1_v2_and_hybrid_files() {
        let hybrid =
            "12:pids:/\n4:memory:/process_api/abc\n1:name=systemd:/x\n0::/user.slice/u.scope\n";
        assert_eq!(
            cgroup_paths(hybrid),
            (
                Some("/user.slice/u.scope".into()),
                Some("/process_api/abc".into())
            )
        );
        assert_eq!(cgroup_paths("0::/\n"), (Some("/".into()), None));
        let v1 = "5:cpuacct,cpu:/a\n3:memory,hugetlb:/docker/f00\n";
        assert_eq!(cgroup_paths(v1), (None, Some("/docker/f00".into())));
        assert_eq!(cgroup_paths("garbage\n\n"), (None, None));
    }

    #[test]
    fn limits_parse_with_unlimited_spelled_either_way() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("536870912\n"), Some(512 << 20));
        assert_eq!(parse_limit("banana"), None);
        assert_eq!(parse_usage("12345\n"), Some(12345));
    }

    #[test]
    fn the_tightest_level_on_the_path_wins() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let leaf = root.join("a/b");
        std::fs::create_dir_all(&leaf).unwrap();
        let put = |d: &Path, limit: &str, usage: &str| {
            std::fs::write(d.join("memory.max"), limit).unwrap();
            std::fs::write(d.join("memory.current"), usage).unwrap();
        };
        put(root, "max\n", "999999\n");
        put(&root.join("a"), "1000000\n", "400000\n");
        put(&leaf, "max\n", "100000\n");
        let h = headroom_under(root, "/a/b", "memory.max", "memory.current");
        assert_eq!(h, Some(600_000), "the parent's limit binds");
        put(&leaf, "700000\n", "650000\n");
        let h = headroom_under(root, "/a/b", "memory.max", "memory.current");
        assert_eq!(h, Some(50_000));
        // Usage over the limit: no room, not an underflow.
        put(&leaf, "700000\n", "800000\n");
        let h = headroom_under(root, "/a/b", "memory.max", "memory.current");
        assert_eq!(h, Some(0));
        // No limit anywhere.
        let none = tempfile::tempdir().unwrap();
        assert_eq!(
            headroom_under(none.path(), "/", "memory.max", "memory.current"),
            None
        );
    }

    #[test]
    fn headroom_reads_this_machine() {
        // A real read of /proc/self/cgroup and the cgroup files. MemAvailable
        // and usage move between reads, hence the 64 MiB of slack.
        let slack = 64 << 20;
        let h = headroom();
        let avail = mem_available().expect("MemAvailable");
        eprintln!("cgroup headroom: {h:?}, MemAvailable: {avail}");
        let b = default_budget();
        assert!(b > 0);
        assert!(
            b <= (avail + slack) / DEFAULT_BUDGET_DIVISOR,
            "{b} vs {avail}"
        );
        if let Some(h) = h {
            assert!(b <= (h + slack) / DEFAULT_BUDGET_DIVISOR, "{b} vs {h}");
        }
    }
}
