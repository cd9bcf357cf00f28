use bytes::Bytes;

use super::{frames, twopc};
use crate::protocol::sink::{Recovery, SinkAction, SinkSession, SinkSessionConfig, Txn};
use crate::protocol::{Frame, Hello, Message, SINK_VERSION, TwoPc, WhereRange};

fn session() -> SinkSession {
    SinkSession::new(SinkSessionConfig { version: SINK_VERSION.into(), cookie: "c".into(), credits: 500 })
}

fn hello(name: &[u8], cookie: &str, version: &str) -> Frame {
    Frame::Hello(Hello {
        version: Bytes::copy_from_slice(version.as_bytes()),
        cookie: Bytes::copy_from_slice(cookie.as_bytes()),
        program_name: Bytes::from_static(b"app"),
        instance_name: Bytes::copy_from_slice(name),
    })
}

fn actions(s: &mut SinkSession) -> Vec<SinkAction> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn msg(stream_id: u64, message_id: u64, payload: &[u8]) -> Frame {
    Frame::Message(Message {
        stream_id,
        message_id,
        event_time: 0,
        key: None,
        payload: Bytes::copy_from_slice(payload),
    })
}

fn two_pc(m: TwoPc) -> Frame {
    m.to_frame().unwrap()
}

fn phase1(txn: &str, start: u64, end: u64) -> Frame {
    two_pc(TwoPc::Phase1 {
        txn_id: Bytes::copy_from_slice(txn.as_bytes()),
        where_list: vec![WhereRange { stream_id: 1, start, end }],
    })
}

/// HELLO, recovered with `committed`/`pending`, intro answered; output and actions drained.
fn ready(committed: Option<u64>, pending: Option<Txn>) -> SinkSession {
    let mut s = session();
    s.on_frame(hello(b"w1", "c", SINK_VERSION));
    assert!(matches!(actions(&mut s)[..], [SinkAction::Recover { .. }]));
    s.recovered(Recovery { committed, pending });
    s.on_frame(Frame::Notify { stream_id: 1, stream_name: Bytes::from_static(b"app-w-w1-id-1"), point_of_ref: 0 });
    s.on_frame(two_pc(TwoPc::ListUncommitted { rtag: 9 }));
    s.take_output();
    s
}

fn vote(s: &mut SinkSession) -> bool {
    match frames(s.take_output()).last().map(twopc) {
        Some(TwoPc::Reply { commit, .. }) => commit,
        other => panic!("expected a TwoPCReply, got {other:?}"),
    }
}

#[test]
fn rule1_bad_version_or_cookie_is_refused_with_error_and_close() {
    for (version, cookie) in [("0.0.1", "c"), (SINK_VERSION, "wrong")] {
        let mut s = session();
        s.on_frame(hello(b"w1", cookie, version));
        assert!(matches!(frames(s.take_output())[..], [Frame::Error { .. }]));
        assert!(matches!(actions(&mut s)[..], [SinkAction::Close { .. }]));
    }
}

