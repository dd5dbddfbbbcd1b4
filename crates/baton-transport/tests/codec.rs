//! Frame codec properties: round trips, and hostile input is an error, never a panic or a huge
//! allocation.

use baton_transport::frame::{FrameError, FIXED_HEADER_LEN};
use baton_transport::{DType, Frame, FrameLimits, SeqSpan};
use bytes::Bytes;
use proptest::prelude::*;

fn limits() -> FrameLimits {
    FrameLimits { max_frame_bytes: 1 << 20, max_seqs: 64 }
}

fn hidden_frame() -> impl Strategy<Value = Frame> {
    (
        any::<u64>(),
        prop::collection::vec((any::<u64>(), any::<u32>(), 1u32..4), 1..6),
        prop::sample::select(vec![DType::BF16, DType::F16, DType::F32]),
        1u64..16,
    )
        .prop_map(|(mb, seqs, dtype, hidden)| {
            let spans: Vec<SeqSpan> =
                seqs.into_iter().map(|(seq_id, start_pos, n_tokens)| SeqSpan { seq_id, start_pos, n_tokens }).collect();
            let tokens: u64 = spans.iter().map(|s| u64::from(s.n_tokens)).sum();
            let len = (tokens * hidden * dtype.size()) as usize;
            let payload: Bytes = (0..len).map(|i| i as u8).collect::<Vec<_>>().into();
            Frame::hidden(mb, &spans, dtype, hidden, payload).unwrap()
        })
}

fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hidden_frame(),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(mb, p)| Frame::control(mb, p.into())),
        (any::<u64>(), prop::collection::vec(any::<u32>(), 0..40)).prop_map(|(mb, t)| {
            let b: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
            Frame::tokens(mb, &[SeqSpan { seq_id: 1, start_pos: 0, n_tokens: t.len() as u32 }], b.into()).unwrap()
        }),
    ]
}

proptest! {
    #[test]
    fn round_trip(f in any_frame()) {
        let wire = f.encode_to_vec(&limits()).unwrap();
        prop_assert_eq!(wire.len(), f.encoded_len());
        let back = Frame::decode(Bytes::from(wire), &limits()).unwrap();
        prop_assert_eq!(back, f);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(f) = Frame::decode(Bytes::from(b.clone()), &limits()) {
            prop_assert_eq!(f.encode_to_vec(&limits()).unwrap(), b);
        }
    }

    #[test]
    fn mutated_frames_never_panic(f in any_frame(), pos in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut wire = f.encode_to_vec(&limits()).unwrap();
        let i = pos.index(wire.len());
        wire[i] = byte;
        let _ = Frame::decode(Bytes::from(wire.clone()), &limits());
        wire.truncate(cut.index(wire.len() + 1));
        let _ = Frame::decode(Bytes::from(wire), &limits());
    }
}

fn valid() -> Vec<u8> {
    Frame::control(7, Bytes::from_static(b"abcd")).encode_to_vec(&limits()).unwrap()
}

#[test]
fn hostile_headers_are_precise_errors() {
    let l = limits();
    let dec = |b: Vec<u8>| Frame::decode(Bytes::from(b), &l).unwrap_err();
    let mut b = valid();
    b[0] = b'X';
    assert!(matches!(dec(b), FrameError::BadMagic(_)));
    let mut b = valid();
    b[4] = 9;
    assert_eq!(dec(b), FrameError::BadVersion(9));
    let mut b = valid();
    b[5] = 77;
    assert_eq!(dec(b), FrameError::BadKind(77));
    let mut b = valid();
    b[6] = 77;
    assert_eq!(dec(b), FrameError::BadDType(77));
    let mut b = valid();
    b[7] = 200;
    assert_eq!(dec(b), FrameError::TooManyDims(200));
    let mut b = valid();
    b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(dec(b), FrameError::TooManySeqs { .. }));
    let mut b = valid();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(dec(b), FrameError::LengthMismatch { .. }));
    let mut b = valid();
    b[FIXED_HEADER_LEN..FIXED_HEADER_LEN + 8].copy_from_slice(&5u64.to_le_bytes());
    assert!(matches!(dec(b), FrameError::ShapeMismatch { .. }));
    assert!(matches!(dec(valid()[..10].to_vec()), FrameError::Truncated { .. }));
    assert!(matches!(dec(vec![0; (1 << 20) + 1]), FrameError::TooLarge { .. }));
}

#[test]
fn shape_overflow_and_kind_rules() {
    let l = limits();
    let mut b = valid();
    b[FIXED_HEADER_LEN..FIXED_HEADER_LEN + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(Frame::decode(Bytes::from(b), &l), Err(FrameError::ShapeMismatch { .. })));
    let span = SeqSpan { seq_id: 1, start_pos: 0, n_tokens: 2 };
    assert!(matches!(
        Frame::hidden(0, &[span], DType::U32, 4, Bytes::from(vec![0; 32])),
        Err(FrameError::DTypeForKind { .. })
    ));
    assert!(matches!(Frame::hidden(0, &[span], DType::F32, 4, Bytes::from(vec![0; 31])), Err(FrameError::ShapeMismatch { .. })));
}

#[test]
fn payload_is_not_copied() {
    let f = Frame::control(1, Bytes::from(vec![9u8; 4096]));
    let wire = Bytes::from(f.encode_to_vec(&limits()).unwrap());
    let back = Frame::decode(wire.clone(), &limits()).unwrap();
    let inside = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
    assert!(inside.contains(&(back.payload.as_ptr() as usize)));
}
