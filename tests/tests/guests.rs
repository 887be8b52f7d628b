//! Real qemu guests (virtio-net on a tap, the port type hypervisors use)
//! switched by kvnet with namespace guests, on each hook.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use kvnet_tests::{
    guest::{default_cache_dir, Image, Vm, VmSpec, READY},
    kvnet::Kvnet,
    lab::privileged,
    GuestPort, Lab,
};

const BLOB_KB: usize = 4096;

fn md5_of(g: &GuestPort, path: &str) -> String {
    let out = g.sh(&format!("md5sum {path}")).unwrap();
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The VM pings a namespace guest through kvnet, then both send each other
/// a few MB over TCP; contents must match on arrival.
fn vm_and_namespace_guest_exchange(hook: &str) {
    let image = Image::ensure(&default_cache_dir()).unwrap();
    let lab = Lab::new().unwrap();
    let g1 = lab.add_guest_with("p1", Some("10.8.0.1/24")).unwrap();
    let tap = lab.add_tap("tap0").unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "vms"]).unwrap();
    k.cli(&["port", "add", "vms", "p1", "--hook", hook])
        .unwrap();
    k.cli(&["port", "add", "vms", &tap, "--hook", hook])
        .unwrap();

    // Both sides serve a blob over HTTP (busybox httpd) and fetch the
    // other's with busybox wget: TCP both ways, through kvnet.
    let www = lab.work_dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    g1.sh(&format!(
        "head -c {} /dev/urandom > {}/to-vm.bin",
        BLOB_KB * 1024,
        www.display()
    ))
    .unwrap();
    let to_vm_md5 = md5_of(&g1, &format!("{}/to-vm.bin", www.display()));
    let mut httpd = Command::new("busybox");
    httpd
        .args(["httpd", "-f", "-p", "8081", "-h"])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(&g1.ns, httpd).unwrap();

    let script = format!(
        "ping -c 3 -W 3 10.8.0.1 || exit 11\n\
         mkdir -p /www && dd if=/dev/urandom of=/www/up.bin bs=1024 count={BLOB_KB} 2>/dev/null\n\
         echo UP-MD5 $(md5sum /www/up.bin)\n\
         httpd -p 8080 -h /www\n\
         wget -q -O /tmp/down http://10.8.0.1:8081/to-vm.bin || exit 12\n\
         echo DOWN-MD5 $(md5sum /tmp/down)\n\
         echo SERVING\n\
         i=0; while [ ! -e /tmp/fetched ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done\n"
    );
    let vm = Vm::boot(
        &lab,
        &image,
        VmSpec {
            tap: tap.clone(),
            mac: "52:54:00:8a:00:05".into(),
            ip: "10.8.0.5/24".into(),
            script,
            ..VmSpec::default()
        },
    )
    .unwrap();
    vm.wait_for(READY, Duration::from_secs(120)).unwrap();
    vm.wait_for("SERVING", Duration::from_secs(180)).unwrap();
    let from_vm = lab.work_dir().join("from-vm.bin");
    g1.exec(&[
        "busybox",
        "wget",
        "-q",
        "-O",
        &from_vm.display().to_string(),
        "http://10.8.0.5:8080/up.bin",
    ])
    .unwrap();
    let out = vm.script_output();
    let field = |tag: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(tag))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    };
    assert!(out.contains("3 packets received"), "{}", vm.console());
    let size = std::fs::metadata(&from_vm).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        size,
        (BLOB_KB * 1024) as u64,
        "VM -> namespace size (hook {hook})"
    );
    assert_eq!(
        md5_of(&g1, &from_vm.display().to_string()),
        field("UP-MD5 "),
        "VM -> namespace content (hook {hook})"
    );
    assert_eq!(
        field("DOWN-MD5 "),
        to_vm_md5,
        "namespace -> VM content (hook {hook})"
    );

    // kvnet's counters on the tap saw the guest's traffic (> 4 MB up).
    let t = k.port_stats(&tap).unwrap();
    assert!(
        t["rx_bytes"].as_u64().unwrap() > (BLOB_KB * 1024) as u64,
        "tap rx: {t}"
    );
    assert!(
        t["tx_bytes"].as_u64().unwrap() > (BLOB_KB * 1024) as u64,
        "tap tx: {t}"
    );
    if hook == "xdp" {
        assert!(
            t["xdp_seen"].as_u64().unwrap() > 0,
            "XDP saw the tap's frames: {t}"
        );
    }
    println!("hook {hook}: tap counters {t}");
}

#[test]
fn qemu_guest_on_a_tap_with_hook_tc() {
    if !privileged() {
        return;
    }
    vm_and_namespace_guest_exchange("tc");
}

#[test]
fn qemu_guest_on_a_tap_with_hook_xdp() {
    if !privileged() {
        return;
    }
    vm_and_namespace_guest_exchange("xdp");
}
