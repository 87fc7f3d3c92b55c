//! The production backend: a [`Hypervisor`] over libvirt (QEMU/KVM in production, `test:///default` in tests).
//!
//! libvirt calls block, so every call runs on tokio's blocking pool, never on the async runtime. Per-domain reads of
//! a stats sample are spread over a few blocking tasks: a libvirt connection is thread-safe.
//!
//! The connection is opened lazily and cached. A call finds it dead (`virConnectIsAlive`) or fails with a
//! connection-class error: the cache is dropped and the next call opens a new one, so the agent outlives a libvirtd
//! restart without being restarted itself. Until libvirt answers again every call returns
//! [`AgentError::Unavailable`]. A process-wide libvirt event loop runs on its own thread so that remote connections
//! get keepalive and notice a dead daemon by themselves.
//!
//! A daemon can also hang without dying (stopped, or stuck): libvirt then blocks a call for as long as it lasts, with
//! no timeout of its own. So every call is bounded by a deadline ([`LIBVIRT_CALL_DEADLINE`], `--libvirt-timeout`)
//! and answers UNAVAILABLE when it passes, and only one thread at a time opens a connection: while that open hangs,
//! the other calls wait for it no longer than the deadline and then give their blocking thread back, instead of
//! queuing behind it for as long as the hang lasts. A call past its deadline still holds its thread until libvirt
//! answers (or its keepalive gives up on the connection); while one does, new calls are not sent at all and answer
//! UNAVAILABLE at once, so a hung daemon holds one blocking thread, not one more per round and RPC.
//!
//! Pins are applied live (`VIR_DOMAIN_AFFECT_LIVE`, plus `CONFIG` when asked to persist and the domain is
//! persistent). Drivers that only accept `flags = 0` (the test driver) fall back to `virDomainPinVcpu`.

mod ffi;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};
use virt::sys;

use self::ffi::{NodeCpuMap, OwnedConnect};
use crate::error::{AgentError, ErrorKind};
// The deadline is this backend's; its default lives beside the trait so that the agent's flag also builds without
// libvirt.
pub use crate::hypervisor::{LIBVIRT_CALL_DEADLINE, MIN_LIBVIRT_CALL_DEADLINE};
use crate::hypervisor::{batch_verdict, validate_pin, Hypervisor, PinResults, VcpuNumbers};
use crate::model::{
    format_cpu_list, DomainPlacement, DomainStats, DomainSummary, HostInfo, HostStats, PcpuId, PinRequest,
    VcpuPlacement, VcpuStats,
};

/// Keepalive for remote connections: a daemon that stops answering is declared dead after about
/// `INTERVAL * (COUNT + 1)` seconds instead of blocking calls forever.
const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// At most this many blocking tasks read domains in parallel for one sample: enough to overlap RPC round trips, and
/// below libvirtd's default `max_client_requests` (5 concurrent calls per client), so reads do not queue in the
/// daemon.
pub const MAX_PARALLEL_READS: usize = 4;

/// Bounds `fut` by `deadline`. The blocking work under it cannot be interrupted: past the deadline it finishes in the
/// background.
async fn with_deadline<T>(
    deadline: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, AgentError>>,
) -> Result<T, AgentError> {
    tokio::time::timeout(deadline, fut).await.unwrap_or_else(|_| {
        Err(AgentError::Unavailable(format!("libvirt did not answer {what} within {deadline:?}")))
    })
}

/// Where one call's blocking work stands, for [`Inner::overdue`].
const RUNNING: u8 = 0;
const OVERDUE: u8 = 1;
const DONE: u8 = 2;

/// One call's blocking work, held by every thread that does part of it: the last one to finish (or unwind) drops it,
/// which ends the call. A call that passed its deadline first stops counting as overdue then.
#[derive(Debug)]
struct Running {
    inner: Arc<Inner>,
    state: Arc<std::sync::atomic::AtomicU8>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.state.swap(DONE, Ordering::AcqRel) == OVERDUE {
            self.inner.overdue.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// How a [`LibvirtHypervisor`] reads and waits.
#[derive(Debug, Clone, Copy)]
pub struct LibvirtOptions {
    /// A stats sample reads domains on at most this many blocking tasks (1 = sequentially).
    pub parallel_reads: usize,
    /// Deadline of every backend call.
    pub call_deadline: Duration,
}

impl Default for LibvirtOptions {
    fn default() -> Self {
        LibvirtOptions { parallel_reads: MAX_PARALLEL_READS, call_deadline: LIBVIRT_CALL_DEADLINE }
    }
}

/// Deals `items` into at most `n` chunks (at least one), round robin: one chunk per blocking task.
fn round_robin<T>(items: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let nchunks = items.len().clamp(1, n.max(1));
    let mut chunks: Vec<Vec<T>> = (0..nchunks).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        chunks[i % nchunks].push(item);
    }
    chunks
}

/// A [`Hypervisor`] backed by libvirt.
///
/// Cloning is cheap and clones share the connection.
#[derive(Debug, Clone)]
pub struct LibvirtHypervisor {
    inner: Arc<Inner>,
    /// The host's boot id, read once: the agent restarts with its host. Empty for a URI of another machine.
    boot_id: String,
}

impl LibvirtHypervisor {
    /// A backend for the libvirt URI `uri` (e.g. `qemu:///system`). It does not connect yet and never fails: the
    /// first call connects, and calls return [`AgentError::Unavailable`] while libvirt cannot be reached.
    pub fn new(uri: &str) -> LibvirtHypervisor {
        Self::with_parallel_reads(uri, MAX_PARALLEL_READS)
    }

    /// Like [`new`](Self::new), but a stats sample reads domains on at most `parallel_reads` blocking tasks (1 =
    /// sequentially). The agent always uses [`MAX_PARALLEL_READS`]; other values exist so that sequential and
    /// parallel reads can be measured side by side (`benches/agent_libvirt.rs`).
    pub fn with_parallel_reads(uri: &str, parallel_reads: usize) -> LibvirtHypervisor {
        Self::with_options(uri, LibvirtOptions { parallel_reads, ..LibvirtOptions::default() })
    }

