//! `baton bench transport`: latency and throughput per transport and frame size, with a raw-TCP
//! baseline in the same run so every overhead reads as a ratio.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use baton_transport::rdma::{self, RdmaConfig};
use baton_transport::{quic::QuicEndpoint, tcp, ClusterKey, Frame, Link, LinkConfig};
use bytes::Bytes;
use std::io::IoSlice;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const DEFAULT_SIZES: [usize; 6] = [64, 4 << 10, 14 << 10, 64 << 10, 1 << 20, 16 << 20];
const DEFAULT_PORT: u16 = 8431;
/// Frames in a throughput burst carry this bit; the echo side answers only the last one.
const BURST: u64 = 1 << 62;
const BURST_LAST: u64 = 1 << 61;
const WARMUP: usize = 10;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchTransportArgs {
    /// Run both ends in this process over loopback.
    #[arg(long, conflicts_with_all = ["serve", "peer"])]
    pub local: bool,
    /// Serve the far end for `--peer` runs from another machine (until interrupted).
    #[arg(long, conflicts_with = "peer")]
    pub serve: bool,
    /// Measure against `baton bench transport --serve` on HOST (port 8431 unless given).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub peer: Option<String>,
    /// Address `--serve` listens on; it uses this port and the next three.
    #[arg(long, default_value = "0.0.0.0:8431")]
    pub listen: SocketAddr,
    /// Transports to measure besides the raw-TCP baseline.
    #[arg(long, value_delimiter = ',', default_value = "tcp,quic,rdma")]
    pub transports: Vec<String>,
    /// Frame payload sizes in bytes (suffixes k and m allowed).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Option<Vec<usize>>,
    /// Round trips per transport and size (after 10 warm-up round trips).
    #[arg(long, default_value_t = 2000)]
    pub iterations: usize,
    /// Time cap per transport and size, in seconds; fewer iterations run if it is reached.
    #[arg(long, default_value_t = 5.0)]
    pub max_seconds: f64,
    /// Cluster key file (`--serve` and `--peer`; `--local` makes a throwaway key).
    #[arg(long, env = "BATON_CLUSTER_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Only authenticate TCP records (keyed BLAKE3 tag) instead of encrypting them (AES-256-GCM).
    #[arg(long)]
    pub tcp_mac_only: bool,
    /// With `--local`: carry RDMA through baton's emulated verbs provider (reported as rdma-emulated).
    #[arg(long)]
    pub emulated_rdma: bool,
    /// Verbs library to load (default: $BATON_RDMA_LIB, then libibverbs.so.1 / librdma.dylib).
    #[arg(long)]
    pub rdma_lib: Option<PathBuf>,
    /// RDMA device (default: the one for the interface that routes to the peer).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// Write the records as JSON to this file (`-` for stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the records as CSV to this file (`-` for stdout).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write an SVG chart of RTT p50 against size.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mul) = match s.strip_suffix("kib").or(s.strip_suffix('k')) {
        Some(n) => (n, 1 << 10),
        None => match s.strip_suffix("mib").or(s.strip_suffix('m')) {
            Some(n) => (n, 1 << 20),
            None => (s.as_str(), 1),
        },
    };
    num.parse::<usize>().map(|n| n * mul).map_err(|e| format!("bad size {s:?}: {e}"))
}

/// One row of results; the JSON schema researchers rely on: keep it stable.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    pub transport: String,
    pub size_bytes: usize,
    pub iterations: usize,
    pub rtt_p50_us: f64,
    pub rtt_p90_us: f64,
    pub rtt_p99_us: f64,
    pub rtt_max_us: f64,
    pub throughput_mb_s: f64,
    pub cpu_us_per_msg: f64,
}

/// Process CPU time (user + system).
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// A message channel under test: a baton link or the raw socket baseline.
enum Endpoint {
    Raw(BufReader<OwnedReadHalf>, OwnedWriteHalf, Vec<u8>),
    Link(Link),
}

fn raw_endpoint(s: TcpStream) -> Endpoint {
    let (r, w) = s.into_split();
    Endpoint::Raw(BufReader::with_capacity(64 << 10, r), w, Vec::new())
}

