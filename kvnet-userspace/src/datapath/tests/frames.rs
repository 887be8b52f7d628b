//! The datapath tests' one home for checksum arithmetic (the PROG_RUN
//! tests per concern, the model and the fuzzer all sum through here).

/// One's-complement sum of big-endian 16-bit words (odd tail padded),
/// added to `acc`, not folded.
pub fn sum16(b: &[u8], mut acc: u64) -> u64 {
    for c in b.chunks(2) {
        acc += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
    }
    acc
}

/// Folds a one's-complement sum into 16 bits.
pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The Internet checksum of `b` with `acc` added: ready to store.
pub fn checksum(b: &[u8], acc: u64) -> u16 {
    !fold(sum16(b, acc))
}
