//! The generated service over real loopback gRPC: hello and negotiation, streamed load progress,
//! a resumed weight push, and the message-size bound.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_proto::pb::worker_server::Worker;
use baton_proto::pb::{self, weights_push::Item};
use baton_proto::weights_stream::{self, Receiver};
use baton_proto::{ControlSecurity, SecureError};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Default)]
struct Stub {
    receiver: Arc<Mutex<Option<Receiver>>>,
    /// Bytes the stub stored per tensor, as a worker's cache would.
    stored: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this test"))
}

#[tonic::async_trait]
impl Worker for Stub {
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let remote = req.into_inner().protocol.unwrap_or_default();
        let local = baton_proto::local_protocol();
        baton_proto::negotiate(&local, &remote)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::HelloReply {
            node: Some(pb::NodeInfo {
                id: "00112233445566778899aabbccddeeff".into(),
                name: "stub".into(),
                backend: pb::Backend::Cpu as i32,
                transports: vec![pb::Transport::Tcp as i32, pb::Transport::Quic as i32],
                rdma: Some(pb::RdmaGate {
                    passed: false,
                    failed_step: "devices".into(),
                    reason: "no RDMA device".into(),
                }),
                ..Default::default()
            }),
            protocol: Some(local),
        }))
    }

    type LoadShardStream = Boxed<pb::LoadProgress>;

    async fn load_shard(
        &self,
        req: Request<pb::LoadShardRequest>,
    ) -> Result<Response<Self::LoadShardStream>, Status> {
        let layers = req.into_inner().layers.unwrap_or_default();
        let total = 300u64;
        let mut items: Vec<Result<pb::LoadProgress, Status>> = (1..=3)
            .map(|i| {
                Ok(pb::LoadProgress {
                    phase: pb::LoadPhase::Reading as i32,
                    bytes_done: i * 100,
                    bytes_total: total,
                    ..Default::default()
                })
            })
            .collect();
        items.push(Ok(pb::LoadProgress {
            phase: pb::LoadPhase::Ready as i32,
            bytes_done: total,
            bytes_total: total,
            message: String::new(),
            result: Some(pb::load_progress::Result::Manifest(pb::ShardManifest {
                layers: Some(layers),
                weight_bytes: total,
                source: "local".into(),
                ..Default::default()
            })),
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn resume_weights(
        &self,
        req: Request<pb::WeightSet>,
    ) -> Result<Response<pb::WeightsResume>, Status> {
        let set = req.into_inner();
        let mut slot = self.receiver.lock().unwrap();
        if slot.as_ref().map(|r| r.set() != &set).unwrap_or(true) {
            let n = set.tensors.len();
            *slot = Some(Receiver::new(set).map_err(|e| Status::invalid_argument(e.to_string()))?);
            *self.stored.lock().unwrap() = vec![Vec::new(); n];
        }
        Ok(Response::new(slot.as_ref().unwrap().resume()))
    }

    async fn push_weights(
        &self,
        req: Request<Streaming<pb::WeightsPush>>,
    ) -> Result<Response<pb::PushWeightsReply>, Status> {
        let mut stream = req.into_inner();
        while let Some(msg) = stream.next().await {
            match msg?.item {
                Some(Item::Begin(set)) => {
                    let slot = self.receiver.lock().unwrap();
                    if slot.as_ref().map(|r| r.set() != &set).unwrap_or(true) {
                        return Err(Status::failed_precondition("call ResumeWeights first"));
                    }
                }
                Some(Item::Chunk(chunk)) => {
                    let mut slot = self.receiver.lock().unwrap();
                    let rx = slot
                        .as_mut()
                        .ok_or_else(|| Status::failed_precondition("no begin"))?;
                    match rx
                        .accept(&chunk)
                        .map_err(|e| Status::data_loss(e.to_string()))?
                    {
                        weights_stream::Accepted::Duplicate => {}
                        _ => self.stored.lock().unwrap()[chunk.tensor as usize]
                            .extend_from_slice(&chunk.data),
                    }
                }
                None => return Err(Status::invalid_argument("empty push message")),
            }
        }
        let slot = self.receiver.lock().unwrap();
        let rx = slot
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("no begin"))?;
        Ok(Response::new(pb::PushWeightsReply {
            have: rx.have().to_vec(),
            complete: rx.is_complete(),
        }))
    }

    async fn setup_link(
        &self,
        _: Request<pb::SetupLinkRequest>,
    ) -> Result<Response<pb::SetupLinkReply>, Status> {
        unimplemented()
    }
    async fn open_sequence(
        &self,
        _: Request<pb::OpenSequenceRequest>,
    ) -> Result<Response<pb::OpenSequenceReply>, Status> {
        unimplemented()
    }
    async fn close_sequence(
        &self,
        _: Request<pb::CloseSequenceRequest>,
    ) -> Result<Response<pb::CloseSequenceReply>, Status> {
        unimplemented()
    }
    type HealthStream = Boxed<pb::Heartbeat>;
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<Self::HealthStream>, Status> {
        unimplemented()
    }
    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsReply>, Status> {
        unimplemented()
    }
    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        unimplemented()
    }
    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        unimplemented()
    }
}

