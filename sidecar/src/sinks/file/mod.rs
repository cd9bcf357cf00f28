//! `sink.file`: each worker's output appended to `<dir>/<worker>.out`, exactly once, with a transaction log
//! `<dir>/<worker>.txnlog` (one JSON object per line, fsynced) in the manner of upstream's ALOC reference sink.
//!
//! Readers trust `<worker>.out` only up to the `end` of the last `commit` record of the log
//! ([`committed_output`] does that). Phase 1 fsyncs the data and logs `prepare`; Phase 2 logs `commit`, or
//! truncates and logs `abort`. Recovery replays the log and truncates anything past the durable state.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use wallaroo_crds::FileSink as FileSinkConfig;

use crate::runtime::Health;
use crate::runtime::sink_api::{Guarantee, Recovery, SinkError, SinkIntegration, SinkRecord, Txn};

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
enum LogEntry {
    Prepare { txn: String, start: u64, end: u64 },
    Commit { txn: String, end: u64 },
    Abort { txn: String, start: u64 },
}

struct WorkerFiles {
    out: File,
    log: File,
    /// Current length of `out` (staged bytes included).
    len: u64,
}

pub struct FileSink {
    dir: PathBuf,
    workers: Mutex<HashMap<String, WorkerFiles>>,
}

fn io(e: std::io::Error) -> SinkError {
    SinkError::Transient(format!("file sink: {e}"))
}

/// Worker names come from the network: keep them to a safe file name.
fn file_stem(worker: &str) -> String {
    let clean: String =
        worker.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if clean.is_empty() || clean.starts_with('.') { format!("w{clean}") } else { clean }
}

pub fn out_path(dir: &Path, worker: &str) -> PathBuf {
    dir.join(format!("{}.out", file_stem(worker)))
}

pub fn log_path(dir: &Path, worker: &str) -> PathBuf {
    dir.join(format!("{}.txnlog", file_stem(worker)))
}

/// Replays a transaction log: (end of last commit, pending prepared transaction).
fn replay(path: &Path) -> Result<(u64, Option<Txn>), SinkError> {
    let mut committed = 0;
    let mut pending: Option<Txn> = None;
    let Ok(f) = File::open(path) else { return Ok((0, None)) };
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        // A torn last line (crash mid-append) is ignored: its fsync never returned, so nobody relied on it.
        let Ok(entry) = serde_json::from_str::<LogEntry>(&line) else {
            tracing::warn!(path = %path.display(), line = n + 1, "ignoring unreadable txnlog line");
            continue;
        };
        match entry {
            LogEntry::Prepare { txn, start, end } => pending = Some(Txn { id: txn.into(), start, end }),
            LogEntry::Commit { txn, end } => {
                committed = end;
                pending = pending.filter(|p| p.id_str() != txn);
            }
            LogEntry::Abort { txn, .. } => pending = pending.filter(|p| p.id_str() != txn),
        }
    }
    Ok((committed, pending))
}

/// The committed bytes of one worker's output: what downstream readers may trust.
pub fn committed_output(dir: &Path, worker: &str) -> std::io::Result<Vec<u8>> {
    let (committed, _) = replay(&log_path(dir, worker)).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut data = std::fs::read(out_path(dir, worker)).unwrap_or_default();
    data.truncate(committed as usize);
    Ok(data)
}

impl FileSink {
    pub fn open(cfg: FileSinkConfig, health: Health) -> Result<Self, SinkError> {
        let dir = PathBuf::from(&cfg.dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| SinkError::Permanent(format!("spec.sink.file.dir: cannot create {}: {e}", dir.display())))?;
        health.set_external(true);
        Ok(Self { dir, workers: Mutex::new(HashMap::new()) })
    }

    fn append_log(files: &mut WorkerFiles, entry: &LogEntry) -> Result<(), SinkError> {
        let mut line = serde_json::to_vec(entry).map_err(|e| SinkError::Permanent(e.to_string()))?;
        line.push(b'\n');
        files.log.write_all(&line).map_err(io)?;
        files.log.sync_data().map_err(io)
    }
}

#[async_trait::async_trait]
impl SinkIntegration for FileSink {
    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }

    async fn recover(&self, worker: &str) -> Result<Recovery, SinkError> {
        let (committed, pending) = replay(&log_path(&self.dir, worker))?;
        let keep = pending.as_ref().map_or(committed, |p| p.end);
        let out = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(out_path(&self.dir, worker))
            .map_err(io)?;
        let len = out.metadata().map_err(io)?.len();
        if len < keep {
            return Err(SinkError::Permanent(format!(
                "{}: holds {len} bytes but the log says {keep} are durable; the output file was modified",
                out_path(&self.dir, worker).display()
            )));
        }
        out.set_len(keep).map_err(io)?;
        let log = OpenOptions::new().create(true).append(true).open(log_path(&self.dir, worker)).map_err(io)?;
        self.workers.lock().await.insert(worker.to_string(), WorkerFiles { out, log, len: keep });
        Ok(Recovery { committed: Some(committed), pending })
    }

    async fn stage(&self, worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        let mut workers = self.workers.lock().await;
        let files = workers.get_mut(worker).ok_or_else(|| SinkError::Permanent(format!("unknown worker {worker}")))?;
        let Some(first) = records.first() else { return Ok(()) };
        if first.offset != files.len {
            // Leftovers of a round that was aborted without a log entry: cut back to where this data belongs.
            files.out.set_len(first.offset).map_err(io)?;
            files.len = first.offset;
        }
        files.out.seek(SeekFrom::Start(files.len)).map_err(io)?;
        let mut buf = Vec::with_capacity(records.iter().map(|r| r.payload.len()).sum());
        for r in &records {
            buf.extend_from_slice(&r.payload);
        }
        files.out.write_all(&buf).map_err(io)?;
        files.len += buf.len() as u64;
        Ok(())
    }

    async fn prepare(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let mut workers = self.workers.lock().await;
        let files = workers.get_mut(worker).ok_or_else(|| SinkError::Permanent(format!("unknown worker {worker}")))?;
        if files.len != txn.end {
            return Err(SinkError::Permanent(format!(
                "output holds {} bytes, transaction ends at {}",
                files.len, txn.end
            )));
        }
        files.out.sync_data().map_err(io)?;
        Self::append_log(files, &LogEntry::Prepare { txn: txn.id_str(), start: txn.start, end: txn.end })
    }

    async fn commit(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let mut workers = self.workers.lock().await;
        let files = workers.get_mut(worker).ok_or_else(|| SinkError::Permanent(format!("unknown worker {worker}")))?;
        Self::append_log(files, &LogEntry::Commit { txn: txn.id_str(), end: txn.end })
    }

    async fn abort(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let mut workers = self.workers.lock().await;
        let files = workers.get_mut(worker).ok_or_else(|| SinkError::Permanent(format!("unknown worker {worker}")))?;
        files.out.set_len(txn.start).map_err(io)?;
        files.out.sync_data().map_err(io)?;
        files.len = txn.start;
        Self::append_log(files, &LogEntry::Abort { txn: txn.id_str(), start: txn.start })
    }

    async fn forget(&self, worker: &str) -> Result<(), SinkError> {
        self.workers.lock().await.remove(worker);
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        for p in [out_path(&self.dir, worker), log_path(&self.dir, worker)] {
            if p.exists() {
                let mut archived = p.clone().into_os_string();
                archived.push(format!(".{stamp}"));
                std::fs::rename(&p, &archived).map_err(io)?;
            }
        }
        Ok(())
    }
}