impl Endpoint {
    async fn send(&mut self, tag: u64, payload: &Bytes) -> anyhow::Result<()> {
        match self {
            Endpoint::Raw(_, w, _) => {
                let mut hdr = [0u8; 12];
                hdr[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
                hdr[4..].copy_from_slice(&tag.to_le_bytes());
                // One vectored write per message, as the links do.
                let mut parts = [IoSlice::new(&hdr), IoSlice::new(payload)];
                let mut parts = &mut parts[..];
                while !parts.is_empty() {
                    let n = w.write_vectored(parts).await?;
                    if n == 0 {
                        bail!("raw socket closed");
                    }
                    IoSlice::advance_slices(&mut parts, n);
                }
            }
            Endpoint::Link(l) => l.send(&Frame::control(tag, payload.clone())).await?,
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(u64, usize)> {
        match self {
            Endpoint::Raw(s, _, buf) => {
                let mut hdr = [0u8; 12];
                s.read_exact(&mut hdr).await?;
                let len = u32::from_le_bytes(hdr[..4].try_into()?) as usize;
                buf.resize(len, 0);
                s.read_exact(buf).await?;
                Ok((u64::from_le_bytes(hdr[4..].try_into()?), len))
            }
            Endpoint::Link(l) => {
                let f = l.recv().await?;
                Ok((f.micro_batch, f.payload.len()))
            }
        }
    }

    /// Echo loop of the far end: answers every frame, or only the last of a burst.
    async fn echo(mut self) -> anyhow::Result<()> {
        let mut reply = Bytes::new();
        loop {
            let (tag, len) = match self.recv().await {
                Ok(x) => x,
                Err(_) => return Ok(()),
            };
            if tag & BURST != 0 && tag & BURST_LAST == 0 {
                continue;
            }
            if tag & BURST == 0 && reply.len() != len {
                reply = Bytes::from(vec![0xa5; len]);
            }
            let payload = if tag & BURST != 0 { Bytes::new() } else { reply.clone() };
            self.send(tag, &payload).await?;
        }
    }
}

async fn measure(ep: &mut Endpoint, transport: &str, size: usize, args: &BenchTransportArgs) -> anyhow::Result<Record> {
    let payload = Bytes::from(vec![0x3c; size]);
    let cap = Duration::from_secs_f64(args.max_seconds);
    for i in 0..WARMUP {
        ep.send(i as u64, &payload).await?;
        ep.recv().await?;
    }
    let mut rtts = Vec::with_capacity(args.iterations);
    let (start, cpu0) = (Instant::now(), cpu_time());
    for i in 0..args.iterations {
        let t = Instant::now();
        ep.send(i as u64, &payload).await?;
        let (tag, len) = ep.recv().await?;
        if tag != i as u64 || len != size {
            bail!("{transport}: echo {tag}/{len} for {i}/{size}");
        }
        rtts.push(t.elapsed());
        if start.elapsed() > cap {
            break;
        }
    }
    let cpu = cpu_time().saturating_sub(cpu0);
    let n = rtts.len();
    rtts.sort();
    // One-way throughput: a burst the far end answers once, at its end.
    let burst = ((256usize << 20) / size.max(1)).clamp(8, args.iterations.max(8));
    let t = Instant::now();
    let mut sent = 0;
    for i in 0..burst {
        let last = i + 1 == burst || t.elapsed() > cap;
        ep.send(BURST | if last { BURST_LAST } else { 0 } | i as u64, &payload).await?;
        sent += 1;
        if last {
            break;
        }
    }
    ep.recv().await?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Record {
        transport: transport.into(),
        size_bytes: size,
        iterations: n,
        rtt_p50_us: percentile(&rtts, 0.50),
        rtt_p90_us: percentile(&rtts, 0.90),
        rtt_p99_us: percentile(&rtts, 0.99),
        rtt_max_us: percentile(&rtts, 1.0),
        throughput_mb_s: (sent * size) as f64 / secs / 1e6,
        cpu_us_per_msg: cpu.as_secs_f64() * 1e6 / (2 * n) as f64,
    })
}

fn config(args: &BenchTransportArgs) -> anyhow::Result<LinkConfig> {
    let key = match &args.key_file {
        Some(p) => ClusterKey::from_bytes(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)?,
        None if args.local => ClusterKey::from_bytes(&rand::random::<[u8; 32]>())?,
        None => bail!("--serve and --peer need the cluster key: --key-file or BATON_CLUSTER_KEY_FILE"),
    };
    let mut cfg = LinkConfig::new(key);
    cfg.encrypt_tcp = !args.tcp_mac_only;
    cfg.rdma = RdmaConfig {
        library: args.rdma_lib.clone().or_else(|| {
            args.emulated_rdma.then(|| rdma::emulated_provider_path().map(PathBuf::from)).flatten()
        }),
        device: args.rdma_device.clone().or_else(|| args.emulated_rdma.then(|| "rdma_emu0".to_string())),
        ..RdmaConfig::default()
    };
    if args.emulated_rdma && rdma::emulated_provider_path().is_none() {
        bail!("this build has no emulated verbs provider (it needs <infiniband/verbs.h> at build time)");
    }
    Ok(cfg)
}

/// The far end: raw echo on `port`, TCP links on +1, QUIC on +1 (UDP), RDMA side channel on +2.
struct Server {
    raw: SocketAddr,
    tcp: SocketAddr,
    quic: SocketAddr,
    rdma: SocketAddr,
}

async fn serve(listen: SocketAddr, cfg: LinkConfig) -> anyhow::Result<(Server, tokio::task::JoinSet<()>)> {
    let at = |off: u16| SocketAddr::new(listen.ip(), if listen.port() == 0 { 0 } else { listen.port() + off });
    let raw = TcpListener::bind(at(0)).await?;
    let tcp_l = TcpListener::bind(at(1)).await?;
    let quic = QuicEndpoint::bind(tcp_l.local_addr()?, &cfg)?;
    let rdma_l = TcpListener::bind(at(2)).await?;
    let server = Server { raw: raw.local_addr()?, tcp: tcp_l.local_addr()?, quic: quic.local_addr()?, rdma: rdma_l.local_addr()? };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        while let Ok((s, _)) = raw.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(raw_endpoint(s).echo());
        }
    });
    let c = cfg.clone();
    tasks.spawn(async move {
        loop {
            match tcp::accept(&tcp_l, &c).await {
                Ok(l) => drop(tokio::spawn(Endpoint::Link(l).echo())),
                Err(e) => tracing::warn!("bench: TCP link refused: {e}"),
            }
        }
    });
    tasks.spawn(async move {
        loop {
            match quic.accept().await {
                Ok(l) => drop(tokio::spawn(Endpoint::Link(l).echo())),
                Err(e) => tracing::warn!("bench: QUIC link refused: {e}"),
            }
        }
    });
    tasks.spawn(async move {
        loop {
            match rdma::accept(&rdma_l, &cfg).await {
                Ok(l) => drop(tokio::spawn(Endpoint::Link(l).echo())),
                Err(e) => tracing::warn!("bench: RDMA link failed: {e}"),
            }
        }
    });
    Ok((server, tasks))
}

