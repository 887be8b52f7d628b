//! Port policy (map `port_policy`, keyed by ifindex): storm control and
//! rate limits, token buckets the datapath refills from the clock.
use bytemuck::{Pod, Zeroable};

/// A byte-rate token bucket: `rate` bytes a second, up to `burst` saved.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ByteBucket {
    /// Bytes per second, 0: no limit.
    pub rate: u64,
    pub burst: u64,
    pub tokens: u64,
    pub last_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortPolicy {
    /// Floods (broadcast, multicast, unknown unicast) a second, 0: none.
    pub storm_pps: u32,
    pub storm_tokens: u32,
    pub storm_last_ns: u64,
    /// What the guest sends (the port's ingress).
    pub rate_out: ByteBucket,
    /// What the guest gets (the port's egress).
    pub rate_in: ByteBucket,
}

/// Refills a byte bucket at `now`: (tokens, last refill). The time of a
/// partial byte carries over; a long idle fills it to its burst.
#[inline(always)]
pub fn refill_bytes(b: &ByteBucket, now: u64) -> (u64, u64) {
    if b.rate == 0 {
        return (b.tokens, now);
    }
    // Capped so the products below cannot overflow (rates up to 50 GB/s).
    let elapsed = now.saturating_sub(b.last_ns).min(1_000_000_000_000);
    if elapsed >= 100_000_000 {
        // Idle a while: millisecond steps are exact enough.
        let add = elapsed / 1_000_000 * b.rate / 1000;
        return (b.tokens.saturating_add(add).min(b.burst), now);
    }
    let add = elapsed * b.rate / 1_000_000_000;
    if add == 0 {
        return (b.tokens, b.last_ns);
    }
    (
        (b.tokens + add).min(b.burst),
        b.last_ns + add * 1_000_000_000 / b.rate,
    )
}

/// The burst a rate gets: one second of it, as libvirt's policer (TCP's
/// 64 KiB GSO packets through a smaller bucket collapse to a fraction of
/// the rate), but never less than two such packets.
pub fn burst_for(rate_bytes: u64) -> u64 {
    rate_bytes.max(2 * (65_536 + 2 * 1514))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_bucket_refills_at_its_rate_up_to_its_burst() {
        let b = ByteBucket {
            rate: 1_000_000,
            burst: 200_000,
            tokens: 0,
            last_ns: 1_000_000_000,
        };
        // 10 ms at 1 MB/s: 10 kB.
        assert_eq!(refill_bytes(&b, 1_010_000_000), (10_000, 1_010_000_000));
        // Long idle: full, never beyond the burst.
        assert_eq!(refill_bytes(&b, 9_000_000_000).0, 200_000);
        // Backwards clock: nothing.
        assert_eq!(refill_bytes(&b, 0), (0, 1_000_000_000));
        // 0.5 us at 1 MB/s is not a whole byte: the time is kept.
        assert_eq!(refill_bytes(&b, 1_000_000_500), (0, 1_000_000_000));
        assert_eq!(burst_for(1_000), 2 * (65_536 + 2 * 1514));
        assert_eq!(burst_for(1_250_000), 1_250_000);
    }
}
