//! `source.file`: a file as one stream, newline-delimited (`lines`) or u32-length-framed (`framed`, upstream
//! FramedFileReader). Point of reference = byte offset just after a record, so resuming "after P" is a seek
//! to P. Records are slices of large read buffers (no per-record copy).
use std::io::SeekFrom;

#[cfg(test)]
use bytes::Bytes;
use bytes::{Buf, BytesMut};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use wallaroo_crds::{FileFormat, FileSource as FileSourceConfig};

use crate::runtime::source_api::{
    Command, Emit, Position, Record, SourceContext, SourceError, SourceIntegration, stream_id_for,
};

pub struct FileSource {
    cfg: FileSourceConfig,
}

impl FileSource {
    pub fn new(cfg: FileSourceConfig) -> Self {
        Self { cfg }
    }
}

const READ_CHUNK: usize = 1 << 20;
/// Records per batch; with the runtime's bounded emit channel this caps read-ahead (see BENCHMARKS.md).
const BATCH: usize = 2048;
/// Payload bytes per batch, so that large records do not multiply the read-ahead.
const BATCH_BYTES: usize = 256 * 1024;

/// Splits records off the front of `buf`, whose first byte is at file offset `offset`. Records share `buf`'s
/// allocation; the incomplete tail stays in `buf`.
pub fn split_records(format: FileFormat, buf: &mut BytesMut, offset: &mut u64, at_eof: bool, out: &mut Vec<Record>) {
    let mut bytes: usize = out.iter().map(|r| r.payload.len()).sum();
    while out.len() < BATCH && bytes < BATCH_BYTES {
        let before = out.len();
        match format {
            FileFormat::Lines => {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    if at_eof && !buf.is_empty() {
                        // A last line without a newline is still a record once the file is complete.
                        *offset += buf.len() as u64;
                        let len = buf.len();
                        out.push(Record { por: *offset, key: None, payload: buf.split_to(len).freeze() });
                    }
                    break;
                };
                let mut line = buf.split_to(nl + 1).freeze();
                *offset += nl as u64 + 1;
                line.truncate(nl);
                if line.last() == Some(&b'\r') {
                    line.truncate(nl - 1);
                }
                out.push(Record { por: *offset, key: None, payload: line });
            }
            FileFormat::Framed => {
                if buf.len() < 4 {
                    break;
                }
                let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if buf.len() < 4 + len {
                    break;
                }
                buf.advance(4);
                let payload = buf.split_to(len).freeze();
                *offset += 4 + len as u64;
                out.push(Record { por: *offset, key: None, payload });
            }
        }
        // Each pass adds at most one record.
        bytes += out.get(before).map_or(0, |r| r.payload.len());
    }
}

struct Reader {
    file: File,
    buf: BytesMut,
    /// File offset of `buf[0]`.
    offset: u64,
    eof: bool,
}

#[async_trait::async_trait]
impl SourceIntegration for FileSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        let path = self.cfg.path.clone();
        // Fail fast with a clear message when the file is missing.
        File::open(&path)
            .await
            .map_err(|e| SourceError::Config(format!("spec.source.file.path: cannot open {path}: {e}")))?;
        ctx.health.set_external(true);
        ctx.metrics.external_connected.set(1);
        let name = self.cfg.stream_name.clone().unwrap_or_else(|| path.clone());
        let stream = stream_id_for(name.as_bytes());
        ctx.emit.send(Emit::Stream { name }).await.map_err(|_| SourceError::RuntimeGone)?;

        let mut reader: Option<Reader> = None;
        let mut generation = 0u64;
        let mut ended = false;
        let mut batch: Vec<Record> = Vec::with_capacity(BATCH);
        loop {
            // Fill a batch if we are running and have nothing to hand over.
            if let Some(r) = reader.as_mut()
                && batch.is_empty()
                && !ended
            {
                fill(r, self.cfg.format, self.cfg.follow, &mut batch).await?;
                if batch.is_empty() && r.eof {
                    if self.cfg.follow {
                        r.eof = false;
                    } else {
                        ctx.emit.send(Emit::End { stream, generation }).await.map_err(|_| SourceError::RuntimeGone)?;
                        ended = true;
                        tracing::info!(path = %path, offset = r.offset, "end of file; waiting for the worker to confirm");
                    }
                }
            }
            let waiting_for_data = reader.as_ref().is_some_and(|_| batch.is_empty() && !ended);
            tokio::select! {
                biased;
                cmd = ctx.commands.recv() => match cmd {
                    None => return Ok(()),
                    Some(Command::Start { from, generation: g, .. }) => {
                        let at = match from { Position::Beginning => 0, Position::After(p) => p };
                        reader = Some(open_at(&path, at).await?);
                        generation = g;
                        batch.clear();
                        ended = false;
                        tracing::info!(path = %path, offset = at, generation = g, "reading");
                    }
                    Some(Command::Durable { .. }) => {}
                    Some(Command::Finished { .. }) => return Ok(()),
                },
                _ = ctx.shutdown.cancelled() => return Ok(()),
                permit = ctx.emit.reserve(), if !batch.is_empty() => {
                    let permit = permit.map_err(|_| SourceError::RuntimeGone)?;
                    permit.send(Emit::Records { stream, generation, records: std::mem::replace(&mut batch, Vec::with_capacity(BATCH)) });
                }
                // Following a file: poll for growth.
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)), if waiting_for_data => {}
            }
        }
    }
}

