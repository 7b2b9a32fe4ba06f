//! The identity a data directory carries: the id of the cluster it belongs
//! to and the incarnation of the directory itself.
//!
//! - `cluster-id`: 128 random bits, written when a node bootstraps a new
//!   cluster or first joins one (learned from the peer it joins through).
//!   Peers of another cluster are refused at the handshake; clients pin it.
//! - `node-incarnation`: 64 random bits, written when the directory is first
//!   used. Recorded in the membership when the node joins; a node that
//!   presents another incarnation under the same node id has lost its data
//!   (and with it its vote and log) and is refused its old voter slot.
//!
//! Both files are written with write-to-temp, fsync, rename, fsync of the
//! directory, so a crash leaves either no file or a complete one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The cluster id file of a data directory.
pub const CLUSTER_ID_FILE: &str = "cluster-id";
/// The incarnation file of a data directory.
pub const INCARNATION_FILE: &str = "node-incarnation";

/// A data directory's identity files could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("data directory {path}: {reason}")]
pub struct IdentityError {
    pub path: String,
    pub reason: String,
}

/// The identity of this node's data directory. The cluster id is set once
/// (bootstrap or join) and never changes afterwards. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DataIdentity {
    dir: PathBuf,
    incarnation: u64,
    cluster_id: Arc<RwLock<Option<u128>>>,
}

fn err(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Write `text` to `dir/name` atomically and durably.
fn write_durable(dir: &Path, name: &str, text: &str) -> Result<(), IdentityError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| err(&tmp, e.to_string()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| err(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| err(&path, e.to_string()))?;
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| err(dir, e.to_string()))
}

/// Read a hex number file; `None` if it does not exist.
fn read_hex(path: &Path) -> Result<Option<u128>, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(text) => u128::from_str_radix(text.trim(), 16)
            .map(Some)
            .map_err(|e| err(path, format!("corrupt contents: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(path, e.to_string())),
    }
}

impl DataIdentity {
    /// Open (creating the incarnation if needed) the identity of `dir`.
    pub fn open(dir: &Path) -> Result<DataIdentity, IdentityError> {
        let inc_path = dir.join(INCARNATION_FILE);
        let incarnation = match read_hex(&inc_path)? {
            Some(v) => u64::try_from(v).map_err(|_| err(&inc_path, "value out of range"))?,
            None => {
                // Never 0, so 0 can mean "unknown" in handshakes.
                let v = rand::random::<u64>().max(1);
                write_durable(dir, INCARNATION_FILE, &format!("{v:016x}\n"))?;
                v
            }
        };
        let cluster_id = read_hex(&dir.join(CLUSTER_ID_FILE))?;
        Ok(DataIdentity {
            dir: dir.to_path_buf(),
            incarnation,
            cluster_id: Arc::new(RwLock::new(cluster_id)),
        })
    }

    /// This data directory's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The cluster this directory belongs to, once known.
    pub fn cluster_id(&self) -> Option<u128> {
        *self.cluster_id.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Record the cluster id (bootstrap: a new random one; join: the
    /// cluster's). Refused if the directory already belongs to another one.
    pub fn set_cluster_id(&self, id: u128) -> Result<(), IdentityError> {
        let mut g = self.cluster_id.write().unwrap_or_else(|p| p.into_inner());
        match *g {
            Some(current) if current == id => Ok(()),
            Some(current) => Err(err(
                &self.dir,
                format!(
                    "belongs to cluster {current:032x}, not {id:032x}; \
                     use an empty data directory to join another cluster"
                ),
            )),
            None => {
                write_durable(&self.dir, CLUSTER_ID_FILE, &format!("{id:032x}\n"))?;
                *g = Some(id);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incarnation_is_stable_and_cluster_id_set_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = DataIdentity::open(dir.path()).unwrap();
        assert_eq!(a.cluster_id(), None);
        a.set_cluster_id(42).unwrap();
        a.set_cluster_id(42).unwrap();
        assert!(a.set_cluster_id(43).is_err());
        let b = DataIdentity::open(dir.path()).unwrap();
        assert_eq!(b.incarnation(), a.incarnation());
        assert_eq!(b.cluster_id(), Some(42));
        assert_ne!(a.incarnation(), 0);
    }

    #[test]
    fn a_wiped_directory_gets_a_new_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let a = DataIdentity::open(dir.path()).unwrap().incarnation();
        std::fs::remove_file(dir.path().join(INCARNATION_FILE)).unwrap();
        let b = DataIdentity::open(dir.path()).unwrap().incarnation();
        assert_ne!(a, b);
    }

    #[test]
    fn corrupt_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CLUSTER_ID_FILE), "not hex").unwrap();
        let e = DataIdentity::open(dir.path()).unwrap_err();
        assert!(e.reason.contains("corrupt"), "{e}");
    }
}
