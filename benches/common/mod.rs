//! Helpers shared by the benchmark drivers (`benches/*.rs`, `harness = false`): child processes, summaries of
//! repeated measurements, `/proc` sampling, and a gRPC codec that moves raw bytes (the floor of a unary call).
//!
//! Every driver reports each figure next to a baseline measured in the same run, as a ratio, because the machine
//! is shared and absolute timings drift; see BENCHMARKS.md.
#![allow(dead_code)] // each driver uses a different subset

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::Uri;
use tonic::Status;
use vcpu_balancer::controller::transport::H2Channel;

/// How long a freshly spawned server may take to listen before the driver gives up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Kernel clock ticks per second for `/proc/PID/stat` times (`sysconf(_SC_CLK_TCK)` is 100 on Linux).
pub const CLK_TCK: f64 = 100.0;

/// A child process that is killed when dropped, so a failing driver never leaves servers behind.
pub struct ChildGuard {
    pub child: Child,
    pub what: String,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command, what: &str) -> anyhow::Result<ChildGuard> {
        let child = cmd.stdin(Stdio::null()).spawn().with_context(|| format!("cannot start {what}"))?;
        Ok(ChildGuard { child, what: what.to_string() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts TCP connections (the server bound every port before it serves any).
    pub fn wait_listening(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("{} exited before listening on {addr}: {st}", self.what);
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("{} did not listen on {addr} within {READY_TIMEOUT:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Median, minimum and maximum of a set of measurements.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn summarize(xs: &[f64]) -> Summary {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return Summary { median: f64::NAN, min: f64::NAN, max: f64::NAN, n };
    }
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Summary { median, min: v[0], max: v[n - 1], n }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} [{:.3}–{:.3}]", self.median, self.min, self.max)
    }
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`.
pub fn proc_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: fields are counted after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at indexes 11 and 12.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / CLK_TCK)
}

/// On-CPU time of each live thread of a process, in ns (`/proc/PID/task/TID/schedstat`, first field): far finer than
/// the 10 ms ticks of `/proc/PID/stat`, which a light process may not even reach in a minute.
pub fn proc_thread_cpu_ns(pid: u32) -> anyhow::Result<std::collections::HashMap<u32, u64>> {
    let mut out = std::collections::HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        // A thread may exit between listing and reading: it is skipped.
        let Ok(s) = std::fs::read_to_string(entry.path().join("schedstat")) else { continue };
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            out.insert(tid, ns);
        }
    }
    Ok(out)
}

/// CPU seconds the threads of `after` used since `before`: threads alive at both ends count their difference, new
/// threads all of their time. A thread that exited inside the window loses its time (tokio's blocking threads live
/// 10 s after their last task, so at one round per second they stay alive).
pub fn thread_cpu_delta_s(
    before: &std::collections::HashMap<u32, u64>,
    after: &std::collections::HashMap<u32, u64>,
) -> f64 {
    let ns: u64 = after.iter().map(|(tid, &t)| t.saturating_sub(before.get(tid).copied().unwrap_or(0))).sum();
    ns as f64 / 1e9
}

/// A `kB` field of `/proc/PID/status` (e.g. `VmRSS`, `VmHWM`), in KiB. `pid` "self" reads this process.
pub fn proc_status_kib(pid: &str, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no {field} in /proc/{pid}/status")
}

/// A scratch directory removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("vcb-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A balanced, fully pinned simulated host: `domains` domains of `vcpus_per_domain` vCPUs, domain `i` pinned to
/// pCPU `i % pcpus`, equal loads. Every round after the baseline is exactly one `GetStats` and no `ApplyPins`
/// (the policy sees no spread and every vCPU is already pinned where it runs), so a round is comparable with one
/// bare unary call.
pub fn balanced_scenario(pcpus: u32, domains: u32, vcpus_per_domain: u32, load: u32) -> String {
    let mut s = format!("# generated by the benchmark drivers\npcpus = {pcpus}\nhostname = \"bench\"\n");
    for i in 0..domains {
        s.push_str(&format!(
            "\n[[domain]]\nname = \"vm{i:03}\"\nvcpus = {vcpus_per_domain}\naffinity = [{}]\nload = {load}\n",
            i % pcpus
        ));
    }
    s
}

/// A codec that sends and receives message bytes as they are: the floor of a tonic unary call carrying given bytes
/// (no prost encoding or decoding on either side).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The gRPC path of `GetStats`.
pub const GET_STATS_PATH: &str = "/vcpu.v1.Agent/GetStats";

/// One `GetStats` call with the raw codec: the reply's message bytes, exactly as the agent encoded them.
pub async fn raw_get_stats<T>(channel: T, origin: tonic::codegen::http::Uri, timeout: Duration) -> Result<Bytes, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::with_origin(channel, origin);
    grpc.ready().await.map_err(|e| Status::unavailable(e.into().to_string()))?;
    let mut req = tonic::Request::new(Bytes::new());
    req.set_timeout(timeout);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(GET_STATS_PATH);
    Ok(grpc.unary(req, path, RawCodec).await?.into_inner())
}

/// The controller's own transport to `addr` (as `AgentClient` dials it), and the origin to call it with.
pub fn own_channel(addr: SocketAddr, timeout: Duration) -> anyhow::Result<(H2Channel, Uri)> {
    let uri: Uri = format!("http://{addr}").parse()?;
    let auth = uri.authority().context("no authority")?.clone();
    let ch = H2Channel::new(&auth, None, timeout).map_err(anyhow::Error::msg)?;
    Ok((ch, uri))
}

/// Starts [`fixed_reply_server`] (the calling driver re-executed with `VCB_ROLE=floor-server`, which its `main`
/// must dispatch) on `n` ports from `base`, answering with `reply`, and waits until the last port listens.
pub fn spawn_fixed_reply_server(reply: &[u8], dir: &TempDir, base: u16, n: usize) -> anyhow::Result<ChildGuard> {
    let path = dir.path().join("reply.bin");
    std::fs::write(&path, reply)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env("VCB_ROLE", "floor-server")
        .env("VCB_FLOOR_REPLY", &path)
        .env("VCB_HOSTS", n.to_string())
        .env("VCB_BASE", base.to_string());
    let mut server = ChildGuard::spawn(cmd, "fixed-reply server")?;
    server.wait_listening(*local_addrs(base, n).last().context("at least one port")?)?;
    Ok(server)
}

/// `n` consecutive ports of 127.0.0.1 from `base`.
pub fn local_addrs(base: u16, n: usize) -> Vec<SocketAddr> {
    (0..n).map(|i| SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, base + i as u16))).collect()
}

/// Answers every `GetStats` with the same pre-encoded bytes.
#[derive(Clone)]
struct FixedReplyService {
    reply: Bytes,
}

impl tonic::server::NamedService for FixedReplyService {
    const NAME: &'static str = "vcpu.v1.Agent";
}

struct FixedReply(Bytes);

impl tonic::server::UnaryService<Bytes> for FixedReply {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, tonic::Status>>;

    fn call(&mut self, _req: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(self.0.clone())))
    }
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for FixedReplyService {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let reply = self.reply.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(FixedReply(reply), req).await)
        })
    }
}

/// The floor server of a bare unary call (run by a driver re-executed with `VCB_ROLE=floor-server`): on `VCB_HOSTS`
/// consecutive ports from `VCB_BASE` it answers every `GetStats` with the message bytes in the file
/// `VCB_FLOOR_REPLY`, pre-encoded, so that a call to it costs the transport and nothing else.
pub async fn fixed_reply_server() -> anyhow::Result<()> {
    let reply = Bytes::from(std::fs::read(std::env::var("VCB_FLOOR_REPLY")?)?);
    let n: usize = std::env::var("VCB_HOSTS")?.parse()?;
    let base: u16 = std::env::var("VCB_BASE")?.parse()?;
    let mut listeners = Vec::with_capacity(n);
    for a in local_addrs(base, n) {
        listeners.push(tokio::net::TcpListener::bind(a).await.with_context(|| format!("floor server: bind {a}"))?);
    }
    let mut servers = tokio::task::JoinSet::new();
    for l in listeners {
        let svc = FixedReplyService { reply: reply.clone() };
        // The floor is the best a bare tonic server does: Nagle off on accepted sockets, as the client has it.
        let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(l), |s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        });
        servers.spawn(async move {
            tonic::transport::Server::builder()
                .timeout(vcpu_balancer::agent::SERVER_REQUEST_TIMEOUT)
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
        });
    }
    while let Some(r) = servers.join_next().await {
        r??;
    }
    Ok(())
}
