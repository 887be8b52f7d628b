//! What a device's driver can do with XDP, from the kernel's `netdev`
//! generic-netlink family (Linux 6.3+): above all whether XDP_REDIRECT may
//! send *to* it (`ndo_xdp_xmit`). Without that a redirect to the port fails
//! and the frame is lost, so the XDP hook must hand such frames to tc.
use anyhow::{Context, Result};
use netlink_packet_utils::{
    nla::{DefaultNla, Nla, NlaBuffer},
    DecodeError, Parseable,
};

use crate::genl::{query, Family};

/// The `netdev` family.
#[derive(Debug)]
struct Netdev;

impl Family for Netdev {
    const NAME: &'static str = "netdev";
}

const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// NETDEV_XDP_ACT_NDO_XMIT: the device takes frames other devices redirect.
pub const XDP_ACT_NDO_XMIT: u64 = 1 << 2;

#[derive(Debug)]
enum DevAttr {
    Ifindex(u32),
    XdpFeatures(u64),
    Other(DefaultNla),
}

impl Nla for DevAttr {
    fn value_len(&self) -> usize {
        match self {
            DevAttr::Ifindex(_) => 4,
            DevAttr::XdpFeatures(_) => 8,
            DevAttr::Other(n) => n.value_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            DevAttr::Ifindex(_) => NETDEV_A_DEV_IFINDEX,
            DevAttr::XdpFeatures(_) => NETDEV_A_DEV_XDP_FEATURES,
            DevAttr::Other(n) => n.kind(),
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            DevAttr::Ifindex(i) => buffer[..4].copy_from_slice(&i.to_ne_bytes()),
            DevAttr::XdpFeatures(f) => buffer[..8].copy_from_slice(&f.to_ne_bytes()),
            DevAttr::Other(n) => n.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DevAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            NETDEV_A_DEV_IFINDEX if v.len() >= 4 => {
                DevAttr::Ifindex(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            }
            NETDEV_A_DEV_XDP_FEATURES if v.len() >= 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v[..8]);
                DevAttr::XdpFeatures(u64::from_ne_bytes(b))
            }
            _ => DevAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// The XDP features (`NETDEV_XDP_ACT_*` bits) of device `ifindex`; None
/// when the kernel cannot tell (no `netdev` family).
pub fn of(ifindex: u32) -> Result<Option<u64>> {
    let answer = query::<Netdev, _>(NETDEV_CMD_DEV_GET, vec![DevAttr::Ifindex(ifindex)])
        .with_context(|| format!("XDP features of ifindex {ifindex}"))?;
    Ok(answer.map(|a| {
        a.attrs
            .iter()
            .find_map(|a| match a {
                DevAttr::XdpFeatures(f) => Some(*f),
                _ => None,
            })
            .unwrap_or(0)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Taps take XDP redirects, macvlans do not (kernel facts since 6.3).
    #[test]
    fn taps_take_redirects_and_macvlans_do_not() {
        crate::genl::in_private_netns(|sh| {
            sh(
                "ip tuntap add dev xt0 mode tap && ip link add xl0 type veth peer name xl1 \
                && ip link add xm0 link xl0 type macvlan mode passthru",
            );
            let idx = |n: &str| nix::net::if_::if_nametoindex(n).unwrap();
            let tap = of(idx("xt0")).unwrap().expect("a 6.3+ kernel");
            let macvlan = of(idx("xm0")).unwrap().expect("a 6.3+ kernel");
            assert_ne!(tap & XDP_ACT_NDO_XMIT, 0, "tap: {tap:#x}");
            assert_eq!(macvlan & XDP_ACT_NDO_XMIT, 0, "macvlan: {macvlan:#x}");
        });
    }
}
