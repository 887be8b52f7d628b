//! Who may use the control socket, and how much a client may send.
//!
//! The socket is `root:GROUP` mode 0660 (`--socket-group`, default
//! `kvnet`), with a POSIX ACL entry letting the read-only group
//! (`--ro-group`, default `kvnet-ro`) connect too. The file mode is only
//! the first gate: each accepted connection's peer credentials decide.
//! Root or a member of GROUP may send anything; a member of the read-only
//! group only requests that change nothing (`Request::read_only`); anyone
//! else gets one error line and the connection closes.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::{ffi::OsStrExt, fs::PermissionsExt},
    },
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt},
    net::UnixStream,
};

use crate::control::Request;

pub const DEFAULT_GROUP: &str = "kvnet";
pub const DEFAULT_RO_GROUP: &str = "kvnet-ro";

/// The longest request line: `kvnet apply` sends whole config files
/// inline, and no sane one comes near this; a client must not make the
/// daemon buffer without bound.
pub const MAX_REQUEST: usize = 8 << 20;

/// A client silent this long is gone or stuck: its task and buffer go.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a client may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Full,
    ReadOnly,
}

/// A connected client's credentials, from the kernel.
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// SO_PEERCRED (uid, gid, pid as of `connect`) and SO_PEERGROUPS.
    pub fn of(stream: &UnixStream) -> Result<Peer> {
        let cred = stream
            .peer_cred()
            .context("reading the client's credentials (SO_PEERCRED)")?;
        // Without them (a kernel before 4.13) only the primary group
        // counts: less access, never more.
        let groups = peer_groups(stream.as_raw_fd()).unwrap_or_else(|e| {
            log::warn!("reading a client's supplementary groups (SO_PEERGROUPS): {e}");
            Vec::new()
        });
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
        })
    }

    fn member(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// "uid N (pid P)" for the log.
    pub fn describe(&self) -> String {
        match self.pid {
            Some(p) => format!("uid {} (pid {p})", self.uid),
            None => format!("uid {}", self.uid),
        }
    }
}

/// The peer's supplementary groups (Linux >= 4.13).
fn peer_groups(fd: RawFd) -> io::Result<Vec<u32>> {
    let size = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * size) as libc::socklen_t;
        // SAFETY: the buffer holds `len` bytes; the kernel writes at most
        // that many and says how many it wrote (or needs) in `len`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size;
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // Too small a buffer: `len` says what the peer's groups need.
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// A group the socket is opened to; `gid` None: it could be neither found
/// nor created, so nobody gets access through it.
#[derive(Clone, Debug)]
pub struct Group {
    pub name: String,
    pub gid: Option<u32>,
}

/// Who may do what.
#[derive(Clone, Debug)]
pub struct Policy {
    pub full: Group,
    pub read_only: Group,
}

impl Policy {
    /// Looks both groups up, creating each one that is absent. A group
    /// that cannot be had is logged and left out: the socket stays closed
    /// to it rather than the daemon failing.
    pub fn setup(full: &str, read_only: &str) -> Policy {
        let group = |name: &str| {
            Group {
            name: name.to_string(),
            gid: ensure_group(name)
                .map_err(|e| {
                    eprintln!(
                        "kvnet: warning: group {name}: {e:#}; only root can use the control socket through it"
                    )
                })
                .ok(),
        }
        };
        Policy {
            full: group(full),
            read_only: group(read_only),
        }
    }

    /// None: the peer may not use the socket at all.
    pub fn access(&self, peer: &Peer) -> Option<Access> {
        let member = |g: &Group| g.gid.is_some_and(|gid| peer.member(gid));
        if peer.uid == 0 || member(&self.full) {
            Some(Access::Full)
        } else if member(&self.read_only) {
            Some(Access::ReadOnly)
        } else {
            None
        }
    }

    /// The one line a refused connection gets.
    pub fn refusal(&self, peer: &Peer) -> String {
        format!(
            "permission denied: uid {} is not root or in group {}/{}",
            peer.uid, self.full.name, self.read_only.name
        )
    }

    /// Why a read-only client's request was not carried out.
    pub fn refusal_read_only(&self, peer: &Peer, req: &Request) -> String {
        format!(
            "permission denied: {} changes the daemon, and uid {} is only in the read-only group {} (changes need root or group {}); nothing was changed",
            req.op(),
            peer.uid,
            self.read_only.name,
            self.full.name
        )
    }

