//! Hostile control-plane messages, decoded with prost and handed to the code a peer runs on them.
//! The first byte picks the message: every request a worker takes from a head, every reply a head
//! takes from a worker, and the `PushWeights` stream as a sequence of length-delimited messages.
//! The rest of the input is the message's protobuf encoding. Errors are fine; panics are bugs.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_proto::pb;
use baton_proto::weights_stream::{
    plan_chunks, tensor_info, Receiver, DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES,
};
use baton_proto::{local_protocol, negotiate};
use baton_worker::service::{
    preference_from_proto, sampling_from_proto, sampling_to_proto, wire_from_proto,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 20 {
        // Worker side: what a head sends.
        0 => hello_request(body),
        1 => load_shard_request(body),
        2 => weight_set(body),
        3 => weights_push(body),
        4 => push_stream(body, false),
        5 => push_stream(body, true),
        6 => setup_link_request(body),
        7 => open_sequence_request(body),
        8 => close_sequence_request(body),
        9 => health_request(body),
        10 => drain_request(body),
        11 => shutdown_request(body),
        // Head side: what a worker answers.
        12 => hello_reply(body),
        13 => load_progress(body),
        14 => setup_link_reply(body),
        15 => heartbeat(body),
        16 => stats_reply(body),
        17 => push_weights_reply(body),
        18 => weights_resume(body),
        _ => names(body),
    }
});

/// `body` as an `M`, when it is one. What decodes must re-encode to bytes of the announced length
/// that decode again to the same encoding (compared as bytes: NaN floats are not equal to
/// themselves).
fn decode<M: Message + Default>(body: &[u8]) -> Option<M> {
    let m = M::decode(body).ok()?;
    let bytes = m.encode_to_vec();
    assert_eq!(bytes.len(), m.encoded_len());
    let again = M::decode(bytes.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again.encode_to_vec(), bytes);
    Some(m)
}

/// An enum field through its conversion and short name (`baton_proto::convert`): a named value
/// parses back from its name.
macro_rules! enum_name {
    ($ty:ty, $value:expr, $fallback:expr) => {{
        let e = <$ty>::try_from($value).unwrap_or($fallback);
        let name = e.short_name();
        assert_eq!(e.to_string(), name);
        if name != "unspecified" {
            assert_eq!(name.parse::<$ty>(), Ok(e));
        }
    }};
}

/// The hello check both sides run: negotiation against this build, which must agree (or refuse)
/// the same way whichever side runs it.
fn protocol(remote: Option<pb::Protocol>) {
    let remote = remote.unwrap_or_default();
    let ours = negotiate(&local_protocol(), &remote);
    let theirs = negotiate(&remote, &local_protocol());
    match (&ours, &theirs) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b);
            assert!(a.version >= 1);
            assert!(a.features.iter().all(|f| a.has(f)));
        }
        (Err(a), Err(b)) => {
            assert!(!a.differences.is_empty());
            assert_eq!(a.differences.len(), b.differences.len());
            let _ = a.to_string();
        }
        _ => panic!("negotiation is not symmetric: {ours:?} vs {theirs:?}"),
    }
}

fn layer_range(r: &pb::LayerRange) {
    let range = r.range();
    assert_eq!((range.start, range.end), (r.start as usize, r.end as usize));
    assert_eq!(pb::LayerRange::from(r.start..r.end), *r);
    assert_eq!(r.to_string(), format!("{}..{}", r.start, r.end));
}

fn hello_request(body: &[u8]) {
    let Some(m) = decode::<pb::HelloRequest>(body) else {
        return;
    };
    protocol(m.protocol);
}

fn load_shard_request(body: &[u8]) {
    let Some(m) = decode::<pb::LoadShardRequest>(body) else {
        return;
    };
    if let Some(r) = &m.layers {
        layer_range(r);
    }
    enum_name!(pb::WireDtype, m.wire_dtype, pb::WireDtype::Unspecified);
    let _ = wire_from_proto(m.wire_dtype);
}

/// `ResumeWeights` (and a push's `begin`): the worker builds a receiver and answers with what it
/// holds, which a fresh receiver says is nothing.
fn receiver(set: pb::WeightSet) -> Option<Receiver> {
    let n = set.tensors.len();
    let rx = Receiver::new(set).ok()?;
    assert_eq!(rx.resume().have, vec![0; n]);
    assert_eq!(rx.bytes_done(), 0);
    assert_eq!(rx.is_complete(), rx.bytes_total() == 0);
    Some(rx)
}

