//! `cargo xtask run` with no arguments: the showcase. Builds a throw-away
//! lab (namespaces only; the root namespace is never touched), runs kvnet in
//! it, shows every working capability once and tears everything down.
use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use kvnet_tests::{
    guest::{default_cache_dir, Image, Vm, VmSpec, READY},
    kvnet::Kvnet,
    GuestPort, Lab,
};

fn step(n: u32, title: &str) {
    println!("\n\x1b[1m== {n}. {title}\x1b[0m");
}

fn show(k: &Kvnet, args: &[&str]) -> Result<()> {
    println!("$ kvnet {}", args.join(" "));
    print!("{}", k.cli(args)?);
    Ok(())
}

fn ping(g: &GuestPort, ip: &str) -> bool {
    g.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", ip])
        .is_ok()
}

pub fn run(kvnet: &Path) -> Result<()> {
    std::env::set_var("KVNET_BIN", kvnet);
    step(
        1,
        "lab: a hypervisor namespace, 5 namespace guests, 1 tap for a real VM",
    );
    let lab = Lab::new()?;
    let blue: Vec<GuestPort> = [
        ("vnet0", "10.20.0.1/24"),
        ("vnet1", "10.20.0.2/24"),
        ("vnet2", "10.20.0.3/24"),
    ]
    .iter()
    .map(|(p, ip)| lab.add_guest_with(p, Some(ip)))
    .collect::<Result<_>>()?;
    // red uses the same subnet: only kvnet's isolation keeps them apart.
    let red: Vec<GuestPort> = [("vnet3", "10.20.0.11/24"), ("vnet4", "10.20.0.12/24")]
        .iter()
        .map(|(p, ip)| lab.add_guest_with(p, Some(ip)))
        .collect::<Result<_>>()?;
    let tap = lab.add_tap("tap0")?;
    println!(
        "hypervisor namespace {} (enter: nsenter --net=/var/run/netns/{})",
        lab.hv(),
        lab.hv()
    );

    step(2, "kvnet daemon in the hypervisor namespace");
    let k = Kvnet::start(&lab)?;
    println!(
        "control socket {}, pins under {}",
        k.socket().display(),
        lab.pin_dir().display()
    );
    k.cli(&["net", "add", "blue"])?;
    k.cli(&["net", "add", "red", "--ageing", "60"])?;
    k.cli(&["port", "add", "blue", "vnet0", "--hook", "xdp"])?;
    k.cli(&["port", "add", "blue", "vnet1", "--hook", "tc"])?;
    k.cli(&["port", "add", "blue", "vnet2"])?;
    k.cli(&["port", "add", "blue", &tap])?;
    k.cli(&["port", "add", "red", "vnet3"])?;
    k.cli(&["port", "add", "red", "vnet4"])?;
    show(&k, &["net", "list"])?;
    show(&k, &["port", "list"])?;

    step(
        3,
        "L2 switching in eBPF: blue guests reach each other, red stays apart",
    );
    for (from, to) in [(0, "10.20.0.2"), (1, "10.20.0.3"), (2, "10.20.0.1")] {
        println!(
            "blue guest {} -> {to}: {}",
            from + 1,
            if ping(&blue[from], to) {
                "ok"
            } else {
                "FAILED"
            }
        );
    }
    println!(
        "red guest 1 -> 10.20.0.12: {}",
        if ping(&red[0], "10.20.0.12") {
            "ok"
        } else {
            "FAILED"
        }
    );
    let leak = ping(&blue[0], "10.20.0.11");
    println!(
        "blue guest 1 -> red 10.20.0.11: {}",
        if leak {
            "REACHED (isolation broken!)"
        } else {
            "unreachable, as it must be"
        }
    );
    show(&k, &["fdb", "show", "blue"])?;

    step(4, "TCP bulk between two guests (iperf3, default offloads)");
    let mut srv = Command::new("iperf3");
    srv.args(["-s", "-1", "-B", "10.20.0.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(&blue[1].ns, srv)?;
    thread::sleep(Duration::from_millis(300));
    let out = blue[0].exec(&["iperf3", "-c", "10.20.0.2", "-t", "2", "-J"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    println!("vnet0 (xdp+tc) -> vnet1 (tc): {:.1} Gbit/s", bps / 1e9);

    step(
        5,
        "a real qemu guest (virtio-net on tap0) joins blue and pings vnet0",
    );
    match boot_vm(&lab, &tap) {
        Ok(out) => print!("{out}"),
        Err(e) => println!("(skipped: {e:#})"),
    }

    step(
        6,
        "live counters (per port, per CPU summed) while vnet2 pings vnet0",
    );
    let mut p = Command::new("ping");
    p.args(["-i", "0.05", "-c", "40", "10.20.0.1"])
        .stdout(Stdio::null());
    lab.spawn(&blue[2].ns, p)?;
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(700));
        show(&k, &["stats"])?;
    }

    step(
        7,
        "what an admin sees with bpftool in the hypervisor namespace",
    );
    println!("$ bpftool net show");
    print!("{}", lab.sh(lab.hv(), "bpftool net show")?);
    println!("$ ls {}", lab.pin_dir().display());
    print!(
        "{}",
        lab.sh(lab.hv(), &format!("ls {}", lab.pin_dir().display()))?
    );

    step(
        8,
        "teardown: daemon stops (detaches, unpins), lab namespaces deleted",
    );
    let status = k.stop()?;
    drop(lab);
    if !status.success() {
        bail!("kvnet daemon exited with {status}");
    }
    if leak {
        bail!("isolation between networks failed");
    }
    println!("done; nothing left behind.");
    Ok(())
}

fn boot_vm(lab: &Lab, tap: &str) -> Result<String> {
    println!("building/using the cached guest image (Debian kernel + busybox initramfs)...");
    let image = Image::ensure(&default_cache_dir())?;
    let script = "ping -c 3 -W 3 10.20.0.1\n".to_string();
    let vm = Vm::boot(
        lab,
        &image,
        VmSpec {
            tap: tap.to_string(),
            mac: "52:54:00:20:00:05".into(),
            ip: "10.20.0.5/24".into(),
            script,
            ..VmSpec::default()
        },
    )?;
    println!("booting (TCG; ~10 s)...");
    vm.wait_for(READY, Duration::from_secs(120))?;
    let rc = vm.wait_done(Duration::from_secs(120))?;
    let mut out = vm.script_output();
    out.push_str(&format!("guest script exit code {rc}\n"));
    Ok(out)
}