    /// Makes the freshly bound socket `root:GROUP` 0660, plus an ACL entry
    /// for the read-only group.
    pub fn secure_socket(&self, path: &Path) -> Result<()> {
        // Without its group the socket is root's alone.
        let gid = self.full.gid.unwrap_or(0);
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .with_context(|| format!("making {} owned by root:{gid}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("making {} mode 0660", path.display()))?;
        if let Some(ro) = self.read_only.gid.filter(|ro| Some(*ro) != self.full.gid) {
            if let Err(e) = allow_group(path, ro) {
                eprintln!(
                    "kvnet: warning: the read-only group {} cannot reach {}: setting its ACL entry failed: {e} (does the filesystem support POSIX ACLs?)",
                    self.read_only.name,
                    path.display()
                );
            }
        }
        Ok(())
    }
}

/// Group names go to `groupadd` and into messages: keep them plain (and
/// never an option).
pub fn group_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!(
            "invalid group name '{name}': use 1-32 letters, digits, '-', '_' or '.', not starting with '-'"
        );
    }
    Ok(name.to_string())
}

fn lookup(name: &str) -> Result<Option<u32>> {
    let g =
        nix::unistd::Group::from_name(name).with_context(|| format!("looking up group {name}"))?;
    Ok(g.map(|g| g.gid.as_raw()))
}

