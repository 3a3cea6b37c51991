//! CRC-32C (Castagnoli), as ext4's `metadata_csum` uses it: the reflected
//! polynomial 0x82F63B78, a caller-chosen starting value, and no final
//! inversion (the kernel's `crc32c()` and e2fsprogs' `ext2fs_crc32c_le()`).
//! SSE4.2's `crc32` instruction where the CPU has it (every inode read is
//! checked, so this is on the lookup path), else a byte-at-a-time table.

const POLY: u32 = 0x82F6_3B78;

const fn table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static TABLE: [u32; 256] = table();

/// Continues a CRC-32C from `crc` over `data`.
pub(super) fn crc32c(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: `hw` needs SSE4.2, which the CPU has (checked just
            // above); it reads only within `data`.
            return unsafe { hw(crc, data) };
        }
    }
    soft(crc, data)
}

/// The instruction's update is the table's, eight bytes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn hw(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    let mut c = u64::from(crc);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        c = _mm_crc32_u64(c, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let mut c = c as u32;
    for &b in words.remainder() {
        c = _mm_crc32_u8(c, b);
    }
    c
}

fn soft(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_check_values() {
        // The CRC-32C check value (RFC 3720 / iSCSI): init and final xor ~0.
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
        assert_eq!(!crc32c(!0, &[0u8; 32]), 0x8A91_36AA);
        assert_eq!(!crc32c(!0, &[0xFFu8; 32]), 0x62A8_AB43);
        // Both ways agree, on every length and start.
        let data: Vec<u8> = (0..1000u32).map(|i| ((i * 7919) >> 3) as u8).collect();
        for len in [0, 1, 7, 8, 9, 255, 256, 1000] {
            assert_eq!(
                crc32c(0x1234_5678, &data[..len]),
                soft(0x1234_5678, &data[..len])
            );
        }
        // Continuing equals one pass.
        assert_eq!(
            crc32c(crc32c(7, b"1234"), b"56789"),
            crc32c(7, b"123456789")
        );
    }
}
