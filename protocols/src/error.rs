//! The error type of every decoder in this crate.

/// Why bytes from a peer were refused (or a value could not be encoded).
///
/// Every variant is final for the frame it describes: nothing of it was acted
/// on, and the sender may be told the reason with an error frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The frame does not start with fogmesh's magic bytes.
    #[error("bad magic {0:02x?}: not a fogmesh frame")]
    BadMagic([u8; 4]),
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {got} (this peer speaks {supported})")]
    UnsupportedVersion {
        /// Version in the frame.
        got: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// The frame names a message kind this build does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// A frame's payload is longer than the configured limit.
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The payload's checksum does not match the header's.
    #[error("checksum mismatch: header says {expected:08x}, payload has {actual:08x}")]
    Checksum {
        /// From the header.
        expected: u32,
        /// Computed over the payload.
        actual: u32,
    },
    /// The bytes end before the structure they announce.
    #[error("truncated: {what} needs {need} bytes, {have} present")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// The payload is not a valid archive of the announced message.
    #[error("invalid message payload: {0}")]
    InvalidMessage(String),
    /// The header's kind and the payload's message disagree.
    #[error("frame kind {header} does not match its payload ({payload})")]
    KindMismatch {
        /// Kind in the header.
        header: u16,
        /// Kind of the decoded message.
        payload: u16,
    },
    /// An activation header or body is inconsistent.
    #[error("invalid activation: {0}")]
    InvalidActivation(String),
    /// Decompressed (or decoded) data would exceed the configured limit.
    #[error("decoded size of {len} bytes exceeds the limit of {max}")]
    TooLargeDecoded {
        /// Size the data would have.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// zstd failed to compress or decompress.
    #[error("zstd: {0}")]
    Zstd(String),
    /// A value could not be encoded (too large for the wire format).
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// The result type of this crate.
pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;
