//! The connector's side of a source session (spec 2, checklist 2.11), as a state machine without I/O.
//!
//! The driver calls [`SourceSession::connected`] after each TCP connect, feeds every received frame to
//! [`SourceSession::on_frame`], offers records with [`SourceSession::send_message`] while
//! [`SourceSession::can_send`] allows, writes [`SourceSession::take_output`] to the socket and acts on
//! [`SourceSession::poll_event`]. Stream state outlives connections: after a reconnect every unfinished
//! stream is NOTIFYed again and restarted from the worker's point of reference.
use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};

use super::codec::{EncodeError, Frame, Hello, U64_MAX, encode_message};
use super::stream_id::stream_id_for;

/// Where the integration must (re)start a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The worker has processed nothing of this stream: start at the very beginning.
    Beginning,
    /// The worker durably processed everything through this point of reference (inclusive): start after it.
    After(u64),
}

impl Position {
    pub fn from_por(por: u64) -> Self {
        if por == U64_MAX { Position::Beginning } else { Position::After(por) }
    }
}

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// The worker granted the stream: the integration (re)starts it at `from`, tagging records with `generation`.
    Start { stream_id: u64, from: Position, generation: u64 },
    /// The worker refused the stream (it is active elsewhere); it is retried on the next ACK.
    Refused { stream_id: u64 },
    /// Everything through `through` (inclusive) is durable in Wallaroo: safe to commit upstream.
    Durable { stream_id: u64, through: u64 },
    /// The EOS of this stream was confirmed; nothing more will be sent on it.
    Finished { stream_id: u64 },
    /// The worker asked us to reconnect, to `address` when given.
    Restart { address: Option<String> },
    /// The session is over (ERROR from the worker or a protocol violation); reconnect with backoff.
    Close { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Disconnected,
    AwaitingOk,
    Streaming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPhase {
    /// Known, NOTIFY not yet sent on this connection.
    Pending,
    /// NOTIFY sent, waiting for NOTIFY_ACK.
    Notifying,
    /// Refused; NOTIFY again at the next ACK.
    Refused,
    Open,
    /// EOS sent (or queued); finished once an ACK entry reaches `final_por`.
    Ending,
    Finished,
}

#[derive(Debug)]
struct Stream {
    name: Bytes,
    phase: StreamPhase,
    /// Highest point of reference the worker acknowledged as durable (None: nothing yet).
    acked: Option<u64>,
    /// Point of reference granted by the last NOTIFY_ACK (U64_MAX: from the beginning).
    granted: u64,
    /// Last message id sent on the current connection; ids must strictly increase.
    last_sent: Option<u64>,
    /// Highest point of reference the worker can know of for this stream in this process: the largest id ever
    /// sent or granted. An ACK beyond it claims durability for records never sent (spec 2.7), so it is refused.
    known_max: Option<u64>,
    generation: u64,
    /// The integration said the stream ended (EOS wanted) at this generation.
    end_requested: bool,
    final_por: u64,
}

#[derive(Debug, Clone)]
pub struct SourceSessionConfig {
    pub version: String,
    pub cookie: String,
    pub program_name: String,
    pub instance_name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("no credits or not streaming")]
    NotReady,
    #[error("stream {0:#x} is unknown")]
    UnknownStream(u64),
    #[error("stream {0:#x} is not open")]
    NotOpen(u64),
    #[error("stale record of generation {got}, stream is at {current}")]
    Stale { got: u64, current: u64 },
    #[error("message id {id} does not increase (last sent {last}); dropped")]
    NotIncreasing { id: u64, last: u64 },
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Outcome of offering a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Framed into the output buffer; cost one credit.
    Sent,
    /// Already covered by the worker's point of reference: not sent (the worker would drop it), no credit spent.
    Skipped,
}

