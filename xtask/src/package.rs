//! `cargo xtask package`: the Debian package `target/package/kvnet_<version>_<arch>.deb`.
//!
//! The tree is staged by hand and built with `dpkg-deb --build`: dpkg is on
//! every Debian host, so packaging needs no extra tool (cargo-deb would be
//! one more `cargo install` in setup and CI). The version, completions and
//! man pages come from the built binary itself (`kvnet --version`, the
//! hidden `kvnet generate`), so they cannot disagree with it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{cmd, workspace_root};

/// Where the package installs the binary; the unit's ExecStart must name it.
pub const BIN: &str = "usr/bin/kvnet";
const UNIT: &str = "usr/lib/systemd/system/kvnet.service";
const DOC: &str = "usr/share/doc/kvnet";
const MAINTAINER: &str = "kvnet developers <kvnet@localhost>";
/// Besides the shared libraries: `groupadd`, which the daemon runs to
/// create its socket groups. Nothing else is run (links, routes, tc and
/// sysctls go through netlink and /proc).
const EXTRA_DEPENDS: &[&str] = &["passwd"];

/// A file of the package: where it goes (relative to /), where it comes
/// from, its mode.
#[derive(Debug)]
struct Item {
    dest: String,
    src: Source,
    mode: u32,
}

#[derive(Debug)]
enum Source {
    /// A file of the repository, as is.
    Repo(&'static str),
    /// A file generated into the build folder, as is.
    Generated(PathBuf),
    /// A generated man page, gzipped (Debian policy).
    Gzip(PathBuf),
    /// The binary, stripped of its symbol table (Debian policy; panics keep
    /// their messages, backtraces lose function names).
    Stripped(PathBuf),
    Text(String),
}

/// Everything the package installs except the man pages (one per
/// subcommand, found in `gen/man`).
fn files(kvnet: &Path, gen: &Path) -> Vec<Item> {
    let item = |dest: &str, src, mode| Item {
        dest: dest.to_string(),
        src,
        mode,
    };
    vec![
        item(BIN, Source::Stripped(kvnet.to_path_buf()), 0o755),
        item(UNIT, Source::Repo("contrib/kvnet.service"), 0o644),
        // qemu runs script=/downscript= by path, not from PATH.
        item(
            "usr/lib/kvnet/kvnet-ifup",
            Source::Repo("scripts/kvnet-ifup"),
            0o755,
        ),
        item(
            "usr/lib/kvnet/kvnet-ifdown",
            Source::Repo("scripts/kvnet-ifdown"),
            0o755,
        ),
        item(
            "usr/share/bash-completion/completions/kvnet",
            Source::Generated(gen.join("completions/kvnet.bash")),
            0o644,
        ),
        item(
            "usr/share/zsh/vendor-completions/_kvnet",
            Source::Generated(gen.join("completions/_kvnet")),
            0o644,
        ),
        item(
            "usr/share/fish/vendor_completions.d/kvnet.fish",
            Source::Generated(gen.join("completions/kvnet.fish")),
            0o644,
        ),
        // Uncompressed: the unit's Documentation= links to it.
        item(
            &format!("{DOC}/README.md"),
            Source::Repo("README.md"),
            0o644,
        ),
        // Not in /etc/kvnet: the daemon would start from it.
        item(
            &format!("{DOC}/examples/kvnet.toml"),
            Source::Repo("contrib/kvnet.toml"),
            0o644,
        ),
        item(
            &format!("{DOC}/copyright"),
            Source::Text(COPYRIGHT.to_string()),
            0o644,
        ),
    ]
}

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: kvnet

Files: *
Copyright: kvnet developers
License: MIT or Apache-2.0
 On Debian systems the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
";

/// systemd reads a new or changed unit only after a daemon-reload; the
/// service is neither enabled nor started (the admin's choice).
const POSTINST: &str = "\
#!/bin/sh
set -e
if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
";

/// Removal stops the daemon (an upgrade leaves it running: `systemctl
/// restart kvnet` switches to the new binary). Like any daemon stop, the
/// datapath keeps forwarding: `kvnet down` before removal takes it down.
const PRERM: &str = "\
#!/bin/sh
set -e
if [ \"$1\" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop kvnet.service || true
fi
if [ \"$1\" = remove ] && [ -d /sys/fs/bpf/kvnet ]; then
    echo 'kvnet: its datapath stays in the kernel; to remove it, run `kvnet down` before removing the package' >&2
fi
";

const POSTRM: &str = "\
#!/bin/sh
set -e
if { [ \"$1\" = remove ] || [ \"$1\" = purge ]; } && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
";

/// `cargo xtask package`: builds kvnet, then the package.
pub fn package() -> Result<PathBuf> {
    crate::setup::ensure(crate::setup::Mode::Quiet)?;
    let kvnet = crate::build::kvnet()?;
    let deb = build(&kvnet)?;
    println!("package: {}", deb.display());
    Ok(deb)
}

/// Builds the package of `kvnet` (a release binary under `<target>/release/`)
/// as `<target>/package/kvnet_<version>_<arch>.deb` and returns its path.
pub fn build(kvnet: &Path) -> Result<PathBuf> {
    let version = version_of(&cmd::stdout(Command::new(kvnet).arg("--version"))?)?;
    let arch = cmd::stdout(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let target = kvnet
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} is not under <target>/release/", kvnet.display()))?;
    let out = target.join("package");
    let name = format!("kvnet_{version}_{arch}");
    let stage = out.join(&name);
    let gen = out.join("generated");
    for d in [&stage, &gen] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    for what in ["completions", "man"] {
        let mut c = Command::new(kvnet);
        c.args(["generate", what, "--out"]).arg(gen.join(what));
        cmd::stdout(&mut c)?;
    }
    let mut items = files(kvnet, &gen);
    items.extend(man_pages(&gen.join("man"))?);
    for item in &items {
        install(&stage, item).with_context(|| format!("staging /{}", item.dest))?;
    }

    let debian = stage.join("DEBIAN");
    let objdump = cmd::stdout(Command::new("objdump").arg("-p").arg(kvnet))?;
    let control = control(&version, &arch, &depends(&objdump)?, installed_kib(&stage)?);
    write(&debian.join("control"), &control, 0o644)?;
    write(&debian.join("md5sums"), &md5sums(&stage, &items)?, 0o644)?;
    for (script, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        write(&debian.join(script), text, 0o755)?;
    }
    // Folders as created obey the umask; dpkg-deb wants 0755 ones.
    set_dir_modes(&stage)?;

    let deb = out.join(format!("{name}.deb"));
    let mut c = Command::new("dpkg-deb");
    // --root-owner-group: files owned by root whoever builds (no fakeroot).
    c.args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb);
    cmd::stdout(&mut c)?;
    Ok(deb)
}

/// "kvnet 0.1.0" -> "0.1.0", checked to be a valid Debian version.
fn version_of(line: &str) -> Result<String> {
    let v = line
        .trim()
        .strip_prefix("kvnet ")
        .with_context(|| format!("`kvnet --version` printed {line:?}, not `kvnet VERSION`"))?;
    let ok = v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~".contains(c));
    if !ok {
        bail!("version {v:?} is no Debian version (digits, letters, . + ~)");
    }
    // Cargo's pre-release `1.0.0-rc.1` would need `1.0.0~rc.1`: not done
    // until kvnet has one.
    Ok(v.to_string())
}

/// The generated man pages, gzipped into section 1.
fn man_pages(dir: &Path) -> Result<Vec<Item>> {
    let mut pages = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".1") {
            pages.push(Item {
                dest: format!("usr/share/man/man1/{name}.gz"),
                src: Source::Gzip(path.clone()),
                mode: 0o644,
            });
        }
    }
    if !pages.iter().any(|p| p.dest.ends_with("/kvnet.1.gz")) {
        bail!("`kvnet generate man` wrote no kvnet.1 in {}", dir.display());
    }
    pages.sort_by(|a, b| a.dest.cmp(&b.dest));
    Ok(pages)
}

fn install(stage: &Path, item: &Item) -> Result<()> {
    let dest = stage.join(&item.dest);
    let parent = dest.parent().context("a destination has a folder")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    match &item.src {
        Source::Repo(rel) => {
            let src = workspace_root().join(rel);
            fs::copy(&src, &dest).with_context(|| format!("copying {}", src.display()))?;
        }
        Source::Generated(src) => {
            fs::copy(src, &dest).with_context(|| format!("copying {}", src.display()))?;
        }
        Source::Gzip(src) => {
            let file = fs::File::create(&dest)?;
            // -n: no name or time stamp inside, so equal pages give equal bytes.
            let mut c = Command::new("gzip");
            c.args(["-9nc"]).arg(src).stdout(Stdio::from(file));
            cmd::run(&mut c)?;
        }
        Source::Stripped(src) => {
            let mut c = Command::new("strip");
            c.args(["--strip-unneeded", "--remove-section=.comment", "-o"])
                .arg(&dest)
                .arg(src);
            cmd::run(&mut c)?;
        }
        Source::Text(text) => fs::write(&dest, text)?,
    }
    fs::set_permissions(&dest, fs::Permissions::from_mode(item.mode))?;
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_dir_modes(&e.path())?;
        }
    }
    Ok(())
}

