//! Round trips of every wire message, and refusal of damaged frames.

use fogmesh_protocols::*;
use proptest::prelude::*;

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::Malformed),
        Just(ErrorCode::NotServed),
        Just(ErrorCode::Busy),
        Just(ErrorCode::UnknownSession),
        Just(ErrorCode::Model),
        Just(ErrorCode::Internal),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn node() -> impl Strategy<Value = NodeId> {
    text().prop_map(NodeId)
}

fn hash() -> impl Strategy<Value = ModelHash> {
    any::<[u8; 32]>()
}

fn token_result() -> impl Strategy<Value = TokenResult> {
    (any::<u64>(), any::<u32>(), any::<u32>(), any::<f32>())
        .prop_map(|(session, step, token, logprob)| TokenResult { session, step, token, logprob })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (node(), any::<u32>(), any::<u64>(), any::<f32>(), text(), proptest::collection::vec(hash(), 0..3), proptest::collection::vec((hash(), bytes(16)), 0..2), proptest::collection::vec(text(), 0..3), any::<bool>()).prop_map(
            |(peer, cores, memory_bytes, gflops, version, models, held, addrs, joining)| {
                let partial = held.into_iter().map(|(model, bitmap)| HeldChunks { model, bitmap }).collect();
                Message::Capabilities(Capabilities { peer, cores, memory_bytes, gflops, version, models, partial, addrs, joining })
            }
        ),
        (node(), node(), any::<u64>()).prop_map(|(peer, gone, last_heard_ms)| Message::Departure(Departure { peer, gone, last_heard_ms })),
        (node(), proptest::collection::vec(node(), 0..4)).prop_map(|(peer, wanted)| Message::CapsWanted(CapsWanted { peer, wanted })),
        (node(), any::<u64>(), proptest::collection::vec((hash(), any::<u32>(), any::<u32>(), any::<u32>(), any::<f32>()), 0..5))
            .prop_map(|(peer, timestamp_ms, s)| Message::LoadReport(LoadReport {
                peer,
                timestamp_ms,
                shards: s
                    .into_iter()
                    .map(|(model, start, end, queue_depth, tokens_per_s)| ShardLoad { model, start, end, queue_depth, tokens_per_s })
                    .collect(),
            })),
        (node(), hash(), any::<u32>(), any::<u32>())
            .prop_map(|(peer, model, start, end)| Message::ShardAdvert(ShardAdvert { peer, model, start, end, cached: start / 2, bound: end })),
        (any::<u64>(), any::<u64>(), hash(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>()).prop_map(
            |(auction, session, model, start, end, tokens, activation_bytes, deadline_ms)| {
                Message::CallForBids(CallForBids { auction, session, model, start, end, tokens, activation_bytes, deadline_ms })
            }
        ),
        (any::<u64>(), node(), any::<f32>(), any::<f32>(), any::<f32>()).prop_map(
            |(auction, peer, queue_ms, service_ms, transfer_ms)| Message::Bid(Bid { auction, peer, queue_ms, service_ms, transfer_ms })
        ),
        (any::<u64>(), node()).prop_map(|(auction, peer)| Message::Award(Award { auction, peer })),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            prop_oneof![
                proptest::collection::vec(any::<u32>(), 0..64).prop_map(StageInput::Tokens),
                bytes(512).prop_map(StageInput::Activation)
            ]
        )
            .prop_map(|(request, session, step, stage, position, sample, input)| Message::StageRequest(StageRequest {
                request,
                session,
                step,
                stage,
                position,
                sample,
                input
            })),
        (
            any::<u64>(),
            prop_oneof![
                bytes(512).prop_map(StageOutcome::Activation),
                token_result().prop_map(StageOutcome::Token),
                (any::<u64>(), proptest::option::of(node()), error_code(), text())
                    .prop_map(|(session, peer, code, reason)| StageOutcome::Error(StageError { session, peer, code, reason })),
            ]
        )
            .prop_map(|(request, outcome)| Message::StageReply(StageReply { request, outcome })),
        token_result().prop_map(Message::TokenResult),
        (
            (any::<u64>(), hash(), any::<u32>(), any::<u32>(), any::<u32>()),
            (node(), (proptest::option::of(node()), proptest::option::of(node())), (any::<f32>(), any::<u32>(), any::<f32>(), any::<f32>(), any::<u32>(), any::<u64>())),
            (proptest::collection::vec(any::<u32>(), 0..64), any::<u32>())
        )
            .prop_map(|((session, model, start, end, max_tokens), (owner, (prev, next), sp), (history, draws))| {
                let sampling = SamplingSpec {
                    temperature: sp.0,
                    top_k: sp.1,
                    top_p: sp.2,
                    repetition_penalty: sp.3,
                    repeat_last_n: sp.4,
                    seed: sp.5,
                };
                Message::SessionOpen(SessionOpen { session, model, start, end, max_tokens, owner, prev, next, sampling, history, draws })
            }),
        any::<u64>().prop_map(|session| Message::SessionClose(SessionClose { session })),
        (any::<u64>(), text()).prop_map(|(session, reason)| Message::SessionCancel(SessionCancel { session, reason })),
        (hash(), any::<u32>()).prop_map(|(model, chunk)| Message::WeightChunkRequest(WeightChunkRequest { model, chunk })),
        (hash(), any::<u32>(), bytes(1024))
            .prop_map(|(model, chunk, data)| Message::WeightChunkReply(WeightChunkReply { model, chunk, data })),
        (any::<u64>(), error_code(), text()).prop_map(|(request, code, message)| Message::Error(ErrorFrame { request, code, message })),
    ]
}

