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
    /// The page indices to touch, in touch order, for a mapping of `len`
    /// bytes: an iterator in constant memory, however large the mapping
    /// (a 15 TiB file has 4 billion pages; a list of them would not fit).
    pub fn pages(&self, len: u64, page: u64, seed: u64) -> Pages {
        let npages = len.div_ceil(page);
        let kind = match *self {
            _ if npages == 0 => Kind::Range {
                next: 0,
                end: 0,
                step: 1,
            },
            Access::Seq => Kind::Range {
                next: 0,
                end: npages,
                step: 1,
            },
            Access::First => Kind::Range {
                next: 0,
                end: 1,
                step: 1,
            },
            Access::None => Kind::Range {
                next: 0,
                end: 0,
                step: 1,
            },
            Access::Strided(s) => Kind::Range {
                next: 0,
                end: npages,
                step: (s / page).max(1),
            },
            Access::Random(frac) => Kind::Random {
                perm: Permutation::new(npages, seed),
                next: 0,
                count: random_count(npages, frac),
            },
        };
        Pages { kind }
    }
}

/// How many of `npages` pages `random:FRACTION` touches: at least one.
fn random_count(npages: u64, frac: f64) -> u64 {
    ((npages as f64 * frac).ceil() as u64).clamp(1, npages)
}

/// The pages of one pattern, produced one at a time.
#[derive(Debug, Clone)]
pub struct Pages {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// `next, next + step, ...` below `end`.
    Range { next: u64, end: u64, step: u64 },
    /// The first `count` values of a seeded permutation of the pages:
    /// distinct pages, sampled without replacement.
    Random {
        perm: Permutation,
        next: u64,
        count: u64,
    },
}

impl Iterator for Pages {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        match &mut self.kind {
            Kind::Range { next, end, step } => {
                if *next >= *end {
                    return None;
                }
                let p = *next;
                *next = next.saturating_add(*step);
                Some(p)
            }
            Kind::Random { perm, next, count } => {
                if *next >= *count {
                    return None;
                }
                let p = perm.at(*next);
                *next += 1;
                Some(p)
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = match &self.kind {
            Kind::Range { next, end, step } => end.saturating_sub(*next).div_ceil(*step),
            Kind::Random { next, count, .. } => count - next,
        };
        let n = usize::try_from(left).unwrap_or(usize::MAX);
        (n, usize::try_from(left).ok())
    }
}

/// A seeded bijection of `0..n` in constant memory: a balanced Feistel
/// network over the smallest even number of bits that holds `n`, and
/// cycle-walking for the values that land at or past `n`. The network's
/// domain is under `4 n`, so a value walks fewer than four steps on average.
#[derive(Debug, Clone)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Permutation {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut rng = Rng::new(seed);
        let keys = [rng.next(), rng.next(), rng.next(), rng.next()];
        Permutation { n, half_bits, keys }
    }

    fn round(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let mut z = r ^ k;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (l, r) = (r, (l ^ z) & mask);
        }
        l << self.half_bits | r
    }

    /// The image of `i` (`i < n`).
    pub fn at(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        // Walking the cycle of `i` reaches a value below `n` again: `i` is one.
        let mut x = self.round(i);
        while x >= self.n {
            x = self.round(x);
        }
        x
    }
}

/// Reads one byte of each listed page; returns a checksum so the reads stay.
pub fn touch(map: &[u8], pages: impl IntoIterator<Item = u64>, page: u64) -> u64 {
    let mut sum = 0u64;
    for p in pages {
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
        let a: Vec<u64> = Access::Random(0.1).pages(1 << 20, 4096, 7).collect();
        assert_eq!(a.len(), 26);
        let b: Vec<u64> = Access::Random(0.1).pages(1 << 20, 4096, 7).collect();
        assert_eq!(a, b);
        let c: Vec<u64> = Access::Random(0.1).pages(1 << 20, 4096, 8).collect();
        assert_ne!(a, c, "another seed, another sample");
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
        assert!(a.iter().all(|&p| p < 256));
    }

    #[test]
    fn the_permutation_is_a_bijection_for_every_small_size() {
        for n in 1..=300u64 {
            for seed in [0, 1, 99] {
                let perm = Permutation::new(n, seed);
                let mut seen = vec![false; n as usize];
                for i in 0..n {
                    let p = perm.at(i);
                    assert!(p < n && !seen[p as usize], "n {n} seed {seed}: {i} -> {p}");
                    seen[p as usize] = true;
                }
            }
        }
        // Random:1 touches every page once.
        let all: std::collections::HashSet<u64> = Access::Random(1.0)
            .pages(1000 * 4096 + 1, 4096, 3)
            .collect();
        assert_eq!(all.len(), 1001);
    }

    #[test]
    fn patterns_of_a_huge_mapping_stream_without_a_list() {
        // 15 TiB: four billion pages. Nothing here allocates per page.
        let len = 15u64 << 40;
        let n = len / 4096;
        let seq = Access::Seq.pages(len, 4096, 1);
        assert_eq!(seq.size_hint(), (n as usize, Some(n as usize)));
        assert_eq!(seq.skip(5).take(3).collect::<Vec<_>>(), vec![5, 6, 7]);
        let strided: Vec<u64> = Access::Strided(1 << 30).pages(len, 4096, 1).collect();
        assert_eq!(strided.len(), 15 << 10);
        assert_eq!(strided[1], (1 << 30) / 4096);
        let random = Access::Random(0.5).pages(len, 4096, 1);
        assert_eq!(random.size_hint().0 as u64, n / 2);
        let first: Vec<u64> = random.take(10_000).collect();
        let set: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(set.len(), first.len());
        assert!(first.iter().all(|&p| p < n));
        assert_eq!(
            Access::First.pages(len, 4096, 1).collect::<Vec<_>>(),
            vec![0]
        );
        assert_eq!(Access::None.pages(len, 4096, 1).count(), 0);
        assert_eq!(Access::Seq.pages(0, 4096, 1).count(), 0);
    }
}

/// How `map` and `client map` touch a mapping, and what they report.
#[derive(clap::Args, Debug, Clone)]
pub struct TouchArgs {
    /// seq | random:FRACTION | first | strided[:STRIDE] | none
    #[arg(long, default_value = "seq", value_name = "PATTERN")]
    pub access: Access,
    /// Check every touched page against the source (for `client map`, the
    /// server's FILL of it).
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Seed for random access.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl TouchArgs {
    /// The pages the pattern touches in a mapping of `len` bytes.
    pub fn pages(&self, len: u64, page: u64) -> Pages {
        self.access.pages(len, page, self.seed)
    }

    /// Touches one byte of each page of the pattern in `map`: how many
    /// pages, and how long it took (µs).
    pub fn touch(&self, map: &[u8], page: u64) -> (u64, f64) {
        let mut n = 0u64;
        let t = std::time::Instant::now();
        std::hint::black_box(touch(
            map,
            self.pages(map.len() as u64, page).inspect(|_| n += 1),
            page,
        ));
        (n, t.elapsed().as_secs_f64() * 1e6)
    }
}
