//! `baton worker`, `baton head`, `baton serve` and `baton status`: the cluster commands.

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use baton_api::ApiConfig;
use baton_cluster::config::ClusterConfig;
use baton_cluster::identity;
use baton_cluster::key::{ClusterKey, KeyError};
use baton_head::status::STATUS_FILE;
use baton_head::{ClusterBackend, ClusterStatus, Event, GenerateRequest, Head, HeadConfig, SchedulerConfig};
use baton_model::loader::ModelSource;
use baton_model::pipeline::WireDType;
use baton_model::tokenizer::{TextStream, Tokenizer};
use baton_proto::pb;
use baton_transport::negotiate::{NegotiateOptions, Preference};
use baton_transport::LinkConfig;
use baton_worker::service::{serve, WorkerConfig, WorkerService};
use tokio::sync::Notify;

use crate::generate::{prompt_tokens, SamplingFlags};
use crate::models::device;

/// What every node needs: where its state lives, the cluster key, transport and device.
#[derive(clap::Args, Clone)]
pub struct NodeFlags {
    /// State directory (node id, cluster key, status); default: $BATON_STATE_DIR, else
    /// $XDG_STATE_HOME/baton, else ~/.local/state/baton.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Cluster key file; default: <state dir>/cluster.key, generated when absent.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Data-link transport: auto, rdma, quic or tcp.
    #[arg(long, default_value = "auto")]
    pub transport: Preference,
    /// cpu, cuda or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Human name of this node; default: the hostname.
    #[arg(long)]
    pub name: Option<String>,
}

impl NodeFlags {
    fn state_dir(&self) -> Result<PathBuf> {
        match &self.state_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(identity::default_state_dir()?),
        }
    }

    fn key(&self) -> Result<(ClusterKey, PathBuf)> {
        let path = match &self.key_file {
            Some(p) => p.clone(),
            None => self.state_dir()?.join("cluster.key"),
        };
        let key = match ClusterKey::load(&path) {
            Ok(k) => k,
            Err(KeyError::Missing(_)) if self.key_file.is_none() => {
                let k = ClusterKey::generate(&path)?;
                tracing::info!("generated a new cluster key in {}; copy it to every node of this cluster", path.display());
                k
            }
            Err(e) => return Err(e.into()),
        };
        Ok((key, path))
    }
}

/// What to do once the cluster is up: one prompt, JSON requests from stdin, or (by default)
/// serve the OpenAI-compatible API.
#[derive(clap::Args, Clone)]
pub struct RunFlags {
    /// Raw prompt for a one-shot run, tokenized as is; output as `baton generate` prints it.
    #[arg(long, conflicts_with_all = ["chat", "stdin"])]
    pub prompt: Option<String>,
    /// A user message for a one-shot run, rendered with the model's chat template.
    #[arg(long, conflicts_with = "stdin")]
    pub chat: Option<String>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    #[command(flatten)]
    pub scheduler: SchedulerFlags,
    #[command(flatten)]
    pub resilience: ResilienceFlags,
    #[command(flatten)]
    pub api: ApiFlags,
    /// Read requests from stdin, one JSON object a line (`{"prompt": "...", "max_tokens": 32,
    /// "stream": true}`; or `"chat"`, `"system"`, `"temperature"`, `"seed"`), run them
    /// concurrently, and write one JSON result a line (`{"id", "text", "tokens", "finish"}` or
    /// `{"id", "error"}`; with `stream`, `{"id", "token"}` lines first). Ids count lines from 0.
    #[arg(long)]
    pub stdin: bool,
}

/// How the head survives node loss and takes operator requests.
#[derive(clap::Args, Clone)]
pub struct ResilienceFlags {
    /// Where the head's operator service listens (`baton drain`, `join`, `rebalance`; TLS with
    /// the cluster key). Port 0 picks a free one; `baton status` shows it.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub control_listen: SocketAddr,
    /// Seconds a worker's health stream may stay silent before the worker is declared gone and the
    /// chain rebuilt without it (a killed process is noticed at once).
    #[arg(long, default_value_t = 3.0)]
    pub failure_timeout: f64,
    /// Re-plan on its own, once no request runs, when a worker joined (`baton join`).
    #[arg(long)]
    pub rebalance_when_idle: bool,
}