/// Floats compare by bits so NaN payloads round-trip too.
fn same(a: &Message, b: &Message) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(msg in message(), prefix in bytes(7)) {
        let limits = Limits::default();
        // Frames arrive at any offset of a receive buffer.
        let mut buf = prefix.clone();
        encode_message(&msg, &limits, &mut buf).unwrap();
        let (got, n) = read_message(&buf[prefix.len()..], &limits).unwrap().unwrap();
        prop_assert!(same(&got, &msg), "{:?} != {:?}", got, msg);
        prop_assert_eq!(n, buf.len() - prefix.len());
    }

    #[test]
    fn truncated_frames_wait_and_corrupted_frames_fail(msg in message(), cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let limits = Limits::default();
        let mut buf = Vec::new();
        encode_message(&msg, &limits, &mut buf).unwrap();
        let at = cut.index(buf.len());
        prop_assert!(read_message(&buf[..at], &limits).unwrap().is_none());
        let mut bad = buf.clone();
        let i = flip.index(bad.len());
        bad[i] ^= 1 << bit;
        // The CRC catches every single-bit flip in the payload; header flips
        // are refused or make the frame look incomplete.
        match read_message(&bad, &limits) {
            Ok(Some((m, _))) => prop_assert!(false, "a flipped bit at {} was accepted as {:?}", i, m),
            Ok(None) | Err(_) => {}
        }
    }

    #[test]
    fn garbage_payloads_with_valid_crc_never_panic(kind in 1u16..16, payload in bytes(300)) {
        let mut buf = Vec::new();
        write_frame(MessageKind::from_u16(kind).unwrap(), &payload, &Limits::default(), &mut buf).unwrap();
        let _ = read_message(&buf, &Limits::default());
    }
}

#[test]
fn a_payload_under_the_wrong_kind_is_refused() {
    let msg = Message::SessionClose(SessionClose { session: 7 });
    let mut buf = Vec::new();
    encode_message(&msg, &Limits::default(), &mut buf).unwrap();
    let (_, payload, _) = read_frame(&buf, &Limits::default()).unwrap().unwrap();
    let err = decode_payload(MessageKind::SessionOpen, payload).unwrap_err();
    assert!(matches!(err, ProtocolError::KindMismatch { .. }) || matches!(err, ProtocolError::InvalidMessage(_)), "{err:?}");
}

#[test]
fn oversized_messages_are_refused_both_ways() {
    let small = Limits { max_frame: 1024, ..Limits::default() };
    let big = Message::WeightChunkReply(WeightChunkReply { model: [0; 32], chunk: 0, data: vec![1; 4096] });
    assert!(matches!(encode_message(&big, &small, &mut Vec::new()), Err(ProtocolError::FrameTooLarge { .. })));
    let mut buf = Vec::new();
    encode_message(&big, &Limits::default(), &mut buf).unwrap();
    assert!(matches!(read_message(&buf, &small), Err(ProtocolError::FrameTooLarge { .. })));
}

#[test]
fn message_kinds_are_numbered_one_to_seventeen() {
    for (i, k) in MessageKind::ALL.iter().enumerate() {
        assert_eq!(*k as u16, i as u16 + 1);
        assert_eq!(MessageKind::from_u16(i as u16 + 1), Some(*k));
    }
    assert_eq!(MessageKind::from_u16(0), None);
    assert_eq!(MessageKind::from_u16(18), None);
}