const KEY: [u8; 32] = [7; 32];

fn security(key: &[u8]) -> ControlSecurity {
    ControlSecurity::new(key).unwrap()
}

/// The stub behind the secure control channel, holding [`KEY`].
async fn start(stub: Stub) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = security(&KEY).incoming(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(baton_proto::worker_server(stub))
            .serve_with_incoming(incoming),
    );
    addr
}

async fn client(addr: SocketAddr) -> pb::worker_client::WorkerClient<tonic::transport::Channel> {
    baton_proto::connect(addr, &security(&KEY), Duration::from_secs(5))
        .await
        .unwrap()
}

fn hello_request() -> pb::HelloRequest {
    pb::HelloRequest {
        protocol: Some(baton_proto::local_protocol()),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_peer_with_another_cluster_key_is_refused() {
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        let addr = start(Stub::default()).await;
        let err = baton_proto::connect(addr, &security(&[9; 32]), Duration::from_secs(5))
            .await
            .unwrap_err();
        match &err {
            SecureError::Refused(why) => assert!(why.contains("cluster"), "{why}"),
            e => panic!("expected a refusal, got {e:?}"),
        }
        // The server is unharmed: a member still gets in.
        client(addr).await.hello(hello_request()).await.unwrap();
    })
    .await;
    result.expect("test timed out");
}

#[tokio::test]
async fn unauthenticated_connections_are_rejected() {
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        let addr = start(Stub::default()).await;
        // Plain gRPC (HTTP/2 without TLS or key): no answer, whatever it asks.
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        if let Ok(channel) = plain.connect().await {
            let err = pb::worker_client::WorkerClient::new(channel)
                .hello(hello_request())
                .await
                .unwrap_err();
            assert_ne!(err.code(), tonic::Code::Ok);
        }
        // Raw bytes: the server hangs up rather than answering.
        let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
        raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf))
            .await
            .expect("the server neither answered nor hung up")
            .unwrap_or(0);
        assert!(
            n == 0 || buf[0] == 0x15,
            "expected a hang-up or a TLS alert, got {:?}",
            &buf[..n]
        );
        client(addr).await.hello(hello_request()).await.unwrap();
    })
    .await;
    result.expect("test timed out");
}

#[tokio::test]
async fn hello_negotiates_and_refuses_an_incompatible_head() {
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        let mut c = client(start(Stub::default()).await).await;
        let reply = c
            .hello(pb::HelloRequest {
                protocol: Some(baton_proto::local_protocol()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let node = reply.node.unwrap();
        assert_eq!(node.rdma.unwrap().failed_step, "devices");
        assert_eq!(
            node.transports,
            vec![pb::Transport::Tcp as i32, pb::Transport::Quic as i32]
        );
        baton_proto::negotiate(&baton_proto::local_protocol(), &reply.protocol.unwrap()).unwrap();

        let old = pb::Protocol {
            version: 0,
            min_version: 0,
            features: vec![],
            required: vec![],
        };
        let err = c
            .hello(pb::HelloRequest {
                protocol: Some(old),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("protocol version"),
            "{}",
            err.message()
        );
        assert!(
            err.message().contains("last-stage-sampling"),
            "{}",
            err.message()
        );
    })
    .await;
    result.expect("test timed out");
}

#[tokio::test]
async fn load_progress_streams_to_a_final_manifest() {
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        let mut c = client(start(Stub::default()).await).await;
        let req = pb::LoadShardRequest {
            layers: Some((4..9).into()),
            n_layers: 30,
            ..Default::default()
        };
        let progress: Vec<pb::LoadProgress> = c
            .load_shard(req)
            .await
            .unwrap()
            .into_inner()
            .map(|p| p.unwrap())
            .collect()
            .await;
        assert_eq!(progress.len(), 4);
        assert!(progress
            .windows(2)
            .all(|w| w[0].bytes_done <= w[1].bytes_done));
        match &progress[3].result {
            Some(pb::load_progress::Result::Manifest(m)) => {
                assert_eq!(m.layers.unwrap().range(), 4..9)
            }
            other => panic!("expected a manifest, got {other:?}"),
        }
    })
    .await;
    result.expect("test timed out");
}

