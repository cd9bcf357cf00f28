use bytes::Bytes;

use super::frames;
use crate::protocol::source::{Position, SendError, Sent, SourceEvent, SourceSession, SourceSessionConfig};
use crate::protocol::{Frame, Hello, SOURCE_VERSION, U64_MAX, stream_id_for};

fn session() -> SourceSession {
    SourceSession::new(SourceSessionConfig {
        version: SOURCE_VERSION.into(),
        cookie: "secret".into(),
        program_name: "prog".into(),
        instance_name: "inst".into(),
    })
}

fn events(s: &mut SourceSession) -> Vec<SourceEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// Connected, OK(credits) received, stream "s" announced and granted at `por`. Returns the stream id and the
/// generation.
fn granted(s: &mut SourceSession, credits: u32, por: u64) -> (u64, u64) {
    s.connected();
    s.take_output();
    let id = s.announce(b"s");
    s.on_frame(Frame::Ok { initial_credits: credits });
    s.take_output();
    s.on_frame(Frame::NotifyAck { success: true, stream_id: id, point_of_ref: por });
    let generation = match events(s).pop() {
        Some(SourceEvent::Start { generation, .. }) => generation,
        other => panic!("expected Start, got {other:?}"),
    };
    (id, generation)
}

#[test]
fn rule1_hello_once_per_connection_with_source_version() {
    let mut s = session();
    s.connected();
    let out = frames(s.take_output());
    assert_eq!(
        out,
        vec![Frame::Hello(Hello {
            version: Bytes::from_static(b"0.0.1"),
            cookie: Bytes::from_static(b"secret"),
            program_name: Bytes::from_static(b"prog"),
            instance_name: Bytes::from_static(b"inst"),
        })]
    );
    // Nothing else goes out before OK, whatever the integration wants.
    s.announce(b"s");
    assert!(!s.has_output(), "NOTIFY sent before OK");
    assert!(!s.can_send());
    // A second OK-less frame does not make it send HELLO again.
    s.on_frame(Frame::Ok { initial_credits: 5 });
    let out = frames(s.take_output());
    assert!(out.iter().all(|f| !matches!(f, Frame::Hello(_))), "second HELLO on one connection: {out:?}");
}

#[test]
fn rule2_every_frame_after_hello_costs_a_credit_and_none_go_out_at_zero() {
    let mut s = session();
    s.connected();
    s.take_output();
    let a = s.announce(b"a");
    let b = s.announce(b"b");
    s.on_frame(Frame::Ok { initial_credits: 1 });
    // One credit: one NOTIFY, the other waits.
    assert_eq!(frames(s.take_output()).len(), 1);
    assert_eq!(s.credits(), 0);
    assert!(!s.can_send());
    assert!(s.stream_name(a).is_some() && s.stream_name(b).is_some());
    // ACK adds credits; the queued NOTIFY goes out and costs one.
    s.on_frame(Frame::Ack { credits: 3, acks: vec![] });
    let out = frames(s.take_output());
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(s.credits(), 2);
}

#[test]
fn rule2_send_message_refuses_without_credit() {
    let mut s = session();
    let (id, g) = granted(&mut s, 2, U64_MAX);
    // The NOTIFY took one of the two credits.
    assert_eq!(s.credits(), 1);
    assert_eq!(s.send_message(id, g, 1, None, b"x"), Ok(Sent::Sent));
    assert_eq!(s.credits(), 0);
    assert_eq!(s.send_message(id, g, 2, None, b"y"), Err(SendError::NotReady));
}

#[test]
fn rule3_notify_carries_u64_max_for_a_stream_never_acknowledged() {
    // Spec 2.5 (corrected): 0 would be granted back by a remote registry leader and skip the record at 0.
    let mut s = session();
    s.connected();
    s.take_output();
    let id = s.announce(b"s");
    s.on_frame(Frame::Ok { initial_credits: 10 });
    assert_eq!(
        frames(s.take_output()),
        vec![Frame::Notify { stream_id: id, stream_name: Bytes::from_static(b"s"), point_of_ref: U64_MAX }]
    );
}

