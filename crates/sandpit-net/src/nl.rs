//! A blocking netlink socket, and the small attribute writer the nftables
//! and conntrack messages are built with (rtnetlink messages come typed
//! from `netlink-packet-route`; nothing maintained covers verdict maps,
//! interval and concatenated sets, and conntrack dumps without C bindings,
//! see `nft`).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// `NETLINK_ROUTE`: links, addresses, routes.
pub(crate) const ROUTE: i32 = libc::NETLINK_ROUTE;
/// `NETLINK_NETFILTER`: nftables and conntrack.
pub(crate) const NETFILTER: i32 = libc::NETLINK_NETFILTER;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const HDR: usize = 16;

/// What the kernel answered to a request: an errno and, when it said
/// more, its extended-ack message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlError {
    /// The (positive) errno.
    pub errno: i32,
    /// The kernel's own words (`NLMSGERR_ATTR_MSG`), when it gave any.
    pub message: Option<String>,
}

impl NlError {
    fn io(e: &io::Error) -> Self {
        Self {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: None,
        }
    }

    /// The errno as an `io::Error`.
    pub fn to_io(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_io())?;
        if let Some(m) = &self.message {
            write!(f, " ({m})")?;
        }
        Ok(())
    }
}

impl std::error::Error for NlError {}

