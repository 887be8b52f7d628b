//! The daemon's DHCP and DNS servers, one pair per network with a gateway
//! and a `--dhcp-range`.
//!
//! The servers run on their own small tokio runtime, so starting and
//! stopping them (from the daemon's synchronous dispatch, under the switch
//! lock) never waits on the control plane's runtime or lock.
use std::{
    collections::BTreeMap,
    future::Future,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use super::{config, DhcpConfig, DhcpHandle, DhcpServer, LeaseInfo};
use crate::{
    control::NetOpts,
    dns::{DnsConfig, DnsHandle, DnsServer, Names, Upstream},
    gateway::Cidr,
    ipv6::{V6Plan, V6Servers},
};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/kvnet";
/// Where the forwarders' upstream resolvers come from (followed).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

pub use crate::control::NetServiceStats;

/// The running servers of one network (DNS unless it is turned off).
struct NetServers {
    dhcp: DhcpHandle,
    dns: Option<DnsHandle>,
}

pub struct Services {
    /// `<state-dir>`; leases live in `<state-dir>/dhcp/<NET>/`.
    state_dir: PathBuf,
    resolv_conf: PathBuf,
    rt: Option<tokio::runtime::Runtime>,
    running: BTreeMap<String, NetServers>,
    /// Router advertisements, DHCPv6 and the IPv6 resolver, by network.
    running6: BTreeMap<String, V6Servers>,
    /// What each network's IPv4 and IPv6 servers know by name, so either
    /// resolver answers for both (A and AAAA of one guest).
    names: BTreeMap<String, NameSlots>,
}

type Slot = Arc<Mutex<Option<Names>>>;

#[derive(Clone, Default)]
struct NameSlots {
    v4: Slot,
    v6: Slot,
}

/// The names in `slot` now (none while its servers are stopped).
fn read_slot(slot: &Slot) -> Vec<(String, IpAddr)> {
    let f = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
    f.map(|f| f()).unwrap_or_default()
}

fn fill_slot(slot: &Slot, names: Option<Names>) {
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = names;
}

impl Default for Services {
    fn default() -> Self {
        Services::new(PathBuf::from(DEFAULT_STATE_DIR))
    }
}

/// Does `opts` ask for DHCP at all?
/// A network's DHCPv6 leases, beside its IPv4 ones.
pub const LEASE6_FILE: &str = "leases6.json";

pub fn wanted(opts: &NetOpts) -> bool {
    opts.dhcp_range.is_some()
        || !opts.dhcp_hosts.is_empty()
        || opts.domain.is_some()
        || opts.dhcp_lease.is_some()
}

/// The DHCP config of a network, checked completely, or None when the
/// network has no `--dhcp-range`. Nothing is created here.
pub fn plan(
    opts: &NetOpts,
    gateway: Option<&Cidr>,
    host_if: Option<&str>,
) -> Result<Option<DhcpConfig>> {
    if !wanted(opts) {
        return Ok(None);
    }
    let (Some(gw), Some(host_if)) = (gateway, host_if) else {
        bail!("DHCP needs a network with a gateway: add --mode host-only|routed --gateway ADDRESS/PREFIX");
    };
    let Some(range) = &opts.dhcp_range else {
        bail!("--dhcp-host, --domain and --dhcp-lease need --dhcp-range FIRST,LAST");
    };
    let range = config::parse_range(range).map_err(anyhow::Error::msg)?;
    config::validate_range(range, gw.addr, gw.prefix).map_err(anyhow::Error::msg)?;
    let mut cfg = DhcpConfig::new(host_if, gw.addr, gw.prefix, range);
    for h in &opts.dhcp_hosts {
        cfg.hosts
            .push(config::parse_host(h).map_err(anyhow::Error::msg)?);
    }
    cfg.domain = opts.domain.clone();
    cfg.mtu = opts.mtu;
    cfg.dns = !opts.no_dns;
    for h in &opts.dns_hosts {
        let mut it = h.split(',').map(str::trim);
        let ip = it
            .next()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .with_context(|| format!("DNS host '{h}': expected IP,NAME[,NAME...]"))?;
        for name in it {
            if !config::valid_domain(name) {
                bail!("DNS host '{h}': '{name}' is not a DNS name");
            }
            cfg.dns_hosts
                .push((name.trim_end_matches('.').to_ascii_lowercase(), ip));
        }
    }
    if !cfg.dns && !cfg.dns_hosts.is_empty() {
        bail!("DNS hosts need the DNS server, which is turned off");
    }
    if let Some(s) = opts.dhcp_lease {
        cfg.lease_time = Duration::from_secs(s);
    }
    cfg.validate().map_err(|e| {
        anyhow!(
            "{}",
            e.replace("lease time", "--dhcp-lease")
                .replace("interface name", "gateway interface name")
        )
    })?;
    Ok(Some(cfg))
}

impl Services {
    pub fn new(state_dir: PathBuf) -> Self {
        Services {
            state_dir,
            resolv_conf: PathBuf::from(RESOLV_CONF),
            rt: None,
            running: BTreeMap::new(),
            running6: BTreeMap::new(),
            names: BTreeMap::new(),
        }
    }

    fn net_dir(&self, net: &str) -> PathBuf {
        self.state_dir.join("dhcp").join(net)
    }

    /// Runs `f` to completion on the servers' runtime, from any context
    /// (a plain thread or inside another runtime's task).
    fn run<F>(&mut self, f: F) -> Result<F::Output>
    where
        F: Future + Send,
        F::Output: Send,
    {
        if self.rt.is_none() {
            self.rt = Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("kvnet-dhcp")
                    .enable_all()
                    .build()
                    .context("starting the DHCP/DNS runtime")?,
            );
        }
        let rt = self.rt.as_ref().expect("just set");
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(f))
                .join()
                .map_err(|_| anyhow!("the DHCP/DNS runtime panicked"))
        })
    }

    /// Starts DHCP on `cfg.iface` and DNS on the gateway address for `net`.
    pub fn start(&mut self, net: &str, cfg: DhcpConfig) -> Result<()> {
        if self.running.contains_key(net) {
            bail!("DHCP for network '{net}' is already running");
        }
        let dir = self.net_dir(net);
        let static_names = cfg.dns_hosts.clone();
        let dns_on = cfg.dns;
        let slots = self.names.entry(net.to_string()).or_default().clone();
        let dns_cfg = DnsConfig {
            net: net.to_string(),
            listen: cfg.server_ip.into(),
            iface: cfg.iface.clone(),
            domain: cfg.domain.clone(),
            upstream: Upstream::ResolvConf(self.resolv_conf.clone()),
        };
        let name = net.to_string();
        let servers = self.run(async move {
            let dhcp = DhcpServer::start(&name, cfg, &dir).await?;
            if !dns_on {
                return Ok(NetServers { dhcp, dns: None });
            }
            // Static names first: they win over a lease's of the same name.
            let leases = dhcp.dns_names();
            let own: Names = Arc::new(move || {
                let mut v = static_names.clone();
                v.extend(leases());
                v
            });
            fill_slot(&slots.v4, Some(own.clone()));
            let names: Names = Arc::new(move || {
                let mut v = own();
                v.extend(read_slot(&slots.v6));
                v
            });
            match DnsServer::start(dns_cfg, names).await {
                Ok(dns) => Ok(NetServers {
                    dhcp,
                    dns: Some(dns),
                }),
                Err(e) => {
                    dhcp.stop().await;
                    Err(e)
                }
            }
        })??;
        self.running.insert(net.to_string(), servers);
        Ok(())
    }

    /// Starts `net`'s IPv6 servers: router advertisements, DHCPv6 and
    /// DNS on its first IPv6 gateway address.
    /// `binder` ties what DHCPv6 hands out to the client's port.
    pub fn start_v6(
        &mut self,
        net: &str,
        plan: V6Plan,
        binder: Option<crate::ipv6::savi::LeaseBinder>,
    ) -> Result<()> {
        if self.running6.contains_key(net) {
            bail!("IPv6 servers of network '{net}' are already running");
        }
        let slots = self.names.entry(net.to_string()).or_default().clone();
        let v4 = slots.v4.clone();
        let names: Names = Arc::new(move || read_slot(&v4));
        let upstream = Upstream::ResolvConf(self.resolv_conf.clone());
        let store = crate::ipv6::dhcp6::LeaseStore6 {
            path: self.net_dir(net).join(LEASE6_FILE),
            write: crate::dhcp::leases::write_atomic,
        };
        let (servers, own) =
            self.run(V6Servers::start(plan, names, upstream, binder, Some(store)))??;
        fill_slot(&slots.v6, Some(own));
        self.running6.insert(net.to_string(), servers);
        Ok(())
    }

    /// Stops `net`'s IPv6 servers, if any.
    pub fn stop_v6(&mut self, net: &str) {
        let Some(s) = self.running6.remove(net) else {
            return;
        };
        if let Some(slots) = self.names.get(net) {
            fill_slot(&slots.v6, None);
        }
        // (The timeout is made inside the runtime: made here, on a thread
        // without one such as the daemon's shutdown, it panics.)
        let stopped =
            self.run(async move { tokio::time::timeout(Duration::from_secs(5), s.stop()).await });
        if !matches!(stopped, Ok(Ok(()))) {
            log::warn!("IPv6 servers of network {net} did not stop in time");
        }
    }

    /// The DHCPv6 leases of `net` (None without IPv6 servers).
    pub fn leases6(&self, net: &str) -> Option<Vec<crate::ipv6::dhcp6::Lease6Info>> {
        self.running6.get(net).map(|s| s.leases())
    }

    /// Counters of `net`'s IPv6 servers (RA, DHCPv6, DNS).
    pub fn stats6(&self, net: &str) -> Option<serde_json::Value> {
        self.running6.get(net).map(|s| s.counters())
    }

    /// Stops `net`'s servers, if any (the lease file stays for next time).
    pub fn stop(&mut self, net: &str) {
        let Some(s) = self.running.remove(net) else {
            return;
        };
        if let Some(slots) = self.names.get(net) {
            fill_slot(&slots.v4, None);
        }
        let stopped = self.run(async move {
            let wait = async {
                if let Some(dns) = s.dns {
                    dns.stop().await;
                }
                s.dhcp.stop().await;
            };
            tokio::time::timeout(Duration::from_secs(5), wait).await
        });
        if !matches!(stopped, Ok(Ok(()))) {
            log::warn!("DHCP/DNS of network {net} did not stop in time");
        }
    }

    pub fn leases(&self, net: &str) -> Option<Vec<LeaseInfo>> {
        self.running.get(net).map(|s| s.dhcp.leases())
    }

    /// The counters of every network's servers, by network name.
    pub fn stats(&self) -> Vec<NetServiceStats> {
        self.running
            .iter()
            .map(|(net, s)| NetServiceStats {
                net: net.clone(),
                dhcp: serde_json::to_value(s.dhcp.counters()).unwrap_or_default(),
                dns: s
                    .dns
                    .as_ref()
                    .map(|d| serde_json::to_value(d.counters()).unwrap_or_default())
                    .unwrap_or_default(),
            })
            .collect()
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        let nets: Vec<String> = self.running.keys().cloned().collect();
        for n in nets {
            self.stop(&n);
        }
        let nets: Vec<String> = self.running6.keys().cloned().collect();
        for n in nets {
            self.stop_v6(&n);
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `kvnet dhcp leases` as a table.
#[allow(clippy::ptr_arg)]
pub fn lease_table(rows: &Vec<LeaseInfo>) -> Vec<Vec<String>> {
    let mut t = vec![["MAC", "IP", "HOSTNAME", "EXPIRES"]
        .map(String::from)
        .to_vec()];
    for x in rows {
        t.push(vec![
            x.mac.to_string(),
            x.ip.to_string(),
            x.hostname.clone().unwrap_or_else(|| "-".into()),
            chrono_free_utc(x.expires_unix),
        ]);
    }
    t
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a Unix time (civil-from-days).
fn chrono_free_utc(t: u64) -> String {
    let (days, secs) = ((t / 86400) as i64, t % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(range: Option<&str>) -> NetOpts {
        NetOpts {
            dhcp_range: range.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn dhcp_plan_validates_before_anything_exists() {
        let gw: Cidr = "10.5.0.1/24".parse().unwrap();
        assert!(plan(&opts(None), Some(&gw), Some("kvnet-x"))
            .unwrap()
            .is_none());
        let c = plan(
            &opts(Some("10.5.0.10,10.5.0.20")),
            Some(&gw),
            Some("kvnet-x"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.iface, "kvnet-x");
        let e = plan(&opts(Some("10.5.0.10,10.5.0.20")), None, None).unwrap_err();
        assert!(
            e.to_string().contains("needs a network with a gateway"),
            "{e}"
        );
        for (r, why) in [
            ("10.5.0.0,10.5.0.9", "network address"),
            ("10.5.0.1,10.5.0.9", "gateway's own"),
            ("10.5.0.200,10.5.0.255", "broadcast"),
            ("10.6.0.2,10.6.0.9", "outside"),
            ("10.5.0.9", "FIRST,LAST"),
        ] {
            let e = plan(&opts(Some(r)), Some(&gw), Some("kvnet-x")).unwrap_err();
            assert!(e.to_string().contains(why), "{r}: {e}");
        }
        let mut o = opts(None);
        o.domain = Some("lab.test".into());
        let e = plan(&o, Some(&gw), Some("kvnet-x")).unwrap_err();
        assert!(e.to_string().contains("need --dhcp-range"), "{e}");
        let mut o = opts(Some("10.5.0.10,10.5.0.20"));
        o.dhcp_lease = Some(1);
        let e = plan(&o, Some(&gw), Some("kvnet-x")).unwrap_err();
        assert!(e.to_string().contains("--dhcp-lease"), "{e}");
        o.dhcp_lease = None;
        o.dhcp_hosts = vec!["52:54:00:00:00:01,10.9.0.5".into()];
        let e = plan(&o, Some(&gw), Some("kvnet-x")).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }

    #[test]
    fn dhcp_expiry_format() {
        assert_eq!(chrono_free_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(chrono_free_utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
