//! [`ModelInfo`]: a model this peer serves, read up to its weights (from
//! its file, or from the header chunks fetched from peers).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fogmesh_models::gguf::Gguf;
use fogmesh_models::{LlamaConfig, ModelProfile, Tokenizer};
use fogmesh_protocols::ModelHash;

use crate::placement::ModelCosts;
use crate::weights::WeightSource;

/// A model file this peer holds, and what was read from it.
#[derive(Debug)]
pub struct ModelInfo {
    /// Where it is.
    pub path: PathBuf,
    /// Its SHA-256.
    pub hash: ModelHash,
    /// Its architecture.
    pub config: LlamaConfig,
    /// Its tokenizer and chat template.
    pub tokenizer: Arc<Tokenizer>,
    /// Per-layer costs (placement).
    pub costs: ModelCosts,
    /// Where its weights are read from.
    pub source: WeightSource,
    /// What each chunk of its file holds (costing what peers lack).
    pub parts: Arc<crate::weights::local::ChunkParts>,
}

impl ModelInfo {
    /// Reads the file's directory (not its weights). `hash` is its SHA-256.
    pub fn open(path: &Path, hash: ModelHash) -> fogmesh_models::Result<Self> {
        let g = Gguf::open(path)?;
        Self::from_gguf(&g, path.to_path_buf(), hash, WeightSource::File(path.to_path_buf()))
    }

    /// What a parsed directory says; weights from `source`.
    pub fn from_gguf(g: &Gguf, path: PathBuf, hash: ModelHash, source: WeightSource) -> fogmesh_models::Result<Self> {
        let config = LlamaConfig::from_gguf(g)?;
        let tokenizer = Arc::new(Tokenizer::from_gguf(g)?);
        let costs = ModelCosts::from_profile(&ModelProfile::from_gguf(g)?);
        let parts = Arc::new(crate::weights::local::ChunkParts::of(g, config.layers));
        Ok(ModelInfo { path, hash, config, tokenizer, costs, source, parts })
    }
}
