//! `kvnet daemon`: owns the datapath, serves the control socket, ages the
//! FDB and notices ports whose interface went away.

pub mod access;
pub mod ct_gc;
pub mod links;
pub mod metrics;
pub mod reconcile;
pub mod state;
pub mod status;
pub mod supervise;
pub mod teardown;
pub mod uplink_poll;
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{unix::OwnedWriteHalf, UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

use crate::{
    control::{Request, Response},
    datapath::Datapath,
    switch::Switch,
};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const BPFFS_ROOT: &str = "/sys/fs/bpf";

pub struct Options {
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub log_datapath: bool,
    /// DHCP leases live in `<state_dir>/dhcp/<NET>/`.
    pub state_dir: PathBuf,
    /// Conntrack capacity (entries).
    pub ct_max: u32,
    /// Config file to start from; None: none.
    pub config: Option<PathBuf>,
    /// The control socket's group: root and its members may do anything.
    pub socket_group: String,
    /// Its members may only send requests that change nothing.
    pub ro_group: String,
    /// Where Prometheus scrapes `/metrics`; None: not served.
    pub metrics: Option<std::net::SocketAddr>,
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// The pin folder must live on a bpffs; mount the standard one if absent.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    if parent != Path::new(BPFFS_ROOT) {
        bail!(
            "pin folder {} is not on a bpffs: {} is not a bpf filesystem (mount one with `mount -t bpf bpf {}`)",
            pin_dir.display(),
            parent.display(),
            parent.display()
        );
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS_ROOT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("bpffs is not mounted at {BPFFS_ROOT} and mounting it failed"))?;
    Ok(())
}

/// Whether a previous daemon left a running datapath to adopt: its
/// programs are pinned and its state files are there.
fn can_adopt(opts: &Options) -> bool {
    opts.pin_dir.join(kvnet_common::names::PROG_TC).exists()
        && crate::daemon::state::exists(&opts.state_dir)
}

/// Returns whether to adopt the running datapath.
fn preflight(opts: &Options) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "kvnet daemon must run as root: it loads eBPF programs and attaches them to interfaces"
        );
    }
    ensure_bpffs(&opts.pin_dir)?;
    if std::os::unix::net::UnixStream::connect(&opts.socket).is_ok() {
        bail!(
            "a kvnet daemon already answers on {}",
            opts.socket.display()
        );
    }
    // Nobody answers: the socket file is a stopped daemon's. Its pins are
    // a running datapath to adopt when its state files are there too, else
    // leftovers (and state files without pins are from before a reboot or
    // a `kvnet down`: the config file is what starts then).
    let _ = std::fs::remove_file(&opts.socket);
    // A daemon killed in the middle of a change: undo what it had begun,
    // so what follows starts from the last state it wrote down.
    for undone in crate::switch::journal::recover(&opts.state_dir, &opts.pin_dir)? {
        eprintln!("kvnet: a change in flight when the last daemon died: {undone}");
    }
    crate::switch::journal::enable(&opts.state_dir);
    let adopt = can_adopt(opts);
    if !adopt {
        if opts.pin_dir.exists() {
            std::fs::remove_dir_all(&opts.pin_dir)
                .with_context(|| format!("removing stale pins under {}", opts.pin_dir.display()))?;
        }
        crate::daemon::state::remove(&opts.state_dir);
    }
    if let Some(dir) = opts.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(adopt)
}

/// How `serve` ended.
enum Exit {
    /// SIGTERM/SIGINT: the datapath keeps forwarding; the next daemon adopts it.
    Stop,
    /// `kvnet down`: everything kvnet installed goes.
    Down,
}