/// The group's gid, after `groupadd --system` if it does not exist.
fn ensure_group(name: &str) -> Result<u32> {
    if let Some(gid) = lookup(name)? {
        return Ok(gid);
    }
    for attempt in 1..=5 {
        let out = Command::new("groupadd")
            .args(["--system", name])
            .output()
            .with_context(|| format!("running `groupadd --system {name}`"))?;
        if out.status.success() {
            let gid = lookup(name)?
                .with_context(|| format!("group {name} is missing right after groupadd"))?;
            eprintln!("kvnet: created group {name} (gid {gid}) for the control socket");
            return Ok(gid);
        }
        // Another daemon or an admin may have created it meanwhile.
        if let Some(gid) = lookup(name)? {
            return Ok(gid);
        }
        // 10: /etc/group is locked by someone else for now; try again.
        if out.status.code() != Some(10) {
            bail!(
                "`groupadd --system {name}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(100 * attempt));
    }
    bail!("`groupadd --system {name}`: /etc/group stayed locked")
}

/// Adds `group:GID:rw-` to the file's access ACL (what `setfacl -m` does):
/// connecting to a socket needs write permission on it.
fn allow_group(path: &Path, gid: u32) -> io::Result<()> {
    const VERSION: u32 = 2;
    const USER_OBJ: u16 = 0x01;
    const GROUP: u16 = 0x08;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const NONE: u32 = u32::MAX;
    const RW: u16 = 6;
    let mut acl = VERSION.to_le_bytes().to_vec();
    // Entries in the kernel's order (by tag); the mask bounds the group
    // entries, the file's 0660 stays what `ls -l` shows.
    for (tag, perm, id) in [
        (USER_OBJ, RW, NONE),
        (GROUP_OBJ, RW, NONE),
        (GROUP, RW, gid),
        (MASK, RW, NONE),
        (OTHER, 0, NONE),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: both strings are NUL-terminated, the value is `acl.len()` bytes.
    let r = unsafe {
        libc::setxattr(
            cpath.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What a client sent next.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// One request line, without its newline.
    Line(Vec<u8>),
    /// The client closed the connection.
    Closed,
    /// More than the limit without a newline: refused unread.
    TooLong,
    /// Nothing for the idle timeout.
    Idle,
}

/// Reads one request line, holding at most `max` bytes of it; each wait
/// for more bytes lasts at most `idle`.
pub async fn read_request<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    idle: Duration,
) -> io::Result<Incoming> {
    let mut line = Vec::new();
    loop {
        let buf = match tokio::time::timeout(idle, r.fill_buf()).await {
            Ok(buf) => buf?,
            Err(_) => return Ok(Incoming::Idle),
        };
        if buf.is_empty() {
            // A last line without its newline counts, as it always did.
            return Ok(if line.is_empty() {
                Incoming::Closed
            } else {
                Incoming::Line(line)
            });
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(buf.len());
        if line.len() + take > max {
            return Ok(Incoming::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(newline.is_some()));
        if newline.is_some() {
            return Ok(Incoming::Line(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, BufReader};

    fn policy() -> Policy {
        Policy {
            full: Group {
                name: "kvnet".into(),
                gid: Some(900),
            },
            read_only: Group {
                name: "kvnet-ro".into(),
                gid: Some(901),
            },
        }
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(1),
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn access_by_uid_and_groups() {
        let p = policy();
        assert_eq!(p.access(&peer(0, 0, &[])), Some(Access::Full));
        assert_eq!(p.access(&peer(1000, 900, &[])), Some(Access::Full));
        assert_eq!(p.access(&peer(1000, 1000, &[5, 900])), Some(Access::Full));
        // Both groups: the wider one wins.
        assert_eq!(p.access(&peer(1000, 901, &[900])), Some(Access::Full));
        assert_eq!(p.access(&peer(1000, 901, &[])), Some(Access::ReadOnly));
        assert_eq!(p.access(&peer(1000, 1000, &[901])), Some(Access::ReadOnly));
        assert_eq!(p.access(&peer(65534, 65534, &[])), None);
        assert_eq!(p.access(&peer(1000, 1000, &[5, 6])), None);
        // A group that could not be had grants nothing.
        let mut p = policy();
        p.full.gid = None;
        assert_eq!(p.access(&peer(1000, 900, &[])), None);
        assert_eq!(p.access(&peer(0, 0, &[])), Some(Access::Full));
        assert_eq!(
            policy().refusal(&peer(65534, 65534, &[])),
            "permission denied: uid 65534 is not root or in group kvnet/kvnet-ro"
        );
    }

    #[test]
    fn group_names_are_plain() {
        assert!(group_name("kvnet").is_ok());
        assert!(group_name("kvt-ro-p12x3").is_ok());
        for bad in ["", "-o", "a b", "a/b", "a:b", &"x".repeat(33)] {
            assert!(group_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, _b) = UnixStream::pair().unwrap();
            let p = Peer::of(&a).unwrap();
            assert_eq!(p.uid, nix::unistd::getuid().as_raw());
            assert_eq!(p.gid, nix::unistd::getgid().as_raw());
            assert_eq!(p.pid, Some(std::process::id() as i32));
            let mine: Vec<u32> = nix::unistd::getgroups()
                .unwrap()
                .iter()
                .map(|g| g.as_raw())
                .collect();
            let mut got = p.groups.clone();
            got.sort_unstable();
            let mut want = mine;
            want.sort_unstable();
            want.dedup();
            assert_eq!(got, want);
        });
    }

    async fn read_all(input: &[u8], max: usize) -> Vec<Incoming> {
        // A tiny buffer: lines arrive in many pieces.
        let mut r = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let i = read_request(&mut r, max, Duration::from_secs(5))
                .await
                .unwrap();
            let last = !matches!(i, Incoming::Line(_));
            out.push(i);
            if last {
                return out;
            }
        }
    }

    #[test]
    fn request_lines_are_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let line = |s: &str| Incoming::Line(s.as_bytes().to_vec());
            assert_eq!(
                read_all(b"{\"op\":\"stats\"}\n0123456789\nlast", 10).await,
                [
                    Incoming::TooLong, // 14 bytes > 10
                ]
            );
            assert_eq!(
                read_all(b"short\n0123456789\nlast", 10).await,
                [
                    line("short"),
                    line("0123456789"), // exactly the limit
                    line("last"),
                    Incoming::Closed
                ]
            );
            assert_eq!(
                read_all(b"ok\n01234567890\n", 10).await,
                [line("ok"), Incoming::TooLong]
            );
            assert_eq!(read_all(b"", 10).await, [Incoming::Closed]);
        });
    }

    #[test]
    fn a_silent_client_times_out() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(64);
            let (_rx, mut tx) = tokio::io::split(client);
            let mut r = BufReader::new(server);
            let idle = Duration::from_millis(200);
            // Positive control: a line in time is read.
            tx.write_all(b"{\"op\":\"stats\"}\n").await.unwrap();
            let got = read_request(&mut r, 100, idle).await.unwrap();
            assert_eq!(got, Incoming::Line(b"{\"op\":\"stats\"}".to_vec()));
            // Half a line, then silence.
            tx.write_all(b"{\"op\"").await.unwrap();
            let started = std::time::Instant::now();
            let got = read_request(&mut r, 100, idle).await.unwrap();
            assert_eq!(got, Incoming::Idle);
            assert!(started.elapsed() >= idle);
        });
    }
}
