//! The daemon's state on disk: one redb database (`state.redb` in the data directory). Every
//! change is committed (redb's default durability: fsync'ed) before the API acknowledges it,
//! so a `kill -9` of the daemon at any moment loses nothing it answered for.
//!
//! Tables: `vms` (name → [`VmRecord`] as JSON), `operations` (id → [`api::Operation`] as
//! JSON), `meta` (counters: the next operation id).

use api::{Operation, Vm};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const OPERATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("operations");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const NEXT_OPERATION: &str = "next_operation";

/// What is stored for a VM: what the API shows, and what the daemon needs to find its process
/// again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM as the API shows it.
    pub vm: Vm,
    /// The process's start time (field 22 of /proc/PID/stat), to tell it from a later process
    /// that got the same pid.
    pub proc_start: Option<u64>,
    /// The process's per-VM API socket, where it is not `<vm dir>/vmm.sock` (a same-host
    /// migration's destination listens on another path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<std::path::PathBuf>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("state database {what}: {reason}")]
pub struct StoreError {
    what: &'static str,
    reason: String,
}

fn fail(what: &'static str) -> impl Fn(String) -> StoreError {
    move |reason| StoreError { what, reason }
}

/// The database.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the database at `path`, with its tables.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db =
            Database::create(path).map_err(|e| fail("open")(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(|e| fail("write")(e.to_string()))?;
        {
            txn.open_table(VMS).map_err(|e| fail("open table vms")(e.to_string()))?;
            txn.open_table(OPERATIONS).map_err(|e| fail("open table operations")(e.to_string()))?;
            txn.open_table(META).map_err(|e| fail("open table meta")(e.to_string()))?;
            txn.open_table(TOKENS).map_err(|e| fail("open table tokens")(e.to_string()))?;
        }
        txn.commit().map_err(|e| fail("commit")(e.to_string()))?;
        Ok(Store { db })
    }

    /// Every VM record.
    pub fn vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| fail("read")(e.to_string()))?;
        let table = txn.open_table(VMS).map_err(|e| fail("read vms")(e.to_string()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| fail("read vms")(e.to_string()))? {
            let (_, value) = entry.map_err(|e| fail("read vms")(e.to_string()))?;
            out.push(
                serde_json::from_slice(value.value())
                    .map_err(|e| fail("decode a VM")(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// Stores (creates or replaces) a VM record, durably.
    pub fn put_vm(&self, record: &VmRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| fail("encode a VM")(e.to_string()))?;
        let txn = self.db.begin_write().map_err(|e| fail("write")(e.to_string()))?;
        {
            let mut table = txn.open_table(VMS).map_err(|e| fail("write vms")(e.to_string()))?;
            table
                .insert(record.vm.spec.name.as_str(), bytes.as_slice())
                .map_err(|e| fail("write vms")(e.to_string()))?;
        }
        txn.commit().map_err(|e| fail("commit")(e.to_string()))
    }

    /// Removes a VM record, durably.
    pub fn delete_vm(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| fail("write")(e.to_string()))?;
        {
            let mut table = txn.open_table(VMS).map_err(|e| fail("write vms")(e.to_string()))?;
            table.remove(name).map_err(|e| fail("write vms")(e.to_string()))?;
        }
        txn.commit().map_err(|e| fail("commit")(e.to_string()))
    }

    /// Takes the next operation id, durably (ids are never reused, even across restarts).
    pub fn next_operation_id(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(|e| fail("write")(e.to_string()))?;
        let id;
        {
            let mut table = txn.open_table(META).map_err(|e| fail("write meta")(e.to_string()))?;
            id = table
                .get(NEXT_OPERATION)
                .map_err(|e| fail("read meta")(e.to_string()))?
                .map(|v| v.value())
                .unwrap_or(1);
            table
                .insert(NEXT_OPERATION, id.saturating_add(1))
                .map_err(|e| fail("write meta")(e.to_string()))?;
        }
        txn.commit().map_err(|e| fail("commit")(e.to_string()))?;
        Ok(id)
    }

    /// Stores an operation, durably.
    pub fn put_operation(&self, op: &Operation) -> Result<(), StoreError> {
        let bytes =
            serde_json::to_vec(op).map_err(|e| fail("encode an operation")(e.to_string()))?;
        let txn = self.db.begin_write().map_err(|e| fail("write")(e.to_string()))?;
        {
            let mut table =
                txn.open_table(OPERATIONS).map_err(|e| fail("write operations")(e.to_string()))?;
            table
                .insert(op.id, bytes.as_slice())
                .map_err(|e| fail("write operations")(e.to_string()))?;
        }
        txn.commit().map_err(|e| fail("commit")(e.to_string()))
    }

    /// Every operation, oldest first.
    pub fn operations(&self) -> Result<Vec<Operation>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| fail("read")(e.to_string()))?;
        let table =
            txn.open_table(OPERATIONS).map_err(|e| fail("read operations")(e.to_string()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| fail("read operations")(e.to_string()))? {
            let (_, value) = entry.map_err(|e| fail("read operations")(e.to_string()))?;
            out.push(
                serde_json::from_slice(value.value())
                    .map_err(|e| fail("decode an operation")(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// Every token: (info, SHA-256 digest of the secret in hex).
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| fail("read")(e.to_string()))?;
        let table = txn.open_table(TOKENS).map_err(|e| fail("read tokens")(e.to_string()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| fail("read tokens")(e.to_string()))? {
            let (_, value) = entry.map_err(|e| fail("read tokens")(e.to_string()))?;
            out.push(
                serde_json::from_slice(value.value())
                    .map_err(|e| fail("decode a token")(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// Stores a token, durably.
    pub fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(token).map_err(|e| fail("encode a token")(e.to_string()))?;
        let txn = self.db.begin_write().map_err(|e| fail("write")(e.to_string()))?;
        {
            let mut table =
                txn.open_table(TOKENS).map_err(|e| fail("write tokens")(e.to_string()))?;
            table
                .insert(token.info.name.as_str(), bytes.as_slice())
                .map_err(|e| fail("write tokens")(e.to_string()))?;
        }
        txn.commit().map_err(|e| fail("commit")(e.to_string()))
    }

    /// Removes a token, durably; whether it existed.
    pub fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(|e| fail("write")(e.to_string()))?;
        let existed;
        {
            let mut table =
                txn.open_table(TOKENS).map_err(|e| fail("write tokens")(e.to_string()))?;
            existed =
                table.remove(name).map_err(|e| fail("write tokens")(e.to_string()))?.is_some();
        }
        txn.commit().map_err(|e| fail("commit")(e.to_string()))?;
        Ok(existed)
    }
}

/// A stored token: what the API shows, and the digest of the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Name and creation time.
    pub info: api::TokenInfo,
    /// SHA-256 of the secret, hex.
    pub digest: String,
}
