//! Hostile bytes into the frame decoder and the RDMA slot parser: errors, never panics.
#![no_main]

use baton_transport::rdma::proto::{parse_slot, Rx};
use baton_transport::{Frame, FrameLimits};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = FrameLimits { max_frame_bytes: 1 << 20, max_seqs: 1024 };
    if let Ok(f) = Frame::decode(Bytes::copy_from_slice(data), &limits) {
        assert_eq!(f.encode_to_vec(&limits).expect("decoded frames re-encode"), data);
    }
    let mut rx = Rx::new(1 << 20);
    for chunk in data.chunks(4096) {
        if let Ok((h, payload)) = parse_slot(chunk, 0, 0) {
            let _ = rx.on_slot(0, &h, payload);
        }
    }
});
