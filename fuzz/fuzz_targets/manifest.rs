//! Arbitrary bytes as a model manifest from a peer: an error, or chunks that
//! tile the file exactly and encode back to the same bytes.
#![no_main]

use fogmesh_protocols::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data);
        assert_eq!(m.chunks.last().map(|c| c.end()), Some(m.file_len));
        let _ = m.covering(0, m.file_len);
    }
});