async fn open_at(path: &str, at: u64) -> Result<Reader, SourceError> {
    let mut file = File::open(path).await?;
    let len = file.metadata().await?.len();
    if at > len {
        return Err(SourceError::Config(format!(
            "spec.source.file.path: the worker resumes {path} at byte {at} but the file has only {len} bytes; \
             was it truncated or replaced? Use a new streamName to start over"
        )));
    }
    file.seek(SeekFrom::Start(at)).await?;
    Ok(Reader { file, buf: BytesMut::with_capacity(READ_CHUNK), offset: at, eof: false })
}

async fn fill(r: &mut Reader, format: FileFormat, follow: bool, out: &mut Vec<Record>) -> Result<(), SourceError> {
    loop {
        let before = out.len();
        // A growing file may end mid-record: only a finished file's last line counts without its newline.
        split_records(format, &mut r.buf, &mut r.offset, r.eof && !follow, out);
        if out.len() > before || r.eof {
            if r.eof && !follow && !r.buf.is_empty() && out.len() == before {
                tracing::warn!(
                    offset = r.offset,
                    bytes = r.buf.len(),
                    "incomplete record at end of file; waiting for the rest"
                );
            }
            return Ok(());
        }
        r.buf.reserve(READ_CHUNK);
        if r.file.read_buf(&mut r.buf).await? == 0 {
            r.eof = true;
            split_records(format, &mut r.buf, &mut r.offset, !follow, out);
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_with_offsets_after_each_record() {
        let mut buf = BytesMut::from(&b"a\nbc\r\nd"[..]);
        let mut off = 10;
        let mut out = Vec::new();
        split_records(FileFormat::Lines, &mut buf, &mut off, false, &mut out);
        assert_eq!(
            out.iter().map(|r| (r.por, r.payload.clone())).collect::<Vec<_>>(),
            vec![(12, Bytes::from_static(b"a")), (16, Bytes::from_static(b"bc"))]
        );
        assert_eq!(&buf[..], b"d");
        split_records(FileFormat::Lines, &mut buf, &mut off, true, &mut out);
        assert_eq!(out.last().map(|r| r.por), Some(17));
    }

    #[test]
    fn framed_records_keep_partial_tail() {
        let mut buf = BytesMut::from(&b"\0\0\0\x02hi\0\0\0\x03ab"[..]);
        let mut off = 0;
        let mut out = Vec::new();
        split_records(FileFormat::Framed, &mut buf, &mut off, false, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].por, 6);
        assert_eq!(&out[0].payload[..], b"hi");
        assert_eq!(buf.len(), 6);
    }

    #[test]
    fn batches_are_capped_by_bytes_as_well_as_records() {
        let record = vec![b'x'; 100 * 1024];
        let mut buf = BytesMut::new();
        for _ in 0..10 {
            buf.extend_from_slice(&(record.len() as u32).to_be_bytes());
            buf.extend_from_slice(&record);
        }
        let (mut off, mut out) = (0, Vec::new());
        split_records(FileFormat::Framed, &mut buf, &mut off, false, &mut out);
        assert_eq!(out.len(), 3, "stops at the first record that reaches {BATCH_BYTES} bytes");
        assert_eq!(off, 3 * (4 + 100 * 1024));
        let mut small = BytesMut::from(&b"a\n".repeat(BATCH + 10)[..]);
        let (mut off, mut out) = (0, Vec::new());
        split_records(FileFormat::Lines, &mut small, &mut off, false, &mut out);
        assert_eq!(out.len(), BATCH);
        assert_eq!(small.len(), 20);
    }
}
