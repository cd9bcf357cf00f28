//! `sink.file`: each worker's output appended to `<dir>/<worker>.out`, exactly once, with a transaction log
//! `<dir>/<worker>.txnlog` (one JSON object per line, fsynced) in the manner of upstream's ALOC reference sink.
//!
//! Readers trust `<worker>.out` only up to the `end` of the last `commit` record of the log
//! ([`committed_output`] does that). Phase 1 fsyncs the data and logs `prepare`; Phase 2 logs `commit`, or
//! truncates and logs `abort`. Recovery replays the log and truncates anything past the durable state.
//!
//! File I/O (writes, fsync, truncation) runs on tokio's blocking pool, one lock per worker, so one worker's fsync
//! never stalls another worker or the runtime. The log is compacted to its durable state every
//! [`COMPACT_AFTER`] entries, and a torn last line (a crash mid-append) is cut off at recovery so the next entry
//! cannot be glued to it.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
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
    log_path: PathBuf,
    /// Entries appended since the log was last written whole.
    log_entries: usize,
    /// End of the last commit (what a compacted log must keep).
    committed: u64,
    last_commit_txn: String,
    /// Current length of `out` (staged bytes included).
    len: u64,
}

/// Entries after which the log is rewritten as its durable state (one `commit` line).
pub const COMPACT_AFTER: usize = 1000;

type Shared = Arc<Mutex<WorkerFiles>>;

pub struct FileSink {
    dir: PathBuf,
    workers: Mutex<HashMap<String, Shared>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Cuts a torn last line (no newline: the append was interrupted) so the next entry starts on a line of its own.
/// An entry that was not written whole was never fsynced whole either, so no vote depended on it.
fn cut_torn_tail(path: &Path) -> std::io::Result<()> {
    let Ok(mut f) = OpenOptions::new().read(true).write(true).open(path) else { return Ok(()) };
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    if data.is_empty() || data.ends_with(b"\n") {
        return Ok(());
    }
    let keep = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(path = %path.display(), dropped = data.len() - keep, "cutting a torn last txnlog line");
    f.set_len(keep as u64)?;
    f.sync_data()
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
    replay_full(path).map(|(c, p, _)| (c, p))
}

fn replay_full(path: &Path) -> Result<(u64, Option<Txn>, String), SinkError> {
    let mut committed = 0;
    let mut last_txn = String::new();
    let mut pending: Option<Txn> = None;
    let Ok(f) = File::open(path) else { return Ok((0, None, last_txn)) };
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
                last_txn = txn;
            }
            LogEntry::Abort { txn, .. } => pending = pending.filter(|p| p.id_str() != txn),
        }
    }
    Ok((committed, pending, last_txn))
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
        files.log.sync_data().map_err(io)?;
        files.log_entries += 1;
        Ok(())
    }

    /// Rewrites the log as its durable state when it has grown; called only with no transaction pending.
    fn compact(files: &mut WorkerFiles) -> Result<(), SinkError> {
        if files.log_entries < COMPACT_AFTER {
            return Ok(());
        }
        let tmp = files.log_path.with_extension("txnlog.tmp");
        let entry = LogEntry::Commit { txn: files.last_commit_txn.clone(), end: files.committed };
        let mut line = serde_json::to_vec(&entry).map_err(|e| SinkError::Permanent(e.to_string()))?;
        line.push(b'\n');
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&line).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &files.log_path).map_err(io)?;
        // The rename itself must be durable before the old log's entries can be considered gone.
        if let Some(dir) = files.log_path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        files.log = OpenOptions::new().append(true).open(&files.log_path).map_err(io)?;
        files.log_entries = 1;
        Ok(())
    }

    fn files(&self, worker: &str) -> Result<Shared, SinkError> {
        lock(&self.workers).get(worker).cloned().ok_or_else(|| SinkError::Permanent(format!("unknown worker {worker}")))
    }

    /// Runs blocking file work for one worker on the blocking pool, under that worker's lock only.
    async fn blocking<T: Send + 'static>(
        &self,
        worker: &str,
        f: impl FnOnce(&mut WorkerFiles) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let files = self.files(worker)?;
        tokio::task::spawn_blocking(move || f(&mut lock(&files)))
            .await
            .map_err(|e| SinkError::Transient(format!("file sink: blocking task failed: {e}")))?
    }
}

fn recover_files(dir: &Path, worker: &str) -> Result<(WorkerFiles, Recovery), SinkError> {
    let log_file = log_path(dir, worker);
    cut_torn_tail(&log_file).map_err(io)?;
    let (committed, pending, last_commit_txn) = replay_full(&log_file)?;
    let keep = pending.as_ref().map_or(committed, |p| p.end);
    let out = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(out_path(dir, worker))
        .map_err(io)?;
    let len = out.metadata().map_err(io)?.len();
    if len < keep {
        return Err(SinkError::Permanent(format!(
            "{}: holds {len} bytes but the log says {keep} are durable; the output file was modified",
            out_path(dir, worker).display()
        )));
    }
    out.set_len(keep).map_err(io)?;
    let log = OpenOptions::new().create(true).append(true).open(&log_file).map_err(io)?;
    let log_entries = BufReader::new(File::open(&log_file).map_err(io)?).lines().count();
    let files = WorkerFiles { out, log, log_path: log_file, log_entries, committed, last_commit_txn, len: keep };
    Ok((files, Recovery { committed: Some(committed), pending }))
}

