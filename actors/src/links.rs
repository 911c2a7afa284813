//! What this peer learns of its links from the stage traffic it sends, and
//! the encoding an activation takes over one. A write that blocks means the
//! link is the bottleneck (the connection's buffers are full) when it moved
//! a frame of 16 KiB or more slower than 100 Mbit/s; the bytes over the
//! time estimate the link's rate. A link whose writes
//! have not blocked lately keeps up, and activations cross it losslessly.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fogmesh_protocols::{CodecProfile, LinkStats, choose_encoding, default_profiles};
use fogmesh_protocols::{Encoding, WireDType};

use crate::link::PeerKey;

/// A write that takes this long blocked on the link...
pub const BLOCKED: Duration = Duration::from_millis(2);
/// ...when it moved its bytes slower than this (bytes per second, 100
/// Mbit/s): faster links are never the bottleneck of a stage here...
pub const SLOW_RATE: f64 = 12.5e6;
/// ...and was at least this large: a small frame's write time is the
/// scheduler's as much as the link's (a busy host delays any task by a
/// few milliseconds).
pub const MIN_SAMPLE_BYTES: usize = 16 << 10;
/// A link counts as the bottleneck this long after a write to it blocked.
pub const FRESH: Duration = Duration::from_secs(5);
/// The rate assumed of a link that is behind before any write to it blocked
/// (bytes per second; 10 Mbit/s).
const UNKNOWN_RATE: f64 = 1.25e6;
/// Weight of a new rate sample.
const ALPHA: f64 = 0.3;
/// Links remembered at most (the least recently used goes).
const MAX_LINKS: usize = 4096;

/// How activations are encoded on the hops this peer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationPolicy {
    /// Per hop and per message: lossless while the link keeps up, the
    /// cheapest encoding no lossier than int8o while it is the bottleneck.
    #[default]
    Auto,
    /// f32 everywhere: the exact single-process guarantee.
    Lossless,
    /// This encoding on every hop (for measurements).
    Fixed(Encoding),
}

/// The values `--activations` takes.
pub const ACTIVATION_CHOICES: &str = "auto, lossless, f16, bf16, int8o";

impl FromStr for ActivationPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let fixed = |dtype| ActivationPolicy::Fixed(Encoding { dtype, zstd: None });
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => ActivationPolicy::Auto,
            "lossless" | "f32" => ActivationPolicy::Lossless,
            "f16" => fixed(WireDType::F16),
            "bf16" => fixed(WireDType::Bf16),
            "int8o" => fixed(WireDType::Int8Outliers),
            other => return Err(format!("unknown activation encoding {other:?}: choose one of {ACTIVATION_CHOICES}")),
        })
    }
}

impl fmt::Display for ActivationPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActivationPolicy::Auto => f.write_str("auto"),
            ActivationPolicy::Lossless => f.write_str("lossless"),
            ActivationPolicy::Fixed(e) => f.write_str(&e.name()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Meter {
    /// Smoothed rate of the writes that blocked, bytes per second.
    rate: f64,
    blocked_at: Option<Instant>,
    blocked_writes: u64,
    bytes: u64,
    /// Bytes queued for it and not yet written.
    backlog: u64,
    used: Instant,
}

/// One link as measured, for status pages.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkView {
    /// The peer at the other end.
    pub peer: PeerKey,
    /// Bytes sent to it.
    pub bytes: u64,
    /// Writes to it that blocked.
    pub blocked_writes: u64,
    /// Its measured rate while it is the bottleneck (bytes per second), if
    /// a write blocked within the last few seconds.
    pub bottleneck_bps: Option<f64>,
}

/// This peer's links, as its sends measure them (bounded), and the
/// activation frames it sent by encoding.
#[derive(Debug)]
pub struct LinkMeter {
    links: Mutex<HashMap<PeerKey, Meter>>,
    frames: Mutex<BTreeMap<String, u64>>,
    policy: ActivationPolicy,
    profiles: Vec<CodecProfile>,
}

impl LinkMeter {
    /// A meter whose hops encode under `policy`.
    pub fn new(policy: ActivationPolicy) -> Self {
        LinkMeter { links: Mutex::default(), frames: Mutex::default(), policy, profiles: default_profiles() }
    }

