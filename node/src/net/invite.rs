//! Invite tokens: everything another host needs to join this mesh — the
//! cluster secret (when there is one) and the addresses where a member can
//! be reached (relayed ones too) — in one line of text a user can paste.
//!
//! `fogmesh1.` then base64url (no padding) of: version (1 byte), flags (bit
//! 0: a secret follows), the 32-byte secret, the address count (1 byte),
//! each address as a 2-byte big-endian length and its multiaddr bytes, and
//! the first 4 bytes of the SHA-256 of all of that (a checksum against
//! damaged copies, not a signature: the secret inside is what admits).
//! Tokens are secrets: only [`Invite::redacted`] goes to logs.

use data_encoding::BASE64URL_NOPAD;
use libp2p::Multiaddr;
use libp2p::pnet::PreSharedKey;
use sha2::{Digest, Sha256};

/// What every token starts with.
pub const PREFIX: &str = "fogmesh1.";
/// The token format this build writes and reads.
pub const VERSION: u8 = 1;
/// Addresses one token carries at most.
pub const MAX_ADDRS: usize = 8;
/// Longest address accepted, in bytes.
pub const MAX_ADDR_BYTES: usize = 256;
/// Longest token accepted, in characters.
pub const MAX_TOKEN_CHARS: usize = 4096;

const CHECKSUM: usize = 4;

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    /// Not a fogmesh invite at all.
    #[error("not a fogmesh invite (a token starts with {PREFIX}); ask for one with `fogmesh invite` on a member")]
    NotAnInvite,
    /// Written by a newer fogmesh.
    #[error("invite format {0} is newer than this fogmesh understands ({VERSION}); upgrade fogmesh")]
    Version(u8),
    /// Damaged in copying, or altered.
    #[error("invite is damaged or was altered ({0}); copy it again whole")]
    Damaged(&'static str),
    /// Carries no address to join through.
    #[error("invite carries no address to join through")]
    NoAddress,
}

/// A decoded invite.
#[derive(Clone, PartialEq, Eq)]
pub struct Invite {
    /// The cluster secret; None for an open mesh (the token then only says
    /// where to join).
    pub secret: Option<[u8; 32]>,
    /// Where members can be reached, each ending in `/p2p/PEER`.
    pub addrs: Vec<Multiaddr>,
}

impl std::fmt::Debug for Invite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invite").field("secret", &self.secret.map(|_| "…")).field("addrs", &self.addrs).finish()
    }
}

