//! Strangers: nobody without the cluster key joins, reads a data link, injects into one or drives
//! a worker; and the head survives a worker that holds the key but sends garbage.
//!
//! - A worker process holding another key is refused by a real head, which says which worker and
//!   why (`tests/cluster_auth.rs` has the converse: a head with another key).
//! - A data link between a real acceptor and dialer, through a proxy that records every byte:
//!   no plaintext crosses an encrypted link (and what the MAC-only mode shows), and flipped,
//!   replayed, dropped, reordered or forged records are refused with an integrity error, no frame
//!   delivered.
//! - Plain gRPC and another key calling a real worker's `Shutdown` and `LoadShard` get nothing,
//!   and the worker goes on serving its members.
//! - An in-process fake worker, holding the key and serving the real control plane, answers
//!   `Hello` and `LoadShard` with nonsense or sends malformed frames as the last stage: the head
//!   fails to start with an error naming it, ends the request a malformed answer was for, or
//!   drops a link that carries a frame over its limits (and fails or rebuilds the chain), within
//!   bounded time and without a panic: a Hello or load that never comes is given up, an answer
//!   for a micro-batch never sent or for sequences it does not carry ends the request, and a
//!   worker that breaks every chain it is put in cannot hold a request for ever.
//!
//! Every wait is bounded; nothing here leaves loopback.

mod common;

#[path = "common/worker.rs"]
mod worker;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use baton_api::backend::{GenerationRequest, StreamEvent};
use baton_head::{Head, HeadConfig};
use baton_model::pipeline::WireDType;
use baton_model::sampling::{Sampled, SamplingParams};
use baton_proto::pb::{self, worker_server::Worker};
use baton_proto::{ControlSecurity, SecureError};
use baton_transport::negotiate::{dial, Acceptor, NegotiateOptions, Preference};
use baton_transport::{
    ClusterKey, DType, Frame, FrameLimits, Link, LinkConfig, LinkError, SeqSpan,
};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tonic::codegen::tokio_stream::{self, wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

const OURS: [u8; 32] = [0x11; 32];
const THEIRS: [u8; 32] = [0x22; 32];

// ---------------------------------------------------------------------------------------------
// Shared helpers

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}


/// A `baton worker` process on loopback holding `key`, killed on drop.
fn start_worker(dir: &Path, key: &[u8], name: &str) -> worker::Worker {
    std::fs::create_dir_all(dir).unwrap();
    let key_file = dir.join("cluster.key");
    worker::write_key(&key_file, key);
    worker::Worker::start(worker::Worker::command(name, dir, &key_file))
}

/// The thread names of every panic in this process. A panic in a task the head spawned reaches
/// no test by itself, so each test runs its own runtime with named threads and looks here.
fn panics() -> &'static Mutex<Vec<String>> {
    static PANICS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    PANICS.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if let Ok(mut p) = panics().lock() {
                p.push(name);
            }
            previous(info);
        }));
        Mutex::default()
    })
}

/// Log lines, by the name of the thread that wrote them (the runtime's `tag`).
fn logs() -> &'static Mutex<Vec<(String, String)>> {
    static LOGS: OnceLock<Mutex<Vec<(String, String)>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_ansi(false)
            .with_writer(|| ByThread)
            .try_init();
        Mutex::default()
    })
}

struct ByThread;

impl std::io::Write for ByThread {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        logs()
            .lock()
            .unwrap()
            .push((name, String::from_utf8_lossy(b).into_owned()));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs_of(tag: &str) -> String {
    logs()
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n == tag)
        .map(|(_, l)| l.as_str())
        .collect()
}

/// A runtime whose threads are all named `tag`, so that its panics and logs can be told apart.
fn runtime(tag: &str) -> tokio::runtime::Runtime {
    panics();
    logs();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(tag)
        .enable_all()
        .build()
        .unwrap()
}

fn panics_in(tag: &str) -> Vec<String> {
    panics()
        .lock()
        .unwrap()
        .iter()
        .filter(|n| *n == tag)
        .cloned()
        .collect()
}

/// The head of these tests: stage 0 on this process's CPU, TCP links, exact f32 wire. Every
/// use of `HeadConfig` is here, so that a change of its fields touches one place.
fn head_config(workers: Vec<String>, key: &[u8]) -> HeadConfig {
    let key = baton_cluster::key::ClusterKey::from_bytes(key.to_vec()).expect("a 32-byte key");
    let mut cfg = HeadConfig::new(common::smollm2(), workers, key);
    cfg.name = "strangers-head".into();
    cfg.wire = WireDType::F32;
    cfg.preference = Preference::Tcp;
    cfg
}

fn tcp_only() -> NegotiateOptions {
    NegotiateOptions {
        preference: Preference::Tcp,
        enable_quic: false,
        enable_rdma: false,
        probe_iterations: 2,
    }
}

fn link_config(key: &[u8], encrypt: bool) -> LinkConfig {
    let mut c = LinkConfig::new(ClusterKey::from_bytes(key).unwrap());
    c.encrypt_tcp = encrypt;
    c
}

