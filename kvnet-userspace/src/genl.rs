//! Generic netlink, as kvnet asks the kernel about devices (`netdev`,
//! `ethtool`): a socket, one request and its answer, a family's id, and a
//! request type any family's attributes fit.
use std::marker::PhantomData;

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlFamily, GenlHeader, GenlMessage,
};
use netlink_packet_utils::{
    nla::{Nla, NlaBuffer, NlasIterator},
    DecodeError, Emitable, Parseable, ParseableParametrized,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

/// A generic netlink family, by name.
pub(crate) trait Family: std::fmt::Debug {
    const NAME: &'static str;
}

/// A request to family `F` (version 1) or its answer: a command and its
/// attributes `A`.
#[derive(Debug)]
pub(crate) struct Request<F, A> {
    pub cmd: u8,
    pub attrs: Vec<A>,
    family: PhantomData<F>,
}

impl<F, A> Request<F, A> {
    pub fn new(cmd: u8, attrs: Vec<A>) -> Self {
        Request {
            cmd,
            attrs,
            family: PhantomData,
        }
    }
}

impl<F: Family, A> GenlFamily for Request<F, A> {
    fn family_name() -> &'static str {
        F::NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        1
    }
}

impl<F, A: Nla> Emitable for Request<F, A> {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl<F, A> ParseableParametrized<[u8], GenlHeader> for Request<F, A>
where
    A: for<'a> Parseable<NlaBuffer<&'a [u8]>>,
{
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| A::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Request::new(header.cmd, attrs))
    }
}

/// A generic netlink socket, connected to the kernel.
fn socket() -> Result<Socket> {
    let mut s = Socket::new(NETLINK_GENERIC).context("generic netlink socket")?;
    s.bind_auto()
        .context("binding the generic netlink socket")?;
    s.connect(&SocketAddr::new(0, 0))
        .context("connecting the generic netlink socket")?;
    Ok(s)
}

/// Sends one request and returns the first answer's payload.
fn ask<F>(sock: &Socket, msg: GenlMessage<F>) -> Result<GenlMessage<F>>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
{
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = NLM_F_REQUEST;
    nl.finalize();
    let mut tx = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut tx);
    sock.send(&tx, 0)
        .context("sending a generic netlink request")?;
    // Room for ethtool's verbose feature sets (a few KiB); MSG_TRUNC makes
    // recv say when an answer was longer than that.
    let mut rx = vec![0u8; 65536];
    let n = sock
        .recv(&mut &mut rx[..], libc::MSG_TRUNC)
        .context("receiving a generic netlink answer")?;
    if n > rx.len() {
        bail!(
            "a generic netlink answer of {n} bytes, more than {}",
            rx.len()
        );
    }
    let answer = NetlinkMessage::<GenlMessage<F>>::deserialize(&rx[..n])
        .map_err(|e| anyhow!("an undecodable generic netlink answer: {e}"))?;
    match answer.payload {
        NetlinkPayload::InnerMessage(m) => Ok(m),
        NetlinkPayload::Error(e) => Err(std::io::Error::from(e.to_io()).into()),
        other => bail!("unexpected generic netlink answer {other:?}"),
    }
}

/// The id of generic netlink family `name`; None when the kernel lacks it
/// (`netdev` before 6.3, `ethtool` before 5.6 or without CONFIG_ETHTOOL_NETLINK).
fn family_id(sock: &Socket, name: &str) -> Result<Option<u16>> {
    let mut req = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.into())],
    });
    req.finalize();
    match ask(sock, req) {
        Ok(m) => Ok(m.payload.nlas.iter().find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })),
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error())
                == Some(libc::ENOENT) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.context(format!("looking up the {name} netlink family"))),
    }
}

/// Asks family `F` one command with `attrs`; the answer, or None when the
/// kernel lacks the family.
pub(crate) fn query<F, A>(cmd: u8, attrs: Vec<A>) -> Result<Option<Request<F, A>>>
where
    F: Family,
    A: Nla + std::fmt::Debug + for<'a> Parseable<NlaBuffer<&'a [u8]>>,
{
    let sock = socket()?;
    let Some(id) = family_id(&sock, F::NAME)? else {
        return Ok(None);
    };
    let mut req = GenlMessage::from_payload(Request::<F, A>::new(cmd, attrs));
    req.set_resolved_family_id(id);
    req.finalize();
    Ok(Some(ask(&sock, req)?.payload))
}

/// For the device-query tests: `f` in a private network namespace of its
/// own (a thread that unshares), given a shell that fails the test on any
/// error and returns stdout. Skipped without root.
#[cfg(test)]
pub(crate) fn in_private_netns(f: impl FnOnce(&dyn Fn(&str) -> String) + Send + 'static) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root for a private network namespace");
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let sh = |c: &str| {
            let out = std::process::Command::new("sh")
                .args(["-c", c])
                .output()
                .unwrap();
            assert!(out.status.success(), "{c}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        f(&sh)
    })
    .join()
    .unwrap();
}