pub struct SourceSession {
    cfg: SourceSessionConfig,
    phase: Phase,
    credits: u32,
    streams: HashMap<u64, Stream>,
    /// Streams whose NOTIFY or EOS waits for a credit, in order.
    control: VecDeque<u64>,
    out: BytesMut,
    events: VecDeque<SourceEvent>,
}

impl SourceSession {
    pub fn new(cfg: SourceSessionConfig) -> Self {
        Self {
            cfg,
            phase: Phase::Disconnected,
            credits: 0,
            streams: HashMap::new(),
            control: VecDeque::new(),
            out: BytesMut::with_capacity(64 * 1024),
            events: VecDeque::new(),
        }
    }

    pub fn credits(&self) -> u32 {
        self.credits
    }

    pub fn is_streaming(&self) -> bool {
        self.phase == Phase::Streaming
    }

    /// Can a MESSAGE go out now (some credit left after pending control frames)?
    pub fn can_send(&self) -> bool {
        self.phase == Phase::Streaming && self.credits > 0 && self.control.is_empty()
    }

    pub fn stream_generation(&self, stream_id: u64) -> Option<u64> {
        self.streams.get(&stream_id).map(|s| s.generation)
    }

    pub fn stream_name(&self, stream_id: u64) -> Option<&Bytes> {
        self.streams.get(&stream_id).map(|s| &s.name)
    }

    pub fn acked(&self, stream_id: u64) -> Option<u64> {
        self.streams.get(&stream_id).and_then(|s| s.acked)
    }

    /// True when every known stream is finished (and there is at least one).
    pub fn all_finished(&self) -> bool {
        !self.streams.is_empty() && self.streams.values().all(|s| s.phase == StreamPhase::Finished)
    }

