//! Safe wrappers over the few libvirt calls that the `virt` 0.5 crate does not wrap, plus a connection owner that
//! never panics when it closes.
//!
//! This is the only module of the crate allowed to use `unsafe`. Every unsafe block states why it is sound; every
//! buffer libvirt fills is allocated here with the size the API documents, and everything libvirt allocates is
//! freed here.
//!
//! The cpumap helpers follow libvirt's layout: bit `n % 8` of byte `n / 8` is CPU `n`, and a map for `ncpus` CPUs is
//! `VIR_CPU_MAPLEN(ncpus) = (ncpus + 7) / 8` bytes long.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_uchar, c_uint};
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::ptr;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error as VirtError;
use virt::sys;

use crate::model::PcpuId;

/// Bytes of a cpumap covering `ncpus` CPUs (libvirt's `VIR_CPU_MAPLEN`).
pub fn cpumap_len(ncpus: u32) -> usize {
    (ncpus as usize).div_ceil(8)
}

/// Encodes a set of CPUs as a cpumap of exactly `maplen` bytes. CPUs that do not fit are ignored: callers size the
/// map from the host's CPU count and validate the CPUs first.
pub fn encode_cpumap(cpus: &[PcpuId], maplen: usize) -> Vec<u8> {
    let mut map = vec![0u8; maplen];
    for &cpu in cpus {
        let byte = cpu as usize / 8;
        if let Some(b) = map.get_mut(byte) {
            *b |= 1 << (cpu % 8);
        }
    }
    map
}

/// Decodes a cpumap into the sorted list of CPUs it contains, keeping only CPUs below `ncpus` (drivers may report
/// bits for CPUs the host map does not have, e.g. the test driver's 16-CPU node info vs. its 8-CPU map).
pub fn decode_cpumap(map: &[u8], ncpus: u32) -> Vec<PcpuId> {
    let mut cpus = Vec::new();
    for (i, &byte) in map.iter().enumerate() {
        for bit in 0..8u32 {
            if byte & (1 << bit) == 0 {
                continue;
            }
            let Ok(cpu) = PcpuId::try_from(i * 8 + bit as usize) else { return cpus };
            if cpu >= ncpus {
                return cpus;
            }
            cpus.push(cpu);
        }
    }
    cpus
}

/// A connection owned by the agent. It derefs to [`Connect`] for the wrapped calls, and closes its reference without
/// ever panicking: `virt`'s own `Drop` panics if `virConnectClose` fails, and the agent must survive whatever state
/// a dead daemon leaves the connection in.
#[derive(Debug)]
pub struct OwnedConnect {
    // ManuallyDrop: `virt`'s panicking Drop never runs; `Drop for OwnedConnect` releases the reference instead.
    inner: ManuallyDrop<Connect>,
}

impl OwnedConnect {
    /// Opens a read-write connection to `uri` (`virConnectOpen`).
    pub fn open(uri: &str) -> Result<OwnedConnect, VirtError> {
        Connect::open(Some(uri)).map(|c| OwnedConnect { inner: ManuallyDrop::new(c) })
    }
}

impl Deref for OwnedConnect {
    type Target = Connect;

    fn deref(&self) -> &Connect {
        &self.inner
    }
}

impl Drop for OwnedConnect {
    fn drop(&mut self) {
        // SAFETY: `inner` holds exactly the one reference `virConnectOpen` returned, so `as_ptr()` is valid until that
        // reference is released here. `inner` is never dropped (ManuallyDrop), so the reference is released exactly
        // once, and `self` is not used after this. Domains keep their own references to the connection in C.
        let rc = unsafe { sys::virConnectClose(self.inner.as_ptr()) };
        if rc < 0 {
            // Only an invalid pointer makes virConnectClose fail; leaking is the only safe answer then.
            tracing::warn!(error = %VirtError::last_error(), "closing the libvirt connection failed");
        }
    }
}

/// Upper bound on the vCPUs read per domain (QEMU's limit is 4096 on x86).
const MAX_VCPUS: u32 = 16_384;
/// Upper bound on host CPUs in a cpumap (libvirt's own bitmap limit is lower).
const MAX_PCPUS: u32 = 1 << 20;

/// The host's CPUs as `virNodeGetCPUMap` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCpuMap {
    /// Valid pCPU ids are `0..npcpus` (online or not).
    pub npcpus: u32,
    /// Online pCPUs, sorted.
    pub online: Vec<PcpuId>,
}

/// Frees a buffer libvirt allocated for the caller, also if decoding it unwinds.
struct LibvirtBuf(*mut c_uchar);

