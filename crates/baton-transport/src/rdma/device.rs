//! Verbs resources of one link end, and the local steps of the RDMA gate.

use std::collections::HashMap;
use std::ffi::CStr;
use std::net::IpAddr;
use std::path::PathBuf;
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock};

use super::proto::{ClassSpec, N_CLASSES};
use super::sys::*;
use super::{GateStep, RdmaConfig, RdmaError};

/// Apple silicon pages are 16 KiB; registered memory is aligned to them.
pub const PAGE: usize = 16 << 10;
/// The most one memory region may hold on Apple's stack (0xfa0000).
pub const MAX_REGION_BYTES: usize = 0xfa_0000;
const QPS_PER_LINK: u32 = N_CLASSES as u32;
const MRS_PER_LINK: u32 = 2 * N_CLASSES as u32;

fn gate(step: GateStep, detail: impl Into<String>) -> RdmaError {
    RdmaError::Gate { step, detail: detail.into() }
}

fn errno_str() -> String {
    std::io::Error::last_os_error().to_string()
}

fn rc_str(rc: i32) -> String {
    std::io::Error::from_raw_os_error(rc).to_string()
}

pub fn library_path(cfg: &RdmaConfig) -> PathBuf {
    if let Some(p) = &cfg.library {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("BATON_RDMA_LIB") {
        return p.into();
    }
    if cfg!(target_os = "macos") {
        "librdma.dylib".into()
    } else {
        "libibverbs.so.1".into()
    }
}

/// Loads (once per path) the verbs library.
pub fn load(cfg: &RdmaConfig) -> Result<Arc<Verbs>, RdmaError> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<Verbs>>>> = OnceLock::new();
    let path = library_path(cfg);
    let mut map = LOADED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = map.get(&path) {
        return Ok(v.clone());
    }
    let v = Arc::new(Verbs::open(&path).map_err(|e| gate(GateStep::Library, format!("{}: {e}", path.display())))?);
    map.insert(path, v.clone());
    Ok(v)
}

/// Queue pairs, memory regions and protection domains in use per device by this process,
/// checked against Apple's limits before anything is created.
#[derive(Default, Clone, Copy)]
struct Usage {
    qps: u32,
    mrs: u32,
    pds: u32,
}

fn usage() -> &'static Mutex<HashMap<String, Usage>> {
    static U: OnceLock<Mutex<HashMap<String, Usage>>> = OnceLock::new();
    U.get_or_init(Default::default)
}

pub struct BudgetGuard(String);

impl BudgetGuard {
    fn acquire(device: &str, cfg: &RdmaConfig) -> Result<Self, RdmaError> {
        let mut m = usage().lock().unwrap_or_else(|e| e.into_inner());
        let u = m.entry(device.to_owned()).or_default();
        let over = |what: &str, used: u32, need: u32, max: u32| {
            gate(GateStep::Budget, format!("{device}: a link needs {need} {what}, {used} of {max} already in use"))
        };
        if u.qps + QPS_PER_LINK > cfg.max_qps_per_device {
            return Err(over("queue pairs", u.qps, QPS_PER_LINK, cfg.max_qps_per_device));
        }
        if u.mrs + MRS_PER_LINK > cfg.max_mrs_per_device {
            return Err(over("memory regions", u.mrs, MRS_PER_LINK, cfg.max_mrs_per_device));
        }
        if u.pds + 1 > cfg.max_pds_per_device {
            return Err(over("protection domains", u.pds, 1, cfg.max_pds_per_device));
        }
        u.qps += QPS_PER_LINK;
        u.mrs += MRS_PER_LINK;
        u.pds += 1;
        Ok(BudgetGuard(device.to_owned()))
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let mut m = usage().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = m.get_mut(&self.0) {
            u.qps -= QPS_PER_LINK;
            u.mrs -= MRS_PER_LINK;
            u.pds -= 1;
        }
    }
}

/// Page-aligned memory for one class's slots in one direction.
pub struct Arena {
    ptr: *mut u8,
    len: usize,
}