#[tokio::test]
async fn weight_push_resumes_after_a_dropped_stream() {
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        let stub = Stub::default();
        let stored = stub.stored.clone();
        let mut c = client(start(stub).await).await;
        let tensors: Vec<Vec<u8>> = vec![
            (0..5000u32).map(|i| i as u8).collect(),
            vec![],
            vec![9; 777],
        ];
        let set = pb::WeightSet {
            shard_key: "abc@0..3".into(),
            tensors: tensors
                .iter()
                .enumerate()
                .map(|(i, t)| weights_stream::tensor_info(&format!("blk.{i}.w"), t, vec![]))
                .collect(),
            container: vec![],
        };
        let sizes: Vec<u64> = tensors.iter().map(|t| t.len() as u64).collect();
        let push = |have: Vec<u64>, limit: usize| {
            let spans = weights_stream::plan_chunks(&sizes, &have, 1000).unwrap();
            let mut msgs = vec![pb::WeightsPush {
                item: Some(Item::Begin(set.clone())),
            }];
            msgs.extend(spans.into_iter().take(limit).map(|s| {
                let lo = s.offset as usize;
                let data = tensors[s.tensor as usize][lo..lo + s.len as usize].to_vec();
                pb::WeightsPush {
                    item: Some(Item::Chunk(weights_stream::make_chunk(s, data))),
                }
            }));
            tokio_stream::iter(msgs)
        };

        // The first push stops after two chunks, as a dropped connection would.
        let have = c
            .resume_weights(set.clone())
            .await
            .unwrap()
            .into_inner()
            .have;
        assert_eq!(have, vec![0, 0, 0]);
        let partial = c.push_weights(push(have, 2)).await.unwrap().into_inner();
        assert_eq!(partial.have, vec![2000, 0, 0]);
        assert!(!partial.complete);

        let have = c
            .resume_weights(set.clone())
            .await
            .unwrap()
            .into_inner()
            .have;
        assert_eq!(have, vec![2000, 0, 0]);
        let done = c
            .push_weights(push(have, usize::MAX))
            .await
            .unwrap()
            .into_inner();
        assert!(done.complete);
        assert_eq!(*stored.lock().unwrap(), tensors);
    })
    .await;
    result.expect("test timed out");
}

#[tokio::test]
async fn messages_over_the_bound_are_refused() {
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        let addr = start(Stub::default()).await;
        let huge = pb::WeightSet {
            shard_key: "x".repeat(baton_proto::MAX_MESSAGE_BYTES + 1),
            tensors: vec![],
            container: vec![],
        };
        // Our client will not send it...
        let mut bounded = client(addr).await;
        assert!(bounded.resume_weights(huge.clone()).await.is_err());
        // ...and a peer that does is refused by the server's decode limit.
        let channel = baton_proto::secure::channel(addr, &security(&KEY), Duration::from_secs(5))
            .await
            .unwrap();
        let mut unbounded = pb::worker_client::WorkerClient::new(channel)
            .max_encoding_message_size(4 * baton_proto::MAX_MESSAGE_BYTES);
        let err = unbounded.resume_weights(huge).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
        // A message at the bound still passes.
        let fits = pb::WeightSet {
            shard_key: "x".repeat(1 << 20),
            tensors: vec![],
            container: vec![],
        };
        assert!(bounded.resume_weights(fits).await.is_ok());
    })
    .await;
    result.expect("test timed out");
}