impl Drop for LibvirtBuf {
    fn drop(&mut self) {
        // SAFETY: the pointer is null or was allocated by libvirt with malloc for the caller to free with free();
        // it is freed only here, once. free(NULL) is a no-op.
        unsafe { libc::free(self.0.cast()) };
    }
}

/// The host's pCPU count and online pCPUs (`virNodeGetCPUMap`), which stay right with offline or sparse CPUs where
/// the `virNodeGetInfo` topology product does not.
pub fn node_cpu_map(conn: &Connect) -> Result<NodeCpuMap, VirtError> {
    let mut map: *mut c_uchar = ptr::null_mut();
    let mut online: c_uint = 0;
    // SAFETY: `conn.as_ptr()` does not take a reference, but `conn` holds one for the whole call, so the pointer is
    // valid; `map` and `online` are valid out-pointers; flags must be 0.
    let n = unsafe { sys::virNodeGetCPUMap(conn.as_ptr(), &mut map, &mut online, 0) };
    let buf = LibvirtBuf(map);
    if n < 0 {
        return Err(VirtError::last_error());
    }
    let npcpus = n.unsigned_abs();
    let online_cpus = if buf.0.is_null() {
        Vec::new()
    } else {
        // The buffer's length is not returned. Through the remote driver it is VIR_CPU_MAPLEN(n), but a driver in
        // this process (qemu:///embed, test:///) sizes it to the byte of the last online CPU (virBitmapToData),
        // shorter when the last CPUs are offline. `online` is the count of bits set in that same bitmap, so reading
        // stops once that many are seen: never past the byte of the last set bit.
        let bytes = read_online_map(online, cpumap_len(npcpus), |i| {
            // SAFETY: `read_online_map` asks for byte i only while fewer than `online` set bits lie in bytes 0..i,
            // so the last set bit is in byte i or later, and every driver's buffer reaches that byte (see above);
            // `buf` stays allocated until it is dropped below.
            unsafe { *buf.0.add(i) }
        });
        decode_cpumap(&bytes, npcpus)
    };
    drop(buf);
    if online_cpus.len() != online as usize {
        tracing::debug!(npcpus, online, decoded = online_cpus.len(), "online pCPU count differs from the online map");
    }
    Ok(NodeCpuMap { npcpus, online: online_cpus })
}

/// The bytes of a CPU map with `online` bits set, at most `maxlen` of them, read with `byte(i)` up to the byte of
/// the last set bit and no further.
fn read_online_map(online: u32, maxlen: usize, byte: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(maxlen);
    let mut seen = 0u32;
    for i in 0..maxlen {
        if seen >= online {
            break;
        }
        let b = byte(i);
        seen += b.count_ones();
        bytes.push(b);
    }
    bytes
}

/// One vCPU as `virDomainGetVcpus` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuInfo {
    /// The vCPU's index in the domain (may be sparse with vCPU hot-unplug).
    pub number: u32,
    /// Cumulative run time in ns.
    pub cpu_time_ns: u64,
    /// The host CPU it runs on now; negative when libvirt does not know (`VIR_VCPU_INFO_CPU_OFFLINE`/`UNAVAILABLE`).
    pub cpu: i32,
    /// The pCPUs it may run on, below the `npcpus` given, sorted.
    pub affinity: Vec<PcpuId>,
}

/// Current pCPU, run time and affinity of up to `maxinfo` online vCPUs of an active domain (`virDomainGetVcpus`).
/// Affinity maps are requested for `npcpus` host CPUs.
pub fn domain_vcpus(dom: &Domain, maxinfo: u32, npcpus: u32) -> Result<Vec<VcpuInfo>, VirtError> {
    if maxinfo == 0 {
        return Ok(Vec::new());
    }
    // Clamped so both sizes fit libvirt's `int` arguments; real hosts and domains are far below these limits.
    let maxinfo = maxinfo.min(MAX_VCPUS);
    let npcpus = npcpus.min(MAX_PCPUS);
    let count = maxinfo as usize;
    let maplen = cpumap_len(npcpus).max(1);
    let empty = sys::virVcpuInfo { number: 0, state: 0, cpuTime: 0, cpu: 0 };
    let mut info = vec![empty; count];
    let mut maps = vec![0u8; count * maplen];
    // SAFETY: `dom.as_ptr()` does not take a reference, but `dom` holds one for the whole call, so the pointer is
    // valid; `info` has room for `maxinfo` entries and `maps` for `maxinfo` maps of `maplen` bytes, exactly the sizes
    // passed, so libvirt writes only inside them.
    let n = unsafe {
        sys::virDomainGetVcpus(dom.as_ptr(), info.as_mut_ptr(), maxinfo as c_int, maps.as_mut_ptr(), maplen as c_int)
    };
    if n < 0 {
        return Err(VirtError::last_error());
    }
    let n = (n.unsigned_abs() as usize).min(count);
    Ok(info
        .iter()
        .zip(maps.chunks_exact(maplen))
        .take(n)
        .map(|(vi, map)| VcpuInfo {
            number: vi.number,
            cpu_time_ns: vi.cpuTime,
            cpu: vi.cpu,
            affinity: decode_cpumap(map, npcpus),
        })
        .collect())
}

