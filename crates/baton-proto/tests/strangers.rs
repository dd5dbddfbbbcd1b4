//! Strangers on the control plane, served as a worker serves it (`ControlSecurity::incoming`
//! under `worker_server`): a client that completes TLS but makes no key proof, one that holds
//! another key, and a man in the middle relaying a member's handshake between two TLS sessions
//! all fail before the first call, so no call (`Shutdown`, `LoadShard`, ...) reaches the service.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton_proto::pb::{self, worker_server::Worker};
use baton_proto::{ControlSecurity, SecureError};
use baton_transport::tls;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const KEY: [u8; 32] = [0x33; 32];
const LIMIT: Duration = Duration::from_secs(30);

/// Counts every call that reaches it.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

impl Counting {
    fn called<T>(&self, reply: T) -> Result<Response<T>, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(reply))
    }

    fn calls(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Worker for Counting {
    async fn hello(
        &self,
        _: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        self.called(pb::HelloReply::default())
    }
    type LoadShardStream = Boxed<pb::LoadProgress>;
    async fn load_shard(
        &self,
        _: Request<pb::LoadShardRequest>,
    ) -> Result<Response<Self::LoadShardStream>, Status> {
        self.called(Box::pin(tokio_stream::empty()) as Self::LoadShardStream)
    }
    async fn resume_weights(
        &self,
        _: Request<pb::WeightSet>,
    ) -> Result<Response<pb::WeightsResume>, Status> {
        self.called(pb::WeightsResume::default())
    }
    async fn push_weights(
        &self,
        _: Request<Streaming<pb::WeightsPush>>,
    ) -> Result<Response<pb::PushWeightsReply>, Status> {
        self.called(pb::PushWeightsReply::default())
    }
    async fn setup_link(
        &self,
        _: Request<pb::SetupLinkRequest>,
    ) -> Result<Response<pb::SetupLinkReply>, Status> {
        self.called(pb::SetupLinkReply::default())
    }
    async fn open_sequence(
        &self,
        _: Request<pb::OpenSequenceRequest>,
    ) -> Result<Response<pb::OpenSequenceReply>, Status> {
        self.called(pb::OpenSequenceReply::default())
    }
    async fn close_sequence(
        &self,
        _: Request<pb::CloseSequenceRequest>,
    ) -> Result<Response<pb::CloseSequenceReply>, Status> {
        self.called(pb::CloseSequenceReply::default())
    }
    type HealthStream = Boxed<pb::Heartbeat>;
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<Self::HealthStream>, Status> {
        self.called(Box::pin(tokio_stream::empty()) as Self::HealthStream)
    }
    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsReply>, Status> {
        self.called(pb::StatsReply::default())
    }
    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        self.called(pb::DrainReply::default())
    }
    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        self.called(pb::ShutdownReply::default())
    }
}

/// The service behind the control plane's security, holding [`KEY`].
async fn serve(service: Counting) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = ControlSecurity::new(&KEY).unwrap().incoming(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(baton_proto::worker_server(service))
            .serve_with_incoming(incoming),
    );
    addr
}

/// Calls every unary method a stranger would want, plus `LoadShard`; each must fail.
async fn try_everything(client: &mut pb::worker_client::WorkerClient<tonic::transport::Channel>) {
    let shutdown = client
        .shutdown(pb::ShutdownRequest {
            reason: "a stranger asks".into(),
        })
        .await;
    assert!(shutdown.is_err(), "Shutdown answered: {shutdown:?}");
    let load = client.load_shard(pb::LoadShardRequest::default()).await;
    assert!(load.is_err(), "LoadShard answered");
    let open = client
        .open_sequence(pb::OpenSequenceRequest::default())
        .await;
    assert!(open.is_err(), "OpenSequence answered: {open:?}");
    let hello = client.hello(pb::HelloRequest::default()).await;
    assert!(hello.is_err(), "Hello answered: {hello:?}");
}

