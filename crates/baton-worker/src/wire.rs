//! Frames ↔ tensors: hidden states in the wire dtype, token ids as u32, stage errors as control
//! frames. Everything on the wire is little-endian, whatever the host.

use baton_model::pipeline::WireDType;
use baton_model::sampling::Sampled;
use baton_model::shard::{BatchInput, MicroBatch, SeqChunk};
use baton_transport::{DType, Frame, FrameKind, SeqSpan};
use bytes::Bytes;
use candle_core::{Device, Tensor};

use crate::{Result, WorkerError};

pub fn transport_dtype(wire: WireDType) -> DType {
    match wire {
        WireDType::F32 => DType::F32,
        WireDType::F16 => DType::F16,
        WireDType::Bf16 => DType::BF16,
    }
}

/// The frame's sequence list as the shard's chunks.
pub fn chunks(frame: &Frame) -> Vec<SeqChunk> {
    frame
        .seqs
        .iter()
        .map(|s| SeqChunk { seq_id: s.seq_id, start_pos: s.start_pos as usize, n_tokens: s.n_tokens as usize })
        .collect()
}

pub fn spans(chunks: &[SeqChunk]) -> Result<Vec<SeqSpan>> {
    chunks
        .iter()
        .map(|c| {
            Ok(SeqSpan {
                seq_id: c.seq_id,
                start_pos: u32::try_from(c.start_pos).map_err(|_| WorkerError::Frame("position beyond u32".into()))?,
                n_tokens: u32::try_from(c.n_tokens).map_err(|_| WorkerError::Frame("chunk beyond u32 tokens".into()))?,
            })
        })
        .collect()
}

pub fn encode_u32s(values: &[u32]) -> Bytes {
    values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
}

pub fn decode_u32s(payload: &[u8]) -> Vec<u32> {
    payload.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A Tokens frame of input ids for stage 0 (all sequences' tokens concatenated in list order).
pub fn tokens_frame(micro_batch: u64, chunks: &[SeqChunk], ids: &[u32]) -> Result<Frame> {
    Ok(Frame::tokens(micro_batch, &spans(chunks)?, encode_u32s(ids))?)
}

/// The last stage's answer as a Tokens payload of 4-byte words: the sampled ids (one per
/// sequence, in list order, so a reader that wants only ids takes the first `n` words), then per
/// sequence its logprob (f32 bits), the number `k` of alternatives and `k` pairs (id, logprob).
/// Logprobs travel with every token: 8 bytes per sequence when no alternatives are asked for,
/// which is cheaper than a second round trip for the requests that want them.
pub fn sampled_payload(samples: &[Sampled]) -> Bytes {
    let mut words: Vec<u32> = samples.iter().map(|s| s.token).collect();
    for s in samples {
        words.push(s.logprob.to_bits());
        words.push(s.top_logprobs.len() as u32);
        for &(id, lp) in &s.top_logprobs {
            words.push(id);
            words.push(lp.to_bits());
        }
    }
    encode_u32s(&words)
}

/// The sampled tokens of a last stage's Tokens frame, paired with their sequences.
pub fn decode_sampled(frame: &Frame) -> Result<Vec<(SeqSpan, Sampled)>> {
    let words = decode_u32s(&frame.payload);
    let n = frame.seqs.len();
    let short = || WorkerError::Frame(format!("sampled-token payload of {} words is short for {n} sequences", words.len()));
    let (ids, mut rest) = (words.get(..n).ok_or_else(short)?, words.get(n..).ok_or_else(short)?);
    let mut out = Vec::with_capacity(n);
    for (span, &token) in frame.seqs.iter().zip(ids) {
        let [lp, k, tail @ ..] = rest else { return Err(short()) };
        let k = *k as usize;
        let pairs = tail.get(..2 * k).ok_or_else(short)?;
        let top_logprobs = pairs.chunks_exact(2).map(|p| (p[0], f32::from_bits(p[1]))).collect();
        out.push((span, Sampled { token, logprob: f32::from_bits(*lp), top_logprobs }));
        rest = &tail[2 * k..];
    }
    Ok(out)
}

/// Hidden states `[T, hidden]` (any float dtype) as a frame in the wire dtype.
pub fn hidden_frame(micro_batch: u64, chunks: &[SeqChunk], hidden: &Tensor, wire: WireDType) -> Result<Frame> {
    let (_, width) = hidden.dims2()?;
    let flat = hidden.flatten_all()?;
    let payload: Vec<u8> = match wire {
        WireDType::F32 => flat.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WireDType::F16 => flat.to_dtype(candle_core::DType::F16)?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WireDType::Bf16 => flat.to_dtype(candle_core::DType::BF16)?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    Ok(Frame::hidden(micro_batch, &spans(chunks)?, transport_dtype(wire), width as u64, payload.into())?)
}

/// A frame's input as a micro-batch for a shard. Hidden states arrive as f32 whatever the wire
/// dtype (widening bf16/f16 is exact, and the shard computes in f32).
pub fn micro_batch(frame: &Frame, device: &Device) -> Result<MicroBatch> {
    let seqs = chunks(frame);
    let input = match frame.kind {
        FrameKind::Tokens => BatchInput::Tokens(decode_u32s(&frame.payload)),
        FrameKind::Hidden => {
            let p = &frame.payload;
            let values: Vec<f32> = match frame.dtype {
                DType::F32 => p.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                DType::F16 => p.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                DType::BF16 => p.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                other => return Err(WorkerError::Frame(format!("hidden states in {other:?}"))),
            };
            let dims = frame.shape.dims();
            let (rows, width) = match dims {
                [r, w] => (*r as usize, *w as usize),
                _ => return Err(WorkerError::Frame(format!("hidden states of shape {dims:?}"))),
            };
            BatchInput::Hidden(Tensor::from_vec(values, (rows, width), device)?)
        }
        FrameKind::Control => return Err(WorkerError::Frame("a control frame carries no micro-batch".into())),
    };
    Ok(MicroBatch { seqs, input })
}

/// Why a stage could not process a micro-batch; travels downstream to the head as a control frame
/// carrying the micro-batch's sequence list, so the head fails exactly those requests.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageFailure {
    /// Layer range of the stage that failed, e.g. `10..20`.
    pub stage: String,
    pub message: String,
}

impl std::fmt::Display for StageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stage {} failed: {}", self.stage, self.message)
    }
}