    /// Like [`new`](Self::new), with `options` (a zero deadline or parallelism counts as the least allowed).
    pub fn with_options(uri: &str, options: LibvirtOptions) -> LibvirtHypervisor {
        init_process_state();
        LibvirtHypervisor {
            boot_id: if is_local_uri(uri) { read_boot_id() } else { String::new() },
            inner: Arc::new(Inner {
                uri: uri.to_string(),
                conn: Mutex::new(ConnSlot { conn: None, opening: false }),
                opened: Condvar::new(),
                down: AtomicBool::new(false),
                parallel_reads: options.parallel_reads.max(1),
                deadline: options.call_deadline.max(MIN_LIBVIRT_CALL_DEADLINE),
                overdue: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// The deadline of every call.
    pub fn call_deadline(&self) -> Duration {
        self.inner.deadline
    }

    /// The URI this backend connects to.
    pub fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// Runs `f` on the calling thread with this backend's connection, opening it if needed. This blocks: call it
    /// from a blocking context. It is meant for tools and tests that need calls the trait does not offer (e.g.
    /// defining a domain on a `test:///default` connection, whose state lives as long as the connection).
    pub fn with_connect<R>(&self, f: impl FnOnce(&Connect) -> R) -> Result<R, AgentError> {
        let conn = self.inner.connection()?;
        Ok(f(&conn))
    }

    /// Runs `f` on the blocking pool with the shared state; `what` names it in the deadline's error.
    async fn blocking<T, F>(&self, what: &str, f: F) -> Result<T, AgentError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, AgentError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        self.call(what, |running| async move {
            tokio::task::spawn_blocking(move || {
                let _running = running;
                f(&inner)
            })
            .await
            .map_err(join_error)?
        })
        .await
    }

    /// One call under the deadline: refused at once while an earlier call is overdue ([`Inner::start_call`]);
    /// `work` gets the call's [`Running`], for every blocking thread that does part of it to hold. Past the
    /// deadline the call counts as overdue until its blocking work ends.
    async fn call<T, Fut>(&self, what: &str, work: impl FnOnce(Running) -> Fut) -> Result<T, AgentError>
    where
        Fut: std::future::Future<Output = Result<T, AgentError>>,
    {
        let running = Inner::start_call(&self.inner)?;
        let state = Arc::clone(&running.state);
        let r = with_deadline(self.inner.deadline, what, work(running)).await;
        if r.is_err() && state.compare_exchange(RUNNING, OVERDUE, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.inner.overdue.fetch_add(1, Ordering::AcqRel);
        }
        r
    }

    async fn sample(&self, running: Running) -> Result<HostStats, AgentError> {
        // The thread that lists the domains reads the first chunk itself and hands only the others to more blocking
        // tasks: every hand-over between threads costs a wake-up, which on an idle host is a large part of a small
        // sample (one hop fewer per sample; a host with one domain reads it all on one thread).
        let inner = Arc::clone(&self.inner);
        let running = Arc::new(running);
        let (node, listed_ns, first, rest) = tokio::task::spawn_blocking(move || {
            let (conn, node, domains) = inner.running_domains()?;
            let listed_ns = monotonic_ns();
            let mut chunks = round_robin(domains, inner.parallel_reads).into_iter();
            let first = chunks.next().unwrap_or_default();
            let rest: Vec<_> = chunks
                .map(|chunk| {
                    let (inner, conn, node) = (Arc::clone(&inner), Arc::clone(&conn), node.clone());
                    let running = Arc::clone(&running);
                    tokio::task::spawn_blocking(move || {
                        let _running = running;
                        read_chunk(&inner, &conn, &chunk, &node)
                    })
                })
                .collect();
            let first = read_chunk(&inner, &conn, &first, &node);
            Ok::<_, AgentError>((node, listed_ns, first, rest))
        })
        .await
        .map_err(join_error)??;
        let mut sample_time_ns = listed_ns;
        let mut out = Vec::new();
        let rest = futures::future::join_all(rest).await;
        for read in std::iter::once(Ok(first)).chain(rest) {
            let (read, read_ns) = read.map_err(join_error)?;
            sample_time_ns = sample_time_ns.max(read_ns);
            for r in read {
                if let Some(d) = keep_or_skip(r)? {
                    out.push(d);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(HostStats {
            sample_time_ns,
            npcpus: node.npcpus,
            online_pcpus: node.online,
            agent_instance: String::new(),
            boot_id: String::new(),
            domains: out,
        })
    }
}

/// Reads the stats of `chunk`'s domains, with the instant the reads ended: the sample instant is when the vCPU times
/// were read, not when the async side gets to run.
fn read_chunk(
    inner: &Inner,
    conn: &Arc<OwnedConnect>,
    chunk: &[Domain],
    node: &NodeCpuMap,
) -> (Vec<Result<DomainStats, AgentError>>, u64) {
    let read: Vec<_> = chunk.iter().map(|dom| inner.domain_stats(conn, dom, node)).collect();
    (read, monotonic_ns())
}

impl LibvirtHypervisor {
    /// A sample read the other way: one bulk `virConnectGetAllDomainStats(VCPU | CPU_TOTAL)` call for the times,
    /// then, when `placement` is set, one `virDomainGetVcpus` per domain (spread like [`Hypervisor::stats`]) for
    /// what bulk stats do not report: the pCPU each vCPU runs on and its affinity. Without `placement` every vCPU
    /// reports pCPU 0 and no affinity: that is the cost of the bulk call alone, not a usable sample.
    ///
    /// The agent does not use this: it exists so that bulk and per-domain reads can be measured side by side on
    /// the same host (`benches/agent_libvirt.rs`, BENCHMARKS.md).
    pub async fn stats_bulk(&self, placement: bool) -> Result<HostStats, AgentError> {
        with_deadline(self.inner.deadline, "a bulk stats sample", self.sample_bulk(placement)).await
    }

    async fn sample_bulk(&self, placement: bool) -> Result<HostStats, AgentError> {
        let (conn, node, records) = self
            .blocking("a bulk stats sample", |inner| {
                let conn = inner.connection()?;
                let host = |name| Call { name, domain: None, vcpu: None };
                let node =
                    ffi::node_cpu_map(&conn).map_err(|e| inner.fail(&conn, None, host("virNodeGetCPUMap"), e))?;
                let stats = sys::VIR_DOMAIN_STATS_VCPU | sys::VIR_DOMAIN_STATS_CPU_TOTAL;
                let flags = sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_RUNNING;
                let records = ffi::all_domain_stats(&conn, stats, flags)
                    .map_err(|e| inner.fail(&conn, None, host("virConnectGetAllDomainStats"), e))?;
                Ok((conn, node, records))
            })
            .await?;
        let read_ns = monotonic_ns();
        let tasks = round_robin(records, self.inner.parallel_reads).into_iter().map(|chunk| {
            let inner = Arc::clone(&self.inner);
            let conn = Arc::clone(&conn);
            let node = node.clone();
            tokio::task::spawn_blocking(move || {
                chunk.iter().map(|rec| inner.domain_stats_bulk(&conn, rec, &node, placement)).collect::<Vec<_>>()
            })
        });
        let mut out = Vec::new();
        for joined in futures::future::join_all(tasks).await {
            for r in joined.map_err(join_error)? {
                if let Some(d) = keep_or_skip(r)? {
                    out.push(d);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(HostStats {
            sample_time_ns: read_ns,
            npcpus: node.npcpus,
            online_pcpus: node.online,
            agent_instance: String::new(),
            boot_id: String::new(),
            domains: out,
        })
    }
}

#[async_trait]
impl Hypervisor for LibvirtHypervisor {
    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        self.blocking("a call", Inner::host_info).await
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>, AgentError> {
        self.blocking("a call", Inner::list_domains).await
    }

    async fn stats(&self) -> Result<HostStats, AgentError> {
        let mut s = self.call("a stats sample", |running| self.sample(running)).await?;
        s.boot_id.clone_from(&self.boot_id);
        Ok(s)
    }

    async fn placement(&self, domain: &str) -> Result<DomainPlacement, AgentError> {
        let key = domain.to_string();
        self.blocking("a call", move |inner| inner.placement(&key)).await
    }

    async fn apply_pins(&self, pins: &[PinRequest]) -> Result<PinResults, AgentError> {
        if pins.is_empty() {
            return Ok(Vec::new());
        }
        let pins = pins.to_vec();
        // libvirt cannot take back a call it was sent: a batch past its deadline goes on in the background, so the
        // caller must not read the error as "nothing changed".
        self.blocking(crate::hypervisor::LATE_PIN_BATCH, move |inner| inner.apply_pins(&pins)).await
    }
}

/// State shared by all clones and all blocking tasks.
#[derive(Debug)]
struct Inner {
    uri: String,
    /// The cached connection, and whether one is being opened.
    conn: Mutex<ConnSlot>,
    /// Signalled when an open ends, well or not.
    opened: Condvar,
    /// Whether the last connection attempt failed: only changes are logged at warn, so a dead daemon does not flood
    /// the log with one warning per round.
    down: AtomicBool,
    /// Most blocking tasks reading domains for one sample.
    parallel_reads: usize,
    /// Deadline of every call; also how long a call waits for another thread's open.
    deadline: Duration,
    /// Calls past their deadline whose blocking work has not ended: while there is one, no new call is sent.
    overdue: std::sync::atomic::AtomicUsize,
}

/// The connection cache. Tasks hold their own `Arc`, so dropping the cache never closes a connection under a running
/// call.
#[derive(Debug)]
struct ConnSlot {
    conn: Option<Arc<OwnedConnect>>,
    /// A thread is opening a connection (outside the lock: an open can hang as long as the daemon does).
    opening: bool,
}

/// Clears [`ConnSlot::opening`] if the thread that set it unwinds before it could: otherwise every later call would
/// wait for an open that is no longer running.
struct OpenGuard<'a> {
    inner: &'a Inner,
    armed: bool,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.conn.lock().unwrap_or_else(PoisonError::into_inner).opening = false;
            self.inner.opened.notify_all();
        }
    }
}

/// A domain resolved for pinning.
struct PinTarget {
    dom: Domain,
    /// The running vCPUs' numbers, as `virDomainGetVcpus` gives them (with gaps after a hot-unplug).
    vcpus: Vec<u32>,
    /// Whether it has a config a pin can be persisted in (asked only when a pin wants it).
    persistent: bool,
}

impl Inner {
    /// Starts a call, or refuses it while an earlier one is past its deadline and still waiting for libvirt: libvirt
    /// cannot interrupt a call, so each call sent to a daemon that hangs holds a blocking thread for as long as the
    /// hang lasts, and one every round of every controller would pile up.
    fn start_call(inner: &Arc<Inner>) -> Result<Running, AgentError> {
        if inner.overdue.load(Ordering::Acquire) > 0 {
            return Err(AgentError::Unavailable(format!(
                "libvirt at {} did not answer an earlier call within {:?} and it is still waiting: no new call is sent \
                 until libvirt answers it",
                inner.uri, inner.deadline
            )));
        }
        Ok(Running { inner: Arc::clone(inner), state: Arc::new(std::sync::atomic::AtomicU8::new(RUNNING)) })
    }

    /// The live cached connection, or a new one.
    ///
    /// One thread opens at a time. Others wait for its result, but no longer than the deadline: an open to a daemon
    /// that accepts and never answers blocks its thread for as long as that lasts, and callers queued behind it would
    /// each hold a blocking thread just as long.
    fn connection(&self) -> Result<Arc<OwnedConnect>, AgentError> {
        let waiting_since = Instant::now();
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(conn) = slot.conn.as_ref() {
                if conn.is_alive().unwrap_or(false) {
                    return Ok(Arc::clone(conn));
                }
                tracing::warn!(uri = %self.uri, "libvirt connection is dead; reconnecting");
                slot.conn = None;
            }
            if !slot.opening {
                break;
            }
            let Some(left) = self.deadline.checked_sub(waiting_since.elapsed()).filter(|d| !d.is_zero()) else {
                return Err(AgentError::Unavailable(format!(
                    "a connection to libvirt at {} is still being opened after {:?}: the daemon does not answer",
                    self.uri, self.deadline
                )));
            };
            slot = self.opened.wait_timeout(slot, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        slot.opening = true;
        drop(slot);
        let mut guard = OpenGuard { inner: self, armed: true };
        let opened = OwnedConnect::open(&self.uri).inspect(|conn| {
            // Keepalive is a remote-driver feature; local drivers (test:///) refuse it, which is harmless.
            if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
                tracing::debug!(uri = %self.uri, error = %e, "libvirt keepalive not enabled");
            }
        });
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        slot.opening = false;
        guard.armed = false;
        self.opened.notify_all();
        match opened {
            Ok(conn) => {
                self.down.store(false, Ordering::Relaxed);
                tracing::info!(uri = %self.uri, "connected to libvirt");
                let conn = Arc::new(conn);
                slot.conn = Some(Arc::clone(&conn));
                Ok(conn)
            }
            Err(e) => {
                if self.down.swap(true, Ordering::Relaxed) {
                    tracing::debug!(uri = %self.uri, error = %e, "libvirt still unreachable");
                } else {
                    tracing::warn!(uri = %self.uri, error = %e, "cannot connect to libvirt");
                }
                Err(AgentError::Unavailable(format!("cannot connect to libvirt at {}: {}", self.uri, e.message())))
            }
        }
    }

    /// Forgets `conn` if it is still the cached one, so the next call reconnects.
    fn invalidate(&self, conn: &Arc<OwnedConnect>) {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.conn.as_ref().is_some_and(|cached| Arc::ptr_eq(cached, conn)) {
            slot.conn = None;
        }
    }

    /// Maps a failed libvirt call to the agent's error. Connection failures also drop the cached connection.
    fn fail(&self, conn: &Arc<OwnedConnect>, dom: Option<&Domain>, call: Call<'_>, e: VirtError) -> AgentError {
        // Asking after the failure also catches connection losses reported with unusual codes.
        if is_connection_error(&e) || !conn.is_alive().unwrap_or(false) {
            self.invalidate(conn);
            tracing::warn!(uri = %self.uri, call = call.name, error = %e, "libvirt connection failed; will reconnect");
            return AgentError::Unavailable(format!("{call}: {e}"));
        }
        let stopped = || dom.filter(|d| d.is_active().ok() == Some(false)).map(state_of);
        classify_failure(call, e.code().known(), &e.to_string(), stopped)
    }

    fn host_info(&self) -> Result<HostInfo, AgentError> {
        let conn = self.connection()?;
        let host = |name| Call { name, domain: None, vcpu: None };
        let hostname = conn.hostname().map_err(|e| self.fail(&conn, None, host("virConnectGetHostname"), e))?;
        let driver = conn.driver_type().map_err(|e| self.fail(&conn, None, host("virConnectGetType"), e))?;
        let hv = conn.hyp_version().map_err(|e| self.fail(&conn, None, host("virConnectGetVersion"), e))?;
        let lib = conn.lib_version().map_err(|e| self.fail(&conn, None, host("virConnectGetLibVersion"), e))?;
        let node = ffi::node_cpu_map(&conn).map_err(|e| self.fail(&conn, None, host("virNodeGetCPUMap"), e))?;
        Ok(HostInfo {
            hostname,
            backend: "libvirt".to_string(),
            hypervisor_version: format!("{driver} {}", format_version(hv)),
            library_version: format!("libvirt {}", format_version(lib)),
            npcpus: node.npcpus,
            online_pcpus: node.online,
            agent_version: crate::VERSION.to_string(),
        })
    }

    /// The connection, the host's pCPUs and the active, running domains.
    fn running_domains(&self) -> Result<(Arc<OwnedConnect>, NodeCpuMap, Vec<Domain>), AgentError> {
        let conn = self.connection()?;
        let host = |name| Call { name, domain: None, vcpu: None };
        let node = ffi::node_cpu_map(&conn).map_err(|e| self.fail(&conn, None, host("virNodeGetCPUMap"), e))?;
        let flags = sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE | sys::VIR_CONNECT_LIST_DOMAINS_RUNNING;
        let domains =
            conn.list_all_domains(flags).map_err(|e| self.fail(&conn, None, host("virConnectListAllDomains"), e))?;
        Ok((conn, node, domains))
    }

    fn list_domains(&self) -> Result<Vec<DomainSummary>, AgentError> {
        let (conn, _, domains) = self.running_domains()?;
        let mut out = Vec::with_capacity(domains.len());
        for dom in &domains {
            if let Some(s) = keep_or_skip(self.domain_summary(&conn, dom))? {
                out.push(s);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn domain_summary(&self, conn: &Arc<OwnedConnect>, dom: &Domain) -> Result<DomainSummary, AgentError> {
        let (name, uuid) = self.identity(conn, dom)?;
        let call = |c| Call { name: c, domain: Some(&name), vcpu: None };
        let Some(id) = dom.id() else { return Err(not_running(&name, dom)) };
        let info = dom.info().map_err(|e| self.fail(conn, Some(dom), call("virDomainGetInfo"), e))?;
        let state = state_name(info.state.known());
        Ok(DomainSummary { name, uuid, id, vcpus: info.nr_virt_cpu, state })
    }

    /// Name and UUID string of a domain handle.
    fn identity(&self, conn: &Arc<OwnedConnect>, dom: &Domain) -> Result<(String, String), AgentError> {
        let call = |c| Call { name: c, domain: None, vcpu: None };
        let name = dom.name().map_err(|e| self.fail(conn, Some(dom), call("virDomainGetName"), e))?;
        let uuid = dom.uuid_string().map_err(|e| {
            self.fail(conn, Some(dom), Call { name: "virDomainGetUUIDString", domain: Some(&name), vcpu: None }, e)
        })?;
        Ok((name, uuid))
    }

    /// One domain of a stats sample.
    fn domain_stats(
        &self,
        conn: &Arc<OwnedConnect>,
        dom: &Domain,
        node: &NodeCpuMap,
    ) -> Result<DomainStats, AgentError> {
        let (name, uuid) = self.identity(conn, dom)?;
        let call = |c| Call { name: c, domain: Some(&name), vcpu: None };
        let Some(id) = dom.id() else { return Err(not_running(&name, dom)) };
        // virDomainGetInfo gives both the vCPU count that virDomainGetVcpus needs and the domain's CPU time (for
        // QEMU the same cgroup counter that virDomainGetCPUStats reads), so two calls per domain do: a third fewer
        // round trips to libvirtd than with virDomainGetCPUStats as well (BENCHMARKS.md, "Agent cost").
        let info = dom.info().map_err(|e| self.fail(conn, Some(dom), call("virDomainGetInfo"), e))?;
        let cpu_time_ns = info.cpu_time;
        let vcpus = ffi::domain_vcpus(dom, info.nr_virt_cpu, node.npcpus)
            .map_err(|e| self.fail(conn, Some(dom), call("virDomainGetVcpus"), e))?
            .into_iter()
            .map(|v| VcpuStats {
                index: v.number,
                time_ns: v.cpu_time_ns,
                pcpu: current_pcpu(&name, &v, node.npcpus),
                affinity: v.affinity,
            })
            .collect();
        Ok(DomainStats { uuid, name, id, cpu_time_ns, vcpus })
    }

    /// One domain of a bulk sample (see [`LibvirtHypervisor::stats_bulk`]).
    fn domain_stats_bulk(
        &self,
        conn: &Arc<OwnedConnect>,
        rec: &ffi::DomainStatsRecord,
        node: &NodeCpuMap,
        placement: bool,
    ) -> Result<DomainStats, AgentError> {
        let dom = &rec.dom;
        let (name, uuid) = self.identity(conn, dom)?;
        let Some(id) = dom.id() else { return Err(not_running(&name, dom)) };
        let cpu_time_ns = rec.get("cpu.time").unwrap_or(0);
        let vcpus = if placement {
            let n = rec.get("vcpu.current").and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
            let call = Call { name: "virDomainGetVcpus", domain: Some(&name), vcpu: None };
            ffi::domain_vcpus(dom, n, node.npcpus)
                .map_err(|e| self.fail(conn, Some(dom), call, e))?
                .into_iter()
                .map(|v| VcpuStats {
                    index: v.number,
                    time_ns: v.cpu_time_ns,
                    pcpu: current_pcpu(&name, &v, node.npcpus),
                    affinity: v.affinity,
                })
                .collect()
        } else {
            let n = rec.get("vcpu.maximum").unwrap_or(0);
            (0..n)
                .filter_map(|i| {
                    let time_ns = rec.get(&format!("vcpu.{i}.time"))?;
                    Some(VcpuStats { index: i as u32, time_ns, pcpu: 0, affinity: Vec::new() })
                })
                .collect()
        };
        Ok(DomainStats { uuid, name, id, cpu_time_ns, vcpus })
    }

    fn placement(&self, key: &str) -> Result<DomainPlacement, AgentError> {
        check_domain_key(key)?;
        let conn = self.connection()?;
        let call = |c| Call { name: c, domain: Some(key), vcpu: None };
        let dom = lookup(&conn, key).map_err(|e| self.fail(&conn, None, call("virDomainLookup"), e))?;
        let (name, uuid) = self.identity(&conn, &dom)?;
        if !dom.is_active().map_err(|e| self.fail(&conn, Some(&dom), call("virDomainIsActive"), e))? {
            return Err(not_running(key, &dom));
        }
        let info = dom.info().map_err(|e| self.fail(&conn, Some(&dom), call("virDomainGetInfo"), e))?;
        let node = ffi::node_cpu_map(&conn).map_err(|e| self.fail(&conn, None, call("virNodeGetCPUMap"), e))?;
        let mut vcpus: Vec<VcpuPlacement> = ffi::domain_vcpus(&dom, info.nr_virt_cpu, node.npcpus)
            .map_err(|e| self.fail(&conn, Some(&dom), call("virDomainGetVcpus"), e))?
            .into_iter()
            .map(|v| VcpuPlacement {
                index: v.number,
                pcpu: current_pcpu(&name, &v, node.npcpus),
                affinity: v.affinity,
            })
            .collect();
        // The affinity an operator asks about comes from the call meant for it.
        let pinned = ffi::domain_vcpu_pin_info(&dom, info.nr_virt_cpu, node.npcpus)
            .map_err(|e| self.fail(&conn, Some(&dom), call("virDomainGetVcpuPinInfo"), e))?;
        for v in &mut vcpus {
            if let Some(a) = pinned.get(v.index as usize) {
                v.affinity.clone_from(a);
            }
        }
        vcpus.sort_by_key(|v| v.index);
        Ok(DomainPlacement { name, uuid, vcpus })
    }

    /// Looks a pin's domain up and checks that it runs.
    fn resolve(&self, conn: &Arc<OwnedConnect>, key: &str, npcpus: u32, persist: bool) -> Result<PinTarget, AgentError> {
        check_domain_key(key)?;
        let call = |c| Call { name: c, domain: Some(key), vcpu: None };
        let dom = lookup(conn, key).map_err(|e| self.fail(conn, None, call("virDomainLookup"), e))?;
        if !dom.is_active().map_err(|e| self.fail(conn, Some(&dom), call("virDomainIsActive"), e))? {
            return Err(not_running(key, &dom));
        }
        let info = dom.info().map_err(|e| self.fail(conn, Some(&dom), call("virDomainGetInfo"), e))?;
        // `nr_virt_cpu` counts the online vCPUs, not the highest number: with 0 and 3 online it is 2, and vCPU 3,
        // which GetStats reports, must still be pinnable.
        let vcpus = ffi::domain_vcpus(&dom, info.nr_virt_cpu, npcpus)
            .map_err(|e| self.fail(conn, Some(&dom), call("virDomainGetVcpus"), e))?
            .iter()
            .map(|v| v.number)
            .collect();
        let persistent =
            persist && dom.is_persistent().map_err(|e| self.fail(conn, Some(&dom), call("virDomainIsPersistent"), e))?;
        Ok(PinTarget { dom, vcpus, persistent })
    }

    fn apply_pins(&self, pins: &[PinRequest]) -> Result<PinResults, AgentError> {
        let conn = self.connection()?;
        let node = ffi::node_cpu_map(&conn)
            .map_err(|e| self.fail(&conn, None, Call { name: "virNodeGetCPUMap", domain: None, vcpu: None }, e))?;

        // Validate the whole batch before touching anything; each domain is looked up once.
        let mut targets: HashMap<&str, Result<PinTarget, AgentError>> = HashMap::new();
        // Usually empty (the controller pins live only): whether a domain can persist is asked only for these.
        let persisting: HashSet<&str> = pins.iter().filter(|p| p.persist).map(|p| p.domain.as_str()).collect();
        for pin in pins {
            if !targets.contains_key(pin.domain.as_str()) {
                let persist = persisting.contains(pin.domain.as_str());
                let target = self.resolve(&conn, &pin.domain, node.npcpus, persist);
                if let Err(e) = &target {
                    // Without libvirt nothing can be validated, let alone applied.
                    if e.kind() == ErrorKind::Unavailable {
                        return Err(e.clone());
                    }
                }
                targets.insert(pin.domain.as_str(), target);
            }
        }
        let checks: Vec<Result<(), AgentError>> = pins
            .iter()
            .map(|pin| match &targets[pin.domain.as_str()] {
                // A malformed pin first (it fails the whole batch), then, before anything changes, a pin asked to
                // outlive a reboot that cannot: it is not made live either.
                Ok(t) => validate_pin(pin, &pin.domain, VcpuNumbers::Online(&t.vcpus), node.npcpus, &node.online)
                    .and_then(|()| match pin.persist && !t.persistent {
                        true => Err(AgentError::NotPersistent { domain: pin.domain.clone() }),
                        false => Ok(()),
                    }),
                // A pCPU the host lacks is malformed whatever the domain: it refuses the batch, not just this pin.
                Err(e) => crate::hypervisor::validate_pcpus(pin, &pin.domain, node.npcpus, &node.online).and(Err(e.clone())),
            })
            .collect();
        batch_verdict(&checks)?;

        let maplen = ffi::cpumap_len(node.npcpus);
        let mut lost: Option<AgentError> = None;
        let mut results = Vec::with_capacity(pins.len());
        for (pin, check) in pins.iter().zip(checks) {
            let result = match (check, &targets[pin.domain.as_str()], &lost) {
                (Err(e), _, _) => Err(e),
                // The connection died mid-batch: the rest is reported, not attempted on a dead connection.
                (Ok(()), _, Some(e)) => Err(e.clone()),
                (Ok(()), Ok(target), None) => self.pin(&conn, target, pin, maplen),
                // Unreachable (a failed lookup fails the check) but kept total.
                (Ok(()), Err(e), None) => Err(e.clone()),
            };
            if let Err(e) = &result {
                if e.kind() == ErrorKind::Unavailable {
                    lost.get_or_insert_with(|| e.clone());
                }
            }
            results.push(result);
        }
        Ok(results)
    }

    /// Applies one validated pin.
    fn pin(
        &self,
        conn: &Arc<OwnedConnect>,
        target: &PinTarget,
        pin: &PinRequest,
        maplen: usize,
    ) -> Result<(), AgentError> {
        let dom = &target.dom;
        let call = |c| Call { name: c, domain: Some(&pin.domain), vcpu: Some(pin.vcpu) };
        let map = ffi::encode_cpumap(&pin.pcpus, maplen);
        // A transient domain with `persist` was refused before the batch started.
        let persist = pin.persist && target.persistent;
        let flags = sys::VIR_DOMAIN_AFFECT_LIVE | if persist { sys::VIR_DOMAIN_AFFECT_CONFIG } else { 0 };
        let pcpus = format_cpu_list(&pin.pcpus);
        match dom.pin_vcpu_flags(pin.vcpu, &map, flags) {
            Ok(()) => {}
            // The caller asked for a pin that outlives a reboot; a live one alone would be a different promise.
            // Nothing was changed: the flags are checked before anything is done.
            Err(e) if persist && flags_unsupported(&e) => {
                return Err(AgentError::CannotPersist { domain: pin.domain.clone(), reason: e.message().to_string() })
            }
            Err(e) if flags_unsupported(&e) => {
                // Some drivers (test:///default) accept only flags = 0, which pins the running domain: same effect
                // as LIVE.
                tracing::debug!(domain = %pin.domain, vcpu = pin.vcpu, error = %e, "falling back to virDomainPinVcpu");
                dom.pin_vcpu(pin.vcpu, &map).map_err(|e| self.fail(conn, Some(dom), call("virDomainPinVcpu"), e))?;
            }
            Err(e) => return Err(self.fail(conn, Some(dom), call("virDomainPinVcpuFlags"), e)),
        }
        tracing::info!(domain = %pin.domain, vcpu = pin.vcpu, pcpus = %pcpus, persist, "pinned vCPU");
        Ok(())
    }
}

/// What a failed call was: names it in errors and logs.
#[derive(Clone, Copy)]
struct Call<'a> {
    name: &'static str,
    domain: Option<&'a str>,
    vcpu: Option<u32>,
}

impl fmt::Display for Call<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        match (self.domain, self.vcpu) {
            (Some(d), Some(v)) => write!(f, " (domain {d:?}, vCPU {v})"),
            (Some(d), None) => write!(f, " (domain {d:?})"),
            (None, Some(v)) => write!(f, " (vCPU {v})"),
            (None, None) => Ok(()),
        }
    }
}

/// What a failed call means for its caller, once a lost connection is ruled out. `stopped` gives the domain's state
/// if it is not running (asked only when the code leaves it open).
fn classify_failure(
    call: Call<'_>,
    code: Option<ErrorNumber>,
    message: &str,
    stopped: impl FnOnce() -> Option<String>,
) -> AgentError {
    if let Some(domain) = call.domain {
        match code {
            Some(ErrorNumber::NoDomain) => return AgentError::DomainNotFound { domain: domain.to_string() },
            // OPERATION_INVALID also covers other refusals: only an inactive domain means "not running".
            Some(ErrorNumber::OperationInvalid) => {
                if let Some(state) = stopped() {
                    return AgentError::DomainNotRunning { domain: domain.to_string(), state };
                }
            }
            _ => {}
        }
        // A pin the hypervisor refuses for a reason of its own (a cgroup cpuset without that pCPU, a vCPU thread
        // it cannot move): the host's state, not a fault of the agent, and that vCPU was not pinned.
        if let Some(vcpu) = call.vcpu {
            return AgentError::PinRefused { domain: domain.to_string(), vcpu, reason: format!("{}: {message}", call.name) };
        }
    }
    AgentError::Internal(format!("{call}: {message}"))
}

/// Whether `e` means the connection to libvirt is gone (rather than the request being wrong).
fn is_connection_error(e: &VirtError) -> bool {
    let transport = matches!(e.domain().known(), Some(ErrorDomain::Rpc | ErrorDomain::Remote));
    match e.code().known() {
        Some(ErrorNumber::NoConnect | ErrorNumber::InvalidConn | ErrorNumber::Rpc) => true,
        // "client socket is closed", "End of file while reading data", "Cannot write data: Broken pipe", keepalive
        // timeouts: system or internal errors raised by the RPC layer. The same codes from a driver (e.g. a cgroup
        // write failing) are not connection errors.
        Some(ErrorNumber::SystemError | ErrorNumber::InternalError | ErrorNumber::OperationTimeout) => transport,
        _ => false,
    }
}

/// Whether `e` is a driver refusing the flags argument (`virCheckFlags`) or the call itself.
fn flags_unsupported(e: &VirtError) -> bool {
    match e.code().known() {
        // virCheckFlags reports VIR_ERR_INVALID_ARG "unsupported flags (0x..) in function ...".
        Some(ErrorNumber::InvalidArg) => e.message().contains("unsupported flags"),
        Some(ErrorNumber::NoSupport) => true,
        _ => false,
    }
}

/// Sorts a per-domain read into kept, skipped (the domain went away or stopped between listing and reading, or one
/// domain failed: the rest of the host still gets balanced) or fatal (libvirt unreachable).
fn keep_or_skip<T>(r: Result<T, AgentError>) -> Result<Option<T>, AgentError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => match e.kind() {
            ErrorKind::Unavailable => Err(e),
            ErrorKind::NotFound | ErrorKind::FailedPrecondition => {
                tracing::debug!(error = %e, "domain went away while being read; skipped");
                Ok(None)
            }
            _ => {
                tracing::warn!(error = %e, "cannot read domain; skipped from this sample");
                Ok(None)
            }
        },
    }
}

/// Refuses domain keys libvirt cannot take (it needs C strings).
fn check_domain_key(key: &str) -> Result<(), AgentError> {
    if key.contains('\0') {
        return Err(AgentError::InvalidArgument(format!("domain {key:?} contains a NUL byte")));
    }
    Ok(())
}

/// Finds a domain by UUID (when `key` looks like one) or by name.
fn lookup(conn: &Connect, key: &str) -> Result<Domain, VirtError> {
    if crate::hypervisor::parse_uuid(key).is_some() {
        match conn.lookup_domain_by_uuid_string(key) {
            // A domain may be named like a UUID. libvirt refuses some keys that look like one here (dashes out of
            // place) as an invalid argument: those are names too, or unknown domains.
            Err(e) if e.code().is(ErrorNumber::NoDomain) || e.code().is(ErrorNumber::InvalidArg) => {}
            found => return found,
        }
    }
    conn.lookup_domain_by_name(key)
}

fn not_running(domain: &str, dom: &Domain) -> AgentError {
    AgentError::DomainNotRunning { domain: domain.to_string(), state: state_of(dom) }
}

/// The state of a domain as virsh names it, `unknown` if it cannot be read.
fn state_of(dom: &Domain) -> String {
    // virt's `state()` does not report failures: a failed read comes back as an unknown raw state.
    match dom.state() {
        Ok((state, _)) => state_name(state.known()),
        Err(_) => state_name(None),
    }
}

fn state_name(state: Option<virt::domain::DomainState>) -> String {
    use virt::domain::DomainState as S;
    match state {
        Some(S::NoState) => "no state",
        Some(S::Running) => "running",
        Some(S::Blocked) => "idle",
        Some(S::Paused) => "paused",
        Some(S::Shutdown) => "in shutdown",
        Some(S::Shutoff) => "shut off",
        Some(S::Crashed) => "crashed",
        Some(S::PMSuspended) => "pmsuspended",
        None => "unknown",
    }
    .to_string()
}

/// The pCPU a vCPU runs on, kept inside `0..npcpus`. libvirt may report a negative CPU (offline or unknown) or, on the
/// test driver, the last CPU of a 16-CPU node map on an 8-CPU host; then the lowest pCPU it may run on stands in.
fn current_pcpu(domain: &str, v: &ffi::VcpuInfo, npcpus: u32) -> PcpuId {
    match u32::try_from(v.cpu) {
        Ok(cpu) if cpu < npcpus => cpu,
        _ => {
            let stand_in = v.affinity.first().copied().unwrap_or(0);
            tracing::debug!(domain, vcpu = v.number, reported = v.cpu, pcpu = stand_in, "current pCPU out of range");
            stand_in
        }
    }
}

/// libvirt's `major * 1_000_000 + minor * 1_000 + release` as `major.minor.release`.
fn format_version(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1_000) % 1_000, v % 1_000)
}

fn join_error(e: tokio::task::JoinError) -> AgentError {
    AgentError::Internal(format!("libvirt worker task failed: {e}"))
}

/// The agent's monotonic clock: ns since the first use in this process.
fn monotonic_ns() -> u64 {
    u64::try_from(clock_epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn clock_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Once per process: start the clock, silence libvirt's default error printer (errors are returned and logged with
/// context instead), and run libvirt's event loop, which remote connections need for keepalive and for noticing a
/// closed socket while idle. It must be registered before the first connection opens.
/// Whether `uri` names the libvirt daemon of the machine the agent runs on (`qemu:///system`, `test:///default`,
/// `qemu+unix:///system`): no host between `//` and the path. Only then is this machine's boot id the domains' host's.
fn is_local_uri(uri: &str) -> bool {
    uri.split_once("://").is_some_and(|(_, rest)| rest.starts_with('/'))
}

/// This machine's boot id (Linux), or empty if it cannot be read: unknown, and the controller then relies on domain
/// ids and CPU times alone.
fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn init_process_state() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        clock_epoch();
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(error = %e, "no libvirt event loop: dead connections are noticed only when a call fails");
            return;
        }
        let spawned = std::thread::Builder::new().name("libvirt-events".into()).spawn(|| loop {
            if let Err(e) = virt::event::event_run_default_impl() {
                tracing::warn!(error = %e, "libvirt event loop iteration failed");
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the libvirt event loop thread");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn only_a_local_uri_reports_this_machines_boot() {
        for uri in ["qemu:///system", "qemu+unix:///session", "test:///default"] {
            assert!(is_local_uri(uri), "{uri}");
        }
        for uri in ["qemu+ssh://hv2/system", "qemu+tls://hv2.example:16514/system", "default", ""] {
            assert!(!is_local_uri(uri), "{uri}");
        }
        let id = read_boot_id();
        assert!(crate::hypervisor::parse_uuid(&id).is_some(), "a Linux boot id is a UUID: {id:?}");
        assert_eq!(LibvirtHypervisor::new("test:///default").boot_id, id);
        assert_eq!(LibvirtHypervisor::new("qemu+ssh://hv2/system").boot_id, "");
    }

    #[test]
    fn versions_are_split_into_three_parts() {
        assert_eq!(format_version(9_000_000), "9.0.0");
        assert_eq!(format_version(7_002_001), "7.2.1");
        assert_eq!(format_version(2), "0.0.2");
    }

    #[test]
    fn current_pcpu_stays_in_range() {
        let v = |cpu, affinity: Vec<u32>| ffi::VcpuInfo { number: 0, cpu_time_ns: 0, cpu, affinity };
        assert_eq!(current_pcpu("d", &v(3, vec![3]), 8), 3);
        assert_eq!(current_pcpu("d", &v(15, vec![2, 4]), 8), 2);
        assert_eq!(current_pcpu("d", &v(-1, vec![5]), 8), 5);
        assert_eq!(current_pcpu("d", &v(-2, vec![]), 8), 0);
    }

    #[test]
    fn failures_are_classified_for_the_caller() {
        let pin = Call { name: "virDomainPinVcpuFlags", domain: Some("vm1"), vcpu: Some(2) };
        let read = Call { name: "virDomainGetVcpus", domain: Some("vm1"), vcpu: None };
        let running = || None;
        let stopped = || Some("shut off".to_string());
        let not_found = AgentError::DomainNotFound { domain: "vm1".into() };
        assert_eq!(classify_failure(pin, Some(ErrorNumber::NoDomain), "gone", running), not_found);
        assert_eq!(classify_failure(read, Some(ErrorNumber::NoDomain), "gone", running), not_found);
        let not_running = AgentError::DomainNotRunning { domain: "vm1".into(), state: "shut off".into() };
        assert_eq!(classify_failure(pin, Some(ErrorNumber::OperationInvalid), "not running", stopped), not_running);
        // A refusal the agent does not know by code is the hypervisor's, for that pin alone: not an agent bug.
        for code in [Some(ErrorNumber::OperationInvalid), Some(ErrorNumber::SystemError), Some(ErrorNumber::InvalidArg), None] {
            let e = classify_failure(pin, code, "Invalid value '3' for 'cpuset.cpus'", running);
            assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
            assert_eq!(
                e.to_string(),
                "domain \"vm1\" vCPU 2: the hypervisor refused the pin: virDomainPinVcpuFlags: Invalid value '3' for 'cpuset.cpus'"
            );
        }
        // Elsewhere an unknown failure stays INTERNAL.
        let e = classify_failure(read, Some(ErrorNumber::SystemError), "boom", running);
        assert_eq!(e, AgentError::Internal("virDomainGetVcpus (domain \"vm1\"): boom".into()));
    }

    #[test]
    fn call_context_names_domain_and_vcpu() {
        let c = Call { name: "virDomainPinVcpu", domain: Some("vm1"), vcpu: Some(2) };
        assert_eq!(c.to_string(), "virDomainPinVcpu (domain \"vm1\", vCPU 2)");
        assert_eq!(Call { name: "x", domain: None, vcpu: None }.to_string(), "x");
    }

    /// A TCP listener that accepts libvirt clients and never answers them (a daemon that hangs without dying), until
    /// `close` drops every socket it holds and stops listening.
    struct SilentDaemon {
        port: u16,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl SilentDaemon {
        fn start() -> SilentDaemon {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let port = listener.local_addr().unwrap().port();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let thread = std::thread::spawn(move || {
                let mut held = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((sock, _)) => held.push(sock),
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
            SilentDaemon { port, stop, thread: Some(thread) }
        }

        fn close(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    impl Drop for SilentDaemon {
        fn drop(&mut self) {
            self.close();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_daemon_that_never_answers_costs_a_deadline_not_a_thread() {
        let mut daemon = SilentDaemon::start();
        let uri = format!("qemu+tcp://127.0.0.1:{}/system", daemon.port);
        let deadline = Duration::from_millis(300);
        let hv = LibvirtHypervisor::with_options(&uri, LibvirtOptions { call_deadline: deadline, ..Default::default() });
        assert_eq!(hv.call_deadline(), deadline);

        // The open hangs: the call answers UNAVAILABLE at its deadline, and the open goes on in the background.
        let err = hv.stats().await.expect_err("a silent daemon gives no sample");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("did not answer a stats sample within 300ms"), "{err}");
        assert!(hv.inner.conn.lock().unwrap().opening, "the first open still hangs");

        // While that call still holds its thread, no new call is sent: each would hold one more thread for as long
        // as the daemon hangs. They answer UNAVAILABLE at once and say why.
        assert_eq!(hv.inner.overdue.load(Ordering::Acquire), 1);
        for err in [hv.stats().await.map(|_| ()), hv.placement("x").await.map(|_| ()), hv.list_domains().await.map(|_| ())] {
            let err = err.expect_err("no call while an earlier one hangs");
            assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
            assert!(err.to_string().contains("no new call is sent until libvirt answers it"), "{err}");
        }
        assert_eq!(hv.inner.overdue.load(Ordering::Acquire), 1, "refused calls are not overdue calls");

        // A second caller does not queue behind the hung open for as long as it lasts: it gives up at the deadline and
        // says why. (Without the bound this blocking call would never return; the outer timeout turns that into a
        // failure instead of a hung test.)
        let inner = Arc::clone(&hv.inner);
        let waited = tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(move || inner.connection()))
            .await
            .expect("a caller behind a hung open must come back")
            .unwrap();
        let err = waited.expect_err("no connection while the open hangs");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("still being opened"), "{err}");

        // The daemon goes away: the hung open fails, and the next call tries again by itself and reports the refusal.
        daemon.close();
        let mut last = String::new();
        for _ in 0..100 {
            match hv.stats().await {
                Err(e) if e.to_string().contains("cannot connect to libvirt") => {
                    assert_eq!(hv.inner.overdue.load(Ordering::Acquire), 0, "the hung call ended");
                    return;
                }
                Err(e) => last = e.to_string(),
                Ok(_) => panic!("a closed port gave a sample"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the next open never ran after the hung one ended; last error: {last}");
    }

    /// A pin batch that outlives its deadline is not refused: libvirt may still apply it, and the error says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pin_batch_past_its_deadline_says_it_may_still_apply() {
        let daemon = SilentDaemon::start();
        let uri = format!("qemu+tcp://127.0.0.1:{}/system", daemon.port);
        let hv = LibvirtHypervisor::with_options(&uri, LibvirtOptions { call_deadline: Duration::from_millis(300), ..Default::default() });
        let pin = PinRequest { domain: "vm1".into(), vcpu: 0, pcpus: vec![1], persist: false };
        let err = hv.apply_pins(&[pin]).await.expect_err("a silent daemon applies nothing in time");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("did not answer a pin batch (its pins may still take effect"), "{err}");
        drop(daemon);
    }

    #[test]
    fn an_open_that_unwinds_leaves_no_caller_waiting() {
        let hv = LibvirtHypervisor::new("test:///default");
        hv.inner.conn.lock().unwrap().opening = true;
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = OpenGuard { inner: &hv.inner, armed: true };
            panic!("the open unwound");
        }));
        assert!(unwound.is_err());
        assert!(!hv.inner.conn.lock().unwrap().opening, "the flag was cleared");
        hv.with_connect(|_| ()).expect("the next caller opens instead of waiting");
    }

    #[test]
    fn clock_is_monotonic() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a);
    }
}