/// Each vCPU's affinity from `virDomainGetVcpuPinInfo` (live state, `VIR_DOMAIN_AFFECT_LIVE`): the call meant for
/// affinity, which `GetVcpuPlacement` uses. A stats sample takes the same maps from `virDomainGetVcpus` instead, to
/// read a domain in one call rather than two.
pub fn domain_vcpu_pin_info(dom: &Domain, nvcpus: u32, npcpus: u32) -> Result<Vec<Vec<PcpuId>>, VirtError> {
    if nvcpus == 0 {
        return Ok(Vec::new());
    }
    let nvcpus = nvcpus.min(MAX_VCPUS);
    let npcpus = npcpus.min(MAX_PCPUS);
    let maplen = cpumap_len(npcpus).max(1);
    let mut maps = vec![0u8; nvcpus as usize * maplen];
    // SAFETY: `dom` holds a reference for the whole call, so its pointer is valid; `maps` has room for `nvcpus`
    // maps of `maplen` bytes, exactly the sizes passed, so libvirt writes only inside it.
    let n = unsafe {
        sys::virDomainGetVcpuPinInfo(
            dom.as_ptr(),
            nvcpus as c_int,
            maps.as_mut_ptr(),
            maplen as c_int,
            sys::VIR_DOMAIN_AFFECT_LIVE,
        )
    };
    if n < 0 {
        return Err(VirtError::last_error());
    }
    let n = (n.unsigned_abs() as usize).min(nvcpus as usize);
    Ok(maps.chunks_exact(maplen).take(n).map(|m| decode_cpumap(m, npcpus)).collect())
}

/// One domain of a bulk statistics read (`virConnectGetAllDomainStats`).
#[derive(Debug)]
pub struct DomainStatsRecord {
    /// The domain, with a reference of its own (it outlives the record list).
    pub dom: Domain,
    /// The numeric parameters, by name (`cpu.time`, `vcpu.current`, `vcpu.0.time`, ...), as unsigned values;
    /// strings, booleans and doubles are left out (the stats groups asked for here have none that matter).
    pub params: Vec<(String, u64)>,
}

impl DomainStatsRecord {
    /// The parameter named `name`, if libvirt reported it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// Frees a record list returned by `virConnectGetAllDomainStats`, also if decoding it unwinds.
struct StatsRecordList(*mut sys::virDomainStatsRecordPtr);

impl Drop for StatsRecordList {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the list was returned by virConnectGetAllDomainStats and is freed only here, once; the
            // function frees the records, their parameters and their domain references, and accepts NULL.
            unsafe { sys::virDomainStatsRecordListFree(self.0) };
        }
    }
}

