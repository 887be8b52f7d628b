//! MAC learning and lookup in the `fdb` map.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use kvnet_common::{
    owner_key, FdbEntry, FdbKey, FDB_F_STATIC, FDB_REFRESH_NS, FDB_VID_ANY, MAX_LEARNED_PER_NET,
};

use crate::{
    maps::{FDB, FDB_COUNT, MAC_OWNERS},
    stats,
};

/// Learns `mac` on `ingress`. Writes only when the entry is new, moved
/// (guest migration: re-learned at once) or due for a refresh; static
/// entries are never overwritten, and a MAC a guest port owns never moves
/// to another port (a trusted port sending it is not believed). `bounded`:
/// a port without port security, whose new MACs count against the
/// network's MAX_LEARNED_PER_NET.
#[inline(always)]
pub fn learn(net_id: u32, vid: u16, mac: [u8; 6], ingress: u32, bounded: bool) {
    let key = FdbKey { net_id, vid, mac };
    // The coarse clock (a tick's precision) is plenty for ageing in seconds
    // and far cheaper per packet than the precise one.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match unsafe { FDB.get(&key) } {
        Some(e) if e.flags & FDB_F_STATIC != 0 => return,
        Some(e) if e.ifindex == ingress && now.wrapping_sub(e.last_seen_ns) < FDB_REFRESH_NS => {
            return
        }
        Some(e) if e.ifindex == ingress => {}
        // New or moved: rare, so the ownership lookup costs nothing per packet.
        found => {
            if unsafe { MAC_OWNERS.get(&owner_key(net_id, mac)) }.is_some_and(|o| *o != ingress) {
                return;
            }
            if found.is_none() {
                let count = FDB_COUNT.get_ptr_mut(&net_id);
                let held = count.map_or(0, |c| unsafe { *c });
                if bounded && held >= MAX_LEARNED_PER_NET {
                    stats::learn_refused(ingress);
                    return;
                }
                // Plain add: a lost count is put right by the daemon's recount.
                match count {
                    Some(c) => unsafe { *c = held + 1 },
                    None => {
                        let _ = FDB_COUNT.insert(&net_id, &1, 0);
                    }
                }
                stats::learned(ingress);
            }
        }
    }
    let entry = FdbEntry {
        ifindex: ingress,
        flags: 0,
        last_seen_ns: now,
    };
    let _ = FDB.insert(&key, &entry, 0);
    // The network-wide entry, written as rarely as the VLAN's.
    let any = FdbKey {
        net_id,
        vid: FDB_VID_ANY,
        mac,
    };
    let _ = FDB.insert(&any, &entry, 0);
}

#[inline(always)]
pub fn lookup(net_id: u32, vid: u16, mac: [u8; 6]) -> Option<u32> {
    lookup_entry(net_id, vid, mac).map(|(ifindex, _)| ifindex)
}

/// (egress ifindex, entry flags)
#[inline(always)]
pub fn lookup_entry(net_id: u32, vid: u16, mac: [u8; 6]) -> Option<(u32, u32)> {
    let key = FdbKey { net_id, vid, mac };
    unsafe { FDB.get(&key) }.map(|e| (e.ifindex, e.flags))
}
