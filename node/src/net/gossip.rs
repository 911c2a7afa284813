//! Validation of gossip messages: one function every received message goes
//! through before the membership view sees it.

use fogmesh_protocols::{Capabilities, Departure, Limits, LoadReport, Message, ShardLoad, read_message};
use libp2p::{Multiaddr, PeerId};

/// The gossipsub topic of capability announcements.
pub const CAPS_TOPIC: &str = "fogmesh/capabilities/1";
/// The gossipsub topic of load reports.
pub const LOAD_TOPIC: &str = "fogmesh/load/1";
/// The gossipsub topic of departure notices.
pub const DEPARTURE_TOPIC: &str = "fogmesh/departures/1";
/// Every topic a member subscribes to.
pub const TOPICS: [&str; 3] = [CAPS_TOPIC, LOAD_TOPIC, DEPARTURE_TOPIC];
/// Most members one request for capabilities may name.
pub const MAX_WANTED: usize = 64;
/// Most addresses one peer may announce.
pub const MAX_ANNOUNCED_ADDRS: usize = 16;
/// Longest address a peer may announce (bytes of its text form).
pub const MAX_ADDR_BYTES: usize = 256;
/// Longest version string a peer may announce.
pub const MAX_VERSION_BYTES: usize = 64;
/// Most shards one load report may list.
pub const MAX_REPORTED_SHARDS: usize = 1024;
/// Longest chunk bitmap one peer may announce per model (bytes; a model of
/// 512k chunks).
pub const MAX_CHUNK_BITMAP: usize = 64 << 10;
/// Most models one peer may announce.
pub const MAX_REPORTED_MODELS: usize = 64;
/// Most cores a plausible peer has.
pub const MAX_CORES: u32 = 1 << 16;
/// Most memory a plausible peer offers (1 PiB).
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;
/// Highest plausible matmul speed, GFLOP/s.
pub const MAX_GFLOPS: f32 = 1e6;
/// Highest layer index a report may name.
pub const MAX_LAYER: u32 = 1 << 16;
/// Longest queue a report may claim.
pub const MAX_QUEUE_DEPTH: u32 = 1 << 20;
/// Highest plausible tokens per second of one shard.
pub const MAX_TOKENS_PER_S: f32 = 1e7;

/// A gossip message that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub enum Gossip {
    /// A peer's capabilities.
    Capabilities(Capabilities),
    /// A peer's load.
    Load(LoadReport),
    /// A member's notice that another left (or that it leaves itself).
    Departure(Departure),
    /// A member's request for the capabilities of these members.
    Wanted(Vec<PeerId>),
}

