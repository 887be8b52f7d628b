//! A real qemu guest on a lab tap pings the hypervisor namespace. Run as
//! root; the first run builds the cached guest image.
use std::time::{Duration, Instant};

use kvnet_tests::guest::{default_cache_dir, Image, Vm, VmSpec, READY};
use kvnet_tests::lab::privileged;
use kvnet_tests::{leftovers_of, Lab};

#[test]
fn qemu_guest_pings_hv() {
    if !privileged() {
        return;
    }
    let image = Image::ensure(&default_cache_dir()).unwrap();
    // The second call must hit the cache.
    let t = Instant::now();
    Image::ensure(&default_cache_dir()).unwrap();
    assert!(t.elapsed() < Duration::from_millis(200));

    let lab = Lab::new().unwrap();
    let tap = lab.add_tap("tap0").unwrap();
    lab.exec(
        lab.hv(),
        &["ip", "addr", "add", "10.9.1.254/24", "dev", &tap],
    )
    .unwrap();
    let vm = Vm::boot(
        &lab,
        &image,
        VmSpec {
            tap,
            ip: "10.9.1.5/24".into(),
            script: "ping -c 3 -W 2 10.9.1.254\n".into(),
            ..VmSpec::default()
        },
    )
    .unwrap();
    vm.wait_for(READY, Duration::from_secs(120)).unwrap();
    let rc = vm.wait_done(Duration::from_secs(120)).unwrap();
    let out = vm.script_output();
    assert_eq!(rc, 0, "script failed:\n{}", vm.console());
    assert!(out.contains("3 packets received"), "{out}");
    // The guest powers off after its script.
    assert!(vm.wait_exit(Duration::from_secs(30)).unwrap().is_some());
    // Waiting on a dead guest fails fast, with the console's tail.
    let err = vm
        .wait_for("NEVER-PRINTED", Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qemu exited") && err.contains("KVNET-DONE rc=0"),
        "{err}"
    );

    let suffix = lab.suffix().to_string();
    drop(vm);
    drop(lab);
    assert_eq!(leftovers_of(&suffix), Vec::<String>::new());
}

#[test]
fn qemu_guest_dhcp_and_lab_drop_kills_it() {
    if !privileged() {
        return;
    }
    let image = Image::ensure(&default_cache_dir()).unwrap();
    let lab = Lab::new().unwrap();
    let tap = lab.add_tap("tap1").unwrap();
    lab.exec(
        lab.hv(),
        &["ip", "addr", "add", "10.9.4.254/24", "dev", &tap],
    )
    .unwrap();
    // busybox udhcpd in the hv namespace serves the guest.
    let conf = lab.work_dir().join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.9.4.10\nend 10.9.4.20\ninterface {tap}\n\
             lease_file {}\noption subnet 255.255.255.0\n",
            lab.work_dir().join("leases").display()
        ),
    )
    .unwrap();
    let mut udhcpd = std::process::Command::new("busybox");
    udhcpd.arg("udhcpd").arg("-f").arg(&conf);
    lab.spawn(lab.hv(), udhcpd).unwrap();

    let vm = Vm::boot(
        &lab,
        &image,
        VmSpec {
            tap,
            mac: "52:54:00:00:04:05".into(),
            ip: "dhcp".into(),
            // Keeps running: the lab's drop has to kill qemu.
            script: "ip -4 -o addr show dev eth0\n\
                     ping -c 1 -W 2 10.9.4.254 && echo PING-OK\n\
                     sleep 600\n"
                .into(),
            ..VmSpec::default()
        },
    )
    .unwrap();
    let console = vm.wait_for("PING-OK", Duration::from_secs(120)).unwrap();
    assert!(console.contains("inet 10.9.4.1"), "{console}");

    let suffix = lab.suffix().to_string();
    drop(lab); // before the Vm: the lab alone must stop qemu
    assert_eq!(leftovers_of(&suffix), Vec::<String>::new());
    drop(vm);
}
