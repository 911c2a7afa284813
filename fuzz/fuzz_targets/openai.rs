//! Arbitrary bodies sent to the OpenAI-compatible endpoints (the first byte
//! picks chat or completions), checked against the default model (or the
//! GGUF at `$FOGMESH_FUZZ_MODEL`): every body is a plan or a 4xx, never a
//! panic, and every plan fits the context.
#![no_main]

use std::sync::{Arc, OnceLock};

use fogmesh_actors::ModelInfo;
use fogmesh_node::api::{Endpoint, check_openai};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static Arc<ModelInfo> {
    static M: OnceLock<Arc<ModelInfo>> = OnceLock::new();
    M.get_or_init(|| {
        let path = std::env::var_os("FOGMESH_FUZZ_MODEL").map_or_else(fogmesh_models::default_model_path, Into::into);
        Arc::new(ModelInfo::open(&path, [0; 32]).expect("a model to check requests against (fogmesh fetch)"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, body)) = data.split_first() else { return };
    let endpoint = if k % 2 == 0 { Endpoint::Chat } else { Endpoint::Completions };
    match check_openai(endpoint, body, |_| Ok(model().clone())) {
        Ok(p) => assert!(p.req.prompt.len() + p.req.max_tokens <= model().config.context),
        Err(r) => assert!(r.status().is_client_error(), "{}", r.status()),
    }
});
