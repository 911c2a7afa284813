//! Replays the fuzz corpora (and any crash artifacts) through the decoders on
//! stable Rust, so every input a fuzzer ever found stays an error, not a panic.
//! `--ignored write_gguf_seeds` regenerates the GGUF seed corpus.

mod common;

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use common::*;
use proptest::prelude::*;
use fogmesh::models::gguf::{Gguf, write_gguf};
use fogmesh::models::{LlamaConfig, Shard, ThreadPool, Tokenizer};
use fogmesh::protocols::{
    ActivationCodec, Award, Bid, CallForBids, Capabilities, Encoding, ErrorCode, ErrorFrame, Limits, NodeId, LoadReport, Message,
    MessageKind, SamplingSpec, SessionCancel, SessionClose, SessionOpen, ShardAdvert, ShardLoad, StageError, StageInput,
    StageOutcome, StageReply, StageRequest, TokenResult, WeightChunkReply, WeightChunkRequest, WireDType,
    decode_payload, encode_message, read_message,
};

/// The same work as `fuzz/fuzz_targets/gguf.rs`.
fn decode_gguf(data: &[u8]) -> bool {
    let Ok(g) = Gguf::parse(Cursor::new(data), data.len() as u64) else { return false };
    let _ = Tokenizer::from_gguf(&g);
    if let Ok(cfg) = LlamaConfig::from_gguf(&g) {
        let pool = Arc::new(ThreadPool::new(1));
        return Shard::load_from(&g, Cursor::new(data), 0..cfg.layers.min(2), pool).is_ok();
    }
    true
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect()
}

/// The same work as `fuzz/fuzz_targets/{frame,message,activation}.rs`.
fn decode_frames(data: &[u8]) -> usize {
    let limits = Limits { max_frame: 1 << 16, max_decoded: 1 << 20 };
    let (mut rest, mut n) = (data, 0);
    while let Ok(Some((_, used))) = read_message(rest, &limits) {
        rest = &rest[used..];
        n += 1;
    }
    n
}

fn decode_message(data: &[u8]) -> bool {
    let Some((&k, payload)) = data.split_first() else { return false };
    MessageKind::from_u16(u16::from(k % 16)).is_some_and(|kind| decode_payload(kind, payload).is_ok())
}

fn decode_activation(data: &[u8]) -> bool {
    let limits = Limits { max_frame: 1 << 16, max_decoded: 1 << 20 };
    ActivationCodec::new().decode(data, &limits, &mut Vec::new()).is_ok()
}

