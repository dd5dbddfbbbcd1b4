//! The head's operator service (`baton drain`, `baton join`, `baton rebalance`): gRPC behind the
//! same TLS and cluster-key proof as the workers' control plane, so only a cluster member can
//! re-plan the cluster.

use std::future::Future;

use baton_proto::pb::{self, head_server::Head as HeadService};
use tonic::{Request, Response, Status};

use crate::head::{Head, HeadError, Replanned};

struct Operator {
    head: Head,
}

fn status(e: HeadError) -> Status {
    match e {
        HeadError::Plan(m) => Status::failed_precondition(m),
        HeadError::Config(m) => Status::invalid_argument(m),
        e @ (HeadError::Worker { .. } | HeadError::Link(_)) => Status::unavailable(e.to_string()),
        HeadError::Unavailable(m) => Status::unavailable(m),
        e => Status::internal(e.to_string()),
    }
}

fn reply(r: Replanned) -> Response<pb::ReplanReply> {
    Response::new(pb::ReplanReply { stages: r.stages, resumed_sequences: r.resumed as u32, pause_ms: r.pause.as_millis() as u64 })
}

#[tonic::async_trait]
impl HeadService for Operator {
    async fn drain_node(&self, req: Request<pb::DrainNodeRequest>) -> Result<Response<pb::ReplanReply>, Status> {
        self.head.drain(&req.into_inner().node).await.map(reply).map_err(status)
    }

    async fn join_node(&self, req: Request<pb::JoinNodeRequest>) -> Result<Response<pb::JoinNodeReply>, Status> {
        let (name, message) = self.head.join(&req.into_inner().endpoint).await.map_err(status)?;
        Ok(Response::new(pb::JoinNodeReply { name, message }))
    }

    async fn rebalance(&self, _: Request<pb::RebalanceRequest>) -> Result<Response<pb::ReplanReply>, Status> {
        self.head.rebalance().await.map(reply).map_err(status)
    }
}

/// Serves the operator service on `listener` until `stop` resolves.
pub async fn serve(head: Head, listener: tokio::net::TcpListener, stop: impl Future<Output = ()> + Send + 'static) -> Result<(), tonic::transport::Error> {
    let incoming = head.security().incoming(listener);
    tonic::transport::Server::builder()
        .max_concurrent_streams(baton_worker::service::MAX_CONCURRENT_STREAMS)
        .add_service(baton_proto::head_server(Operator { head }))
        .serve_with_incoming_shutdown(incoming, stop)
        .await
}
