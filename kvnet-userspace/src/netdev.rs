//! Network devices of the daemon's own network namespace. sysfs may show
//! another namespace (nsenter --net keeps the mount namespace), so names,
//! indexes and drivers come from ioctls, which follow the caller's netns.
use std::{ffi::CString, io, os::fd::AsRawFd};

use anyhow::{bail, Context, Result};

/// What the kernel accepts as an interface name (`dev_valid_name`), and
/// no control characters: 1-15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
pub fn check_ifname(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        bail!(
            "{name:?} is not a valid interface name (1-15 bytes, no '/', ':', spaces or control characters)"
        );
    }
    Ok(())
}

pub fn ifindex(name: &str) -> Result<u32> {
    check_ifname(name)?;
    let c = CString::new(name).context("interface name")?;
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("interface '{name}' does not exist in this network namespace");
    }
    Ok(idx)
}

/// The current name of `ifindex`, or None when the device is gone.
pub fn name_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;

#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

const SIOCGIFHWADDR: libc::c_ulong = 0x8927;

/// A "get" ioctl on `name`'s struct ifreq (40 bytes, name first): the
/// filled-in struct. `what` names the value for the error.
fn ifreq_get(name: &str, request: libc::c_ulong, what: &str) -> Result<[u8; 40]> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .with_context(|| format!("socket for the {what} ioctl"))?;
    let mut req = [0u8; 40];
    let n = name.len().min(15);
    req[..n].copy_from_slice(&name.as_bytes()[..n]);
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("{what} of interface '{name}'"));
    }
    Ok(req)
}

/// An interface's MAC address.
pub fn mac(name: &str) -> Result<crate::mac::Mac> {
    // struct ifreq: name[16], then struct sockaddr (family u16, data[14]).
    let req = ifreq_get(name, SIOCGIFHWADDR, "MAC address")?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&req[18..24]);
    Ok(crate::mac::Mac(mac))
}

const SIOCGIFMTU: libc::c_ulong = 0x8921;

/// An interface's MTU (an ioctl: sysfs shows the namespace that mounted it).
pub fn mtu(name: &str) -> Result<u16> {
    // struct ifreq: name[16], then int ifr_mtu.
    let req = ifreq_get(name, SIOCGIFMTU, "MTU")?;
    let mtu = i32::from_ne_bytes([req[16], req[17], req[18], req[19]]);
    Ok(mtu.clamp(0, u16::MAX as i32) as u16)
}

const SIOCGIFADDR: libc::c_ulong = 0x8915;

/// An interface's primary IPv4 address, None if it has none.
pub fn ipv4(name: &str) -> Result<Option<std::net::Ipv4Addr>> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("socket for SIOCGIFADDR")?;
    let mut req = [0u8; 40];
    let n = name.len().min(15);
    req[..n].copy_from_slice(&name.as_bytes()[..n]);
    req[16] = libc::AF_INET as u8;
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFADDR as _, req.as_mut_ptr()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            return Ok(None);
        }
        return Err(e).with_context(|| format!("IPv4 address of interface '{name}'"));
    }
    // struct sockaddr_in: family(2) port(2) addr(4)
    Ok(Some(std::net::Ipv4Addr::new(
        req[20], req[21], req[22], req[23],
    )))
}

/// The kernel driver behind an interface ("veth", "tun", "virtio_net"...).
pub fn driver(name: &str) -> Result<String> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .context("socket for the ethtool ioctl")?;
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info as *mut _ as *mut libc::c_void,
        _pad: [0; 16],
    };
    let n = name.len().min(15);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("driver of interface '{name}'"));
    }
    let end = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_what_the_kernel_keeps_whole() {
        for ok in [
            "eth0",
            "vnet12",
            "kvnet-default",
            "a-b_c.d@e",
            "123456789012345",
        ] {
            assert!(check_ifname(ok).is_ok(), "{ok}");
        }
        // A NUL would create a link named by its first part, which a
        // delete by the whole name never finds again.
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\0b",
            "a\u{1b}b",
            "1234567890123456",
        ] {
            let e = check_ifname(bad).unwrap_err().to_string();
            assert!(e.contains("not a valid interface name"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn loopback_exists_and_bad_names_are_refused() {
        assert_eq!(ifindex("lo").unwrap(), 1);
        assert_eq!(name_of(1).as_deref(), Some("lo"));
        assert_eq!(
            names_of([1, 0, 999_999].into_iter()),
            vec![Some("lo".to_string()), None, None]
        );
        let e = ifindex("no-such-if0").unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(ifindex("a b").is_err());
        assert!(ifindex("waytoolonginterfacename").is_err());
    }
}

/// A UDP socket on `port` bound to `iface` only (SO_BINDTODEVICE), with
/// SO_BROADCAST.
pub fn bound_udp_socket(
    iface: &str,
    addr: impl Into<std::net::SocketAddr>,
) -> Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr: std::net::SocketAddr = addr.into();
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .context("create UDP socket")?;
    s.set_reuse_address(true).context("SO_REUSEADDR")?;
    if addr.is_ipv4() {
        s.set_broadcast(true).context("SO_BROADCAST")?;
    } else {
        s.set_only_v6(true).context("IPV6_V6ONLY")?;
    }
    s.bind_device(Some(iface.as_bytes()))
        .with_context(|| format!("bind to interface {iface} (SO_BINDTODEVICE)"))?;
    s.set_nonblocking(true).context("O_NONBLOCK")?;
    s.bind(&addr.into())
        .with_context(|| format!("bind UDP {addr} on {iface}"))?;
    tokio::net::UdpSocket::from_std(s.into()).context("register UDP socket with tokio")
}

/// The interfaces of the daemon's network namespace (via netlink, so the
/// namespace of the process, not of the mounted /sys).
pub fn interfaces() -> Vec<String> {
    nix::net::if_::if_nameindex()
        .map(|l| {
            l.iter()
                .map(|i| i.name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The current names of `ifindexes` (None: the device is gone), through
/// one socket: `if_indextoname` opens a socket per call, and glibc's
/// `if_nameindex` dumps every link's statistics; with thousands of ports
/// either made each housekeeping tick cost tens of milliseconds.
pub fn names_of(ifindexes: impl Iterator<Item = u32>) -> Vec<Option<String>> {
    let Ok(sock) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None) else {
        return ifindexes.map(name_of).collect();
    };
    ifindexes
        .map(|index| {
            // SAFETY: ifreq is plain data; SIOCGIFNAME reads ifr_ifindex and
            // writes a NUL-terminated name into ifr_name.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            req.ifr_ifru.ifru_ifindex = i32::try_from(index).ok()?;
            let rc = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    libc::SIOCGIFNAME,
                    &mut req,
                )
            };
            if rc != 0 {
                return None;
            }
            let name = unsafe { std::ffi::CStr::from_ptr(req.ifr_name.as_ptr()) };
            Some(name.to_string_lossy().into_owned())
        })
        .collect()
}