pub fn run(opts: Options) -> Result<()> {
    let adopt = preflight(&opts)?;
    // Validated before anything is loaded: a bad file changes nothing.
    let cfg = opts
        .config
        .as_deref()
        .map(crate::config::load)
        .transpose()?;
    let dp = if adopt {
        Datapath::take_over(&opts.pin_dir, opts.log_datapath, Some(opts.ct_max))
            .context("taking over the running datapath")?
    } else {
        Datapath::load_with(&opts.pin_dir, opts.log_datapath, Some(opts.ct_max))?
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut sw = Switch::new(dp);
    sw.services = crate::dhcp::service::Services::new(opts.state_dir.clone());
    let switch = Arc::new(Mutex::new(sw));
    if adopt {
        let mut sw = switch.lock().expect("fresh lock");
        let upgrading = sw.dp.upgrading_from();
        let plan = crate::daemon::state::adopt(&mut sw, &opts.state_dir);
        let plan = match upgrading {
            None => plan?,
            Some(from) => {
                // An upgrade commits whole or not at all: any failure puts
                // the older datapath back as it was.
                let done = plan.and_then(|p| sw.dp.commit_upgrade().map(|_| p));
                match done {
                    Ok(p) => {
                        eprintln!(
                            "kvnet: upgraded the running datapath from layout {from} to layout {}",
                            kvnet_common::LAYOUT_VERSION
                        );
                        p
                    }
                    Err(e) => {
                        let left = sw.dp.rollback_upgrade();
                        for r in crate::daemon::state::added_host_settings(&sw, &opts.state_dir) {
                            r.undo();
                        }
                        let how = if left.is_empty() {
                            "rolled back: the older datapath forwards as before".to_string()
                        } else {
                            format!("rolled back except: {}", left.join("; "))
                        };
                        return Err(e.context(format!(
                            "upgrading the running datapath from layout {from} ({how}; the older kvnet can adopt it again)"
                        )));
                    }
                }
            }
        };
        if let Some(path) = &opts.config {
            crate::daemon::reconcile::with_rt(|rt| rt.source = Some(path.clone()));
            eprintln!(
                "kvnet: {} not applied: the running state was adopted (`kvnet apply` or SIGHUP applies it)",
                path.display()
            );
        }
        eprint!(
            "kvnet: adopted the running datapath under {} (state in {}):\n{}",
            opts.pin_dir.display(),
            opts.state_dir.display(),
            plan.render()
        );
    } else if let (Some(cfg), Some(path)) = (&cfg, &opts.config) {
        let mut sw = switch.lock().expect("fresh lock");
        let plan = crate::daemon::reconcile::apply(&mut sw, cfg, false);
        match plan {
            Ok(plan) => {
                crate::daemon::reconcile::RUNTIME
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Default::default)
                    .source = Some(path.clone());
                for w in &plan.warnings {
                    eprintln!("kvnet: warning: {w}");
                }
                eprint!("kvnet: applied {}:\n{}", path.display(), plan.render());
            }
            Err(e) => {
                sw.shutdown();
                return Err(e.context(format!("applying {}", path.display())));
            }
        }
    }
    crate::daemon::state::enable(&opts.state_dir);
    if let Ok(mut sw) = switch.lock() {
        crate::daemon::state::persist(&sw);
        // From here on, an exit that is not `kvnet down` (a stop, a
        // crash) leaves the datapath forwarding.
        sw.dp.keep_on_exit = true;
    }
    crate::daemon::supervise::crash_on_panic();
    let result = rt.block_on(serve(&opts, switch.clone()));
    if let Ok(mut sw) = switch.lock() {
        match result {
            Ok(Exit::Down) => {
                crate::daemon::state::disable();
                sw.shutdown();
                sw.dp.keep_on_exit = false;
                crate::daemon::state::remove(&opts.state_dir);
            }
            Ok(Exit::Stop) | Err(_) => {
                crate::daemon::state::persist(&sw);
                crate::daemon::state::disable();
                eprintln!(
                    "kvnet: stopped; the datapath keeps forwarding (state in {}); `kvnet down` removes it",
                    opts.state_dir.display()
                );
            }
        }
    }
    // The datapath (and its pins) goes with the last reference: stop the
    // tasks holding one, and give the netlink watcher a moment to let go.
    drop(rt);
    let mut switch = switch;
    for _ in 0..100 {
        match Arc::try_unwrap(switch) {
            Ok(sw) => {
                drop(sw);
                break;
            }
            Err(s) => {
                switch = s;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let _ = std::fs::remove_file(&opts.socket);
    result.map(|_| ())
}

async fn serve(opts: &Options, switch: Arc<Mutex<Switch>>) -> Result<Exit> {
    let policy = Arc::new(access::Policy::setup(&opts.socket_group, &opts.ro_group));
    let listener = UnixListener::bind(&opts.socket)
        .with_context(|| format!("listening on {}", opts.socket.display()))?;
    // Every connection's credentials are checked too; the mode keeps
    // strangers from even connecting.
    policy.secure_socket(&opts.socket)?;
    eprintln!(
        "kvnet daemon ready: control socket {} (group {}, read-only group {}), pins under {}",
        opts.socket.display(),
        opts.socket_group,
        opts.ro_group,
        opts.pin_dir.display()
    );
    if let Some(addr) = opts.metrics {
        crate::daemon::metrics::serve(addr, switch.clone()).await?;
    }
    crate::daemon::supervise::notify("READY=1");
    tokio::spawn(maintain(switch.clone()));
    crate::daemon::ct_gc::spawn(Arc::downgrade(&switch))?;
    crate::daemon::links::watch_links(switch.clone())?;
    crate::daemon::uplink_poll::start(switch.clone())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let exit = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.context("accepting a control connection")?;
                tokio::spawn(handle_client(stream, switch.clone(), policy.clone()));
            }
            _ = term.recv() => break Exit::Stop,
            _ = int.recv() => break Exit::Stop,
            _ = hup.recv() => {
                let switch = switch.clone();
                // Like a request: applied off the async workers.
                tokio::task::spawn_blocking(move || {
                    if let Ok(mut sw) = switch.lock() {
                        match crate::daemon::reconcile::reload(&mut sw) {
                            Ok(plan) => eprint!("kvnet: SIGHUP: reloaded:\n{}", plan.render()),
                            Err(e) => eprintln!("kvnet: SIGHUP: {e:#} (running state unchanged)"),
                        }
                        crate::daemon::state::persist(&sw);
                    }
                });
            }
            _ = crate::daemon::status::DOWN.notified() => {
                // Let the answer to `kvnet down` reach the client first.
                tokio::time::sleep(Duration::from_millis(200)).await;
                break Exit::Down;
            }
        }
    };
    eprintln!("kvnet daemon stopping");
    crate::daemon::supervise::notify("STOPPING=1");
    Ok(exit)
}

