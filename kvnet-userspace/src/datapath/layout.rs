//! Versioned map layouts: what a pinned datapath is, whether
//! this kvnet can read it, and how an older one's contents are carried over
//! into freshly created maps during an upgrade in place.
//!
//! The version lives in the pinned array map `layout`
//! ([`kvnet_common::LAYOUT_VERSION`]); the first edition had no such map and
//! is recognised by the sizes of its maps. Every pinned map's shape (type,
//! key and value size) is compared with what this binary's eBPF object
//! declares, so a layout change that forgot to bump the version is refused
//! rather than misread.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{MapData, MapInfo};
use kvnet_common::{names, LAYOUT_VERSION};

/// A map as the kernel sees it: what must match for a program to use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key: u32,
    pub value: u32,
}

const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

impl Shape {
    fn per_cpu(&self) -> bool {
        matches!(
            self.map_type,
            BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_LRU_PERCPU_HASH
        )
    }
}

/// The pinned maps of `object` (an eBPF ELF), by name.
pub fn expected(object: &[u8]) -> Result<BTreeMap<String, Shape>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    Ok(obj
        .maps
        .iter()
        .filter(|(_, m)| matches!(m.pinning(), aya_obj::maps::PinningType::ByName))
        .map(|(name, m)| {
            (
                name.clone(),
                Shape {
                    map_type: m.map_type(),
                    key: m.key_size(),
                    value: m.value_size(),
                },
            )
        })
        .collect())
}

/// The shape of the map pinned at `path`, None when nothing is pinned there.
pub fn pinned(path: &Path) -> Result<Option<Shape>> {
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(Shape {
        map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
        key: info.key_size(),
        value: info.value_size(),
    }))
}

/// What is pinned under the pin folder, compared with this binary.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// This binary's layout: adopt the maps as they are.
    Current,
    /// An older layout this binary can carry over.
    Older { version: u32 },
}

/// The version recorded by the pinned datapath; the first edition, which
/// recorded none, is told by its port map's value size.
fn pinned_version(pin_dir: &Path) -> Result<u32> {
    let path = pin_dir.join(names::MAP_LAYOUT);
    if path.exists() {
        let map =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let value = lookup(map.fd().as_fd().as_raw_fd(), &0u32.to_ne_bytes(), 4)?
            .ok_or_else(|| anyhow!("{} holds no version", path.display()))?;
        return Ok(u32::from_ne_bytes(value[..4].try_into().expect("4 bytes")));
    }
    match pinned(&pin_dir.join(names::MAP_PORTS))? {
        Some(s) if s.value == v1::PORT_CONFIG as u32 => Ok(1),
        Some(s) => bail!(
            "the pinned datapath records no layout version and its port map ({} bytes a port) matches none this kvnet knows",
            s.value
        ),
        None => bail!("no pinned port map under {}", pin_dir.display()),
    }
}

/// Decides whether this binary can take over the datapath under `pin_dir`.
/// The error is one line that says what to do.
pub fn inspect(pin_dir: &Path, object: &[u8]) -> Result<Found> {
    let unknown = |why: String| {
        anyhow!(
            "{why}: this kvnet (map layout {LAYOUT_VERSION}) cannot take it over; run `kvnet down` (it works without a daemon) and start again, which drops learned MACs and open NAT flows"
        )
    };
    let version = pinned_version(pin_dir).map_err(|e| unknown(format!("{e:#}")))?;
    let expected = expected(object)?;
    let mut differ = Vec::new();
    for (name, shape) in &expected {
        match pinned(&pin_dir.join(name))? {
            Some(p) if p != *shape => differ.push(name.clone()),
            _ => {}
        }
    }
    if version == LAYOUT_VERSION {
        if differ.is_empty() {
            return Ok(Found::Current);
        }
        return Err(unknown(format!(
            "the running datapath says map layout {version} but its maps {} differ from this build's (a build of another revision with the same version)",
            differ.join(", ")
        )));
    }
    if version > LAYOUT_VERSION || !CARRIED_FROM.contains(&version) {
        return Err(unknown(format!(
            "the running datapath has map layout {version}"
        )));
    }
    // Every pinned map must be one we can convert, copy as it is, or start
    // empty without loss (the trace ring).
    for (name, shape) in &expected {
        let Some(old) = pinned(&pin_dir.join(name))? else {
            continue;
        };
        let ok = converter(version, name).is_some()
            || old == *shape
            || shape.map_type == BPF_MAP_TYPE_RINGBUF;
        if !ok {
            return Err(unknown(format!(
                "map {name} of layout {version} has no conversion to layout {LAYOUT_VERSION}"
            )));
        }
    }
    Ok(Found::Older { version })
}

