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
    /// A key or secret file others on this host can read.
    #[error("{path}: readable by group or others (mode {mode:o}); run `chmod 600 {path}`", path = .0.display(), mode = .1)]
    LoosePermissions(PathBuf, u32),
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
            private(&path)?;
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| KeyError::BadIdentity(path.clone(), e.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(|source| KeyError::Io { path: data_dir.into(), source })?;
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| KeyError::BadIdentity(path.clone(), e.to_string()))?;
            write_private(&path, &bytes)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Writes `bytes` to `path` readable by its owner only (mode 0600), whole
/// or not at all (a temporary file renamed into place).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io { path: path.into(), source };
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
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

/// The 32 bytes of a cluster secret (for invites).
pub fn secret_bytes(key: &PreSharedKey) -> [u8; 32] {
    // The key's only export is its swarm.key text: its last line is the hex.
    let text = key.to_string();
    let hex_line = text.lines().last().unwrap_or_default();
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_line.trim(), &mut out).expect("a PreSharedKey prints 64 hex digits");
    out
}

/// Makes a new random cluster secret in `path` (mode 0600), or reads the
/// one already there: `fogmesh node --private` keeps its cluster across
/// restarts.
pub fn load_or_create_secret(path: &Path) -> Result<PreSharedKey, KeyError> {
    if path.exists() {
        return read_secret_file(path);
    }
    let io = |source| KeyError::Io { path: path.into(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    write_private(path, format!("{}\n", hex::encode(key)).as_bytes())?;
    Ok(PreSharedKey::new(key))
}

/// Name of the file `--private` keeps the cluster secret in (data dir).
pub const SECRET_FILE: &str = "cluster.key";

/// Reads a cluster secret from a file (see [`parse_secret`]); the file must
/// be private to its owner.
pub fn read_secret_file(path: &Path) -> Result<PreSharedKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.into(), source })?;
    private(path)?;
    parse_secret(&text)
}

/// Reads an HTTP API key from the first line of a file private to its
/// owner.
pub fn read_api_key_file(path: &Path) -> Result<String, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.into(), source })?;
    private(path)?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// Refuses a key or secret file that group or others may read or write.
fn private(path: &Path) -> Result<(), KeyError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(|source| KeyError::Io { path: path.into(), source })?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::LoosePermissions(path.into(), mode & 0o777));
        }
    }
    Ok(())
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
        let path = dir.path().join(IDENTITY_FILE);
        std::fs::write(&path, b"junk").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(load_or_create_identity(dir.path()), Err(KeyError::LoosePermissions(..))));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(matches!(load_or_create_identity(dir.path()), Err(KeyError::BadIdentity(..))));
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_others_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.hex");
        std::fs::write(&path, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret_file(&path).unwrap_err();
        assert!(matches!(e, KeyError::LoosePermissions(_, 0o644)) && e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_secret_file(&path).is_ok());
    }

    #[test]
    fn private_clusters_keep_their_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d").join(SECRET_FILE);
        let a = load_or_create_secret(&path).unwrap();
        let b = load_or_create_secret(&path).unwrap();
        assert_eq!(secret_bytes(&a), secret_bytes(&b));
        assert_eq!(PreSharedKey::new(secret_bytes(&a)).fingerprint().to_string(), a.fingerprint().to_string());
        let other = load_or_create_secret(&dir.path().join("e").join(SECRET_FILE)).unwrap();
        assert_ne!(secret_bytes(&a), secret_bytes(&other));
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