impl Arena {
    fn new(len: usize) -> Option<Arena> {
        let layout = std::alloc::Layout::from_size_align(len, PAGE).ok()?;
        // SAFETY: non-zero size (checked by config validation), valid layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Arena { ptr, len })
    }
    pub fn slot(&mut self, spec: &ClassSpec, i: usize) -> &mut [u8] {
        assert!((i + 1) * spec.slot_bytes <= self.len);
        // SAFETY: in bounds (asserted); the arena outlives the borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * spec.slot_bytes), spec.slot_bytes) }
    }
    pub fn addr(&self, spec: &ClassSpec, i: usize) -> u64 {
        self.ptr as u64 + (i * spec.slot_bytes) as u64
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, std::alloc::Layout::from_size_align_unchecked(self.len, PAGE)) }
    }
}

/// What the peer needs to reach this end.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LocalInfo {
    pub device: String,
    pub gid: [u8; 16],
    pub lid: u16,
    pub rc_capable: bool,
    pub classes: [ClassSpec; N_CLASSES],
}

/// An opened device with its port checked and GID chosen (the gate's local half).
pub struct Device {
    pub verbs: Arc<Verbs>,
    pub ctx: *mut ibv_context,
    pub name: String,
    pub gid_index: u8,
    pub info: LocalInfo,
    pub log: Vec<(GateStep, String)>,
}

// The verbs context is thread-safe; ownership moves to the link's driver thread.
unsafe impl Send for Device {}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: ctx came from open_device and every resource on it was released before.
        unsafe { (self.verbs.close_device)(self.ctx) };
    }
}

fn is_v4_mapped(g: &[u8; 16]) -> bool {
    g[..10] == [0; 10] && g[10..12] == [0xff, 0xff]
}

