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

/// Checks that the data directory's state belongs to `node_id`: the id is
/// recorded in the store on first start; a different key later (its file
/// lost or replaced) is refused unless `accept_new` is set, in which case
/// the new id is recorded and a warning logged.
pub fn check_owner(
    store: &caroni_store::Store,
    node_id: &str,
    data_dir: &Path,
    accept_new: bool,
) -> anyhow::Result<()> {
    const META: caroni_store::Table<String> =
        caroni_store::Table::new(caroni_store::tables::META, "meta");
    match store.get(META, b"node_id")? {
        Some(owner) if owner == node_id => return Ok(()),
        Some(owner) if !accept_new => bail!(
            "the data directory {} holds the state of node {owner}, but its key {} is of node {node_id} (the key file was lost or replaced). Restore the original {KEY_FILE} to go on as {owner}, or start with --new-identity to go on as {node_id}: jobs and workflows peers hold for {owner} are then lost to this node",
            data_dir.display(),
            data_dir.join(KEY_FILE).display()
        ),
        Some(owner) => tracing::warn!(
            old = %owner,
            new = %node_id,
            "--new-identity: this data directory's state, kept by node {owner}, now belongs to {node_id}; peers will not recognise it"
        ),
        None => {}
    }
    store.put(META, b"node_id", &node_id.to_string())?;
    Ok(())
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
    fn a_replaced_key_is_refused_unless_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create(dir.path()).expect("create");
        let store = caroni_store::Store::open(&dir.path().join("db")).expect("store");
        let id_a = a.public().to_peer_id().to_string();
        check_owner(&store, &id_a, dir.path(), false).expect("first start");
        check_owner(&store, &id_a, dir.path(), false).expect("same key");
        std::fs::remove_file(dir.path().join(KEY_FILE)).expect("lose the key");
        let b = load_or_create(dir.path()).expect("new key");
        let id_b = b.public().to_peer_id().to_string();
        let e = check_owner(&store, &id_b, dir.path(), false).expect_err("refused");
        assert!(format!("{e:#}").contains("--new-identity"), "{e:#}");
        assert!(format!("{e:#}").contains(&id_a), "{e:#}");
        check_owner(&store, &id_b, dir.path(), true).expect("told to");
        check_owner(&store, &id_b, dir.path(), false).expect("now the owner");
    }

    #[test]
    fn a_corrupt_key_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(KEY_FILE), b"garbage").expect("write");
        let e = load_or_create(dir.path()).expect_err("corrupt");
        assert!(format!("{e:#}").contains("unreadable"), "{e:#}");
    }
}
