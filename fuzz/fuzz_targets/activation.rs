//! Arbitrary bytes as an encoded activation, under tight limits.
#![no_main]

use fogmesh_protocols::{ActivationCodec, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_frame: 1 << 16, max_decoded: 1 << 20 };
    let mut out = Vec::new();
    let _ = ActivationCodec::new().decode(data, &limits, &mut out);
});