/// One message of every kind.
fn sample_messages() -> Vec<Message> {
    let peer = NodeId::from("12D3KooWexamplepeer");
    let model = [7u8; 32];
    vec![
        Message::Capabilities(Capabilities { peer: peer.clone(), cores: 4, memory_bytes: 8 << 30, gflops: 50.5, version: "0.1.0".into(), models: vec![model], partial: vec![fogmesh::protocols::HeldChunks { model, bitmap: vec![0b1011, 0xff] }], addrs: vec!["/ip4/10.0.0.2/tcp/4001".into()], joining: true }),
        Message::LoadReport(LoadReport {
            peer: peer.clone(),
            timestamp_ms: 1_700_000_000_000,
            shards: vec![ShardLoad { model, start: 0, end: 10, queue_depth: 2, tokens_per_s: 90.0 }],
        }),
        Message::ShardAdvert(ShardAdvert { peer: peer.clone(), model, start: 10, end: 20, cached: 0, bound: 0 }),
        Message::CallForBids(CallForBids { auction: 1, session: 2, model, start: 0, end: 10, tokens: 128, activation_bytes: 73728, deadline_ms: 50 }),
        Message::Bid(Bid { auction: 1, peer: peer.clone(), queue_ms: 3.0, service_ms: 40.0, transfer_ms: 1.5 }),
        Message::Award(Award { auction: 1, peer: peer.clone() }),
        Message::StageRequest(StageRequest { request: 9, session: 2, step: 0, stage: 0, position: 0, sample: false, input: StageInput::Tokens(vec![504, 3575, 282]) }),
        Message::StageRequest(StageRequest { request: 10, session: 2, step: 1, stage: 1, position: 3, sample: true, input: StageInput::Activation(vec![1, 2, 3]) }),
        Message::StageReply(StageReply { request: 9, outcome: StageOutcome::Activation(vec![4, 5, 6]) }),
        Message::StageReply(StageReply { request: 10, outcome: StageOutcome::Error(StageError { session: 2, peer: Some(peer.clone()), code: ErrorCode::Busy, reason: "busy".into() }) }),
        Message::TokenResult(TokenResult { session: 2, step: 1, token: 7042, logprob: -0.1 }),
        Message::SessionOpen(SessionOpen {
            session: 2,
            model,
            start: 0,
            end: 30,
            max_tokens: 512,
            owner: "12D3KooWexampleowner".into(),
            prev: Some(peer.clone()),
            next: None,
            sampling: SamplingSpec { temperature: 0.7, top_k: 40, top_p: 0.9, repetition_penalty: 1.1, repeat_last_n: 64, seed: 42 },
            history: vec![1, 2, 3],
            draws: 0,
        }),
        Message::SessionClose(SessionClose { session: 2 }),
        Message::SessionCancel(SessionCancel { session: 2, reason: "client went away".into() }),
        Message::WeightChunkRequest(WeightChunkRequest { model, chunk: 3 }),
        Message::WeightChunkRequest(WeightChunkRequest { model, chunk: fogmesh::protocols::MANIFEST_CHUNK }),
        Message::WeightChunkReply(WeightChunkReply { model, chunk: 3, data: vec![9; 64] }),
        Message::Error(ErrorFrame { request: 9, code: ErrorCode::Malformed, message: "malformed".into() }),
        Message::Departure(fogmesh::protocols::Departure { peer: peer.clone(), gone: peer.clone(), last_heard_ms: 1_700_000_000_000 }),
        Message::CapsWanted(fogmesh::protocols::CapsWanted { peer: peer.clone(), wanted: vec![peer.clone()] }),
    ]
}

#[test]
#[ignore = "writes the seed corpora"]
fn write_protocol_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for d in ["frame", "message", "activation", "manifest"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let m = sample_manifest();
    std::fs::write(root.join("manifest/three-chunks"), m.encode()).unwrap();
    let mut short = m.encode();
    short.truncate(short.len() - 5);
    std::fs::write(root.join("manifest/truncated"), short).unwrap();
    let limits = Limits::default();
    let mut stream = Vec::new();
    for (i, m) in sample_messages().iter().enumerate() {
        let mut frame = Vec::new();
        encode_message(m, &limits, &mut frame).unwrap();
        std::fs::write(root.join(format!("frame/{i:02}-{:?}", m.kind()).to_lowercase()), &frame).unwrap();
        let mut payload = vec![m.kind() as u8];
        payload.extend_from_slice(&frame[fogmesh::protocols::HEADER_LEN..]);
        std::fs::write(root.join(format!("message/{i:02}-{:?}", m.kind()).to_lowercase()), &payload).unwrap();
        stream.extend_from_slice(&frame);
    }
    std::fs::write(root.join("frame/stream-of-all"), &stream).unwrap();
    let x: Vec<f32> = (0..4 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
    for dtype in WireDType::ALL {
        for zstd in [None, Some(1)] {
            let enc = Encoding { dtype, zstd };
            let mut wire = Vec::new();
            ActivationCodec::new().encode(&x, 4, 64, enc, &mut wire).unwrap();
            std::fs::write(root.join(format!("activation/{}", enc.name())), &wire).unwrap();
        }
    }
}

#[test]
fn protocol_corpora_replay_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = |d: &str| {
        let mut f = files(&root.join("corpus").join(d));
        f.extend(files(&root.join("artifacts").join(d)));
        f
    };
    let frames = corpus("frame");
    assert!(frames.len() >= 15, "frame corpus missing");
    let decoded: usize = frames.iter().map(|f| decode_frames(&std::fs::read(f).unwrap())).sum();
    assert!(decoded >= 30, "valid seed frames must decode ({decoded} did)");
    let messages = corpus("message");
    assert!(messages.iter().filter(|f| decode_message(&std::fs::read(f).unwrap())).count() >= 15);
    let acts = corpus("activation");
    assert!(acts.iter().filter(|f| decode_activation(&std::fs::read(f).unwrap())).count() >= 10);
    let manifests = corpus("manifest");
    assert!(manifests.iter().filter(|f| decode_manifest(&std::fs::read(f).unwrap())).count() >= 1, "manifest corpus missing");
}

