//! Arbitrary text through the default model's tokenizer (or the GGUF's at
//! `$FOGMESH_FUZZ_MODEL`): `fogmesh_models::testing::tokenizer_properties`
//! (encoding never fails or panics, decoding gives the text back, text in
//! a chat message never becomes a control token).
#![no_main]

use std::sync::OnceLock;

use fogmesh_models::Tokenizer;
use fogmesh_models::gguf::Gguf;
use libfuzzer_sys::fuzz_target;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var_os("FOGMESH_FUZZ_MODEL").map_or_else(fogmesh_models::default_model_path, Into::into);
        let g = Gguf::open(&path).expect("a model whose tokenizer to fuzz (fogmesh fetch)");
        Tokenizer::from_gguf(&g).expect("its tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = fogmesh_models::testing::tokenizer_properties(tokenizer(), &text) {
        panic!("{e}");
    }
});
