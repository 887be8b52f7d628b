//! The control socket: one JSON request per line, one JSON response per
//! line. The CLI is a thin client; `--json` prints the response data as is.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::vlan::{VlanArgs, VlanCfg};

pub const DEFAULT_SOCKET: &str = "/run/kvnet/kvnet.sock";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/kvnet";

/// Which hook a port runs the datapath in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// XDP for what it can finish, tc for the rest (floods, offloaded frames).
    Xdp,
    /// tc (TCX ingress) only.
    Tc,
    /// Chosen by device type: tc for veth and tap, xdp for other NICs.
    Auto,
}

/// A network's model, as libvirt names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Guests reach each other only.
    #[default]
    Isolated,
    /// Plus the host, through a gateway interface; no forwarding beyond.
    HostOnly,
    /// Plus routing (no NAT) between the guests' subnet and the host's other
    /// networks, in the eBPF fast path.
    Routed,
    /// Guests are peers on the uplink's LAN; the host keeps its address.
    Bridged,
    /// Plus masquerade behind the uplink's address, with port forwards in
    /// (libvirt's default network).
    Nat,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Isolated => "isolated",
            Mode::HostOnly => "host-only",
            Mode::Routed => "routed",
            Mode::Bridged => "bridged",
            Mode::Nat => "nat",
        })
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct NetOpts {
    #[serde(default)]
    pub mode: Mode,
    /// Gateway address with prefix, e.g. 192.168.122.1/24.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Name of the gateway interface (default kvnet-NET).
    #[serde(default)]
    pub gateway_iface: Option<String>,
    #[serde(default)]
    pub uplink: Option<String>,
    /// NAT source port range, e.g. 1024-65535 (libvirt's default).
    #[serde(default)]
    pub nat_ports: Option<String>,
    /// NAT: how UDP is mapped (default eim).
    #[serde(default)]
    pub nat_udp: Option<NatUdp>,
    /// DHCP: FIRST,LAST addresses handed out; needs a gateway.
    #[serde(default)]
    pub dhcp_range: Option<String>,
    /// MAC,IP[,NAME] static hosts.
    #[serde(default)]
    pub dhcp_hosts: Vec<String>,
    /// The guests' DNS domain (DHCP option 15, names answered by the gateway).
    #[serde(default)]
    pub domain: Option<String>,
    /// Lease time in seconds (default 3600).
    #[serde(default)]
    pub dhcp_lease: Option<u64>,
    /// Defaults for the network's guest ports (isolation, rate limits).
    #[serde(default)]
    pub port_policy: crate::policy::PolicyArgs,
    /// Storm control: floods a second per port (default
    /// kvnet_common::DEFAULT_STORM_PPS, 0: off).
    #[serde(default)]
    pub storm_pps: Option<u32>,
    /// The gateway interface's MTU, also handed out by DHCP (option 26).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// No DNS server on the gateway, and none named by DHCP.
    #[serde(default)]
    pub no_dns: bool,
    /// Static DNS names: IP,NAME[,NAME...].
    #[serde(default)]
    pub dns_hosts: Vec<String>,
    /// IPv6 gateway addresses with prefix (router advertisements, DNS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway6: Vec<String>,
    /// Stateful DHCPv6: FIRST-LAST addresses handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp6_range: Option<String>,
    /// MAC,IPV6[,NAME] static DHCPv6 hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dhcp6_hosts: Vec<String>,
    /// NAT66: guests' IPv6 leaves masqueraded behind the uplink's global
    /// IPv6 address (`--nat6`, mode nat with `--gateway6`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nat6: bool,
    /// A VXLAN overlay: the network spans the hosts of its VNI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<crate::vxlan::VxlanOpts>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    NetAdd {
        name: String,
        ageing_secs: Option<u64>,
        #[serde(default)]
        opts: NetOpts,
    },
    NetShow {
        name: String,
    },
    /// One network as config TOML (`kvnet net dump`).
    NetDump {
        name: String,
    },
    ForwardAdd {
        net: String,
        proto: String,
        port: u16,
        to: String,
    },
    ForwardDel {
        net: String,
        proto: String,
        port: u16,
    },
    ForwardList {
        net: String,
    },
    ConntrackList {
        net: String,
    },
    ConntrackFlush {
        net: String,
    },
    NetDel {
        name: String,
    },
    NetList,
    NetSet {
        name: String,
        ageing_secs: Option<u64>,
        /// A NAT network's port range FIRST-LAST, changed live.
        #[serde(default)]
        nat_ports: Option<String>,
        /// A NAT network's UDP mapping, changed live.
        #[serde(default)]
        nat_udp: Option<NatUdp>,
    },
    PortAdd {
        net: String,
        iface: String,
        hairpin: bool,
        hook: Hook,
        #[serde(default)]
        vlan: VlanArgs,
        /// May act as a DHCP server (else its DHCP server messages are dropped).
        #[serde(default)]
        trusted: bool,
        /// Port security (on unless `no_port_security`).
        #[serde(default)]
        security: crate::security::SecurityArgs,
        /// Isolation and rate limits.
        #[serde(default)]
        policy: crate::policy::PolicyArgs,
    },
    /// A port's protection and bindings.
    PortShow {
        iface: String,
    },
    /// Change a port's VLAN membership live.
    PortSet {
        iface: String,
        vlan: VlanArgs,
    },
    VlanShow {
        net: String,
    },
    PortDel {
        iface: String,
    },
    PortList,
    FdbShow {
        net: String,
    },
    FdbAdd {
        net: String,
        mac: String,
        port: String,
        #[serde(default)]
        vlan: Option<String>,
    },
    FdbDel {
        net: String,
        mac: String,
        #[serde(default)]
        vlan: Option<String>,
    },
    Stats,
    /// A network's DHCP leases.
    DhcpLeases {
        net: String,
    },
    /// Change a network's DHCP settings live (`kvnet net set`, `kvnet dhcp
    /// host add|del`): what is given replaces, what is not stays.
    DhcpSet {
        net: String,
        #[serde(default)]
        range: Option<String>,
        #[serde(default)]
        domain: Option<String>,
        #[serde(default)]
        lease_secs: Option<u64>,
        /// MAC,IP[,NAME] to add (replacing one of the same MAC).
        #[serde(default)]
        host_add: Option<String>,
        /// A static host's MAC to remove.
        #[serde(default)]
        host_del: Option<String>,
    },
    /// Reconcile with a config file's text (`kvnet apply`).
    Apply {
        path: Option<String>,
        text: String,
        dry_run: bool,
    },
    /// Write the running state as a config file (`kvnet save`).
    Save {
        path: Option<String>,
        /// Write even outside the config directory.
        #[serde(default)]
        force: bool,
    },
    /// A hypervisor tap came up (`kvnet ifup`): attach by env or rule.
    Ifup {
        iface: String,
        net: Option<String>,
        vlan: Option<String>,
    },
    Ifdown {
        iface: String,
    },
    Status,
    /// Remove everything kvnet installed and exit (`kvnet down`).
    Down,
    /// An uplink group (`kvnet uplink add`).
    UplinkAdd {
        spec: crate::uplink_spec::UplinkSpec,
    },
    UplinkShow,
    UplinkDel {
        name: String,
    },
}