/// FDB ageing and conntrack GC run at most every second, and never take
/// more than 1/WALK_COST_FACTOR of the daemon's time.
const WALK_MIN_INTERVAL: Duration = Duration::from_secs(1);
const WALK_COST_FACTOR: u32 = 20;

/// Housekeeping: FDB ageing every second, vanished ports every 5 seconds
/// (link events are the fast way).
async fn maintain(switch: Arc<Mutex<Switch>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut state = Housekeeping {
        n: 0,
        next_walk: std::time::Instant::now(),
        watchdog: crate::daemon::supervise::Watchdog::from_env(),
        pinned: true,
    };
    loop {
        tick.tick().await;
        let sw = switch.clone();
        // Off the async workers: a walk of a million conntrack entries
        // blocks, and the workers must keep accepting and answering.
        let done = tokio::task::spawn_blocking(move || {
            let alive = state.tick(&sw);
            (state, alive)
        })
        .await;
        match done {
            Ok((s, true)) => state = s,
            _ => return,
        }
    }
}

struct Housekeeping {
    n: u64,
    next_walk: std::time::Instant,
    watchdog: Option<crate::daemon::supervise::Watchdog>,
    /// Whether the programs were pinned at the last tick.
    pinned: bool,
}

impl Housekeeping {
    /// One tick; false once the switch is gone.
    fn tick(&mut self, switch: &Mutex<Switch>) -> bool {
        self.n += 1;
        let Ok(mut sw) = switch.lock() else {
            return false;
        };
        // Pinged with the lock held: a request stuck holding it stops the
        // pings, and systemd restarts the daemon.
        if let Some(w) = self.watchdog.as_mut() {
            w.tick();
        }
        sw.flush_log();
        // The pins are what the next daemon adopts: say so when they go
        // (a bpffs unmounted under us), once, and when they come back.
        let pin_dir = sw.dp.pin_dir().to_path_buf();
        let now_pinned = pin_dir.join(kvnet_common::names::PROG_TC).exists();
        if self.pinned && !now_pinned {
            eprintln!(
                "kvnet: the pins under {} are gone (bpffs unmounted?): forwarding goes on, but a restart cannot adopt this datapath; `kvnet down` and a fresh start rebuild it",
                pin_dir.display()
            );
        } else if !self.pinned && now_pinned {
            eprintln!("kvnet: the pins under {} are back", pin_dir.display());
        }
        self.pinned = now_pinned;
        // Link events remove vanished and renamed ports at once; this scan
        // (a name lookup per port) only catches what they missed.
        if self.n.is_multiple_of(REAP_FALLBACK_TICKS) {
            let reaped = sw.reap_vanished_ports();
            for iface in &reaped {
                eprintln!("port {iface} vanished: removed");
            }
            if !reaped.is_empty() {
                crate::daemon::state::persist(&sw);
            }
        }
        // Table walks are paced by their own cost. (The conntrack table,
        // the one that grows to millions, has a thread of its own:
        // daemon/ct_gc.rs.)
        if self.n.is_multiple_of(2) && std::time::Instant::now() >= self.next_walk {
            let started = std::time::Instant::now();
            if let Err(e) = sw.age_fdb() {
                log::warn!("FDB ageing: {e:#}");
            }
            if let Err(e) = sw.sweep_bindings() {
                log::warn!("port security bindings: {e:#}");
            }
            if let Err(e) = sw.age_v6_owners() {
                log::warn!("IPv6 source bindings: {e:#}");
            }
            self.next_walk = std::time::Instant::now()
                + WALK_MIN_INTERVAL.max(started.elapsed() * WALK_COST_FACTOR);
        }
        // The netlink watcher follows uplink addresses as they change; this
        // slow re-read only backs it up should it ever stop.
        if self.n.is_multiple_of(UPLINK_FALLBACK_TICKS) {
            if let Err(e) = sw.nat_follow_uplinks() {
                log::warn!("following uplink addresses: {e:#}");
            }
        }
        true
    }
}