/// The name of a typed parameter: its NUL-terminated `field`, read without trusting the terminator to be there.
fn param_name(field: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = field.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Statistics groups `stats` (`VIR_DOMAIN_STATS_*`) of the domains selected by `flags`
/// (`VIR_CONNECT_GET_ALL_DOMAINS_STATS_*`), in one `virConnectGetAllDomainStats` call.
pub fn all_domain_stats(conn: &Connect, stats: c_uint, flags: c_uint) -> Result<Vec<DomainStatsRecord>, VirtError> {
    let mut list: *mut sys::virDomainStatsRecordPtr = ptr::null_mut();
    // SAFETY: `conn` holds a reference for the whole call, so its pointer is valid; `list` is a valid out-pointer
    // that libvirt sets to a NULL-terminated array it allocates (freed by `StatsRecordList`).
    let n = unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), stats, &mut list, flags) };
    let records = StatsRecordList(list);
    if n < 0 {
        return Err(VirtError::last_error());
    }
    let count = n.unsigned_abs() as usize;
    let mut out = Vec::with_capacity(count);
    if records.0.is_null() {
        return Ok(out);
    }
    for i in 0..count {
        // SAFETY: on success the array holds `n` valid record pointers (then a NULL), all alive until `records`
        // is dropped at the end of this function, after the last use of `rec`.
        let rec = unsafe { &**records.0.add(i) };
        // SAFETY: `rec.dom` is a valid domain whose reference the record owns; virDomainRef takes one more for the
        // `Domain` made here, which releases it when dropped, so the handle stays valid after the list is freed.
        let dom = unsafe {
            if sys::virDomainRef(rec.dom) < 0 {
                return Err(VirtError::last_error());
            }
            Domain::from_ptr(rec.dom)
        };
        let params: &[sys::virTypedParameter] = if rec.params.is_null() || rec.nparams <= 0 {
            &[]
        } else {
            // SAFETY: the record's `params` points to `nparams` typed parameters owned by the record, alive until
            // the list is freed (after the last use of this slice).
            unsafe { std::slice::from_raw_parts(rec.params, rec.nparams.unsigned_abs() as usize) }
        };
        let mut values = Vec::with_capacity(params.len());
        for p in params {
            // SAFETY: `type_` says which member of the union libvirt set; only that member is read.
            let v = unsafe {
                match p.type_ as sys::virTypedParameterType {
                    sys::VIR_TYPED_PARAM_INT => p.value.i as u64,
                    sys::VIR_TYPED_PARAM_UINT => u64::from(p.value.ui),
                    sys::VIR_TYPED_PARAM_LLONG => p.value.l as u64,
                    sys::VIR_TYPED_PARAM_ULLONG => p.value.ul,
                    _ => continue,
                }
            };
            values.push((param_name(&p.field), v));
        }
        out.push(DomainStatsRecord { dom, params: values });
    }
    drop(records);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maplen_rounds_up_to_bytes() {
        assert_eq!(cpumap_len(0), 0);
        assert_eq!(cpumap_len(1), 1);
        assert_eq!(cpumap_len(8), 1);
        assert_eq!(cpumap_len(9), 2);
        assert_eq!(cpumap_len(16), 2);
        assert_eq!(cpumap_len(17), 3);
    }

    #[test]
    fn an_online_map_is_read_only_up_to_its_last_set_bit() {
        // 16 CPUs, 8-15 offline: an in-process driver's buffer is 1 byte long. Reading byte 1 would overrun it.
        let short = [0xffu8];
        let read = read_online_map(8, cpumap_len(16), |i| *short.get(i).unwrap_or_else(|| panic!("read byte {i}")));
        assert_eq!(decode_cpumap(&read, 16), (0..8).collect::<Vec<_>>());
        // CPUs 0 and 9 online: both bytes are needed, and read.
        let gap = [0x01u8, 0x02];
        assert_eq!(decode_cpumap(&read_online_map(2, 2, |i| gap[i]), 16), vec![0, 9]);
        // None online: nothing is read.
        assert!(read_online_map(0, 2, |i| panic!("read byte {i}")).is_empty());
    }

    #[test]
    fn encode_sets_bit_n_of_byte_n_div_8() {
        assert_eq!(encode_cpumap(&[0], 1), vec![0b0000_0001]);
        assert_eq!(encode_cpumap(&[2, 4], 1), vec![0b0001_0100]);
        assert_eq!(encode_cpumap(&[8], 2), vec![0, 0b0000_0001]);
        assert_eq!(encode_cpumap(&[15, 0], 2), vec![0b0000_0001, 0b1000_0000]);
        assert_eq!(encode_cpumap(&[3], 3), vec![0b0000_1000, 0, 0]);
    }

    #[test]
    fn encode_ignores_cpus_beyond_the_map() {
        assert_eq!(encode_cpumap(&[1, 9], 1), vec![0b0000_0010]);
    }

    #[test]
    fn decode_lists_set_bits_below_ncpus() {
        assert_eq!(decode_cpumap(&[0x15], 8), vec![0, 2, 4]);
        assert_eq!(decode_cpumap(&[0xff, 0xff], 16), (0..16).collect::<Vec<_>>());
        // A 16-CPU map read for an 8-CPU host keeps the first 8.
        assert_eq!(decode_cpumap(&[0xff, 0xff], 8), (0..8).collect::<Vec<_>>());
        assert_eq!(decode_cpumap(&[0x80, 0x01], 9), vec![7, 8]);
        assert_eq!(decode_cpumap(&[0x80, 0x01], 5), Vec::<u32>::new());
        assert!(decode_cpumap(&[], 8).is_empty());
    }

    #[test]
    fn encode_then_decode_round_trips() {
        for ncpus in [1u32, 7, 8, 9, 64, 130] {
            let cpus: Vec<u32> = (0..ncpus).filter(|c| c % 3 != 1).collect();
            let map = encode_cpumap(&cpus, cpumap_len(ncpus));
            assert_eq!(map.len(), cpumap_len(ncpus));
            assert_eq!(decode_cpumap(&map, ncpus), cpus);
        }
    }
}
