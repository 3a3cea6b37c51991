//! Scenario 10: a huge, sparse source shadowed lazily and touched sparsely.
//!
//! Promise: opening costs nothing per byte, and memory follows what was
//! touched: the memfd holds exactly the touched chunks (fstat blocks), the
//! counters agree, and the mapping's RSS is no more than that, for a source
//! of 16 GiB on a machine with less free memory than that.

use crate::support::*;
use shadowfd::{Engine, Error, Share};
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;

const ID: u64 = 0x4A6E;
const SIZE: u64 = 16 << 30;
const CHUNK: u64 = 32 << 10;
const MARKERS: u64 = 48;

#[test]
fn sparse_16gib_source_costs_only_what_is_touched() {
    bounded("sparse_16gib_source_costs_only_what_is_touched", || {
        let seed = content::seed_for("huge");
        let cfg = {
            let mut c = lazy_config();
            c.chunk_size = CHUNK;
            c.readahead = 0;
            c
        };
        let Some(engine) = lazy_engine("huge sparse", cfg) else {
            return;
        };
        let dir = tempdir();
        let path = dir.path().join("sparse");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(SIZE).unwrap();
        // Marker pages of non-zero content at seeded places; the rest is a hole.
        let mut rng = Rng::new(seed);
        let markers: BTreeSet<u64> = (0..MARKERS)
            .map(|_| rng.below(SIZE / page()))
            .chain([0, SIZE / page() - 1])
            .collect();
        for &p in &markers {
            f.write_all_at(&bytes(ID, p * page(), page() as usize), p * page())
                .unwrap();
        }
        drop(f);
        let s = engine.open(&path).unwrap();
        assert_eq!(s.size(), SIZE);
        assert_eq!(s.resident_bytes().unwrap(), 0, "open filled something");
        let map = s.map(Share::Private).unwrap();
        // Touch the markers and as many hole pages.
        let holes: BTreeSet<u64> = (0..MARKERS)
            .map(|_| rng.below(SIZE / page()))
            .filter(|p| !markers.contains(p))
            .collect();
        for &p in &markers {
            let off = (p * page()) as usize;
            assert_bytes(
                &map[off..off + page() as usize],
                ID,
                p * page(),
                &format!("marker (seed {seed:#x})"),
            );
        }
        for &p in &holes {
            let off = (p * page()) as usize;
            let pg = &map[off..off + page() as usize];
            assert!(
                pg.iter().all(|&b| b == 0),
                "hole page {p} not zero (seed {seed:#x})"
            );
        }
        let chunks: BTreeSet<u64> = markers
            .iter()
            .chain(&holes)
            .map(|p| p * page() / CHUNK)
            .collect();
        let want = chunks.len() as u64 * CHUNK;
        let st = s.stats();
        assert_eq!(
            st.chunks_filled,
            chunks.len() as u64,
            "{st:?} (seed {seed:#x})"
        );
        assert_eq!(st.bytes_filled, want, "{st:?}");
        assert_eq!(st.resident_bytes, want, "{st:?}");
        assert_eq!(s.resident_bytes().unwrap(), want, "memfd blocks");
        if let Some(rss) = smaps_rss(map.as_ptr() as usize) {
            assert!(
                rss <= want,
                "mapping RSS {rss} exceeds the {want} bytes filled"
            );
            assert!(
                rss >= (markers.len() + holes.len()) as u64 * page(),
                "RSS {rss}"
            );
        } else {
            panic!("the mapping is not in /proc/self/smaps");
        }
        // An eager shadow of it is refused up front, saying how to proceed.
        let eager = Engine::new(eager_config()).unwrap();
        let err = eager.open(&path).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
        let msg = err.to_string();
        for want in [
            "17179869184 bytes (16 GiB)",
            "--max-size 16G",
            "--mode lazy",
        ] {
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    });
}
