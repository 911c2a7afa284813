//! When a member gossips about itself. Its load report (small: it says
//! the member lives, and what it is busy with) goes out at a refresh
//! cadence that slows as the mesh grows (one base interval per
//! [`MEMBERS_PER_INTERVAL`] members: the mesh as a whole sends about the
//! same number of reports per second at any size, so the gossip a member
//! receives grows far slower than the mesh); its capabilities (larger, and
//! unchanged for hours) with every [`CAPS_EVERY`]th refresh (at least
//! every [`CAPS_MAX_GAP`]) and whenever they change. Each copy of a report
//! a member receives has its signature checked, which made the refresh the
//! idle mesh's largest CPU cost. The load also goes out at once when it
//! changes (at most once per base interval); both again soon after a
//! member new to it appears (so that a newcomer hears of everyone within
//! about a second; one announcement per base interval however many
//! arrive) or a departure notice names it (its refutation). An unconnected
//! member is kept for three refresh intervals without news (or the
//! configured TTL, if longer).
//!
//! [`Cadence`] decides; the swarm task's glue follows.

use std::time::{Duration, Instant};

use fogmesh_protocols::{Capabilities, LoadReport, Message, NodeId, encode_message};
use libp2p::gossipsub;

use super::event_loop::Runner;
use super::gossip::{CAPS_TOPIC, LOAD_TOPIC};

/// Members per base interval of the refresh cadence.
pub const MEMBERS_PER_INTERVAL: usize = 8;
/// Refreshes per refresh that carries the capabilities too.
pub const CAPS_EVERY: u32 = 4;
/// A refresh this long after the last capabilities carries them whatever
/// [`CAPS_EVERY`] says (a member that missed them, in a large mesh, hears
/// them again within about this).
pub const CAPS_MAX_GAP: Duration = Duration::from_secs(60);
/// Longest random delay of an announcement for a newcomer (spreads the
/// answers of a mesh that all heard of it at once).
pub const NEWCOMER_JITTER: Duration = Duration::from_millis(500);

/// What is due to go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    /// The capabilities.
    pub caps: bool,
    /// The load report.
    pub load: bool,
}

/// The announcement schedule of one member.
#[derive(Debug, Clone)]
pub struct Cadence {
    base: Duration,
    next_full: Instant,
    /// Refreshes since the capabilities last went out, and when they did.
    since_caps: u32,
    last_caps: Option<Instant>,
    last_full: Option<Instant>,
    last_load: Option<Instant>,
    load_changed: bool,
    soon: Option<Instant>,
}

impl Cadence {
    /// A schedule with base interval `base`, its first announcement due at
    /// `now`.
    pub fn new(base: Duration, now: Instant) -> Self {
        Cadence { base, next_full: now, since_caps: 0, last_caps: None, last_full: None, last_load: None, load_changed: false, soon: None }
    }

    /// The refresh interval in a mesh of `members` (this one included).
    pub fn refresh(&self, members: usize) -> Duration {
        self.base.mul_f64((members as f64 / MEMBERS_PER_INTERVAL as f64).max(1.0))
    }

    /// How long an unconnected member stays in the view without news.
    pub fn ttl(&self, configured: Duration, members: usize) -> Duration {
        configured.max(self.refresh(members) * 3)
    }

    /// This member's load changed.
    pub fn load_changed(&mut self) {
        self.load_changed = true;
    }

    /// A member new to this one appeared at `now`: announce after `jitter`,
    /// but no sooner than a base interval after the last announcement.
    pub fn newcomer(&mut self, now: Instant, jitter: Duration) {
        let earliest = self.last_full.map_or(now, |t| t + self.base);
        let at = earliest.max(now + jitter);
        self.soon = Some(self.soon.map_or(at, |s| s.min(at)));
    }

    /// Announce at once (a departure notice named this member, or its
    /// capabilities changed).
    pub fn at_once(&mut self, now: Instant) {
        self.soon = Some(now);
    }

    /// What goes out at `now` in a mesh of `members`.
    pub fn due(&mut self, now: Instant, members: usize) -> Due {
        let soon = self.soon.is_some_and(|t| now >= t);
        if now >= self.next_full || soon {
            // The capabilities ride an announcement asked for, and every
            // CAPS_EVERYth refresh or the first past CAPS_MAX_GAP (the very
            // first one included).
            let caps = soon
                || self.since_caps + 1 >= CAPS_EVERY
                || self.last_caps.is_none_or(|t| now.saturating_duration_since(t) >= CAPS_MAX_GAP);
            self.since_caps = if caps { 0 } else { self.since_caps + 1 };
            if caps {
                self.last_caps = Some(now);
            }
            self.next_full = now + self.refresh(members);
            self.last_full = Some(now);
            self.last_load = Some(now);
            self.soon = None;
            self.load_changed = false;
            return Due { caps, load: true };
        }
        if self.load_changed && self.last_load.is_none_or(|t| now.saturating_duration_since(t) >= self.base) {
            self.load_changed = false;
            self.last_load = Some(now);
            return Due { caps: false, load: true };
        }
        Due::default()
    }
}

impl Runner {
    pub(super) fn publish(&mut self, topic: &str, msg: &Message) {
        let mut buf = Vec::new();
        if let Err(e) = encode_message(msg, &self.cfg.limits, &mut buf) {
            tracing::warn!(error = %e, "cannot encode gossip");
            return;
        }
        match self.swarm.behaviour_mut().gossipsub.publish(gossipsub::IdentTopic::new(topic), buf) {
            Ok(_) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => tracing::debug!(topic, error = %e, "gossip not published"),
        }
    }

