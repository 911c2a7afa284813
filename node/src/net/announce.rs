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
//! member new to it appears that says it is joining (so that a newcomer
//! hears of everyone within about a second; one announcement per base
//! interval however many arrive; in a mesh past 32 members, one per
//! quarter refresh), while it joins itself when a new connection's member
//! whose capabilities it lacks subscribes, or when a departure notice
//! names it (its refutation). An unconnected member is kept for three
//! refresh intervals of the largest mesh seen lately without news (or the
//! configured TTL, if longer).
//!
//! Gossip can lose a message (a forward queued too long on an overloaded
//! host is dropped): a member heard of by its load report or a connection
//! whose capabilities have not come after [`WANT_AFTER`] is asked for them
//! by a signed request naming it (at most one request per answer interval,
//! naming up to [`super::gossip::MAX_WANTED`]), and answers as it answers
//! a newcomer.
//!
//! [`Cadence`] decides; the swarm task's glue follows.

use std::time::{Duration, Instant};

use fogmesh_protocols::{Capabilities, CapsWanted, LoadReport, Message, NodeId, encode_message};
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
/// How long a member is in the view without its capabilities (heard of by
/// a load report or a connection: its capabilities were lost on the way)
/// before this member asks for them.
pub const WANT_AFTER: Duration = Duration::from_secs(5);
/// How long after its start a member's capabilities say it is joining
/// (two answer intervals at 200 members).
pub const JOINING_FOR: Duration = Duration::from_secs(30);
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
    /// The largest mesh seen lately, and when it was last that large.
    peak: (usize, Instant),
    /// When this member last asked for capabilities it lacks.
    last_want: Option<Instant>,
    /// When this member started.
    born: Instant,
}

impl Cadence {
    /// A schedule with base interval `base`, its first announcement due at
    /// `now`.
    pub fn new(base: Duration, now: Instant) -> Self {
        Cadence { base, next_full: now, since_caps: 0, last_caps: None, last_full: None, last_load: None, load_changed: false, soon: None, peak: (0, now), last_want: None, born: now }
    }

    /// The refresh interval in a mesh of `members` (this one included).
    pub fn refresh(&self, members: usize) -> Duration {
        self.base.mul_f64((members as f64 / MEMBERS_PER_INTERVAL as f64).max(1.0))
    }

    /// How long an unconnected member stays in the view without news, at
    /// `now` in a mesh of `members`: three refreshes of the largest mesh
    /// seen within the last such TTL (others refresh at the pace of the
    /// mesh they see, which may be larger than this member's view while
    /// it grows; a mesh that shrank keeps the longer TTL one TTL more).
    pub fn ttl(&mut self, configured: Duration, members: usize, now: Instant) -> Duration {
        let (peak, at) = self.peak;
        let held = configured.max(self.refresh(peak) * 3);
        if members >= peak || now.saturating_duration_since(at) > held {
            self.peak = (members, now);
        }
        configured.max(self.refresh(self.peak.0) * 3)
    }

    /// This member's load changed.
    pub fn load_changed(&mut self) {
        self.load_changed = true;
    }

