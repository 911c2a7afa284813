//! Simulated clusters: peers with their speeds and links, and the seeded
//! random numbers every run draws from.

use serde::Serialize;

/// One simulated peer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PeerSpec {
    /// Work units per second.
    pub speed: f64,
    /// One-way network latency to the core of the network (seconds).
    pub latency_s: f64,
    /// Link bandwidth (bytes per second).
    pub bandwidth: f64,
}

/// A SplitMix64 generator: small, seeded, reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Exponential with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform()).ln()
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// The classic fog example: three nodes of capacities 10, 15 and 8.
pub fn classic_cluster() -> Vec<PeerSpec> {
    [10.0, 15.0, 8.0].iter().map(|&speed| PeerSpec { speed, latency_s: 0.005, bandwidth: 12.5e6 }).collect()
}

/// The links of a random cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// A wired site: latencies uniform over 1-20 ms, 2-100 MB/s.
    Lan,
    /// Edge devices on mixed access links (Wi-Fi, cellular, DSL uplinks):
    /// latencies log-uniform over 2-100 ms, 0.25-12.5 MB/s (2-100 Mbit/s).
    Fog,
}

/// `n` peers with speeds log-uniform over [1, 20] (a 20x spread), latencies of
/// 1 to 20 ms and links of 2 to 100 MB/s.
pub fn random_cluster(n: usize, seed: u64) -> Vec<PeerSpec> {
    random_cluster_with(n, seed, Links::Lan)
}

/// `n` peers with speeds log-uniform over [1, 20] and `links`. The speeds
/// are the same for both kinds of links with the same seed.
pub fn random_cluster_with(n: usize, seed: u64, links: Links) -> Vec<PeerSpec> {
    let mut r = Rng::new(seed ^ 0xC1A5_7E55);
    (0..n)
        .map(|_| {
            let (speed, a, b) = (20f64.powf(r.uniform()), r.uniform(), r.uniform());
            match links {
                Links::Lan => PeerSpec { speed, latency_s: 0.001 + 0.019 * a, bandwidth: 2e6 * 50f64.powf(b) },
                Links::Fog => PeerSpec { speed, latency_s: 0.002 * 50f64.powf(a), bandwidth: 0.25e6 * 50f64.powf(b) },
            }
        })
        .collect()
}
