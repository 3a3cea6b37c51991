//! Sizes and machine facts as the CLI prints and parses them.

use shadowfd::config::Size;

/// Parses `512M`, `2G`, `1GiB`, `1.5G` or `4096` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<Size>().map(|s| s.0)
}

/// `300.0 MiB`, `4 KiB`, `17 B`.
pub fn format_size(n: u64) -> String {
    Size(n).to_string()
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
