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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dhcproto::v4;
use tokio::sync::{watch, Semaphore};

pub use config::{parse_cidr, parse_host, parse_range, DhcpConfig, StaticHost};
pub use leases::LeaseInfo;
pub use server::{Counters, CountersSnapshot};

use server::{now_unix, Core};

/// How often expired leases are reclaimed.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);
/// ACKs waiting for their lease to be on disk; past it, the serving loop
/// waits (so a flood cannot queue without bound).
const MAX_PENDING_ACKS: usize = 256;

pub struct DhcpServer;

/// A running server. Dropping it leaves the server running until the
/// runtime ends; call [`DhcpHandle::stop`].
pub struct DhcpHandle {
    core: Arc<Mutex<Core>>,
    counters: Arc<Counters>,
    restarts: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

fn bind_socket(iface: &str) -> Result<tokio::net::UdpSocket> {
    crate::netdev::bound_udp_socket(
        iface,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, v4::SERVER_PORT),
    )
    .with_context(|| format!("DHCP server on {iface}"))
}

impl DhcpServer {
    /// Validate `cfg`, load the leases in `state_dir`, bind UDP port 67 on
    /// `cfg.iface` only and serve network `net` in a supervised task.
    pub async fn start(net: &str, cfg: DhcpConfig, state_dir: &Path) -> Result<DhcpHandle> {
        cfg.validate()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("DHCP config for {}", cfg.iface))?;
        let db = leases::LeaseDb::open(&cfg, state_dir, now_unix())?;
        let sock = bind_socket(&cfg.iface)?;
        log::info!(
            "dhcp {}: serving {}-{} ({} leases loaded)",
            cfg.iface,
            cfg.range.0,
            cfg.range.1,
            db.leases().len()
        );
        let iface = cfg.iface.clone();
        let core = Arc::new(Mutex::new(Core {
            cfg,
            db,
            limiter: Default::default(),
        }));
        let counters = Arc::new(Counters::default());
        let restarts = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = watch::channel(false);
        let mut first = Some(sock);
        let (c, n, s) = (core.clone(), counters.clone(), stopped.clone());
        let task = tokio::spawn(crate::tasks::supervise(
            format!("dhcp of network {net} ({iface})"),
            "dhcp-serve",
            restarts.clone(),
            stopped,
            move |_| {
                let sock = first.take();
                let (core, counters, stopped, iface) =
                    (c.clone(), n.clone(), s.clone(), iface.clone());
                async move {
                    // The first run has the socket bound at start; a
                    // restart binds a fresh one.
                    let sock = match sock {
                        Some(s) => s,
                        None => bind_socket(&iface)?,
                    };
                    serve(sock, core, counters, stopped).await
                }
            },
        ));
        Ok(DhcpHandle {
            core,
            counters,
            restarts,
            stop,
            task,
        })
    }
}

/// Serves until `stopped`; an error when the socket fails.
async fn serve(
    sock: tokio::net::UdpSocket,
    core: Arc<Mutex<Core>>,
    counters: Arc<Counters>,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    let iface = lock(&core).cfg.iface.clone();
    let sock = Arc::new(sock);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_ACKS));
    let mut buf = vec![0u8; 1500];
    let mut tick = tokio::time::interval(RECLAIM_EVERY);
    loop {
        tokio::select! {
            _ = crate::tasks::stopped(&mut stopped) => return Ok(()),
            _ = tick.tick() => {
                if let Err(e) = lock(&core).db.reclaim(now_unix()) {
                    log::error!("dhcp {iface}: reclaiming expired leases: {e:#}");
                }
            }
            r = sock.recv_from(&mut buf) => {
                // A bound UDP socket fails only when something is wrong
                // with it: the supervisor binds a new one.
                let (n, from) = r.with_context(|| format!("receive on {iface}"))?;
                if crate::tasks::fail_once("dhcp-serve") {
                    bail!("KVNET_FAIL_ON=dhcp-serve: failing as asked");
                }
                counters.received.fetch_add(1, Ordering::Relaxed);
                let req = match server::decode_request(&buf[..n]) {
                    Ok(m) => m,
                    Err(why) => {
                        counters.malformed.fetch_add(1, Ordering::Relaxed);
                        log::debug!("dhcp {iface}: dropped {n} bytes from {from}: {why}");
                        continue;
                    }
                };
                let Some((m, dest, durable)) = lock(&core).handle_durable(&req, now_unix(), &counters) else {
                    continue;
                };
                let Some(ticket) = durable else {
                    if let Err(e) = server::send_reply(&sock, &iface, &m, dest).await {
                        log::warn!("dhcp {iface}: {e:#}");
                    }
                    continue;
                };
                // The ACK leaves once its lease is on disk; meanwhile the
                // next requests are served, and their leases share the
                // same write.
                let permit = pending.clone().acquire_owned().await.context("pending ACKs")?;
                let (sock, iface) = (sock.clone(), iface.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = ticket.durable().await {
                        // As before the writer: the client still gets its
                        // address; the writer tries again.
                        log::error!(
                            "dhcp {iface}: lease {} not on disk, ACK sent anyway: {e:#}",
                            m.yiaddr()
                        );
                    }
                    if let Err(e) = server::send_reply(&sock, &iface, &m, dest).await {
                        log::warn!("dhcp {iface}: {e:#}");
                    }
                });
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
        let mut c = self.counters.snapshot();
        (c.lease_writes, c.lease_write_failures) = lock(&self.core).db.write_counts();
        c.restarts = self.restarts.load(Ordering::Relaxed);
        c
    }

    /// [`Self::names`] as DNS takes them.
    pub fn dns_names(&self) -> crate::dns::Names {
        let names = self.names();
        Arc::new(move || {
            names()
                .into_iter()
                .map(|(n, ip)| (n, std::net::IpAddr::V4(ip)))
                .collect()
        })
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
        let dhcp = DhcpServer::start(&o.iface, cfg, &o.state_dir).await?;
        let dns = if o.no_dns {
            None
        } else {
            let upstream = if o.dns_upstream.is_empty() {
                crate::dns::Upstream::ResolvConf(PathBuf::from(service::RESOLV_CONF))
            } else {
                crate::dns::Upstream::Fixed(o.dns_upstream.clone())
            };
            Some(
                crate::dns::DnsServer::start(
                    crate::dns::DnsConfig {
                        net: o.iface.clone(),
                        listen: server_ip.into(),
                        iface: o.iface.clone(),
                        domain: o.domain.clone(),
                        upstream,
                    },
                    dhcp.dns_names(),
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
