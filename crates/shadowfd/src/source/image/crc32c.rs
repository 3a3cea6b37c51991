//! CRC-32C (Castagnoli), as ext4's `metadata_csum` uses it: the reflected
//! polynomial 0x82F63B78, a caller-chosen starting value, and no final
//! inversion (the kernel's `crc32c()` and e2fsprogs' `ext2fs_crc32c_le()`).
//! A byte-at-a-time table: extent blocks are few and small.

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
pub(super) fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
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
        // Continuing equals one pass.
        assert_eq!(
            crc32c(crc32c(7, b"1234"), b"56789"),
            crc32c(7, b"123456789")
        );
    }
}
