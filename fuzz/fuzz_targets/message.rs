//! Arbitrary payloads under every message kind, past the CRC: rkyv validation
//! must refuse anything that is not a well-formed archive.
#![no_main]

use fogmesh_protocols::{MessageKind, decode_payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&k, payload)) = data.split_first() else { return };
    if let Some(kind) = MessageKind::from_u16(u16::from(k % 16)) {
        let _ = decode_payload(kind, payload);
    }
});