#[test]
fn rule3_notify_after_reconnect_carries_the_last_acknowledged_point() {
    let mut s = session();
    let (id, g) = granted(&mut s, 10, U64_MAX);
    for por in [0, 5, 9] {
        s.send_message(id, g, por, None, b"x").unwrap();
    }
    s.on_frame(Frame::Ack { credits: 0, acks: vec![(id, 5)] });
    s.disconnected();
    s.connected();
    s.take_output();
    s.on_frame(Frame::Ok { initial_credits: 10 });
    assert_eq!(
        frames(s.take_output()),
        vec![Frame::Notify { stream_id: id, stream_name: Bytes::from_static(b"s"), point_of_ref: 5 }]
    );
}

#[test]
fn rule3_stream_ids_are_the_sha256_prefix_of_the_name() {
    let mut s = session();
    assert_eq!(s.announce(b"topic:0"), stream_id_for(b"topic:0"));
}

#[test]
fn rule3_resume_after_the_granted_point_or_from_the_beginning() {
    let mut s = session();
    s.connected();
    s.take_output();
    let id = s.announce(b"s");
    s.on_frame(Frame::Ok { initial_credits: 10 });
    s.on_frame(Frame::NotifyAck { success: true, stream_id: id, point_of_ref: U64_MAX });
    assert!(matches!(events(&mut s)[..], [SourceEvent::Start { from: Position::Beginning, .. }]));
    s.disconnected();
    s.connected();
    s.on_frame(Frame::Ok { initial_credits: 10 });
    s.on_frame(Frame::NotifyAck { success: true, stream_id: id, point_of_ref: 41 });
    assert!(matches!(events(&mut s)[..], [SourceEvent::Start { from: Position::After(41), .. }]));
}

#[test]
fn rule3_refused_notify_is_retried_on_the_next_ack() {
    let mut s = session();
    s.connected();
    let id = s.announce(b"s");
    s.on_frame(Frame::Ok { initial_credits: 10 });
    s.take_output();
    s.on_frame(Frame::NotifyAck { success: false, stream_id: id, point_of_ref: U64_MAX });
    assert_eq!(events(&mut s), vec![SourceEvent::Refused { stream_id: id }]);
    assert!(!s.has_output(), "retried before an ACK");
    s.on_frame(Frame::Ack { credits: 1, acks: vec![] });
    assert!(matches!(frames(s.take_output())[..], [Frame::Notify { stream_id, .. }] if stream_id == id));
}

#[test]
fn rule4_ids_strictly_increase_and_replayed_ids_are_skipped_free() {
    let mut s = session();
    let (id, g) = granted(&mut s, 10, 7);
    let before = s.credits();
    // At or below the granted point: the worker would drop it; no credit is spent.
    assert_eq!(s.send_message(id, g, 7, None, b"x"), Ok(Sent::Skipped));
    assert_eq!(s.credits(), before);
    assert_eq!(s.send_message(id, g, 8, None, b"x"), Ok(Sent::Sent));
    assert_eq!(s.send_message(id, g, 8, None, b"x"), Err(SendError::NotIncreasing { id: 8, last: 8 }));
    // A batch read before a rewind (older generation) never goes out.
    assert!(matches!(s.send_message(id, g - 1, 9, None, b"x"), Err(SendError::Stale { .. })));
}

#[test]
fn rule5_ack_is_durable_through_p_and_never_goes_backwards() {
    let mut s = session();
    let (id, g) = granted(&mut s, 10, U64_MAX);
    for por in 1..=6 {
        s.send_message(id, g, por, None, b"x").unwrap();
    }
    s.on_frame(Frame::Ack { credits: 0, acks: vec![(id, 4)] });
    assert_eq!(events(&mut s), vec![SourceEvent::Durable { stream_id: id, through: 4 }]);
    s.on_frame(Frame::Ack { credits: 0, acks: vec![(id, 2)] });
    s.on_frame(Frame::Ack { credits: 0, acks: vec![(id, 4)] });
    s.on_frame(Frame::Ack { credits: 0, acks: vec![(id, U64_MAX)] });
    assert_eq!(events(&mut s), vec![], "stale, repeated or 'nothing yet' ACKs must not commit");
    assert_eq!(s.acked(id), Some(4));
}