impl Request {
    /// Whether the request only reads: what a member of the read-only
    /// group (`kvnet daemon --ro-group`) may send. No `_` arm: a new
    /// request must be classified here before it compiles.
    pub fn read_only(&self) -> bool {
        match self {
            Request::NetShow { .. }
            | Request::NetDump { .. }
            | Request::NetList
            | Request::PortShow { .. }
            | Request::PortList
            | Request::VlanShow { .. }
            | Request::FdbShow { .. }
            | Request::ForwardList { .. }
            | Request::ConntrackList { .. }
            | Request::Stats
            | Request::DhcpLeases { .. }
            | Request::Status
            | Request::UplinkShow => true,
            // A dry run only computes the plan; nothing is applied or remembered.
            Request::Apply { dry_run, .. } => *dry_run,
            Request::NetAdd { .. }
            | Request::NetDel { .. }
            | Request::NetSet { .. }
            | Request::DhcpSet { .. }
            | Request::PortAdd { .. }
            | Request::PortSet { .. }
            | Request::PortDel { .. }
            | Request::FdbAdd { .. }
            | Request::FdbDel { .. }
            | Request::ForwardAdd { .. }
            | Request::ForwardDel { .. }
            | Request::ConntrackFlush { .. }
            // Writes a file as root.
            | Request::Save { .. }
            | Request::Ifup { .. }
            | Request::Ifdown { .. }
            | Request::UplinkAdd { .. }
            | Request::UplinkDel { .. }
            | Request::Down => false,
        }
    }

    /// The request's name on the wire (its `op`), for messages.
    pub fn op(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v["op"].as_str().map(str::to_string))
            .unwrap_or_else(|| "request".into())
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetInfo {
    pub name: String,
    pub id: u32,
    pub mode: Mode,
    /// host-only, routed and nat networks.
    pub gateway: Option<GatewayInfo>,
    pub uplink: Option<String>,
    pub ageing_secs: u64,
    pub ports: Vec<String>,
    /// NAT networks only.
    #[serde(default)]
    pub nat: Option<NatInfo>,
}

/// A network's gateway: the host's interface into it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayInfo {
    /// The host's interface (default kvnet-NET).
    pub iface: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// What guests see as their router's MAC (absent if it could not be read).
    pub mac: Option<String>,
    /// The switch end of the gateway interface.
    pub port: String,
    /// The switch end's VLAN membership.
    pub vlan: VlanCfg,
}

