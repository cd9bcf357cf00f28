//! `source.file`: a file as one stream, newline-delimited (`lines`) or u32-length-framed (`framed`, upstream
//! FramedFileReader). Point of reference = byte offset just after a record, so resuming "after P" is a seek
//! to P. Records are slices of large read buffers (no per-record copy).
use std::io::SeekFrom;

#[cfg(test)]
use bytes::Bytes;
use bytes::{Buf, BytesMut};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use wallaroo_crds::{FileFormat, FileSource as FileSourceConfig, MAX_RECORD_BYTES};

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

/// A record longer than `maxRecordBytes`, found at file offset `offset` (where the record starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordTooLong {
    pub offset: u64,
    /// The record's length, or a lower bound when its end has not been read (a line with no newline yet).
    pub at_least: u64,
    pub limit: usize,
}

/// Splits records off the front of `buf`, whose first byte is at file offset `offset`. Records share `buf`'s
/// allocation; the incomplete tail stays in `buf`. A record longer than `max` is an error (after the records
/// before it, which stay in `out`): waiting for its end would buffer without bound.
pub fn split_records(
    format: FileFormat,
    buf: &mut BytesMut,
    offset: &mut u64,
    at_eof: bool,
    max: usize,
    out: &mut Vec<Record>,
) -> Result<(), RecordTooLong> {
    let mut bytes: usize = out.iter().map(|r| r.payload.len()).sum();
    let too_long = |offset: u64, at_least: usize| RecordTooLong { offset, at_least: at_least as u64, limit: max };
    while out.len() < BATCH && bytes < BATCH_BYTES {
        let before = out.len();
        match format {
            FileFormat::Lines => {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    // `max` bytes, then maybe the `\r` of a `\r\n`: anything longer without a newline is too long.
                    if buf.len() > max.saturating_add(1) || (at_eof && buf.len() > max) {
                        return Err(too_long(*offset, buf.len()));
                    }
                    if at_eof && !buf.is_empty() {
                        // A last line without a newline is still a record once the file is complete.
                        *offset += buf.len() as u64;
                        let len = buf.len();
                        out.push(Record { por: *offset, key: None, payload: buf.split_to(len).freeze() });
                    }
                    break;
                };
                let content = if nl > 0 && buf[nl - 1] == b'\r' { nl - 1 } else { nl };
                if content > max {
                    return Err(too_long(*offset, content));
                }
                let mut line = buf.split_to(nl + 1).freeze();
                *offset += nl as u64 + 1;
                line.truncate(content);
                out.push(Record { por: *offset, key: None, payload: line });
            }
            FileFormat::Framed => {
                if buf.len() < 4 {
                    break;
                }
                let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                // Refused from the header alone, before its bytes are buffered.
                if len > max {
                    return Err(too_long(*offset, len));
                }
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
    Ok(())
}

struct Reader {
    file: File,
    buf: BytesMut,
    /// File offset of `buf[0]`.
    offset: u64,
    eof: bool,
    /// An over-long record was found; reported once the records before it were handed over.
    too_long: Option<RecordTooLong>,
}

#[async_trait::async_trait]
impl SourceIntegration for FileSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        let path = self.cfg.path.clone();
        let max = self.cfg.max_record_bytes.unwrap_or(MAX_RECORD_BYTES).clamp(1, MAX_RECORD_BYTES) as usize;
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
                fill(r, self.cfg.format, self.cfg.follow, max, &mut batch).await.map_err(|e| match e {
                    FillError::TooLong(t) => SourceError::Config(format!(
                        "{path}: the record at byte offset {} is at least {} bytes, over the limit of {} \
                         (spec.source.file.maxRecordBytes); records before it were sent. Raise the limit (at most \
                         {MAX_RECORD_BYTES}) or fix the file",
                        t.offset, t.at_least, t.limit
                    )),
                    FillError::Io(e) => SourceError::Io(e),
                })?;
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
    // The worker may grant a point beyond the end: the file was truncated or replaced since, or the worker is
    // wrong. Failing would only restart into the same grant (a crash loop), so resume at the end instead. The
    // protocol layer skips records at or before the granted point, as the worker would.
    let start = if at > len {
        tracing::warn!(
            path = %path,
            granted = at,
            file_len = len,
            "the worker resumes this file beyond its end (truncated or replaced?); resuming at the end of the file, \
             records ending at or before the granted offset are skipped. Use a new streamName to start over"
        );
        len
    } else {
        at
    };
    file.seek(SeekFrom::Start(start)).await?;
    Ok(Reader { file, buf: BytesMut::with_capacity(READ_CHUNK), offset: start, eof: false, too_long: None })
}

#[derive(Debug)]
enum FillError {
    TooLong(RecordTooLong),
    Io(std::io::Error),
}

async fn fill(
    r: &mut Reader,
    format: FileFormat,
    follow: bool,
    max: usize,
    out: &mut Vec<Record>,
) -> Result<(), FillError> {
    if let Some(t) = r.too_long {
        return Err(FillError::TooLong(t));
    }
    // The records before an over-long one go out first; the error follows on the next call.
    let split = |r: &mut Reader, at_eof: bool, out: &mut Vec<Record>| {
        let before = out.len();
        if let Err(t) = split_records(format, &mut r.buf, &mut r.offset, at_eof, max, out) {
            r.too_long = Some(t);
            if out.len() == before {
                return Err(FillError::TooLong(t));
            }
        }
        Ok(())
    };
    loop {
        let before = out.len();
        // A growing file may end mid-record: only a finished file's last line counts without its newline.
        split(r, r.eof && !follow, out)?;
        if out.len() > before || r.eof || r.too_long.is_some() {
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
        if r.file.read_buf(&mut r.buf).await.map_err(FillError::Io)? == 0 {
            r.eof = true;
            split(r, !follow, out)?;
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = MAX_RECORD_BYTES as usize;

    #[test]
    fn lines_split_with_offsets_after_each_record() {
        let mut buf = BytesMut::from(&b"a\nbc\r\nd"[..]);
        let mut off = 10;
        let mut out = Vec::new();
        split_records(FileFormat::Lines, &mut buf, &mut off, false, MAX, &mut out).unwrap();
        assert_eq!(
            out.iter().map(|r| (r.por, r.payload.clone())).collect::<Vec<_>>(),
            vec![(12, Bytes::from_static(b"a")), (16, Bytes::from_static(b"bc"))]
        );
        assert_eq!(&buf[..], b"d");
        split_records(FileFormat::Lines, &mut buf, &mut off, true, MAX, &mut out).unwrap();
        assert_eq!(out.last().map(|r| r.por), Some(17));
    }

    #[test]
    fn framed_records_keep_partial_tail() {
        let mut buf = BytesMut::from(&b"\0\0\0\x02hi\0\0\0\x03ab"[..]);
        let mut off = 0;
        let mut out = Vec::new();
        split_records(FileFormat::Framed, &mut buf, &mut off, false, MAX, &mut out).unwrap();
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
        split_records(FileFormat::Framed, &mut buf, &mut off, false, MAX, &mut out).unwrap();
        assert_eq!(out.len(), 3, "stops at the first record that reaches {BATCH_BYTES} bytes");
        assert_eq!(off, 3 * (4 + 100 * 1024));
        let mut small = BytesMut::from(&b"a\n".repeat(BATCH + 10)[..]);
        let (mut off, mut out) = (0, Vec::new());
        split_records(FileFormat::Lines, &mut small, &mut off, false, MAX, &mut out).unwrap();
        assert_eq!(out.len(), BATCH);
        assert_eq!(small.len(), 20);
    }

    #[test]
    fn an_over_long_line_is_refused_after_the_records_before_it() {
        let mut buf = BytesMut::from(&b"ab\ncd\nxxxxxxxxxx"[..]);
        let (mut off, mut out) = (100, Vec::new());
        let err = split_records(FileFormat::Lines, &mut buf, &mut off, false, 4, &mut out).unwrap_err();
        assert_eq!(out.len(), 2, "the records before it are kept");
        assert_eq!(err, RecordTooLong { offset: 106, at_least: 10, limit: 4 });
        // A complete line that is too long, and one that fits exactly with its \r\n.
        let mut buf = BytesMut::from(&b"abcd\r\nabcde\n"[..]);
        let (mut off, mut out) = (0, Vec::new());
        let err = split_records(FileFormat::Lines, &mut buf, &mut off, false, 4, &mut out).unwrap_err();
        assert_eq!((out.len(), err.offset, err.at_least), (1, 6, 5));
        // The last line of a finished file counts too.
        let mut buf = BytesMut::from(&b"abcde"[..]);
        let (mut off, mut out) = (0, Vec::new());
        assert!(split_records(FileFormat::Lines, &mut buf, &mut off, true, 4, &mut out).is_err());
    }

    #[test]
    fn an_over_long_frame_is_refused_from_its_header() {
        let mut buf = BytesMut::from(&b"\0\0\0\x02hi\x7f\0\0\0"[..]);
        let (mut off, mut out) = (0, Vec::new());
        let err = split_records(FileFormat::Framed, &mut buf, &mut off, false, 1024, &mut out).unwrap_err();
        assert_eq!(out.len(), 1);
        assert_eq!(err, RecordTooLong { offset: 6, at_least: 0x7f00_0000, limit: 1024 });
    }

    struct Harness {
        emit: tokio::sync::mpsc::Receiver<Emit>,
        commands: tokio::sync::mpsc::Sender<Command>,
        task: tokio::task::JoinHandle<Result<(), SourceError>>,
    }

    fn start(cfg: serde_json::Value) -> Harness {
        let cfg: FileSourceConfig = serde_json::from_value(cfg).unwrap();
        let (emit_tx, emit) = tokio::sync::mpsc::channel(crate::runtime::source_api::EMIT_CAPACITY);
        let (commands, cmd_rx) = tokio::sync::mpsc::channel(16);
        let ctx = SourceContext {
            emit: emit_tx,
            commands: cmd_rx,
            health: crate::runtime::Health::new(),
            metrics: crate::runtime::Metrics::new("t", "file", "source").unwrap(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            instance: "test".into(),
        };
        let task = tokio::spawn(Box::new(FileSource::new(cfg)).run(ctx));
        Harness { emit, commands, task }
    }

    async fn next(h: &mut Harness) -> Emit {
        tokio::time::timeout(std::time::Duration::from_secs(30), h.emit.recv()).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_grant_beyond_the_end_of_the_file_resumes_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.txt");
        std::fs::write(&path, b"a\nb\n").unwrap();
        let mut h = start(serde_json::json!({"path": path.to_str().unwrap(), "streamName": "s"}));
        let Emit::Stream { .. } = next(&mut h).await else { panic!("stream first") };
        let stream = stream_id_for(b"s");
        h.commands.send(Command::Start { stream, from: Position::After(1_000_000), generation: 1 }).await.unwrap();
        match next(&mut h).await {
            Emit::End { generation: 1, .. } => {}
            other => panic!("expected the end of the stream, got {other:?}"),
        }
        assert!(!h.task.is_finished(), "the source keeps running after a grant beyond the end");
        // A later grant inside the file still reads from there.
        h.commands.send(Command::Start { stream, from: Position::After(2), generation: 2 }).await.unwrap();
        match next(&mut h).await {
            Emit::Records { generation: 2, records, .. } => assert_eq!(&records[0].payload[..], b"b"),
            other => panic!("expected records, got {other:?}"),
        }
        h.commands.send(Command::Finished { stream }).await.unwrap();
        h.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_endless_line_stops_the_source_with_file_offset_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endless.txt");
        let mut data = b"first\nsecond\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', 3 * READ_CHUNK));
        std::fs::write(&path, &data).unwrap();
        let mut h =
            start(serde_json::json!({"path": path.to_str().unwrap(), "streamName": "s", "maxRecordBytes": 1000}));
        let Emit::Stream { .. } = next(&mut h).await else { panic!("stream first") };
        let stream = stream_id_for(b"s");
        h.commands.send(Command::Start { stream, from: Position::Beginning, generation: 1 }).await.unwrap();
        match next(&mut h).await {
            Emit::Records { records, .. } => {
                let got: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
                assert_eq!(got, vec![&b"first"[..], b"second"], "the records before the long line are sent");
            }
            other => panic!("expected records, got {other:?}"),
        }
        let err = tokio::time::timeout(std::time::Duration::from_secs(30), h.task).await.unwrap().unwrap().unwrap_err();
        let msg = err.to_string();
        for part in [path.to_str().unwrap(), "offset 13", "limit of 1000", "maxRecordBytes"] {
            assert!(msg.contains(part), "{msg:?} names {part:?}");
        }
    }
}
