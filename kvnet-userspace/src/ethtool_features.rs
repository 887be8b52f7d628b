//! A device's active features (what `ethtool -k` shows) from the kernel's
//! `ethtool` generic-netlink family (Linux 5.6+), above all whether it takes
//! VLAN tags out of received frames into skb metadata (rx VLAN offload):
//! XDP then sees a tagged frame as untagged, and only tc can tell.
use anyhow::{bail, Context, Result};
use netlink_packet_utils::{
    nla::{DefaultNla, Nla, NlaBuffer, NlasIterator, NLA_F_NESTED},
    DecodeError, Emitable, Parseable,
};

use crate::genl::{query, Family};

const ETHTOOL_MSG_FEATURES_GET: u8 = 11;
const ETHTOOL_A_FEATURES_HEADER: u16 = 1;
const ETHTOOL_A_FEATURES_ACTIVE: u16 = 4;
const ETHTOOL_A_HEADER_DEV_INDEX: u16 = 1;
const ETHTOOL_A_BITSET_NOMASK: u16 = 1;
const ETHTOOL_A_BITSET_BITS: u16 = 3;
const ETHTOOL_A_BITSET_VALUE: u16 = 4;
const ETHTOOL_A_BITSET_BITS_BIT: u16 = 1;
const ETHTOOL_A_BITSET_BIT_NAME: u16 = 2;
const ETHTOOL_A_BITSET_BIT_VALUE: u16 = 3;

/// The features with which a device strips received VLAN tags (C-tags,
/// S-tags): NETIF_F_HW_VLAN_CTAG_RX / _STAG_RX under their stable names
/// (the bit numbers are the kernel's own and change between versions).
pub const RX_VLAN_STRIP: [&str; 2] = ["rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"];

#[derive(Debug)]
enum FeaturesAttr {
    /// Request header: the device by ifindex (a nest).
    Header(u32),
    /// The active feature set (a bitset nest, kept raw).
    Active(Vec<u8>),
    Other(DefaultNla),
}

