//! Access patterns for `map` (and `bench`): which pages get touched.

use std::str::FromStr;

/// How a mapping is touched, one byte per chosen page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Access {
    /// Every page in order: a full scan.
    Seq,
    /// `FRACTION` of the pages, chosen at random (seeded).
    Random(f64),
    /// The first page only.
    First,
    /// Every `STRIDE`-th byte offset, rounded to pages (default 64 KiB).
    Strided(u64),
    /// Nothing.
    None,
}

pub const DEFAULT_STRIDE: u64 = 64 << 10;

impl FromStr for Access {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        match (name, arg) {
            ("seq", None) => Ok(Access::Seq),
            ("first", None) => Ok(Access::First),
            ("none", None) => Ok(Access::None),
            ("random", Some(f)) => match f.parse::<f64>() {
                Ok(x) if x > 0.0 && x <= 1.0 => Ok(Access::Random(x)),
                _ => Err(format!(
                    "random:{f}: the fraction must be a number in (0, 1]"
                )),
            },
            ("strided", None) => Ok(Access::Strided(DEFAULT_STRIDE)),
            ("strided", Some(n)) => match crate::units::parse_size(n) {
                Ok(x) if x > 0 => Ok(Access::Strided(x)),
                _ => Err(format!("strided:{n}: the stride must be a size above zero")),
            },
            _ => Err("expected seq, random:FRACTION, first, strided[:STRIDE] or none".into()),
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Seq => f.write_str("seq"),
            Access::Random(x) => write!(f, "random:{x}"),
            Access::First => f.write_str("first"),
            Access::Strided(s) => write!(f, "strided:{s}"),
            Access::None => f.write_str("none"),
        }
    }
}

/// splitmix64: a small, seeded, reproducible generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Access {
    /// The page indices to touch, in touch order, for a mapping of `len` bytes.
    pub fn pages(&self, len: u64, page: u64, seed: u64) -> Vec<u64> {
        let npages = len.div_ceil(page);
        if npages == 0 {
            return Vec::new();
        }
        match *self {
            Access::Seq => (0..npages).collect(),
            Access::First => vec![0],
            Access::None => Vec::new(),
            Access::Strided(s) => {
                let step = (s / page).max(1);
                (0..npages).step_by(step as usize).collect()
            }
            Access::Random(frac) => {
                let n = ((npages as f64 * frac).ceil() as u64).clamp(1, npages);
                let mut rng = Rng::new(seed);
                let mut seen = std::collections::HashSet::with_capacity(n as usize);
                let mut out = Vec::with_capacity(n as usize);
                while (out.len() as u64) < n {
                    let p = rng.next() % npages;
                    if seen.insert(p) {
                        out.push(p);
                    }
                }
                out
            }
        }
    }
}

/// Reads one byte of each listed page; returns a checksum so the reads stay.
pub fn touch(map: &[u8], pages: &[u64], page: u64) -> u64 {
    let mut sum = 0u64;
    for &p in pages {
        sum = sum.wrapping_add(std::hint::black_box(map[(p * page) as usize]) as u64);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_patterns() {
        assert_eq!("seq".parse::<Access>().unwrap(), Access::Seq);
        assert_eq!(
            "random:0.01".parse::<Access>().unwrap(),
            Access::Random(0.01)
        );
        assert_eq!(
            "strided:1M".parse::<Access>().unwrap(),
            Access::Strided(1 << 20)
        );
        for bad in [
            "random",
            "random:0",
            "random:2",
            "walk",
            "strided:0",
            "seq:1",
        ] {
            assert!(bad.parse::<Access>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_pages_are_distinct_and_seeded() {
        let a = Access::Random(0.1).pages(1 << 20, 4096, 7);
        assert_eq!(a.len(), 26);
        assert_eq!(a, Access::Random(0.1).pages(1 << 20, 4096, 7));
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
    }
}