/// What a receiver reports must stay within its weight set, whatever it was fed.
fn check_receiver(rx: &Receiver) {
    let have = rx.have();
    assert_eq!(have.len(), rx.set().tensors.len());
    for (h, t) in have.iter().zip(&rx.set().tensors) {
        assert!(*h <= t.size);
    }
    assert!(rx.bytes_done() <= rx.bytes_total());
    assert_eq!(rx.resume().have, have);
}

fn weight_set(body: &[u8]) {
    if let Some(set) = decode::<pb::WeightSet>(body) {
        receiver(set);
    }
}

/// A small weight set of the worker's own for lone chunks: an empty tensor, a short one, one of
/// more than a chunk.
fn known_set() -> pb::WeightSet {
    pb::WeightSet {
        shard_key: "00ff".into(),
        tensors: vec![
            tensor_info("empty", &[], vec![]),
            tensor_info("short", b"baton", vec![]),
            tensor_info("long", &[7u8; 300], vec![]),
        ],
        container: vec![],
    }
}

fn weights_push(body: &[u8]) {
    let Some(m) = decode::<pb::WeightsPush>(body) else {
        return;
    };
    match m.item {
        Some(pb::weights_push::Item::Begin(set)) => {
            receiver(set);
        }
        Some(pb::weights_push::Item::Chunk(chunk)) => {
            let mut rx = Receiver::new(known_set()).expect("a valid set");
            let _ = rx.accept(&chunk);
            check_receiver(&rx);
        }
        None => {}
    }
}

/// `PushWeights` as the worker runs it: a `begin`, then chunks fed to its receiver in order, with
/// the bytes of earlier accepted chunks re-read (`absorb_existing`) into a second receiver as after
/// a restart. With `fix_crc` the harness computes each chunk's CRC-32 so that inputs reach the
/// ordering, overflow and digest checks behind it.
fn push_stream(mut body: &[u8], fix_crc: bool) {
    let Ok(first) = pb::WeightsPush::decode_length_delimited(&mut body) else {
        return;
    };
    let Some(pb::weights_push::Item::Begin(set)) = first.item else {
        return;
    };
    let Some(mut rx) = receiver(set.clone()) else {
        return;
    };
    let mut written: Vec<Vec<u8>> = vec![Vec::new(); set.tensors.len()];
    while let Ok(m) = pb::WeightsPush::decode_length_delimited(&mut body) {
        let Some(pb::weights_push::Item::Chunk(mut chunk)) = m.item else {
            break;
        };
        if fix_crc {
            chunk.crc32 = crc32fast::hash(&chunk.data);
        }
        let before = rx.have().to_vec();
        match rx.accept(&chunk) {
            Ok(baton_proto::weights_stream::Accepted::Duplicate) => assert_eq!(rx.have(), before),
            Ok(_) => {
                // Accepted new bytes extend the tensor exactly where it stood.
                let t = chunk.tensor as usize;
                assert_eq!(before[t], chunk.offset);
                written[t].extend_from_slice(&chunk.data);
            }
            Err(_) => {
                // A refused chunk changes nothing, except a digest failure that resets its tensor.
                for (t, (b, h)) in before.iter().zip(rx.have()).enumerate() {
                    assert!(b == h || *h == 0, "tensor {t}: {b} -> {h}");
                    if *h == 0 {
                        written[t].clear();
                    }
                }
            }
        }
        check_receiver(&rx);
    }
    // A worker restarted with what it wrote resumes from the same offsets.
    let mut again = Receiver::new(set).expect("accepted before");
    for (t, bytes) in written.iter().enumerate() {
        if !bytes.is_empty() {
            again
                .absorb_existing(t as u32, bytes)
                .expect("bytes accepted once are accepted again");
        }
    }
    assert_eq!(again.have(), rx.have());
}

fn setup_link_request(body: &[u8]) {
    let Some(m) = decode::<pb::SetupLinkRequest>(body) else {
        return;
    };
    let _ = preference_from_proto(m.preference);
    enum_name!(
        pb::TransportPreference,
        m.preference,
        pb::TransportPreference::Auto
    );
    enum_name!(pb::WireDtype, m.wire_dtype, pb::WireDtype::Unspecified);
    let _ = pb::LinkRole::try_from(m.role).unwrap_or(pb::LinkRole::Unspecified);
    if let Some(addr) = m.peer_addrs.first() {
        let _ = addr.parse::<SocketAddr>();
    }
    let _ = Duration::from_millis(u64::from(m.timeout_ms));
}

