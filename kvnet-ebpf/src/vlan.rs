//! VLAN tags: the one a frame arrived with, and retagging it for its
//! egress port in each hook.
use aya_ebpf::{
    helpers::{bpf_skb_vlan_pop, bpf_skb_vlan_push, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use kvnet_common::ETH_P_8021Q;

use crate::{guard, parse};

/// Makes the frame carry `want` (a TCI) or no tag, in place: rewrite the
/// TCI, or move the MACs by 4 bytes and the head with them. False when the
/// frame could not be changed (it is then untouched).
#[inline(always)]
pub fn xdp_retag(ctx: &XdpContext, tag: &Tag, want: Option<u16>) -> bool {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    match (tag.present(), want) {
        (false, None) => true,
        (true, Some(tci)) => {
            if tag.tci != tci {
                let Some(p) = parse::ptr_at::<[u8; 2]>(data, data_end, 14) else {
                    return false;
                };
                unsafe { *(p as *mut [u8; 2]) = tci.to_be_bytes() };
            }
            true
        }
        (true, None) => {
            let Some(p) = parse::ptr_at::<[u8; 16]>(data, data_end, 0) else {
                return false;
            };
            let macs = unsafe { *(p as *const [u8; 12]) };
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, 4) } != 0 {
                return false;
            }
            let (data, data_end) = (ctx.data(), ctx.data_end());
            let Some(p) = parse::ptr_at::<[u8; 12]>(data, data_end, 0) else {
                return false;
            };
            unsafe { *(p as *mut [u8; 12]) = macs };
            true
        }
        (false, Some(tci)) => {
            let Some(p) = parse::ptr_at::<[u8; 12]>(data, data_end, 0) else {
                return false;
            };
            let macs = unsafe { *p };
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, -4) } != 0 {
                return false;
            }
            let (data, data_end) = (ctx.data(), ctx.data_end());
            let Some(p) = parse::ptr_at::<[u8; 16]>(data, data_end, 0) else {
                return false;
            };
            let mut h = [0u8; 16];
            h[..12].copy_from_slice(&macs);
            h[12..14].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
            h[14..16].copy_from_slice(&tci.to_be_bytes());
            unsafe { *(p as *mut [u8; 16]) = h };
            true
        }
    }
}

/// Makes the skb carry the tag `want` (a TCI) or none; `cur` is the tag
/// it carries now, in skb metadata or in the packet.
#[inline(always)]
pub fn tc_retag(ctx: &TcContext, cur: &mut Option<u16>, want: Option<u16>) -> bool {
    if *cur == want {
        return true;
    }
    let skb = ctx.skb.skb as *mut _;
    if cur.is_some() {
        // Pops the tag from skb metadata or, failing that, from the packet.
        if unsafe { bpf_skb_vlan_pop(skb) } != 0 {
            return false;
        }
        *cur = None;
    }
    if let Some(tci) = want {
        if unsafe { bpf_skb_vlan_push(skb, ETH_P_8021Q.to_be(), tci) } != 0 {
            return false;
        }
        *cur = Some(tci);
    }
    true
}

/// The outer VLAN tag a frame arrived with, wherever it sits: in the packet
/// after the MACs, or (tc) already moved into skb->vlan_tci by the kernel.
#[derive(Clone, Copy)]
pub struct Tag {
    /// 0 when untagged.
    pub tpid: u16,
    pub tci: u16,
    /// The tag is in the packet bytes (else in skb metadata, or absent).
    pub in_packet: bool,
}

impl Tag {
    pub const NONE: Tag = Tag {
        tpid: 0,
        tci: 0,
        in_packet: false,
    };

    #[inline(always)]
    pub fn present(&self) -> bool {
        self.tpid != 0
    }

    /// The tag from the packet bytes, or `hw` (tpid, tci) when the kernel
    /// already took it out of the packet.
    #[inline(always)]
    pub fn of(data: usize, data_end: usize, hw: Option<(u16, u16)>) -> Tag {
        if let Some((tpid, tci)) = hw {
            return Tag {
                tpid,
                tci,
                in_packet: false,
            };
        }
        let Some(h) = parse::ptr_at::<[u8; 4]>(data, data_end, 12) else {
            return Tag::NONE;
        };
        let h = unsafe { &*h };
        let tpid = u16::from_be_bytes([h[0], h[1]]);
        if !guard::is_tag(tpid) {
            return Tag::NONE;
        }
        Tag {
            tpid,
            tci: u16::from_be_bytes([h[2], h[3]]),
            in_packet: true,
        }
    }
}
