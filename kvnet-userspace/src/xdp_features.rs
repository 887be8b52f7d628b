//! What a device's driver can do with XDP, from the kernel's `netdev`
//! generic-netlink family (Linux 6.3+): above all whether XDP_REDIRECT may
//! send *to* it (`ndo_xdp_xmit`). Without that a redirect to the port fails
//! and the frame is lost, so the XDP hook must hand such frames to tc.
use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlFamily, GenlHeader, GenlMessage,
};
use netlink_packet_utils::{
    nla::{DefaultNla, Nla, NlaBuffer, NlasIterator},
    DecodeError, Emitable, Parseable, ParseableParametrized,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

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

/// A `netdev` DEV_GET request or its answer.
#[derive(Debug)]
struct Dev {
    cmd: u8,
    attrs: Vec<DevAttr>,
}

impl GenlFamily for Dev {
    fn family_name() -> &'static str {
        "netdev"
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for Dev {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Dev {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| DevAttr::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Dev {
            cmd: header.cmd,
            attrs,
        })
    }
}

fn socket() -> Result<Socket> {
    let mut s = Socket::new(NETLINK_GENERIC).context("generic netlink socket")?;
    s.bind_auto()
        .context("binding the generic netlink socket")?;
    s.connect(&SocketAddr::new(0, 0))
        .context("connecting the generic netlink socket")?;
    Ok(s)
}

/// Sends one request and returns the first answer's payload.
fn ask<F>(sock: &Socket, msg: GenlMessage<F>) -> Result<GenlMessage<F>>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
{
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = NLM_F_REQUEST;
    nl.finalize();
    let mut tx = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut tx);
    sock.send(&tx, 0)
        .context("sending a generic netlink request")?;
    let mut rx = vec![0u8; 8192];
    let n = sock
        .recv(&mut &mut rx[..], 0)
        .context("receiving a generic netlink answer")?;
    let answer = NetlinkMessage::<GenlMessage<F>>::deserialize(&rx[..n])
        .map_err(|e| anyhow!("an undecodable generic netlink answer: {e}"))?;
    match answer.payload {
        NetlinkPayload::InnerMessage(m) => Ok(m),
        NetlinkPayload::Error(e) => Err(std::io::Error::from(e.to_io()).into()),
        other => bail!("unexpected generic netlink answer {other:?}"),
    }
}

/// The `netdev` family's id; None on kernels before 6.3, which lack it.
fn family_id(sock: &Socket) -> Result<Option<u16>> {
    let mut req = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(Dev::family_name().into())],
    });
    req.finalize();
    match ask(sock, req) {
        Ok(m) => Ok(m.payload.nlas.iter().find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })),
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error())
                == Some(libc::ENOENT) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.context("looking up the netdev netlink family")),
    }
}

/// The XDP features (`NETDEV_XDP_ACT_*` bits) of device `ifindex`; None
/// when the kernel cannot tell (no `netdev` family).
pub fn of(ifindex: u32) -> Result<Option<u64>> {
    let sock = socket()?;
    let Some(id) = family_id(&sock)? else {
        return Ok(None);
    };
    let mut req = GenlMessage::from_payload(Dev {
        cmd: NETDEV_CMD_DEV_GET,
        attrs: vec![DevAttr::Ifindex(ifindex)],
    });
    req.set_resolved_family_id(id);
    req.finalize();
    let answer = ask(&sock, req).with_context(|| format!("XDP features of ifindex {ifindex}"))?;
    Ok(Some(
        answer
            .payload
            .attrs
            .iter()
            .find_map(|a| match a {
                DevAttr::XdpFeatures(f) => Some(*f),
                _ => None,
            })
            .unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Taps take XDP redirects, macvlans do not (kernel facts since 6.3).
    #[test]
    fn taps_take_redirects_and_macvlans_do_not() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for a private network namespace");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let sh = |c: &str| {
                let ok = std::process::Command::new("sh")
                    .args(["-c", c])
                    .status()
                    .unwrap();
                assert!(ok.success(), "{c}");
            };
            sh(
                "ip tuntap add dev xt0 mode tap && ip link add xl0 type veth peer name xl1 \
                && ip link add xm0 link xl0 type macvlan mode passthru",
            );
            let idx = |n: &str| nix::net::if_::if_nametoindex(n).unwrap();
            let tap = of(idx("xt0")).unwrap().expect("a 6.3+ kernel");
            let macvlan = of(idx("xm0")).unwrap().expect("a 6.3+ kernel");
            assert_ne!(tap & XDP_ACT_NDO_XMIT, 0, "tap: {tap:#x}");
            assert_eq!(macvlan & XDP_ACT_NDO_XMIT, 0, "macvlan: {macvlan:#x}");
        })
        .join()
        .unwrap();
    }
}