fn open_sequence_request(body: &[u8]) {
    let Some(m) = decode::<pb::OpenSequenceRequest>(body) else {
        return;
    };
    let params = sampling_from_proto(&m.sampling.unwrap_or_default());
    if params.check().is_ok() {
        // Valid parameters survive the trip to the wire and back (the head sends them so).
        assert_eq!(sampling_from_proto(&sampling_to_proto(&params)), params);
    }
}

fn close_sequence_request(body: &[u8]) {
    decode::<pb::CloseSequenceRequest>(body);
}

fn health_request(body: &[u8]) {
    if let Some(m) = decode::<pb::HealthRequest>(body) {
        let _ = Duration::from_millis(u64::from(m.interval_ms.max(50)));
    }
}

fn drain_request(body: &[u8]) {
    if let Some(m) = decode::<pb::DrainRequest>(body) {
        let _ = Instant::now() + Duration::from_millis(u64::from(m.timeout_ms));
    }
}

fn shutdown_request(body: &[u8]) {
    decode::<pb::ShutdownRequest>(body);
}

fn hello_reply(body: &[u8]) {
    let Some(m) = decode::<pb::HelloReply>(body) else {
        return;
    };
    protocol(m.protocol);
    if let Some(node) = m.node {
        enum_name!(pb::Backend, node.backend, pb::Backend::Unspecified);
        let _ = node.backend().short_name();
        for t in node.transports {
            enum_name!(pb::Transport, t, pb::Transport::Unspecified);
        }
    }
}

fn load_progress(body: &[u8]) {
    if let Some(m) = decode::<pb::LoadProgress>(body) {
        let _ = m.phase();
        if let Some(pb::load_progress::Result::Manifest(manifest)) = &m.result {
            if let Some(r) = &manifest.layers {
                layer_range(r);
            }
        }
    }
}

fn setup_link_reply(body: &[u8]) {
    let Some(m) = decode::<pb::SetupLinkReply>(body) else {
        return;
    };
    enum_name!(pb::Transport, m.chosen, pb::Transport::Unspecified);
    for r in &m.rejected {
        enum_name!(pb::Transport, r.transport, pb::Transport::Unspecified);
    }
    let _ = m.rtt_ns as f64 / 1000.0;
}

fn node_load(load: &pb::NodeLoad) {
    let _ = load.state();
}

fn heartbeat(body: &[u8]) {
    if let Some(load) = decode::<pb::Heartbeat>(body).and_then(|m| m.load) {
        node_load(&load);
    }
}

fn stats_reply(body: &[u8]) {
    let Some(m) = decode::<pb::StatsReply>(body) else {
        return;
    };
    if let Some(load) = &m.load {
        node_load(load);
    }
    for l in &m.links {
        enum_name!(pb::Transport, l.transport, pb::Transport::Unspecified);
    }
}

fn push_weights_reply(body: &[u8]) {
    decode::<pb::PushWeightsReply>(body);
}

/// The head plans the rest of a push from the worker's `have`: against its own sizes (here, as
/// many tensors as the worker named, each of a little over two default chunks), in order, never
/// past a tensor's end.
fn weights_resume(body: &[u8]) {
    let Some(m) = decode::<pb::WeightsResume>(body) else {
        return;
    };
    let size = 2 * u64::from(DEFAULT_CHUNK_BYTES) + 1;
    let sizes = vec![size; m.have.len()];
    let Ok(spans) = plan_chunks(&sizes, &m.have, DEFAULT_CHUNK_BYTES) else {
        return;
    };
    let mut next = m.have.clone();
    for s in spans {
        let t = s.tensor as usize;
        assert_eq!(s.offset, next[t]);
        assert!(s.len >= 1 && s.len <= MAX_CHUNK_BYTES);
        next[t] += u64::from(s.len);
    }
    assert_eq!(next, sizes);
}

/// Free text into the short-name parsers (`cluster.toml`, TXT records, CLI flags): a name that
/// parses is one of the short names.
fn names(body: &[u8]) {
    let Ok(s) = std::str::from_utf8(body) else {
        return;
    };
    let wanted = s.trim().to_ascii_lowercase();
    if let Ok(b) = s.parse::<pb::Backend>() {
        assert_eq!(b.short_name(), wanted);
    }
    if let Ok(t) = s.parse::<pb::Transport>() {
        assert_eq!(t.short_name(), wanted);
    }
    if let Ok(p) = s.parse::<pb::TransportPreference>() {
        assert_eq!(p.short_name(), wanted);
    }
    match s.parse::<pb::WireDtype>() {
        Ok(w) => assert_eq!(w.short_name(), wanted),
        Err(e) => assert!(e.to_string().contains("wire dtype")),
    }
}
