//! `sink.s3`: each worker's output as S3 objects, exactly once.
//!
//! - Stage (while the round is open): every message (objectPer: message) or every ~8 MiB of output
//!   (objectPer: checkpoint) is uploaded under `<prefix>_wallaroo/staging/<worker>/`, up to 16 uploads at once.
//!   Nothing there is visible under the published names.
//! - Phase 1 (`prepare`): the last part is uploaded, then the manifest `<prefix>_wallaroo/pending/<worker>.json`
//!   ({txn, start, end, objects}) is written. Once it exists the vote is commit.
//! - Phase 2 commit: every manifest entry is copied to its published name, then
//!   `<prefix>_wallaroo/offsets/<worker>.json` ({txn, committed}) is written, then staging and the manifest are
//!   deleted. Re-running a commit after a crash repeats the same copies, so it is idempotent.
//! - Phase 2 abort: staging and the manifest are deleted.
//! - `recover`: reads the offsets object and the manifest back from S3, so a restarted sidecar (new pod, no
//!   local disk) resolves an in-doubt round with the worker.
//!
//! See the README section "S3 sink" for the guarantee stated precisely.
use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::Mutex;
use wallaroo_crds::{ObjectPer, PayloadMapping, S3Sink as S3SinkConfig};

use crate::aws::{AwsSettings, sdk_config};
use crate::runtime::Health;
use crate::runtime::sink_api::{Guarantee, Recovery, SinkError, SinkIntegration, SinkRecord, Txn};
use crate::sinks::payload;

pub mod layout;
pub mod store;

use layout::{Layout, Manifest, Offsets, Publish, dedupe_last_wins};
use store::{CONCURRENCY, Store};

/// Staged part size for objectPer: checkpoint (S3 needs >= 5 MiB for every part of a multipart object but the last).
pub const DEFAULT_PART_SIZE: usize = 8 << 20;
/// S3's limit on key length.
const MAX_KEY_BYTES: usize = 1024;

/// One worker's open round.
#[derive(Default)]
struct WorkerState {
    /// End offset of the last committed round (what S3 says).
    committed: u64,
    /// Offset the next staged record must have.
    next: u64,
    /// Start offset of the open round.
    round_start: u64,
    /// objectPer message: (published name, staged name) in offset order.
    staged: Vec<(String, String)>,
    /// objectPer checkpoint: output not yet uploaded, starting at offset `buf_start`.
    buf: BytesMut,
    buf_start: u64,
    /// objectPer checkpoint: staged part names in order.
    parts: Vec<String>,
    /// Written by the last successful prepare.
    prepared: Option<Manifest>,
}

impl WorkerState {
    fn reset_round(&mut self, at: u64) {
        self.next = at;
        self.round_start = at;
        self.staged.clear();
        self.buf.clear();
        self.buf_start = at;
        self.parts.clear();
        self.prepared = None;
    }
}

pub struct S3Sink {
    store: Store,
    layout: Layout,
    object_per: ObjectPer,
    mapping: PayloadMapping,
    part_size: usize,
    workers: std::sync::Mutex<HashMap<String, Arc<Mutex<WorkerState>>>>,
}

fn hex_id(txn: &Txn) -> String {
    hex::encode(&txn.id)
}