#[async_trait::async_trait]
impl SinkIntegration for FileSink {
    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }

    async fn recover(&self, worker: &str) -> Result<Recovery, SinkError> {
        let (dir, w) = (self.dir.clone(), worker.to_string());
        let (files, recovery) = tokio::task::spawn_blocking(move || recover_files(&dir, &w))
            .await
            .map_err(|e| SinkError::Transient(format!("file sink: blocking task failed: {e}")))??;
        lock(&self.workers).insert(worker.to_string(), Arc::new(Mutex::new(files)));
        Ok(recovery)
    }

    async fn stage(&self, worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        self.blocking(worker, move |files| {
            let Some(first) = records.first() else { return Ok(()) };
            if first.offset != files.len {
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
        })
        .await
    }

    async fn prepare(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let txn = txn.clone();
        self.blocking(worker, move |files| {
            if files.len != txn.end {
                return Err(SinkError::Permanent(format!(
                    "output holds {} bytes, transaction ends at {}",
                    files.len, txn.end
                )));
            }
            files.out.sync_data().map_err(io)?;
            Self::append_log(files, &LogEntry::Prepare { txn: txn.id_str(), start: txn.start, end: txn.end })
        })
        .await
    }

    async fn commit(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let txn = txn.clone();
        self.blocking(worker, move |files| {
            Self::append_log(files, &LogEntry::Commit { txn: txn.id_str(), end: txn.end })?;
            files.committed = txn.end;
            files.last_commit_txn = txn.id_str();
            Self::compact(files)
        })
        .await
    }

    async fn abort(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let txn = txn.clone();
        self.blocking(worker, move |files| {
            files.out.set_len(txn.start).map_err(io)?;
            files.out.sync_data().map_err(io)?;
            files.len = txn.start;
            Self::append_log(files, &LogEntry::Abort { txn: txn.id_str(), start: txn.start })?;
            Self::compact(files)
        })
        .await
    }

    async fn forget(&self, worker: &str) -> Result<(), SinkError> {
        lock(&self.workers).remove(worker);
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let paths = [out_path(&self.dir, worker), log_path(&self.dir, worker)];
        tokio::task::spawn_blocking(move || {
            for p in paths {
                if p.exists() {
                    let mut archived = p.clone().into_os_string();
                    archived.push(format!(".{stamp}"));
                    std::fs::rename(&p, &archived).map_err(io)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| SinkError::Transient(format!("file sink: blocking task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(id: &str, start: u64, end: u64) -> Txn {
        Txn { id: bytes::Bytes::copy_from_slice(id.as_bytes()), start, end }
    }

    #[tokio::test]
    async fn a_torn_last_log_line_does_not_swallow_the_next_entry() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open(FileSinkConfig { dir: dir.path().display().to_string() }, Health::new()).unwrap();
        sink.recover("w").await.unwrap();
        sink.stage("w", vec![SinkRecord { offset: 0, payload: bytes::Bytes::from_static(b"abc") }]).await.unwrap();
        sink.prepare("w", &txn("t1", 0, 3)).await.unwrap();
        sink.commit("w", &txn("t1", 0, 3)).await.unwrap();
        // A crash in the middle of appending the next entry.
        let mut log = OpenOptions::new().append(true).open(log_path(dir.path(), "w")).unwrap();
        log.write_all(br#"{"op":"prepare","txn":"t2","sta"#).unwrap();
        drop(log);
        // Restart: recovery, then a new round whose entries must be readable.
        let sink = FileSink::open(FileSinkConfig { dir: dir.path().display().to_string() }, Health::new()).unwrap();
        assert_eq!(sink.recover("w").await.unwrap().committed, Some(3));
        sink.stage("w", vec![SinkRecord { offset: 3, payload: bytes::Bytes::from_static(b"de") }]).await.unwrap();
        sink.prepare("w", &txn("t3", 3, 5)).await.unwrap();
        // Crash between the phases: the prepared round must be found, not glued to the torn line and lost.
        let sink = FileSink::open(FileSinkConfig { dir: dir.path().display().to_string() }, Health::new()).unwrap();
        let r = sink.recover("w").await.unwrap();
        assert_eq!(r.pending, Some(txn("t3", 3, 5)), "the prepare entry after the torn line was swallowed");
        sink.commit("w", &txn("t3", 3, 5)).await.unwrap();
        assert_eq!(committed_output(dir.path(), "w").unwrap(), b"abcde");
    }

    #[tokio::test]
    async fn the_log_is_compacted_and_still_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = || FileSinkConfig { dir: dir.path().display().to_string() };
        let sink = FileSink::open(cfg(), Health::new()).unwrap();
        sink.recover("w").await.unwrap();
        let rounds = COMPACT_AFTER as u64 + 10;
        for i in 0..rounds {
            let t = txn(&format!("t{i}"), i, i + 1);
            sink.stage("w", vec![SinkRecord { offset: i, payload: bytes::Bytes::from_static(b"x") }]).await.unwrap();
            sink.prepare("w", &t).await.unwrap();
            sink.commit("w", &t).await.unwrap();
        }
        let lines = std::fs::read_to_string(log_path(dir.path(), "w")).unwrap().lines().count();
        assert!(lines < COMPACT_AFTER, "the log holds {lines} lines after {rounds} rounds");
        let sink = FileSink::open(cfg(), Health::new()).unwrap();
        assert_eq!(sink.recover("w").await.unwrap().committed, Some(rounds));
        assert_eq!(committed_output(dir.path(), "w").unwrap().len() as u64, rounds);
    }
}