impl GatewayInfo {
    /// `vlan`: that of the gateway's switch port (the switch knows it).
    pub fn of(g: &crate::gateway::Gateway, vlan: VlanCfg) -> Self {
        GatewayInfo {
            iface: g.host_if.clone(),
            address: g.cidr.addr,
            prefix: g.cidr.prefix,
            mac: crate::netdev::mac(&g.host_if).ok().map(|m| m.to_string()),
            port: g.port_if.clone(),
            vlan,
        }
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix)
    }
}

/// FIRST-LAST of ports (NAT source ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// How a NAT network translates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NatInfo {
    /// The source ports guests' flows are given.
    pub ports: PortRange,
    pub udp: NatUdp,
    /// The uplink address guests are masqueraded behind.
    pub address: Ipv4Addr,
}

/// `kvnet net show`: the network, its services and its ports with their hooks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetDetail {
    #[serde(flatten)]
    pub net: NetInfo,
    /// Networks with a `--dhcp-range`.
    pub dhcp: Option<DhcpInfo>,
    /// Whether the gateway answers DNS.
    pub dns: bool,
    /// NAT networks' port forwards.
    pub forwards: Vec<ForwardRow>,
    /// The port defaults of the network's config.
    pub policy: NetPolicy,
    pub port_details: Vec<PortInfo>,
    /// Networks with `--gateway6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Info>,
    /// VXLAN networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<crate::vxlan::VxlanInfo>,
}

/// A DHCPv6 binding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease6Info {
    /// The client's DUID, hex.
    pub duid: String,
    pub iaid: u32,
    pub ip: std::net::Ipv6Addr,
    pub hostname: Option<String>,
    pub expires_unix: u64,
}

/// A network's IPv6: gateway addresses, DHCPv6 and its servers' counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ipv6Info {
    pub gateways: Vec<String>,
    pub dhcp6_range: Option<String>,
    pub dhcp6_hosts: Vec<String>,
    pub leases: Vec<Lease6Info>,
    /// Router advertisements, DHCPv6 and DNS counters.
    pub servers: serde_json::Value,
}

/// FIRST-LAST of IPv4 addresses (a DHCP pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DhcpInfo {
    pub range: AddrRange,
    pub lease_secs: u64,
    pub domain: Option<String>,
    pub hosts: Vec<DhcpHostInfo>,
    /// Leases the server holds now.
    pub leases: usize,
}

/// A static DHCP host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DhcpHostInfo {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub name: Option<String>,
}

/// What a network's config sets for its guest ports (`isolated_ports`,
/// `port_rate_in`, `port_rate_out`, `storm_pps`); rates in bits/s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPolicy {
    pub isolated_ports: bool,
    pub port_rate_in_bps: Option<u64>,
    pub port_rate_out_bps: Option<u64>,
    pub storm_pps: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortInfo {
    pub iface: String,
    pub ifindex: u32,
    pub net: String,
    pub driver: String,
    /// The hook asked for.
    pub hook: Hook,
    /// The programs attached: "tc" or "xdp+tc".
    pub attached: String,
    pub hairpin: bool,
    #[serde(default)]
    pub vlan: VlanCfg,
    /// guest, gateway (the gateway interface's switch end) or uplink.
    #[serde(default)]
    pub role: String,
    /// May act as a DHCP server.
    #[serde(default)]
    pub trusted: bool,
}

