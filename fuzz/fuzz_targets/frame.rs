//! Arbitrary bytes as a stream of frames: header checks, CRC, then message
//! validation, frame after frame, as a peer's receive loop would.
#![no_main]

use fogmesh_protocols::{Limits, read_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_frame: 1 << 16, max_decoded: 1 << 20 };
    let mut rest = data;
    while let Ok(Some((_, n))) = read_message(rest, &limits) {
        rest = &rest[n..];
    }
});