/// How the head's scheduler batches requests.
#[derive(clap::Args, Clone)]
pub struct SchedulerFlags {
    /// Prompt tokens per micro-batch at most: a longer prompt enters in chunks interleaved with
    /// the other streams' decode steps.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Sequences per micro-batch at most.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Sequences holding KV cache at once; more wait in the queue.
    #[arg(long, default_value_t = 16)]
    pub max_running: usize,
    /// Requests admitted (running + queued); more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queued: usize,
    /// Micro-batches in flight at once; 0: one per stage.
    #[arg(long, default_value_t = 0)]
    pub max_in_flight: usize,
    /// Micro-batches carrying prompt chunks in flight at once (more prefill faster, but delay the
    /// other streams' decode steps queued behind them).
    #[arg(long, default_value_t = 1)]
    pub prefill_in_flight: usize,
}

impl SchedulerFlags {
    fn config(&self) -> SchedulerConfig {
        SchedulerConfig {
            max_batch: self.max_batch,
            max_running: self.max_running,
            max_queued: self.max_queued,
            prefill_chunk: self.prefill_chunk,
            max_in_flight: self.max_in_flight,
            prefill_in_flight: self.prefill_in_flight,
        }
    }
}

/// The OpenAI-compatible API the head serves when it runs neither --prompt/--chat nor --stdin.
#[derive(clap::Args, Clone)]
pub struct ApiFlags {
    /// Address of the API.
    #[arg(long, default_value = baton_api::config::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// API keys, comma-separated; added to cluster.toml's `api.keys` and $BATON_API_KEYS. With
    /// none the API is open (a warning is printed when it listens beyond loopback).
    #[arg(long, value_delimiter = ',')]
    pub api_keys: Vec<String>,
    /// Origins allowed by CORS, comma-separated (`*`: any); default: CORS off.
    #[arg(long, value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// The model id the API serves; default: the model file name without extension.
    #[arg(long)]
    pub model_id: Option<String>,
    /// Tokens generated when a request names no max_tokens; default: the rest of the context.
    #[arg(long)]
    pub default_max_tokens: Option<usize>,
    /// The most max_tokens a request may ask for; default: the context length.
    #[arg(long)]
    pub max_tokens_limit: Option<usize>,
    /// cluster.toml (API keys; placement overrides and per-node model paths for the head);
    /// default: $BATON_CONFIG, else ~/.config/baton/cluster.toml if present.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl ApiFlags {
    fn config(&self) -> Result<ApiConfig> {
        let cluster = ClusterConfig::load_or_default(self.config.as_deref())?;
        let mut keys = self.api_keys.clone();
        keys.extend(cluster.api.keys);
        let mut cfg = ApiConfig {
            listen: self.listen,
            api_keys: keys,
            cors_origins: self.cors_origins.clone(),
            default_max_tokens: self.default_max_tokens,
            max_tokens_limit: self.max_tokens_limit,
            ..ApiConfig::default()
        }
        .with_env_keys();
        cfg.api_keys.sort();
        cfg.api_keys.dedup();
        Ok(cfg)
    }
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// Control-plane (gRPC) address; port 0 picks a free one.
    #[arg(long, default_value = "0.0.0.0:8422")]
    pub listen: SocketAddr,
    /// Data-link listener; default: the control address's IP, any free port.
    #[arg(long)]
    pub data_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Exit when stdin reaches end of file (`baton serve` ties its workers' lifetime to its own).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
    /// Do not announce this worker over mDNS (heads must then list its address).
    #[arg(long)]
    pub no_mdns: bool,
}

#[derive(clap::Args)]
pub struct HeadArgs {
    /// GGUF file or HF safetensors directory, at the same path on every worker; default: the
    /// embedded model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Worker control addresses (`host:port`), comma-separated, in stage order; default: the
    /// cluster's workers found over mDNS and cluster.toml's `peers`, ordered by name.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Without --workers: how many workers to wait for while browsing (at most the configured
    /// browse time).
    #[arg(long, default_value_t = 1)]
    pub min_workers: usize,
    /// Element type of hidden states between stages: bf16, f16 or f32 (exact).
    #[arg(long, default_value = "bf16")]
    pub wire_dtype: WireDType,
    /// Do not run stage 0 in the head; every layer goes to the workers.
    #[arg(long)]
    pub no_worker: bool,
    /// IP of the head's data listener (the last stage connects back to it); default: the
    /// interface that routes to the last worker.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_ip: IpAddr,
    #[command(flatten)]
    pub node: NodeFlags,
    #[command(flatten)]
    pub run: RunFlags,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Worker processes to start on loopback (the head runs stage 0 besides them).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// GGUF file or HF safetensors directory; default: the embedded model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Element type of hidden states between stages: bf16, f16 or f32 (exact).
    #[arg(long, default_value = "bf16")]
    pub wire_dtype: WireDType,
    #[command(flatten)]
    pub node: NodeFlags,
    #[command(flatten)]
    pub run: RunFlags,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// State directory of the head; default as for the head.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Print the snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn backend(device: &str) -> pb::Backend {
    match device {
        "cuda" => pb::Backend::Cuda,
        "metal" => pb::Backend::Metal,
        _ => pb::Backend::Cpu,
    }
}

fn link_config(key: &ClusterKey) -> Result<LinkConfig> {
    Ok(LinkConfig::new(baton_transport::ClusterKey::from_bytes(key.as_bytes())?))
}

pub fn run_worker(args: WorkerArgs) -> Result<()> {
    let state_dir = args.node.state_dir()?;
    let identity = identity::load_or_create(&state_dir, args.node.name.clone())?;
    let (key, _) = args.node.key()?;
    let cfg = WorkerConfig {
        identity,
        cluster_id: key.cluster_id(),
        link: link_config(&key)?,
        negotiate: NegotiateOptions { preference: args.node.transport, ..Default::default() },
        device: device(&args.node.device)?,
        backend: backend(&args.node.device),
        weights_cache: state_dir.join("weights"),
    };
    let data_addr = args.data_listen.unwrap_or(SocketAddr::new(args.listen.ip(), 0));
    let security = baton_proto::ControlSecurity::new(key.as_bytes())?;
    let (name, id, no_mdns) = (cfg.identity.name.clone(), cfg.identity.id.to_string(), args.no_mdns);
    let backend_name = cfg.backend.short_name();
    let mut transports = vec!["tcp".to_string()];
    if cfg.negotiate.enable_quic {
        transports.push("quic".into());
    }
    runtime()?.block_on(async move {
        let shutdown = Arc::new(Notify::new());
        let service = WorkerService::new(cfg, data_addr, shutdown).await?;
        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let control = listener.local_addr()?;
        let _announced = if no_mdns { None } else { crate::discover::advertise(&name, &id, &key, control, backend_name, transports) };
        // One line on stdout says where the worker listens (`baton serve` reads it).
        println!("BATON_WORKER_READY control={control} data={}", service.data_addr()?);
        std::io::stdout().flush()?;
        tracing::info!("worker listening: control {control}, data {}", service.data_addr()?);
        let exit_with_stdin = args.exit_with_stdin;
        let stop = async move {
            if exit_with_stdin {
                let eof = tokio::task::spawn_blocking(|| {
                    let mut sink = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
                });
                tokio::select! {
                    _ = eof => tracing::info!("stdin closed: exiting"),
                    _ = tokio::signal::ctrl_c() => {}
                }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        serve(service, listener, &security, stop).await?;
        // The stdin reader may still block; nothing else is left to finish.
        std::process::exit(0)
    })
}

fn head_config(model: PathBuf, workers: Vec<String>, wire: WireDType, local_stage: bool, bind_ip: IpAddr, node: &NodeFlags, run: &RunFlags) -> Result<HeadConfig> {
    let state_dir = node.state_dir()?;
    let identity = identity::load_or_create(&state_dir, node.name.clone())?;
    let (key, _) = node.key()?;
    let failure_timeout = Duration::try_from_secs_f64(run.resilience.failure_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--failure-timeout {}: give a positive number of seconds", run.resilience.failure_timeout))?;
    Ok(HeadConfig {
        model,
        workers,
        key,
        name: identity.name,
        id: identity.id.to_string(),
        wire,
        preference: node.transport,
        local_stage,
        device: device(&node.device)?,
        bind_ip,
        status_path: Some(state_dir.join(STATUS_FILE)),
        scheduler: run.scheduler.config(),
        cluster: ClusterConfig::load_or_default(run.api.config.as_deref())?,
        failure_timeout,
        rebalance_when_idle: run.resilience.rebalance_when_idle,
    })
}

pub fn run_head(args: HeadArgs) -> Result<()> {
    let model = crate::models::resolve(args.model)?;
    let workers = if args.workers.is_empty() {
        let cluster = ClusterConfig::load_or_default(args.run.api.config.as_deref())?;
        crate::discover::discover_workers(&args.node.key()?.0, &cluster, args.min_workers.max(1))?
    } else {
        args.workers
    };
    let cfg = head_config(model.clone(), workers, args.wire_dtype, !args.no_worker, args.bind_ip, &args.node, &args.run)?;
    runtime()?.block_on(async move {
        let head = Head::start(cfg).await?;
        let r = drive(&head, &model, &args.run).await;
        head.mark_stopped();
        r
    })
}

/// Worker processes of `baton serve`: killed when dropped, whatever way serve ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts one worker process on loopback and returns its control address.
fn spawn_worker(i: usize, state_dir: &Path, key_file: &Path, node: &NodeFlags, children: &mut Children) -> Result<String> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["worker", "--listen", "127.0.0.1:0", "--exit-with-stdin", "--no-mdns", "--transport", &node.transport.to_string(), "--device", &node.device])
        .arg("--state-dir")
        .arg(state_dir.join("serve-workers").join(i.to_string()))
        .arg("--key-file")
        .arg(key_file)
        .args(["--name", &format!("worker-{i}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("starting a worker process")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let pid = child.id();
    children.0.push(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let ready = lines.by_ref().map_while(|l| l.ok()).find(|l| l.starts_with("BATON_WORKER_READY"));
        let _ = tx.send(ready);
        // Keep draining so the worker never blocks on a full pipe.
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .flatten()
        .with_context(|| format!("worker {i} (pid {pid}) did not come up within 30 s"))?;
    let control = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("control="))
        .context("worker ready line without control address")?
        .to_string();
    eprintln!("serve: worker-{i} pid {pid} control {control}");
    Ok(control)
}

pub fn run_serve(args: ServeArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let model = crate::models::resolve(args.model)?;
    let state_dir = args.node.state_dir()?;
    let (_, key_file) = args.node.key()?;
    let mut children = Children(Vec::new());
    let mut endpoints = Vec::new();
    for i in 0..args.workers {
        endpoints.push(spawn_worker(i, &state_dir, &key_file, &args.node, &mut children)?);
    }
    let mut node = args.node.clone();
    node.key_file = Some(key_file);
    let cfg = head_config(model.clone(), endpoints, args.wire_dtype, true, IpAddr::from([127, 0, 0, 1]), &node, &args.run)?;
    let result = runtime()?.block_on(async {
        let head = Head::start(cfg).await?;
        let r = drive(&head, &model, &args.run).await;
        head.mark_stopped();
        head.shutdown_workers("serve is exiting").await;
        r
    });
    drop(children);
    result
}

#[derive(serde::Deserialize)]
struct JsonRequest {
    prompt: Option<String>,
    chat: Option<String>,
    system: Option<String>,
    max_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f32>,
    seed: Option<u64>,
}

/// Serves what `run` asks for once the cluster is up, with the operator service beside it.
async fn drive(head: &Head, model: &Path, run: &RunFlags) -> Result<()> {
    let addr = run.resilience.control_listen;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the operator service to {addr}"))?;
    let control = listener.local_addr()?;
    head.set_control_addr(control);
    // One line on stderr says where (scripts and tests read it; port 0 picks one).
    eprintln!("BATON_HEAD_CONTROL {control}");
    let operator = head.clone();
    tokio::spawn(async move {
        if let Err(e) = baton_head::control::serve(operator, listener, std::future::pending()).await {
            tracing::error!("operator service stopped: {e}");
        }
    });
    let tokenizer = Arc::new(ModelSource::open(model)?.tokenizer()?);
    if run.prompt.is_some() || run.chat.is_some() {
        return one_shot(head, &tokenizer, run).await;
    }
    if run.stdin {
        return json_lines(head, tokenizer, run).await;
    }
    serve_api(head, model, &run.api).await
}

/// Serves the OpenAI-compatible API over the cluster until Ctrl-C or SIGTERM.
async fn serve_api(head: &Head, model: &Path, flags: &ApiFlags) -> Result<()> {
    let cfg = flags.config()?;
    let backend = Arc::new(ClusterBackend::new(head.clone(), model, flags.model_id.clone())?);
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding the API to {}", cfg.listen))?;
    // One line on stderr says where the API listens (scripts and tests read it; port 0 picks one).
    eprintln!("BATON_API_READY http://{}", listener.local_addr()?);
    eprintln!("cluster up; `baton status` shows it; Ctrl-C stops");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    baton_api::serve_on(listener, backend, cfg, stop).await?;
    Ok(())
}

async fn one_shot(head: &Head, tokenizer: &Tokenizer, run: &RunFlags) -> Result<()> {
    let prompt = prompt_tokens(tokenizer, run.prompt.as_deref(), run.chat.as_deref(), run.system.as_deref())?;
    let mut events = head.generate(GenerateRequest {
        prompt,
        sampling: run.sampling.params()?,
        max_tokens: run.max_tokens,
        stop_ids: tokenizer.stop_token_ids().to_vec(),
    });
    let mut text = TextStream::new(tokenizer, true);
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = events.recv().await {
        match event? {
            Event::Token(t) => {
                if let Some(piece) = text.push(t)? {
                    stdout.write_all(piece.as_bytes())?;
                    stdout.flush()?;
                }
            }
            Event::Done { finish, prompt_tokens, generated, prefill_s, decode_tok_s } => {
                stdout.write_all(text.finish()?.as_bytes())?;
                writeln!(stdout)?;
                eprintln!(
                    "prompt tokens {prompt_tokens}, prefill {:.1} tok/s, generated {generated} tokens ({finish:?}), decode {decode_tok_s:.1} tok/s",
                    prompt_tokens as f64 / prefill_s.max(1e-9)
                );
                return Ok(());
            }
        }
    }
    bail!("the request ended without a result")
}

async fn json_lines(head: &Head, tokenizer: Arc<Tokenizer>, run: &RunFlags) -> Result<()> {
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let emit = |out: &Mutex<std::io::Stdout>, v: serde_json::Value| {
        if let Ok(mut o) = out.lock() {
            let _ = writeln!(o, "{v}").and_then(|_| o.flush());
        }
    };
    let (tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(|l| l.ok()) {
            if tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    let mut id = 0u64;
    while let Some(line) = lines.recv().await {
        if line.trim().is_empty() {
            continue;
        }
        let this = id;
        id += 1;
        let parsed = serde_json::from_str::<JsonRequest>(&line).map_err(|e| e.to_string()).and_then(|r| {
            let prompt = prompt_tokens(&tokenizer, r.prompt.as_deref(), r.chat.as_deref(), r.system.as_deref()).map_err(|e| e.to_string())?;
            let mut sampling = run.sampling.params().map_err(|e| e.to_string())?;
            sampling.temperature = r.temperature.unwrap_or(sampling.temperature);
            sampling.seed = r.seed.unwrap_or(sampling.seed);
            Ok((r.stream, GenerateRequest { prompt, sampling, max_tokens: r.max_tokens.unwrap_or(run.max_tokens), stop_ids: tokenizer.stop_token_ids().to_vec() }))
        });
        let (stream, req) = match parsed {
            Ok(x) => x,
            Err(e) => {
                emit(&out, serde_json::json!({"id": this, "error": e}));
                continue;
            }
        };
        let (head, out, tokenizer) = (head.clone(), out.clone(), tokenizer.clone());
        tasks.spawn(async move {
            let mut events = head.generate(req);
            let mut tokens = Vec::new();
            while let Some(event) = events.recv().await {
                match event {
                    Ok(Event::Token(t)) => {
                        tokens.push(t);
                        if stream {
                            emit(&out, serde_json::json!({"id": this, "token": t}));
                        }
                    }
                    Ok(Event::Done { finish, prompt_tokens, decode_tok_s, prefill_s, .. }) => {
                        let mut text = TextStream::new(&tokenizer, true);
                        let mut s = String::new();
                        for &t in &tokens {
                            if let Ok(Some(p)) = text.push(t) {
                                s.push_str(&p);
                            }
                        }
                        if let Ok(rest) = text.finish() {
                            s.push_str(&rest);
                        }
                        emit(&out, serde_json::json!({"id": this, "text": s, "tokens": tokens, "finish": finish,
                            "prompt_tokens": prompt_tokens, "prefill_s": prefill_s, "decode_tok_s": decode_tok_s}));
                        return;
                    }
                    Err(e) => {
                        emit(&out, serde_json::json!({"id": this, "error": e.to_string()}));
                        return;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    // Signal 0 checks existence without touching the process.
    i32::try_from(pid).is_ok_and(|p| unsafe { libc::kill(p, 0) } == 0)
}

fn mib(b: u64) -> String {
    format!("{} MiB", b >> 20)
}

pub fn run_status(args: StatusArgs) -> Result<()> {
    let dir = match args.state_dir {
        Some(d) => d,
        None => identity::default_state_dir()?,
    };
    let path = dir.join(STATUS_FILE);
    let s = ClusterStatus::read(&path).with_context(|| format!("no head status at {} (is a head running with this state directory?)", path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let running = if pid_alive(s.pid) { "running" } else { "not running" };
    println!("head {} (pid {}, {running}): {}", s.head, s.pid, s.state);
    if !s.control.is_empty() {
        println!("operator service {} (baton drain / join / rebalance)", s.control);
    }
    if s.replans > 0 {
        println!("chain rebuilt {} time(s), {} stream(s) resumed, last pause {} ms", s.replans, s.resumed_sequences, s.last_pause_ms);
    }
    println!("model {}, wire {}, {}", s.model, s.wire_dtype, s.placement);
    println!("\nNODE            ENDPOINT               STATE    BACKEND  AVAILABLE / TOTAL        KV");
    for n in &s.nodes {
        let state = match n.state.as_str() {
            "" if n.alive => "up",
            "" => "gone",
            s => s,
        };
        let endpoint = if n.endpoint.is_empty() { "(head)" } else { &n.endpoint };
        println!("{:<15} {:<22} {:<8} {:<8} {:>10} / {:<12} {}", n.name, endpoint, state, n.backend, mib(n.available_memory), mib(n.total_memory), mib(n.kv_bytes));
        if !n.detail.is_empty() {
            println!("                {}", n.detail);
        }
    }
    println!("\nSTAGE  NODE            LAYERS   WEIGHTS");
    for st in &s.stages {
        println!("{:<6} {:<15} {:<8} {}", st.index, st.node, st.layers, mib(st.weight_bytes));
    }
    println!("\nLINK                              TRANSPORT  RTT");
    for l in &s.links {
        println!("{:<33} {:<10} {:.1} µs", format!("{} → {}", l.from, l.to), l.transport, l.rtt_us);
        for r in &l.rejected {
            println!("    not chosen: {r}");
        }
    }
    println!("\ntokens generated {}, last decode {:.1} tok/s", s.tokens_generated, s.last_decode_tok_s);
    Ok(())
}