    /// Whether this member is still joining at `now` (its capabilities ask
    /// every member that hears them first to announce itself): for
    /// [`JOINING_FOR`] after its start.
    pub fn joining(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.born) < JOINING_FOR
    }

    /// The shortest gap between two answers to newcomers in a mesh of
    /// `members`: a base interval up to [`MEMBERS_PER_INTERVAL`] ×
    /// [`CAPS_EVERY`] members, then growing with the mesh (a mesh whose
    /// members all join at once has every member answering newcomers for
    /// as long as the joins last: the answers a member receives per second
    /// stay about the same at any size).
    pub fn answer_gap(&self, members: usize) -> Duration {
        (self.refresh(members) / CAPS_EVERY).max(self.base)
    }

    /// A member new to this one appeared at `now`, in a mesh of `members`:
    /// announce after `jitter`, but no sooner than [`Cadence::answer_gap`]
    /// after the last announcement.
    pub fn newcomer(&mut self, now: Instant, jitter: Duration, members: usize) {
        let earliest = self.last_full.map_or(now, |t| t + self.answer_gap(members));
        let at = earliest.max(now + jitter);
        self.soon = Some(self.soon.map_or(at, |s| s.min(at)));
    }

    /// Announce at once (a departure notice named this member, or its
    /// capabilities changed).
    pub fn at_once(&mut self, now: Instant) {
        self.soon = Some(now);
    }

    /// Whether this member may ask for missing capabilities at `now`, in a
    /// mesh of `members` (as often as it may answer newcomers); if so, the
    /// ask counts as made.
    pub fn want_due(&mut self, now: Instant, members: usize) -> bool {
        if self.last_want.is_some_and(|t| now.saturating_duration_since(t) < self.answer_gap(members)) {
            return false;
        }
        self.last_want = Some(now);
        true
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
        let ttl = self.cadence.ttl(self.cfg.peer_ttl, members, now);
        self.membership.set_ttl(ttl);
        let due = self.cadence.due(now, members);
        // The load first: after a departure notice, a newer report is what
        // lets this member back into the views its capabilities reach.
        if due.load {
            self.announce_load();
        }
        if due.caps {
            self.announce_caps(now);
        }
        self.want_lacking(now, members);
    }

    /// Announces soon (after a random delay), coalesced with this member's
    /// other answers: to a joining newcomer, or to a request naming it.
    pub(super) fn answer_soon(&mut self, now: Instant) {
        let jitter = NEWCOMER_JITTER.mul_f64(rand::random::<f64>());
        self.cadence.newcomer(now, jitter, self.membership.len() + 1);
    }

    /// Asks for the capabilities of members heard of without them, if any
    /// and if due: each member named announces them again (its answer
    /// coalesced with its answers to newcomers).
    fn want_lacking(&mut self, now: Instant, members: usize) {
        let wanted: Vec<NodeId> =
            self.membership.lacking_capabilities(now, WANT_AFTER).take(super::gossip::MAX_WANTED).map(|p| NodeId::from(p.to_string())).collect();
        if wanted.is_empty() || !self.cadence.want_due(now, members) {
            return;
        }
        tracing::debug!(members = wanted.len(), "asking for capabilities not heard");
        let me = NodeId::from(self.swarm.local_peer_id().to_string());
        self.publish(CAPS_TOPIC, &Message::CapsWanted(CapsWanted { peer: me, wanted }));
    }

    fn announce_caps(&mut self, now: Instant) {
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
            joining: self.cadence.joining(now),
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
        let mut c = Cadence::new(Duration::from_secs(2), t0);
        assert_eq!(c.refresh(5), Duration::from_secs(2));
        assert_eq!(c.refresh(64), Duration::from_secs(16));
        assert_eq!(c.refresh(200), Duration::from_secs(50));
        let ten = Duration::from_secs(10);
        assert_eq!(c.ttl(ten, 5, t0), ten);
        assert_eq!(c.ttl(ten, 200, t0), Duration::from_secs(150));
        // A view that shrinks keeps the larger mesh's TTL one TTL more.
        assert_eq!(c.ttl(ten, 40, t0 + Duration::from_secs(150)), Duration::from_secs(150));
        assert_eq!(c.ttl(ten, 40, t0 + Duration::from_secs(151)), Duration::from_secs(30));
        assert_eq!(c.answer_gap(16), Duration::from_secs(2));
        assert_eq!(c.answer_gap(64), Duration::from_secs(4));
        assert_eq!(c.answer_gap(200), Duration::from_millis(12_500));
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
            c.newcomer(t0 + 3 * s, Duration::from_millis(300), 16);
        }
        assert_eq!(c.due(t0 + 3 * s, 64), Due::default());
        assert_eq!(c.due(t0 + 3 * s + Duration::from_millis(300), 64), Due { caps: true, load: true });
        assert_eq!(c.due(t0 + 4 * s, 64), Due::default());
        // Right after an announcement a newcomer waits out the base interval.
        c.newcomer(t0 + 4 * s, Duration::ZERO, 16);
        assert_eq!(c.due(t0 + 5 * s, 64), Due::default());
        assert_eq!(c.due(t0 + 5 * s + Duration::from_millis(300), 64), Due { caps: true, load: true });
        // In a larger mesh the answers space out more.
        c.newcomer(t0 + 6 * s, Duration::ZERO, 64);
        assert_eq!(c.due(t0 + 9 * s, 64), Due::default());
        assert_eq!(c.due(t0 + 9 * s + Duration::from_millis(300), 64), Due { caps: true, load: true });
        // The refresh: 16 s at 64 members, the load alone.
        let last = t0 + 9 * s + Duration::from_millis(300);
        assert_eq!(c.due(last + 15 * s, 64), Due::default());
        assert_eq!(c.due(last + 16 * s, 64), Due { caps: false, load: true });
        // A refutation goes out at once, with the capabilities.
        c.at_once(last + 17 * s);
        assert_eq!(c.due(last + 17 * s, 64), Due { caps: true, load: true });
    }

    #[test]
    fn requests_for_missing_capabilities_are_spaced_like_the_answers() {
        let t0 = Instant::now();
        let mut c = Cadence::new(Duration::from_secs(2), t0);
        assert!(c.want_due(t0, 200));
        assert!(!c.want_due(t0 + Duration::from_secs(12), 200));
        assert!(c.want_due(t0 + Duration::from_millis(12_500), 200));
        assert!(!c.want_due(t0 + Duration::from_secs(14), 8));
        assert!(c.want_due(t0 + Duration::from_millis(14_500), 8));
        // Its capabilities say it joins for a while after its start.
        assert!(c.joining(t0 + JOINING_FOR - Duration::from_millis(1)));
        assert!(!c.joining(t0 + JOINING_FOR));
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
