//! Classic pcap files (what `tcpdump -w` writes) and Ethernet frame helpers.
use std::time::Duration;

use anyhow::{bail, Result};

const LINKTYPE_ETHERNET: u32 = 1;
const MAGIC_US: u32 = 0xa1b2_c3d4;
const MAGIC_NS: u32 = 0xa1b2_3c4d;

/// One captured Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Time since the epoch, as recorded by the capture.
    pub ts: Duration,
    /// The frame as captured, starting at the destination MAC.
    pub data: Vec<u8>,
}

fn mac_at(d: &[u8], off: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    if let Some(s) = d.get(off..off + 6) {
        m.copy_from_slice(s);
    }
    m
}

fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    d.get(off..off + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn is_vlan_tpid(t: u16) -> bool {
    t == 0x8100 || t == 0x88a8
}

impl Frame {
    pub fn new(data: Vec<u8>) -> Frame {
        Frame {
            ts: Duration::ZERO,
            data,
        }
    }
    /// Destination MAC (zeros if the frame is too short).
    pub fn dst_mac(&self) -> [u8; 6] {
        mac_at(&self.data, 0)
    }
    /// Source MAC (zeros if the frame is too short).
    pub fn src_mac(&self) -> [u8; 6] {
        mac_at(&self.data, 6)
    }
    /// The EtherType, looking past one 802.1Q/802.1ad tag (0 if too short).
    pub fn ethertype(&self) -> u16 {
        match u16_at(&self.data, 12) {
            Some(t) if is_vlan_tpid(t) => u16_at(&self.data, 16).unwrap_or(0),
            Some(t) => t,
            None => 0,
        }
    }
    /// The VLAN id of the outer 802.1Q/802.1ad tag, if tagged.
    pub fn vlan_id(&self) -> Option<u16> {
        match u16_at(&self.data, 12) {
            Some(t) if is_vlan_tpid(t) => u16_at(&self.data, 14).map(|tci| tci & 0x0fff),
            _ => None,
        }
    }
    pub fn is_broadcast(&self) -> bool {
        self.dst_mac() == [0xff; 6]
    }
    pub fn is_multicast(&self) -> bool {
        self.dst_mac()[0] & 1 == 1
    }
    /// The L3 payload (after the MACs, one optional tag and the EtherType).
    pub fn payload(&self) -> &[u8] {
        let off = if self.vlan_id().is_some() { 18 } else { 14 };
        self.data.get(off..).unwrap_or(&[])
    }
    /// For IPv4 frames: the IP protocol number (1 = ICMP, 6 = TCP, 17 = UDP).
    pub fn ipv4_proto(&self) -> Option<u8> {
        if self.ethertype() != 0x0800 {
            return None;
        }
        self.payload().get(9).copied()
    }
    /// For IPv4 frames: (source, destination) addresses.
    pub fn ipv4_addrs(&self) -> Option<([u8; 4], [u8; 4])> {
        if self.ethertype() != 0x0800 {
            return None;
        }
        let p = self.payload();
        let src = p.get(12..16)?.try_into().ok()?;
        let dst = p.get(16..20)?.try_into().ok()?;
        Some((src, dst))
    }
    /// For ICMPv4 frames: the ICMP type (8 = echo request, 0 = echo reply).
    pub fn icmp_type(&self) -> Option<u8> {
        if self.ipv4_proto()? != 1 {
            return None;
        }
        let p = self.payload();
        let ihl = usize::from(p.first()? & 0x0f) * 4;
        p.get(ihl).copied()
    }
}

/// How many frames satisfy `pred`.
pub fn count_frames(frames: &[Frame], pred: impl Fn(&Frame) -> bool) -> usize {
    frames.iter().filter(|f| pred(f)).count()
}

/// Parse a classic pcap file with Ethernet link type. A record cut short at
/// the end (writer killed mid-write) is ignored.
pub fn parse_pcap(buf: &[u8]) -> Result<Vec<Frame>> {
    if buf.len() < 24 {
        bail!("pcap file too short for a header ({} bytes)", buf.len());
    }
    let magic_le = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let magic_be = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let (le, nanos) = match (magic_le, magic_be) {
        (MAGIC_US, _) => (true, false),
        (MAGIC_NS, _) => (true, true),
        (_, MAGIC_US) => (false, false),
        (_, MAGIC_NS) => (false, true),
        _ => bail!("not a classic pcap file (magic {magic_le:#010x}; pcapng is not supported)"),
    };
    let rd = |off: usize| -> u32 {
        let b = [buf[off], buf[off + 1], buf[off + 2], buf[off + 3]];
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let linktype = rd(20) & 0x0fff_ffff;
    if linktype != LINKTYPE_ETHERNET {
        bail!("pcap link type {linktype} is not Ethernet (1)");
    }
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= buf.len() {
        let sec = rd(off);
        let frac = rd(off + 4);
        let incl = rd(off + 8) as usize;
        let start = off + 16;
        let Some(data) = buf.get(start..start + incl) else {
            break;
        };
        let ts = Duration::from_secs(sec.into())
            + if nanos {
                Duration::from_nanos(frac.into())
            } else {
                Duration::from_micros(frac.into())
            };
        frames.push(Frame {
            ts,
            data: data.to_vec(),
        });
        off = start + incl;
    }
    Ok(frames)
}

/// Write frames as a classic little-endian microsecond pcap (for tests and
/// for saving injected traffic).
pub fn write_pcap(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC_US.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&262_144u32.to_le_bytes());
    out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    for f in frames {
        let len = f.data.len() as u32;
        out.extend_from_slice(&(f.ts.as_secs() as u32).to_le_bytes());
        out.extend_from_slice(&f.ts.subsec_micros().to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&f.data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged() -> Vec<u8> {
        let mut d = vec![0xff; 6];
        d.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        d.extend_from_slice(&[0x81, 0x00, 0x20, 0x64]); // prio 1, vid 100
        d.extend_from_slice(&[0x08, 0x06]);
        d.extend_from_slice(&[0u8; 28]);
        d
    }

    fn icmp() -> Vec<u8> {
        let mut d = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0];
        ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        ip.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
        d.extend_from_slice(&ip);
        d
    }

    #[test]
    fn hand_built_file() {
        // Built byte by byte (not with write_pcap) so the parser is checked
        // against the format, not against its own writer.
        let mut f = Vec::new();
        f.extend_from_slice(&[0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0]);
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&[0xff, 0xff, 0, 0, 1, 0, 0, 0]);
        let t = tagged();
        f.extend_from_slice(&[10, 0, 0, 0, 0x20, 0xa1, 0x07, 0]); // 10 s, 500000 us
        f.extend_from_slice(&(t.len() as u32).to_le_bytes());
        f.extend_from_slice(&(t.len() as u32).to_le_bytes());
        f.extend_from_slice(&t);
        let i = icmp();
        f.extend_from_slice(&[11, 0, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&(i.len() as u32).to_le_bytes());
        f.extend_from_slice(&(i.len() as u32).to_le_bytes());
        f.extend_from_slice(&i);
        // A record header cut short must be ignored.
        f.extend_from_slice(&[12, 0, 0, 0, 0, 0]);

        let frames = parse_pcap(&f).unwrap();
        assert_eq!(frames.len(), 2);
        let a = &frames[0];
        assert_eq!(a.ts, Duration::from_millis(10_500));
        assert!(a.is_broadcast());
        assert_eq!(a.src_mac(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(a.vlan_id(), Some(100));
        assert_eq!(a.ethertype(), 0x0806);
        let b = &frames[1];
        assert!(!b.is_broadcast());
        assert_eq!(b.vlan_id(), None);
        assert_eq!(b.ethertype(), 0x0800);
        assert_eq!(b.ipv4_proto(), Some(1));
        assert_eq!(b.icmp_type(), Some(8));
        assert_eq!(b.ipv4_addrs(), Some(([10, 0, 0, 1], [10, 0, 0, 2])));
        assert_eq!(count_frames(&frames, |f| f.ethertype() == 0x0806), 1);
    }

    #[test]
    fn big_endian_nanos_and_errors() {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xa1, 0xb2, 0x3c, 0x4d, 0, 2, 0, 4]);
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&[0, 0, 0xff, 0xff, 0, 0, 0, 1]);
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 14, 0, 0, 0, 14]);
        f.extend_from_slice(&[1; 14]);
        let frames = parse_pcap(&f).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].ts, Duration::new(1, 7));

        assert!(parse_pcap(&[0; 10]).is_err());
        let mut sll = f.clone();
        sll[23] = 113; // LINKTYPE_LINUX_SLL
        assert!(parse_pcap(&sll).is_err());
        let mut bad = f;
        bad[0] = 0;
        assert!(parse_pcap(&bad).is_err());
    }

    #[test]
    fn writer_roundtrip_and_short_frames() {
        let frames = vec![Frame::new(icmp()), Frame::new(vec![1, 2, 3])];
        let back = parse_pcap(&write_pcap(&frames)).unwrap();
        assert_eq!(back, frames);
        // Short frames never panic.
        assert_eq!(back[1].ethertype(), 0);
        assert_eq!(back[1].src_mac(), [0; 6]);
        assert_eq!(back[1].payload(), &[] as &[u8]);
    }
}
