//! Per-frame costs on the hot path: codec and the TCP record tag at activation sizes.

use baton_transport::{DType, Frame, FrameLimits, SeqSpan};
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn codec(c: &mut Criterion) {
    let limits = FrameLimits::default();
    let mut g = c.benchmark_group("frame");
    for size in [64usize, 14 << 10, 1 << 20] {
        let span = SeqSpan { seq_id: 1, start_pos: 0, n_tokens: 1 };
        let f = Frame::hidden(1, &[span], DType::BF16, size as u64 / 2, Bytes::from(vec![1u8; size])).unwrap();
        let wire = Bytes::from(f.encode_to_vec(&limits).unwrap());
        g.throughput(Throughput::Bytes(size as u64));
        let mut hdr = BytesMut::with_capacity(256);
        g.bench_with_input(BenchmarkId::new("encode_header", size), &f, |b, f| {
            b.iter(|| {
                hdr.clear();
                f.encode_header(&mut hdr, &limits).unwrap();
            })
        });
        g.bench_with_input(BenchmarkId::new("decode", size), &wire, |b, w| b.iter(|| Frame::decode(w.clone(), &limits).unwrap()));
        let key = [7u8; 32];
        g.bench_with_input(BenchmarkId::new("blake3_record_tag", size), &wire, |b, w| {
            b.iter(|| blake3::Hasher::new_keyed(&key).update(&0u64.to_le_bytes()).update(w).finalize())
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