/// One VLAN of a network and its member ports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VlanInfo {
    /// 0: the untagged-only ports without VLAN config.
    pub vid: u16,
    pub ports: Vec<VlanPortRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VlanPortRow {
    pub port: String,
    /// The port's mode: "access", "trunk" or "none".
    pub mode: String,
    /// How the port carries this VLAN: "untagged" or "tagged".
    pub tagging: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdbRow {
    pub mac: String,
    pub vlan: u16,
    pub port: String,
    pub ifindex: u32,
    /// "static" or "learned".
    pub kind: String,
    /// Seconds since last seen (learned entries).
    pub age_secs: Option<f64>,
    /// A MAC on another host: its VTEP (`port` is the VTEP device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PortStatsRow {
    pub port: String,
    pub net: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub xdp_seen: u64,
    pub tc_seen: u64,
    pub flooded: u64,
    pub learned: u64,
    /// Source MACs not learned: the network's learned-MAC bound was reached.
    #[serde(default)]
    pub learn_refused: u64,
    /// ARP requests answered in the datapath (suppressed, not flooded).
    #[serde(default)]
    pub arp_answered: u64,
    pub routed: u64,
    pub to_host: u64,
    pub drops: BTreeMap<String, u64>,
}

/// Sends one request to the daemon and returns its data, or its error.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value> {
    let stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the kvnet daemon at {} (is `kvnet daemon` running?)",
            socket.display()
        )
    })?;
    // An apply attaches every port of the file: thousands of them take
    // minutes on a loaded host, and giving up would leave the CLI
    // guessing while the daemon goes on.
    let patience = match req {
        Request::Apply { .. } => Duration::from_secs(30 * 60),
        _ => Duration::from_secs(60),
    };
    stream.set_read_timeout(Some(patience)).ok();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    let sent = (&stream).write_all(line.as_bytes());
    let mut reader = BufReader::new(&stream);
    let mut answer = String::new();
    // A daemon refusing the connection (permission) or the request (too
    // long) answers and closes, maybe before it read everything: its
    // answer says why, better than our broken pipe.
    let read = reader.read_line(&mut answer);
    if answer.is_empty() {
        sent.context("sending the request to the daemon")?;
        read.context("reading the daemon's answer")?;
        return Err(anyhow!(
            "the daemon closed the connection without answering"
        ));
    }
    let resp: Response =
        serde_json::from_str(&answer).context("malformed answer from the daemon")?;
    if resp.ok {
        Ok(resp.data)
    } else {
        Err(anyhow!(resp
            .error
            .unwrap_or_else(|| "unknown error".into())))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardRow {
    pub net: String,
    pub proto: String,
    pub port: u16,
    /// The guest's address and port.
    pub to: Endpoint,
}

/// An address (IPv4, or IPv6 for NAT66) and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: std::net::IpAddr,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // "[2001:db8::5]:22" for IPv6, as SocketAddr writes it.
        write!(f, "{}", std::net::SocketAddr::new(self.addr, self.port))
    }
}

/// One direction of a flow, as `kvnet trace --json` names its fields. For
/// ICMP the ports hold the echo identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTuple {
    pub saddr: std::net::IpAddr,
    pub sport: u16,
    pub daddr: std::net::IpAddr,
    pub dport: u16,
}

impl FlowTuple {
    /// From the datapath's network-order address fields.
    pub fn from_be(saddr: u32, sport: u16, daddr: u32, dport: u16) -> Self {
        FlowTuple {
            saddr: Ipv4Addr::from(u32::from_be(saddr)).into(),
            sport,
            daddr: Ipv4Addr::from(u32::from_be(daddr)).into(),
            dport,
        }
    }

    /// "a:p -> b:q" ("[a]:p" for IPv6); ICMP without ports.
    pub fn display(&self, proto: &str) -> String {
        if proto.starts_with("icmp") {
            format!("{} -> {}", self.saddr, self.daddr)
        } else {
            let ep = |a, p| std::net::SocketAddr::new(a, p).to_string();
            format!(
                "{} -> {}",
                ep(self.saddr, self.sport),
                ep(self.daddr, self.dport)
            )
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConntrackRow {
    pub proto: String,
    /// As the guest (or, for a port forward, the client) sent it.
    pub orig: FlowTuple,
    /// As it left kvnet.
    pub translated: FlowTuple,
    pub state: String,
    pub dnat: bool,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NatStatsRow {
    pub net: String,
    pub translated: u64,
    pub new_flows: u64,
    pub icmp_errors: u64,
    /// Fragments after the first, translated by the first one's flow.
    #[serde(default)]
    pub fragments: u64,
    /// ICMP frag-needed kvnet answered outside senders with.
    #[serde(default)]
    pub frag_needed_sent: u64,
    /// TCP segments too far from their sender's sequence to be believed.
    #[serde(default)]
    pub out_of_window: u64,
    /// Flows opened from outside through an endpoint-independent mapping.
    #[serde(default)]
    pub eif_flows: u64,
    /// Endpoint-independent UDP mappings in use.
    #[serde(default)]
    pub udp_mappings: u64,
    pub drops: BTreeMap<String, u64>,
    /// Conntrack entries in use (two per flow) and the table's capacity.
    pub table_entries: u64,
    pub table_capacity: u64,
    pub ports_in_use: u64,
}

/// `kvnet stats --json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatsReport {
    pub ports: Vec<PortStatsRow>,
    pub nat: Vec<NatStatsRow>,
    /// DHCP and DNS counters of networks with a `--dhcp-range`.
    #[serde(default)]
    pub services: Vec<NetServiceStats>,
}

/// How long a learned MAC stays without traffic unless a network says otherwise.
pub const DEFAULT_AGEING: std::time::Duration = std::time::Duration::from_secs(300);

/// Network names end up in logs, JSON and file names: keep them plain.
pub fn validate_net_name(name: &str) -> anyhow::Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let starts_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 32 || !ok_chars || !starts_ok {
        anyhow::bail!(
            "invalid network name '{name}': use 1-32 letters, digits, '-', '_' or '.', starting with a letter or digit"
        );
    }
    Ok(())
}

/// libvirt's default NAT port range.
pub const DEFAULT_NAT_PORTS: (u16, u16) = (1024, 65535);

/// How a NAT network maps UDP (RFC 4787).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NatUdp {
    /// Endpoint-independent mapping and filtering: one guest socket keeps
    /// one uplink port whatever the remote, and any remote may answer it
    /// (STUN and peer-to-peer applications work).
    #[default]
    Eim,
    /// A mapping per remote, answered by that remote only (Linux's
    /// masquerade without port preservation).
    Symmetric,
}

impl std::fmt::Display for NatUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatUdp::Eim => "eim",
            NatUdp::Symmetric => "symmetric",
        })
    }
}