/// Checks one gossip message signed by `source` on `topic`: it must decode
/// within `limits`, fill its frame exactly, be of its topic's kind, name
/// its signer as its peer, stay within the list and string bounds, and
/// carry only finite, plausible numbers (a peer claiming infinite speed or
/// memory would otherwise win the whole plan).
pub fn validate(data: &[u8], topic: &str, source: &PeerId, limits: &Limits) -> Result<Gossip, &'static str> {
    let (msg, used) = match read_message(data, limits) {
        Ok(Some(x)) => x,
        Ok(None) => return Err("truncated frame"),
        Err(_) => return Err("undecodable"),
    };
    if used != data.len() {
        return Err("trailing bytes");
    }
    let (named, g) = match msg {
        Message::Capabilities(c) if topic == CAPS_TOPIC => (c.peer.clone(), Gossip::Capabilities(c)),
        Message::LoadReport(r) if topic == LOAD_TOPIC => (r.peer.clone(), Gossip::Load(r)),
        Message::Departure(d) if topic == DEPARTURE_TOPIC => (d.peer.clone(), Gossip::Departure(d)),
        Message::CapsWanted(w) if topic == CAPS_TOPIC => {
            if w.wanted.len() > MAX_WANTED {
                return Err("too many members wanted");
            }
            let wanted: Result<Vec<PeerId>, _> = w.wanted.iter().map(|p| p.as_str().parse::<PeerId>()).collect();
            (w.peer.clone(), Gossip::Wanted(wanted.map_err(|_| "a wanted member is not a peer id")?))
        }
        _ => return Err("message kind does not belong on this topic"),
    };
    if named.as_str() != source.to_string() {
        return Err("the message names another peer than its signer");
    }
    match &g {
        Gossip::Capabilities(c) => {
            if c.version.len() > MAX_VERSION_BYTES {
                return Err("version string too long");
            }
            if c.models.len() > MAX_REPORTED_MODELS {
                return Err("too many models");
            }
            if c.partial.len() > c.models.len() || c.partial.iter().any(|h| !c.models.contains(&h.model)) {
                return Err("chunks reported of a model not served");
            }
            if c.partial.iter().any(|h| h.bitmap.len() > MAX_CHUNK_BITMAP) {
                return Err("chunk bitmap too long");
            }
            if !(1..=MAX_CORES).contains(&c.cores) || c.memory_bytes > MAX_MEMORY_BYTES {
                return Err("implausible cores or memory");
            }
            if !(c.gflops.is_finite() && c.gflops > 0.0 && c.gflops <= MAX_GFLOPS) {
                return Err("implausible speed");
            }
            if c.addrs.len() > MAX_ANNOUNCED_ADDRS {
                return Err("too many addresses");
            }
            if c.addrs.iter().any(|a| a.len() > MAX_ADDR_BYTES || a.parse::<Multiaddr>().is_err()) {
                return Err("malformed address");
            }
        }
        Gossip::Load(r) => {
            if r.shards.len() > MAX_REPORTED_SHARDS {
                return Err("too many shards");
            }
            let bad = |s: &ShardLoad| {
                s.start >= s.end
                    || s.end > MAX_LAYER
                    || s.queue_depth > MAX_QUEUE_DEPTH
                    || !(s.tokens_per_s.is_finite() && (0.0..=MAX_TOKENS_PER_S).contains(&s.tokens_per_s))
            };
            if r.shards.iter().any(bad) {
                return Err("implausible shard load");
            }
        }
        Gossip::Departure(d) => {
            if d.gone.as_str().parse::<PeerId>().is_err() {
                return Err("the departed member is not a peer id");
            }
        }
        Gossip::Wanted(_) => {}
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fogmesh_protocols::{CapsWanted, ShardLoad, encode_message};

    fn frame(m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode_message(m, &Limits::default(), &mut out).unwrap();
        out
    }

    #[test]
    fn gossip_is_accepted_only_from_its_signer_on_its_topic_within_bounds() {
        let me = PeerId::random();
        let other = PeerId::random();
        let l = Limits::default();
        let caps = |peer: &PeerId, version: &str| {
            Message::Capabilities(Capabilities {
                peer: peer.to_string().into(),
                cores: 2,
                memory_bytes: 1 << 30,
                gflops: 1.0,
                version: version.into(),
                models: vec![],
                partial: vec![],
                addrs: vec!["/ip4/10.0.0.1/tcp/4001".into()],
                joining: false,
            })
        };
        let load = |peer: &PeerId, n: usize| {
            let s = ShardLoad { model: [0; 32], start: 0, end: 1, queue_depth: 0, tokens_per_s: 0.0 };
            Message::LoadReport(LoadReport { peer: peer.to_string().into(), timestamp_ms: 0, shards: vec![s; n] })
        };
        assert!(matches!(validate(&frame(&caps(&me, "0.1")), CAPS_TOPIC, &me, &l), Ok(Gossip::Capabilities(_))));
        assert!(matches!(validate(&frame(&load(&me, 3)), LOAD_TOPIC, &me, &l), Ok(Gossip::Load(_))));
        // Another peer's name, on either topic.
        assert!(validate(&frame(&caps(&other, "0.1")), CAPS_TOPIC, &me, &l).is_err());
        assert!(validate(&frame(&load(&other, 1)), LOAD_TOPIC, &me, &l).is_err());
        // The wrong topic.
        assert!(validate(&frame(&caps(&me, "0.1")), LOAD_TOPIC, &me, &l).is_err());
        // Bounds.
        assert_eq!(validate(&frame(&caps(&me, &"v".repeat(65))), CAPS_TOPIC, &me, &l), Err("version string too long"));
        assert_eq!(validate(&frame(&load(&me, 1025)), LOAD_TOPIC, &me, &l), Err("too many shards"));
        // Implausible numbers.
        let mut fast = caps(&me, "0.1");
        if let Message::Capabilities(c) = &mut fast {
            c.gflops = f32::INFINITY;
        }
        assert_eq!(validate(&frame(&fast), CAPS_TOPIC, &me, &l), Err("implausible speed"));
        let mut huge = caps(&me, "0.1");
        if let Message::Capabilities(c) = &mut huge {
            c.memory_bytes = u64::MAX;
        }
        assert_eq!(validate(&frame(&huge), CAPS_TOPIC, &me, &l), Err("implausible cores or memory"));
        let mut q = load(&me, 2);
        if let Message::LoadReport(r) = &mut q {
            r.shards[1].queue_depth = u32::MAX;
        }
        assert_eq!(validate(&frame(&q), LOAD_TOPIC, &me, &l), Err("implausible shard load"));
        let mut bad_addr = caps(&me, "0.1");
        if let Message::Capabilities(c) = &mut bad_addr {
            c.addrs.push("not an address".into());
        }
        assert_eq!(validate(&frame(&bad_addr), CAPS_TOPIC, &me, &l), Err("malformed address"));
        // Departures: signed by their reporter, naming a peer id.
        let gone = |by: &PeerId, who: &str| {
            Message::Departure(Departure { peer: by.to_string().into(), gone: who.to_string().into(), last_heard_ms: 5 })
        };
        assert!(matches!(validate(&frame(&gone(&me, &other.to_string())), DEPARTURE_TOPIC, &me, &l), Ok(Gossip::Departure(_))));
        assert!(validate(&frame(&gone(&other, &me.to_string())), DEPARTURE_TOPIC, &me, &l).is_err());
        assert!(validate(&frame(&gone(&me, "nobody")), DEPARTURE_TOPIC, &me, &l).is_err());
        assert!(validate(&frame(&gone(&me, &other.to_string())), CAPS_TOPIC, &me, &l).is_err());
        // Requests for capabilities: on the capabilities' topic, naming
        // peer ids, a bounded number of them.
        let wanted = |by: &PeerId, who: Vec<String>| {
            Message::CapsWanted(CapsWanted { peer: by.to_string().into(), wanted: who.into_iter().map(Into::into).collect() })
        };
        assert_eq!(validate(&frame(&wanted(&me, vec![other.to_string()])), CAPS_TOPIC, &me, &l), Ok(Gossip::Wanted(vec![other])));
        assert!(validate(&frame(&wanted(&me, vec![other.to_string()])), LOAD_TOPIC, &me, &l).is_err());
        assert!(validate(&frame(&wanted(&other, vec![])), CAPS_TOPIC, &me, &l).is_err());
        assert_eq!(validate(&frame(&wanted(&me, vec!["x".into()])), CAPS_TOPIC, &me, &l), Err("a wanted member is not a peer id"));
        let many = vec![other.to_string(); MAX_WANTED + 1];
        assert_eq!(validate(&frame(&wanted(&me, many)), CAPS_TOPIC, &me, &l), Err("too many members wanted"));
        // Framing.
        let mut f = frame(&caps(&me, "0.1"));
        f.push(0);
        assert_eq!(validate(&f, CAPS_TOPIC, &me, &l), Err("trailing bytes"));
        assert_eq!(validate(&f[..10], CAPS_TOPIC, &me, &l), Err("truncated frame"));
    }
}