/// The member's own client still gets through, and is counted: the counter is live.
async fn member_still_served(addr: SocketAddr, service: &Counting) {
    let security = ControlSecurity::new(&KEY).unwrap();
    let mut member = baton_proto::connect(addr, &security, Duration::from_secs(5))
        .await
        .unwrap();
    member.hello(pb::HelloRequest::default()).await.unwrap();
    assert_eq!(service.calls(), 1);
}

#[tokio::test]
async fn tls_without_the_key_proof_and_another_key_reach_no_call() {
    tokio::time::timeout(LIMIT, async {
        let service = Counting::default();
        let addr = serve(service.clone()).await;

        // TLS completes (any client may do that), then gRPC without the key proof.
        let tls = TlsConnector::from(Arc::new(tls::client_config(b"h2").unwrap()));
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from(tls::CERT_NAME).unwrap();
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .timeout(Duration::from_secs(10))
            .connect_with_connector_lazy(connector);
        try_everything(&mut pb::worker_client::WorkerClient::new(channel)).await;

        // Another key: refused at the handshake, so there is no client to call with.
        let other = ControlSecurity::new(&[0x44; 32]).unwrap();
        match baton_proto::connect(addr, &other, Duration::from_secs(5)).await {
            Err(SecureError::Refused(why)) => assert!(why.contains("cluster"), "{why}"),
            Err(e) => panic!("expected a refusal, got {e}"),
            Ok(_) => panic!("a client with another key connected"),
        }

        assert_eq!(service.calls(), 0, "a stranger's call reached the service");
        member_still_served(addr, &service).await;
    })
    .await
    .expect("test timed out");
}

/// Terminates TLS towards `client` with its own certificate, opens its own TLS session to
/// `server`, and relays the plaintext both ways; returns what the client sent.
async fn relay(client: TcpStream, server: SocketAddr) -> Vec<u8> {
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(b"h2").unwrap()));
    let connector = TlsConnector::from(Arc::new(tls::client_config(b"h2").unwrap()));
    let Ok(from_client) = acceptor.accept(client).await else {
        return Vec::new();
    };
    let tcp = TcpStream::connect(server).await.unwrap();
    let name = ServerName::try_from(tls::CERT_NAME).unwrap();
    let to_server = connector.connect(name, tcp).await.unwrap();
    let (mut cr, mut cw) = tokio::io::split(from_client);
    let (mut sr, mut sw) = tokio::io::split(to_server);
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    });
    let mut sent = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = cr.read(&mut buf).await {
        if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent.extend_from_slice(&buf[..n]);
    }
    back.abort();
    sent
}

#[tokio::test]
async fn a_man_in_the_middle_relaying_a_members_handshake_gets_nothing() {
    tokio::time::timeout(LIMIT, async {
        let service = Counting::default();
        let addr = serve(service.clone()).await;
        let mallory = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mallory_addr = mallory.local_addr().unwrap();
        let (relayed, mut sent) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((client, _)) = mallory.accept().await {
                let relayed = relayed.clone();
                tokio::spawn(async move {
                    let _ = relayed.send(relay(client, addr).await);
                });
            }
        });

        let member = ControlSecurity::new(&KEY).unwrap();
        match baton_proto::connect(mallory_addr, &member, Duration::from_secs(5)).await {
            // Each end's proof is bound to its own TLS session, which Mallory cannot make one.
            Err(SecureError::Refused(why)) => assert!(why.contains("proof"), "{why}"),
            Err(e) => panic!("expected the member to refuse the relay, got {e}"),
            Ok(_) => panic!("a relayed handshake was accepted"),
        }
        assert_eq!(service.calls(), 0, "a call went through the relay");
        // What Mallory got to relay is the member's hello and proof, nothing more: no gRPC.
        let sent = sent.recv().await.expect("Mallory relayed nothing");
        assert!(
            sent.len() <= baton_transport::auth::HELLO_LEN + baton_transport::auth::PROOF_LEN,
            "the member sent {} bytes through the relay",
            sent.len()
        );
        member_still_served(addr, &service).await;
    })
    .await
    .expect("test timed out");
}