fn sample_manifest() -> fogmesh::protocols::Manifest {
    use fogmesh::protocols::{ChunkEntry, Manifest};
    let chunks = [(0, 100), (100, 4000), (4100, 4096)]
        .iter()
        .map(|&(offset, len)| ChunkEntry { offset, len, hash: [offset as u8; 32] })
        .collect();
    Manifest { model: [5; 32], file_len: 8196, header_chunks: 1, chunks }
}

/// The same work as `fuzz/fuzz_targets/manifest.rs`: a manifest that
/// decodes tiles its file and encodes back to the same bytes.
fn decode_manifest(data: &[u8]) -> bool {
    let Ok(m) = fogmesh::protocols::Manifest::decode(data) else { return false };
    assert_eq!(m.encode(), data);
    assert_eq!(m.chunks.last().map(|c| c.end()), Some(m.file_len));
    let _ = m.covering(0, m.file_len);
    true
}

proptest! {
    #[test]
    fn manifests_from_any_bytes_are_an_error_or_tile_their_file(data in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..200, flip in any::<u8>()) {
        decode_manifest(&data);
        let mut good = sample_manifest().encode();
        let at = cut % good.len();
        good[at] ^= flip;
        decode_manifest(&good);
    }
}

#[test]
fn gguf_corpus_replays_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = files(&root.join("corpus/gguf"));
    assert!(seeds.len() >= 4, "the GGUF seed corpus is missing");
    let mut loaded = 0;
    for f in seeds.iter().chain(&files(&root.join("artifacts/gguf"))) {
        let data = std::fs::read(f).unwrap();
        if decode_gguf(&data) {
            loaded += 1;
        }
    }
    assert!(loaded >= 3, "the valid seeds must load ({loaded} did)");
}

const MICRO: Shape = Shape { layers: 2, d: 64, ffn: 64, vocab: 10, heads: 2, kv_heads: 1 };

#[test]
#[ignore = "writes the seed corpus"]
fn write_gguf_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let mut meta = metadata(MICRO);
    meta.extend(tokenizer_metadata());
    std::fs::write(dir.join("metadata-only.gguf"), write_gguf(&meta, &[])).unwrap();
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::F32, GgmlDType::Q5_1] {
        let bytes = write_gguf(&meta, &tensors(MICRO, dtype, dtype != GgmlDType::F32));
        std::fs::write(dir.join(format!("micro-{dtype:?}.gguf").to_lowercase()), bytes).unwrap();
    }
}

#[test]
fn micro_seed_model_has_a_working_tokenizer() {
    let mut meta = metadata(MICRO);
    meta.extend(tokenizer_metadata());
    let bytes = write_gguf(&meta, &tensors(MICRO, GgmlDType::Q8_0, true));
    let g = Gguf::parse(Cursor::new(&bytes), bytes.len() as u64).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(t.encode("ab a").unwrap(), vec![5, 7]);
    assert_eq!(t.encode("<|im_start|>ab").unwrap(), vec![1, 5]);
    assert_eq!(t.decode(&[5, 7], false).unwrap(), "ab a");
    assert!(t.is_end(2));
}

/// The default model's facts, for the request and tokenizer properties.
fn served() -> Option<Arc<fogmesh::actors::ModelInfo>> {
    Some(Arc::new(fogmesh::actors::ModelInfo::open(&model_path()?, [0; 32]).unwrap()))
}

