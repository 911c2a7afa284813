//! Model weights by content, in one process: how a file is cut into
//! chunks, the chunk cache (checks, bounds, least recently used out), a
//! shard loaded from only its range's chunks giving the same outputs as
//! from the file, and a fetch over an in-memory mesh from several holders
//! with one that lies.

mod common;

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use fogmesh::actors::weights::store::{ChunkCache, ChunkReader, ChunkStore};
use fogmesh::actors::weights::{WeightSource, Weights, local};
use fogmesh::models::gguf::Gguf;
use fogmesh::models::{LogitsFor, Shard, ShardInput, ShardOutput, ThreadPool};
use fogmesh::protocols::{CHUNK_BYTES, MANIFEST_CHUNK, Manifest, Message, WeightChunkRequest};

fn tiny_file(dir: &std::path::Path) -> (std::path::PathBuf, [u8; 32]) {
    let mut meta = common::tiny_metadata();
    meta.extend(common::tokenizer_metadata());
    let bytes = fogmesh::models::gguf::write_gguf(&meta, &common::tiny_tensors(GgmlDType::Q8_0, false));
    let p = dir.join("tiny.gguf");
    std::fs::write(&p, &bytes).unwrap();
    (p, fogmesh::protocols::sha256(&bytes))
}

fn logits(shard: &Shard) -> Vec<f32> {
    let mut cache = shard.new_session();
    match shard.forward(&mut cache, ShardInput::Tokens(&[1, 2, 3]), LogitsFor::Last).unwrap() {
        ShardOutput::Logits(l) => l,
        other => panic!("expected logits, got {other:?}"),
    }
}

#[test]
fn a_file_is_cut_into_chunks_that_tile_it_with_the_header_first() {
    let dir = tempfile::tempdir().unwrap();
    let (p, hash) = tiny_file(dir.path());
    let m = local::manifest_of(&p, hash).unwrap();
    let g = Gguf::open(&p).unwrap();
    let data_start = g.tensors.values().map(|t| t.offset).min().unwrap();
    assert_eq!(m.header_len(), data_start);
    assert_eq!(m.chunks.last().unwrap().end(), m.file_len);
    assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    // No chunk mixes two layers' tensors.
    for c in &m.chunks[m.header_chunks as usize..] {
        let layers: std::collections::BTreeSet<String> = g
            .tensors
            .iter()
            .filter(|(_, t)| t.offset >= c.offset && t.offset < c.end())
            .map(|(n, _)| n.split('.').take(2).collect::<Vec<_>>().join("."))
            .collect();
        assert!(layers.len() <= 1 || layers.iter().all(|l| !l.starts_with("blk.")), "{layers:?}");
        assert!(c.len as u64 <= CHUNK_BYTES);
    }
    // Same file, same manifest.
    assert_eq!(local::manifest_of(&p, hash).unwrap().digest(), m.digest());
}

#[test]
fn a_shard_loads_from_only_its_ranges_chunks_and_computes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (p, hash) = tiny_file(dir.path());
    let m = Arc::new(local::manifest_of(&p, hash).unwrap());
    let g = Arc::new(Gguf::open(&p).unwrap());
    let layers = fogmesh::models::LlamaConfig::from_gguf(&g).unwrap().layers;
    let pool = Arc::new(ThreadPool::new(1));
    for range in [0..1, 1..layers, 0..layers] {
        let cache = ChunkCache::open(&dir.path().join(format!("chunks{}", range.start * 10 + range.end)), 1 << 30).unwrap();
        let store = Arc::new(ChunkStore::open(cache, m.clone()).unwrap());
        let mut wanted: Vec<usize> = (0..m.header_chunks as usize).collect();
        for n in Shard::tensors_for(&g, range.clone()).unwrap() {
            let t = &g.tensors[&n];
            wanted.extend(m.covering(t.offset, t.offset + t.size));
        }
        let file = std::fs::read(&p).unwrap();
        for &i in &wanted {
            let c = m.chunks[i];
            store.put(i, &file[c.offset as usize..c.end() as usize]).unwrap();
        }
        let from_chunks = Shard::load_from(&g, ChunkReader::new(store.clone()), range.clone(), pool.clone()).unwrap();
        let from_file = Shard::load(&p, range.clone(), pool.clone()).unwrap();
        assert_eq!(from_chunks.memory_bytes(), from_file.memory_bytes());
        if range.start == 0 && range.end == layers {
            assert_eq!(logits(&from_chunks), logits(&from_file));
        }
        if range != (0..layers) {
            assert!(store.held().0 < m.chunks.len(), "range {range:?} needs only some chunks");
        }
    }
}

