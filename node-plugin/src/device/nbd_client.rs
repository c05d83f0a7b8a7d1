//! A userspace NBD client for the daemon's NBD server: fixed-newstyle negotiation with
//! `NBD_OPT_GO`, then simple-reply transmission (read, write, flush, trim, disconnect).
//!
//! ```text
//!   client                                   server (qemu-storage-daemon)
//!     ◄──────── "NBDMAGIC" "IHAVEOPT" handshake flags
//!     ── client flags ─────────────────────►
//!     ── IHAVEOPT NBD_OPT_GO(name) ─────────►
//!     ◄──────── NBD_REP_INFO(export: size, transmission flags) ... NBD_REP_ACK
//!     ── request(magic, type, cookie, offset, length[, data]) ─►
//!     ◄──────── simple reply(magic, error, cookie[, data])
//! ```
//! The kernel NBD device gets the negotiated socket and the export's size and flags; a ublk
//! server forwards its I/O through [`Connection`].

use std::io::{Read, Write};
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: flush is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: trim is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;

/// Transmission flag: the FUA command flag is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: write-zeroes is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: end the session.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write-zeroes must not leave a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// What negotiation told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

fn protocol(what: impl Into<String>) -> Error {
    Error::Inconsistent(format!("NBD: {}", what.into()))
}

fn io(op: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(op, "NBD socket", e)
}

fn read_u64(stream: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_u32(stream: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Connects to the daemon's NBD server socket and negotiates export `name`, blocking (at most
/// `timeout` per read). On success the stream is in transmission phase. The one negotiation
/// both the kernel NBD backend and the ublk server use.
pub fn connect_blocking(
    socket: &Path,
    name: &str,
    timeout: std::time::Duration,
) -> Result<(std::os::unix::net::UnixStream, Export)> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| Error::io("connect", socket, e))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| Error::io("set timeout", socket, e))?;
    let export = negotiate(&mut stream, name)?;
    stream.set_read_timeout(None).map_err(|e| Error::io("set timeout", socket, e))?;
    Ok((stream, export))
}

/// Negotiates `name` on a connected blocking stream; on success the stream is in transmission
/// phase.
pub fn negotiate(stream: &mut (impl Read + Write), name: &str) -> Result<Export> {
    let greeting = io("read NBD greeting");
    let magic = read_u64(stream).map_err(&greeting)?;
    let opt_magic = read_u64(stream).map_err(&greeting)?;
    if magic != NBDMAGIC || opt_magic != IHAVEOPT {
        return Err(protocol("not a newstyle NBD server"));
    }
    let mut flags = [0u8; 2];
    stream.read_exact(&mut flags).map_err(&greeting)?;
    let server_flags = u16::from_be_bytes(flags);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("server does not speak fixed newstyle"));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));

    // Client flags, then NBD_OPT_GO: name length, name, no extra information requests.
    let mut data = Vec::with_capacity(name.len() + 6);
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&client_flags.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&data);
    stream.write_all(&out).map_err(io("write NBD_OPT_GO"))?;

    let reply = io("read NBD option reply");
    let mut export = None;
    loop {
        let magic = read_u64(stream).map_err(&reply)?;
        let opt = read_u32(stream).map_err(&reply)?;
        let kind = read_u32(stream).map_err(&reply)?;
        let len = read_u32(stream).map_err(&reply)? as usize;
        if magic != REPLY_MAGIC || opt != OPT_GO {
            return Err(protocol("malformed option reply"));
        }
        if len > 1 << 20 {
            return Err(protocol("option reply too long"));
        }
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).map_err(&reply)?;
        match kind {
            REP_ACK => break,
            REP_INFO
                if payload.len() >= 12
                    && u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT =>
            {
                let size = u64::from_be_bytes(
                    payload[2..10].try_into().map_err(|_| protocol("short info"))?,
                );
                let flags = u16::from_be_bytes([payload[10], payload[11]]);
                export = Some(Export { size, flags });
            }
            REP_INFO => {} // other information we did not ask for
            k if k & REP_ERR_BIT != 0 => {
                let message = String::from_utf8_lossy(&payload).into_owned();
                return Err(Error::NotFound {
                    what: "NBD export",
                    id: format!("{name} ({message})"),
                });
            }
            other => return Err(protocol(format!("unexpected option reply {other}"))),
        }
    }
    export.ok_or_else(|| protocol("server acknowledged NBD_OPT_GO without export information"))
}