async fn connect(t: &str, s: &Server, cfg: &LinkConfig) -> anyhow::Result<Endpoint> {
    Ok(match t {
        "raw-tcp" => {
            let st = TcpStream::connect(s.raw).await?;
            st.set_nodelay(true)?;
            raw_endpoint(st)
        }
        "tcp" => Endpoint::Link(tcp::connect(s.tcp, cfg).await?),
        "quic" => {
            let bind: SocketAddr = if s.quic.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
            Endpoint::Link(QuicEndpoint::bind(bind, cfg)?.connect(s.quic).await?)
        }
        "rdma" => Endpoint::Link(rdma::connect(s.rdma, cfg).await?),
        other => bail!("unknown transport {other:?} (tcp, quic, rdma)"),
    })
}

pub async fn run(args: BenchTransportArgs) -> anyhow::Result<()> {
    let cfg = config(&args)?;
    if args.serve {
        let (s, mut tasks) = serve(args.listen, cfg).await?;
        eprintln!("serving: raw-tcp {}, tcp {}, quic {} (udp), rdma side channel {}", s.raw, s.tcp, s.quic, s.rdma);
        tasks.join_next().await;
        return Ok(());
    }
    let (server, _tasks) = if args.local {
        serve("127.0.0.1:0".parse()?, cfg.clone()).await?
    } else {
        let peer = args.peer.as_deref().context("one of --local, --serve or --peer HOST is needed")?;
        let with_port = if peer.contains(':') { peer.to_string() } else { format!("{peer}:{DEFAULT_PORT}") };
        let base = with_port.to_socket_addrs()?.next().context("peer address does not resolve")?;
        let at = |off: u16| SocketAddr::new(base.ip(), base.port() + off);
        (Server { raw: at(0), tcp: at(1), quic: at(1), rdma: at(2) }, tokio::task::JoinSet::new())
    };
    let sizes = args.sizes.clone().unwrap_or(DEFAULT_SIZES.to_vec());
    let mut records = Vec::new();
    let mut transports = vec!["raw-tcp".to_string()];
    transports.extend(args.transports.iter().filter(|t| *t != "raw-tcp").cloned());
    let mut eps = Vec::new();
    for t in &transports {
        match tokio::time::timeout(Duration::from_secs(15), connect(t, &server, &cfg)).await {
            Ok(Ok(ep)) => {
                let name = match &ep {
                    Endpoint::Link(l) => l.transport_name().to_string(),
                    Endpoint::Raw(..) => t.clone(),
                };
                eps.push((name, ep));
            }
            Ok(Err(e)) => eprintln!("{t}: not measured: {e:#}"),
            Err(_) => eprintln!("{t}: not measured: link setup timed out"),
        }
    }
    // Sizes outside, transports inside: background load hits every transport alike.
    for &size in &sizes {
        for (name, ep) in eps.iter_mut() {
            let r = measure(ep, name, size, &args).await.with_context(|| format!("{name} at {size} bytes"))?;
            eprintln!("{name:>13} {:>9} B  p50 {:>9.1} µs", size, r.rtt_p50_us);
            records.push(r);
        }
    }
    for (_, ep) in &eps {
        if let Endpoint::Link(l) = ep {
            l.close("benchmark done").await;
        }
    }
    records.sort_by_key(|r| transports.iter().position(|t| r.transport.starts_with(t.as_str())).unwrap_or(usize::MAX));
    print_table(&records);
    if let Some(p) = &args.json {
        write_out(p, &(serde_json::to_string_pretty(&records)? + "\n"))?;
    }
    if let Some(p) = &args.csv {
        write_out(p, &to_csv(&records))?;
    }
    if let Some(p) = &args.svg {
        std::fs::write(p, to_svg(&records)).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn write_out(p: &PathBuf, s: &str) -> anyhow::Result<()> {
    if p.as_os_str() == "-" {
        print!("{s}");
        Ok(())
    } else {
        std::fs::write(p, s).with_context(|| format!("writing {}", p.display()))
    }
}

fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

fn print_table(records: &[Record]) {
    println!(
        "{:<14} {:>8} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "transport", "size", "iters", "p50 µs", "p90 µs", "p99 µs", "max µs", "MB/s", "cpu µs", "p50/raw"
    );
    for r in records {
        let raw = records.iter().find(|x| x.transport == "raw-tcp" && x.size_bytes == r.size_bytes);
        let ratio = raw.map(|x| format!("{:.2}x", r.rtt_p50_us / x.rtt_p50_us)).unwrap_or_default();
        println!(
            "{:<14} {:>8} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8.2} {:>8}",
            r.transport,
            human(r.size_bytes),
            r.iterations,
            r.rtt_p50_us,
            r.rtt_p90_us,
            r.rtt_p99_us,
            r.rtt_max_us,
            r.throughput_mb_s,
            r.cpu_us_per_msg,
            ratio
        );
    }
}

fn to_csv(records: &[Record]) -> String {
    let mut s = String::from(
        "transport,size_bytes,iterations,rtt_p50_us,rtt_p90_us,rtt_p99_us,rtt_max_us,throughput_mb_s,cpu_us_per_msg\n",
    );
    for r in records {
        s += &format!(
            "{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3}\n",
            r.transport, r.size_bytes, r.iterations, r.rtt_p50_us, r.rtt_p90_us, r.rtt_p99_us, r.rtt_max_us, r.throughput_mb_s, r.cpu_us_per_msg
        );
    }
    s
}

/// RTT p50 against size, both axes logarithmic, one line per transport.
fn to_svg(records: &[Record]) -> String {
    let (w, h, m) = (720.0, 440.0, 60.0);
    let pos = |v: f64, lo: f64, hi: f64| (v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln()).max(1e-9);
    let (smin, smax) = records.iter().fold((f64::MAX, 1.0f64), |(a, b), r| (a.min(r.size_bytes as f64), b.max(r.size_bytes as f64)));
    let (lmin, lmax) = records.iter().fold((f64::MAX, 1.0f64), |(a, b), r| (a.min(r.rtt_p50_us), b.max(r.rtt_p50_us)));
    let (lmin, lmax) = (lmin.min(lmax) * 0.8, lmax * 1.25);
    let x = |s: f64| m + pos(s, smin.max(1.0), smax.max(2.0)) * (w - 2.0 * m);
    let y = |l: f64| h - m - pos(l, lmin.max(0.1), lmax) * (h - 2.0 * m);
    let colours = ["#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">baton transport: RTT p50 vs frame size (log-log)</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n",
        w / 2.0, h - m, w - m, h - m, h - m
    );
    let mut sizes: Vec<usize> = records.iter().map(|r| r.size_bytes).collect();
    sizes.sort();
    sizes.dedup();
    for s in &sizes {
        svg += &format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", x(*s as f64), h - m + 18.0, human(*s));
    }
    let mut tick = 1.0;
    while tick <= lmax {
        if tick >= lmin {
            svg += &format!("<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{tick} µs</text>\n", m - 6.0, y(tick) + 4.0);
        }
        tick *= 10.0;
    }
    let mut names: Vec<&str> = records.iter().map(|r| r.transport.as_str()).collect();
    names.dedup();
    for (i, n) in names.iter().enumerate() {
        let c = colours[i % colours.len()];
        let pts: Vec<String> =
            records.iter().filter(|r| r.transport == *n).map(|r| format!("{:.1},{:.1}", x(r.size_bytes as f64), y(r.rtt_p50_us))).collect();
        svg += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n", pts.join(" "));
        svg += &format!("<text x=\"{}\" y=\"{}\" fill=\"{c}\">{n}</text>\n", m + 10.0, m + 16.0 * i as f64);
    }
    svg + "</svg>\n"
}
