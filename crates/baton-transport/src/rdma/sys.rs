//! Hand-declared verbs ABI (rdma-core v44+ and Apple's `librdma`), loaded at run time.
//!
//! Only what the link uses is declared; structures the provider allocates (`ibv_context`,
//! `ibv_qp`) are declared as prefixes. `tests/verbs_layout.rs` compiles a C probe against the real
//! `<infiniband/verbs.h>` and compares every size, offset and constant listed in [`layout`].
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::mem::{offset_of, size_of};
use std::path::Path;

pub const IBV_QPT_RC: u32 = 2;
pub const IBV_QPT_UC: u32 = 3;
pub const IBV_QPS_INIT: u32 = 1;
pub const IBV_QPS_RTR: u32 = 2;
pub const IBV_QPS_RTS: u32 = 3;
pub const IBV_MTU_1024: u32 = 3;
pub const IBV_QP_STATE: c_int = 1 << 0;
pub const IBV_QP_ACCESS_FLAGS: c_int = 1 << 3;
pub const IBV_QP_PKEY_INDEX: c_int = 1 << 4;
pub const IBV_QP_PORT: c_int = 1 << 5;
pub const IBV_QP_AV: c_int = 1 << 7;
pub const IBV_QP_PATH_MTU: c_int = 1 << 8;
pub const IBV_QP_TIMEOUT: c_int = 1 << 9;
pub const IBV_QP_RETRY_CNT: c_int = 1 << 10;
pub const IBV_QP_RNR_RETRY: c_int = 1 << 11;
pub const IBV_QP_RQ_PSN: c_int = 1 << 12;
pub const IBV_QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
pub const IBV_QP_MIN_RNR_TIMER: c_int = 1 << 15;
pub const IBV_QP_SQ_PSN: c_int = 1 << 16;
pub const IBV_QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
pub const IBV_QP_CAP: c_int = 1 << 19;
pub const IBV_QP_DEST_QPN: c_int = 1 << 20;
pub const IBV_WR_SEND: u32 = 2;
pub const IBV_SEND_SIGNALED: u32 = 1 << 1;
pub const IBV_ACCESS_LOCAL_WRITE: c_int = 1;
pub const IBV_WC_SUCCESS: u32 = 0;
pub const IBV_WC_LOC_LEN_ERR: u32 = 1;
pub const IBV_WC_RECV: u32 = 128;
pub const IBV_PORT_ACTIVE: u32 = 4;
/// Apple's addition, absent from rdma-core's header.
pub const IBV_LINK_LAYER_THUNDERBOLT: u8 = 100;

#[repr(C)]
pub struct ibv_device {
    _opaque: [u8; 0],
}
#[repr(C)]
pub struct ibv_pd {
    _opaque: [u8; 0],
}
#[repr(C)]
pub struct ibv_cq {
    _opaque: [u8; 0],
}

pub type PollCq = unsafe extern "C" fn(*mut ibv_cq, c_int, *mut ibv_wc) -> c_int;
pub type PostSend = unsafe extern "C" fn(*mut ibv_qp, *mut ibv_send_wr, *mut *mut ibv_send_wr) -> c_int;
pub type PostRecv = unsafe extern "C" fn(*mut ibv_qp, *mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> c_int;

/// `struct ibv_context_ops`: the data-path calls are static inline in the header and go
/// through these pointers, so they cannot be found with dlsym.
#[repr(C)]
pub struct ibv_context_ops {
    _before_poll_cq: [usize; 11],
    pub poll_cq: Option<PollCq>,
    pub req_notify_cq: Option<unsafe extern "C" fn(*mut ibv_cq, c_int) -> c_int>,
    _before_post_send: [usize; 12],
    pub post_send: Option<PostSend>,
    pub post_recv: Option<PostRecv>,
    _after: [usize; 5],
}

/// Prefix of `struct ibv_context` (allocated by the provider).
#[repr(C)]
pub struct ibv_context {
    pub device: *mut ibv_device,
    pub ops: ibv_context_ops,
}

/// `struct ibv_port_attr`: 52 bytes on older headers, 56 from rdma-core v47; declared as 64 so a
/// provider writing the longer layout never writes past it.
#[repr(C, align(8))]
pub struct ibv_port_attr {
    pub state: u32,
    pub max_mtu: u32,
    pub active_mtu: u32,
    pub gid_tbl_len: c_int,
    pub port_cap_flags: u32,
    pub max_msg_sz: u32,
    pub bad_pkey_cntr: u32,
    pub qkey_viol_cntr: u32,
    pub pkey_tbl_len: u16,
    pub lid: u16,
    pub sm_lid: u16,
    pub lmc: u8,
    pub max_vl_num: u8,
    pub sm_sl: u8,
    pub subnet_timeout: u8,
    pub init_type_reply: u8,
    pub active_width: u8,
    pub active_speed: u8,
    pub phys_state: u8,
    pub link_layer: u8,
    pub flags: u8,
    pub port_cap_flags2: u16,
    _tail: [u8; 14],
}

/// `union ibv_gid`, 8-aligned like the union's `global` member (else `ibv_qp_attr` is 140 bytes).
#[repr(C, align(8))]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct ibv_gid {
    pub raw: [u8; 16],
}

