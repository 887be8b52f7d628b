//! A minimal "newc" cpio writer, the format the kernel unpacks as an
//! initramfs (so no cpio tool is needed on the host).

/// Builds one newc archive in memory.
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Self::new()
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    pub fn new() -> Cpio {
        Cpio {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn pad4(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let name = name.trim_start_matches('/');
        let ino = self.ino;
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so images are reproducible
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
        self
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), data);
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
        self
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | (perm & 0o7777), (major, minor), &[]);
        self
    }

    /// Append the trailer and pad to 512 bytes, so archives can be
    /// concatenated (the kernel unpacks them one after the other).
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    #[test]
    fn header_layout() {
        let mut c = Cpio::new();
        c.file("/script.sh", 0o755, b"echo hi\n");
        let a = c.finish();
        assert_eq!(a.len() % 512, 0);
        assert_eq!(&a[..6], b"070701");
        let field = |i: usize| {
            let s = std::str::from_utf8(&a[6 + i * 8..14 + i * 8]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        assert_eq!(field(1), 0o100755);
        assert_eq!(field(6), 8);
        assert_eq!(field(11), "script.sh".len() as u32 + 1);
        // 110-byte header + 10-byte name = 120, already aligned.
        assert_eq!(&a[110..120], b"script.sh\0");
        assert_eq!(&a[120..128], b"echo hi\n");
        assert_eq!(&a[128..134], b"070701");
    }

    /// Cross-check with busybox's cpio when the host has it.
    #[test]
    fn busybox_lists_it() {
        if !std::path::Path::new("/bin/busybox").exists() {
            return;
        }
        let mut c = Cpio::new();
        c.dir("bin")
            .file("bin/x", 0o644, b"abc")
            .symlink("bin/y", "x")
            .char_dev("console", 0o600, 5, 1);
        let a = c.finish();
        let mut child = Command::new("/bin/busybox")
            .args(["cpio", "-t"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&a).unwrap();
        let out = child.wait_with_output().unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            list.lines().collect::<Vec<_>>(),
            ["bin", "bin/x", "bin/y", "console"]
        );
    }
}
