//! Cluster-key authentication of a real `baton worker` process: a head holding another key is
//! refused and says so; unauthenticated connections to the worker's control port and data port
//! are rejected while a member's still get through.

mod common;

#[path = "common/worker.rs"]
mod worker;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_proto::pb;
use baton_transport::negotiate::{dial, NegotiateOptions, Preference};
use baton_transport::{ClusterKey, LinkConfig, LinkError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use worker::Worker;

const BATON: &str = env!("CARGO_BIN_EXE_baton");

fn write_key(path: &Path, byte: u8) -> Vec<u8> {
    let bytes = vec![byte; 32];
    worker::write_key(path, &bytes);
    bytes
}

fn start_worker(dir: &Path, key_file: &Path) -> Worker {
    Worker::start(Worker::command("auth-worker", dir, key_file))
}

#[test]
fn a_head_with_another_cluster_key_is_refused_and_says_so() {
    let model = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("ours.key"), dir.path().join("theirs.key"));
    write_key(&ours, 1);
    write_key(&theirs, 2);
    let worker = start_worker(&dir.path().join("worker"), &ours);
    let mut head = Command::new(BATON)
        .args([
            "head",
            "--prompt",
            "Hello",
            "--max-tokens",
            "1",
            "--workers",
            &worker.control.to_string(),
        ])
        .arg("--model")
        .arg(&model)
        .arg("--key-file")
        .arg(&theirs)
        .arg("--state-dir")
        .arg(dir.path().join("head"))
        .env("BATON_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = head.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = head.kill();
            panic!("the head did not give up on a worker of another cluster within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut head.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !status.success(),
        "the head started with a worker of another cluster"
    );
    assert!(
        err.contains("does not hold this cluster's key"),
        "unclear error: {err}"
    );
    assert!(
        err.contains(&worker.control.to_string()),
        "the error does not name the worker: {err}"
    );
}

#[test]
fn unauthenticated_connections_to_control_and_data_ports_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("cluster.key");
    let key = write_key(&key_file, 3);
    let worker = start_worker(&dir.path().join("worker"), &key_file);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            // Control port: plain gRPC gets nothing, a TLS client with the wrong key is refused.
            let plain =
                tonic::transport::Endpoint::from_shared(format!("http://{}", worker.control))
                    .unwrap()
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(5));
            if let Ok(channel) = plain.connect().await {
                let hello = pb::worker_client::WorkerClient::new(channel)
                    .hello(pb::HelloRequest::default())
                    .await;
                assert!(hello.is_err(), "plain gRPC got an answer: {hello:?}");
            }
            let wrong = baton_proto::ControlSecurity::new(&[4; 32]).unwrap();
            let err = baton_proto::connect(worker.control, &wrong, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(
                matches!(err, baton_proto::SecureError::Refused(_)),
                "{err:?}"
            );

            // A member asks the worker to accept a data link...
            let security = baton_proto::ControlSecurity::new(&key).unwrap();
            let mut client =
                baton_proto::connect(worker.control, &security, Duration::from_secs(5))
                    .await
                    .unwrap();
            let setup = pb::SetupLinkRequest {
                link_id: "test".into(),
                role: pb::LinkRole::Accept as i32,
                preference: pb::TransportPreference::Tcp as i32,
                wire_dtype: pb::WireDtype::F32 as i32,
                timeout_ms: 30_000,
                ..Default::default()
            };
            let accepting = tokio::spawn(async move { client.setup_link(setup).await });

            // ...while strangers knock on the data port: garbage, then the wrong key.
            let mut raw = tokio::net::TcpStream::connect(worker.data).await.unwrap();
            raw.write_all(&[0x5a; 64]).await.unwrap();
            let mut buf = [0u8; 256];
            let mut total = 0;
            loop {
                let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf))
                    .await
                    .expect("data port neither refused nor hung up")
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                total += n;
                assert!(total <= 48, "the data port kept talking to a stranger");
            }
            let stranger = LinkConfig::new(ClusterKey::from_bytes(&[4; 32]).unwrap());
            let opts = NegotiateOptions {
                preference: Preference::Tcp,
                ..Default::default()
            };
            match dial(worker.data, &stranger, &opts).await {
                Err(LinkError::Auth(_)) => {}
                Err(e) => panic!("expected an authentication failure, got {e}"),
                Ok(_) => panic!("a stranger set up a data link"),
            }
            assert!(
                !accepting.is_finished(),
                "the worker gave up its link setup because of strangers"
            );

            // The member's own connection still gets the link.
            let member = LinkConfig::new(ClusterKey::from_bytes(&key).unwrap());
            let link = dial(worker.data, &member, &opts)
                .await
                .expect("member's data link");
            drop(link);
            let reply = accepting
                .await
                .unwrap()
                .expect("worker accepted the member's link");
            assert_eq!(reply.into_inner().link_id, "test");
        })
        .await
        .expect("test timed out");
    });
}