fn member_hello() -> pb::HelloRequest {
    pb::HelloRequest {
        protocol: Some(baton_proto::local_protocol()),
        cluster_id: baton_cluster::key::ClusterKey::from_bytes(OURS.to_vec())
            .unwrap()
            .cluster_id(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// A stranger cannot join

#[test]
fn a_worker_without_the_key_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let worker = start_worker(&dir.path().join("stranger"), &THEIRS, "stranger");
    let tag = "strangers-join";
    let rt = runtime(tag);
    let endpoint = worker.control.to_string();
    let cfg = head_config(vec![endpoint.clone()], &OURS);
    let started = rt.block_on(async { timeout(Duration::from_secs(60), Head::start(cfg)).await });
    let err = match started.expect("the head neither started nor gave up within 60 s") {
        Ok(_) => panic!("the head started with a worker of another cluster"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&endpoint),
        "the error does not name the worker: {err}"
    );
    assert!(
        err.contains("does not hold this cluster's key"),
        "unclear error: {err}"
    );
    for key in [OURS, THEIRS] {
        assert!(!err.contains(&hex(&key)), "the error shows a key: {err}");
    }
    // The refusal cost the stranger nothing either: its own cluster still reaches it.
    rt.block_on(async {
        let theirs = ControlSecurity::new(&THEIRS).unwrap();
        let mut client = baton_proto::connect(worker.control, &theirs, Duration::from_secs(5))
            .await
            .unwrap();
        let mut hello = member_hello();
        hello.cluster_id = baton_cluster::key::ClusterKey::from_bytes(THEIRS.to_vec())
            .unwrap()
            .cluster_id();
        timeout(Duration::from_secs(10), client.hello(hello))
            .await
            .unwrap()
            .unwrap();
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    assert_eq!(panics_in(tag), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// Cannot read or inject on a data link

/// What the proxy does to the dialer's records once armed (counting records from then on).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tamper {
    Pass,
    /// Flips a bit in the first record's body.
    Flip,
    /// Sends the first record twice.
    Replay,
    /// Never forwards the first record.
    Drop,
    /// Forwards the second record before the first.
    Reorder,
    /// Puts a well-formed frame record of its own, with a made-up tag, before the first.
    Forge,
}

/// The cluster-key handshake each end sends before any record: hello and proof.
const HANDSHAKE: usize = baton_transport::auth::HELLO_LEN + baton_transport::auth::PROOF_LEN;
const RECORD_HEADER: usize = 8;

/// A proxy between one dialer and `target` that records what passes each way and applies
/// `tamper` to the dialer's records once `armed`.
struct Proxy {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    to_acceptor: Arc<Mutex<Vec<u8>>>,
    to_dialer: Arc<Mutex<Vec<u8>>>,
}

async fn read_record(r: &mut (impl AsyncRead + Unpin), tag_len: usize) -> Option<Vec<u8>> {
    let mut rec = vec![0u8; RECORD_HEADER];
    r.read_exact(&mut rec).await.ok()?;
    let body = u32::from_le_bytes(rec[0..4].try_into().unwrap()) as usize;
    rec.resize(RECORD_HEADER + body + tag_len, 0);
    r.read_exact(&mut rec[RECORD_HEADER..]).await.ok()?;
    Some(rec)
}

async fn proxy(target: SocketAddr, encrypt: bool, tamper: Tamper) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = Proxy {
        addr: listener.local_addr().unwrap(),
        armed: Arc::default(),
        to_acceptor: Arc::default(),
        to_dialer: Arc::default(),
    };
    // An AES-256-GCM tag, or a keyed BLAKE3 MAC.
    let tag_len = if encrypt { 16 } else { 32 };
    let (armed, to_acceptor, to_dialer) =
        (p.armed.clone(), p.to_acceptor.clone(), p.to_dialer.clone());
    tokio::spawn(async move {
        let (dialer, _) = listener.accept().await.unwrap();
        let acceptor = TcpStream::connect(target).await.unwrap();
        let (mut dr, mut dw) = dialer.into_split();
        let (mut ar, mut aw) = acceptor.into_split();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = ar.read(&mut buf).await {
                if n == 0 || dw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                to_dialer.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let mut hs = [0u8; HANDSHAKE];
        if dr.read_exact(&mut hs).await.is_err() || aw.write_all(&hs).await.is_err() {
            return;
        }
        to_acceptor.lock().unwrap().extend_from_slice(&hs);
        let (mut after_arming, mut held) = (0usize, None);
        while let Some(mut rec) = read_record(&mut dr, tag_len).await {
            to_acceptor.lock().unwrap().extend_from_slice(&rec);
            let mut out = Vec::new();
            if armed.load(Ordering::SeqCst) {
                after_arming += 1;
                match (tamper, after_arming) {
                    (Tamper::Flip, 1) => {
                        rec[RECORD_HEADER + 5] ^= 0x40;
                        out.push(rec);
                    }
                    (Tamper::Replay, 1) => out.extend([rec.clone(), rec]),
                    (Tamper::Drop, 1) => {}
                    (Tamper::Reorder, 1) => held = Some(rec),
                    (Tamper::Reorder, 2) => out.extend([rec].into_iter().chain(held.take())),
                    (Tamper::Forge, 1) => {
                        let frame = Frame::control(1, Bytes::from_static(b"forged"))
                            .encode_to_vec(&FrameLimits::default())
                            .unwrap();
                        let mut forged = (frame.len() as u32).to_le_bytes().to_vec();
                        forged.extend_from_slice(&[0; 4]);
                        forged.extend_from_slice(&frame);
                        forged.extend(std::iter::repeat_n(0xa5, tag_len));
                        out.extend([forged, rec]);
                    }
                    _ => out.push(rec),
                }
            } else {
                out.push(rec);
            }
            for r in out {
                if aw.write_all(&r).await.is_err() {
                    return;
                }
            }
        }
    });
    p
}

/// A 64-byte pattern no handshake, probe or padding contains.
fn pattern() -> Vec<u8> {
    (0..64u8).map(|i| i.wrapping_mul(37) ^ 0xc3).collect()
}

/// A hidden-state frame whose payload is [`pattern`] over and over.
fn secret_frame(micro_batch: u64) -> Frame {
    let payload: Vec<u8> = pattern().into_iter().cycle().take(4 * 64 * 4).collect();
    let seqs = [SeqSpan {
        seq_id: 0x5eed_5eed_5eed_5eed,
        start_pos: 0,
        n_tokens: 4,
    }];
    Frame::hidden(micro_batch, &seqs, DType::F32, 64, payload.into()).unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A negotiated TCP link pair through a proxy; `(acceptor's end, dialer's end, proxy)`.
async fn proxied_pair(encrypt: bool, tamper: Tamper) -> (Link, Link, Proxy) {
    let (cfg, opts) = (link_config(&OURS, encrypt), tcp_only());
    let acceptor = Acceptor::bind("127.0.0.1:0".parse().unwrap(), &cfg, &opts)
        .await
        .unwrap();
    let p = proxy(acceptor.local_addr().unwrap(), encrypt, tamper).await;
    let (accepted, dialed) = timeout(Duration::from_secs(30), async {
        tokio::join!(acceptor.accept(), dial(p.addr, &cfg, &opts))
    })
    .await
    .expect("negotiation through the proxy took over 30 s");
    (accepted.unwrap().link, dialed.unwrap().link, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_link_shows_no_plaintext_and_a_mac_only_link_does() {
    for encrypt in [true, false] {
        let (accepted, dialed, p) = proxied_pair(encrypt, Tamper::Pass).await;
        let frame = secret_frame(0x0123_4567_89ab_cdef);
        // Both directions carry it.
        dialed.send(&frame).await.unwrap();
        assert_eq!(
            timeout(Duration::from_secs(10), accepted.recv())
                .await
                .unwrap()
                .unwrap(),
            frame
        );
        accepted.send(&frame).await.unwrap();
        assert_eq!(
            timeout(Duration::from_secs(10), dialed.recv())
                .await
                .unwrap()
                .unwrap(),
            frame
        );
        let header =
            frame.encode_to_vec(&FrameLimits::default()).unwrap()[..frame.header_len()].to_vec();
        for (way, bytes) in [
            ("to the acceptor", &p.to_acceptor),
            ("to the dialer", &p.to_dialer),
        ] {
            let bytes = bytes.lock().unwrap();
            for (what, needle) in [
                ("the payload", pattern()),
                ("the frame header", header.clone()),
            ] {
                assert_eq!(
                    contains(&bytes, &needle),
                    !encrypt,
                    "{what} {} in the {} bytes sent {way} (encrypt_tcp = {encrypt})",
                    if encrypt {
                        "appears"
                    } else {
                        "does not appear"
                    },
                    bytes.len()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_replayed_dropped_reordered_or_forged_records_are_refused() {
    let cases = [
        (true, Tamper::Flip),
        (true, Tamper::Replay),
        (true, Tamper::Drop),
        (true, Tamper::Reorder),
        (true, Tamper::Forge),
        // Without encryption every record still carries a MAC over its number.
        (false, Tamper::Flip),
        (false, Tamper::Replay),
        (false, Tamper::Forge),
    ];
    for (encrypt, tamper) in cases {
        let case = format!("{tamper:?} (encrypt_tcp = {encrypt})");
        let (accepted, dialed, p) = proxied_pair(encrypt, tamper).await;
        p.armed.store(true, Ordering::SeqCst);
        let (first, second) = (secret_frame(100), secret_frame(101));
        dialed.send(&first).await.unwrap();
        dialed.send(&second).await.unwrap();
        // A replayed record follows its genuine self: that one is delivered, the copy is not.
        if tamper == Tamper::Replay {
            let got = timeout(Duration::from_secs(10), accepted.recv())
                .await
                .unwrap();
            assert_eq!(got.unwrap().micro_batch, 100, "{case}");
        }
        let got = timeout(Duration::from_secs(10), accepted.recv())
            .await
            .unwrap_or_else(|_| panic!("{case}: no verdict within 10 s"));
        match got {
            Err(LinkError::Integrity(why)) => {
                assert!(why.contains("injected or altered"), "{case}: {why}")
            }
            Err(e) => panic!("{case}: expected an integrity refusal, got {e}"),
            Ok(f) => panic!("{case}: frame {} was delivered", f.micro_batch),
        }
        // The link stays refused: nothing that follows is delivered.
        let next = timeout(Duration::from_secs(10), accepted.recv())
            .await
            .unwrap();
        assert!(
            next.is_err(),
            "{case}: a frame was delivered after the refusal"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Cannot make control calls

#[test]
fn strangers_calls_never_reach_a_worker_which_goes_on_serving() {
    let dir = tempfile::tempdir().unwrap();
    let worker = start_worker(&dir.path().join("member"), &OURS, "strangers-worker");
    let tag = "strangers-calls";
    let rt = runtime(tag);
    rt.block_on(async {
        timeout(Duration::from_secs(60), async {
            // Plain gRPC (no TLS, no key): Shutdown and LoadShard get no answer.
            let plain =
                tonic::transport::Endpoint::from_shared(format!("http://{}", worker.control))
                    .unwrap()
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(5));
            if let Ok(channel) = plain.connect().await {
                let mut client = pb::worker_client::WorkerClient::new(channel);
                let shutdown = client
                    .shutdown(pb::ShutdownRequest {
                        reason: "a stranger asks".into(),
                    })
                    .await;
                assert!(
                    shutdown.is_err(),
                    "plain gRPC Shutdown answered: {shutdown:?}"
                );
                let load = client.load_shard(pb::LoadShardRequest::default()).await;
                assert!(load.is_err(), "plain gRPC LoadShard answered");
            }
            // Another key: refused at the handshake, before there is a client to call with.
            let theirs = ControlSecurity::new(&THEIRS).unwrap();
            match baton_proto::connect(worker.control, &theirs, Duration::from_secs(5)).await {
                Err(SecureError::Refused(why)) => assert!(why.contains("cluster"), "{why}"),
                Err(e) => panic!("expected a refusal, got {e}"),
                Ok(_) => panic!("a client with another key connected"),
            }
            // The worker still serves its members: a health stream gives beat after beat (a
            // worker told to shut down would end it).
            let ours = ControlSecurity::new(&OURS).unwrap();
            let mut member = baton_proto::connect(worker.control, &ours, Duration::from_secs(5))
                .await
                .unwrap();
            let reply = member.hello(member_hello()).await.unwrap().into_inner();
            assert_eq!(reply.node.unwrap().name, "strangers-worker");
            let mut beats = member
                .health(pb::HealthRequest { interval_ms: 100 })
                .await
                .unwrap()
                .into_inner();
            for _ in 0..5 {
                let beat = timeout(Duration::from_secs(5), beats.next())
                    .await
                    .expect("no heartbeat within 5 s");
                beat.expect("the health stream ended").expect("a heartbeat");
            }
        })
        .await
        .expect("test timed out");
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let mut worker = worker;
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker exited"
    );
    assert_eq!(panics_in(tag), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// The head survives a worker sending garbage

/// How the fake worker answers `Hello`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HelloKind {
    Sane,
    NoNodeInfo,
    /// Protocol revision 0, which this build does not accept.
    OldProtocol,
    /// Every memory and bandwidth figure `u64::MAX`.
    AbsurdMemory,
    /// Never answers.
    Silent,
}

/// How it answers `LoadShard`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum LoadKind {
    Ready,
    Error,
    /// Reports progress, then ends the stream without a result.
    EndsWithoutResult,
    /// Keeps the stream open and says nothing.
    Silent,
}

/// What it sends back, as the last stage, for each micro-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    /// A token (42) for every sequence: what a sane last stage does.
    Tokens,
    /// A tokens frame whose payload is one word, short for its sequences.
    ShortPayload,
    /// Hidden states instead of tokens.
    Hidden,
    /// A control frame that is no stage failure report.
    GarbageControl,
    /// 70,000 sequences, over the head's frame limit of 65,536.
    TooManySeqs,
    /// A 65 MiB frame, over the head's 64 MiB limit.
    Oversized,
    /// Tokens for a micro-batch the head never sent.
    UnknownMicroBatch,
    /// Tokens for sequences that are not in the micro-batch.
    OtherSequences,
    /// Closes the link.
    Closes,
}

#[derive(Clone)]
struct Fake {
    hello: HelloKind,
    load: LoadKind,
    answer: Answer,
    inner: Arc<FakeInner>,
}

struct FakeInner {
    acceptor: Acceptor,
    link: LinkConfig,
    cluster_id: String,
    upstream: Mutex<Option<Arc<Link>>>,
    downstream: Mutex<Option<Arc<Link>>>,
    /// Prompt length (plus tokens generated before a resume) per open sequence.
    prompts: Arc<Mutex<HashMap<u64, usize>>>,
    /// Senders of streams that must stay open and silent.
    silent: Mutex<Vec<tokio::sync::mpsc::Sender<Result<pb::LoadProgress, Status>>>>,
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Fake {
    fn node(&self) -> pb::NodeInfo {
        let (total, available, bandwidth) = if self.hello == HelloKind::AbsurdMemory {
            (u64::MAX, u64::MAX, u64::MAX)
        } else {
            (16 << 30, 8 << 30, 0)
        };
        pb::NodeInfo {
            id: "fa4efa4efa4efa4efa4efa4efa4efa4e".into(),
            name: format!("fake-{:?}-{:?}-{:?}", self.hello, self.load, self.answer).to_lowercase(),
            version: "0.0.0".into(),
            total_memory: total,
            available_memory: available,
            backend: pb::Backend::Cpu as i32,
            transports: vec![pb::Transport::Tcp as i32],
            data_addrs: vec![self.inner.acceptor.local_addr().unwrap().to_string()],
            cluster_id: self.inner.cluster_id.clone(),
            memory_bandwidth: bandwidth,
            ..Default::default()
        }
    }

    /// Starts answering once both links are there.
    fn maybe_start(&self) {
        let up = self.inner.upstream.lock().unwrap().clone();
        let down = self.inner.downstream.lock().unwrap().clone();
        if let (Some(up), Some(down)) = (up, down) {
            tokio::spawn(answer(self.answer, up, down, self.inner.prompts.clone()));
        }
    }
}

/// The fake last stage: one answer per micro-batch that arrives.
async fn answer(
    how: Answer,
    up: Arc<Link>,
    down: Arc<Link>,
    prompts: Arc<Mutex<HashMap<u64, usize>>>,
) {
    while let Ok(frame) = up.recv().await {
        let mb = frame.micro_batch;
        // Sequences whose chunk reaches the end of their prompt get a token; the others are
        // prompt chunks still going.
        let finals: Vec<SeqSpan> = {
            let prompts = prompts.lock().unwrap();
            frame
                .seqs
                .iter()
                .filter(|s| {
                    (s.start_pos + s.n_tokens) as usize
                        >= prompts.get(&s.seq_id).copied().unwrap_or(0)
                })
                .collect()
        };
        let tokens = |spans: &[SeqSpan]| {
            let samples: Vec<Sampled> = spans
                .iter()
                .map(|_| Sampled {
                    token: 42,
                    logprob: 0.0,
                    top_logprobs: vec![],
                })
                .collect();
            baton_worker::wire::sampled_payload(&samples)
        };
        let reply = match how {
            Answer::Tokens => Frame::tokens(mb, &finals, tokens(&finals)).unwrap(),
            Answer::ShortPayload if !finals.is_empty() => {
                Frame::tokens(mb, &finals, Bytes::from_static(&[0; 4])).unwrap()
            }
            Answer::ShortPayload => Frame::tokens(mb, &finals, tokens(&finals)).unwrap(),
            Answer::Hidden => {
                let rows: u64 = finals.iter().map(|s| u64::from(s.n_tokens)).sum();
                Frame::hidden(
                    mb,
                    &finals,
                    DType::F32,
                    1,
                    Bytes::from(vec![0u8; rows as usize * 4]),
                )
                .unwrap()
            }
            Answer::GarbageControl => {
                Frame::control(mb, Bytes::from_static(b"\xff\xfe not a failure report"))
            }
            Answer::TooManySeqs => {
                let spans = vec![
                    SeqSpan {
                        seq_id: 1,
                        start_pos: 0,
                        n_tokens: 1
                    };
                    70_000
                ];
                Frame::tokens(mb, &spans, tokens(&spans)).unwrap()
            }
            Answer::Oversized => Frame::control(mb, Bytes::from(vec![0u8; 65 << 20])),
            Answer::UnknownMicroBatch => {
                Frame::tokens(mb + 1_000_000, &finals, tokens(&finals)).unwrap()
            }
            Answer::OtherSequences => {
                let others: Vec<SeqSpan> = finals
                    .iter()
                    .map(|s| SeqSpan {
                        seq_id: s.seq_id + 1_000_000,
                        ..*s
                    })
                    .collect();
                Frame::tokens(mb, &others, tokens(&others)).unwrap()
            }
            Answer::Closes => {
                down.close("the fake stage gives up").await;
                return;
            }
        };
        if down.send(&reply).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Worker for Fake {
    async fn hello(
        &self,
        _: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let local = baton_proto::local_protocol();
        let reply = match self.hello {
            HelloKind::Silent => std::future::pending().await,
            HelloKind::NoNodeInfo => pb::HelloReply {
                node: None,
                protocol: Some(local),
            },
            HelloKind::OldProtocol => pb::HelloReply {
                node: Some(self.node()),
                protocol: Some(pb::Protocol {
                    version: 0,
                    min_version: 0,
                    ..Default::default()
                }),
            },
            HelloKind::Sane | HelloKind::AbsurdMemory => pb::HelloReply {
                node: Some(self.node()),
                protocol: Some(local),
            },
        };
        Ok(Response::new(reply))
    }

    type LoadShardStream = Boxed<pb::LoadProgress>;

    async fn load_shard(
        &self,
        req: Request<pb::LoadShardRequest>,
    ) -> Result<Response<Self::LoadShardStream>, Status> {
        let layers = req.into_inner().layers;
        // A load starts a new chain: the links of an earlier one are not part of it.
        *self.inner.upstream.lock().unwrap() = None;
        *self.inner.downstream.lock().unwrap() = None;
        let progress = |phase: pb::LoadPhase, result| pb::LoadProgress {
            phase: phase as i32,
            message: "fake".into(),
            result,
            ..Default::default()
        };
        let items = match self.load {
            LoadKind::Ready => vec![progress(
                pb::LoadPhase::Ready,
                Some(pb::load_progress::Result::Manifest(pb::ShardManifest {
                    layers,
                    has_head: true,
                    source: "local".into(),
                    ..Default::default()
                })),
            )],
            LoadKind::Error => vec![progress(
                pb::LoadPhase::Failed,
                Some(pb::load_progress::Result::Error(
                    "the disk is on fire".into(),
                )),
            )],
            LoadKind::EndsWithoutResult => vec![progress(pb::LoadPhase::Reading, None)],
            LoadKind::Silent => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                self.inner.silent.lock().unwrap().push(tx);
                return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
            }
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(
            items.into_iter().map(Ok),
        ))))
    }

    async fn resume_weights(
        &self,
        _: Request<pb::WeightSet>,
    ) -> Result<Response<pb::WeightsResume>, Status> {
        Err(Status::unimplemented("the fake has no weights"))
    }

    async fn push_weights(
        &self,
        _: Request<Streaming<pb::WeightsPush>>,
    ) -> Result<Response<pb::PushWeightsReply>, Status> {
        Err(Status::unimplemented("the fake has no weights"))
    }

    async fn setup_link(
        &self,
        req: Request<pb::SetupLinkRequest>,
    ) -> Result<Response<pb::SetupLinkReply>, Status> {
        let req = req.into_inner();
        let accept = req.role == pb::LinkRole::Accept as i32;
        let negotiated = if accept {
            timeout(Duration::from_secs(15), self.inner.acceptor.accept()).await
        } else {
            let addr: SocketAddr = req
                .peer_addrs
                .first()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| Status::invalid_argument("peer address"))?;
            timeout(
                Duration::from_secs(15),
                dial(addr, &self.inner.link, &tcp_only()),
            )
            .await
        };
        let n = negotiated
            .map_err(|_| Status::deadline_exceeded("link setup"))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let reply = pb::SetupLinkReply {
            link_id: req.link_id,
            chosen: pb::Transport::Tcp as i32,
            rtt_ns: (n.report.rtt_us * 1e3) as u64,
            peer_addr: n.link.peer().to_string(),
            ..Default::default()
        };
        let slot = if accept {
            &self.inner.upstream
        } else {
            &self.inner.downstream
        };
        *slot.lock().unwrap() = Some(Arc::new(n.link));
        self.maybe_start();
        Ok(Response::new(reply))
    }

    async fn open_sequence(
        &self,
        req: Request<pb::OpenSequenceRequest>,
    ) -> Result<Response<pb::OpenSequenceReply>, Status> {
        let req = req.into_inner();
        let prefill = req.prompt_tokens.len() + req.generated.len().saturating_sub(1);
        self.inner
            .prompts
            .lock()
            .unwrap()
            .insert(req.sequence_id, prefill);
        Ok(Response::new(pb::OpenSequenceReply {
            sequence_id: req.sequence_id,
            kv_bytes_reserved: 0,
        }))
    }

    async fn close_sequence(
        &self,
        req: Request<pb::CloseSequenceRequest>,
    ) -> Result<Response<pb::CloseSequenceReply>, Status> {
        let existed = self
            .inner
            .prompts
            .lock()
            .unwrap()
            .remove(&req.into_inner().sequence_id)
            .is_some();
        Ok(Response::new(pb::CloseSequenceReply { existed }))
    }

    type HealthStream = Boxed<pb::Heartbeat>;

    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<Self::HealthStream>, Status> {
        let interval = Duration::from_millis(u64::from(req.into_inner().interval_ms.max(50)));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            for seq in 0u64.. {
                tick.tick().await;
                if tx
                    .send(Ok(pb::Heartbeat {
                        seq,
                        ..Default::default()
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsReply>, Status> {
        Ok(Response::new(pb::StatsReply::default()))
    }

    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        Ok(Response::new(pb::DrainReply::default()))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        Ok(Response::new(pb::ShutdownReply::default()))
    }
}

/// Serves a fake worker holding [`OURS`] the way `baton worker` serves (TLS, the key proof, the
/// bounded service); returns its control endpoint.
async fn serve_fake(hello: HelloKind, load: LoadKind, answer: Answer) -> String {
    // Sends past the head's limits, to see that the head refuses what it is sent.
    let mut link = link_config(&OURS, true);
    link.limits = FrameLimits {
        max_frame_bytes: 256 << 20,
        max_seqs: 1 << 20,
    };
    let acceptor = Acceptor::bind("127.0.0.1:0".parse().unwrap(), &link, &tcp_only())
        .await
        .unwrap();
    let fake = Fake {
        hello,
        load,
        answer,
        inner: Arc::new(FakeInner {
            acceptor,
            link,
            cluster_id: baton_cluster::key::ClusterKey::from_bytes(OURS.to_vec())
                .unwrap()
                .cluster_id(),
            upstream: Mutex::default(),
            downstream: Mutex::default(),
            prompts: Arc::default(),
            silent: Mutex::default(),
        }),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = listener.local_addr().unwrap();
    let incoming = ControlSecurity::new(&OURS).unwrap().incoming(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(baton_proto::worker_server(fake))
            .serve_with_incoming(incoming),
    );
    control.to_string()
}

/// `Head::start` over one fake worker must fail, naming it, within 60 s, with every one of
/// `expected` in the error.
fn start_fails(tag: &str, hello: HelloKind, load: LoadKind, expected: &[&str]) {
    let rt = runtime(tag);
    let (endpoint, err) = rt.block_on(async {
        let endpoint = serve_fake(hello, load, Answer::Tokens).await;
        let started = timeout(
            Duration::from_secs(60),
            Head::start(head_config(vec![endpoint.clone()], &OURS)),
        )
        .await;
        match started
            .unwrap_or_else(|_| panic!("{tag}: Head::start neither failed nor started within 60 s"))
        {
            Ok(_) => panic!("{tag}: the head started over a worker that answered nonsense"),
            Err(e) => (endpoint, e.to_string()),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    assert!(
        err.contains(&endpoint),
        "{tag}: the error does not name the worker: {err}"
    );
    for e in expected {
        assert!(
            err.contains(e),
            "{tag}: the error does not say {e:?}: {err}"
        );
    }
    assert_eq!(panics_in(tag), Vec::<String>::new(), "{tag}: panicked");
}

#[test]
fn a_hello_without_node_info_is_refused() {
    start_fails(
        "fake-no-node",
        HelloKind::NoNodeInfo,
        LoadKind::Ready,
        &["no node info"],
    );
}

#[test]
fn a_hello_with_an_old_protocol_is_refused() {
    start_fails(
        "fake-old-protocol",
        HelloKind::OldProtocol,
        LoadKind::Ready,
        &["version"],
    );
}

#[test]
fn a_failed_load_is_reported_with_the_workers_reason() {
    start_fails(
        "fake-load-error",
        HelloKind::Sane,
        LoadKind::Error,
        &["the disk is on fire"],
    );
}

#[test]
fn a_load_stream_that_ends_without_a_result_is_reported() {
    start_fails(
        "fake-load-ends",
        HelloKind::Sane,
        LoadKind::EndsWithoutResult,
        &["without a result"],
    );
}

#[test]
fn a_hello_that_never_comes_is_given_up() {
    start_fails("fake-silent-hello", HelloKind::Silent, LoadKind::Ready, &[]);
}

#[test]
fn a_load_that_never_reports_is_given_up() {
    start_fails("fake-silent-load", HelloKind::Sane, LoadKind::Silent, &[]);
}

/// How one request over a fake last stage ended, and what the head said afterwards.
struct Served {
    /// Tokens received before the end.
    tokens: Vec<u32>,
    /// `Ok(())` for `Finished`, the reason for `Failed`.
    end: Result<(), String>,
    readiness: Result<(), String>,
    /// The fake worker's state and detail in the head's status.
    node: (bool, String),
}

/// A head over one fake worker that answers with `answer`, and one request of 4 tokens on it.
async fn head_with_request(
    tag: &str,
    hello: HelloKind,
    answer: Answer,
) -> (Head, String, baton_api::backend::TokenStream) {
    let endpoint = serve_fake(hello, LoadKind::Ready, answer).await;
    let head = timeout(
        Duration::from_secs(120),
        Head::start(head_config(vec![endpoint.clone()], &OURS)),
    )
    .await
    .unwrap_or_else(|_| panic!("{tag}: the head did not start within 120 s"))
    .unwrap_or_else(|e| panic!("{tag}: the head did not start: {e}"));
    let stream = head
        .submit(GenerationRequest {
            prompt_tokens: vec![1, 2, 3, 4],
            sampling: SamplingParams::default(),
            max_tokens: 4,
            stop_token_ids: vec![],
        })
        .unwrap_or_else(|e| panic!("{tag}: not admitted: {e}"));
    (head, endpoint, stream)
}

/// Runs [`head_with_request`] and says how the request ended; every step is bounded, and no
/// thread of the runtime may panic.
fn serve_one(tag: &str, hello: HelloKind, answer: Answer) -> Served {
    let rt = runtime(tag);
    let served = rt.block_on(async {
        let (head, endpoint, mut stream) = head_with_request(tag, hello, answer).await;
        let (tokens, end) = timeout(Duration::from_secs(30), async {
            let mut tokens = Vec::new();
            loop {
                match stream.next().await {
                    Some(StreamEvent::Token(s)) => tokens.push(s.token),
                    Some(StreamEvent::Finished(_)) => return (tokens, Ok(())),
                    Some(StreamEvent::Failed(why)) => return (tokens, Err(why)),
                    None => return (tokens, Err("the stream ended without an end event".into())),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{tag}: the request did not end within 30 s"));
        let status = head.status();
        let node = status
            .nodes
            .iter()
            .find(|n| n.endpoint == endpoint)
            .map(|n| (n.alive, n.detail.clone()));
        Served {
            tokens,
            end,
            readiness: head.readiness(),
            node: node.unwrap_or_else(|| panic!("{tag}: the status lost the worker")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    assert_eq!(panics_in(tag), Vec::<String>::new(), "{tag}: panicked");
    served
}

#[test]
fn a_sane_fake_last_stage_serves_tokens() {
    // The harness itself: a fake that answers properly gets its tokens through.
    let s = serve_one("fake-sane", HelloKind::Sane, Answer::Tokens);
    assert_eq!(
        (s.tokens, s.end, s.readiness),
        (vec![42; 4], Ok(()), Ok(()))
    );
}

#[test]
fn absurd_memory_figures_neither_panic_nor_hang_the_head() {
    let s = serve_one(
        "fake-absurd-memory",
        HelloKind::AbsurdMemory,
        Answer::Tokens,
    );
    assert_eq!((s.tokens, s.end), (vec![42; 4], Ok(())));
}

/// A malformed answer ends the request it was for, saying so; the chain stays.
fn request_fails(tag: &str, answer: Answer, expected: &str) {
    let s = serve_one(tag, HelloKind::Sane, answer);
    match &s.end {
        Err(why) => assert!(why.contains(expected), "{tag}: unclear failure: {why}"),
        Ok(()) => panic!("{tag}: the request finished on garbage: {:?}", s.tokens),
    }
    assert!(
        s.tokens.is_empty(),
        "{tag}: tokens came from garbage: {:?}",
        s.tokens
    );
}

#[test]
fn a_short_tokens_payload_ends_the_request() {
    request_fails(
        "fake-short-payload",
        Answer::ShortPayload,
        "the last stage's answer",
    );
}

#[test]
fn hidden_states_instead_of_tokens_end_the_request() {
    request_fails(
        "fake-hidden",
        Answer::Hidden,
        "hidden states instead of tokens",
    );
}

#[test]
fn a_garbage_control_frame_ends_the_request() {
    request_fails(
        "fake-garbage-control",
        Answer::GarbageControl,
        "unreadable control frame",
    );
}

/// A frame the head's link refuses (or a closed link) loses the link, which the head acts on
/// within 30 s: it fails the cluster or rebuilds the chain, and logs `expected` as the reason.
/// No garbage becomes a token, and nothing panics.
fn link_refused(tag: &str, answer: Answer, expected: &str) {
    let rt = runtime(tag);
    rt.block_on(async {
        let (head, _, mut stream) = head_with_request(tag, HelloKind::Sane, answer).await;
        let clear = |why: &str| why.contains(expected) || why.contains("link");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match timeout(Duration::from_millis(50), stream.next()).await {
                Err(_) => {}
                Ok(Some(StreamEvent::Failed(why))) => {
                    assert!(clear(&why), "{tag}: unclear failure: {why}");
                    break;
                }
                Ok(other) => panic!("{tag}: {other:?} from a last stage that sends garbage"),
            }
            if let Err(why) = head.readiness() {
                assert!(clear(&why), "{tag}: unclear readiness: {why}");
                break;
            }
            if head.stats().replans > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{tag}: the head neither failed nor rebuilt its chain within 30 s"
            );
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let logged = logs_of(tag);
    assert!(
        logged.contains(expected),
        "{tag}: the log does not say {expected:?}:\n{logged}"
    );
    assert_eq!(panics_in(tag), Vec::<String>::new(), "{tag}: panicked");
}

#[test]
fn a_frame_with_too_many_sequences_is_refused() {
    link_refused(
        "fake-too-many-seqs",
        Answer::TooManySeqs,
        "70000 sequences exceed the limit of 65536",
    );
}

#[test]
fn an_oversized_frame_is_refused_before_it_is_read() {
    // The record header announces it; the head refuses without reading (or allocating) 65 MiB.
    let limit = FrameLimits::default().max_frame_bytes;
    link_refused(
        "fake-oversized",
        Answer::Oversized,
        &format!("exceeds the limit of {}", limit + (64 << 10)),
    );
}

#[test]
fn a_closed_link_is_acted_on() {
    link_refused("fake-closes", Answer::Closes, "the fake stage gives up");
}

#[test]
fn a_worker_that_breaks_every_chain_does_not_hold_a_request_for_ever() {
    // The worker answers every probe, so the head keeps rebuilding with it (at most once a
    // second); the request is ended after a bounded number of pauses, with the reason.
    let tag = "fake-closes-for-ever";
    let s = serve_one(tag, HelloKind::Sane, Answer::Closes);
    let said = match &s.end {
        Err(why) => why.clone(),
        Ok(_) => String::new(),
    };
    assert!(
        said.contains("the chain broke") && said.contains("the fake stage gives up"),
        "{tag}: the request does not end with why: readiness {:?}, worker {:?}, request {:?}",
        s.readiness,
        s.node,
        s.end
    );
}

#[test]
fn an_answer_for_an_unknown_micro_batch_does_not_hang_the_request() {
    let s = serve_one(
        "fake-unknown-mb",
        HelloKind::Sane,
        Answer::UnknownMicroBatch,
    );
    assert!(s.end.is_err(), "{:?}", s.end);
}

#[test]
fn tokens_for_sequences_not_in_the_micro_batch_do_not_hang_the_request() {
    let s = serve_one("fake-other-seqs", HelloKind::Sane, Answer::OtherSequences);
    assert!(s.end.is_err(), "{:?}", s.end);
}