/// An IP protocol number as the CLI shows it.
pub fn proto_name(p: u8) -> String {
    use kvnet_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        kvnet_common::IPPROTO_ICMPV6 => "icmpv6".into(),
        0 => "-".into(),
        o => o.to_string(),
    }
}

/// The DHCP and DNS counters of a network (`kvnet stats`). Kept as JSON
/// values: the CLI prints what the daemon sends, whatever its version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetServiceStats {
    pub net: String,
    pub dhcp: serde_json::Value,
    pub dns: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request of each kind, with whether a read-only client may send it.
    fn every_request() -> Vec<(Request, bool)> {
        let s = |v: &str| v.to_string();
        vec![
            (
                Request::NetAdd {
                    name: s("n"),
                    ageing_secs: None,
                    opts: NetOpts::default(),
                },
                false,
            ),
            (Request::NetShow { name: s("n") }, true),
            (Request::NetDump { name: s("n") }, true),
            (
                Request::ForwardAdd {
                    net: s("n"),
                    proto: s("tcp"),
                    port: 1,
                    to: s("10.0.0.2:1"),
                },
                false,
            ),
            (
                Request::ForwardDel {
                    net: s("n"),
                    proto: s("tcp"),
                    port: 1,
                },
                false,
            ),
            (Request::ForwardList { net: s("n") }, true),
            (Request::ConntrackList { net: s("n") }, true),
            (Request::ConntrackFlush { net: s("n") }, false),
            (Request::NetDel { name: s("n") }, false),
            (Request::NetList, true),
            (
                Request::NetSet {
                    name: s("n"),
                    ageing_secs: Some(1),
                    nat_ports: None,
                    nat_udp: None,
                },
                false,
            ),
            (
                Request::PortAdd {
                    net: s("n"),
                    iface: s("p"),
                    hairpin: false,
                    hook: Hook::Auto,
                    vlan: VlanArgs::default(),
                    trusted: false,
                    security: Default::default(),
                    policy: Default::default(),
                },
                false,
            ),
            (Request::PortShow { iface: s("p") }, true),
            (
                Request::PortSet {
                    iface: s("p"),
                    vlan: VlanArgs::default(),
                },
                false,
            ),
            (Request::VlanShow { net: s("n") }, true),
            (Request::PortDel { iface: s("p") }, false),
            (Request::PortList, true),
            (Request::FdbShow { net: s("n") }, true),
            (
                Request::FdbAdd {
                    net: s("n"),
                    mac: s("02:00:00:00:00:01"),
                    port: s("p"),
                    vlan: None,
                },
                false,
            ),
            (
                Request::FdbDel {
                    net: s("n"),
                    mac: s("02:00:00:00:00:01"),
                    vlan: None,
                },
                false,
            ),
            (Request::Stats, true),
            (Request::DhcpLeases { net: s("n") }, true),
            (
                Request::DhcpSet {
                    net: s("n"),
                    range: None,
                    domain: Some(s("lab.test")),
                    lease_secs: None,
                    host_add: None,
                    host_del: None,
                },
                false,
            ),
            (
                Request::Apply {
                    path: None,
                    text: String::new(),
                    dry_run: false,
                },
                false,
            ),
            (
                Request::Apply {
                    path: None,
                    text: String::new(),
                    dry_run: true,
                },
                true,
            ),
            (
                Request::Save {
                    path: None,
                    force: false,
                },
                false,
            ),
            (
                Request::Ifup {
                    iface: s("p"),
                    net: None,
                    vlan: None,
                },
                false,
            ),
            (Request::Ifdown { iface: s("p") }, false),
            (Request::Status, true),
            (Request::Down, false),
            (
                Request::UplinkAdd {
                    spec: crate::uplink_spec::UplinkSpec {
                        name: s("bond0"),
                        members: vec![s("eth0")],
                        mode: crate::uplink_spec::UplinkMode::ActiveBackup,
                        hash: None,
                        primary: None,
                        miimon: None,
                        arp_target: Vec::new(),
                        arp_interval: None,
                    },
                },
                false,
            ),
            (Request::UplinkShow, true),
            (Request::UplinkDel { name: s("bond0") }, false),
        ]
    }

    /// Which kind a request is. No `_` arm: a new request fails to compile
    /// here until it is numbered, and the test below until `every_request`
    /// lists it with its classification.
    fn kind(r: &Request) -> usize {
        match r {
            Request::NetAdd { .. } => 0,
            Request::NetShow { .. } => 1,
            Request::ForwardAdd { .. } => 2,
            Request::ForwardDel { .. } => 3,
            Request::ForwardList { .. } => 4,
            Request::ConntrackList { .. } => 5,
            Request::ConntrackFlush { .. } => 6,
            Request::NetDel { .. } => 7,
            Request::NetList => 8,
            Request::NetSet { .. } => 9,
            Request::PortAdd { .. } => 10,
            Request::PortShow { .. } => 11,
            Request::PortSet { .. } => 12,
            Request::VlanShow { .. } => 13,
            Request::PortDel { .. } => 14,
            Request::PortList => 15,
            Request::FdbShow { .. } => 16,
            Request::FdbAdd { .. } => 17,
            Request::FdbDel { .. } => 18,
            Request::Stats => 19,
            Request::DhcpLeases { .. } => 20,
            Request::Apply { .. } => 21,
            Request::Save { .. } => 22,
            Request::Ifup { .. } => 23,
            Request::Ifdown { .. } => 24,
            Request::Status => 25,
            Request::Down => 26,
            Request::DhcpSet { .. } => 27,
            Request::NetDump { .. } => 28,
            Request::UplinkAdd { .. } => 29,
            Request::UplinkShow => 30,
            Request::UplinkDel { .. } => 31,
        }
    }
    const KINDS: usize = 32;

    #[test]
    fn every_request_is_classified_read_only_or_not() {
        let all = every_request();
        let kinds: std::collections::BTreeSet<usize> = all.iter().map(|(r, _)| kind(r)).collect();
        assert_eq!(kinds, (0..KINDS).collect(), "every kind of request listed");
        for (r, read_only) in &all {
            assert_eq!(r.read_only(), *read_only, "{}: {r:?}", r.op());
        }
        // Both answers occur (the check above could not pass with a constant).
        assert!(all.iter().any(|(r, _)| r.read_only()));
        assert!(all.iter().any(|(r, _)| !r.read_only()));
    }

    #[test]
    fn requests_as_on_the_wire() {
        let r: Request = serde_json::from_str(r#"{"op":"net_list"}"#).unwrap();
        assert!(r.read_only());
        assert_eq!(r.op(), "net_list");
        // An older client's save has no `force`: not forced.
        let r: Request =
            serde_json::from_str(r#"{"op":"save","path":"/etc/kvnet/x.toml"}"#).unwrap();
        assert!(matches!(r, Request::Save { force: false, .. }));
        assert!(!r.read_only());
        let r: Request =
            serde_json::from_str(r#"{"op":"apply","path":null,"text":"","dry_run":true}"#).unwrap();
        assert!(r.read_only());
        assert_eq!(r.op(), "apply");
    }

    /// JSON fit for scripts: every array holds values of one kind and no
    /// array holds arrays (a tuple would); no string packs several values
    /// ("trunk 10,20 native 1", "a:1 -> b:2").
    fn assert_structured(v: &serde_json::Value, at: &str) {
        use serde_json::Value;
        let kind = |v: &Value| std::mem::discriminant(v);
        match v {
            Value::Array(items) => {
                for (i, x) in items.iter().enumerate() {
                    assert!(!x.is_array(), "{at}[{i}]: an array in an array: {v}");
                    assert_eq!(kind(x), kind(&items[0]), "{at}[{i}]: mixed kinds: {v}");
                    assert_structured(x, &format!("{at}[{i}]"));
                }
            }
            Value::Object(m) => {
                for (k, x) in m {
                    assert_structured(x, &format!("{at}.{k}"));
                }
            }
            Value::String(t) => {
                assert!(
                    !t.contains(" -> ") && !t.starts_with("trunk ") && !t.starts_with("access "),
                    "{at}: several values in one string: {t:?}"
                );
            }
            _ => {}
        }
    }

    fn port(iface: &str, vlan: VlanCfg) -> PortInfo {
        PortInfo {
            iface: iface.into(),
            ifindex: 7,
            net: "lab".into(),
            driver: "veth".into(),
            hook: Hook::Tc,
            attached: "tc".into(),
            hairpin: false,
            vlan,
            role: "guest".into(),
            trusted: false,
        }
    }

    fn trunk() -> VlanCfg {
        VlanCfg::Trunk {
            vids: [10, 20].into(),
            native: Some(1),
        }
    }

    fn net_detail() -> NetDetail {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        NetDetail {
            net: NetInfo {
                name: "lab".into(),
                id: 1,
                mode: Mode::Nat,
                gateway: Some(GatewayInfo {
                    iface: "kvnet-lab".into(),
                    address: ip("192.168.122.1"),
                    prefix: 24,
                    mac: Some("02:00:00:00:00:01".into()),
                    port: "kvnet-lab-p".into(),
                    vlan: VlanCfg::Access { vid: 10 },
                }),
                uplink: Some("eth0".into()),
                ageing_secs: 300,
                ports: vec!["p1".into(), "kvnet-lab-p".into()],
                nat: Some(NatInfo {
                    ports: PortRange {
                        first: 1024,
                        last: 65535,
                    },
                    udp: NatUdp::Eim,
                    address: ip("198.51.100.1"),
                }),
            },
            dhcp: Some(DhcpInfo {
                range: AddrRange {
                    first: ip("192.168.122.2"),
                    last: ip("192.168.122.254"),
                },
                lease_secs: 3600,
                domain: Some("lab.test".into()),
                hosts: vec![DhcpHostInfo {
                    mac: "52:54:00:00:00:05".into(),
                    ip: ip("192.168.122.5"),
                    name: Some("web".into()),
                }],
                leases: 2,
            }),
            dns: true,
            forwards: vec![ForwardRow {
                net: "lab".into(),
                proto: "tcp".into(),
                port: 8080,
                to: Endpoint {
                    addr: ip("192.168.122.5").into(),
                    port: 80,
                },
            }],
            policy: NetPolicy {
                isolated_ports: true,
                port_rate_in_bps: Some(10_000_000),
                port_rate_out_bps: None,
                storm_pps: Some(1000),
            },
            port_details: vec![port("p1", trunk())],
            ipv6: None,
            vxlan: None,
        }
    }

    /// Serializes `v`, checks its shape, and reads it back as the CLI does.
    fn round_trip<T: Serialize + serde::de::DeserializeOwned>(
        v: &T,
        what: &str,
    ) -> serde_json::Value {
        let j = serde_json::to_value(v).unwrap();
        assert_structured(&j, what);
        let back: T = serde_json::from_value(j.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(serde_json::to_value(&back).unwrap(), j, "{what}");
        j
    }

    #[test]
    fn json_vlan_is_an_object() {
        let j = round_trip(
            &vec![
                port("t", trunk()),
                port("a", VlanCfg::Access { vid: 10 }),
                port("n", VlanCfg::None),
            ],
            "port list",
        );
        assert_eq!(
            j[0]["vlan"],
            serde_json::json!({"mode": "trunk", "vids": [10, 20], "native": 1})
        );
        assert_eq!(
            j[1]["vlan"],
            serde_json::json!({"mode": "access", "vid": 10})
        );
        assert_eq!(j[2]["vlan"], serde_json::json!({"mode": "none"}));
        // The table keeps its words.
        let table = crate::output::render(&crate::output::ports(&vec![port("t", trunk())]));
        assert!(table.contains("trunk 10,20 native 1"), "{table}");
    }

    #[test]
    fn json_net_show_is_structured() {
        let d = net_detail();
        let j = round_trip(&d, "net show");
        assert_eq!(j["gateway"]["address"], "192.168.122.1");
        assert_eq!(j["gateway"]["prefix"], 24);
        assert_eq!(j["gateway"]["iface"], "kvnet-lab");
        assert_eq!(
            j["gateway"]["vlan"],
            serde_json::json!({"mode": "access", "vid": 10})
        );
        assert_eq!(
            j["nat"]["ports"],
            serde_json::json!({"first": 1024, "last": 65535})
        );
        assert_eq!(j["nat"]["address"], "198.51.100.1");
        assert_eq!(j["dhcp"]["range"]["first"], "192.168.122.2");
        assert_eq!(j["dhcp"]["hosts"][0]["name"], "web");
        assert_eq!(
            j["forwards"][0]["to"],
            serde_json::json!({"addr": "192.168.122.5", "port": 80})
        );
        assert_eq!(j["policy"]["port_rate_in_bps"], 10_000_000);
        assert_eq!(j["port_details"][0]["vlan"]["mode"], "trunk");
        round_trip(&vec![d.net.clone()], "net list");
        // Every setting has its line in the table.
        let text = crate::output::render(&crate::output::net_detail(&d));
        for want in [
            "192.168.122.1/24 on kvnet-lab (mac 02:00:00:00:00:01)",
            "kvnet-lab-p (vlan access 10)",
            "192.168.122.2-192.168.122.254, lease 3600s, domain lab.test, 1 static hosts, 2 leases",
            "52:54:00:00:00:05 192.168.122.5 web",
            "ports 1024-65535, udp eim, masquerade 198.51.100.1",
            "tcp 8080 -> 192.168.122.5:80",
            "isolated ports",
            "10mbit",
            "storm pps",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }

    #[test]
    fn json_flows_and_tables_are_structured() {
        let flow = FlowTuple::from_be(
            u32::from(Ipv4Addr::new(10, 0, 0, 2)).to_be(),
            40000,
            u32::from(Ipv4Addr::new(198, 51, 100, 2)).to_be(),
            80,
        );
        let ct = ConntrackRow {
            proto: "tcp".into(),
            orig: flow,
            translated: flow,
            state: "established".into(),
            dnat: false,
            age_secs: 1.5,
            idle_secs: 0.5,
            packets: 3,
            bytes: 180,
            reply_packets: 2,
            reply_bytes: 120,
        };
        let j = round_trip(&vec![ct.clone()], "conntrack list");
        assert_eq!(
            j[0]["orig"],
            serde_json::json!({"saddr": "10.0.0.2", "sport": 40000, "daddr": "198.51.100.2", "dport": 80})
        );
        assert_eq!(flow.display("tcp"), "10.0.0.2:40000 -> 198.51.100.2:80");
        assert_eq!(flow.display("icmp"), "10.0.0.2 -> 198.51.100.2");
        round_trip(&net_detail().forwards, "forward list");
        round_trip(
            &vec![FdbRow {
                mac: "02:00:00:00:00:01".into(),
                vlan: 10,
                port: "p1".into(),
                ifindex: 7,
                kind: "learned".into(),
                age_secs: Some(1.0),
                vtep: Some("198.51.100.2".parse().unwrap()),
            }],
            "fdb show",
        );
        round_trip(
            &vec![VlanInfo {
                vid: 10,
                ports: vec![VlanPortRow {
                    port: "p1".into(),
                    mode: "access".into(),
                    tagging: "untagged".into(),
                }],
            }],
            "vlan show",
        );
        let mut drops = BTreeMap::new();
        drops.insert("table_full".to_string(), 1);
        round_trip(
            &StatsReport {
                ports: vec![PortStatsRow {
                    port: "p1".into(),
                    net: "lab".into(),
                    drops: drops.clone(),
                    ..Default::default()
                }],
                nat: vec![NatStatsRow {
                    net: "lab".into(),
                    drops,
                    ..Default::default()
                }],
                services: vec![NetServiceStats {
                    net: "lab".into(),
                    dhcp: serde_json::json!({"acks": 1}),
                    dns: serde_json::json!({"udp_queries": 2}),
                }],
            },
            "stats",
        );
    }

    #[test]
    fn json_status_apply_port_show_and_leases_are_structured() {
        round_trip(
            &crate::daemon::status::Status {
                daemon: "running".into(),
                version: "0.1.0".into(),
                pid: 1,
                pin_dir: "/sys/fs/bpf/kvnet".into(),
                programs: vec!["kvnet_xdp".into()],
                config: None,
                networks: vec!["lab".into()],
                ports: 2,
                rules: 0,
                fdb_entries: 3,
                fdb_capacity: 4096,
                conntrack_gc: Default::default(),
            },
            "status",
        );
        let plan = crate::config::Plan {
            networks_added: vec!["lab".into()],
            ports_added: vec![crate::config::PortAdded {
                iface: "p1".into(),
                to: "lab".into(),
            }],
            ..Default::default()
        };
        let j = round_trip(&plan, "apply");
        assert_eq!(j["ports_added"][0]["iface"], "p1");
        round_trip(
            &crate::security::PortSecurityInfo {
                iface: "p1".into(),
                net: "lab".into(),
                security: "mac+ip".into(),
                max_macs: 1,
                macs: vec!["02:00:00:00:00:01".into()],
                ips: vec!["10.0.0.2".into()],
                owned: vec![],
                note: "guarded".into(),
            },
            "port show",
        );
        round_trip(
            &vec![crate::dhcp::LeaseInfo {
                mac: "02:00:00:00:00:01".parse().unwrap(),
                ip: Ipv4Addr::new(10, 0, 0, 2),
                hostname: Some("web".into()),
                expires_unix: 1,
            }],
            "dhcp leases",
        );
    }
}