    /// Streams that still have sent-but-unacknowledged data (the drain on shutdown waits for these).
    pub fn unacked_streams(&self) -> usize {
        self.streams
            .values()
            .filter(|s| match (s.last_sent, s.acked) {
                (Some(sent), Some(acked)) => sent > acked,
                (Some(_), None) => true,
                _ => false,
            })
            .count()
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes to write to the worker, in order.
    pub fn take_output(&mut self) -> Bytes {
        self.out.split().freeze()
    }

    pub fn output_len(&self) -> usize {
        self.out.len()
    }

    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// A new TCP connection is up: queue HELLO (exactly once per connection) and forget per-connection state.
    pub fn connected(&mut self) {
        self.phase = Phase::AwaitingOk;
        self.credits = 0;
        self.out.clear();
        self.control.clear();
        for s in self.streams.values_mut() {
            s.last_sent = None;
            if s.phase != StreamPhase::Finished {
                s.phase = StreamPhase::Pending;
            }
        }
        let hello = Frame::Hello(Hello {
            version: Bytes::from(self.cfg.version.clone()),
            cookie: Bytes::from(self.cfg.cookie.clone()),
            program_name: Bytes::from(self.cfg.program_name.clone()),
            instance_name: Bytes::from(self.cfg.instance_name.clone()),
        });
        // HELLO fields are bounded by the manifest validation; an oversize one is a config error surfaced here.
        if let Err(e) = hello.encode(&mut self.out) {
            self.close(format!("cannot encode HELLO: {e}"));
        }
    }

    /// The connection is gone (either side closed it).
    pub fn disconnected(&mut self) {
        self.phase = Phase::Disconnected;
        self.credits = 0;
        self.out.clear();
        self.control.clear();
    }

    /// Registers a stream the integration wants to run; NOTIFYs it as soon as the session allows.
    /// Returns the stream id. Announcing a known stream again (e.g. a finished file re-opened) revives it.
    pub fn announce(&mut self, name: &[u8]) -> u64 {
        let id = stream_id_for(name);
        let streaming = self.phase == Phase::Streaming;
        let entry = self.streams.entry(id).or_insert_with(|| Stream {
            name: Bytes::copy_from_slice(name),
            phase: StreamPhase::Pending,
            acked: None,
            granted: U64_MAX,
            last_sent: None,
            known_max: None,
            generation: 0,
            end_requested: false,
            final_por: U64_MAX,
        });
        if entry.phase == StreamPhase::Finished {
            entry.phase = StreamPhase::Pending;
            entry.end_requested = false;
        }
        if streaming && entry.phase == StreamPhase::Pending {
            self.control.push_back(id);
            self.flush_control();
        }
        id
    }

    /// The integration has no more records for the stream (at `generation`): send EOS after what was sent.
    pub fn end_stream(&mut self, stream_id: u64, generation: u64) {
        let Some(s) = self.streams.get_mut(&stream_id) else { return };
        if s.generation != generation || s.end_requested {
            return;
        }
        s.end_requested = true;
        if s.phase == StreamPhase::Open {
            s.phase = StreamPhase::Ending;
            s.final_por = s.last_sent.unwrap_or(s.granted);
            self.control.push_back(stream_id);
            self.flush_control();
        }
    }

    /// Frames one record. Records with ids at or below the granted point of reference are skipped (the worker
    /// would drop them as duplicates), which saves credits on replays.
    pub fn send_message(
        &mut self,
        stream_id: u64,
        generation: u64,
        por: u64,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<Sent, SendError> {
        if !self.can_send() {
            return Err(SendError::NotReady);
        }
        let s = self.streams.get_mut(&stream_id).ok_or(SendError::UnknownStream(stream_id))?;
        if s.generation != generation {
            return Err(SendError::Stale { got: generation, current: s.generation });
        }
        if s.phase != StreamPhase::Open {
            return Err(SendError::NotOpen(stream_id));
        }
        if s.granted != U64_MAX && por <= s.granted {
            return Ok(Sent::Skipped);
        }
        if let Some(last) = s.last_sent
            && por <= last
        {
            return Err(SendError::NotIncreasing { id: por, last });
        }
        encode_message(&mut self.out, stream_id, por, key, payload)?;
        s.last_sent = Some(por);
        s.known_max = Some(s.known_max.map_or(por, |m| m.max(por)));
        self.credits -= 1;
        Ok(Sent::Sent)
    }

    /// Handles one frame from the worker.
    pub fn on_frame(&mut self, frame: Frame) {
        match (self.phase, frame) {
            (Phase::AwaitingOk, Frame::Ok { initial_credits }) => {
                self.phase = Phase::Streaming;
                self.credits = initial_credits;
                let mut pending: Vec<u64> =
                    self.streams.iter().filter(|(_, s)| s.phase == StreamPhase::Pending).map(|(id, _)| *id).collect();
                // Deterministic NOTIFY order makes runs reproducible.
                pending.sort_unstable();
                self.control.extend(pending);
                self.flush_control();
            }
            (_, Frame::Error { message }) => {
                self.close(format!("worker sent ERROR: {}", redact_worker_error(&message)));
            }
            (_, Frame::Restart { address }) => {
                let address =
                    if address.is_empty() { None } else { Some(String::from_utf8_lossy(&address).into_owned()) };
                self.phase = Phase::Disconnected;
                self.events.push_back(SourceEvent::Restart { address });
            }
            (Phase::Streaming, Frame::NotifyAck { success, stream_id, point_of_ref }) => {
                self.on_notify_ack(success, stream_id, point_of_ref)
            }
            (Phase::Streaming, Frame::Ack { credits, acks }) => self.on_ack(credits, &acks),
            (phase, other) => {
                self.close(format!("unexpected {} from the worker while {phase:?}", other.name()));
            }
        }
    }

    fn close(&mut self, reason: String) {
        self.phase = Phase::Disconnected;
        self.events.push_back(SourceEvent::Close { reason });
    }

    fn on_notify_ack(&mut self, success: bool, stream_id: u64, por: u64) {
        let Some(s) = self.streams.get_mut(&stream_id) else {
            self.close(format!("NOTIFY_ACK for unknown stream {stream_id:#x}"));
            return;
        };
        if s.phase != StreamPhase::Notifying {
            self.close(format!("NOTIFY_ACK for stream {stream_id:#x} that was not being notified"));
            return;
        }
        if !success {
            s.phase = StreamPhase::Refused;
            self.events.push_back(SourceEvent::Refused { stream_id });
            return;
        }
        s.phase = StreamPhase::Open;
        s.granted = por;
        if por != U64_MAX {
            s.known_max = Some(s.known_max.map_or(por, |m| m.max(por)));
        }
        s.last_sent = None;
        s.generation += 1;
        s.end_requested = false;
        self.events.push_back(SourceEvent::Start {
            stream_id,
            from: Position::from_por(por),
            generation: s.generation,
        });
    }

    fn on_ack(&mut self, credits: u32, acks: &[(u64, u64)]) {
        self.credits = self.credits.saturating_add(credits);
        for &(stream_id, por) in acks {
            let Some(s) = self.streams.get_mut(&stream_id) else { continue };
            if por != U64_MAX && s.known_max.is_none_or(|max| por > max) {
                // Committing upstream through a point never sent would lose every record in between.
                let known = s.known_max.map_or_else(|| "nothing".to_string(), |m| m.to_string());
                self.close(format!(
                    "protocol violation: ACK for stream {stream_id:#x} through {por}, but only {known} was sent or granted"
                ));
                return;
            }
            if por != U64_MAX {
                match s.acked {
                    Some(prev) if por < prev => {
                        tracing::warn!(stream_id, por, prev, "ignoring an ACK that goes backwards");
                        continue;
                    }
                    Some(prev) if por == prev => {}
                    _ => {
                        s.acked = Some(por);
                        self.events.push_back(SourceEvent::Durable { stream_id, through: por });
                    }
                }
            }
            if s.phase == StreamPhase::Ending && por == s.final_por {
                s.phase = StreamPhase::Finished;
                self.events.push_back(SourceEvent::Finished { stream_id });
            }
        }
        // Refused NOTIFYs are retried on every ACK, as the reference client does.
        let mut retry: Vec<u64> =
            self.streams.iter().filter(|(_, s)| s.phase == StreamPhase::Refused).map(|(id, _)| *id).collect();
        retry.sort_unstable();
        for id in retry {
            if let Some(s) = self.streams.get_mut(&id) {
                s.phase = StreamPhase::Pending;
            }
            self.control.push_back(id);
        }
        self.flush_control();
    }

    /// Sends queued NOTIFY/EOS frames while credits allow; each costs one credit, like every frame.
    fn flush_control(&mut self) {
        while self.phase == Phase::Streaming && self.credits > 0 {
            let Some(id) = self.control.pop_front() else { break };
            let Some(s) = self.streams.get_mut(&id) else { continue };
            let frame = match s.phase {
                StreamPhase::Pending => {
                    s.phase = StreamPhase::Notifying;
                    // Spec 2.5: the true last-acked value, or U64_MAX when none is known (never 0: a remote registry
                    // leader grants the NOTIFY's value back, and 0 would skip the record at 0).
                    Frame::Notify {
                        stream_id: id,
                        stream_name: s.name.clone(),
                        point_of_ref: s.acked.unwrap_or(U64_MAX),
                    }
                }
                StreamPhase::Ending => Frame::Eos { stream_id: id },
                _ => continue,
            };
            if let Err(e) = frame.encode(&mut self.out) {
                tracing::error!(stream_id = id, error = %e, "cannot encode control frame");
                continue;
            }
            self.credits -= 1;
        }
    }
}

/// The worker's "Bad cookie: <got>, wanted: <configured>" quotes both cookies (spec 2.2); neither may reach logs.
pub(crate) fn redact_worker_error(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message);
    if text.starts_with("Bad cookie") {
        "Bad cookie (the worker's message quotes the cookies and is withheld; check worker.cookie)".to_string()
    } else {
        text.into_owned()
    }
}
