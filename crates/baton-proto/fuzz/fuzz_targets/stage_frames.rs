//! Hostile data-link frames into the payload code of a stage and of the head
//! (`baton_worker::wire`): the input is decoded as a frame with the links' default limits, then
//! read as a micro-batch (what a stage runs), as sampled tokens and as a stage failure (what the
//! head reads from the last stage). Errors are fine; panics and allocations beyond the frame's
//! size are bugs (libFuzzer's -rss_limit_mb and -malloc_limit_mb catch the latter).
#![no_main]

use baton_model::pipeline::WireDType;
use baton_model::shard::BatchInput;
use baton_transport::{DType, Frame, FrameKind, FrameLimits};
use baton_worker::wire::{
    chunks, decode_sampled, failure_frame, hidden_frame, micro_batch, parse_failure,
    sampled_payload, spans,
};
use bytes::Bytes;
use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::decode(Bytes::copy_from_slice(data), &FrameLimits::default()) else {
        return;
    };

    let seqs = chunks(&frame);
    assert_eq!(seqs.len(), frame.seqs.len());
    let back = spans(&seqs).expect("spans from a frame fit the frame");
    assert!(back.into_iter().eq(frame.seqs.iter()));

    match micro_batch(&frame, &Device::Cpu) {
        Ok(mb) => {
            assert_eq!(mb.seqs, seqs);
            match mb.input {
                BatchInput::Tokens(ids) => {
                    assert_eq!(frame.kind, FrameKind::Tokens);
                    assert_eq!(ids.len(), frame.payload.len() / 4);
                }
                BatchInput::Hidden(h) => {
                    assert_eq!(frame.kind, FrameKind::Hidden);
                    let dims: Vec<u64> = h.dims().iter().map(|&d| d as u64).collect();
                    assert_eq!(dims, frame.shape.dims());
                    // The stage sends hidden states on in its wire dtype; what it received in that
                    // dtype goes out as the same frame, NaNs aside (converting may quiet them).
                    let wire = match frame.dtype {
                        DType::F32 => WireDType::F32,
                        DType::F16 => WireDType::F16,
                        DType::BF16 => WireDType::Bf16,
                        other => panic!("hidden states in {other:?} were accepted"),
                    };
                    let out = hidden_frame(frame.micro_batch, &mb.seqs, &h, wire)
                        .expect("hidden states of a valid frame make a frame");
                    assert_eq!(out.shape, frame.shape);
                    assert_eq!(out.seqs, frame.seqs);
                    assert_eq!(out.payload.len(), frame.payload.len());
                }
            }
        }
        Err(_) => assert!(frame.kind == FrameKind::Control),
    }

    if let Ok(sampled) = decode_sampled(&frame) {
        assert_eq!(sampled.len(), frame.seqs.len());
        // The sampled tokens re-encode to the words they were read from.
        let samples: Vec<_> = sampled.into_iter().map(|(_, s)| s).collect();
        assert!(frame.payload.starts_with(&sampled_payload(&samples)));
    }

    let failure = parse_failure(&frame);
    let sent = failure_frame(frame.micro_batch, &frame.seqs, &failure);
    assert_eq!(sent.seqs, frame.seqs);
    assert_eq!(parse_failure(&sent), failure);
});