/// Older layouts this binary carries over.
pub const CARRIED_FROM: &[u32] = &[1, 2, 3];

/// Turns one old value (one CPU's, for per-CPU maps) into the new layout.
type Convert = fn(&[u8]) -> Vec<u8>;

/// The conversion of map `name` from layout `version`, if its value changed.
fn converter(version: u32, name: &str) -> Option<Convert> {
    match (version, name) {
        (1, names::MAP_PORTS) => Some(|o| v1::widen(o, v1::PORT_CONFIG, 2)),
        (1, names::MAP_NETS) => Some(|o| v1::widen(o, v1::NET_CONFIG, 3)),
        (1, names::MAP_CT) => Some(|o| v1::widen(o, v1::CT_ENTRY, 4)),
        (1, names::MAP_FORWARDS) => Some(|o| v1::widen(o, v1::FORWARD_TARGET, 5)),
        (1, names::MAP_NAT_STATS) => Some(|o| v1::widen(o, v1::NAT_STATS, 6)),
        (1, names::MAP_PORT_STATS) => Some(v1::port_stats),
        // Layout 3 appended NAT counters; its new maps start empty.
        (2, names::MAP_NAT_STATS) => Some(|o| v1::widen(o, v2::NAT_STATS, 6)),
        // Layout 4: port counters gained `arp_answered` before the drops,
        // flood sets grew to 4096 members; its new maps start empty.
        (2 | 3, names::MAP_PORT_STATS) => Some(v3::port_stats),
        (1..=3, names::MAP_FLOOD) => Some(v3::flood_set),
        _ => None,
    }
}

/// Layout 1 (the first edition, up to fa4f158): value sizes, and how each
/// value grew. Every change of layout 2 appended fields (zero: "not set",
/// which the daemon's adoption then fills) except the port counters, which
/// gained `learn_refused` before the drop counters and 8 drop reasons.
mod v1 {
    use core::mem::size_of;

    use kvnet_common::{CtEntry, ForwardTarget, NatStats, NetConfig, PortConfig, PortStats};

    pub const PORT_CONFIG: usize = 16;
    pub const NET_CONFIG: usize = 48;
    pub const CT_ENTRY: usize = 56;
    pub const FORWARD_TARGET: usize = 12;
    pub const NAT_STATS: usize = 7 * 8;
    /// 10 counters, then 9 drop reasons.
    pub const PORT_STATS: usize = 19 * 8;

    fn new_size(which: u8) -> usize {
        match which {
            2 => size_of::<PortConfig>(),
            3 => size_of::<NetConfig>(),
            4 => size_of::<CtEntry>(),
            5 => size_of::<ForwardTarget>(),
            _ => size_of::<NatStats>(),
        }
    }

    /// The old value followed by zeroes up to the new size.
    pub fn widen(old: &[u8], old_size: usize, which: u8) -> Vec<u8> {
        let mut v = vec![0u8; new_size(which)];
        let n = old_size.min(old.len()).min(v.len());
        v[..n].copy_from_slice(&old[..n]);
        v
    }

    pub fn port_stats(old: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; size_of::<PortStats>()];
        if old.len() < PORT_STATS {
            return v;
        }
        // rx..to_host keep their places; learn_refused and arp_answered
        // (new) are zero; the 9 old drop reasons keep their numbers.
        let drops = core::mem::offset_of!(PortStats, drops);
        v[..80].copy_from_slice(&old[..80]);
        v[drops..drops + 72].copy_from_slice(&old[80..152]);
        v
    }
}

/// Layout 2 (port security, up to d483672): the value sizes layout 3 grew.
mod v2 {
    /// 9 counters; layout 3 appended 6.
    pub const NAT_STATS: usize = 9 * 8;
}

/// Layout 3 (up to 9bd548a; layout 2 the same for these): flood sets of 64
/// members with `tagged` last, port counters without `arp_answered`.
mod v3 {
    use core::mem::size_of;

    use kvnet_common::{FloodSet, PortStats};

    pub const FLOOD_MEMBERS: usize = 64;
    /// 11 counters, then 17 drop reasons.
    pub const PORT_STATS: usize = 28 * 8;