/// The same work as `fuzz/fuzz_targets/openai.rs`: a plan that fits the
/// context, or a 4xx; `Ok` tells which.
fn check_body(model: &Arc<fogmesh::actors::ModelInfo>, data: &[u8]) -> Option<bool> {
    use fogmesh::node::api::{Endpoint, check_openai};
    let (&k, body) = data.split_first()?;
    let endpoint = if k % 2 == 0 { Endpoint::Chat } else { Endpoint::Completions };
    Some(match check_openai(endpoint, body, |_| Ok(model.clone())) {
        Ok(p) => {
            assert!(p.req.prompt.len() + p.req.max_tokens <= model.config.context, "a plan past the context: {p:?}");
            true
        }
        Err(r) => {
            assert!(r.status().is_client_error(), "{}", r.status());
            false
        }
    })
}

#[test]
fn openai_and_tokenizer_corpora_replay_with_their_properties() {
    let Some(model) = served() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seen = 0;
    for dir in ["corpus/openai", "artifacts/openai"] {
        for f in files(&root.join(dir)) {
            let data = std::fs::read(&f).unwrap();
            let ok = check_body(&model, &data);
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("ok-") || name.starts_with("bad-") {
                assert_eq!(ok, Some(name.starts_with("ok-")), "{name}");
            }
            seen += 1;
        }
    }
    assert!(seen >= 12, "the OpenAI seeds are there ({seen})");
    let mut texts = 0;
    for dir in ["corpus/tokenizer", "artifacts/tokenizer"] {
        for f in files(&root.join(dir)) {
            let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
            fogmesh::models::testing::tokenizer_properties(&model.tokenizer, &text).unwrap();
            texts += 1;
        }
    }
    assert!(texts >= 7, "the tokenizer seeds are there ({texts})");
}

/// A JSON value of any shape, biased towards what the endpoints read.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    let leaf = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|x| json!(x)),
        prop_oneof![Just(-1.0f64), Just(0.0), Just(2.5), Just(1e300)].prop_map(|x| json!(x)),
        ".{0,24}".prop_map(|s| json!(s)),
        prop_oneof![Just("user"), Just("system"), Just("assistant"), Just("tool"), Just("text"), Just("<|im_start|>")]
            .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::vec((FIELD.clone(), inner), 0..4)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "stream", "stream_options", "include_usage", "logprobs", "top_logprobs", "n", "repeat_penalty", "echo", "suffix",
    "best_of", "role", "content", "type", "text", "user",
];

static FIELD: std::sync::LazyLock<proptest::sample::Select<&'static str>> =
    std::sync::LazyLock::new(|| proptest::sample::select(FIELDS));

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_openai_body_is_a_plan_within_the_context_or_a_4xx(
        chat in any::<bool>(),
        fields in proptest::collection::vec((FIELD.clone(), any_json()), 0..8),
        messages in proptest::collection::vec((prop_oneof![Just("user"), Just("system"), Just("assistant"), Just("robot")], ".{0,40}"), 0..4),
    ) {
        let Some(model) = SERVED.as_ref() else { return Ok(()) };
        let mut body = serde_json::Map::new();
        body.insert("model".into(), "any".into());
        if chat {
            let m: Vec<_> = messages.iter().map(|(r, c)| serde_json::json!({ "role": r, "content": c })).collect();
            body.insert("messages".into(), m.into());
        } else {
            body.insert("prompt".into(), messages.first().map_or("x".into(), |(_, c)| c.clone()).into());
        }
        for (k, v) in fields {
            body.insert(k.to_string(), v);
        }
        let mut data = vec![u8::from(!chat)];
        data.extend(serde_json::to_vec(&body).unwrap());
        check_body(model, &data);
    }

    #[test]
    fn any_text_keeps_the_tokenizer_properties(
        pieces in proptest::collection::vec(prop_oneof![
            ".{0,12}",
            Just("<|im_start|>".to_string()),
            Just("<|im_end|>".to_string()),
            Just("<|endoftext|>".to_string()),
            Just("<|im_".to_string()),
            Just("|>".to_string()),
            Just("\n".to_string()),
        ], 0..8),
    ) {
        let Some(model) = SERVED.as_ref() else { return Ok(()) };
        let text: String = pieces.concat();
        let r = fogmesh::models::testing::tokenizer_properties(&model.tokenizer, &text);
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}

static SERVED: std::sync::LazyLock<Option<Arc<fogmesh::actors::ModelInfo>>> = std::sync::LazyLock::new(served);
