//! The network-namespace lab the root-only tests build hosts in: namespaces,
//! bridges, veths, routers, and `fogmesh node` processes inside them; all
//! removed when the [`Lab`] drops, also on failure.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SECRET: &str = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7";
pub const WRONG_SECRET: &str = "badbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbad0";

pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Skips (returns false) unless root with `ip` and netns support.
pub fn can_run() -> bool {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        eprintln!("SKIPPED: network-namespace tests need root (CI runs them as root)");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIPPED: network-namespace tests need iproute2's `ip`");
        return false;
    }
    true
}

/// The default model, when namespaces can be made and the model is here
/// (skipped otherwise; under CI a missing model fails).
pub fn can_run_with_model() -> Option<PathBuf> {
    if !can_run() {
        return None;
    }
    let model = fogmesh::models::default_model_path();
    if !model.exists() {
        assert!(std::env::var_os("CI").is_none(), "this test needs the default model (fogmesh fetch)");
        eprintln!("SKIPPED: needs the default model");
        return None;
    }
    Some(model)
}

/// Namespaces and node processes of one test; dropping it kills the nodes
/// and deletes the namespaces (and with them every veth and bridge).
pub struct Lab {
    pub prefix: String,
    pub namespaces: Vec<String>,
    pub nodes: Vec<(String, Child, PathBuf)>,
    pub dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        let prefix = format!("fm{}{}", std::process::id() % 100_000, tag);
        Lab { prefix, namespaces: vec![], nodes: vec![], dir: tempfile::tempdir().unwrap() }
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn add_ns(&mut self, name: &str) -> String {
        let ns = self.ns(name);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A switch: a namespace holding one bridge (multicast snooping off so
    /// mDNS floods like on a plain switch).
    pub fn add_lan(&mut self, name: &str) -> String {
        let ns = self.add_ns(name);
        run(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        run(&["ip", "-n", &ns, "link", "set", "br0", "up"]);
        ns
    }

    /// Plugs namespace `host` into `lan` as interface `ifname` with `cidr`.
    pub fn plug(&self, lan: &str, port: &str, host: &str, ifname: &str, cidr: &str) {
        run(&["ip", "-n", lan, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", host]);
        run(&["ip", "-n", lan, "link", "set", port, "master", "br0", "up"]);
        run(&["ip", "-n", host, "addr", "add", cidr, "dev", ifname]);
        run(&["ip", "-n", host, "link", "set", ifname, "up"]);
    }

    /// A host on `lan` at 10.77.`subnet`.`n` with its default route via .254.
    pub fn add_host(&mut self, name: &str, lan: &str, subnet: u8, n: u8) -> String {
        let ns = self.add_ns(name);
        self.plug(lan, name, &ns, "eth0", &format!("10.77.{subnet}.{n}/24"));
        run(&["ip", "-n", &ns, "route", "add", "default", "via", &format!("10.77.{subnet}.254")]);
        ns
    }

    /// Starts `fogmesh node` in namespace `ns` with `extra` flags.
    pub fn start_node(&mut self, ns: &str, extra: &[&str]) {
        self.start_node_env(ns, extra, &[]);
    }

    /// Starts `fogmesh node` in `ns` with `extra` flags and `env`
    /// variables; its stderr goes to `node.log`, its stdout to `node.out`
    /// in its data dir.
    pub fn start_node_env(&mut self, ns: &str, extra: &[&str], env: &[(&str, &str)]) {
        let data = self.dir.path().join(ns);
        std::fs::create_dir_all(&data).unwrap();
        let log = std::fs::File::create(data.join("node.log")).unwrap();
        let out = std::fs::File::create(data.join("node.out")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_fogmesh"), "node", "--listen", "/ip4/0.0.0.0/tcp/4001"])
            .args(["--http", "127.0.0.1:8469", "--data-dir"])
            .arg(&data)
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,fogmesh_node=debug,libp2p_kad=error")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn fogmesh node");
        self.nodes.push((ns.to_string(), child, data));
    }

    /// Kills the node in `ns` (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self, ns: &str) {
        if let Some((_, child, _)) = self.nodes.iter_mut().find(|(n, ..)| n == ns) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A home router `name`: its WAN side on switch `wan` at `wan_cidr`,
    /// its LAN side a veth to a new host namespace `host` at
    /// 10.88.`subnet`.1 (router .254). It masquerades the home behind its
    /// WAN address and drops every new connection from outside, to itself
    /// or to the home (iptables-legacy), as a home router does; a
    /// `symmetric` one picks a random outside port for every connection
    /// (as carrier-grade NATs do), which defeats hole punching. Returns the
    /// host's namespace.
    pub fn add_nat_home(&mut self, name: &str, wan: &str, wan_cidr: &str, host: &str, subnet: u8, symmetric: bool) -> String {
        let rt = self.add_ns(name);
        self.plug(wan, name, &rt, "wan", wan_cidr);
        let h = self.add_ns(host);
        run(&["ip", "-n", &rt, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", &h]);
        run(&["ip", "-n", &rt, "addr", "add", &format!("10.88.{subnet}.254/24"), "dev", "lan"]);
        run(&["ip", "-n", &rt, "link", "set", "lan", "up"]);
        run(&["ip", "-n", &h, "addr", "add", &format!("10.88.{subnet}.1/24"), "dev", "eth0"]);
        run(&["ip", "-n", &h, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &h, "route", "add", "default", "via", &format!("10.88.{subnet}.254")]);
        run(&["ip", "netns", "exec", &rt, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let ipt = |args: &str| {
            let mut v = vec!["ip", "netns", "exec", &rt, "iptables-legacy"];
            v.extend(args.split(' '));
            run(&v);
        };
        ipt(if symmetric { "-t nat -A POSTROUTING -o wan -j MASQUERADE --random-fully" } else { "-t nat -A POSTROUTING -o wan -j MASQUERADE" });
        for chain in ["INPUT", "FORWARD"] {
            ipt(&format!("-A {chain} -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"));
            ipt(&format!("-A {chain} -i wan -j DROP"));
        }
        h
    }

    pub fn pid(&self, ns: &str) -> u32 {
        self.nodes.iter().find(|(n, ..)| n == ns).map(|(_, c, _)| c.id()).expect("node")
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (ns, _, data) in &self.nodes {
            let log = std::fs::read_to_string(data.join("node.log")).unwrap_or_default();
            s += &format!("==== {ns}\n{log}\n");
        }
        s
    }

    /// `fogmesh peers --json` inside `ns`, or None while its node is not up.
    pub fn peers(&self, ns: &str) -> Option<Vec<Value>> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_fogmesh"), "peers", "--json", "--node", "127.0.0.1:8469"])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).expect("peers --json prints JSON");
        Some(v.as_array().expect("an array").clone())
    }

    pub fn status(&self, ns: &str) -> Value {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_fogmesh"), "status", "--json", "--node", "127.0.0.1:8469"])
            .output()
            .expect("fogmesh status");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    pub fn peer_id(&self, ns: &str) -> String {
        let data = self.nodes.iter().find(|(n, ..)| n == ns).map(|(.., d)| d.clone()).unwrap();
        peer_id_of(&data)
    }

    /// Waits until each of `hosts` sees exactly `expect(host)` (as peer ids).
    pub fn wait_views(&self, hosts: &[String], limit: Duration, expect: impl Fn(&str) -> Vec<String>) -> Duration {
        let t0 = Instant::now();
        loop {
            let mut ok = true;
            for h in hosts {
                let mut want = expect(h);
                want.sort();
                // A peer counts once its gossiped capabilities are in.
                let mut got: Vec<String> = match self.peers(h) {
                    Some(p) => p
                        .iter()
                        .filter(|p| p["cores"].as_u64().unwrap_or(0) > 0)
                        .map(|p| p["peer_id"].as_str().unwrap().to_string())
                        .collect(),
                    None => {
                        ok = false;
                        continue;
                    }
                };
                got.sort();
                ok &= got == want;
            }
            if ok {
                return t0.elapsed();
            }
            if t0.elapsed() > limit {
                let views: Vec<_> = hosts.iter().map(|h| (h, self.peers(h))).collect();
                panic!("views not complete after {limit:?}: {views:#?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn peer_id_of(data: &Path) -> String {
    let bytes = std::fs::read(data.join("identity.key")).expect("identity written");
    libp2p::identity::Keypair::from_protobuf_encoding(&bytes).unwrap().public().to_peer_id().to_string()
}

/// Waits for a node's identity file (written before it starts networking).
pub fn wait_identity(lab: &Lab, ns: &str) {
    let data = lab.nodes.iter().find(|(n, ..)| n == ns).map(|(.., d)| d.clone()).unwrap();
    let t0 = Instant::now();
    while !data.join("identity.key").exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{ns} wrote no identity\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET `path` from the node inside `ns` (JSON; Null when unreachable).
pub fn api(ns: &str, path: &str) -> Value {
    let out = Command::new("ip").args(["netns", "exec", ns, "curl", "-s", &format!("http://127.0.0.1:8469{path}")]).output();
    out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or(Value::Null)
}

/// `fogmesh run --json --raw` of `prompt` (greedy, `n` tokens) at `host`.
pub fn run_at(lab: &Lab, host: &str, prompt: &str, n: usize) -> Value {
    let out = Command::new("ip")
        .args(["netns", "exec", host, env!("CARGO_BIN_EXE_fogmesh"), "run", "--node", "127.0.0.1:8469", "--json", "--raw"])
        .args(["--temperature", "0", "-n", &n.to_string(), "-p", prompt])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}\n{}", String::from_utf8_lossy(&out.stderr), lab.logs()))
}