/// 30 s in 500 ms ticks.
const UPLINK_FALLBACK_TICKS: u64 = 60;
/// 5 s in 500 ms ticks.
const REAP_FALLBACK_TICKS: u64 = 10;

async fn handle_client(
    stream: UnixStream,
    switch: Arc<Mutex<Switch>>,
    policy: Arc<access::Policy>,
) {
    let peer = match access::Peer::of(&stream) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kvnet: control connection dropped: {e:#}");
            return;
        }
    };
    let allowed = policy.access(&peer);
    let (read, mut write) = stream.into_split();
    let Some(allowed) = allowed else {
        let why = policy.refusal(&peer);
        eprintln!(
            "kvnet: control connection from {} refused: {why}",
            peer.describe()
        );
        let _ = answer(&mut write, respond::<()>(Err(anyhow::anyhow!(why)))).await;
        return;
    };
    let mut reader = BufReader::new(read);
    loop {
        let line = match access::read_request(
            &mut reader,
            access::MAX_REQUEST,
            access::IDLE_TIMEOUT,
        )
        .await
        {
            Ok(access::Incoming::Line(line)) => line,
            Ok(access::Incoming::TooLong) => {
                let why = format!(
                    "request refused: longer than {} MiB without a newline (one JSON request per line); connection closed",
                    access::MAX_REQUEST >> 20
                );
                eprintln!("kvnet: control connection from {}: {why}", peer.describe());
                let _ = answer(&mut write, respond::<()>(Err(anyhow::anyhow!(why)))).await;
                return;
            }
            // Gone, silent for too long, or broken: nothing to answer.
            Ok(access::Incoming::Closed | access::Incoming::Idle) | Err(_) => return,
        };
        let resp = match serde_json::from_slice::<Request>(&line) {
            Ok(req) if allowed == access::Access::ReadOnly && !req.read_only() => {
                let why = policy.refusal_read_only(&peer, &req);
                eprintln!("kvnet: {} refused: {why}", peer.describe());
                respond::<()>(Err(anyhow::anyhow!(why)))
            }
            Ok(req) => {
                let (switch, root) = (switch.clone(), peer.uid == 0);
                // Requests block (netlink, map walks, DHCP servers joined):
                // off the async workers, which keep serving other clients.
                tokio::task::spawn_blocking(move || match switch.lock() {
                    Ok(mut sw) => {
                        let read_only = req.read_only();
                        let r = respond(dispatch(&mut sw, req, root));
                        // A read changed nothing to write down.
                        if !read_only {
                            crate::daemon::state::persist(&sw);
                        }
                        r
                    }
                    Err(_) => respond::<()>(Err(anyhow::anyhow!("daemon state is poisoned"))),
                })
                .await
                .unwrap_or_else(|e| respond::<()>(Err(anyhow::anyhow!("the request failed: {e}"))))
            }
            Err(e) => respond::<()>(Err(anyhow::anyhow!("malformed request: {e}"))),
        };
        if answer(&mut write, resp).await.is_err() {
            return;
        }
    }
}

