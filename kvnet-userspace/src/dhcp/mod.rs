//! DHCPv4 for guests, as libvirt's dnsmasq gives it: one server per network
//! with a gateway, bound to the gateway interface only.
//!
//! [`DhcpServer::start`] spawns the server on the current tokio runtime;
//! [`DhcpHandle`] reads its leases and stops it. [`serve_standalone`] runs
//! DHCP and DNS in the foreground for `kvnet dhcp-serve` (tests, debugging).
pub mod config;
pub mod leases;
pub mod server;
pub mod service;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dhcproto::v4;
use tokio::sync::watch;

pub use config::{parse_cidr, parse_host, parse_range, DhcpConfig, StaticHost};
pub use leases::LeaseInfo;
pub use server::{Counters, CountersSnapshot};

use server::{now_unix, Core};

/// How often expired leases are reclaimed.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);

pub struct DhcpServer;

/// A running server. Dropping it leaves the server running until the
/// runtime ends; call [`DhcpHandle::stop`].
pub struct DhcpHandle {
    core: Arc<Mutex<Core>>,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

impl DhcpServer {
    /// Validate `cfg`, load the leases in `state_dir`, bind UDP port 67 on
    /// `cfg.iface` only and serve in a spawned task.
    pub async fn start(cfg: DhcpConfig, state_dir: &Path) -> Result<DhcpHandle> {
        cfg.validate()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("DHCP config for {}", cfg.iface))?;
        let db = leases::LeaseDb::open(&cfg, state_dir, now_unix())?;
        let sock = crate::netdev::bound_udp_socket(
            &cfg.iface,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, v4::SERVER_PORT),
        )
        .with_context(|| format!("DHCP server on {}", cfg.iface))?;
        log::info!(
            "dhcp {}: serving {}-{} ({} leases loaded)",
            cfg.iface,
            cfg.range.0,
            cfg.range.1,
            db.leases().len()
        );
        let core = Arc::new(Mutex::new(Core {
            cfg,
            db,
            limiter: Default::default(),
        }));
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(sock, core.clone(), counters.clone(), stopped));
        Ok(DhcpHandle {
            core,
            counters,
            stop,
            task,
        })
    }
}

async fn serve(
    sock: tokio::net::UdpSocket,
    core: Arc<Mutex<Core>>,
    counters: Arc<Counters>,
    mut stopped: watch::Receiver<bool>,
) {
    let iface = lock(&core).cfg.iface.clone();
    let mut buf = vec![0u8; 1500];
    let mut tick = tokio::time::interval(RECLAIM_EVERY);
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = tick.tick() => {
                if let Err(e) = lock(&core).db.reclaim(now_unix()) {
                    log::error!("dhcp {iface}: reclaiming expired leases: {e:#}");
                }
            }
            r = sock.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        log::warn!("dhcp {iface}: receive: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                counters.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let req = match server::decode_request(&buf[..n]) {
                    Ok(m) => m,
                    Err(why) => {
                        counters.malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        log::debug!("dhcp {iface}: dropped {n} bytes from {from}: {why}");
                        continue;
                    }
                };
                let reply = lock(&core).handle(&req, now_unix(), &counters);
                if let Some((m, dest)) = reply {
                    if let Err(e) = server::send_reply(&sock, &iface, &m, dest).await {
                        log::warn!("dhcp {iface}: {e:#}");
                    }
                }
            }
        }
    }
}

impl DhcpHandle {
    /// Bound leases (static hosts included once they asked), lowest
    /// address first. (For `kvnet dhcp leases NET`, wired by the daemon.)
    #[allow(dead_code)]
    pub fn leases(&self) -> Vec<LeaseInfo> {
        lock(&self.core).db.leases()
    }

    pub fn counters(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }

    /// Hostname-to-address pairs for DNS: static hosts with a name, then
    /// live leases with a hostname.
    pub fn names(&self) -> Arc<dyn Fn() -> Vec<(String, Ipv4Addr)> + Send + Sync> {
        let core = self.core.clone();
        Arc::new(move || {
            let c = lock(&core);
            let now = now_unix();
            let mut v: Vec<(String, Ipv4Addr)> = c
                .cfg
                .hosts
                .iter()
                .filter_map(|h| h.name.clone().map(|n| (n, h.ip)))
                .collect();
            for l in c.db.leases() {
                if let Some(h) = l.hostname {
                    if l.expires_unix > now && !v.iter().any(|(n, _)| *n == h) {
                        v.push((h, l.ip));
                    }
                }
            }
            v
        })
    }

    /// Stop serving (the lease file stays as it is).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Options of `kvnet dhcp-serve`.
pub struct Standalone {
    pub iface: String,
    pub server_ip: String,
    pub range: String,
    pub hosts: Vec<String>,
    pub domain: Option<String>,
    pub state_dir: PathBuf,
    pub lease_secs: u64,
    pub dns_upstream: Vec<SocketAddr>,
    pub no_dns: bool,
}

/// Run DHCP (and DNS on the gateway address) on `iface` until SIGTERM or
/// SIGINT.
pub fn serve_standalone(o: Standalone) -> Result<()> {
    let (server_ip, prefix) = parse_cidr(&o.server_ip).map_err(anyhow::Error::msg)?;
    let range = parse_range(&o.range).map_err(anyhow::Error::msg)?;
    let mut cfg = DhcpConfig::new(&o.iface, server_ip, prefix, range);
    for h in &o.hosts {
        cfg.hosts.push(parse_host(h).map_err(anyhow::Error::msg)?);
    }
    cfg.domain = o.domain.clone();
    cfg.lease_time = Duration::from_secs(o.lease_secs);
    if let Err(e) = cfg.validate() {
        bail!("{e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    rt.block_on(async move {
        let dhcp = DhcpServer::start(cfg, &o.state_dir).await?;
        let dns = if o.no_dns {
            None
        } else {
            let upstream = if o.dns_upstream.is_empty() {
                crate::dns::upstream_from_resolv_conf(Path::new("/etc/resolv.conf"))
            } else {
                o.dns_upstream.clone()
            };
            Some(
                crate::dns::DnsServer::start(
                    crate::dns::DnsConfig {
                        listen: server_ip,
                        iface: o.iface.clone(),
                        domain: o.domain.clone(),
                        upstream,
                    },
                    dhcp.names(),
                )
                .await?,
            )
        };
        // Tests wait for this line.
        println!("kvnet dhcp-serve: ready on {}", o.iface);
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let c = dhcp.counters();
        eprintln!(
            "kvnet dhcp-serve: stopping; counters {}",
            serde_json::to_string(&c)?
        );
        if let Some(d) = dns {
            eprintln!(
                "kvnet dhcp-serve: dns counters {}",
                serde_json::to_string(&d.counters())?
            );
            d.stop().await;
        }
        dhcp.stop().await;
        Ok(())
    })
}

/// `kvnet dhcp-leases --state-dir DIR [--json]`.
pub fn print_leases(state_dir: &Path, json: bool) -> Result<()> {
    let l = leases::read_leases(state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&l)?);
    } else {
        println!("{:<19} {:<15} {:<20} EXPIRES", "MAC", "IP", "HOSTNAME");
        for x in l {
            println!(
                "{:<19} {:<15} {:<20} {}",
                x.mac.to_string(),
                x.ip.to_string(),
                x.hostname.as_deref().unwrap_or("-"),
                x.expires_unix
            );
        }
    }
    Ok(())
}