/// Which local interface has `ip` (its device is named `rdma_<interface>` on macOS).
fn interface_of(ip: IpAddr) -> Option<String> {
    let mut ifa: *mut libc::ifaddrs = ptr::null_mut();
    // SAFETY: getifaddrs fills a list freed with freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut ifa) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = ifa;
    while !cur.is_null() {
        // SAFETY: walking the list getifaddrs returned.
        let a = unsafe { &*cur };
        if !a.ifa_addr.is_null() && i32::from(unsafe { (*a.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: AF_INET addresses are sockaddr_in.
            let sin = unsafe { &*(a.ifa_addr as *const libc::sockaddr_in) };
            if IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()) == ip {
                found = Some(unsafe { CStr::from_ptr(a.ifa_name) }.to_string_lossy().into_owned());
                break;
            }
        }
        cur = a.ifa_next;
    }
    // SAFETY: list from getifaddrs.
    unsafe { libc::freeifaddrs(ifa) };
    found
}

/// Gate steps up to a chosen GID: library, device, port, GID.
pub fn open_device(cfg: &RdmaConfig, local_ip: Option<IpAddr>) -> Result<Device, RdmaError> {
    let verbs = load(cfg)?;
    let log = vec![(
        GateStep::Library,
        format!("{}{}", library_path(cfg).display(), if verbs.emulated { " (EMULATED provider)" } else { "" }),
    )];
    let mut n = 0;
    // SAFETY: plain verbs call; the list is freed below.
    let list = unsafe { (verbs.get_device_list)(&mut n) };
    if list.is_null() {
        return Err(gate(GateStep::Device, format!("ibv_get_device_list failed: {}", errno_str())));
    }
    let devs: Vec<(String, *mut ibv_device)> = (0..n.max(0) as usize)
        .map(|i| {
            // SAFETY: the list has n entries.
            let d = unsafe { *list.add(i) };
            (unsafe { CStr::from_ptr((verbs.get_device_name)(d)) }.to_string_lossy().into_owned(), d)
        })
        .collect();
    let names: Vec<&str> = devs.iter().map(|(n, _)| n.as_str()).collect();
    let by_route = local_ip.and_then(interface_of).map(|i| format!("rdma_{i}"));
    let wanted = cfg.device.clone().or(by_route.filter(|w| names.contains(&w.as_str())));
    let chosen = match &wanted {
        Some(w) => devs.iter().find(|(n, _)| n == w),
        None => devs.first(),
    };
    let Some((name, dev)) = chosen.cloned() else {
        // SAFETY: list from get_device_list.
        unsafe { (verbs.free_device_list)(list) };
        return Err(gate(
            GateStep::Device,
            match wanted {
                Some(w) => format!("no RDMA device {w}; present: {names:?}"),
                None => format!("no RDMA devices ({})", if n == 0 { errno_str() } else { "none listed".into() }),
            },
        ));
    };
    // SAFETY: dev is from the list, which stays valid until freed after opening.
    let ctx = unsafe { (verbs.open_device)(dev) };
    unsafe { (verbs.free_device_list)(list) };
    if ctx.is_null() {
        return Err(gate(GateStep::Device, format!("ibv_open_device({name}) failed: {}", errno_str())));
    }
    let mut d = Device {
        verbs,
        ctx,
        name: name.clone(),
        gid_index: 0,
        info: LocalInfo { device: name.clone(), gid: [0; 16], lid: 0, rc_capable: false, classes: cfg.classes },
        log,
    };
    d.log.push((GateStep::Device, format!("{name} (of {names:?})")));
    // SAFETY: 64 zeroed bytes cover every known ibv_port_attr layout.
    let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
    let rc = unsafe { (d.verbs.query_port)(ctx, 1, &mut attr) };
    if rc != 0 {
        return Err(gate(GateStep::Port, format!("ibv_query_port({name}, 1): {}", rc_str(rc))));
    }
    if attr.state != IBV_PORT_ACTIVE {
        return Err(gate(GateStep::Port, format!("port 1 of {name} is not active (state {})", attr.state)));
    }
    d.info.lid = attr.lid;
    let layer = if attr.link_layer == IBV_LINK_LAYER_THUNDERBOLT { "thunderbolt".into() } else { attr.link_layer.to_string() };
    d.log.push((GateStep::Port, format!("port 1 active, link layer {layer}, max message {} bytes", attr.max_msg_sz)));
    let mut best: Option<(u8, [u8; 16])> = None;
    for i in 0..attr.gid_tbl_len.clamp(0, 256) {
        let mut g = ibv_gid::default();
        // SAFETY: index within the table length the port reported.
        if unsafe { (d.verbs.query_gid)(ctx, 1, i, &mut g) } != 0 || !is_v4_mapped(&g.raw) {
            continue;
        }
        let matches_route = local_ip.is_some_and(|ip| IpAddr::from([g.raw[12], g.raw[13], g.raw[14], g.raw[15]]) == ip);
        if best.is_none() || matches_route {
            best = Some((i as u8, g.raw));
        }
        if matches_route {
            break;
        }
    }
    let Some((idx, gid)) = best else {
        return Err(gate(
            GateStep::Gid,
            format!(
                "no IPv4-mapped GID (::ffff:a.b.c.d) on {name} port 1; the Thunderbolt interface \
                 (not bridge0) needs an IPv4 address"
            ),
        ));
    };
    d.gid_index = idx;
    d.info.gid = gid;
    d.log.push((GateStep::Gid, format!("index {idx}: ::ffff:{}.{}.{}.{}", gid[12], gid[13], gid[14], gid[15])));
    Ok(d)
}

/// Protection domain, completion queues, queue pairs and registered slot arenas of a link end.
pub struct Resources {
    pub dev: Device,
    pub pd: *mut ibv_pd,
    pub send_cq: *mut ibv_cq,
    pub recv_cq: *mut ibv_cq,
    pub qps: Vec<*mut ibv_qp>,
    mrs: Vec<*mut ibv_mr>,
    pub lkeys: [[u32; N_CLASSES]; 2],
    /// `arenas[0]` receive, `arenas[1]` send, per class.
    pub arenas: [Vec<Arena>; 2],
    pub qp_type: u32,
    pub psns: [u32; N_CLASSES],
    _budget: BudgetGuard,
}

// Moves to the driver thread, which alone uses it from then on.
unsafe impl Send for Resources {}

impl Drop for Resources {
    fn drop(&mut self) {
        let v = &self.dev.verbs;
        // SAFETY: each pointer was created on this device and is released once, in reverse order.
        unsafe {
            for qp in &self.qps {
                (v.destroy_qp)(*qp);
            }
            for mr in &self.mrs {
                (v.dereg_mr)(*mr);
            }
            for cq in [self.send_cq, self.recv_cq] {
                if !cq.is_null() {
                    (v.destroy_cq)(cq);
                }
            }
            if !self.pd.is_null() {
                (v.dealloc_pd)(self.pd);
            }
        }
    }
}

fn send_depth(spec: &ClassSpec) -> u32 {
    // Retransmissions may be posted while earlier posts of the same slots are outstanding.
    spec.depth * 2
}

impl Resources {
    /// Creates everything and moves the queue pairs to INIT with all receives posted.
    pub fn create(dev: Device, cfg: &RdmaConfig, rc: bool) -> Result<Resources, RdmaError> {
        let budget = BudgetGuard::acquire(&dev.name, cfg)?;
        let v = dev.verbs.clone();
        let mut r = Resources {
            dev,
            pd: ptr::null_mut(),
            send_cq: ptr::null_mut(),
            recv_cq: ptr::null_mut(),
            qps: Vec::new(),
            mrs: Vec::new(),
            lkeys: [[0; N_CLASSES]; 2],
            arenas: [Vec::new(), Vec::new()],
            qp_type: if rc { IBV_QPT_RC } else { IBV_QPT_UC },
            psns: std::array::from_fn(|_| rand::random::<u32>() & 0xff_ffff),
            _budget: budget,
        };
        let name = r.dev.name.clone();
        // SAFETY (whole block): verbs calls on this device's context with valid arguments.
        unsafe {
            r.pd = (v.alloc_pd)(r.dev.ctx);
            if r.pd.is_null() {
                return Err(gate(GateStep::ProtectionDomain, format!("ibv_alloc_pd({name}): {}", errno_str())));
            }
            let classes = cfg.classes;
            let send_cqe: u32 = classes.iter().map(send_depth).sum();
            let recv_cqe: u32 = classes.iter().map(|c| c.depth).sum();
            r.send_cq = (v.create_cq)(r.dev.ctx, send_cqe as i32, ptr::null_mut(), ptr::null_mut(), 0);
            r.recv_cq = (v.create_cq)(r.dev.ctx, recv_cqe as i32, ptr::null_mut(), ptr::null_mut(), 0);
            if r.send_cq.is_null() || r.recv_cq.is_null() {
                return Err(gate(GateStep::CompletionQueue, format!("ibv_create_cq({name}): {}", errno_str())));
            }
            for spec in &classes {
                let mut init = ibv_qp_init_attr {
                    qp_context: ptr::null_mut(),
                    send_cq: r.send_cq,
                    recv_cq: r.recv_cq,
                    srq: ptr::null_mut(),
                    cap: ibv_qp_cap {
                        max_send_wr: send_depth(spec),
                        max_recv_wr: spec.depth,
                        max_send_sge: 1,
                        max_recv_sge: 1,
                        max_inline_data: 0,
                    },
                    qp_type: r.qp_type,
                    sq_sig_all: 1,
                };
                let want = init.cap;
                let qp = (v.create_qp)(r.pd, &mut init);
                if qp.is_null() {
                    let e = std::io::Error::last_os_error();
                    let hint = match e.raw_os_error() {
                        Some(libc::EBUSY) => " (the device's queue-pair limit is reached: Apple allows 10)",
                        Some(e) if e == libc::ENOTSUP || e == libc::EOPNOTSUPP => " (queue-pair type not offered: Apple offers UC only)",
                        _ => "",
                    };
                    let t = if rc { "RC" } else { "UC" };
                    return Err(gate(GateStep::QueuePair, format!("ibv_create_qp({name}, {t}): {e}{hint}")));
                }
                r.qps.push(qp);
                let mut attr: ibv_qp_attr = std::mem::zeroed();
                let mut got: ibv_qp_init_attr = std::mem::zeroed();
                let rc = (v.query_qp)(qp, &mut attr, IBV_QP_CAP, &mut got);
                if rc != 0 || got.cap.max_send_wr < want.max_send_wr || got.cap.max_recv_wr < want.max_recv_wr {
                    return Err(gate(
                        GateStep::QueuePair,
                        format!("{name} granted {:?} for a queue pair, {want:?} needed (query rc {rc})", got.cap),
                    ));
                }
            }
            for (dir, arenas) in r.arenas.iter_mut().enumerate() {
                for (c, spec) in classes.iter().enumerate() {
                    let len = spec.slot_bytes * spec.depth as usize;
                    let arena = Arena::new(len)
                        .ok_or_else(|| gate(GateStep::MemoryRegion, format!("cannot allocate {len} bytes")))?;
                    let mr = (v.reg_mr)(r.pd, arena.ptr.cast(), len, IBV_ACCESS_LOCAL_WRITE);
                    if mr.is_null() {
                        return Err(gate(
                            GateStep::MemoryRegion,
                            format!("ibv_reg_mr({name}, {len} bytes): {} (Apple allows about 100 regions)", errno_str()),
                        ));
                    }
                    r.mrs.push(mr);
                    r.lkeys[dir][c] = (*mr).lkey;
                    arenas.push(arena);
                }
            }
            for qp in &r.qps {
                let mut a: ibv_qp_attr = std::mem::zeroed();
                a.qp_state = IBV_QPS_INIT;
                a.pkey_index = 0;
                a.port_num = 1;
                a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE;
                let rc = (v.modify_qp)(*qp, &mut a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
                if rc != 0 {
                    return Err(gate(GateStep::Init, format!("ibv_modify_qp(INIT): {}", rc_str(rc))));
                }
            }
            for (c, spec) in classes.iter().enumerate() {
                for i in 0..spec.depth as usize {
                    r.post_recv(c, i).map_err(|e| gate(GateStep::Init, e))?;
                }
            }
        }
        Ok(r)
    }

    /// Moves the queue pairs to RTR and RTS towards the peer's.
    pub fn connect(&mut self, peer: &LocalInfo, peer_qpns: &[u32; N_CLASSES], peer_psns: &[u32; N_CLASSES]) -> Result<(), RdmaError> {
        let v = self.dev.verbs.clone();
        let rc_type = self.qp_type == IBV_QPT_RC;
        for (c, qp) in self.qps.iter().enumerate() {
            // SAFETY: zeroed attribute structs filled as RDMA.md lists; qp is ours.
            unsafe {
                let mut a: ibv_qp_attr = std::mem::zeroed();
                a.qp_state = IBV_QPS_RTR;
                a.path_mtu = IBV_MTU_1024;
                a.dest_qp_num = peer_qpns[c];
                a.rq_psn = peer_psns[c];
                a.ah_attr.is_global = 1;
                a.ah_attr.dlid = peer.lid;
                a.ah_attr.port_num = 1;
                a.ah_attr.grh.dgid = ibv_gid { raw: peer.gid };
                a.ah_attr.grh.hop_limit = 1;
                a.ah_attr.grh.sgid_index = self.dev.gid_index;
                let mut mask = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN;
                if rc_type {
                    a.max_dest_rd_atomic = 1;
                    a.min_rnr_timer = 12;
                    mask |= IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
                }
                let rc = (v.modify_qp)(*qp, &mut a, mask);
                if rc != 0 {
                    return Err(gate(
                        GateStep::Rtr,
                        format!("ibv_modify_qp(RTR) class {c}: {} (usually a wrong or missing GID)", rc_str(rc)),
                    ));
                }
                let mut a: ibv_qp_attr = std::mem::zeroed();
                a.qp_state = IBV_QPS_RTS;
                a.sq_psn = self.psns[c];
                let mut mask = IBV_QP_STATE | IBV_QP_SQ_PSN;
                if rc_type {
                    a.timeout = 14;
                    a.retry_cnt = 7;
                    a.rnr_retry = 7;
                    a.max_rd_atomic = 1;
                    mask |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC;
                }
                let rc = (v.modify_qp)(*qp, &mut a, mask);
                if rc != 0 {
                    return Err(gate(GateStep::Rts, format!("ibv_modify_qp(RTS) class {c}: {}", rc_str(rc))));
                }
            }
        }
        Ok(())
    }

    pub fn qpns(&self) -> [u32; N_CLASSES] {
        // SAFETY: the qps are live; qp_num is set by the provider at creation.
        std::array::from_fn(|c| unsafe { (*self.qps[c]).qp_num })
    }

    pub fn post_recv(&mut self, class: usize, slot: usize) -> Result<(), String> {
        let spec = self.dev.info.classes[class];
        let mut sge = ibv_sge { addr: self.arenas[0][class].addr(&spec, slot), length: spec.slot_bytes as u32, lkey: self.lkeys[0][class] };
        let mut wr = ibv_recv_wr { wr_id: wr_id(class, slot), next: ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad = ptr::null_mut();
        // SAFETY: the inline ibv_post_recv: through the context's ops table (RDMA.md).
        let rc = unsafe {
            let f = (*self.dev.ctx).ops.post_recv.ok_or("provider has no post_recv")?;
            f(self.qps[class], &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(format!("ibv_post_recv class {class}: {}", rc_str(rc)));
        }
        Ok(())
    }

    /// Posts the whole slot `slot` of `class` (Apple: same frame count on both ends).
    pub fn post_send(&mut self, class: usize, slot: usize) -> Result<(), String> {
        let spec = self.dev.info.classes[class];
        let mut sge = ibv_sge { addr: self.arenas[1][class].addr(&spec, slot), length: spec.slot_bytes as u32, lkey: self.lkeys[1][class] };
        // SAFETY: zeroed work request is a valid empty one.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id(class, slot);
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = IBV_WR_SEND;
        wr.send_flags = IBV_SEND_SIGNALED;
        let mut bad = ptr::null_mut();
        // SAFETY: the inline ibv_post_send: through the context's ops table.
        let rc = unsafe {
            let f = (*self.dev.ctx).ops.post_send.ok_or("provider has no post_send")?;
            f(self.qps[class], &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(format!("ibv_post_send class {class}: {}", rc_str(rc)));
        }
        Ok(())
    }

    /// The inline ibv_poll_cq, through the ops table.
    pub fn poll(&self, which: Cq, out: &mut [ibv_wc]) -> Result<usize, String> {
        let cq = match which {
            Cq::Send => self.send_cq,
            Cq::Recv => self.recv_cq,
        };
        // SAFETY: cq belongs to this context; out has room for out.len() entries.
        let n = unsafe {
            let f = (*self.dev.ctx).ops.poll_cq.ok_or("provider has no poll_cq")?;
            f(cq, out.len() as i32, out.as_mut_ptr())
        };
        if n < 0 {
            return Err(format!("ibv_poll_cq failed ({n}): completion queue overrun or device error"));
        }
        Ok(n as usize)
    }
}

/// Which of a link end's two completion queues.
#[derive(Debug, Clone, Copy)]
pub enum Cq {
    Send,
    Recv,
}

pub fn wr_id(class: usize, slot: usize) -> u64 {
    ((class as u64) << 32) | slot as u64
}

pub fn split_wr_id(id: u64) -> (usize, usize) {
    ((id >> 32) as usize, (id & 0xffff_ffff) as usize)
}

/// Creates and destroys an RC queue pair to learn whether the provider offers RC.
pub fn offers_rc(dev: &Device) -> bool {
    let v = &dev.verbs;
    // SAFETY: short-lived PD, CQ and QP on this context, all released here.
    unsafe {
        let pd = (v.alloc_pd)(dev.ctx);
        if pd.is_null() {
            return false;
        }
        let cq = (v.create_cq)(dev.ctx, 4, ptr::null_mut(), ptr::null_mut(), 0);
        let mut ok = false;
        if !cq.is_null() {
            let mut init = ibv_qp_init_attr {
                qp_context: ptr::null_mut(),
                send_cq: cq,
                recv_cq: cq,
                srq: ptr::null_mut(),
                cap: ibv_qp_cap { max_send_wr: 1, max_recv_wr: 1, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0 },
                qp_type: IBV_QPT_RC,
                sq_sig_all: 1,
            };
            let qp = (v.create_qp)(pd, &mut init);
            if !qp.is_null() {
                ok = true;
                (v.destroy_qp)(qp);
            }
            (v.destroy_cq)(cq);
        }
        (v.dealloc_pd)(pd);
        ok
    }
}

/// Checks a configuration against Apple's per-region and per-message limits.
pub fn validate_classes(classes: &[ClassSpec; N_CLASSES]) -> Result<(), RdmaError> {
    for (c, s) in classes.iter().enumerate() {
        let arena = s.slot_bytes * s.depth as usize;
        if s.slot_bytes % 4096 != 0 || s.slot_bytes == 0 || s.depth == 0 || s.depth > 2047 {
            return Err(gate(GateStep::Budget, format!("class {c}: {s:?} is not whole 4 KiB frames with 1..=2047 slots")));
        }
        if arena > MAX_REGION_BYTES {
            return Err(gate(GateStep::Budget, format!("class {c}: {arena} bytes exceed one memory region ({MAX_REGION_BYTES})")));
        }
    }
    Ok(())
}