    /// The policy activations are encoded under.
    pub fn policy(&self) -> ActivationPolicy {
        self.policy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerKey, Meter>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn meter<'a>(links: &'a mut HashMap<PeerKey, Meter>, peer: &str, now: Instant) -> &'a mut Meter {
        if !links.contains_key(peer) && links.len() >= MAX_LINKS {
            if let Some(old) = links.iter().min_by_key(|(_, m)| m.used).map(|(k, _)| k.clone()) {
                links.remove(&old);
            }
        }
        let m = links.entry(peer.to_string()).or_insert(Meter { rate: 0.0, blocked_at: None, blocked_writes: 0, bytes: 0, backlog: 0, used: now });
        m.used = now;
        m
    }

    /// `bytes` for `peer` were queued.
    pub fn queued(&self, peer: &str, bytes: usize) {
        Self::meter(&mut self.lock(), peer, Instant::now()).backlog += bytes as u64;
    }

    /// `bytes` queued for `peer` were dropped unsent.
    pub fn dropped(&self, peer: &str, bytes: usize) {
        let mut links = self.lock();
        if let Some(m) = links.get_mut(peer) {
            m.backlog = m.backlog.saturating_sub(bytes as u64);
        }
    }

    /// Bytes queued for `peer` and not yet written.
    pub fn backlog(&self, peer: &str) -> usize {
        self.lock().get(peer).map_or(0, |m| m.backlog as usize)
    }

    /// A write of `bytes` (queued before) to `peer` took `took`.
    pub fn record(&self, peer: &str, bytes: usize, took: Duration) {
        let now = Instant::now();
        let mut links = self.lock();
        let m = Self::meter(&mut links, peer, now);
        m.backlog = m.backlog.saturating_sub(bytes as u64);
        m.bytes += bytes as u64;
        let sample = bytes as f64 / took.as_secs_f64().max(1e-9);
        if took >= BLOCKED && bytes >= MIN_SAMPLE_BYTES && sample < SLOW_RATE {
            m.rate = if m.blocked_at.is_some() { (1.0 - ALPHA) * m.rate + ALPHA * sample } else { sample };
            m.blocked_at = Some(now);
            m.blocked_writes += 1;
        }
    }

    /// The rate of the link to `peer` (bytes per second) when it is the
    /// bottleneck: a write to it blocked within [`FRESH`].
    pub fn bottleneck(&self, peer: &str) -> Option<f64> {
        let links = self.lock();
        let m = links.get(peer)?;
        m.blocked_at.filter(|t| t.elapsed() < FRESH).map(|_| m.rate)
    }

    /// The encoding for `raw` bytes of f32 activations to `peer`, whose
    /// stage took `compute` seconds to make them. Under `auto` the link is
    /// the bottleneck when a write to it blocked lately, or when two such
    /// frames already wait to be written to it (the stage makes them faster
    /// than the link takes them).
    pub fn encoding(&self, peer: &str, raw: usize, compute: f64) -> Encoding {
        match self.policy {
            ActivationPolicy::Lossless => Encoding::F32,
            ActivationPolicy::Fixed(e) => e,
            ActivationPolicy::Auto => {
                let behind = self.backlog(peer) >= 2 * raw.max(1);
                let rate = match (self.bottleneck(peer), behind) {
                    (Some(rate), _) => rate,
                    // Behind before any write blocked: the link's rate is
                    // unknown but lower than the stage's; assume a slow one.
                    (None, true) => UNKNOWN_RATE,
                    (None, false) => return Encoding::F32,
                };
                let link = LinkStats { bandwidth: rate.max(1.0), latency: 0.0 };
                choose_encoding(raw, &link, compute, WireDType::Int8Outliers, &self.profiles)
            }
        }
    }

    /// Counts an activation frame sent in `encoding`.
    pub fn sent(&self, encoding: Encoding) {
        *self.frames.lock().unwrap_or_else(|e| e.into_inner()).entry(encoding.name()).or_insert(0) += 1;
    }

    /// Activation frames sent, by encoding name.
    pub fn frames(&self) -> BTreeMap<String, u64> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every link measured, by peer.
    pub fn links(&self) -> Vec<LinkView> {
        let mut v: Vec<LinkView> = self
            .lock()
            .iter()
            .map(|(p, m)| LinkView {
                peer: p.clone(),
                bytes: m.bytes,
                blocked_writes: m.blocked_writes,
                bottleneck_bps: m.blocked_at.filter(|t| t.elapsed() < FRESH).map(|_| m.rate),
            })
            .collect();
        v.sort_by(|a, b| a.peer.cmp(&b.peer));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_takes_the_documented_values_and_names_them_when_wrong() {
        assert_eq!("auto".parse::<ActivationPolicy>(), Ok(ActivationPolicy::Auto));
        assert_eq!("LOSSLESS".parse::<ActivationPolicy>(), Ok(ActivationPolicy::Lossless));
        for s in ["f16", "bf16", "int8o"] {
            let p: ActivationPolicy = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        let e = "int4".parse::<ActivationPolicy>().unwrap_err();
        assert!(e.contains("int4") && e.contains(ACTIVATION_CHOICES), "{e}");
    }

    #[test]
    fn auto_stays_lossless_until_a_write_blocks_then_compresses_no_lossier_than_int8o() {
        let m = LinkMeter::new(ActivationPolicy::Auto);
        let raw = 64 * 576 * 4;
        m.queued("fast", raw);
        m.record("fast", raw, Duration::from_micros(50));
        assert_eq!(m.encoding("fast", raw, 0.01), Encoding::F32);
        assert_eq!(m.encoding("unknown", raw, 0.01), Encoding::F32);
        // 147 KB in 1.2 s: about a 1 Mbit/s link.
        m.record("slow", raw, Duration::from_millis(1200));
        let e = m.encoding("slow", raw, 0.01);
        assert_ne!(e.dtype, WireDType::F32);
        assert!(e.dtype <= WireDType::Int8Outliers, "{e:?}");
        assert!(m.bottleneck("slow").is_some_and(|r| (100e3..150e3).contains(&r)));
        // A small frame that took long says more about the scheduler.
        m.record("busy-host", 2304, Duration::from_millis(5));
        assert_eq!(m.encoding("busy-host", 2304, 0.01), Encoding::F32);
        // Two frames waiting for a link: behind, before any write blocked.
        m.queued("backed", 2 * raw);
        assert_ne!(m.encoding("backed", raw, 0.01), Encoding::F32);
        m.record("backed", raw, Duration::from_micros(50));
        assert_eq!(m.backlog("backed"), raw);
        assert_eq!(m.encoding("backed", raw, 0.01), Encoding::F32, "one frame waiting is not behind");
        let lossless = LinkMeter::new(ActivationPolicy::Lossless);
        lossless.record("slow", raw, Duration::from_millis(1200));
        assert_eq!(lossless.encoding("slow", raw, 0.01), Encoding::F32);
    }
}