/// Writes one response line; a client that stops reading is given up on
/// after the idle timeout.
async fn answer(write: &mut OwnedWriteHalf, resp: Response) -> Result<()> {
    let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
    out.push('\n');
    tokio::time::timeout(access::IDLE_TIMEOUT, write.write_all(out.as_bytes()))
        .await
        .context("the client did not read its answer")?
        .context("writing the answer")?;
    Ok(())
}

fn respond<T: Serialize>(r: Result<T>) -> Response {
    match r.and_then(|v| serde_json::to_value(v).map_err(Into::into)) {
        Ok(data) => Response {
            ok: true,
            error: None,
            data,
        },
        Err(e) => Response {
            ok: false,
            error: Some(format!("{e:#}")),
            data: serde_json::Value::Null,
        },
    }
}

/// Carries out a request. `root`: the client is uid 0. Others of the
/// kvnet group may change the switch, never make the root daemon write a
/// file of their choosing: no `save --force`, and a file they apply does
/// not become the daemon's file (where `save` and SIGHUP go).
fn dispatch(sw: &mut Switch, req: Request, root: bool) -> Result<serde_json::Value> {
    use serde_json::to_value as v;
    crate::daemon::supervise::panic_if_asked(&req);
    Ok(match req {
        Request::NetAdd {
            name,
            ageing_secs,
            opts,
        } => v(sw.net_add(&name, ageing_secs, &opts)?)?,
        Request::NetShow { name } => v(crate::daemon::status::net_show(sw, &name)?)?,
        Request::NetDump { name } => v(crate::daemon::reconcile::net_dump(sw, &name)?)?,
        Request::NetDel { name } => v(sw.net_del(&name)?)?,
        Request::NetList => v(sw.net_list())?,
        Request::NetSet {
            name,
            ageing_secs,
            nat_ports,
            nat_udp,
        } => {
            sw.net_set(&name, ageing_secs)?;
            if nat_ports.is_some() || nat_udp.is_some() {
                sw.net_set_nat(&name, nat_ports.as_deref(), nat_udp)?;
            }
            v(())?
        }
        Request::PortAdd {
            net,
            iface,
            hairpin,
            hook,
            vlan,
            trusted,
            security,
            policy,
        } => {
            // No VLAN given: the network's default (config `port_vlan`,
            // libvirt's network-wide `<vlan>`), as for config ports.
            let vlan = match vlan.is_empty() {
                true => crate::daemon::reconcile::with_rt(|rt| {
                    rt.applied.networks.get(&net).map(|n| n.port_vlan_args())
                })
                .unwrap_or(vlan),
                false => vlan,
            };
            v(sw.port_add(
                &net, &iface, hairpin, hook, &vlan, trusted, &security, &policy,
            )?)?
        }
        Request::PortShow { iface } => v(sw.port_show(&iface)?)?,
        Request::PortSet { iface, vlan } => v(sw.port_set(&iface, &vlan)?)?,
        Request::VlanShow { net } => v(sw.vlan_show(&net)?)?,
        Request::PortDel { iface } => v(sw.port_del(&iface)?)?,
        Request::PortList => v(sw.port_list())?,
        Request::FdbShow { net } => v(sw.fdb_show(&net)?)?,
        Request::FdbAdd {
            net,
            mac,
            port,
            vlan,
        } => v(sw.fdb_add(&net, &mac, &port, vlan.as_deref())?)?,
        Request::FdbDel { net, mac, vlan } => v(sw.fdb_del(&net, &mac, vlan.as_deref())?)?,
        Request::Stats => v(crate::control::StatsReport {
            ports: sw.stats()?,
            nat: sw.nat_stats()?,
            services: sw.services.stats(),
        })?,
        Request::ForwardAdd {
            net,
            proto,
            port,
            to,
        } => v(sw.forward_add(&net, &proto, port, &to)?)?,
        Request::ForwardDel { net, proto, port } => v(sw.forward_del(&net, &proto, port)?)?,
        Request::ForwardList { net } => v(sw.forward_list(&net)?)?,
        Request::ConntrackList { net } => v(sw.conntrack_list(&net)?)?,
        Request::ConntrackFlush { net } => v(sw.conntrack_flush(&net)?)?,
        Request::DhcpLeases { net } => v(sw.dhcp_leases(&net)?)?,
        Request::DhcpSet {
            net,
            range,
            domain,
            lease_secs,
            host_add,
            host_del,
        } => v(sw.dhcp_set(&net, range, domain, lease_secs, host_add, host_del)?)?,
        Request::Apply {
            path,
            text,
            dry_run,
        } => v(crate::daemon::reconcile::apply_text(
            sw,
            path.as_deref().map(Path::new),
            &text,
            dry_run,
            root,
        )?)?,
        Request::Save { path, force } => {
            if force && !root {
                anyhow::bail!(
                    "`save --force` writes any file as root: only root may force it; save into the config directory"
                );
            }
            v(crate::daemon::reconcile::save(
                sw,
                path.as_deref().map(Path::new),
                force,
            )?)?
        }
        Request::Ifup { iface, net, vlan } => v(crate::daemon::links::ifup(
            sw,
            &iface,
            net.as_deref(),
            vlan.as_deref(),
        )?)?,
        Request::Ifdown { iface } => v(crate::daemon::links::ifdown(sw, &iface)?)?,
        Request::Status => v(crate::daemon::status::status(sw)?)?,
        Request::Down => {
            crate::daemon::status::DOWN.notify_one();
            serde_json::Value::Null
        }
        Request::UplinkAdd { spec } => v(sw.uplink_add(&spec)?)?,
        Request::UplinkShow => v(sw.uplink_show())?,
        Request::UplinkDel { name } => v(sw.uplink_del(&name)?)?,
    })
}
