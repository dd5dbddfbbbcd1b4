//! API keys against clients without one, beyond what `api.rs` checks: every guarded route is
//! guarded (the open ones are exactly the probes), keys travel only in `Authorization: Bearer`,
//! and a client without a key cannot make the server read (and buffer) its request body.

mod common;

use std::time::Duration;

use baton_api::ApiConfig;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "k-strangers";

/// The API with [`KEY`] as its only key.
fn keyed() -> ApiConfig {
    ApiConfig { api_keys: vec![KEY.into()], ..ApiConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_but_the_probes_wants_a_key() {
    let srv = serve(backend(), keyed()).await;
    let a = srv.addr;
    let chat = chat_body("hi", serde_json::json!({"max_tokens": 1})).to_string();
    let completion =
        serde_json::json!({"model": MODEL_ID, "prompt": "hi", "max_tokens": 1}).to_string();
    let tokenize = serde_json::json!({"prompt": "hi"}).to_string();
    let guarded: [(&str, &str, &str); 5] = [
        ("GET", "/v1/models", ""),
        ("GET", &format!("/v1/models/{MODEL_ID}"), ""),
        ("POST", "/v1/chat/completions", &chat),
        ("POST", "/v1/completions", &completion),
        ("POST", "/tokenize", &tokenize),
    ];
    let bearer = format!("Bearer {KEY}");
    for (method, path, body) in guarded {
        for headers in [
            vec![],
            vec![("Authorization", "Bearer wrong")],
            // The right key, but not as a bearer token, or not in the Authorization header.
            vec![("Authorization", KEY)],
            vec![("Authorization", &*format!("Basic {KEY}"))],
            vec![("X-Api-Key", KEY)],
        ] {
            let r = http(a, method, path, &headers, body.as_bytes()).await;
            assert_eq!(
                r.status,
                401,
                "{method} {path} with {headers:?}: {}",
                r.text()
            );
        }
        let in_query = format!("{path}?api_key={KEY}");
        assert_eq!(
            http(a, method, &in_query, &[], body.as_bytes())
                .await
                .status,
            401,
            "{method} {in_query}"
        );
        let r = http(
            a,
            method,
            path,
            &[("Authorization", &bearer)],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{method} {path} with the key: {}", r.text());
    }
    // Probes and scrapers carry no keys; what they show is no secret.
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert_eq!(http(a, "GET", path, &[], b"").await.status, 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_without_a_key_is_refused_before_its_body_is_read() {
    let srv = serve(backend(), keyed()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    // Announces a body far over the limit and never sends it: a server that read bodies before
    // checking keys would wait for it (or buffer it) instead of answering.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        srv.addr,
        1u64 << 40
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the server hung up without answering");
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "no answer without the body: the server waited for it"
    );
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}