/// Installed-Size in KiB, counted as dpkg-gencontrol does: each file
/// rounded up, each folder one.
fn installed_kib(stage: &Path) -> Result<u64> {
    fn walk(dir: &Path, total: &mut u64) -> Result<()> {
        for e in fs::read_dir(dir)? {
            let e = e?;
            if e.file_name() == "DEBIAN" {
                continue;
            }
            let meta = e.metadata()?;
            if meta.is_dir() {
                *total += 1;
                walk(&e.path(), total)?;
            } else {
                *total += meta.len().div_ceil(1024);
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(stage, &mut total)?;
    Ok(total)
}

fn md5sums(stage: &Path, items: &[Item]) -> Result<String> {
    let mut c = Command::new("md5sum");
    c.current_dir(stage)
        .args(items.iter().map(|i| i.dest.as_str()));
    cmd::stdout(&mut c)
}

fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "\
Package: kvnet
Version: {version}
Architecture: {arch}
Maintainer: {MAINTAINER}
Installed-Size: {installed_kib}
Depends: {depends}
Suggests: qemu-system-x86
Section: net
Priority: optional
Description: eBPF/XDP virtual switch and NAT for KVM hosts
 kvnet switches, routes and NATs the traffic of virtual machines in eBPF
 programs (XDP and tc) managed by one daemon: networks in the models libvirt
 knows (isolated, host-only, routed, bridged, NAT) with VLANs, port
 security, DHCP and DNS, port forwards and Prometheus metrics.
 .
 This package has the kvnet daemon and command line, its systemd unit
 (not enabled), qemu ifup/ifdown scripts, shell completions and man pages.
"
    )
}

/// The Depends field from `objdump -p` of the binary: a package per shared
/// library it needs, versioned by the newest symbol version it uses (what
/// dpkg-shlibdeps would find, without needing a debian/ folder).
fn depends(objdump: &str) -> Result<String> {
    // (soname, package, symbol version prefix)
    const LIBS: &[(&str, &str, &str)] = &[
        ("libc.so.6", "libc6", "GLIBC_"),
        ("libm.so.6", "libc6", "GLIBC_"),
        ("ld-linux-x86-64.so.2", "libc6", "GLIBC_"),
        ("ld-linux-aarch64.so.1", "libc6", "GLIBC_"),
        ("libgcc_s.so.1", "libgcc-s1", "GCC_"),
    ];
    let mut needed: Vec<(&str, Option<Vec<u32>>)> = Vec::new();
    let mut from: Option<&str> = None;
    for line in objdump.lines() {
        let t = line.trim();
        if let Some(lib) = t.strip_prefix("NEEDED") {
            let lib = lib.trim();
            let Some(&(_, pkg, _)) = LIBS.iter().find(|(so, _, _)| *so == lib) else {
                bail!(
                    "kvnet needs {lib}: add the Debian package that has it to xtask/src/package.rs"
                );
            };
            if !needed.iter().any(|(p, _)| *p == pkg) {
                needed.push((pkg, None));
            }
        } else if let Some(lib) = t.strip_prefix("required from ") {
            from = Some(lib.trim_end_matches(':'));
        } else if let (Some(lib), Some(ver)) = (from, t.split_whitespace().nth(3)) {
            let Some(&(_, pkg, prefix)) = LIBS.iter().find(|(so, _, _)| *so == lib) else {
                continue;
            };
            let Some(v) = ver.strip_prefix(prefix) else {
                continue;
            };
            let v: Vec<u32> = v.split('.').map(|n| n.parse().unwrap_or(0)).collect();
            if let Some((_, best)) = needed.iter_mut().find(|(p, _)| *p == pkg) {
                if best.as_ref().is_none_or(|b| v > *b) {
                    *best = Some(v);
                }
            }
        } else if t.is_empty() || !t.starts_with("0x") {
            from = None;
        }
    }
    if !needed.iter().any(|(p, _)| *p == "libc6") {
        bail!("no libc.so.6 among the binary's NEEDED libraries: is this `objdump -p` of kvnet?");
    }
    needed.sort_by_key(|(pkg, _)| *pkg);
    let mut fields: Vec<String> = needed
        .into_iter()
        .map(|(pkg, v)| match v {
            // libgcc-s1's versions (12.2.0) are not GCC_ symbol versions.
            Some(v) if pkg == "libc6" => {
                let v: Vec<String> = v.iter().map(u32::to_string).collect();
                format!("{pkg} (>= {})", v.join("."))
            }
            _ => pkg.to_string(),
        })
        .collect();
    fields.extend(EXTRA_DEPENDS.iter().map(|s| s.to_string()));
    Ok(fields.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJDUMP: &str = "
Dynamic Section:
  NEEDED               libgcc_s.so.1
  NEEDED               libm.so.6
  NEEDED               libc.so.6
  NEEDED               ld-linux-x86-64.so.2
  FLAGS_1              0x0000000008000001

Version References:
  required from libgcc_s.so.1:
    0x0b792650 0x00 05 GCC_3.0
    0x09276060 0x00 26 GCC_4.2.0
  required from libm.so.6:
    0x06969189 0x00 12 GLIBC_2.29
  required from libc.so.6:
    0x09691a75 0x00 03 GLIBC_2.2.5
    0x069691b4 0x00 02 GLIBC_2.34
    0x06969194 0x00 04 GLIBC_2.14
  required from ld-linux-x86-64.so.2:
    0x0d696913 0x00 06 GLIBC_2.3
";

    #[test]
    fn depends_from_the_binarys_libraries() {
        // 2.34 > 2.29 > 2.14 > 2.3 > 2.2.5: compared as numbers, not text.
        assert_eq!(
            depends(OBJDUMP).unwrap(),
            "libc6 (>= 2.34), libgcc-s1, passwd"
        );
        let unknown = OBJDUMP.replace("libm.so.6\n  NEEDED", "libssl.so.3\n  NEEDED");
        let err = depends(&unknown).unwrap_err().to_string();
        assert!(err.contains("libssl.so.3"), "{err}");
        assert!(depends("not objdump output").is_err());
    }

    #[test]
    fn version_from_the_binary() {
        assert_eq!(version_of("kvnet 0.1.0\n").unwrap(), "0.1.0");
        assert!(version_of("kvnet-userspace 0.1.0").is_err());
        assert!(version_of("kvnet 1.0.0-rc.1").is_err());
        assert!(version_of("kvnet ").is_err());
    }

    /// The unit runs what the package installs, as systemd expects from the
    /// daemon (notify + watchdog), and links to what the package ships.
    #[test]
    fn unit_matches_the_package() {
        let unit = fs::read_to_string(workspace_root().join("contrib/kvnet.service")).unwrap();
        let value = |key: &str| {
            unit.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {key}= in the unit"))
        };
        assert_eq!(value("ExecStart"), format!("/{BIN} daemon"));
        assert_eq!(value("Type"), "notify");
        assert!(value("WatchdogSec").parse::<u32>().unwrap() > 0);
        let shipped = files(Path::new("kvnet"), Path::new("gen"));
        for doc in value("Documentation").split_whitespace() {
            let path = match (doc.strip_prefix("file:///"), doc.strip_prefix("man:")) {
                (Some(p), _) => p.to_string(),
                (_, Some(page)) => {
                    // man:kvnet(1): the generated top page, always there.
                    assert_eq!(page, "kvnet(1)");
                    continue;
                }
                _ => panic!("unexpected Documentation {doc}"),
            };
            assert!(
                shipped.iter().any(|i| i.dest == path),
                "{doc} is not shipped"
            );
        }
    }

    #[test]
    fn layout_sources_exist_and_destinations_are_unique() {
        let items = files(Path::new("kvnet"), Path::new("gen"));
        let mut dests: Vec<&str> = items.iter().map(|i| i.dest.as_str()).collect();
        dests.sort();
        dests.dedup();
        assert_eq!(dests.len(), items.len());
        for i in &items {
            assert!(
                !i.dest.starts_with('/') && !i.dest.starts_with("etc/"),
                "{}",
                i.dest
            );
            if let Source::Repo(rel) = i.src {
                assert!(workspace_root().join(rel).is_file(), "{rel} is missing");
            }
        }
    }

    #[test]
    fn maintainer_scripts_are_valid_sh() {
        for (name, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
            let out = Command::new("sh")
                .args(["-n", "-c", text])
                .output()
                .unwrap();
            assert!(out.status.success(), "{name}: {out:?}");
            assert!(text.starts_with("#!/bin/sh\nset -e\n"), "{name}");
            // Installing never starts the daemon.
            assert!(!text.contains("start"), "{name}");
        }
    }

    #[test]
    fn control_fields() {
        let c = control("0.1.0", "amd64", "libc6 (>= 2.34), passwd", 9000);
        for field in [
            "Package: kvnet\n",
            "Version: 0.1.0\n",
            "Architecture: amd64\n",
            "Installed-Size: 9000\n",
            "Depends: libc6 (>= 2.34), passwd\n",
        ] {
            assert!(c.contains(field), "{field}");
        }
        // Continuation lines start with a space; an empty one is " .".
        for l in c
            .lines()
            .skip_while(|l| !l.starts_with("Description:"))
            .skip(1)
        {
            assert!(l.starts_with(' ') && l.trim() != "", "{l:?}");
        }
    }
}
