//! The node's persistent identity key and the cluster secret.

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;

/// Errors reading keys and secrets.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The secret is not 64 hex digits (32 bytes).
    #[error("cluster secret must be 64 hex digits (32 bytes), or a go-libp2p swarm.key file: {0}")]
    BadSecret(String),
    /// A file could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The identity file exists but does not hold a key.
    #[error("{0}: not a libp2p identity key ({1}); move it away to make a new identity")]
    BadIdentity(PathBuf, String),
}

/// Name of the identity key file inside the data dir.
pub const IDENTITY_FILE: &str = "identity.key";

/// Loads the ed25519 identity in `data_dir`, creating it (mode 0600) on first
/// use so the node keeps its peer id across restarts.
pub fn load_or_create_identity(data_dir: &Path) -> Result<Keypair, KeyError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |source| KeyError::Io { path: path.clone(), source };
    match std::fs::read(&path) {
        Ok(bytes) => {
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| KeyError::BadIdentity(path.clone(), e.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(|source| KeyError::Io { path: data_dir.into(), source })?;
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| KeyError::BadIdentity(path.clone(), e.to_string()))?;
            let tmp = path.with_extension("key.tmp");
            {
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&tmp).map_err(io)?;
                f.write_all(&bytes).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Parses a cluster secret: 64 hex digits (whitespace around them ignored),
/// or the three-line go-libp2p `swarm.key` format.
pub fn parse_secret(text: &str) -> Result<PreSharedKey, KeyError> {
    let t = text.trim();
    if t.starts_with("/key/swarm/psk/") {
        return t.parse::<PreSharedKey>().map_err(|e| KeyError::BadSecret(e.to_string()));
    }
    let bytes = hex::decode(t).map_err(|e| KeyError::BadSecret(e.to_string()))?;
    let key: [u8; 32] =
        bytes.try_into().map_err(|b: Vec<u8>| KeyError::BadSecret(format!("{} bytes given", b.len())))?;
    Ok(PreSharedKey::new(key))
}

/// Reads a cluster secret from a file (see [`parse_secret`]).
pub fn read_secret_file(path: &Path) -> Result<PreSharedKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.into(), source })?;
    parse_secret(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_identity(dir.path()).unwrap();
        let b = load_or_create_identity(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(dir.path().join(IDENTITY_FILE), b"junk").unwrap();
        assert!(matches!(load_or_create_identity(dir.path()), Err(KeyError::BadIdentity(..))));
    }

    #[test]
    fn secrets() {
        let hex64 = "ab".repeat(32);
        let k = parse_secret(&format!("  {hex64}\n")).unwrap();
        let file = format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex64}\n");
        assert_eq!(parse_secret(&file).unwrap().fingerprint().to_string(), k.fingerprint().to_string());
        for bad in ["", "abc", &"ab".repeat(31), &"zz".repeat(32), &"ab".repeat(33)] {
            assert!(matches!(parse_secret(bad), Err(KeyError::BadSecret(_))), "{bad:?}");
        }
    }
}
