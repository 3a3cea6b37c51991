//! Tests of the disk chunk cache (cache.rs): refusals, page checks,
//! format versions, recency and eviction.

use super::*;

fn cache(dir: &Path, max: u64) -> ChunkCache {
    ChunkCache::open(dir, max, ["http://e", "b", "k", "\"etag\""]).unwrap()
}

fn data_of(len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn get(c: &ChunkCache, i: u64, len: usize) -> Result<Vec<u8>, Miss> {
    c.get(i, len).map(|(d, _)| d)
}

/// Block `i`'s bytes `from..from + n` through [`ChunkCache::read`].
fn read(c: &ChunkCache, i: u64, len: usize, from: usize, n: usize) -> Result<Vec<u8>, Miss> {
    let mut b = vec![0xAAu8; n];
    c.read(i, len, from, &mut b).map(|_| b)
}

/// Changes the byte at `at` of block `i`'s file.
fn flip(c: &ChunkCache, i: u64, at: usize) {
    let p = c.path_of(i);
    let mut bytes = fs::read(&p).unwrap();
    bytes[at] ^= 1;
    fs::write(&p, &bytes).unwrap();
}

#[test]
fn round_trip_and_refusals() {
    let d = tempfile::tempdir().unwrap();
    let c = cache(d.path(), 1 << 20);
    let data = data_of(8192);
    let off = data_offset(8192);
    assert_eq!(get(&c, 3, 8192), Err(Miss::Absent));
    c.put(3, &data).unwrap();
    assert_eq!(get(&c, 3, 8192).unwrap(), data);
    // Asked with another length: refused (and removed).
    assert_eq!(get(&c, 3, 4096), Err(Miss::Refused));
    assert_eq!(get(&c, 3, 8192), Err(Miss::Absent));
    // A flipped byte.
    c.put(3, &data).unwrap();
    flip(&c, 3, off + 100);
    assert_eq!(get(&c, 3, 8192), Err(Miss::Refused));
    // A flipped byte in the table, in the header's index, in its magic.
    for at in [HEADER + 3, 9, 2] {
        c.put(3, &data).unwrap();
        flip(&c, 3, at);
        assert_eq!(read(&c, 3, 8192, 0, 8192), Err(Miss::Refused), "byte {at}");
    }
    // Truncated.
    c.put(3, &data).unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(c.path_of(3))
        .unwrap();
    f.set_len((off + 4000) as u64).unwrap();
    assert_eq!(get(&c, 3, 8192), Err(Miss::Refused));
    // Longer than its block: a partial read serves only checked pages of
    // the block; a whole-block read refuses the file.
    c.put(3, &data).unwrap();
    let f = fs::OpenOptions::new()
        .append(true)
        .open(c.path_of(3))
        .unwrap();
    (&f).write_all(b"tail").unwrap();
    assert_eq!(read(&c, 3, 8192, 4096, 4096).unwrap(), data[4096..]);
    assert_eq!(get(&c, 3, 8192), Err(Miss::Refused));
    // Not a regular file: refused, never served.
    fs::remove_file(c.path_of(3)).ok();
    fs::create_dir(c.path_of(3)).unwrap();
    assert_eq!(read(&c, 3, 8192, 0, 4096), Err(Miss::Refused));
    fs::remove_dir(c.path_of(3)).unwrap();
    // Another block's file in this block's place.
    c.put(4, &data).unwrap();
    fs::rename(c.path_of(4), c.path_of(3)).unwrap();
    assert_eq!(read(&c, 3, 8192, 0, 4096), Err(Miss::Refused));
    // Another version never sees this one's files.
    c.put(5, &data).unwrap();
    let other = ChunkCache::open(d.path(), 1 << 20, ["http://e", "b", "k", "\"new\""]).unwrap();
    assert_eq!(get(&other, 5, 8192), Err(Miss::Absent));
    // The same file under the other version's name: another seed.
    fs::copy(c.path_of(5), other.path_of(5)).unwrap();
    assert_eq!(read(&other, 5, 8192, 0, 8192), Err(Miss::Refused));
}

/// A read checks the pages it returns, whatever the range: aligned,
/// cut at either end, within one page, up to a short last page.
#[test]
fn reads_of_any_range_are_exact() {
    let d = tempfile::tempdir().unwrap();
    let c = cache(d.path(), 1 << 20);
    let len = 5 * PAGE + 123;
    let data = data_of(len);
    c.put(0, &data).unwrap();
    for (from, n) in [
        (0, len),
        (0, PAGE),
        (PAGE, 2 * PAGE),
        (1, 10),
        (PAGE - 1, 2),
        (3 * PAGE + 17, len - 3 * PAGE - 17),
        (5 * PAGE, 123),
        (len - 1, 1),
    ] {
        assert_eq!(
            read(&c, 0, len, from, n).unwrap(),
            &data[from..from + n],
            "{from}+{n}"
        );
    }
    assert_eq!(
        read(&c, 0, len, len - 1, 2),
        Err(Miss::Absent),
        "past the end"
    );
    assert_eq!(get(&c, 0, len).unwrap(), data);
}

/// A tampered page is refused by any read that returns part of it,
/// and the file is removed: the next read fetches. Reads of the other
/// pages before that are served, and right.
#[test]
fn a_tampered_page_is_refused_by_the_reads_that_cover_it() {
    let d = tempfile::tempdir().unwrap();
    let c = cache(d.path(), 1 << 20);
    let len = 16 * PAGE;
    let data = data_of(len);
    let off = data_offset(len);
    for (from, n) in [
        (5 * PAGE, PAGE),
        (4 * PAGE, 4 * PAGE),
        (5 * PAGE + 9, 1),
        (0, len),
    ] {
        c.put(1, &data).unwrap();
        flip(&c, 1, off + 5 * PAGE + 9);
        assert_eq!(read(&c, 1, len, 0, 5 * PAGE).unwrap(), &data[..5 * PAGE]);
        assert_eq!(
            read(&c, 1, len, 6 * PAGE, PAGE).unwrap(),
            &data[6 * PAGE..7 * PAGE]
        );
        assert_eq!(read(&c, 1, len, from, n), Err(Miss::Refused), "{from}+{n}");
        assert!(!c.path_of(1).exists(), "a refused file is removed");
        assert_eq!(read(&c, 1, len, 0, PAGE), Err(Miss::Absent));
    }
    // Two pages swapped (each page's sum is seeded with its place).
    c.put(1, &data).unwrap();
    let mut bytes = fs::read(c.path_of(1)).unwrap();
    let (a, b) = bytes[off..].split_at_mut(PAGE);
    a.swap_with_slice(&mut b[..PAGE]);
    fs::write(c.path_of(1), &bytes).unwrap();
    assert_eq!(read(&c, 1, len, 0, PAGE), Err(Miss::Refused));
}

/// A cache directory of the old format (one checksum per block) is
/// removed at open; its files are never read as this format's.
#[test]
fn an_old_format_directory_is_discarded() {
    let d = tempfile::tempdir().unwrap();
    let old = d.path().join("v1").join("0123456789abcdef0123456789abcdef");
    fs::create_dir_all(&old).unwrap();
    fs::write(old.join("0000000000"), vec![1u8; 40 + 8192]).unwrap();
    let c = cache(d.path(), 1 << 20);
    assert!(!d.path().join("v1").exists(), "the v1 directory is removed");
    assert!(c.path_of(0).starts_with(d.path().join(FORMAT_DIR)));
    assert_eq!(get(&c, 0, 8192), Err(Miss::Absent));
    let data = data_of(8192);
    c.put(0, &data).unwrap();
    assert_eq!(get(&c, 0, 8192).unwrap(), data);
    // A file of the old format in the new place is refused.
    fs::write(
        c.path_of(0),
        [b"SHFDCHK1".as_slice(), &[0u8; 32 + 8192]].concat(),
    )
    .unwrap();
    assert_eq!(read(&c, 0, 8192, 0, 8192), Err(Miss::Refused));
}

/// A hit writes no time; the first hit per block is noted once, and
/// a batch is due after [`TOUCH_BATCH`] distinct blocks.
#[test]
fn hits_note_times_once_per_block_and_write_them_in_batches() {
    let d = tempfile::tempdir().unwrap();
    let c = cache(d.path(), 64 << 20);
    let data = data_of(PAGE);
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(1000);
    for i in 0..TOUCH_BATCH as u64 {
        c.put(i, &data).unwrap();
        File::options()
            .write(true)
            .open(c.path_of(i))
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let mtime = |i: u64| fs::metadata(c.path_of(i)).unwrap().modified().unwrap();
    for _ in 0..3 {
        assert_eq!(c.read(0, PAGE, 0, &mut [0u8; 16]), Ok(false));
    }
    assert_eq!(mtime(0), old, "a hit writes no time");
    for i in 1..TOUCH_BATCH as u64 - 1 {
        assert_eq!(c.get(i, PAGE).map(|g| g.1), Ok(false));
    }
    assert_eq!(c.get(TOUCH_BATCH as u64 - 1, PAGE).map(|g| g.1), Ok(true));
    assert_eq!(mtime(5), old);
    c.flush_touches();
    assert!(mtime(0) > old && mtime(5) > old && mtime(TOUCH_BATCH as u64 - 1) > old);
    // Noted once: a later hit on block 0 notes nothing more.
    File::options()
        .write(true)
        .open(c.path_of(0))
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(c.read(0, PAGE, 0, &mut [0u8; 16]), Ok(false));
    c.flush_touches();
    assert_eq!(mtime(0), old, "once per block per open");
    // Dropping the cache writes what is noted.
    c.put(100, &data).unwrap();
    File::options()
        .write(true)
        .open(c.path_of(100))
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert!(c.get(100, PAGE).is_ok());
    let p = c.path_of(100);
    drop(c);
    assert!(fs::metadata(p).unwrap().modified().unwrap() > old);
}

#[test]
fn file_names_are_ten_digits_or_more() {
    for i in [0, 7, 1234, 9_999_999_999, 10_000_000_000, u64::MAX] {
        let mut b = [b'0'; 20];
        assert_eq!(format_index(i, &mut b), format!("{i:010}").as_bytes());
    }
}

/// Opening a cache over its bound lists and deletes nothing; the first
/// write makes the pass.
#[test]
fn the_first_pass_comes_with_the_first_write() {
    let d = tempfile::tempdir().unwrap();
    let block = 64 << 10;
    let file = (data_offset(block) + block) as u64;
    let data = vec![3u8; block];
    let c = cache(d.path(), 10 * file);
    for i in 0..6 {
        c.put(i, &data).unwrap();
        age(&c, i, 100 - i);
    }
    drop(c);
    let c = cache(d.path(), 3 * file);
    assert!(
        (0..6).all(|i| c.path_of(i).exists()),
        "open deletes nothing"
    );
    assert!(c.read(5, block, 0, &mut [0u8; 4096]).is_ok());
    c.put(6, &data).unwrap();
    let left = (0..7).filter(|&i| c.path_of(i).exists()).count();
    assert!(left <= 3, "{left} files over a bound of 3");
    assert!(c.path_of(6).exists() && !c.path_of(0).exists());
}

fn age(c: &ChunkCache, i: u64, secs: u64) {
    let t = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    File::options()
        .write(true)
        .open(c.path_of(i))
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn evicts_least_recently_used() {
    let d = tempfile::tempdir().unwrap();
    let block = 64 << 10;
    let file = (data_offset(block) + block) as u64;
    let c = cache(d.path(), 4 * file);
    let data = vec![7u8; block];
    for i in 0..4 {
        c.put(i, &data).unwrap();
        // Distinct modification times, oldest first.
        age(&c, i, 100 - i);
    }
    // Block 0 used recently (its time written): block 1 is now the oldest.
    assert!(c.read(0, block, 0, &mut [0u8; 4096]).is_ok());
    c.flush_touches();
    c.put(4, &data).unwrap();
    assert!(get(&c, 0, block).is_ok(), "the recently used block stays");
    assert_eq!(
        get(&c, 1, block),
        Err(Miss::Absent),
        "the oldest is evicted"
    );
    assert!(get(&c, 4, block).is_ok());
}

/// Versions opened in one budget count their writes together: the
/// bound holds over all of them, with passes as they write.
#[test]
fn versions_sharing_a_budget_are_bounded_together() {
    let d = tempfile::tempdir().unwrap();
    let block = 64 << 10;
    let b = CacheBudget::open(d.path(), 3 * (data_offset(block) + block) as u64).unwrap();
    let data = vec![9u8; block];
    let vs: Vec<ChunkCache> = (0..4)
        .map(|i| ChunkCache::open_in(&b, ["http://e", "b", &format!("k{i}"), "\"e\""]).unwrap())
        .collect();
    for (i, v) in vs.iter().enumerate() {
        v.put(0, &data).unwrap();
        age(v, 0, 100 - i as u64);
    }
    vs[3].put(1, &data).unwrap();
    let held = vs
        .iter()
        .flat_map(|v| [get(v, 0, block).is_ok(), get(v, 1, block).is_ok()])
        .filter(|&h| h)
        .count();
    assert!(held <= 3, "{held} blocks held over a bound of 3");
    assert_eq!(
        get(&vs[0], 0, block),
        Err(Miss::Absent),
        "the oldest version's block went first"
    );
    assert!(get(&vs[3], 1, block).is_ok(), "the newest stays");
}
