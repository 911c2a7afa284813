//! The stage-traffic codec for libp2p request-response: one protocol-crate
//! frame per request and per response, its header checked against [`Limits`]
//! before the payload is read, so a peer cannot make us allocate more than
//! `limits.max_frame` bytes per stream.

use std::io;

use fogmesh_protocols::{HEADER_LEN, Limits, Message, decode_payload, encode_message};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

/// Request-response codec carrying [`Message`]s in fogmesh frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageCodec {
    limits: Limits,
}

impl StageCodec {
    /// A codec applying `limits` to everything it reads and writes.
    pub fn new(limits: Limits) -> Self {
        StageCodec { limits }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// How long the payload of a frame may take to arrive once its header has
/// (a sender that stalls mid-frame is cut off; idle time between frames is
/// not bounded here).
pub const FRAME_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads one framed message from `io`. The payload is read as it arrives,
/// so memory grows with the bytes received (at most the frame's
/// limit-checked length), never with what a header merely claims; it must
/// arrive within [`FRAME_BODY_TIMEOUT`].
pub async fn read_framed<T: AsyncRead + Unpin + Send>(io: &mut T, limits: &Limits) -> io::Result<Message> {
    let mut header = [0u8; HEADER_LEN];
    io.read_exact(&mut header).await?;
    let h = fogmesh_protocols::FrameHeader::check(&header, limits)
        .map_err(invalid)?
        .ok_or_else(|| invalid("short frame header"))?;
    let len = h.frame_len();
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    buf.extend_from_slice(&header);
    let mut rest = (&mut *io).take((len - HEADER_LEN) as u64);
    match tokio::time::timeout(FRAME_BODY_TIMEOUT, rest.read_to_end(&mut buf)).await {
        Ok(r) => {
            r?;
        }
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "a frame's payload stalled")),
    }
    if buf.len() != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a frame"));
    }
    let (h, payload, _) = fogmesh_protocols::read_frame(&buf, limits)
        .map_err(invalid)?
        .ok_or_else(|| invalid("short frame"))?;
    decode_payload(h.kind, payload).map_err(invalid)
}

/// Writes `msg` to `io` as one frame and flushes.
pub async fn write_framed<T: AsyncWrite + Unpin + Send>(io: &mut T, msg: &Message, limits: &Limits) -> io::Result<()> {
    let mut buf = Vec::new();
    encode_message(msg, limits, &mut buf).map_err(invalid)?;
    io.write_all(&buf).await?;
    io.flush().await
}

#[async_trait::async_trait]
impl libp2p::request_response::Codec for StageCodec {
    type Protocol = StreamProtocol;
    type Request = Message;
    type Response = Message;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_framed(io, &self.limits).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_framed(io, &self.limits).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Message) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_framed(io, &req, &self.limits).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: Message) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_framed(io, &res, &self.limits).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fogmesh_protocols::{ErrorFrame, MessageKind, write_frame};

    fn sample() -> Message {
        Message::Error(ErrorFrame { request: 7, code: fogmesh_protocols::ErrorCode::Busy, message: "busy".into() })
    }

    #[tokio::test]
    async fn round_trip_and_limits() {
        {
            let limits = Limits::default();
            let mut wire = Vec::new();
            write_framed(&mut wire, &sample(), &limits).await.unwrap();
            let mut r = futures::io::Cursor::new(wire.clone());
            assert_eq!(read_framed(&mut r, &limits).await.unwrap(), sample());
            // A truncated frame is an I/O error, not a panic.
            for cut in [0, 5, HEADER_LEN, wire.len() - 1] {
                let mut r = futures::io::Cursor::new(wire[..cut].to_vec());
                assert!(read_framed(&mut r, &limits).await.is_err(), "cut {cut}");
            }
            // An oversized length is refused from the header alone.
            let small = Limits { max_frame: 8, max_decoded: 8 };
            let mut r = futures::io::Cursor::new(wire.clone());
            let e = read_framed(&mut r, &small).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            // Garbage and a valid frame with a garbage payload.
            let mut r = futures::io::Cursor::new(vec![0xAB; 64]);
            assert!(read_framed(&mut r, &limits).await.is_err());
            let mut bad = Vec::new();
            write_frame(MessageKind::Bid, b"not an archive", &limits, &mut bad).unwrap();
            let mut r = futures::io::Cursor::new(bad);
            assert!(read_framed(&mut r, &limits).await.is_err());
        }
    }
}