    pub fn flood_set(old: &[u8]) -> Vec<u8> {
        let mut set = FloodSet::default();
        let word = |i: usize| {
            old.get(i * 4..i * 4 + 4)
                .map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        };
        set.count = word(0).min(FLOOD_MEMBERS as u32);
        for i in 0..FLOOD_MEMBERS {
            set.members[i] = word(1 + i);
        }
        set.tagged = word(1 + FLOOD_MEMBERS);
        bytemuck::bytes_of(&set).to_vec()
    }

    pub fn port_stats(old: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; size_of::<PortStats>()];
        if old.len() < PORT_STATS {
            return v;
        }
        let drops = core::mem::offset_of!(PortStats, drops);
        v[..88].copy_from_slice(&old[..88]);
        v[drops..drops + 17 * 8].copy_from_slice(&old[88..PORT_STATS]);
        v
    }
}

/// The per-CPU slot size of a value (the kernel rounds up to 8 bytes).
fn slot(value: u32) -> usize {
    (value as usize).div_ceil(8) * 8
}

fn cpus() -> Result<usize> {
    aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("counting CPUs")
}

/// Copies every entry of the map pinned at `from` into the one pinned at
/// `to`, converting values from layout `version` where the layout changed.
/// `only_missing`: keep entries `to` already has (a second pass that picks
/// up what the old datapath created meanwhile). Returns the entries written.
pub fn carry(
    name: &str,
    version: u32,
    from: &Path,
    to: &Path,
    only_missing: bool,
) -> Result<usize> {
    let (Some(old), Some(new)) = (pinned(from)?, pinned(to)?) else {
        return Ok(0);
    };
    if new.map_type == BPF_MAP_TYPE_RINGBUF {
        return Ok(0);
    }
    let convert = converter(version, name);
    if convert.is_none() && old != new {
        bail!("map {name}: no conversion from layout {version}");
    }
    let src = MapData::from_pin(from).with_context(|| format!("opening {}", from.display()))?;
    let dst = MapData::from_pin(to).with_context(|| format!("opening {}", to.display()))?;
    let (src, dst) = (src.fd().as_fd().as_raw_fd(), dst.fd().as_fd().as_raw_fd());
    let ncpu = if old.per_cpu() { cpus()? } else { 1 };
    let (old_slot, new_slot) = if old.per_cpu() {
        (slot(old.value), slot(new.value))
    } else {
        (old.value as usize, new.value as usize)
    };
    let mut written = 0;
    let mut key: Option<Vec<u8>> = None;
    while let Some(next) = next_key(src, key.as_deref(), old.key as usize)? {
        key = Some(next.clone());
        // Gone between the two calls: nothing to carry.
        let Some(value) = lookup(src, &next, old_slot * ncpu)? else {
            continue;
        };
        let mut out = vec![0u8; new_slot * ncpu];
        for cpu in 0..ncpu {
            let o = &value[cpu * old_slot..cpu * old_slot + old.value as usize];
            let n = match convert {
                Some(f) => f(o),
                None => o.to_vec(),
            };
            let len = n.len().min(new.value as usize);
            out[cpu * new_slot..cpu * new_slot + len].copy_from_slice(&n[..len]);
        }
        let flags = if only_missing { BPF_NOEXIST } else { BPF_ANY };
        match update(dst, &next, &out, flags) {
            Ok(()) => written += 1,
            Err(e) if only_missing && e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("writing an entry of map {name}"));
            }
        }
    }
    Ok(written)
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// `union bpf_attr` as the map element commands read it.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut ElemAttr) -> std::io::Result<()> {
    // SAFETY: attr is a valid bpf_attr prefix for the map element commands
    // and the buffers it points to outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            core::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn next_key(fd: i32, key: Option<&[u8]>, key_size: usize) -> Result<Option<Vec<u8>>> {
    let mut next = vec![0u8; key_size];
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: next.as_mut_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(()) => Ok(Some(next)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e).context("walking a map"),
    }
}

fn lookup(fd: i32, key: &[u8], value_size: usize) -> Result<Option<Vec<u8>>> {
    let mut value = vec![0u8; value_size];
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e).context("reading a map entry"),
    }
}