#[test]
fn rule1_the_error_for_a_bad_cookie_does_not_reveal_the_cookie() {
    let mut s = session();
    s.on_frame(hello(b"w1", "wrong", SINK_VERSION));
    match &frames(s.take_output())[..] {
        [Frame::Error { message }] => assert!(!message.windows(1).eq(b"c".windows(1)) && !message.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn rule1_worker_names_must_be_utf8() {
    // State is keyed by the name as text: names differing only in invalid bytes would share transactions.
    let mut s = session();
    s.on_frame(hello(b"w\xff", "c", SINK_VERSION));
    assert!(matches!(frames(s.take_output())[..], [Frame::Error { .. }]));
    assert!(matches!(actions(&mut s)[..], [SinkAction::Close { .. }]));
}

#[test]
fn rule2_ok_then_notify_ack_then_reply_uncommitted_in_that_order() {
    let mut s = session();
    s.on_frame(hello(b"w1", "c", SINK_VERSION));
    s.recovered(Recovery { committed: Some(30), pending: None });
    s.on_frame(Frame::Notify { stream_id: 1, stream_name: Bytes::new(), point_of_ref: 99 });
    s.on_frame(two_pc(TwoPc::ListUncommitted { rtag: 4 }));
    let out = frames(s.take_output());
    assert_eq!(out[0], Frame::Ok { initial_credits: 500 });
    assert_eq!(out[1], Frame::NotifyAck { success: true, stream_id: 1, point_of_ref: 30 });
    assert_eq!(twopc(&out[2]), TwoPc::ReplyUncommitted { rtag: 4, txn_ids: vec![] });
    assert_eq!(out.len(), 3);
}

#[test]
fn rule3_contiguous_data_is_staged_duplicates_skipped() {
    let mut s = ready(Some(0), None);
    s.on_frame(msg(1, 0, b"abc"));
    s.on_frame(msg(1, 3, b"de"));
    s.on_frame(msg(1, 0, b"abc"));
    assert_eq!(
        actions(&mut s),
        vec![
            SinkAction::Stage { offset: 0, payload: Bytes::from_static(b"abc") },
            SinkAction::Stage { offset: 3, payload: Bytes::from_static(b"de") },
        ]
    );
    assert_eq!(s.expected_offset(), 5);
}

#[test]
fn rule3_a_gap_makes_the_next_phase1_vote_abort() {
    let mut s = ready(Some(0), None);
    s.on_frame(msg(1, 0, b"abc"));
    s.on_frame(msg(1, 10, b"zz"));
    actions(&mut s);
    s.on_frame(phase1("t:c_id=2", 0, 12));
    assert!(!vote(&mut s));
}

#[test]
fn rule3_a_partly_overlapping_message_is_not_staged_and_the_round_aborts() {
    let mut s = ready(Some(0), None);
    s.on_frame(msg(1, 0, b"abcd"));
    s.on_frame(msg(1, 2, b"cdEF"));
    assert_eq!(actions(&mut s), vec![SinkAction::Stage { offset: 0, payload: Bytes::from_static(b"abcd") }]);
    s.on_frame(phase1("t:c_id=2", 0, 4));
    assert!(!vote(&mut s), "a truncated record nobody sent would commit");
}

#[test]
fn rule3_offsets_that_overflow_close_instead_of_wrapping() {
    let mut s = ready(Some(u64::MAX - 1), None);
    s.on_frame(msg(1, u64::MAX - 1, b"abc"));
    assert!(matches!(actions(&mut s)[..], [SinkAction::Close { .. }]));
}

#[test]
fn rule3_an_oversize_record_makes_the_round_vote_abort() {
    let mut s = ready(Some(0), None);
    s.oversize(1, 0, 20 << 20, 16 << 20);
    s.on_frame(phase1("t:c_id=2", 0, 0));
    assert!(!vote(&mut s));
}

#[test]
fn rule4_phase1_validates_the_range_and_prepares() {
    let mut s = ready(Some(0), None);
    s.on_frame(msg(1, 0, b"abc"));
    actions(&mut s);
    s.on_frame(phase1("t:c_id=2", 0, 3));
    let txn = Txn { id: Bytes::from_static(b"t:c_id=2"), start: 0, end: 3 };
    assert_eq!(actions(&mut s), vec![SinkAction::Prepare { txn: txn.clone() }]);
    assert!(!s.has_output(), "voted before the data was durable");
    s.prepared(Ok(()));
    assert!(vote(&mut s));
    assert_eq!(s.pending(), Some(&txn));
    for (start, end) in [(1, 3), (0, 2), (0, 4)] {
        let mut s = ready(Some(0), None);
        s.on_frame(msg(1, 0, b"abc"));
        actions(&mut s);
        s.on_frame(phase1("t:c_id=2", start, end));
        assert!(!vote(&mut s), "range [{start},{end}) accepted with 3 bytes received from 0");
    }
}

#[test]
fn rule4_a_staging_failure_after_the_phase1_checks_still_votes_abort() {
    // The driver flushes the round's last batch just before `prepare`; if that staging fails, the round is missing
    // records and must not commit, even when `prepare` itself does not re-check (Kinesis, Kafka transactional).
    let mut s = ready(Some(0), None);
    s.on_frame(msg(1, 0, b"abc"));
    actions(&mut s);
    s.on_frame(phase1("t:c_id=2", 0, 3));
    assert!(matches!(actions(&mut s)[..], [SinkAction::Prepare { .. }]));
    s.poison("staging failed: boom".into());
    s.prepared(Ok(()));
    assert!(!vote(&mut s), "a round with a failed batch voted commit");
    assert_eq!(s.pending(), None);
}

#[test]
fn rule4_reply_exactly_once_and_only_to_phase1() {
    let mut s = ready(Some(0), None);
    s.on_frame(phase1("t:c_id=2", 0, 0));
    actions(&mut s);
    s.prepared(Ok(()));
    s.prepared(Ok(()));
    assert_eq!(frames(s.take_output()).len(), 1);
    s.on_frame(two_pc(TwoPc::Phase2 { txn_id: Bytes::from_static(b"t:c_id=2"), commit: true }));
    assert!(!s.has_output(), "replied to Phase 2");
}

#[test]
fn rule5_phase2_commit_publishes_and_abort_truncates() {
    let mut s = ready(Some(0), None);
    s.on_frame(msg(1, 0, b"abc"));
    s.on_frame(phase1("t:c_id=2", 0, 3));
    actions(&mut s);
    s.prepared(Ok(()));
    s.on_frame(two_pc(TwoPc::Phase2 { txn_id: Bytes::from_static(b"t:c_id=2"), commit: true }));
    assert!(matches!(actions(&mut s)[..], [SinkAction::Commit { ref txn }] if txn.end == 3));
    assert_eq!(s.last_committed(), 3);

    let pending = Txn { id: Bytes::from_static(b"t:c_id=3"), start: 3, end: 7 };
    let mut s = ready(Some(3), Some(pending.clone()));
    s.on_frame(two_pc(TwoPc::Phase2 { txn_id: pending.id.clone(), commit: false }));
    assert!(matches!(actions(&mut s)[..], [SinkAction::Abort { ref txn, .. }] if txn.start == 3));
    assert_eq!(s.expected_offset(), 3);
}

#[test]
fn rule5_unknown_phase2_is_ignored_without_reply() {
    let mut s = ready(Some(0), None);
    s.on_frame(two_pc(TwoPc::Phase2 { txn_id: Bytes::from_static(b"nope"), commit: true }));
    assert!(actions(&mut s).is_empty());
    assert!(!s.has_output());
}

#[test]
fn rule6_recovery_reports_the_one_pending_txn() {
    let pending = Txn { id: Bytes::from_static(b"t:c_id=5"), start: 10, end: 20 };
    let mut s = session();
    s.on_frame(hello(b"w1", "c", SINK_VERSION));
    s.recovered(Recovery { committed: Some(10), pending: Some(pending.clone()) });
    s.on_frame(two_pc(TwoPc::ListUncommitted { rtag: 1 }));
    let out = frames(s.take_output());
    assert_eq!(twopc(out.last().unwrap()), TwoPc::ReplyUncommitted { rtag: 1, txn_ids: vec![pending.id] });
    // A new round while one is pending votes abort and keeps the pending data.
    s.on_frame(phase1("t:c_id=6", 10, 20));
    assert!(!vote(&mut s));
    assert!(actions(&mut s).iter().all(|a| !matches!(a, SinkAction::Abort { .. })));
}

#[test]
fn rule7_workers_left_forgets_others_never_itself() {
    let mut s = ready(Some(0), None);
    s.on_frame(two_pc(TwoPc::WorkersLeft {
        rtag: 7,
        workers: vec![Bytes::from_static(b"w1"), Bytes::from_static(b"w2")],
    }));
    assert_eq!(actions(&mut s), vec![SinkAction::Forget { workers: vec![Bytes::from_static(b"w2")] }]);
    assert!(!s.has_output());
}

#[test]
fn rule7_frames_a_worker_never_sends_close_the_connection() {
    for f in [Frame::Ack { credits: 1, acks: vec![] }, msg(2, 0, b"x"), Frame::Ok { initial_credits: 1 }] {
        let mut s = ready(Some(0), None);
        s.on_frame(f.clone());
        assert!(matches!(actions(&mut s)[..], [SinkAction::Close { .. }]), "{f:?} accepted");
    }
}