#[test]
fn the_cache_checks_every_chunk_and_keeps_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (p, hash) = tiny_file(dir.path());
    let m = Arc::new(local::manifest_of(&p, hash).unwrap());
    let file = std::fs::read(&p).unwrap();
    let bytes = |i: usize| file[m.chunks[i].offset as usize..m.chunks[i].end() as usize].to_vec();
    // A budget of two of the largest chunks.
    let largest = m.chunks.iter().map(|c| c.len as u64).max().unwrap();
    let cache = ChunkCache::open(&dir.path().join("c"), 2 * largest).unwrap();
    let store = ChunkStore::open(cache.clone(), m.clone()).unwrap();
    let mut bad = bytes(0);
    bad[0] ^= 1;
    assert!(store.put(0, &bad).is_err(), "a damaged chunk is refused");
    assert!(!store.has(0));
    for i in 0..m.chunks.len() {
        store.put(i, &bytes(i)).unwrap();
        assert!(cache.bytes() <= 2 * largest);
    }
    let last = m.chunks.len() - 1;
    assert!(store.has(last) && !store.has(0), "oldest out first");
    assert_eq!(store.get(last).unwrap(), bytes(last));
    // A chunk damaged on disk is found when read, dropped, and not served.
    std::fs::write(store.dir().join(format!("c{last}")), vec![0u8; m.chunks[last].len as usize]).unwrap();
    assert!(store.get(last).is_err());
    assert!(!store.has(last));
    // Reading past what is held is an error, never zeros.
    let mut r = ChunkReader::new(Arc::new(ChunkStore::open(cache, m.clone()).unwrap()));
    let mut buf = vec![0u8; 16];
    assert!(std::io::Read::read_exact(&mut r, &mut buf).is_err());
    // Chunks kept under another manifest of the same model are not taken
    // for this one's.
    let mut other = (*m).clone();
    other.chunks[0].hash[0] ^= 1;
    let cache2 = ChunkCache::open(&dir.path().join("c2"), 1 << 30).unwrap();
    let first = ChunkStore::open(cache2.clone(), m.clone()).unwrap();
    first.put(1, &bytes(1)).unwrap();
    assert!(ChunkStore::open(cache2.clone(), m.clone()).unwrap().has(1));
    assert!(!ChunkStore::open(cache2.clone(), Arc::new(other)).unwrap().has(1));
    assert_eq!(cache2.bytes(), 0);
    // An unwritable place is a clear error.
    let e = ChunkCache::open(std::path::Path::new("/proc/fogmesh-chunks"), 1 << 20).unwrap_err();
    assert!(e.to_string().contains("not writable"), "{e}");
}

#[tokio::test]
async fn a_peer_without_the_file_gets_it_from_holders_and_bans_a_liar() {
    use fogmesh::actors::memnet::{Fault, MemNet};
    use fogmesh::actors::{PeerView, RuntimeConfig, Runtime, ModelInfo};
    let dir = tempfile::tempdir().unwrap();
    let (p, hash) = tiny_file(dir.path());
    let net = MemNet::new(std::time::Duration::from_secs(5));
    let view = |id: &str| PeerView {
        peer: id.into(),
        gflops: 10.0,
        memory_bytes: 1 << 30,
        models: vec![hash],
        shards: vec![],
        queued: 0,
        rtt_ms: None,
        partial: vec![],
    };
    let cfg = RuntimeConfig { threads: 1, standby_shards: false, ..RuntimeConfig::default() };
    // Two honest holders and one that damages every chunk it sends.
    let mut holders = Vec::new();
    for id in ["h1", "h2", "liar"] {
        let link = net.add(view(id));
        let info = Arc::new(ModelInfo::open(&p, hash).unwrap());
        let rt = Runtime::start(link, Some(info), cfg.clone()).await.unwrap();
        net.attach(id, rt.clone());
        holders.push(rt);
    }
    net.set_fault("liar", Fault::Garbage);
    // The newcomer holds no file.
    let mut nv = view("new");
    nv.models.clear();
    let link = net.add(nv);
    let cfg_new = RuntimeConfig { chunk_dir: Some(dir.path().join("new-chunks")), ..cfg.clone() };
    let rt = Runtime::start(link, None, cfg_new).await.unwrap();
    net.attach("new", rt.clone());
    let manifest = local::manifest_of(&p, hash).unwrap();
    rt.fetch_model(hash, Some(manifest.digest()), "tiny.gguf").await.unwrap();
    let model = rt.model().unwrap().clone();
    assert!(matches!(model.source, WeightSource::Chunks { .. }));
    let layers = model.config.layers;
    let slot = rt.ensure_shard(0..layers).await.unwrap();
    let st = rt.weights().status();
    assert!(manifest.chunks.len() >= 4, "{} chunks", manifest.chunks.len());
    assert_eq!(st.fetched_bytes, manifest.file_len, "every chunk once, none damaged");
    assert_eq!(st.banned, vec!["liar".to_string()], "the liar is banned for the model");
    assert!(st.fetch.as_ref().unwrap().rejected >= 1);
    assert!(slot.memory_bytes > 0);
    // What the newcomer loaded computes what the file does.
    let pool = Arc::new(ThreadPool::new(1));
    let whole = Shard::load(&p, 0..layers, pool).unwrap();
    let WeightSource::Chunks { store, gguf } = &model.source else { unreachable!() };
    let fetched = Shard::load_from(gguf, ChunkReader::new(store.clone()), 0..layers, Arc::new(ThreadPool::new(1))).unwrap();
    assert_eq!(logits(&fetched), logits(&whole));
    // It serves what it holds to the next newcomer.
    let r = rt.handle_call("y", Message::WeightChunkRequest(WeightChunkRequest { model: hash, chunk: 1 })).await;
    let Message::WeightChunkReply(rep) = r else { panic!("{r:?}") };
    assert!(manifest.verify(1, &rep.data));
    assert!(rt.weights().status().served_bytes > 0);
    // The manifest asked of a holder is the file's.
    let r = holders[0].handle_call("x", Message::WeightChunkRequest(WeightChunkRequest { model: hash, chunk: MANIFEST_CHUNK })).await;
    let Message::WeightChunkReply(rep) = r else { panic!("{r:?}") };
    assert_eq!(Manifest::decode(&rep.data).unwrap(), manifest);
    // A peer with no cache refuses to fetch, clearly.
    let w = Weights::new(None, 0);
    assert!(w.status().cache_budget == 0);
}

