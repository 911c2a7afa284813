//! Replays the fuzz corpora (and any crash artifacts) through the decoders on
//! stable Rust, so every input a fuzzer ever found stays an error, not a panic.
//! `--ignored write_gguf_seeds` regenerates the GGUF seed corpus.

mod common;

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use common::*;
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
        Message::Capabilities(Capabilities { peer: peer.clone(), cores: 4, memory_bytes: 8 << 30, gflops: 50.5, version: "0.1.0".into(), models: vec![model] }),
        Message::LoadReport(LoadReport {
            peer: peer.clone(),
            timestamp_ms: 1_700_000_000_000,
            shards: vec![ShardLoad { model, start: 0, end: 10, queue_depth: 2, tokens_per_s: 90.0 }],
        }),
        Message::ShardAdvert(ShardAdvert { peer: peer.clone(), model, start: 10, end: 20 }),
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
        Message::WeightChunkRequest(WeightChunkRequest { model, tensor: "blk.0.attn_q.weight".into(), offset: 0, len: 4096 }),
        Message::WeightChunkReply(WeightChunkReply { model, tensor: "blk.0.attn_q.weight".into(), offset: 0, data: vec![9; 64] }),
        Message::Error(ErrorFrame { request: 9, code: ErrorCode::Malformed, message: "malformed".into() }),
    ]
}

#[test]
#[ignore = "writes the seed corpora"]
fn write_protocol_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for d in ["frame", "message", "activation"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
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
