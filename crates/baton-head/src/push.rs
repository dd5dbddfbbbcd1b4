//! Pushing a shard's weights to a worker that lacks the model file: exactly the shard's tensors,
//! in checksummed chunks, over a connection of their own (so that heartbeats and the load's
//! progress stream never wait behind megabytes of weights, and survive a dropped push). A push
//! that breaks off resumes where the worker's verified bytes end.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use baton_proto::pb;
use baton_proto::weights_stream::{make_chunk, plan_chunks, DEFAULT_CHUNK_BYTES};
use baton_worker::progress::{bar, Milestones};
use baton_worker::weights::ShardWeights;
use tokio::sync::mpsc;

use crate::head::HeadError;

/// Attempts before a push is given up: each resumes from what the worker holds.
const ATTEMPTS: usize = 5;

/// Pushes layers `range` of the GGUF model in `parts` to the worker at `endpoint`.
pub async fn push_shard(
    worker: &str,
    endpoint: &str,
    security: &baton_proto::ControlSecurity,
    parts: Vec<PathBuf>,
    range: Range<usize>,
    n_layers: usize,
) -> Result<(), HeadError> {
    let werr = |message: String| HeadError::Worker {
        worker: worker.to_string(),
        message,
    };
    let addr: SocketAddr = tokio::net::lookup_host(endpoint)
        .await
        .map_err(|e| werr(format!("cannot resolve {endpoint}: {e}")))?
        .next()
        .ok_or_else(|| werr(format!("{endpoint} resolves to no address")))?;
    let what = format!("layers {}..{}", range.start, range.end);
    tracing::info!("{worker}: has no model file; reading and hashing {what} to push");
    let weights =
        tokio::task::spawn_blocking(move || ShardWeights::prepare(&parts, range, n_layers))
            .await
            .map_err(|e| werr(format!("preparing weights: {e}")))?
            .map_err(|e| werr(format!("preparing weights: {e}")))?;
    let weights = std::sync::Arc::new(weights);
    let total = weights.total_bytes();
    let sizes: Vec<u64> = weights.set.tensors.iter().map(|t| t.size).collect();
    let progress = bar(total, format!("pushing {what} to {worker}"));
    let milestones = std::sync::Arc::new(std::sync::Mutex::new(Milestones::new(total)));
    let mut last_error = String::new();
    for attempt in 1..=ATTEMPTS {
        let result: Result<bool, String> = async {
            let mut client = baton_proto::connect(addr, security, Duration::from_secs(5))
                .await
                .map_err(|e| e.to_string())?;
            let have = client
                .resume_weights(weights.set.clone())
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner()
                .have;
            // Validated first: the worker's offsets could be anything, their sum included.
            let spans =
                plan_chunks(&sizes, &have, DEFAULT_CHUNK_BYTES).map_err(|e| e.to_string())?;
            let held: u64 = have.iter().sum();
            if held == total {
                return Ok(true);
            }
            if held > 0 {
                tracing::info!(
                    "{worker}: resuming the push of {what} at {} of {} MiB",
                    held >> 20,
                    total >> 20
                );
            }
            let (tx, rx) = mpsc::channel(4);
            let begin = pb::WeightsPush {
                item: Some(pb::weights_push::Item::Begin(weights.set.clone())),
            };
            tx.send(begin)
                .await
                .map_err(|_| "push stream closed".to_string())?;
            // Reading happens on a blocking thread, a few chunks ahead of the network.
            let (reader, bar_, milestones, worker, what) = (
                weights.clone(),
                progress.clone(),
                milestones.clone(),
                worker.to_string(),
                what.clone(),
            );
            bar_.set_position(held);
            let read = tokio::task::spawn_blocking(move || -> Result<(), String> {
                for span in spans {
                    let data = reader.read(span).map_err(|e| e.to_string())?;
                    let len = u64::from(span.len);
                    let chunk = pb::WeightsPush {
                        item: Some(pb::weights_push::Item::Chunk(make_chunk(span, data))),
                    };
                    if tx.blocking_send(chunk).is_err() {
                        return Ok(()); // the push ended early; its error says why
                    }
                    bar_.inc(len);
                    if let Some(pct) = milestones
                        .lock()
                        .ok()
                        .and_then(|mut m| m.passed(bar_.position()))
                    {
                        tracing::info!("{worker}: pushing {what}: {pct}% of {} MiB", total >> 20);
                    }
                }
                Ok(())
            });
            let reply = client
                .push_weights(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            read.await.map_err(|e| e.to_string())??;
            let reply = reply.map_err(|s| s.message().to_string())?.into_inner();
            Ok(reply.complete)
        }
        .await;
        match result {
            Ok(true) => {
                progress.finish();
                tracing::info!("{worker}: {what} pushed ({} MiB)", total >> 20);
                return Ok(());
            }
            Ok(false) => last_error = "the worker did not get every byte".into(),
            Err(e) => last_error = e,
        }
        tracing::warn!(
            "{worker}: push of {what} broke off (attempt {attempt} of {ATTEMPTS}): {last_error}"
        );
    }
    progress.abandon();
    Err(werr(format!(
        "pushing {what} failed {ATTEMPTS} times; last: {last_error}"
    )))
}