#[test]
fn rule5_ack_beyond_what_was_sent_is_a_protocol_error_not_a_commit() {
    // A worker that claims 2^63 after 5 records would make the integration commit records never delivered.
    let mut s = session();
    let (id, g) = granted(&mut s, 10, U64_MAX);
    for por in 1..=5 {
        s.send_message(id, g, por, None, b"x").unwrap();
    }
    s.on_frame(Frame::Ack { credits: 0, acks: vec![(id, 1 << 63)] });
    let ev = events(&mut s);
    assert!(!ev.iter().any(|e| matches!(e, SourceEvent::Durable { .. })), "committed past what was sent: {ev:?}");
    assert!(matches!(ev[..], [SourceEvent::Close { .. }]), "{ev:?}");
    assert_eq!(s.acked(id), None);
}

#[test]
fn rule5_ack_up_to_a_granted_point_from_an_earlier_process_is_accepted() {
    let mut s = session();
    let (id, _) = granted(&mut s, 10, 100);
    s.on_frame(Frame::Ack { credits: 0, acks: vec![(id, 100)] });
    assert_eq!(events(&mut s), vec![SourceEvent::Durable { stream_id: id, through: 100 }]);
}

#[test]
fn rule6_eos_after_the_last_record_finishes_on_the_matching_ack() {
    let mut s = session();
    let (id, g) = granted(&mut s, 10, U64_MAX);
    s.send_message(id, g, 3, None, b"x").unwrap();
    s.take_output();
    s.end_stream(id, g);
    assert_eq!(frames(s.take_output()), vec![Frame::Eos { stream_id: id }]);
    s.on_frame(Frame::Ack { credits: 0, acks: vec![(id, 3)] });
    assert_eq!(
        events(&mut s),
        vec![SourceEvent::Durable { stream_id: id, through: 3 }, SourceEvent::Finished { stream_id: id }]
    );
    assert!(s.all_finished());
}

#[test]
fn rule7_error_closes_and_does_not_log_the_cookie() {
    let mut s = session();
    s.connected();
    s.on_frame(Frame::Error { message: Bytes::from_static(b"Bad cookie: secret, wanted: the-real-one") });
    match events(&mut s).pop() {
        Some(SourceEvent::Close { reason }) => {
            assert!(!reason.contains("the-real-one") && !reason.contains("secret"), "cookie leaked: {reason}");
            assert!(reason.contains("Bad cookie"));
        }
        other => panic!("expected Close, got {other:?}"),
    }
}

#[test]
fn rule7_restart_carries_the_address_and_streams_are_renotified() {
    let mut s = session();
    let (id, g) = granted(&mut s, 10, U64_MAX);
    s.send_message(id, g, 1, None, b"x").unwrap();
    s.on_frame(Frame::Restart { address: Bytes::from_static(b"10.0.0.2:7100") });
    assert_eq!(events(&mut s), vec![SourceEvent::Restart { address: Some("10.0.0.2:7100".into()) }]);
    s.disconnected();
    s.connected();
    s.take_output();
    s.on_frame(Frame::Ok { initial_credits: 10 });
    assert!(
        matches!(frames(s.take_output())[..], [Frame::Notify { stream_id, point_of_ref: U64_MAX, .. }] if stream_id == id)
    );
    s.on_frame(Frame::Restart { address: Bytes::new() });
    assert_eq!(events(&mut s), vec![SourceEvent::Restart { address: None }]);
}

#[test]
fn unexpected_frames_close_the_session() {
    for f in [
        Frame::Notify { stream_id: 1, stream_name: Bytes::new(), point_of_ref: 0 },
        Frame::Eos { stream_id: 1 },
        Frame::Hello(Hello {
            version: Bytes::new(),
            cookie: Bytes::new(),
            program_name: Bytes::new(),
            instance_name: Bytes::new(),
        }),
    ] {
        let mut s = session();
        s.connected();
        s.on_frame(Frame::Ok { initial_credits: 1 });
        s.on_frame(f.clone());
        assert!(matches!(events(&mut s).pop(), Some(SourceEvent::Close { .. })), "{f:?} accepted");
    }
}
