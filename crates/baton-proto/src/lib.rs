//! baton-proto: the control plane between the head and its workers.
//!
//! - [`pb`]: the `baton.v1` messages, the `Worker` service and the head's operator service `Head`,
//!   generated from `proto/baton.proto` (clients in [`pb::worker_client`] and [`pb::head_client`],
//!   server traits in [`pb::worker_server`] and [`pb::head_server`]).
//! - [`negotiate()`]: protocol version and feature agreement, with an error that names every
//!   difference.
//! - [`weights_stream`]: chunking, checksums and resume for pushing a shard's tensors to a worker.
//! - [`worker_server`] / [`connect`], [`head_server`] / [`head_client`]: the services and clients
//!   with message sizes bounded explicitly.
//! - [`secure`]: every control connection is TLS 1.3 with the cluster-key handshake inside.

pub mod negotiate;
pub mod secure;
pub mod weights_stream;

mod convert;

pub use convert::UnknownName;

pub use negotiate::{local_protocol, negotiate, Agreed, Difference, Incompatible};

/// Generated code for the `baton.v1` package.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("baton.v1");
}

/// Largest gRPC message either side encodes or accepts. The biggest messages are weight chunks
/// ([`weights_stream::MAX_CHUNK_BYTES`] plus a few bytes of framing); everything else is small.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The worker service with [`MAX_MESSAGE_BYTES`] applied in both directions.
pub fn worker_server<T: pb::worker_server::Worker>(
    service: T,
) -> pb::worker_server::WorkerServer<T> {
    pb::worker_server::WorkerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A client over an established channel, with [`MAX_MESSAGE_BYTES`] applied in both directions.
pub fn worker_client(
    channel: tonic::transport::Channel,
) -> pb::worker_client::WorkerClient<tonic::transport::Channel> {
    pb::worker_client::WorkerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The head's operator service with [`MAX_MESSAGE_BYTES`] applied in both directions.
pub fn head_server<T: pb::head_server::Head>(service: T) -> pb::head_server::HeadServer<T> {
    pb::head_server::HeadServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A head client over an established channel, with [`MAX_MESSAGE_BYTES`] applied in both directions.
pub fn head_client(
    channel: tonic::transport::Channel,
) -> pb::head_client::HeadClient<tonic::transport::Channel> {
    pb::head_client::HeadClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub use secure::{channel, connect, ControlSecurity, SecureError};