/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const REPLY_LEN: usize = 16;

/// One transmission-phase request header.
pub fn encode_request(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&length.to_be_bytes());
    h
}

/// Splits a simple reply header into (errno, cookie).
pub fn decode_reply(h: &[u8; REPLY_LEN]) -> Result<(u32, u64)> {
    let word = |r: std::ops::Range<usize>| h[r].iter().fold(0u64, |a, b| a << 8 | u64::from(*b));
    if word(0..4) != u64::from(SIMPLE_REPLY_MAGIC) {
        return Err(protocol("bad reply magic (structured replies are not negotiated)"));
    }
    Ok((word(4..8) as u32, word(8..16)))
}

/// A negotiated connection in transmission phase, one request at a time.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    export: Export,
    cookie: u64,
}

impl Connection {
    /// Connects to the daemon's NBD server socket and negotiates export `name`.
    pub async fn open(socket: &Path, name: &str) -> Result<Connection> {
        let (socket, name) = (socket.to_owned(), name.to_owned());
        let (stream, export) = tokio::task::spawn_blocking(move || {
            connect_blocking(&socket, &name, std::time::Duration::from_secs(30))
        })
        .await
        .map_err(|e| Error::Inconsistent(format!("NBD negotiation task: {e}")))??;
        stream.set_nonblocking(true).map_err(io("set NBD socket non-blocking"))?;
        let stream = UnixStream::from_std(stream).map_err(io("register NBD socket"))?;
        Ok(Connection { stream, export, cookie: 0 })
    }

    /// The export's size and flags.
    pub fn export(&self) -> Export {
        self.export
    }

    /// The negotiated socket's descriptor, for handing to the kernel NBD client (which takes
    /// its own reference).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stream.as_raw_fd()
    }

    async fn request(&mut self, kind: u16, offset: u64, length: u32, data: &[u8]) -> Result<u64> {
        if kind != CMD_DISC && offset.saturating_add(u64::from(length)) > self.export.size {
            return Err(Error::invalid(
                "offset",
                format!("{offset}+{length} is past the export's {} bytes", self.export.size),
            ));
        }
        self.cookie += 1;
        let mut header = Vec::with_capacity(REQUEST_LEN + data.len());
        header.extend_from_slice(&encode_request(kind, 0, self.cookie, offset, length));
        header.extend_from_slice(data);
        self.stream.write_all(&header).await.map_err(io("write NBD request"))?;
        Ok(self.cookie)
    }

    async fn reply(&mut self, cookie: u64) -> Result<()> {
        let mut h = [0u8; REPLY_LEN];
        self.stream.read_exact(&mut h).await.map_err(io("read NBD reply"))?;
        let (error, got) = decode_reply(&h)?;
        if got != cookie {
            return Err(protocol("reply does not match the request"));
        }
        if error != 0 {
            return Err(Error::io(
                "NBD request",
                "NBD export",
                std::io::Error::from_raw_os_error(error as i32),
            ));
        }
        Ok(())
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>> {
        let cookie = self.request(CMD_READ, offset, length, &[]).await?;
        self.reply(cookie).await?;
        let mut data = vec![0u8; length as usize];
        self.stream.read_exact(&mut data).await.map_err(io("read NBD data"))?;
        Ok(data)
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let length =
            u32::try_from(data.len()).map_err(|_| Error::invalid("length", "over 4 GiB"))?;
        let cookie = self.request(CMD_WRITE, offset, length, data).await?;
        self.reply(cookie).await
    }

    /// Flushes written data to stable storage.
    pub async fn flush(&mut self) -> Result<()> {
        let cookie = self.request(CMD_FLUSH, 0, 0, &[]).await?;
        self.reply(cookie).await
    }

    /// Discards a range (reads back as zeroes on a qcow2 export).
    pub async fn trim(&mut self, offset: u64, length: u32) -> Result<()> {
        let cookie = self.request(CMD_TRIM, offset, length, &[]).await?;
        self.reply(cookie).await
    }

    /// Ends the session politely (the server sends no reply).
    pub async fn disconnect(mut self) -> Result<()> {
        self.request(CMD_DISC, 0, 0, &[]).await?;
        self.stream.shutdown().await.map_err(io("shut down NBD socket"))
    }
}
