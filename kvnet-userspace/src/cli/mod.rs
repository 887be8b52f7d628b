//! The `kvnet` command line: parses it and runs each command (most as a
//! request to the daemon).
mod config_cli;
mod uplink;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use crate::control::{
    call, ConntrackRow, FdbRow, ForwardRow, Hook, Mode, NetDetail, NetInfo, NetOpts, PortInfo,
    Request, StatsReport, VlanArgs, VlanInfo,
};
use crate::{config, control, daemon, dhcp, output, security, trace};

#[derive(Parser)]
#[command(
    name = "kvnet",
    version,
    about = "eBPF/XDP virtual switch and NAT for KVM hosts"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "KVNET_SOCKET", default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (as root): load the datapath and serve the CLI.
    Daemon {
        /// bpffs folder for kvnet's pinned programs and maps.
        #[arg(long, env = "KVNET_PIN_DIR", default_value = control::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Turn the datapath's debug log (aya-log) on; off keeps it off the hot path.
        #[arg(long)]
        log_datapath: bool,
        /// Persistent state (DHCP leases under DIR/dhcp/NET/).
        #[arg(long, env = "KVNET_STATE_DIR", default_value = dhcp::service::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Conntrack capacity in entries (a NAT flow takes two); when full,
        /// established flows go on and new ones are dropped and counted.
        #[arg(long, default_value_t = kvnet_common::MAX_CT_ENTRIES)]
        ct_max: u32,
        /// Config file to start from (default /etc/kvnet/kvnet.toml when it exists).
        #[arg(long, env = "KVNET_CONFIG")]
        config: Option<PathBuf>,
        /// The control socket's group (created if absent): root and its
        /// members may use every command.
        #[arg(long, env = "KVNET_SOCKET_GROUP", default_value = daemon::access::DEFAULT_GROUP,
              value_parser = daemon::access::group_name)]
        socket_group: String,
        /// A group (created if absent) whose members may only list and show.
        #[arg(long, env = "KVNET_RO_GROUP", default_value = daemon::access::DEFAULT_RO_GROUP,
              value_parser = daemon::access::group_name)]
        ro_group: String,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
        #[arg(long, env = "KVNET_METRICS", value_name = "ADDR:PORT")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Networks (switch instances).
    #[command(subcommand)]
    Net(NetCmd),
    /// Switch ports.
    #[command(subcommand)]
    Port(PortCmd),
    /// The MAC table.
    #[command(subcommand)]
    Fdb(FdbCmd),
    /// VLANs and their member ports.
    #[command(subcommand)]
    Vlan(VlanCmd),
    /// Uplink groups: several NICs as one uplink (bonding modes, in eBPF).
    #[command(subcommand)]
    Uplink(uplink::UplinkCmd),
    /// Port forwards into a NAT network (DNAT).
    #[command(subcommand)]
    Forward(ForwardCmd),
    /// The NAT connection table.
    #[command(subcommand)]
    Conntrack(ConntrackCmd),
    /// Per-port counters.
    Stats {
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Make the running daemon what a config file says, changing only the differences.
    Apply {
        /// The config file (TOML).
        file: PathBuf,
        /// Print the changes without making them.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Write the running state to the daemon's config file (or FILE).
    Save {
        /// Where to write (default: the file the daemon last started from or applied).
        file: Option<PathBuf>,
        /// Write FILE even outside the config directory (/etc/kvnet or the
        /// daemon's file's folder).
        #[arg(long)]
        force: bool,
    },
    /// Check a config file without a daemon.
    Check {
        /// The config file (TOML).
        file: PathBuf,
    },
    /// Print a libvirt network definition (XML) as kvnet config.
    ImportLibvirt {
        /// The network's XML (`virsh net-dumpxml NAME`).
        file: PathBuf,
        /// The NIC a nat/routed network uses (default: <forward dev>, else,
        /// for nat, the interface of the host's default route).
        #[arg(long)]
        uplink: Option<String>,
    },
    /// qemu/libvirt tap up: attach it (network from KVNET_NET or the port rules).
    Ifup {
        /// The tap interface qemu created.
        tap: String,
        /// The network to attach it to (default: from the port rules matching its name).
        #[arg(long, env = "KVNET_NET")]
        net: Option<String>,
        /// Its access VLAN (1-4094).
        #[arg(long, env = "KVNET_VLAN", value_name = "VID")]
        vlan: Option<String>,
    },
    /// qemu/libvirt tap down: detach it.
    Ifdown {
        /// The tap interface.
        tap: String,
    },
    /// Daemon, programs, networks, ports and table fill.
    Status {
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Remove everything kvnet installed (programs, pins, interfaces, sysctls) and stop the daemon;
    /// with no daemon running, removes it from the state files and the kernel (as root).
    Down {
        /// bpffs folder of kvnet's pins (used when no daemon answers).
        #[arg(long, env = "KVNET_PIN_DIR", default_value = control::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The daemon's state folder (used when no daemon answers).
        #[arg(long, env = "KVNET_STATE_DIR", default_value = dhcp::service::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Stream per-packet path events from the datapath (as root), filtered
    /// in the kernel; tracing stops at --count events or Ctrl-C.
    Trace {
        /// bpffs folder of the daemon's pinned maps.
        #[arg(long, env = "KVNET_PIN_DIR", default_value = control::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Ingress or egress port (name in this namespace, or ifindex).
        #[arg(long)]
        port: Option<String>,
        /// Source or destination MAC.
        #[arg(long)]
        mac: Option<String>,
        /// Source or destination IPv4 address, before or after NAT.
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// tcp, udp or icmp.
        #[arg(long)]
        proto: Option<String>,
        /// Stop after N events.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per line.
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// DHCP leases of networks with a --dhcp-range.
    #[command(subcommand)]
    Dhcp(DhcpCmd),
    /// Serve DHCP and DNS on one interface in the foreground (testing).
    #[command(hide = true)]
    DhcpServe(DhcpServeArgs),
    /// Show the leases in a DHCP state folder.
    #[command(hide = true)]
    DhcpLeases {
        /// The DHCP state folder (`dhcp-serve --state-dir`).
        #[arg(long)]
        state_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Write shell completions or man pages made from this command line
    /// (packaging: `cargo xtask package`).
    #[command(hide = true)]
    Generate {
        /// What to write.
        #[arg(value_enum)]
        what: Generated,
        /// The folder to write into (created if absent).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Generated {
    /// kvnet.bash, _kvnet (zsh) and kvnet.fish.
    Completions,
    /// kvnet.1 and a page per subcommand (kvnet-net-add.1, ...), hidden ones left out.
    Man,
}

#[derive(Subcommand)]
enum DhcpCmd {
    /// A network's leases: MAC, IP, hostname, expiry (like `virsh net-dhcp-leases`).
    Leases {
        /// The network.
        net: String,
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// A network's static hosts, changed live (leases and traffic stay).
    #[command(subcommand)]
    Host(DhcpHostCmd),
}

#[derive(Subcommand)]
enum DhcpHostCmd {
    /// Add (or replace, by MAC) a static host: MAC,IP[,NAME].
    Add {
        /// The network.
        net: String,
        /// The host's MAC, its fixed IPv4 address and optionally its DNS name.
        #[arg(value_name = "MAC,IP[,NAME]")]
        host: String,
    },
    /// Remove a static host by its MAC.
    Del {
        /// The network.
        net: String,
        /// The host's MAC.
        mac: String,
    },
}

#[derive(clap::Args)]
struct DhcpServeArgs {
    /// The gateway interface to serve on (only).
    #[arg(long)]
    iface: String,
    /// The gateway address and prefix, e.g. 192.168.122.1/24.
    #[arg(long)]
    server_ip: String,
    /// FIRST,LAST address handed out.
    #[arg(long)]
    range: String,
    /// MAC,IP[,NAME] static host (repeatable).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// The guests' DNS domain.
    #[arg(long)]
    domain: Option<String>,
    /// Where the leases are kept.
    #[arg(long, default_value = "/var/lib/kvnet/dhcp")]
    state_dir: PathBuf,
    /// Lease time in seconds.
    #[arg(long, default_value_t = 3600)]
    lease_secs: u64,
    /// Upstream resolver IP:PORT (repeatable; default: /etc/resolv.conf).
    #[arg(long = "dns-upstream")]
    dns_upstream: Vec<std::net::SocketAddr>,
    /// Serve DHCP only.
    #[arg(long)]
    no_dns: bool,
}

#[derive(Subcommand)]
enum ForwardCmd {
    /// Forward PORT on the uplink's address to a guest's IP:PORT (an IPv6
    /// guest, [ADDR]:PORT, through the uplink's IPv6 address: NAT66).
    Add {
        /// The NAT network.
        net: String,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// The port on the uplink's address.
        #[arg(long)]
        port: u16,
        /// Where to: the guest's address and port (IPv6: [ADDR]:PORT).
        #[arg(long, value_name = "GUEST-IP:PORT")]
        to: String,
    },
    /// Remove a port forward (flows it started stay until they end).
    Del {
        /// The NAT network.
        net: String,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// The forwarded port on the uplink's address.
        #[arg(long)]
        port: u16,
    },
    /// A network's port forwards.
    List {
        /// The NAT network.
        net: String,
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConntrackCmd {
    /// Flows with tuples before and after translation, state, age, counters.
    List {
        /// The NAT network.
        net: String,
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Forget every flow of a network (established ones break).
    Flush {
        /// The NAT network.
        net: String,
    },
}

#[derive(Subcommand)]
enum NetCmd {
    /// Create a network.
    Add {
        /// The network's name.
        name: String,
        /// Seconds before an idle learned MAC is forgotten.
        #[arg(long)]
        ageing: Option<u64>,
        /// How the network reaches the host and the outside.
        #[arg(long, value_enum, default_value_t = Mode::Isolated)]
        mode: Mode,
        /// Gateway address and prefix on the host (host-only, routed), e.g. 192.168.122.1/24.
        #[arg(long)]
        gateway: Option<String>,
        /// Name of the gateway interface (default kvnet-NAME).
        #[arg(long)]
        gateway_iface: Option<String>,
        /// The NIC towards the outside (routed: where return traffic arrives; bridged: the shared LAN).
        #[arg(long)]
        uplink: Option<String>,
        /// Serve DHCP (and DNS on the gateway address) handing out FIRST,LAST.
        #[arg(long, value_name = "FIRST,LAST")]
        dhcp_range: Option<String>,
        /// A static host: MAC,IP[,NAME] (repeatable).
        #[arg(long = "dhcp-host", value_name = "MAC,IP[,NAME]")]
        dhcp_hosts: Vec<String>,
        /// The guests' DNS domain (names answered by the gateway's DNS).
        #[arg(long)]
        domain: Option<String>,
        /// DHCP lease time in seconds (default 3600).
        #[arg(long, value_name = "SECS")]
        dhcp_lease: Option<u64>,
        /// Isolate every guest port (libvirt's <port isolated='yes'/>).
        #[arg(long)]
        isolated_ports: bool,
        /// Default rate limit into each guest port, like 10mbit.
        #[arg(long, value_name = "RATE")]
        port_rate_in: Option<crate::rate::Rate>,
        /// Default rate limit out of each guest port.
        #[arg(long, value_name = "RATE")]
        port_rate_out: Option<crate::rate::Rate>,
        /// Storm control: broadcast, multicast and unknown-unicast frames a
        /// second each port may flood (default 2000; 0: off).
        #[arg(long, value_name = "PPS")]
        storm_pps: Option<u32>,
        /// NAT source ports, FIRST-LAST (default 1024-65535, minus the host's ephemeral range).
        #[arg(long, value_name = "FIRST-LAST")]
        nat_ports: Option<String>,
        /// NAT: UDP mapping, endpoint-independent (eim: STUN and peer-to-peer
        /// work; any remote may answer a mapped socket) or one per remote.
        #[arg(long, value_name = "MODE")]
        nat_udp: Option<crate::control::NatUdp>,
        /// IPv6 gateway address and prefix, e.g. 2001:db8:1::1/64 (repeatable):
        /// router advertisements (SLAAC), DHCPv6 and DNS on the gateway.
        #[arg(long, value_name = "ADDRESS/PREFIX")]
        gateway6: Vec<String>,
        /// Stateful DHCPv6 handing out FIRST-LAST (else stateless: DNS only).
        #[arg(long, value_name = "FIRST-LAST")]
        dhcp6_range: Option<String>,
        /// A static DHCPv6 host: MAC,IPV6[,NAME] (repeatable).
        #[arg(long = "dhcp6-host", value_name = "MAC,IPV6[,NAME]")]
        dhcp6_hosts: Vec<String>,
        /// NAT66 (mode nat, with --gateway6): the guests' IPv6 leaves
        /// masqueraded behind the uplink's global IPv6 address.
        #[arg(long)]
        nat6: bool,
        /// Span hosts: a VXLAN overlay with this VNI (needs --vtep-local).
        #[arg(long, value_name = "VNI", requires = "vtep_local")]
        vxlan: Option<u32>,
        /// This host's VTEP address (the underlay's source of the tunnel).
        #[arg(long, value_name = "ADDR", requires = "vxlan")]
        vtep_local: Option<String>,
        /// The underlay NIC (its MTU less 50 bytes is the guests' MTU).
        #[arg(long, value_name = "IF", requires = "vxlan")]
        vtep_dev: Option<String>,
        /// Static peers: remote VTEP addresses (floods go to each).
        #[arg(
            long,
            value_name = "A,B,...",
            value_delimiter = ',',
            requires = "vxlan"
        )]
        remote: Vec<String>,
    },
    /// Show one network: mode, gateway, uplink and each port's hook.
    Show {
        /// The network.
        name: String,
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Print one network, its static ports and rules as config TOML.
    Dump {
        /// The network.
        name: String,
    },
    /// Delete a network and detach its ports.
    Del {
        /// The network.
        name: String,
    },
    /// List networks.
    List {
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Change a network's settings.
    Set {
        /// The network.
        name: String,
        /// Seconds before an idle learned MAC is forgotten.
        #[arg(long)]
        ageing: Option<u64>,
        /// DHCP range FIRST,LAST, changed live (as the next three).
        #[arg(long, value_name = "FIRST,LAST")]
        dhcp_range: Option<String>,
        /// The guests' DNS domain.
        #[arg(long)]
        domain: Option<String>,
        /// DHCP lease time in seconds.
        #[arg(long, value_name = "SECS")]
        dhcp_lease: Option<u64>,
        /// A NAT network's port range, changed live: flows keep their ports.
        #[arg(long, value_name = "FIRST-LAST")]
        nat_ports: Option<String>,
        /// A NAT network's UDP mapping, changed live.
        #[arg(long, value_name = "MODE")]
        nat_udp: Option<crate::control::NatUdp>,
    },
}

#[derive(Subcommand)]
enum PortCmd {
    /// Attach an interface (guest tap, veth end) to a network.
    Add {
        /// The network.
        net: String,
        /// The interface to attach.
        iface: String,
        /// Let frames go back out of the port they came in on.
        #[arg(long)]
        hairpin: bool,
        /// Where the datapath runs on this port.
        #[arg(long, value_enum, default_value_t = Hook::Auto)]
        hook: Hook,
        #[command(flatten)]
        vlan: VlanOpts,
        /// Trust this port: it may act as a DHCP server and send from any
        /// MAC (a trunk to another switch); guest ports are guarded.
        #[arg(long)]
        trusted: bool,
        #[command(flatten)]
        security: security::SecurityArgs,
        #[command(flatten)]
        policy: crate::policy::PolicyArgs,
    },
    /// A port's protection (port security) and what it is bound to.
    Show {
        /// The port's interface.
        iface: String,
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Change a port's VLAN membership live.
    Set {
        /// The port's interface.
        iface: String,
        #[command(flatten)]
        vlan: VlanOpts,
        /// Drop the VLAN config: untagged frames only.
        #[arg(long)]
        no_vlan: bool,
    },
    /// Detach a port and forget its MACs.
    Del {
        /// The port's interface.
        iface: String,
    },
    /// List ports.
    List {
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
}

/// VLAN options of `port add` and `port set` (validated by the daemon).
#[derive(clap::Args)]
struct VlanOpts {
    /// Access port of this VLAN (1-4094): untagged on the wire.
    #[arg(long, value_name = "VID")]
    vlan: Option<String>,
    /// Trunk port carrying these VLANs tagged: a list like 10,20,100-199.
    #[arg(long, value_name = "LIST")]
    trunk: Option<String>,
    /// The trunk's native VLAN: untagged frames belong to it.
    #[arg(long, value_name = "VID")]
    native: Option<String>,
}

impl VlanOpts {
    fn args(self, no_vlan: bool) -> VlanArgs {
        VlanArgs {
            vlan: self.vlan,
            trunk: self.trunk,
            native: self.native,
            no_vlan,
        }
    }
}

#[derive(Subcommand)]
enum VlanCmd {
    /// A network's VLANs and member ports with their tagging.
    Show {
        /// The network.
        net: String,
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FdbCmd {
    /// Show a network's MAC table.
    Show {
        /// The network.
        net: String,
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Add a static entry (never ages, never overwritten by learning).
    Add {
        /// The network.
        net: String,
        /// The MAC address.
        mac: String,
        /// The port's interface the MAC is behind.
        port: String,
        /// The VLAN (default: the port's untagged VLAN).
        #[arg(long, value_name = "VID")]
        vlan: Option<String>,
    },
    /// Delete an entry (from every VLAN unless --vlan).
    Del {
        /// The network.
        net: String,
        /// The MAC address.
        mac: String,
        /// Only from this VLAN.
        #[arg(long, value_name = "VID")]
        vlan: Option<String>,
    },
}

pub fn main() -> ExitCode {
    // netlink-packet-route warns of every attribute a newer kernel made
    // longer than it knows; that says nothing to an admin.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,netlink_packet_route=error"),
    )
    .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvnet: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let sock = cli.socket.as_path();
    let done = |r: Result<serde_json::Value>| r.map(|_| ());
    match cli.cmd {
        Cmd::Daemon {
            pin_dir,
            log_datapath,
            state_dir,
            ct_max,
            config,
            socket_group,
            ro_group,
            metrics,
        } => daemon::run(daemon::Options {
            ct_max,
            socket: cli.socket.clone(),
            pin_dir,
            log_datapath,
            state_dir,
            config: config.or_else(|| {
                let d = PathBuf::from(config::DEFAULT_CONFIG);
                d.exists().then_some(d)
            }),
            socket_group,
            ro_group,
            metrics,
        }),
        Cmd::Apply {
            file,
            dry_run,
            json,
        } => config_cli::apply(sock, &file, dry_run, json),
        Cmd::Save { file, force } => {
            let path = call(
                sock,
                &Request::Save {
                    path: file.map(|f| config_cli::absolute(&f)),
                    force,
                },
            )?;
            println!("saved to {}", path.as_str().unwrap_or("?"));
            Ok(())
        }
        Cmd::Check { file } => {
            let cfg = config::load(&file)?;
            // Exactly what `apply` checks before it changes anything.
            crate::daemon::reconcile::validate(&cfg)
                .map_err(|e| e.context(file.display().to_string()))?;
            for w in config::warnings(&cfg) {
                eprintln!("kvnet: warning: {w}");
            }
            if crate::daemon::reconcile::is_empty(&cfg) {
                eprintln!(
                    "kvnet: warning: {} defines no networks, ports or rules: `kvnet apply` refuses it while networks run (it would remove them all)",
                    file.display()
                );
            }
            println!("{}: ok", file.display());
            Ok(())
        }
        Cmd::ImportLibvirt { file, uplink } => config_cli::import_libvirt(&file, uplink.as_deref()),
        Cmd::Ifup { tap, net, vlan } => {
            let r = call(
                sock,
                &Request::Ifup {
                    iface: tap.clone(),
                    net,
                    vlan,
                },
            )?;
            eprintln!("kvnet: {tap} -> {}", r.as_str().unwrap_or("?"));
            Ok(())
        }
        Cmd::Ifdown { tap } => done(call(sock, &Request::Ifdown { iface: tap })),
        Cmd::Uplink(c) => uplink::run(sock, c),
        Cmd::Status { json } => config_cli::status(sock, json),
        Cmd::Down { pin_dir, state_dir } => config_cli::down(sock, &pin_dir, &state_dir),
        Cmd::Trace {
            pin_dir,
            port,
            mac,
            ip,
            proto,
            count,
            json,
        } => trace::run(
            &pin_dir,
            trace::Args {
                port,
                mac,
                ip,
                proto,
                count,
                json,
            },
        ),
        Cmd::Net(NetCmd::Add {
            name,
            ageing,
            mode,
            gateway,
            gateway_iface,
            uplink,
            dhcp_range,
            dhcp_hosts,
            domain,
            dhcp_lease,
            isolated_ports,
            port_rate_in,
            port_rate_out,
            storm_pps,
            nat_ports,
            nat_udp,
            gateway6,
            dhcp6_range,
            dhcp6_hosts,
            nat6,
            vxlan,
            vtep_local,
            vtep_dev,
            remote,
        }) => done(call(
            sock,
            &Request::NetAdd {
                name,
                ageing_secs: ageing,
                opts: NetOpts {
                    mode,
                    gateway,
                    gateway_iface,
                    uplink,
                    dhcp_range,
                    dhcp_hosts,
                    domain,
                    dhcp_lease,
                    nat_ports,
                    nat_udp,
                    port_policy: crate::policy::PolicyArgs {
                        isolated: isolated_ports,
                        rate_in: port_rate_in,
                        rate_out: port_rate_out,
                    },
                    storm_pps,
                    gateway6,
                    dhcp6_range,
                    dhcp6_hosts,
                    nat6,
                    vxlan: vxlan.map(|vni| crate::vxlan::VxlanOpts {
                        vni,
                        vtep_local: vtep_local.unwrap_or_default(),
                        vtep_dev,
                        remotes: remote,
                    }),
                    ..Default::default()
                },
            },
        )),
        Cmd::Net(NetCmd::Show { name, json }) => output::show::<NetDetail>(
            call(sock, &Request::NetShow { name })?,
            json,
            output::net_detail,
        ),
        Cmd::Net(NetCmd::Dump { name }) => {
            let text = call(sock, &Request::NetDump { name })?;
            print!("{}", text.as_str().unwrap_or_default());
            Ok(())
        }
        Cmd::Net(NetCmd::Del { name }) => done(call(sock, &Request::NetDel { name })),
        Cmd::Net(NetCmd::Set {
            name,
            ageing,
            dhcp_range,
            domain,
            dhcp_lease,
            nat_ports,
            nat_udp,
        }) => {
            let dhcp = dhcp_range.is_some() || domain.is_some() || dhcp_lease.is_some();
            if ageing.is_some() || nat_ports.is_some() || nat_udp.is_some() || !dhcp {
                call(
                    sock,
                    &Request::NetSet {
                        name: name.clone(),
                        ageing_secs: ageing,
                        nat_ports,
                        nat_udp,
                    },
                )?;
            }
            if dhcp_range.is_some() || domain.is_some() || dhcp_lease.is_some() {
                call(
                    sock,
                    &Request::DhcpSet {
                        net: name,
                        range: dhcp_range,
                        domain,
                        lease_secs: dhcp_lease,
                        host_add: None,
                        host_del: None,
                    },
                )?;
            }
            Ok(())
        }
        Cmd::Dhcp(DhcpCmd::Host(h)) => {
            let (net, host_add, host_del) = match h {
                DhcpHostCmd::Add { net, host } => (net, Some(host), None),
                DhcpHostCmd::Del { net, mac } => (net, None, Some(mac)),
            };
            done(call(
                sock,
                &Request::DhcpSet {
                    net,
                    range: None,
                    domain: None,
                    lease_secs: None,
                    host_add,
                    host_del,
                },
            ))
        }
        Cmd::Net(NetCmd::List { json }) => {
            output::show::<Vec<NetInfo>>(call(sock, &Request::NetList)?, json, output::nets)
        }
        Cmd::Port(PortCmd::Add {
            net,
            iface,
            hairpin,
            hook,
            vlan,
            trusted,
            security,
            policy,
        }) => done(call(
            sock,
            &Request::PortAdd {
                net,
                iface,
                hairpin,
                hook,
                vlan: vlan.args(false),
                trusted,
                security,
                policy,
            },
        )),
        Cmd::Port(PortCmd::Show { iface, json }) => output::show::<security::PortSecurityInfo>(
            call(sock, &Request::PortShow { iface })?,
            json,
            output::port_security,
        ),
        Cmd::Port(PortCmd::Set {
            iface,
            vlan,
            no_vlan,
        }) => done(call(
            sock,
            &Request::PortSet {
                iface,
                vlan: vlan.args(no_vlan),
            },
        )),
        Cmd::Vlan(VlanCmd::Show { net, json }) => output::show::<Vec<VlanInfo>>(
            call(sock, &Request::VlanShow { net })?,
            json,
            output::vlans,
        ),
        Cmd::Port(PortCmd::Del { iface }) => done(call(sock, &Request::PortDel { iface })),
        Cmd::Port(PortCmd::List { json }) => {
            output::show::<Vec<PortInfo>>(call(sock, &Request::PortList)?, json, output::ports)
        }
        Cmd::Fdb(FdbCmd::Show { net, json }) => {
            output::show::<Vec<FdbRow>>(call(sock, &Request::FdbShow { net })?, json, output::fdb)
        }
        Cmd::Fdb(FdbCmd::Add {
            net,
            mac,
            port,
            vlan,
        }) => done(call(
            sock,
            &Request::FdbAdd {
                net,
                mac,
                port,
                vlan,
            },
        )),
        Cmd::Fdb(FdbCmd::Del { net, mac, vlan }) => {
            done(call(sock, &Request::FdbDel { net, mac, vlan }))
        }
        Cmd::Stats { json } => {
            output::show::<StatsReport>(call(sock, &Request::Stats)?, json, output::stats)
        }
        Cmd::Forward(ForwardCmd::Add {
            net,
            proto,
            port,
            to,
        }) => done(call(
            sock,
            &Request::ForwardAdd {
                net,
                proto,
                port,
                to,
            },
        )),
        Cmd::Forward(ForwardCmd::Del { net, proto, port }) => {
            done(call(sock, &Request::ForwardDel { net, proto, port }))
        }
        Cmd::Forward(ForwardCmd::List { net, json }) => output::show::<Vec<ForwardRow>>(
            call(sock, &Request::ForwardList { net })?,
            json,
            output::forwards,
        ),
        Cmd::Conntrack(ConntrackCmd::List { net, json }) => output::show::<Vec<ConntrackRow>>(
            call(sock, &Request::ConntrackList { net })?,
            json,
            output::conntrack,
        ),
        Cmd::Conntrack(ConntrackCmd::Flush { net }) => {
            done(call(sock, &Request::ConntrackFlush { net }))
        }
        Cmd::Dhcp(DhcpCmd::Leases { net, json }) => output::show::<Vec<dhcp::LeaseInfo>>(
            call(sock, &Request::DhcpLeases { net })?,
            json,
            dhcp::service::lease_table,
        ),
        Cmd::DhcpServe(a) => dhcp::serve_standalone(dhcp::Standalone {
            iface: a.iface,
            server_ip: a.server_ip,
            range: a.range,
            hosts: a.hosts,
            domain: a.domain,
            state_dir: a.state_dir,
            lease_secs: a.lease_secs,
            dns_upstream: a.dns_upstream,
            no_dns: a.no_dns,
        }),
        Cmd::DhcpLeases { state_dir, json } => dhcp::print_leases(&state_dir, json),
        Cmd::Generate { what, out } => generate(what, &out)
            .with_context(|| format!("writing {} to {}", what.name(), out.display())),
    }
}

impl Generated {
    fn name(self) -> &'static str {
        match self {
            Generated::Completions => "completions",
            Generated::Man => "man pages",
        }
    }
}

/// Completions and man pages come from `Cli` itself, so they can never
/// disagree with what the binary parses.
fn generate(what: Generated, out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let cmd = Cli::command();
    match what {
        Generated::Completions => {
            use clap_complete::Shell;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let path = clap_complete::generate_to(shell, &mut cmd.clone(), "kvnet", out)?;
                println!("{}", path.display());
            }
        }
        Generated::Man => {
            clap_mangen::generate_to(cmd, out)?;
            let mut pages: Vec<_> = std::fs::read_dir(out)?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?;
            pages.sort();
            for p in pages
                .iter()
                .filter(|p| p.extension().is_some_and(|x| x == "1"))
            {
                println!("{}", p.display());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument, flag and subcommand of the CLI (hidden ones too) has
    /// help text: `--help`, the man pages and the completions show it.
    #[test]
    fn cli_every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{sub_path} (the subcommand)"));
                }
                walk(sub, &sub_path, missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "kvnet", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        // The walk must see the whole tree: positionals, flattened groups
        // and hidden subcommands included.
        let find = |path: &[&str]| {
            path.iter()
                .try_fold(cmd.clone(), |c, name| c.find_subcommand(name).cloned())
        };
        let port_add = find(&["port", "add"]).expect("port add");
        for id in ["net", "iface", "vlan", "mac"] {
            assert!(port_add.get_arguments().any(|a| a.get_id() == id), "{id}");
        }
        assert!(find(&["dhcp-serve"]).is_some_and(|c| c.is_hide_set()));
    }

    #[test]
    fn cli_version_is_the_crate_version() {
        let err = match Cli::try_parse_from(["kvnet", "--version"]) {
            Ok(_) => panic!("--version parsed as a command"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(
            err.to_string().trim(),
            format!("kvnet {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn cli_generates_completions_and_man_pages() {
        let dir = std::env::temp_dir().join(format!("kvnet-generate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let result = (|| -> Result<()> {
            generate(Generated::Completions, &dir.join("completions"))?;
            generate(Generated::Man, &dir.join("man"))?;
            let read = |p: &str| std::fs::read_to_string(dir.join(p)).context(p.to_string());
            let bash = read("completions/kvnet.bash")?;
            assert!(
                bash.contains("--dhcp-range"),
                "bash completion lacks net add's flags"
            );
            assert!(read("completions/_kvnet")?.starts_with("#compdef kvnet"));
            assert!(read("completions/kvnet.fish")?.contains("complete -c kvnet"));
            let top = read("man/kvnet.1")?;
            assert!(top.contains(".TH kvnet 1"), "{top}");
            assert!(top.contains(env!("CARGO_PKG_VERSION")));
            let net_add = read("man/kvnet-net-add.1")?;
            assert!(
                net_add.contains("dhcp\\-range") && net_add.contains("FIRST,LAST"),
                "{net_add}"
            );
            // Hidden commands are internal: no page.
            assert!(!dir.join("man/kvnet-generate.1").exists());
            assert!(!dir.join("man/kvnet-dhcp-serve.1").exists());
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result.unwrap();
    }
}