impl Invite {
    /// The token text (at most [`MAX_ADDRS`] addresses; longer ones are
    /// left out).
    pub fn encode(&self) -> String {
        let mut b = vec![VERSION, u8::from(self.secret.is_some())];
        if let Some(s) = &self.secret {
            b.extend_from_slice(s);
        }
        let addrs: Vec<Vec<u8>> =
            self.addrs.iter().map(|a| a.to_vec()).filter(|a| a.len() <= MAX_ADDR_BYTES).take(MAX_ADDRS).collect();
        b.push(addrs.len() as u8);
        for a in addrs {
            b.extend_from_slice(&(a.len() as u16).to_be_bytes());
            b.extend_from_slice(&a);
        }
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum[..CHECKSUM]);
        format!("{PREFIX}{}", BASE64URL_NOPAD.encode(&b))
    }

    /// Reads a token (whitespace around it ignored).
    pub fn decode(token: &str) -> Result<Invite, InviteError> {
        let t = token.trim();
        let body = t.strip_prefix(PREFIX).ok_or(InviteError::NotAnInvite)?;
        if t.len() > MAX_TOKEN_CHARS {
            return Err(InviteError::Damaged("too long"));
        }
        let b = BASE64URL_NOPAD.decode(body.as_bytes()).map_err(|_| InviteError::Damaged("not base64url"))?;
        if b.len() < 2 + CHECKSUM {
            return Err(InviteError::Damaged("too short"));
        }
        if b[0] > VERSION {
            return Err(InviteError::Version(b[0]));
        }
        let (data, sum) = b.split_at(b.len() - CHECKSUM);
        if Sha256::digest(data)[..CHECKSUM] != *sum {
            return Err(InviteError::Damaged("checksum mismatch"));
        }
        if data[0] != VERSION {
            return Err(InviteError::Damaged("unknown format"));
        }
        let mut r = Reader(&data[2..]);
        let secret = match data[1] {
            0 => None,
            1 => Some(r.take(32)?.try_into().expect("32 bytes")),
            _ => return Err(InviteError::Damaged("unknown flags")),
        };
        let n = r.take(1)?[0] as usize;
        if n > MAX_ADDRS {
            return Err(InviteError::Damaged("too many addresses"));
        }
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            let len = u16::from_be_bytes(r.take(2)?.try_into().expect("2 bytes")) as usize;
            if len > MAX_ADDR_BYTES {
                return Err(InviteError::Damaged("address too long"));
            }
            let a = Multiaddr::try_from(r.take(len)?.to_vec()).map_err(|_| InviteError::Damaged("bad address"))?;
            addrs.push(a);
        }
        if !r.0.is_empty() {
            return Err(InviteError::Damaged("trailing bytes"));
        }
        if addrs.is_empty() {
            return Err(InviteError::NoAddress);
        }
        Ok(Invite { secret, addrs })
    }

    /// The secret as libp2p's pre-shared key.
    pub fn psk(&self) -> Option<PreSharedKey> {
        self.secret.map(PreSharedKey::new)
    }

    /// What logs may show of the token: the secret's fingerprint and the
    /// address count, never the secret.
    pub fn redacted(&self) -> String {
        match self.psk() {
            Some(k) => format!("invite for cluster {} ({} addresses)", k.fingerprint(), self.addrs.len()),
            None => format!("invite to an open mesh ({} addresses)", self.addrs.len()),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InviteError> {
        if self.0.len() < n {
            return Err(InviteError::Damaged("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invite() -> Invite {
        let p = libp2p::PeerId::random();
        Invite {
            secret: Some([7; 32]),
            addrs: vec![
                format!("/ip4/10.88.0.1/tcp/4001/p2p/{p}").parse().unwrap(),
                format!("/ip4/10.88.0.1/tcp/4001/p2p/{p}/p2p-circuit/p2p/{}", libp2p::PeerId::random()).parse().unwrap(),
            ],
        }
    }

    #[test]
    fn tokens_round_trip_and_never_show_the_secret_in_logs() {
        let i = invite();
        let t = i.encode();
        assert!(t.starts_with(PREFIX) && t.len() < 400, "{t}");
        assert_eq!(Invite::decode(&format!("  {t}\n")).unwrap(), i);
        let open = Invite { secret: None, ..invite() };
        assert_eq!(Invite::decode(&open.encode()).unwrap(), open);
        let shown = format!("{} {:?}", i.redacted(), i);
        assert!(!shown.contains(&hex::encode([7u8; 32])) && !shown.contains("7, 7"), "{shown}");
    }

    #[test]
    fn every_damaged_or_foreign_token_is_a_clear_error() {
        let t = invite().encode();
        assert_eq!(Invite::decode("hello"), Err(InviteError::NotAnInvite));
        assert_eq!(Invite::decode(PREFIX), Err(InviteError::Damaged("too short")));
        assert_eq!(Invite::decode(&format!("{PREFIX}!!!!")), Err(InviteError::Damaged("not base64url")));
        // Every single-character change and every truncation is caught.
        let body = &t[PREFIX.len()..];
        for i in 0..body.len() {
            let mut chars: Vec<char> = body.chars().collect();
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
            let bad: String = chars.into_iter().collect();
            assert!(Invite::decode(&format!("{PREFIX}{bad}")).is_err(), "change at {i} went unnoticed");
            assert!(Invite::decode(&t[..PREFIX.len() + i]).is_err(), "truncation at {i} went unnoticed");
        }
        // A newer format says so; no address is refused.
        let mut b = vec![9u8, 0, 0];
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum[..4]);
        assert_eq!(Invite::decode(&format!("{PREFIX}{}", BASE64URL_NOPAD.encode(&b))), Err(InviteError::Version(9)));
        let none = Invite { secret: None, addrs: vec![] };
        assert_eq!(Invite::decode(&none.encode()), Err(InviteError::NoAddress));
        for e in [InviteError::NotAnInvite, InviteError::Version(9), InviteError::Damaged("x"), InviteError::NoAddress] {
            assert!(!e.to_string().is_empty());
        }
    }
}