pub fn failure_frame(micro_batch: u64, seqs: &baton_transport::SeqList, failure: &StageFailure) -> Frame {
    let mut frame = Frame::control(micro_batch, Bytes::from(serde_json::to_vec(failure).unwrap_or_default()));
    frame.seqs = seqs.clone();
    frame
}

pub fn parse_failure(frame: &Frame) -> StageFailure {
    serde_json::from_slice(&frame.payload).unwrap_or_else(|_| StageFailure {
        stage: "?".into(),
        message: format!("unreadable control frame of {} bytes", frame.payload.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_hidden() -> Tensor {
        let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.37 - 1.5).collect();
        Tensor::from_vec(v, (3, 4), &Device::Cpu).unwrap()
    }

    fn chunks() -> Vec<SeqChunk> {
        vec![SeqChunk { seq_id: 7, start_pos: 0, n_tokens: 2 }, SeqChunk { seq_id: 9, start_pos: 5, n_tokens: 1 }]
    }

    #[test]
    fn hidden_round_trips_in_every_wire_dtype() {
        let h = sample_hidden();
        for wire in [WireDType::F32, WireDType::F16, WireDType::Bf16] {
            let frame = hidden_frame(3, &chunks(), &h, wire).unwrap();
            let mb = micro_batch(&frame, &Device::Cpu).unwrap();
            assert_eq!(mb.seqs, chunks());
            let BatchInput::Hidden(back) = mb.input else { panic!("hidden expected") };
            let expected = wire.round_trip(&h).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), expected, "{wire:?}");
        }
    }

    #[test]
    fn tokens_round_trip() {
        let frame = tokens_frame(1, &chunks(), &[5, 6, 70000]).unwrap();
        let mb = micro_batch(&frame, &Device::Cpu).unwrap();
        let BatchInput::Tokens(ids) = mb.input else { panic!("tokens expected") };
        assert_eq!(ids, vec![5, 6, 70000]);
    }

    #[test]
    fn sampled_tokens_round_trip_with_logprobs() {
        let spans = spans(&chunks()).unwrap();
        let samples = vec![
            Sampled { token: 42, logprob: -0.25, top_logprobs: vec![(42, -0.25), (7, -1.5)] },
            Sampled { token: 70000, logprob: -3.0, top_logprobs: vec![] },
        ];
        let frame = Frame::tokens(4, &spans, sampled_payload(&samples)).unwrap();
        let back = decode_sampled(&frame).unwrap();
        assert_eq!(back.iter().map(|(s, _)| *s).collect::<Vec<_>>(), spans);
        assert_eq!(back.into_iter().map(|(_, s)| s).collect::<Vec<_>>(), samples);
        // A truncated payload is an error, not a panic.
        let cut = Frame::tokens(4, &spans, frame.payload.slice(..frame.payload.len() - 4)).unwrap();
        assert!(decode_sampled(&cut).is_err());
        // No sequence sampled: an empty answer that still acknowledges the micro-batch.
        assert!(decode_sampled(&Frame::tokens(5, &[], sampled_payload(&[])).unwrap()).unwrap().is_empty());
    }

    #[test]
    fn failure_keeps_the_sequence_list() {
        let frame = tokens_frame(1, &chunks(), &[5, 6, 7]).unwrap();
        let f = StageFailure { stage: "0..4".into(), message: "boom".into() };
        let c = failure_frame(1, &frame.seqs, &f);
        assert_eq!(c.seqs, frame.seqs);
        assert_eq!(parse_failure(&c), f);
    }
}