/// Every catalogue model's manifest digest is the one its file gives (a
/// peer fetching it from others checks their manifest against it).
#[test]
fn the_catalogue_knows_each_models_manifest() {
    let mut checked = 0;
    for m in fogmesh::models::CATALOGUE {
        let p = fogmesh::models::catalogue_path(m);
        if !p.exists() {
            let required = std::env::var_os("CI").is_some() || std::env::var_os("FOGMESH_REQUIRE_MODEL").is_some();
            assert!(!required, "this test needs {} at {}: run `fogmesh fetch {}`", m.name, p.display(), m.name);
            eprintln!("SKIPPED: {} is not at {}", m.name, p.display());
            continue;
        }
        let hash: [u8; 32] = (0..32).map(|i| u8::from_str_radix(&m.sha256[2 * i..2 * i + 2], 16).unwrap()).collect::<Vec<_>>().try_into().unwrap();
        let manifest = local::manifest_of(&p, hash).unwrap();
        assert_eq!(fogmesh::protocols::hex(&manifest.digest()), m.manifest, "{}", m.name);
        checked += 1;
    }
    eprintln!("{checked} catalogue manifests checked");
}

/// What a peer lacks, by layer, from its chunk bitmap: all of the tensor
/// bytes with no chunks, none with all, one layer's with all but its chunks.
#[test]
fn what_a_peer_lacks_is_counted_by_layer() {
    use fogmesh::actors::weights::local::ChunkParts;
    let dir = tempfile::tempdir().unwrap();
    let (p, hash) = tiny_file(dir.path());
    let m = local::manifest_of(&p, hash).unwrap();
    let g = Gguf::open(&p).unwrap();
    let layers = fogmesh::models::LlamaConfig::from_gguf(&g).unwrap().layers;
    let parts = ChunkParts::of(&g, layers);
    let none = parts.missing(&[]);
    let total: u64 = none.layer.iter().sum::<u64>() + none.first + none.last;
    assert_eq!(total, m.file_len - m.header_len(), "every tensor byte lacking");
    assert!(none.layer.iter().all(|&b| b > 0) && none.first > 0 && none.last > 0, "{none:?}");
    let all = vec![0xffu8; m.chunks.len().div_ceil(8)];
    assert_eq!(parts.missing(&all), fogmesh::actors::placement::Missing { layer: vec![0; layers], first: 0, last: 0 });
    // All but layer 1's chunks.
    let mut bits = all.clone();
    for n in Shard::tensors_for(&g, 1..2).unwrap().iter().filter(|n| n.starts_with("blk.")) {
        let t = &g.tensors[n];
        for i in m.covering(t.offset, t.offset + t.size) {
            bits[i / 8] &= !(1 << (i % 8));
        }
    }
    let one = parts.missing(&bits);
    assert_eq!(one.layer[1], none.layer[1]);
    assert_eq!(one.layer.iter().sum::<u64>(), none.layer[1]);
}
