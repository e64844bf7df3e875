//! The node's persistent ed25519 key: `node.key` in the data directory. The
//! node id is the libp2p PeerId of this key, so it is the same after every
//! restart.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use libp2p::identity::Keypair;

const KEY_FILE: &str = "node.key";

/// Loads the node key, creating it (mode 0600) on first start.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Keypair> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let key = Keypair::from_protobuf_encoding(&bytes).with_context(|| {
                format!("the node key {} is unreadable (not a libp2p protobuf key); restore it from a backup, or remove it to start as a new node", path.display())
            })?;
            if key.key_type() != libp2p::identity::KeyType::Ed25519 {
                bail!("the node key {} is not an ed25519 key", path.display());
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .context("cannot encode the new node key")?;
            let tmp = data_dir.join(format!("{KEY_FILE}.tmp"));
            let mut f = open_private(&tmp)
                .with_context(|| format!("cannot write the node key in {}", data_dir.display()))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read the node key {}", path.display())),
    }
}

fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_key_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create(dir.path()).expect("create");
        let b = load_or_create(dir.path()).expect("load");
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    }

    #[test]
    fn a_corrupt_key_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(KEY_FILE), b"garbage").expect("write");
        let e = load_or_create(dir.path()).expect_err("corrupt");
        assert!(format!("{e:#}").contains("unreadable"), "{e:#}");
    }
}
