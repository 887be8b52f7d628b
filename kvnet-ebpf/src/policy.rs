//! Port policy in the datapath: storm control on floods and rate limits
//! each way, token buckets in map `port_policy` refilled from the coarse
//! clock. Buckets are shared by all CPUs: a lost update costs a token or a
//! few bytes, never the limit.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use kvnet_common::{refill, refill_bytes, ByteBucket};

use crate::maps::PORT_POLICY;

/// Whether `ingress` may flood one more frame now (no entry, or no limit:
/// yes).
#[inline(always)]
pub fn storm_allows(ingress: u32) -> bool {
    let Some(p) = PORT_POLICY.get_ptr_mut(&ingress) else {
        return true;
    };
    let p = unsafe { &mut *p };
    if p.storm_pps == 0 {
        return true;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let (tokens, last) = refill(p.storm_tokens, p.storm_last_ns, now, p.storm_pps);
    p.storm_last_ns = last;
    if tokens == 0 {
        p.storm_tokens = 0;
        return false;
    }
    p.storm_tokens = tokens - 1;
    true
}

/// Takes `len` bytes from a bucket; false (nothing taken) when it lacks them.
#[inline(always)]
fn take(b: &mut ByteBucket, len: u64) -> bool {
    if b.rate == 0 {
        return true;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let (tokens, last) = refill_bytes(b, now);
    b.last_ns = last;
    if tokens < len {
        b.tokens = tokens;
        return false;
    }
    b.tokens = tokens - len;
    true
}

/// What the guest on `ifindex` sends: within its `rate_out`?
#[inline(always)]
pub fn out_allows(ifindex: u32, len: u64) -> bool {
    match PORT_POLICY.get_ptr_mut(&ifindex) {
        Some(p) => take(unsafe { &mut (*p).rate_out }, len),
        None => true,
    }
}

/// What the guest on `ifindex` gets: within its `rate_in`?
#[inline(always)]
pub fn in_allows(ifindex: u32, len: u64) -> bool {
    match PORT_POLICY.get_ptr_mut(&ifindex) {
        Some(p) => take(unsafe { &mut (*p).rate_in }, len),
        None => true,
    }
}