#[repr(C)]
pub struct ibv_global_route {
    pub dgid: ibv_gid,
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

#[repr(C)]
pub struct ibv_ah_attr {
    pub grh: ibv_global_route,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ibv_qp_cap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

#[repr(C)]
pub struct ibv_qp_attr {
    pub qp_state: u32,
    pub cur_qp_state: u32,
    pub path_mtu: u32,
    pub path_mig_state: u32,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: c_int,
    pub cap: ibv_qp_cap,
    pub ah_attr: ibv_ah_attr,
    pub alt_ah_attr: ibv_ah_attr,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub rate_limit: u32,
}

#[repr(C)]
pub struct ibv_qp_init_attr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut ibv_cq,
    pub recv_cq: *mut ibv_cq,
    pub srq: *mut c_void,
    pub cap: ibv_qp_cap,
    pub qp_type: u32,
    pub sq_sig_all: c_int,
}

/// Prefix of `struct ibv_qp` (allocated by the provider).
#[repr(C)]
pub struct ibv_qp {
    pub context: *mut ibv_context,
    pub qp_context: *mut c_void,
    pub pd: *mut ibv_pd,
    pub send_cq: *mut ibv_cq,
    pub recv_cq: *mut ibv_cq,
    pub srq: *mut c_void,
    pub handle: u32,
    pub qp_num: u32,
    pub state: u32,
    pub qp_type: u32,
}

#[repr(C)]
pub struct ibv_mr {
    pub context: *mut ibv_context,
    pub pd: *mut ibv_pd,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

#[repr(C)]
pub struct ibv_sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

#[repr(C)]
pub struct ibv_send_wr {
    pub wr_id: u64,
    pub next: *mut ibv_send_wr,
    pub sg_list: *mut ibv_sge,
    pub num_sge: c_int,
    pub opcode: u32,
    pub send_flags: u32,
    pub imm_data: u32,
    pub wr: [u64; 4],
    pub qp_type: [u32; 2],
    pub bind_mw: [u64; 6],
}

#[repr(C)]
pub struct ibv_recv_wr {
    pub wr_id: u64,
    pub next: *mut ibv_recv_wr,
    pub sg_list: *mut ibv_sge,
    pub num_sge: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ibv_wc {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: u32,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

/// Every size, offset and constant the layout test checks against the C header.
#[doc(hidden)]
pub fn layout() -> Vec<(&'static str, usize)> {
    macro_rules! off {
        ($t:ident . $f:ident) => {
            (concat!("offsetof(", stringify!($t), ",", stringify!($f), ")"), offset_of!($t, $f))
        };
    }
    macro_rules! size {
        ($t:ident) => {
            (concat!("sizeof(", stringify!($t), ")"), size_of::<$t>())
        };
    }
    vec![
        off!(ibv_context.device),
        off!(ibv_context.ops),
        off!(ibv_context_ops.poll_cq),
        off!(ibv_context_ops.req_notify_cq),
        off!(ibv_context_ops.post_send),
        off!(ibv_context_ops.post_recv),
        size!(ibv_context_ops),
        off!(ibv_port_attr.state),
        off!(ibv_port_attr.gid_tbl_len),
        off!(ibv_port_attr.max_msg_sz),
        off!(ibv_port_attr.lid),
        off!(ibv_port_attr.link_layer),
        off!(ibv_port_attr.port_cap_flags2),
        size!(ibv_gid),
        size!(ibv_global_route),
        off!(ibv_global_route.sgid_index),
        off!(ibv_global_route.hop_limit),
        size!(ibv_ah_attr),
        off!(ibv_ah_attr.dlid),
        off!(ibv_ah_attr.is_global),
        off!(ibv_ah_attr.port_num),
        size!(ibv_qp_cap),
        size!(ibv_qp_attr),
        off!(ibv_qp_attr.path_mtu),
        off!(ibv_qp_attr.rq_psn),
        off!(ibv_qp_attr.sq_psn),
        off!(ibv_qp_attr.dest_qp_num),
        off!(ibv_qp_attr.qp_access_flags),
        off!(ibv_qp_attr.cap),
        off!(ibv_qp_attr.ah_attr),
        off!(ibv_qp_attr.pkey_index),
        off!(ibv_qp_attr.max_rd_atomic),
        off!(ibv_qp_attr.max_dest_rd_atomic),
        off!(ibv_qp_attr.min_rnr_timer),
        off!(ibv_qp_attr.port_num),
        off!(ibv_qp_attr.timeout),
        off!(ibv_qp_attr.retry_cnt),
        off!(ibv_qp_attr.rnr_retry),
        size!(ibv_qp_init_attr),
        off!(ibv_qp_init_attr.send_cq),
        off!(ibv_qp_init_attr.recv_cq),
        off!(ibv_qp_init_attr.cap),
        off!(ibv_qp_init_attr.qp_type),
        off!(ibv_qp_init_attr.sq_sig_all),
        off!(ibv_qp.context),
        off!(ibv_qp.qp_num),
        off!(ibv_qp.state),
        off!(ibv_qp.qp_type),
        off!(ibv_mr.addr),
        off!(ibv_mr.length),
        off!(ibv_mr.lkey),
        size!(ibv_sge),
        size!(ibv_send_wr),
        off!(ibv_send_wr.sg_list),
        off!(ibv_send_wr.num_sge),
        off!(ibv_send_wr.opcode),
        off!(ibv_send_wr.send_flags),
        off!(ibv_send_wr.wr),
        size!(ibv_recv_wr),
        off!(ibv_recv_wr.num_sge),
        size!(ibv_wc),
        off!(ibv_wc.status),
        off!(ibv_wc.opcode),
        off!(ibv_wc.byte_len),
        off!(ibv_wc.qp_num),
        ("IBV_QPT_RC", IBV_QPT_RC as usize),
        ("IBV_QPT_UC", IBV_QPT_UC as usize),
        ("IBV_QPS_INIT", IBV_QPS_INIT as usize),
        ("IBV_QPS_RTR", IBV_QPS_RTR as usize),
        ("IBV_QPS_RTS", IBV_QPS_RTS as usize),
        ("IBV_MTU_1024", IBV_MTU_1024 as usize),
        ("IBV_QP_STATE", IBV_QP_STATE as usize),
        ("IBV_QP_ACCESS_FLAGS", IBV_QP_ACCESS_FLAGS as usize),
        ("IBV_QP_PKEY_INDEX", IBV_QP_PKEY_INDEX as usize),
        ("IBV_QP_PORT", IBV_QP_PORT as usize),
        ("IBV_QP_AV", IBV_QP_AV as usize),
        ("IBV_QP_PATH_MTU", IBV_QP_PATH_MTU as usize),
        ("IBV_QP_TIMEOUT", IBV_QP_TIMEOUT as usize),
        ("IBV_QP_RETRY_CNT", IBV_QP_RETRY_CNT as usize),
        ("IBV_QP_RNR_RETRY", IBV_QP_RNR_RETRY as usize),
        ("IBV_QP_RQ_PSN", IBV_QP_RQ_PSN as usize),
        ("IBV_QP_MAX_QP_RD_ATOMIC", IBV_QP_MAX_QP_RD_ATOMIC as usize),
        ("IBV_QP_MIN_RNR_TIMER", IBV_QP_MIN_RNR_TIMER as usize),
        ("IBV_QP_SQ_PSN", IBV_QP_SQ_PSN as usize),
        ("IBV_QP_MAX_DEST_RD_ATOMIC", IBV_QP_MAX_DEST_RD_ATOMIC as usize),
        ("IBV_QP_CAP", IBV_QP_CAP as usize),
        ("IBV_QP_DEST_QPN", IBV_QP_DEST_QPN as usize),
        ("IBV_WR_SEND", IBV_WR_SEND as usize),
        ("IBV_SEND_SIGNALED", IBV_SEND_SIGNALED as usize),
        ("IBV_ACCESS_LOCAL_WRITE", IBV_ACCESS_LOCAL_WRITE as usize),
        ("IBV_WC_SUCCESS", IBV_WC_SUCCESS as usize),
        ("IBV_WC_LOC_LEN_ERR", IBV_WC_LOC_LEN_ERR as usize),
        ("IBV_WC_RECV", IBV_WC_RECV as usize),
        ("IBV_PORT_ACTIVE", IBV_PORT_ACTIVE as usize),
    ]
}

/// The control-path functions, resolved with dlsym.
pub struct Verbs {
    /// Never dlclosed: providers keep global state, and Apple keeps PDs until the process exits.
    _handle: *mut c_void,
    pub emulated: bool,
    pub get_device_list: unsafe extern "C" fn(*mut c_int) -> *mut *mut ibv_device,
    pub free_device_list: unsafe extern "C" fn(*mut *mut ibv_device),
    pub get_device_name: unsafe extern "C" fn(*mut ibv_device) -> *const c_char,
    pub open_device: unsafe extern "C" fn(*mut ibv_device) -> *mut ibv_context,
    pub close_device: unsafe extern "C" fn(*mut ibv_context) -> c_int,
    pub query_port: unsafe extern "C" fn(*mut ibv_context, u8, *mut ibv_port_attr) -> c_int,
    pub query_gid: unsafe extern "C" fn(*mut ibv_context, u8, c_int, *mut ibv_gid) -> c_int,
    pub alloc_pd: unsafe extern "C" fn(*mut ibv_context) -> *mut ibv_pd,
    pub dealloc_pd: unsafe extern "C" fn(*mut ibv_pd) -> c_int,
    pub reg_mr: unsafe extern "C" fn(*mut ibv_pd, *mut c_void, usize, c_int) -> *mut ibv_mr,
    pub dereg_mr: unsafe extern "C" fn(*mut ibv_mr) -> c_int,
    pub create_cq: unsafe extern "C" fn(*mut ibv_context, c_int, *mut c_void, *mut c_void, c_int) -> *mut ibv_cq,
    pub destroy_cq: unsafe extern "C" fn(*mut ibv_cq) -> c_int,
    pub create_qp: unsafe extern "C" fn(*mut ibv_pd, *mut ibv_qp_init_attr) -> *mut ibv_qp,
    pub destroy_qp: unsafe extern "C" fn(*mut ibv_qp) -> c_int,
    pub modify_qp: unsafe extern "C" fn(*mut ibv_qp, *mut ibv_qp_attr, c_int) -> c_int,
    pub query_qp: unsafe extern "C" fn(*mut ibv_qp, *mut ibv_qp_attr, c_int, *mut ibv_qp_init_attr) -> c_int,
}

// The library handle and function pointers are process-global and thread-safe per the verbs API.
unsafe impl Send for Verbs {}
unsafe impl Sync for Verbs {}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a valid C string owned by libc.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown dlopen error".into()
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Verbs {
    /// dlopens `path` and resolves every control-path function.
    // Each transmute's target type is the field it initialises.
    #[allow(clippy::missing_transmute_annotations)]
    pub fn open(path: &Path) -> Result<Verbs, String> {
        let c = CString::new(path.as_os_str().to_string_lossy().as_bytes()).map_err(|_| "path contains NUL")?;
        // SAFETY: dlopen with a valid C string.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(dl_error());
        }
        let sym = |name: &str| -> Result<*mut c_void, String> {
            let n = CString::new(name).expect("static symbol name");
            // SAFETY: valid handle and C string.
            let p = unsafe { libc::dlsym(handle, n.as_ptr()) };
            if p.is_null() {
                Err(format!("symbol {name} missing: {}", dl_error()))
            } else {
                Ok(p)
            }
        };
        macro_rules! f {
            ($name:literal) => {
                // SAFETY: the symbol has the C signature declared for the field (ABI checked by
                // the layout test against the real header).
                unsafe { std::mem::transmute::<*mut c_void, _>(sym($name)?) }
            };
        }
        // SAFETY: only probes for the symbol's presence.
        let emulated = unsafe { !libc::dlsym(handle, c"baton_verbs_emulated".as_ptr()).is_null() };
        Ok(Verbs {
            _handle: handle,
            emulated,
            get_device_list: f!("ibv_get_device_list"),
            free_device_list: f!("ibv_free_device_list"),
            get_device_name: f!("ibv_get_device_name"),
            open_device: f!("ibv_open_device"),
            close_device: f!("ibv_close_device"),
            query_port: f!("ibv_query_port"),
            query_gid: f!("ibv_query_gid"),
            alloc_pd: f!("ibv_alloc_pd"),
            dealloc_pd: f!("ibv_dealloc_pd"),
            reg_mr: f!("ibv_reg_mr"),
            dereg_mr: f!("ibv_dereg_mr"),
            create_cq: f!("ibv_create_cq"),
            destroy_cq: f!("ibv_destroy_cq"),
            create_qp: f!("ibv_create_qp"),
            destroy_qp: f!("ibv_destroy_qp"),
            modify_qp: f!("ibv_modify_qp"),
            query_qp: f!("ibv_query_qp"),
        })
    }
}
