//! Framing: every message on a fogmesh stream is one frame.
//!
//! ```text
//! offset size field
//!      0    4 magic "FGMS"
//!      4    2 protocol version (little endian)
//!      6    2 message kind
//!      8    4 payload length
//!     12    4 CRC-32 of the payload
//!     16    … payload
//! ```
//!
//! [`FrameHeader::check`] looks only at the 16 header bytes and refuses a bad
//! magic, version, kind or an oversized length before the caller reads or
//! allocates anything for the payload (as mini-redis checks before parsing).

use crate::error::{ProtocolError, Result};

/// Message kinds, as numbered in frame headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[allow(missing_docs)]
pub enum MessageKind {
    Capabilities = 1,
    LoadReport = 2,
    ShardAdvert = 3,
    CallForBids = 4,
    Bid = 5,
    Award = 6,
    StageRequest = 7,
    StageReply = 8,
    TokenResult = 9,
    SessionOpen = 10,
    SessionClose = 11,
    SessionCancel = 12,
    WeightChunkRequest = 13,
    WeightChunkReply = 14,
    Error = 15,
    Departure = 16,
    CapsWanted = 17,
}

impl MessageKind {
    /// Every kind, in number order.
    pub const ALL: [MessageKind; 17] = [
        MessageKind::Capabilities,
        MessageKind::LoadReport,
        MessageKind::ShardAdvert,
        MessageKind::CallForBids,
        MessageKind::Bid,
        MessageKind::Award,
        MessageKind::StageRequest,
        MessageKind::StageReply,
        MessageKind::TokenResult,
        MessageKind::SessionOpen,
        MessageKind::SessionClose,
        MessageKind::SessionCancel,
        MessageKind::WeightChunkRequest,
        MessageKind::WeightChunkReply,
        MessageKind::Error,
        MessageKind::Departure,
        MessageKind::CapsWanted,
    ];

    /// The kind numbered `v`, if any.
    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.get((v as usize).checked_sub(1)?).copied()
    }
}

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FGMS";
/// The protocol version this build speaks.
pub const VERSION: u16 = 5;
/// Size of the frame header.
pub const HEADER_LEN: usize = 16;

/// Size limits applied to everything received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted (bytes).
    pub max_frame: usize,
    /// Largest decoded activation (bytes of f32 values) or decompressed body.
    pub max_decoded: usize,
}

impl Default for Limits {
    /// 16 MiB frames; 64 MiB decoded (a 2048-token prefill of a 4096-wide
    /// model in f32 is 32 MiB).
    fn default() -> Self {
        Limits { max_frame: 16 << 20, max_decoded: 64 << 20 }
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The message kind.
    pub kind: MessageKind,
    /// Payload length in bytes.
    pub len: u32,
    /// CRC-32 of the payload.
    pub checksum: u32,
}

impl FrameHeader {
    /// Checks the header at the start of `buf`: `Ok(None)` while fewer than
    /// [`HEADER_LEN`] bytes are there; an error for a bad magic, an unknown
    /// version or kind, or a payload longer than `limits.max_frame`.
    pub fn check(buf: &[u8], limits: &Limits) -> Result<Option<FrameHeader>> {
        let Some(h) = buf.get(..HEADER_LEN) else { return Ok(None) };
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != VERSION {
            return Err(ProtocolError::UnsupportedVersion { got: version, supported: VERSION });
        }
        let kind = u16::from_le_bytes([h[6], h[7]]);
        let kind = MessageKind::from_u16(kind).ok_or(ProtocolError::UnknownKind(kind))?;
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if len as u64 > limits.max_frame as u64 {
            return Err(ProtocolError::FrameTooLarge { len: len.into(), max: limits.max_frame as u64 });
        }
        let checksum = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        Ok(Some(FrameHeader { kind, len, checksum }))
    }

    /// Total frame size (header and payload).
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }
}

/// Appends one frame holding `payload` to `out`.
pub fn write_frame(kind: MessageKind, payload: &[u8], limits: &Limits, out: &mut Vec<u8>) -> Result<()> {
    if payload.len() > limits.max_frame || payload.len() > u32::MAX as usize {
        return Err(ProtocolError::FrameTooLarge { len: payload.len() as u64, max: limits.max_frame as u64 });
    }
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Reads the frame at the start of `buf`: `Ok(None)` while it is incomplete,
/// else its header, its checksum-verified payload and the bytes it took.
pub fn read_frame<'a>(buf: &'a [u8], limits: &Limits) -> Result<Option<(FrameHeader, &'a [u8], usize)>> {
    let Some(h) = FrameHeader::check(buf, limits)? else { return Ok(None) };
    let Some(payload) = buf.get(HEADER_LEN..h.frame_len()) else { return Ok(None) };
    let actual = crc32fast::hash(payload);
    if actual != h.checksum {
        return Err(ProtocolError::Checksum { expected: h.checksum, actual });
    }
    Ok(Some((h, payload, h.frame_len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(MessageKind::Error, payload, &Limits::default(), &mut out).unwrap();
        out
    }

    #[test]
    fn incomplete_frames_ask_for_more() {
        let f = frame(b"hello");
        for cut in 0..f.len() {
            assert_eq!(read_frame(&f[..cut], &Limits::default()).unwrap(), None, "cut {cut}");
        }
        let (h, p, n) = read_frame(&f, &Limits::default()).unwrap().unwrap();
        assert_eq!((h.kind, p, n), (MessageKind::Error, &b"hello"[..], f.len()));
    }

    #[test]
    fn bad_headers_are_refused_before_the_payload_arrives() {
        let f = frame(b"hello");
        let l = Limits::default();
        let mut b = f.clone();
        b[0] = b'X';
        assert!(matches!(FrameHeader::check(&b[..HEADER_LEN], &l), Err(ProtocolError::BadMagic(_))));
        let mut b = f.clone();
        b[4] = 9;
        assert!(matches!(FrameHeader::check(&b[..HEADER_LEN], &l), Err(ProtocolError::UnsupportedVersion { got: 9, .. })));
        let mut b = f.clone();
        b[6..8].copy_from_slice(&999u16.to_le_bytes());
        assert_eq!(FrameHeader::check(&b[..HEADER_LEN], &l), Err(ProtocolError::UnknownKind(999)));
        let mut b = f.clone();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(FrameHeader::check(&b[..HEADER_LEN], &l), Err(ProtocolError::FrameTooLarge { .. })));
        let mut b = f.clone();
        *b.last_mut().unwrap() ^= 1;
        assert!(matches!(read_frame(&b, &l), Err(ProtocolError::Checksum { .. })));
        let small = Limits { max_frame: 4, ..l };
        assert!(read_frame(&f, &small).is_err());
        assert!(write_frame(MessageKind::Error, b"hello", &small, &mut Vec::new()).is_err());
    }

    proptest! {
        #[test]
        fn frames_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let f = frame(&payload);
            let (_, p, n) = read_frame(&f, &Limits::default()).unwrap().unwrap();
            prop_assert_eq!(p, &payload[..]);
            prop_assert_eq!(n, f.len());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = read_frame(&bytes, &Limits::default());
        }
    }
}
