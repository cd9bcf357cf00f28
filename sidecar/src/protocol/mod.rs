//! The connector protocol v3, free of I/O: the codec and the two session state machines.
//!
//! Nothing in here touches a socket or a clock. Drivers (in `runtime` and `sim`) feed bytes and events in and
//! write out what the sessions queue, which is what makes every rule of the spec testable without sockets.

mod codec;
mod decoder;
pub mod sink;
pub mod source;
mod stream_id;
mod twopc;

pub use codec::{DecodeError, EncodeError, Frame, Hello, Message, U64_MAX, encode_message, encode_message_parts, tag};
pub use decoder::{CodecError, DEFAULT_MAX_FRAME, FrameCodec, Inbound, MAX_HELLO_FRAME, SinkDecoder};
pub use stream_id::stream_id_for;
pub use twopc::{TwoPc, WhereRange};

/// The version string a worker source requires in HELLO.
pub const SOURCE_VERSION: &str = "0.0.1";
/// The version string a worker sink sends in HELLO (note the `v`).
pub const SINK_VERSION: &str = "v0.0.1";

#[cfg(test)]
mod tests;
