//! DHCP clients nobody here wrote (busybox udhcpc, ISC dhclient), run in a
//! guest's namespace with hook scripts that log each event as one line
//! `EVENT key=value ...` in a file of the lab's work folder.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::{GuestPort, Lab, Proc};

/// Writes an executable hook script to `path`.
fn write_script(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    let mut p = fs::metadata(path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    fs::set_permissions(path, p).unwrap();
}

/// Shell function of the client hooks: the interface gets the address,
/// then loses any other IPv4 one. Never flushed first: a renewal must not
/// leave the guest without its address for a moment. The hooks log an
/// event only once the address is set, so a test that saw it may use it.
const KEEP_ONLY: &str = "keep_only() {\n\
  ip addr replace \"$1\" dev \"$interface\"\n\
  for a in $(ip -4 -o addr show dev \"$interface\" | awk '{print $4}'); do\n\
    [ \"$a\" = \"$1\" ] || ip addr del \"$a\" dev \"$interface\"\n\
  done\n\
}\n";

/// A udhcpc hook that logs what it got (`bound ip=... serverid=...`) to the
/// events file and configures the address; returns (script, events file).
pub fn udhcpc_script(lab: &Lab, tag: &str) -> (PathBuf, PathBuf) {
    let script = lab.work_dir().join(format!("udhcpc-{tag}.sh"));
    let out = lab.work_dir().join(format!("udhcpc-{tag}.events"));
    write_script(
        &script,
        &format!(
            "#!/bin/sh\n\
             {KEEP_ONLY}\
             case \"$1\" in\n\
               deconfig) ip addr flush dev \"$interface\" ;;\n\
               bound|renew) keep_only \"$ip/$mask\" ;;\n\
             esac\n\
             echo \"$1 ip=$ip mask=$mask subnet=$subnet router=$router dns=$dns domain=$domain lease=$lease hostname=$hostname serverid=$serverid\" >> {out}\n\
             exit 0\n",
            out = out.display()
        ),
    );
    (script, out)
}

/// udhcpc once (`-q`) sending `hostname`, optionally asking for `want`
/// (`-r`, INIT-REBOOT style): Ok(the `bound` event line) or Err(its output
/// and events).
pub fn udhcpc_once(
    lab: &Lab,
    g: &GuestPort,
    tag: &str,
    hostname: &str,
    want: Option<&str>,
) -> Result<String, String> {
    let (script, out) = udhcpc_script(lab, tag);
    let host = format!("hostname:{hostname}");
    let script = script.to_string_lossy().into_owned();
    let mut args = vec![
        "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "4", "-T", "1", "-A", "1", "-x",
        &host, "-s", &script,
    ];
    if let Some(ip) = want {
        args.extend_from_slice(&["-r", ip]);
    }
    let o = lab.exec_output(&g.ns, &args).unwrap();
    let events = fs::read_to_string(&out).unwrap_or_default();
    match events.lines().find(|l| l.starts_with("bound ")) {
        Some(l) if o.status.success() => Ok(l.to_string()),
        _ => Err(format!(
            "{}\n{}\n{events}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
    }
}

/// udhcpc in the foreground (renews; `-R`: releases on SIGTERM); returns
/// the process and its events file.
pub fn udhcpc_daemon(lab: &Lab, g: &GuestPort, tag: &str, hostname: &str) -> (Proc, PathBuf) {
    let (script, out) = udhcpc_script(lab, tag);
    let mut cmd = Command::new("busybox");
    cmd.args([
        "udhcpc", "-i", "eth0", "-f", "-R", "-t", "10", "-T", "1", "-A", "1",
    ])
    .args(["-x", &format!("hostname:{hostname}")])
    .arg("-s")
    .arg(&script)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    (lab.spawn(&g.ns, cmd).unwrap(), out)
}

/// dhclient in the foreground with a hook that logs each event
/// (`BOUND ip=...`, `RENEW ...`) and configures the address; returns the
/// process and its events file.
pub fn dhclient(lab: &Lab, g: &GuestPort, tag: &str) -> (Proc, PathBuf) {
    let dir = lab.work_dir();
    let script = dir.join(format!("dhclient-{tag}.sh"));
    let out = dir.join(format!("dhclient-{tag}.events"));
    write_script(
        &script,
        &format!(
            "#!/bin/sh\n\
             {KEEP_ONLY}\
             case \"$reason\" in\n\
               BOUND|RENEW|REBIND|REBOOT) keep_only \"$new_ip_address/24\" ;;\n\
             esac\n\
             echo \"$reason ip=$new_ip_address mask=$new_subnet_mask router=$new_routers dns=$new_domain_name_servers domain=$new_domain_name lease=$new_dhcp_lease_time\" >> {out}\n\
             exit 0\n",
            out = out.display()
        ),
    );
    spawn_dhclient(lab, g, "-4", &format!("dhclient-{tag}"), &script, out)
}

/// `dhclient -6` (stateful DHCPv6) in the foreground with a hook that
/// logs each event (`BOUND6 ip6=... dns=...`) and configures the address;
/// returns the process and its events file. The guest's link-local
/// address must be usable (DAD done) first.
pub fn dhclient6(lab: &Lab, g: &GuestPort, tag: &str) -> (Proc, PathBuf) {
    let dir = lab.work_dir();
    let script = dir.join(format!("dhclient6-{tag}.sh"));
    let out = dir.join(format!("dhclient6-{tag}.events"));
    write_script(
        &script,
        &format!(
            "#!/bin/sh\n\
             case \"$reason\" in\n\
               BOUND6|RENEW6|REBIND6|REBOOT6) ip -6 addr replace \"$new_ip6_address/64\" dev \"$interface\" nodad ;;\n\
             esac\n\
             echo \"$reason ip6=$new_ip6_address dns=$new_dhcp6_name_servers domain=$new_dhcp6_domain_search\" >> {out}\n\
             exit 0\n",
            out = out.display()
        ),
    );
    spawn_dhclient(lab, g, "-6", &format!("dhclient6-{tag}"), &script, out)
}

/// dhclient `family` (-4, -6) in the foreground on the guest's eth0 with
/// hook `script`; its lease, pid and log files are `NAME.*` in the lab's
/// work folder.
fn spawn_dhclient(
    lab: &Lab,
    g: &GuestPort,
    family: &str,
    name: &str,
    script: &Path,
    events: PathBuf,
) -> (Proc, PathBuf) {
    let dir = lab.work_dir();
    let mut cmd = Command::new("dhclient");
    cmd.args([family, "-d", "-v", "-sf"])
        .arg(script)
        .arg("-lf")
        .arg(dir.join(format!("{name}.leases")))
        .arg("-pf")
        .arg(dir.join(format!("{name}.pid")))
        .arg("eth0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join(format!("{name}.log"))).unwrap());
    (lab.spawn(&g.ns, cmd).unwrap(), events)
}

/// The value of `key=` in an event line ("" if absent).
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or("")
}

/// Waits until the events file holds `nth` lines starting with `event`
/// (panics after `t`); returns the whole file.
pub fn wait_events(path: &Path, event: &str, nth: usize, t: Duration) -> String {
    let end = Instant::now() + t;
    loop {
        let s = fs::read_to_string(path).unwrap_or_default();
        if s.lines().filter(|l| l.starts_with(event)).count() >= nth {
            return s;
        }
        assert!(
            Instant::now() < end,
            "{} has no {nth} x {event:?}:\n{s}",
            path.display()
        );
        sleep(Duration::from_millis(100));
    }
}

/// Waits for the first line starting with `event` (panics after `t`).
pub fn wait_first_event(path: &Path, event: &str, t: Duration) -> String {
    let s = wait_events(path, event, 1, t);
    s.lines()
        .find(|l| l.starts_with(event))
        .unwrap()
        .to_string()
}

/// A qemu guest's boot script: udhcpc (sending `hostname`) prints the lease
/// as `LEASE ip=... router=... dns=... domain=...`, then the address, a
/// ping of `gateway` (`PING-OK`) and a lookup of `hostname.domain` there.
pub fn vm_udhcpc_script(hostname: &str, gateway: &str, domain: &str) -> String {
    format!(
        "cat > /tmp/h.sh <<'EOS'\n\
         #!/bin/sh\n\
         [ \"$1\" = bound ] && echo \"LEASE ip=$ip router=$router dns=$dns domain=$domain\"\n\
         exit 0\n\
         EOS\n\
         chmod +x /tmp/h.sh\n\
         udhcpc -i eth0 -n -q -t 5 -T 1 -x hostname:{hostname} -s /tmp/h.sh\n\
         ip -4 -o addr show dev eth0\n\
         ping -c 1 -W 2 {gateway} && echo PING-OK\n\
         nslookup {hostname}.{domain} {gateway}\n"
    )
}