    /// Sends what the cadence says is due.
    pub(super) fn announce_due(&mut self, now: Instant) {
        let members = self.membership.len() + 1;
        let ttl = self.cadence.ttl(self.cfg.peer_ttl, members);
        self.membership.set_ttl(ttl);
        let due = self.cadence.due(now, members);
        // The load first: after a departure notice, a newer report is what
        // lets this member back into the views its capabilities reach.
        if due.load {
            self.announce_load();
        }
        if due.caps {
            self.announce_caps();
        }
    }

    fn announce_caps(&mut self) {
        let m = &self.cfg.measurement;
        let caps = Message::Capabilities(Capabilities {
            peer: NodeId::from(self.swarm.local_peer_id().to_string()),
            cores: m.cores,
            memory_bytes: m.memory_bytes,
            gflops: m.gflops,
            version: m.version.clone(),
            models: self.cfg.models.clone(),
            partial: self.cfg.partial.clone(),
            addrs: self.announced_addrs(),
        });
        self.publish(CAPS_TOPIC, &caps);
    }

    fn announce_load(&mut self) {
        let me = NodeId::from(self.swarm.local_peer_id().to_string());
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let load = Message::LoadReport(LoadReport { peer: me, timestamp_ms: now_ms, shards: self.load.clone() });
        self.publish(LOAD_TOPIC, &load);
    }

    /// Where members may dial this one: confirmed external addresses first,
    /// then the listen addresses (never unspecified ones), at most
    /// [`super::gossip::MAX_ANNOUNCED_ADDRS`].
    fn announced_addrs(&self) -> Vec<String> {
        let external = self.swarm.external_addresses().cloned();
        let mut out: Vec<String> = Vec::new();
        for a in external.chain(self.listen_addrs.iter().cloned()) {
            let s = a.to_string();
            if super::dialer::dialable(&a, None) && !out.contains(&s) {
                out.push(s);
            }
        }
        out.truncate(super::gossip::MAX_ANNOUNCED_ADDRS);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refresh_slows_with_the_mesh_and_the_ttl_follows() {
        let t0 = Instant::now();
        let c = Cadence::new(Duration::from_secs(2), t0);
        assert_eq!(c.refresh(5), Duration::from_secs(2));
        assert_eq!(c.refresh(64), Duration::from_secs(16));
        assert_eq!(c.refresh(200), Duration::from_secs(50));
        assert_eq!(c.ttl(Duration::from_secs(10), 5), Duration::from_secs(10));
        assert_eq!(c.ttl(Duration::from_secs(10), 200), Duration::from_secs(150));
    }

    #[test]
    fn load_changes_go_out_at_most_once_per_base_interval_and_newcomers_are_answered_once() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut c = Cadence::new(Duration::from_secs(2), t0);
        assert_eq!(c.due(t0, 64), Due { caps: true, load: true });
        assert_eq!(c.due(t0 + s, 64), Due::default());
        c.load_changed();
        assert_eq!(c.due(t0 + s, 64), Due::default(), "too soon after the last report");
        assert_eq!(c.due(t0 + 2 * s, 64), Due { caps: false, load: true });
        assert_eq!(c.due(t0 + 3 * s, 64), Due::default());
        // Three newcomers at once: one announcement, after the jitter.
        for _ in 0..3 {
            c.newcomer(t0 + 3 * s, Duration::from_millis(300));
        }
        assert_eq!(c.due(t0 + 3 * s, 64), Due::default());
        assert_eq!(c.due(t0 + 3 * s + Duration::from_millis(300), 64), Due { caps: true, load: true });
        assert_eq!(c.due(t0 + 4 * s, 64), Due::default());
        // Right after an announcement a newcomer waits out the base interval.
        c.newcomer(t0 + 4 * s, Duration::ZERO);
        assert_eq!(c.due(t0 + 5 * s, 64), Due::default());
        assert_eq!(c.due(t0 + 5 * s + Duration::from_millis(300), 64), Due { caps: true, load: true });
        // The refresh: 16 s at 64 members, the load alone.
        let last = t0 + 5 * s + Duration::from_millis(300);
        assert_eq!(c.due(last + 15 * s, 64), Due::default());
        assert_eq!(c.due(last + 16 * s, 64), Due { caps: false, load: true });
        // A refutation goes out at once, with the capabilities.
        c.at_once(last + 17 * s);
        assert_eq!(c.due(last + 17 * s, 64), Due { caps: true, load: true });
    }

    #[test]
    fn the_capabilities_ride_every_fourth_refresh() {
        let t0 = Instant::now();
        let r = Duration::from_secs(2);
        let mut c = Cadence::new(r, t0);
        let caps: Vec<bool> = (0..9u32).map(|i| c.due(t0 + r * i, 4)).inspect(|d| assert!(d.load)).map(|d| d.caps).collect();
        assert_eq!(caps, [true, false, false, false, true, false, false, false, true]);
        // In a large mesh (a 50 s refresh at 200 members) the gap decides:
        // every second refresh.
        let mut c = Cadence::new(r, t0);
        let r200 = c.refresh(200);
        let caps: Vec<bool> = (0..5u32).map(|i| c.due(t0 + r200 * i, 200).caps).collect();
        assert_eq!(caps, [true, false, true, false, true]);
    }
}
