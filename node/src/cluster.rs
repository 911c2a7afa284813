//! A mesh of `fogmesh node` processes on this host: what `fogmesh demo`,
//! the process tests and the mesh benchmark start. Peers listen on loopback
//! and join the first by its address, or (with `mdns`) listen on every
//! interface and meet by mDNS. Dropping it kills every peer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crate::api::types::{GenFlags, NodeStatus, PlanView};
use crate::client::{HTTP_ADDR_FILE, MeshRun, generate_on, http_get};

/// How to start a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `fogmesh` binary.
    pub exe: PathBuf,
    /// The model every peer serves (`None`: no model).
    pub model: Option<PathBuf>,
    /// Peers to start.
    pub peers: usize,
    /// Compute threads per peer.
    pub threads: usize,
    /// Pin peer i to CPU `pin[i]` with `taskset` (when given).
    pub pin: Option<Vec<usize>>,
    /// Meet by mDNS instead of loopback addresses.
    pub mdns: bool,
    /// The cluster secret (hex) given to every peer.
    pub secret: Option<String>,
    /// `RUST_LOG` of the peers.
    pub log: String,
    /// How long each peer may take to start.
    pub wait: Duration,
    /// `--activations` of every peer (`None`: the default, `auto`).
    pub activations: Option<String>,
    /// `--max-memory` of every peer, in bytes (`None`: what the host has).
    pub max_memory: Option<u64>,
    /// More flags given to every peer (`--kv-budget 8MiB`, …).
    pub extra: Vec<String>,
    /// Flags of peer i alone (with a `--model` of its own, the common model
    /// is not given to it).
    pub peer_args: Vec<Vec<String>>,
    /// Environment variables of peer i alone.
    pub peer_env: Vec<Vec<(String, String)>>,
}

impl ClusterOptions {
    /// `peers` peers of this binary serving `model`, one thread each.
    pub fn new(exe: impl Into<PathBuf>, model: Option<PathBuf>, peers: usize) -> Self {
        ClusterOptions {
            exe: exe.into(),
            model,
            peers,
            threads: 1,
            pin: None,
            mdns: false,
            secret: None,
            log: "warn,fogmesh_actors=info,fogmesh_node=info".into(),
            wait: Duration::from_secs(60),
            activations: None,
            max_memory: None,
            extra: Vec::new(),
            peer_args: Vec::new(),
            peer_env: Vec::new(),
        }
    }
}

/// One running peer.
#[derive(Debug)]
pub struct LocalPeer {
    /// Its process (`None` once stopped).
    pub child: Option<Child>,
    /// Its data dir (identity, `http.addr`, `node.log`).
    pub dir: PathBuf,
    /// Its HTTP address.
    pub http: String,
    /// Its peer id.
    pub peer_id: String,
}

/// Peer processes on this host.
#[derive(Debug)]
pub struct LocalCluster {
    /// The peers, in start order.
    pub peers: Vec<LocalPeer>,
    _dir: tempfile::TempDir,
    options: ClusterOptions,
    /// Peer 1's address, which the others join through.
    bootstrap: Option<String>,
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl LocalCluster {
    /// Starts the peers and waits until each serves HTTP.
    pub fn start(o: &ClusterOptions) -> Result<LocalCluster> {
        let tmp = tempfile::Builder::new().prefix("fogmesh-cluster-").tempdir()?;
        let mut c = LocalCluster { peers: Vec::new(), _dir: tmp, options: o.clone(), bootstrap: None };
        for i in 0..o.peers {
            let dir = c._dir.path().join(format!("peer{}", i + 1));
            std::fs::create_dir_all(&dir)?;
            let peer = c.spawn(i, dir)?;
            if i == 0 {
                let st: NodeStatus = serde_json::from_str(&http_get(&peer.http, "/status")?)?;
                c.bootstrap = st.listen_addrs.first().cloned();
            }
            c.peers.push(peer);
        }
        Ok(c)
    }

    /// Starts peer `i` (its flags, environment and data dir `dir`) and waits
    /// until it serves HTTP.
    fn spawn(&self, i: usize, dir: PathBuf) -> Result<LocalPeer> {
        let o = &self.options;
        let _ = std::fs::remove_file(dir.join(HTTP_ADDR_FILE));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("node.log"))?;
        let mut cmd = match o.pin.as_ref().and_then(|p| p.get(i)) {
            Some(cpu) => {
                let mut t = Command::new("taskset");
                t.args(["-c", &cpu.to_string()]).arg(&o.exe);
                t
            }
            None => Command::new(&o.exe),
        };
        cmd.arg("node");
        if let Some(a) = &o.activations {
            cmd.args(["--activations", a]);
        }
        cmd.args(&o.extra);
        let own = o.peer_args.get(i).cloned().unwrap_or_default();
        cmd.args(&own);
        if let Some(m) = o.max_memory {
            cmd.args(["--max-memory", &m.to_string()]);
        }
        // Peer 1 started again listens where the others join it.
        let listen = match (&self.bootstrap, i) {
            (Some(b), 0) if !o.mdns => b.clone(),
            _ => if o.mdns { "/ip4/0.0.0.0/tcp/0" } else { "/ip4/127.0.0.1/tcp/0" }.to_string(),
        };
        cmd.args(["--listen", &listen])
            .args(["--http", "127.0.0.1:0", "--threads", &o.threads.max(1).to_string()])
            .arg("--data-dir")
            .arg(&dir)
            .env("RUST_LOG", &o.log)
            // The peers' settings are exactly these flags: none from the
            // caller's FOGMESH_* variables or config file.
            .env(crate::config::CONFIG_ENV, "/dev/null")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("FOGMESH_") && !matches!(k.as_ref(), "FOGMESH_HOME" | "FOGMESH_KERNEL" | "FOGMESH_CONFIG") {
                cmd.env_remove(k.as_ref());
            }
        }
        for (k, v) in o.peer_env.get(i).into_iter().flatten() {
            cmd.env(k, v);
        }
        if let Some(m) = &o.model
            && !own.iter().any(|a| a == "--model")
        {
            cmd.arg("--model").arg(m);
        }
        match &o.secret {
            Some(s) => cmd.env("FOGMESH_SECRET", s),
            None => cmd.env_remove("FOGMESH_SECRET"),
        };
        if !o.mdns {
            cmd.arg("--no-mdns");
            if let Some(b) = self.bootstrap.as_ref().filter(|_| i > 0) {
                cmd.args(["--bootstrap", b]);
            }
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {}", o.exe.display()))?;
        let until = Instant::now() + o.wait;
        let http = loop {
            if let Ok(s) = std::fs::read_to_string(dir.join(HTTP_ADDR_FILE))
                && !s.trim().is_empty()
            {
                break s.trim().to_string();
            }
            if let Ok(Some(st)) = child.try_wait() {
                bail!("peer {} exited ({st}) during start:\n{}", i + 1, log_tail(&dir));
            }
            if Instant::now() > until {
                let _ = child.kill();
                bail!("peer {} did not start in time:\n{}", i + 1, log_tail(&dir));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let st: NodeStatus = serde_json::from_str(&http_get(&http, "/status")?)?;
        Ok(LocalPeer { child: Some(child), dir, http, peer_id: st.peer_id })
    }

    /// Starts peer `i` again after [`LocalCluster::kill`] (same identity,
    /// flags and data dir).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        let peer = self.spawn(i, self.peers[i].dir.clone())?;
        self.peers[i] = peer;
        Ok(())
    }

    /// The last lines of peer `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        log_tail(&self.peers[i].dir)
    }