impl S3Sink {
    /// Builds the client. A missing bucket or unreachable endpoint is reported (and keeps `/readyz` false) but
    /// does not stop the sidecar: rounds vote abort until S3 is usable.
    pub async fn connect(cfg: S3SinkConfig, health: Health) -> Result<Self, SinkError> {
        let settings = AwsSettings {
            base: "spec.sink.s3",
            region: &cfg.region,
            endpoint: cfg.endpoint.as_deref(),
            access_key_id_from: &cfg.access_key_id_from,
            secret_access_key_from: &cfg.secret_access_key_from,
        };
        let shared = sdk_config(&settings).await.map_err(SinkError::Permanent)?;
        let conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(cfg.force_path_style)
            // S3-compatible stores (and older emulators) do not all accept the newer default checksums.
            .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
            .build();
        let store =
            Store { client: aws_sdk_s3::Client::from_conf(conf), bucket: cfg.bucket.clone(), health: health.clone() };
        match store.probe().await {
            Ok(()) => {
                health.set_external(true);
                tracing::info!(bucket = %cfg.bucket, prefix = %cfg.prefix, "S3 bucket reachable");
            }
            Err(e) => {
                health.set_external(false);
                tracing::warn!(bucket = %cfg.bucket, error = %e, "S3 bucket not usable yet; rounds will vote abort until it is");
            }
        }
        Ok(Self {
            store,
            layout: Layout::new(&cfg.prefix),
            object_per: cfg.object_per,
            mapping: cfg.mapping(),
            part_size: DEFAULT_PART_SIZE,
            workers: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Overrides the staged part size of objectPer: checkpoint (tests use it to exercise multipart assembly).
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.max(1);
        self
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn worker(&self, worker: &str) -> Arc<Mutex<WorkerState>> {
        let mut map = match self.workers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.entry(worker.to_string()).or_default().clone()
    }

    async fn read_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SinkError> {
        match self.store.get(key).await? {
            None => Ok(None),
            Some(body) => serde_json::from_slice(&body).map(Some).map_err(|e| {
                SinkError::Permanent(format!("s3://{}/{key} is not what this sink wrote: {e}", self.store.bucket))
            }),
        }
    }

    async fn write_json<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), SinkError> {
        let body = serde_json::to_vec(value).map_err(|e| SinkError::Permanent(e.to_string()))?;
        self.store.put(key, Bytes::from(body)).await
    }

    /// The object name a message publishes to (objectPer: message).
    fn message_target(&self, offset: u64, payload: &Bytes) -> Result<(String, Bytes), SinkError> {
        let (key, value) = payload::split_bytes(&self.mapping, payload)
            .map_err(|e| SinkError::Permanent(format!("message at offset {offset}: {e}")))?;
        let key = key.ok_or_else(|| {
            SinkError::Permanent(format!("message at offset {offset} has no key to name its object (keyField)"))
        })?;
        let key = std::str::from_utf8(&key)
            .map_err(|_| SinkError::Permanent(format!("message at offset {offset}: the key is not UTF-8")))?;
        let target = self.layout.message_object(key);
        if key.is_empty() || target.len() > MAX_KEY_BYTES {
            return Err(SinkError::Permanent(format!(
                "message at offset {offset}: object name {target:?} is empty or longer than {MAX_KEY_BYTES} bytes"
            )));
        }
        Ok((target, value))
    }

    async fn upload_part(&self, worker: &str, st: &mut WorkerState) -> Result<(), SinkError> {
        if st.buf.is_empty() {
            return Ok(());
        }
        let name = self.layout.staged_part(worker, st.buf_start);
        let body = st.buf.split().freeze();
        let len = body.len() as u64;
        if let Err(e) = self.store.put_retrying(&name, body.clone()).await {
            // Keep the bytes so a retried prepare can upload them again.
            st.buf = BytesMut::from(&body[..]);
            return Err(e);
        }
        st.parts.push(name);
        st.buf_start += len;
        Ok(())
    }

    /// Deletes the staged uploads and the manifest of `worker`.
    async fn discard_staging(&self, worker: &str) -> Result<(), SinkError> {
        self.store.delete_prefix(&self.layout.staging_dir(worker)).await?;
        self.store.delete(&[self.layout.pending(worker)]).await
    }

    /// Copies every manifest entry to its published name.
    async fn publish(&self, manifest: &Manifest) -> Result<(), SinkError> {
        let jobs: Vec<(Store, Publish)> = manifest.objects.iter().map(|p| (self.store.clone(), p.clone())).collect();
        futures::stream::iter(jobs)
            .map(|(store, p)| async move { store.assemble(&p.parts, &p.target).await })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl SinkIntegration for S3Sink {
    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }

    async fn recover(&self, worker: &str) -> Result<Recovery, SinkError> {
        let state = self.worker(worker);
        let mut st = state.lock().await;
        let offsets: Option<Offsets> = match self.read_json(&self.layout.offsets(worker)).await {
            Ok(o) => o,
            Err(e) if self.store.bucket_missing().await => {
                // No bucket, no state: adopt the worker's offset. Every round then fails to stage and votes
                // abort until the bucket exists, and the next reconnect reads the real state.
                tracing::warn!(worker, bucket = %self.store.bucket, error = %e, "bucket missing; rounds will vote abort");
                st.reset_round(0);
                return Ok(Recovery { committed: None, pending: None });
            }
            Err(e) => return Err(e),
        };
        let committed = offsets.as_ref().map_or(0, |o| o.committed);
        let manifest: Option<Manifest> = self.read_json(&self.layout.pending(worker)).await?;
        let pending = match manifest {
            // Crashed after writing the offsets but before cleaning up: the round is committed.
            Some(m) if offsets.as_ref().is_some_and(|o| o.txn_hex == m.txn_hex && o.committed == m.end) => {
                tracing::info!(worker, txn = %m.txn, "finishing the clean-up of a committed round");
                self.discard_staging(worker).await?;
                None
            }
            Some(m) => Some(m),
            None => {
                // Uploads of a round that never reached Phase 1 are worthless.
                self.store.delete_prefix(&self.layout.staging_dir(worker)).await?;
                None
            }
        };
        st.committed = committed;
        let resume = pending.as_ref().map_or(committed, |m| m.end);
        st.reset_round(resume);
        let txn = pending.as_ref().map(|m| Txn {
            id: hex::decode(&m.txn_hex).map(Bytes::from).unwrap_or_else(|_| Bytes::from(m.txn.clone())),
            start: m.start,
            end: m.end,
        });
        st.prepared = pending;
        Ok(Recovery { committed: Some(committed), pending: txn })
    }

    async fn stage(&self, worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        let state = self.worker(worker);
        let mut st = state.lock().await;
        let Some(first) = records.first() else {
            return Ok(());
        };
        if first.offset != st.next || st.prepared.is_some() {
            // A new round after an abort (or a replay): what was staged before is not part of it.
            st.reset_round(first.offset);
        }
        let mut expected = first.offset;
        for r in &records {
            if r.offset != expected {
                return Err(SinkError::Permanent(format!(
                    "offsets not contiguous: expected {expected}, got {}",
                    r.offset
                )));
            }
            expected += r.payload.len() as u64;
        }
        match self.object_per {
            ObjectPer::Message => {
                let mut uploads = Vec::with_capacity(records.len());
                for r in &records {
                    let (target, value) = self.message_target(r.offset, &r.payload)?;
                    let staged = self.layout.staged_message(worker, r.offset);
                    uploads.push((target, staged, value));
                }
                // Owned inputs: futures borrowing from the surrounding fn trip up the Send check of async_trait.
                let jobs: Vec<(Store, String, Bytes)> = uploads
                    .iter()
                    .map(|(_, staged, value)| (self.store.clone(), staged.clone(), value.clone()))
                    .collect();
                futures::stream::iter(jobs)
                    .map(|(store, staged, value)| async move { store.put_retrying(&staged, value).await })
                    .buffer_unordered(CONCURRENCY)
                    .try_collect::<Vec<()>>()
                    .await?;
                st.staged.extend(uploads.into_iter().map(|(t, s, _)| (t, s)));
            }
            ObjectPer::Checkpoint => {
                for r in &records {
                    let (_, value) = payload::split_bytes(&self.mapping, &r.payload)
                        .map_err(|e| SinkError::Permanent(format!("message at offset {}: {e}", r.offset)))?;
                    st.buf.extend_from_slice(&value);
                    if st.buf.len() >= self.part_size {
                        self.upload_part(worker, &mut st).await?;
                    }
                }
            }
        }
        st.next = expected;
        Ok(())
    }

    async fn prepare(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let state = self.worker(worker);
        let mut st = state.lock().await;
        if st.next != txn.end {
            return Err(SinkError::Permanent(format!(
                "staged output ends at {}, transaction ends at {}",
                st.next, txn.end
            )));
        }
        let has_data = !st.staged.is_empty() || !st.parts.is_empty() || !st.buf.is_empty();
        if has_data && st.round_start != txn.start {
            return Err(SinkError::Permanent(format!(
                "staged round starts at {}, transaction starts at {}",
                st.round_start, txn.start
            )));
        }
        let objects = match self.object_per {
            ObjectPer::Message => dedupe_last_wins(&st.staged),
            ObjectPer::Checkpoint => {
                self.upload_part(worker, &mut st).await?;
                if st.parts.is_empty() {
                    Vec::new()
                } else {
                    vec![Publish {
                        target: self.layout.checkpoint_object(worker, txn.start, txn.end),
                        parts: st.parts.clone(),
                    }]
                }
            }
        };
        let manifest = Manifest { txn: txn.id_str(), txn_hex: hex_id(txn), start: txn.start, end: txn.end, objects };
        self.write_json(&self.layout.pending(worker), &manifest).await?;
        tracing::debug!(worker, txn = %manifest.txn, objects = manifest.objects.len(), "prepared");
        st.prepared = Some(manifest);
        Ok(())
    }

    async fn commit(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let state = self.worker(worker);
        let mut st = state.lock().await;
        let want = hex_id(txn);
        let manifest = match st.prepared.clone().filter(|m| m.txn_hex == want) {
            Some(m) => Some(m),
            None => self.read_json::<Manifest>(&self.layout.pending(worker)).await?.filter(|m| m.txn_hex == want),
        };
        let Some(manifest) = manifest else {
            // Already committed (a repeated Phase 2 after a crash during clean-up)?
            let offsets: Option<Offsets> = self.read_json(&self.layout.offsets(worker)).await?;
            if offsets.is_some_and(|o| o.txn_hex == want && o.committed == txn.end) {
                return Ok(());
            }
            return Err(SinkError::Permanent(format!("commit of {}: no prepared round with that id", txn.id_str())));
        };
        self.publish(&manifest).await?;
        let offsets = Offsets { txn: manifest.txn.clone(), txn_hex: manifest.txn_hex.clone(), committed: manifest.end };
        self.write_json(&self.layout.offsets(worker), &offsets).await?;
        st.committed = manifest.end;
        st.reset_round(manifest.end);
        // The round is committed once the offsets object exists; a failed clean-up is finished by the next
        // recover (or overwritten by the next round), so it must not fail the commit.
        if let Err(e) = self.discard_staging(worker).await {
            tracing::warn!(worker, txn = %manifest.txn, error = %e, "clean-up after commit failed; recover finishes it");
        }
        Ok(())
    }

    async fn abort(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let state = self.worker(worker);
        let mut st = state.lock().await;
        self.discard_staging(worker).await?;
        st.reset_round(txn.start);
        Ok(())
    }

    async fn forget(&self, worker: &str) -> Result<(), SinkError> {
        let state = self.worker(worker);
        let _st = state.lock().await;
        self.discard_staging(worker).await?;
        self.store.delete(&[self.layout.offsets(worker)]).await?;
        let mut map = match self.workers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.remove(worker);
        Ok(())
    }
}