fn update(fd: i32, key: &[u8], value: &[u8], flags: u64) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// Records this binary's layout version in the pinned `layout` map.
pub fn record(pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(names::MAP_LAYOUT);
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    update(
        map.fd().as_fd().as_raw_fd(),
        &0u32.to_ne_bytes(),
        &LAYOUT_VERSION.to_ne_bytes(),
        BPF_ANY,
    )
    .context("recording the layout version")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvnet_common::{CtEntry, PortConfig, PortStats, DROP_REASONS};

    #[test]
    fn layout_1_values_keep_their_fields() {
        // The first edition's fields, then its zero padding.
        let mut old: Vec<u8> = (1..=16).collect();
        old[14..].fill(0);
        let new = converter(1, names::MAP_PORTS).unwrap()(&old);
        let pc: PortConfig = *bytemuck::from_bytes(&new);
        assert_eq!(&new[..16], &old[..], "the first edition's fields in place");
        assert_eq!(pc.ip_count, 0);
        assert_eq!(pc.owned_macs().len(), 0, "no MAC owned yet");

        let mut old = vec![0u8; v1::CT_ENTRY];
        old[48..56].copy_from_slice(&7u64.to_ne_bytes());
        let ct: CtEntry = *bytemuck::from_bytes(&converter(1, names::MAP_CT).unwrap()(&old));
        assert_eq!(ct.bytes, 7);
        assert_eq!(ct.port, 0, "an old flow counts against no quota");
    }

    #[test]
    fn layout_2_nat_counters_keep_their_places_and_the_new_ones_start_at_zero() {
        let old: Vec<u8> = (0..9u64).flat_map(|i| (i + 1).to_ne_bytes()).collect();
        let new = converter(2, names::MAP_NAT_STATS).unwrap()(&old);
        let s: kvnet_common::NatStats = *bytemuck::from_bytes(&new);
        assert_eq!((s.translated, s.drop_ct_quota), (1, 9));
        assert_eq!((s.fragments, s.eif_flows), (0, 0));
        // Nothing else of layout 2 changed shape but what layout 4 did.
        for name in [names::MAP_PORTS, names::MAP_CT] {
            assert!(converter(2, name).is_none(), "{name}");
        }
    }

    #[test]
    fn layout_3_flood_sets_and_port_counters_keep_their_meaning() {
        // count 3, members 11 12 13, then zeroes, then tagged 1.
        let mut old = vec![0u8; 4 * (2 + v3::FLOOD_MEMBERS)];
        for (i, w) in [3u32, 11, 12, 13].iter().enumerate() {
            old[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let end = old.len();
        old[end - 4..].copy_from_slice(&1u32.to_ne_bytes());
        let new = converter(3, names::MAP_FLOOD).unwrap()(&old);
        let set: kvnet_common::FloodSet = *bytemuck::from_bytes(&new);
        assert_eq!((set.count, set.tagged), (3, 1));
        assert_eq!(&set.members[..4], &[11, 12, 13, 0]);

        let old: Vec<u8> = (0..28u64).flat_map(|i| (i + 1).to_ne_bytes()).collect();
        let new = converter(3, names::MAP_PORT_STATS).unwrap()(&old);
        let s: PortStats = *bytemuck::from_bytes(&new);
        assert_eq!((s.learn_refused, s.arp_answered), (11, 0));
        assert_eq!((s.drops[0], s.drops[16]), (12, 28), "malformed .. ct_quota");
        assert!(
            s.drops[17..].iter().all(|d| *d == 0),
            "storm, rate_limit, isolated"
        );
    }

    #[test]
    fn layout_1_port_counters_keep_their_meaning() {
        let old: Vec<u8> = (0..19u64).flat_map(|i| (i + 1).to_ne_bytes()).collect();
        let new = converter(1, names::MAP_PORT_STATS).unwrap()(&old);
        let s: PortStats = *bytemuck::from_bytes(&new);
        assert_eq!(s.learn_refused, 0);
        assert_eq!(s.to_host, 10, "the tenth counter");
        assert_eq!(s.drops[0], 11, "malformed");
        assert_eq!(s.drops[8], 19, "rogue_dhcp");
        assert!(s.drops[9..DROP_REASONS].iter().all(|d| *d == 0));
    }

    #[test]
    fn this_object_declares_every_map_with_its_layout() {
        let shapes = expected(crate::datapath::object()).unwrap();
        let layout = shapes.get(names::MAP_LAYOUT).expect("the layout map");
        assert_eq!((layout.key, layout.value), (4, 4));
        assert_eq!(
            shapes.get(names::MAP_PORTS).map(|s| s.value),
            Some(core::mem::size_of::<PortConfig>() as u32)
        );
        assert_eq!(
            shapes.get(names::MAP_CT).map(|s| s.value),
            Some(core::mem::size_of::<CtEntry>() as u32)
        );
        // The layout this binary carries over from must differ from its own
        // where it says so.
        assert_ne!(v1::PORT_CONFIG, core::mem::size_of::<PortConfig>());
    }
}
