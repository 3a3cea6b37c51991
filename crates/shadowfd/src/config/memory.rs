//! What the machine can hold, from `/proc/meminfo`.

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// `MemAvailable` in bytes, if the kernel reports it.
pub fn mem_available() -> Option<u64> {
    meminfo("MemAvailable")
}