    /// Waits until every running peer plans over `stages` peers (on all its
    /// routes together: a pipeline's stages, whole replicas) and holds its
    /// own ranges; returns peer 0's plan (`GET /plan`).
    pub fn wait_plan(&self, stages: usize, wait: Duration) -> Result<PlanView> {
        let until = Instant::now() + wait;
        loop {
            let mut ready = true;
            let mut first = None;
            for p in self.peers.iter().filter(|p| p.child.is_some()) {
                let plan: PlanView = serde_json::from_str(&http_get(&p.http, "/plan")?)?;
                let hops: Vec<&crate::api::types::RouteHop> = plan.routes.iter().flatten().collect();
                let mut serving: Vec<&str> = hops.iter().map(|h| h.peer.as_str()).collect();
                serving.sort_unstable();
                serving.dedup();
                let mut mine = hops.iter().filter(|h| h.peer == p.peer_id).peekable();
                let held = mine.peek().is_some()
                    && mine.all(|h| plan.shards.iter().any(|s| s.start == h.layers[0] && s.end == h.layers[1]));
                ready &= serving.len() == stages && held;
                first.get_or_insert(plan);
            }
            if ready && let Some(first) = first {
                return Ok(first);
            }
            if Instant::now() > until {
                bail!(
                    "no plan over {stages} peers after {wait:?}: are the hosts on one LAN? is multicast blocked? try --bootstrap ADDR\n(peer 1's log:\n{})",
                    self.log_tail(0)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the peer with this id.
    pub fn index_of(&self, peer_id: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.peer_id == peer_id)
    }

    /// Kills peer `i` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.peers[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `flags` through peer `entry` and kills peer `victim` (SIGKILL, as a
    /// crash) when the `at`-th piece of text arrives; returns the run and the
    /// time from the kill to the next piece.
    pub fn generate_killing(
        &mut self,
        entry: usize,
        victim: usize,
        at: usize,
        flags: &GenFlags,
    ) -> Result<(MeshRun, Option<Duration>)> {
        let pid = self.pid(victim).context("the victim is not running")?;
        let (mut n, mut killed, mut gap) = (0, None, None);
        let r = generate_on(&self.peers[entry].http, flags, |_| {
            n += 1;
            if n == at {
                // SAFETY: kill(2) on a child we spawned and have not reaped.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
                killed = Some(Instant::now());
            } else if let Some(k) = killed
                && gap.is_none()
            {
                gap = Some(k.elapsed());
            }
        });
        self.kill(victim);
        let r = r.map_err(|e| anyhow::anyhow!("{e:#}\n(entry peer's log:\n{})", self.log_tail(entry)))?;
        Ok((r, gap))
    }

    /// The pid of peer `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.peers[i].child.as_ref().map(|c| c.id())
    }

    /// SIGTERM to every peer, then up to 10 s for them to exit (SIGKILL for
    /// stragglers); returns their exit codes.
    pub fn stop(&mut self) -> Vec<Option<i32>> {
        for c in self.peers.iter().filter_map(|p| p.child.as_ref()) {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut codes = Vec::new();
        for p in &mut self.peers {
            let Some(mut c) = p.child.take() else { continue };
            loop {
                match c.try_wait() {
                    Ok(Some(s)) => {
                        codes.push(s.code());
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        codes.push(None);
                        break;
                    }
                }
            }
        }
        codes
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for p in &mut self.peers {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