impl Nla for FeaturesAttr {
    fn value_len(&self) -> usize {
        match self {
            FeaturesAttr::Header(_) => 8,
            FeaturesAttr::Active(v) => v.len(),
            FeaturesAttr::Other(n) => n.value_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            // The kernel validates nests strictly: they must say so.
            FeaturesAttr::Header(_) => ETHTOOL_A_FEATURES_HEADER | NLA_F_NESTED,
            FeaturesAttr::Active(_) => ETHTOOL_A_FEATURES_ACTIVE | NLA_F_NESTED,
            FeaturesAttr::Other(n) => n.kind(),
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            FeaturesAttr::Header(i) => {
                let dev = DefaultNla::new(ETHTOOL_A_HEADER_DEV_INDEX, i.to_ne_bytes().to_vec());
                [dev].as_slice().emit(buffer)
            }
            FeaturesAttr::Active(v) => buffer[..v.len()].copy_from_slice(v),
            FeaturesAttr::Other(n) => n.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for FeaturesAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        Ok(match buf.kind() {
            ETHTOOL_A_FEATURES_ACTIVE => FeaturesAttr::Active(buf.value().to_vec()),
            _ => FeaturesAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// The `ethtool` family.
#[derive(Debug)]
struct Ethtool;

impl Family for Ethtool {
    const NAME: &'static str = "ethtool";
}

/// The names of the bits set in a verbose bitset nest: with NOMASK the
/// nest lists just the set bits, otherwise each listed bit says whether it
/// is set.
fn set_bit_names(bitset: &[u8]) -> Result<Vec<String>> {
    let (mut nomask, mut listed, mut compact) = (false, None, false);
    for nla in NlasIterator::new(bitset) {
        let nla = nla.context("a malformed ethtool bitset")?;
        match nla.kind() {
            ETHTOOL_A_BITSET_NOMASK => nomask = true,
            ETHTOOL_A_BITSET_VALUE => compact = true,
            ETHTOOL_A_BITSET_BITS => {
                let mut bits = Vec::new();
                for bit in NlasIterator::new(nla.value()) {
                    let bit = bit.context("a malformed ethtool bitset bit")?;
                    if bit.kind() != ETHTOOL_A_BITSET_BITS_BIT {
                        continue;
                    }
                    let (mut name, mut set) = (None, false);
                    for a in NlasIterator::new(bit.value()) {
                        let a = a.context("a malformed ethtool bitset bit")?;
                        match a.kind() {
                            ETHTOOL_A_BITSET_BIT_NAME => {
                                let v = a.value();
                                let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
                                name = Some(String::from_utf8_lossy(&v[..end]).into_owned());
                            }
                            ETHTOOL_A_BITSET_BIT_VALUE => set = true,
                            _ => {}
                        }
                    }
                    if let Some(n) = name {
                        bits.push((n, set));
                    }
                }
                listed = Some(bits);
            }
            _ => {}
        }
    }
    match listed {
        Some(bits) => Ok(bits
            .into_iter()
            .filter(|(_, set)| nomask || *set)
            .map(|(n, _)| n)
            .collect()),
        // We ask for names; a bare bit array would need the kernel's own
        // (version-dependent) numbering.
        None if compact => bail!("the kernel sent a compact ethtool bitset, without names"),
        None => Ok(Vec::new()),
    }
}

/// The names of device `ifindex`'s active features (`ethtool -k` rows that
/// say "on"); None when the kernel has no `ethtool` netlink family.
pub fn active(ifindex: u32) -> Result<Option<Vec<String>>> {
    // No ETHTOOL_A_HEADER_FLAGS: verbose bitsets, which carry names.
    let answer = query::<Ethtool, _>(
        ETHTOOL_MSG_FEATURES_GET,
        vec![FeaturesAttr::Header(ifindex)],
    )
    .with_context(|| format!("features of ifindex {ifindex}"))?;
    let Some(answer) = answer else {
        return Ok(None);
    };
    let Some(bitset) = answer.attrs.iter().find_map(|a| match a {
        FeaturesAttr::Active(v) => Some(v),
        _ => None,
    }) else {
        bail!("the kernel's features of ifindex {ifindex} have no active set");
    };
    set_bit_names(bitset)
        .with_context(|| format!("features of ifindex {ifindex}"))
        .map(Some)
}

/// Whether device `ifindex` strips rx VLAN tags into skb metadata (one of
/// [`RX_VLAN_STRIP`] is on); None when the kernel cannot tell.
pub fn strips_rx_vlan(ifindex: u32) -> Result<Option<bool>> {
    Ok(active(ifindex)?.map(|on| on.iter().any(|f| RX_VLAN_STRIP.contains(&f.as_str()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A veth strips rx VLAN tags until `ethtool -K rxvlan off`; a tap never
    /// does (fixed off); and the answer follows `ethtool -k` name by name.
    #[test]
    fn rx_vlan_offload_as_ethtool_reports_it() {
        crate::genl::in_private_netns(|sh| {
            sh("ip link add ev0 type veth peer name ev1 && ip tuntap add dev et0 mode tap");
            let idx = |n: &str| nix::net::if_::if_nametoindex(n).unwrap();
            let veth = idx("ev0");
            assert_eq!(strips_rx_vlan(veth).unwrap(), Some(true));
            assert_eq!(strips_rx_vlan(idx("et0")).unwrap(), Some(false));
            // Both ways, rx-vlan-hw-parse alone: S-tag parsing stays on.
            sh("ethtool -K ev0 rxvlan off");
            let on = active(veth).unwrap().expect("an ethtool netlink family");
            assert!(!on.iter().any(|f| f == "rx-vlan-hw-parse"), "{on:?}");
            assert!(on.iter().any(|f| f == "rx-vlan-stag-hw-parse"), "{on:?}");
            sh("ethtool -K ev0 rx-vlan-stag-hw-parse off");
            assert_eq!(strips_rx_vlan(veth).unwrap(), Some(false));
            // Row by row as `ethtool -k` shows it, but for the rows it names
            // the old way (rx-vlan-offload is rx-vlan-hw-parse) or groups.
            const OLD_NAMES: [&str; 12] = [
                "rx-checksumming",
                "tx-checksumming",
                "scatter-gather",
                "tcp-segmentation-offload",
                "udp-fragmentation-offload",
                "generic-segmentation-offload",
                "generic-receive-offload",
                "large-receive-offload",
                "rx-vlan-offload",
                "tx-vlan-offload",
                "ntuple-filters",
                "receive-hashing",
            ];
            let table = sh("ethtool -k ev0");
            let got = active(veth).unwrap().unwrap();
            let mut rows = 0;
            for l in table.lines().skip(1) {
                let Some((name, state)) = l.trim().split_once(": ") else {
                    continue;
                };
                if OLD_NAMES.contains(&name) {
                    continue;
                }
                rows += 1;
                let on = state.starts_with("on");
                assert_eq!(got.iter().any(|g| g == name), on, "{name}: {got:?}");
            }
            assert!(rows > 20, "{table}");
            // An ifindex that names nothing is an error, not "no".
            assert!(strips_rx_vlan(0x7fff_fff0).is_err());
        });
    }
}
