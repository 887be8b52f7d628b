//! What a group needs of its members' devices: carrier, MAC, counters.
//! ioctls and getifaddrs follow the daemon's network namespace (sysfs may
//! show another one).
use std::{io, os::fd::AsRawFd};

use anyhow::{Context, Result};

use crate::mac::Mac;

/// One ifreq with a sockaddr (or flags) behind the name.
fn ifreq(name: &str) -> [u8; 40] {
    let mut req = [0u8; 40];
    let n = name.len().min(15);
    req[..n].copy_from_slice(&name.as_bytes()[..n]);
    req
}

fn ioctl(name: &str, what: &str, op: libc::c_ulong, req: &mut [u8; 40]) -> Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("socket for an interface ioctl")?;
    if unsafe { libc::ioctl(sock.as_raw_fd(), op as _, req.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("{what} of '{name}'"));
    }
    Ok(())
}

/// `ip link set NAME address MAC`.
pub fn set_mac(name: &str, mac: Mac) -> Result<()> {
    let mut req = ifreq(name);
    req[16..18].copy_from_slice(&(libc::ARPHRD_ETHER).to_ne_bytes());
    req[18..24].copy_from_slice(&mac.0);
    ioctl(
        name,
        "setting the MAC address",
        libc::SIOCSIFHWADDR,
        &mut req,
    )
}

/// Binds an AF_PACKET socket to `ifindex` for frames of `proto`.
pub fn bind_packet(sock: &std::os::fd::OwnedFd, ifindex: u32, proto: u16) -> io::Result<()> {
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
    sll.sll_ifindex = ifindex as i32;
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A device's counters (the kernel's, not kvnet's).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// An interface's carrier and counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkState {
    /// Up with carrier (IFF_UP and IFF_LOWER_UP): what a member needs to
    /// carry traffic. The carrier bit, not the operational state, which
    /// the kernel's linkwatch updates later.
    pub carrier: bool,
    /// Operational (IFF_RUNNING): the kernel's linkwatch has seen the
    /// carrier come up, as the LAN's bridges and switches do (later).
    pub running: bool,
    pub counters: Counters,
}

/// Every interface of the daemon's namespace, by name, in one netlink
/// dump (getifaddrs; its AF_PACKET entries carry the link's flags and
/// `struct rtnl_link_stats`: 32-bit counters, wrapping at 4 GiB).
pub fn states() -> std::collections::BTreeMap<String, LinkState> {
    let mut out = std::collections::BTreeMap::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        let a = unsafe { &*p };
        p = a.ifa_next;
        if a.ifa_addr.is_null() || a.ifa_data.is_null() {
            continue;
        }
        if i32::from(unsafe { (*a.ifa_addr).sa_family }) != libc::AF_PACKET {
            continue;
        }
        // rx_packets, tx_packets, rx_bytes, tx_bytes lead the struct.
        let s = a.ifa_data as *const u32;
        let name = unsafe { std::ffi::CStr::from_ptr(a.ifa_name) };
        let counters = unsafe {
            Counters {
                rx_packets: u64::from(*s),
                tx_packets: u64::from(*s.add(1)),
                rx_bytes: u64::from(*s.add(2)),
                tx_bytes: u64::from(*s.add(3)),
            }
        };
        let up = libc::IFF_UP as u32 | libc::IFF_LOWER_UP as u32;
        let carrier = a.ifa_flags & up == up;
        let running = a.ifa_flags & libc::IFF_RUNNING as u32 != 0;
        out.insert(
            name.to_string_lossy().into_owned(),
            LinkState {
                carrier,
                running,
                counters,
            },
        );
    }
    unsafe { libc::freeifaddrs(head) };
    out
}