/// One netlink socket, bound to the network namespace of the thread that
/// opened it for its whole life (whichever thread uses it later).
#[derive(Debug)]
pub(crate) struct Socket {
    fd: OwnedFd,
    seq: AtomicU32,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed along.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

impl Socket {
    /// A socket of `protocol` in the calling thread's network namespace.
    pub(crate) fn open(protocol: i32) -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right below.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        })?;
        // SAFETY: `fd` was just returned by socket(2) and is owned only here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid (pid 0: the kernel picks one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        // Dumps of a busy conntrack table arrive faster than we read them.
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 1 << 20)?;
        // The kernel's own words in errors, without our request echoed back.
        // Both are best effort: old kernels answer with the errno alone.
        let _ = setsockopt(&fd, libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        let _ = setsockopt(&fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        // A kernel that never answers must not hang a daemon thread.
        let tv = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: `tv` outlives the call and its size is passed along.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(Self {
            fd,
            seq: AtomicU32::new(1),
        })
    }

    /// A fresh sequence number.
    pub(crate) fn seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl addresses the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `bytes` and `to` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != bytes.len() {
            return Err(io::Error::other("short netlink send"));
        }
        Ok(())
    }

    fn recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(&buf[..n as usize]);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends `bytes` (one or more messages) and waits for the answers to
    /// the messages numbered `acks` (those sent with `NLM_F_ACK`); the
    /// first error among them is returned, once all have answered.
    pub(crate) fn transact(&self, bytes: &[u8], acks: &[u32]) -> Result<(), NlError> {
        self.transact_seq(bytes, acks).map_err(|(e, _)| e)
    }

    /// [`Socket::transact`], also saying which message failed.
    pub(crate) fn transact_seq(
        &self,
        bytes: &[u8],
        acks: &[u32],
    ) -> Result<(), (NlError, Option<u32>)> {
        self.send(bytes).map_err(|e| (NlError::io(&e), None))?;
        let mut pending: Vec<u32> = acks.to_vec();
        let mut first_err = None;
        let mut buf = vec![0u8; 64 * 1024];
        while !pending.is_empty() {
            let data = self.recv(&mut buf).map_err(|e| (NlError::io(&e), None))?;
            for (hdr, payload) in messages(data) {
                if hdr.ty != NLMSG_ERROR {
                    continue;
                }
                let (errno, message) = parse_error(hdr.flags, payload);
                if let Some(i) = pending.iter().position(|&s| s == hdr.seq) {
                    pending.swap_remove(i);
                } else if errno != 0 {
                    // An error for a message we did not ask about (an
                    // nftables batch refused as a whole): nothing else comes.
                    pending.clear();
                }
                if errno != 0 && first_err.is_none() {
                    first_err = Some((NlError { errno, message }, Some(hdr.seq)));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Sends one dump request (or a request with `NLM_F_ACK` that answers
    /// with messages, then the ack) and hands every answer's type and
    /// payload to `each` until the kernel says it is done.
    pub(crate) fn dump(
        &self,
        bytes: &[u8],
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<(), NlError> {
        self.send(bytes).map_err(|e| NlError::io(&e))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let data = self.recv(&mut buf).map_err(|e| NlError::io(&e))?;
            for (hdr, payload) in messages(data) {
                match hdr.ty {
                    NLMSG_DONE => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                            .unwrap_or(0);
                        return if code < 0 {
                            Err(NlError {
                                errno: -code,
                                message: None,
                            })
                        } else {
                            Ok(())
                        };
                    }
                    NLMSG_ERROR => {
                        // An error, or the ack closing a plain request's answers.
                        let (errno, message) = parse_error(hdr.flags, payload);
                        return if errno != 0 {
                            Err(NlError { errno, message })
                        } else {
                            Ok(())
                        };
                    }
                    ty => each(ty, payload),
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) ty: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
}

/// The messages in one datagram: header and payload of each.
pub(crate) fn messages(mut data: &[u8]) -> impl Iterator<Item = (Header, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < HDR {
            return None;
        }
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        if len < HDR || len > data.len() {
            return None;
        }
        let hdr = Header {
            ty: u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes")),
            flags: u16::from_ne_bytes(data[6..8].try_into().expect("2 bytes")),
            seq: u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes")),
        };
        let payload = &data[HDR..len];
        data = &data[align(len).min(data.len())..];
        Some((hdr, payload))
    })
}

/// The errno and the extended-ack message of an `NLMSG_ERROR` payload.
fn parse_error(flags: u16, payload: &[u8]) -> (i32, Option<String>) {
    let Some(code) = payload.get(..4) else {
        return (libc::EIO, None);
    };
    let errno = -i32::from_ne_bytes(code.try_into().expect("4 bytes"));
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 && payload.len() >= 4 + HDR {
        // With NETLINK_CAP_ACK only the request's header is echoed.
        let echoed = u32::from_ne_bytes(payload[4..8].try_into().expect("4 bytes")) as usize;
        let skip = if flags & 0x100 != 0 { HDR } else { echoed }; // NLM_F_CAPPED
        if let Some(tlvs) = payload.get(4 + align(skip)..) {
            for (ty, value) in attrs(tlvs) {
                if ty == 1 {
                    // NLMSGERR_ATTR_MSG
                    let text = value.split(|&b| b == 0).next().unwrap_or_default();
                    message = Some(String::from_utf8_lossy(text).into_owned());
                }
            }
        }
    }
    (errno, message)
}

pub(crate) fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `data`: type (without the nested/byte-order flags)
/// and value of each.
pub(crate) fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes(data[0..2].try_into().expect("2 bytes")) as usize;
        if len < 4 || len > data.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(data[2..4].try_into().expect("2 bytes")) & 0x3fff;
        let value = &data[4..len];
        data = &data[align(len).min(data.len())..];
        Some((ty, value))
    })
}

/// The value of the first attribute of type `ty` in `data`.
pub(crate) fn attr(data: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(data).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// Appends netlink messages and their attributes to one buffer (a batch
/// is one `sendto`).
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
    msg: usize,
    nests: Vec<usize>,
}

impl Writer {
    /// Starts a message; `fixed` is its fixed header (`nfgenmsg`, ...).
    pub(crate) fn begin(&mut self, ty: u16, flags: u16, seq: u32, fixed: &[u8]) {
        self.msg = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf
            .extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(fixed);
        self.pad();
    }

    /// Ends the message begun last.
    pub(crate) fn end(&mut self) {
        debug_assert!(self.nests.is_empty(), "unclosed nest");
        let len = (self.buf.len() - self.msg) as u32;
        self.buf[self.msg..self.msg + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Appends an already encoded message.
    pub(crate) fn raw(&mut self, msg: &[u8]) {
        self.buf.extend_from_slice(msg);
        self.pad();
    }

    fn pad(&mut self) {
        let n = align(self.buf.len()) - self.buf.len();
        self.buf.extend(std::iter::repeat_n(0, n));
    }

    pub(crate) fn attr(&mut self, ty: u16, value: &[u8]) {
        let len = (4 + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    /// A NUL-terminated string.
    pub(crate) fn str(&mut self, ty: u16, value: &str) {
        let mut v = Vec::with_capacity(value.len() + 1);
        v.extend_from_slice(value.as_bytes());
        v.push(0);
        self.attr(ty, &v);
    }

    /// A big-endian u32 (nftables and conntrack numbers).
    pub(crate) fn be32(&mut self, ty: u16, value: u32) {
        self.attr(ty, &value.to_be_bytes());
    }

    pub(crate) fn nest(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    pub(crate) fn end_nest(&mut self) {
        let start = self.nests.pop().expect("nest open");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_round_trip() {
        let mut w = Writer::default();
        w.begin(0x0a03, NLM_F_ACK, 7, &[2, 0, 0, 10]);
        w.str(1, "sandpit");
        w.nest(4);
        w.be32(1, 2);
        w.end_nest();
        w.end();
        w.begin(0x0a06, 0, 8, &[2, 0, 0, 0]);
        w.attr(3, &[1, 2, 3]);
        w.end();
        let msgs: Vec<_> = messages(&w.buf).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].0.ty, msgs[0].0.seq), (0x0a03, 7));
        assert_eq!(msgs[0].0.flags, NLM_F_ACK | NLM_F_REQUEST);
        let a: Vec<_> = attrs(&msgs[0].1[4..]).collect();
        assert_eq!(a[0], (1, &b"sandpit\0"[..]));
        assert_eq!(a[1].0, 4, "the nested flag is masked off");
        assert_eq!(attr(a[1].1, 1), Some(&2u32.to_be_bytes()[..]));
        assert_eq!(attr(&msgs[1].1[4..], 3), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn errors_carry_the_kernels_message() {
        // error -17, echoed header (capped), then NLMSGERR_ATTR_MSG.
        let mut p = (-17i32).to_ne_bytes().to_vec();
        p.extend_from_slice(&[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut w = Writer::default();
        w.attr(1, b"device exists\0");
        p.extend_from_slice(&w.buf);
        let (errno, msg) = parse_error(NLM_F_ACK_TLVS | 0x100, &p);
        assert_eq!(errno, 17);
        assert_eq!(msg.as_deref(), Some("device exists"));
        let e = NlError {
            errno,
            message: msg,
        };
        assert!(e.to_string().starts_with("File exists"), "{e}");
    }
}
