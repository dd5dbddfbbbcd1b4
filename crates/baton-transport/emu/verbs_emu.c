/*
 * baton's EMULATED verbs provider: a shared library exporting the ibv_* control functions and a
 * real ibv_context ops table, for testing the RDMA link without hardware. It is not hardware
 * and says so (symbol `baton_verbs_emulated`, device names rdma_emu*).
 *
 * It emulates Apple's RDMA-over-Thunderbolt rules (TN3205), in one process:
 *  - UC queue pairs only (RC/UD: ENOTSUP), except on rdma_emu_rc, which offers RC like a Linux
 *    provider; at most 10 QPs per device (the 11th: EBUSY);
 *  - SEND/RECV only; memory registered with IBV_ACCESS_LOCAL_WRITE only, 16 KiB-aligned,
 *    at most 0xfa0000 bytes per region and 100 regions per device (the 101st: NULL); 11 PDs;
 *  - data moves in 4 KiB frames: a send whose frame count differs from the receive buffer's
 *    fails with IBV_WC_LOC_LEN_ERR at both ends;
 *  - a send is held until the peer posts a receive; its completion does not mean delivery:
 *    rdma_emu_drop silently drops 1 % of sends after reporting success;
 *  - GID index 1 is IPv4-mapped ::ffff:127.0.0.1 (absent on rdma_emu_nogid); RTR needs
 *    is_global=1 and IPv4-mapped source and destination GIDs, else EINVAL;
 *  - rdma_emu_down reports its port DOWN.
 * Queue pairs find each other by QP number within the process.
 */
#include <infiniband/verbs.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The header turns these into inline wrappers; the library exports the plain symbols. */
#undef ibv_get_device_list
#undef ibv_query_port
#undef ibv_reg_mr

#define EXPORT __attribute__((visibility("default")))

EXPORT const int baton_verbs_emulated = 1;

enum { FRAME_BYTES = 4096, MAX_QP = 10, MAX_MR = 100, MAX_PD = 11, MAX_MR_LEN = 0xfa0000,
       MAX_MSG = 16773120, MAX_WR = 4095, PAGE = 16384, MAX_QP_TOTAL = 1024, GID_TBL = 4 };
enum { F_DROPS = 1, F_NOGID = 2, F_DOWN = 4, F_RC = 8 };

struct emu_device {
	struct ibv_device ibdev;
	int flags, n_qp, n_mr, n_pd;
	uint64_t rng;
};

static struct emu_device devices[] = {
	{.ibdev = {.name = "rdma_emu0"}},     {.ibdev = {.name = "rdma_emu1"}},
	{.ibdev = {.name = "rdma_emu2"}},     {.ibdev = {.name = "rdma_emu3"}},
	{.ibdev = {.name = "rdma_emu4"}},     {.ibdev = {.name = "rdma_emu5"}},
	{.ibdev = {.name = "rdma_emu_drop"}, .flags = F_DROPS},
	{.ibdev = {.name = "rdma_emu_nogid"}, .flags = F_NOGID},
	{.ibdev = {.name = "rdma_emu_down"}, .flags = F_DOWN},
	{.ibdev = {.name = "rdma_emu_rc"}, .flags = F_RC},
};
#define N_DEV (sizeof devices / sizeof devices[0])

static pthread_mutex_t G = PTHREAD_MUTEX_INITIALIZER;

struct emu_context {
	struct ibv_context ctx;
	struct emu_device *dev;
};

struct emu_cq {
	struct ibv_cq cq;
	struct ibv_wc *ring;
	int cap, head, len, overrun;
};

struct emu_mr {
	struct ibv_mr mr;
	struct emu_device *dev;
	struct emu_mr *next;
};

struct posted_recv {
	uint64_t wr_id, addr;
	uint32_t length, lkey;
};

struct held_send {
	struct held_send *next;
	uint32_t src_qpn;
	uint64_t wr_id;
	int signaled;
	uint32_t len;
	unsigned char data[];
};

struct emu_qp {
	struct ibv_qp qp;
	struct emu_device *dev;
	uint32_t dest_qpn;
	int sig_all;
	struct ibv_qp_cap cap;
	struct posted_recv *rq;
	uint32_t rq_head, rq_len;
	uint32_t sq_outstanding;
	struct held_send *held_head, *held_tail;
};

static struct emu_mr *mrs;
static struct emu_qp *qps[MAX_QP_TOTAL];
static uint32_t next_qpn = 0x100;

static struct emu_device *dev_of(struct ibv_context *c) { return ((struct emu_context *)c)->dev; }

static struct emu_qp *qp_by_num(uint32_t qpn)
{
	for (int i = 0; i < MAX_QP_TOTAL; i++)
		if (qps[i] && qps[i]->qp.qp_num == qpn)
			return qps[i];
	return NULL;
}

static int mr_covers(uint32_t lkey, uint64_t addr, uint32_t len)
{
	for (struct emu_mr *m = mrs; m; m = m->next)
		if (m->mr.lkey == lkey && addr >= (uint64_t)(uintptr_t)m->mr.addr &&
		    addr + len <= (uint64_t)(uintptr_t)m->mr.addr + m->mr.length)
			return 1;
	return 0;
}

static void cq_push(struct ibv_cq *cq, const struct ibv_wc *wc)
{
	struct emu_cq *c = (struct emu_cq *)cq;
	if (c->len == c->cap) {
		c->overrun = 1;
		return;
	}
	c->ring[(c->head + c->len) % c->cap] = *wc;
	c->len++;
}

static uint32_t frames(uint32_t bytes) { return bytes == 0 ? 1 : (bytes + FRAME_BYTES - 1) / FRAME_BYTES; }

/* Matches held sends with posted receives; caller holds G. */
static void deliver(struct emu_qp *dst)
{
	while (dst->held_head && dst->rq_len) {
		struct held_send *s = dst->held_head;
		dst->held_head = s->next;
		if (!dst->held_head)
			dst->held_tail = NULL;
		struct posted_recv r = dst->rq[dst->rq_head];
		dst->rq_head = (dst->rq_head + 1) % dst->cap.max_recv_wr;
		dst->rq_len--;
		struct emu_qp *src = qp_by_num(s->src_qpn);
		int ok = frames(s->len) == frames(r.length) && s->len <= r.length;
		if (ok)
			memcpy((void *)(uintptr_t)r.addr, s->data, s->len);
		struct ibv_wc rwc = {.wr_id = r.wr_id, .status = ok ? IBV_WC_SUCCESS : IBV_WC_LOC_LEN_ERR,
				     .opcode = IBV_WC_RECV, .byte_len = ok ? s->len : 0,
				     .qp_num = dst->qp.qp_num, .src_qp = s->src_qpn};
		cq_push(dst->qp.recv_cq, &rwc);
		if (src) {
			src->sq_outstanding--;
			if (s->signaled || !ok) {
				struct ibv_wc swc = {.wr_id = s->wr_id,
						     .status = ok ? IBV_WC_SUCCESS : IBV_WC_LOC_LEN_ERR,
						     .opcode = IBV_WC_SEND, .qp_num = src->qp.qp_num};
				cq_push(src->qp.send_cq, &swc);
			}
		}
		free(s);
	}
}

static int emu_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad)
{
	struct emu_qp *q = (struct emu_qp *)qp;
	int rc = 0;
	pthread_mutex_lock(&G);
	for (; wr; wr = wr->next) {
		if (q->qp.state != IBV_QPS_RTS) { rc = EINVAL; break; }
		if (wr->opcode != IBV_WR_SEND) { rc = ENOTSUP; break; }
		if (wr->num_sge != 1 || wr->sg_list[0].length > MAX_MSG) { rc = EINVAL; break; }
		if (wr->send_flags & IBV_SEND_INLINE) { rc = EINVAL; break; }
		if (q->sq_outstanding >= q->cap.max_send_wr) { rc = ENOMEM; break; }
		struct ibv_sge *sg = &wr->sg_list[0];
		if (!mr_covers(sg->lkey, sg->addr, sg->length)) { rc = EINVAL; break; }
		int signaled = q->sig_all || (wr->send_flags & IBV_SEND_SIGNALED);
		struct emu_qp *dst = qp_by_num(q->dest_qpn);
		struct emu_device *d = q->dev;
		d->rng ^= d->rng << 13; d->rng ^= d->rng >> 7; d->rng ^= d->rng << 17;
		int drop = (d->flags & F_DROPS) && d->rng % 100 == 0 && q->qp.qp_type == IBV_QPT_UC;
		if (!dst || dst->qp.state < IBV_QPS_RTR || drop) {
			/* UC: nobody tells the sender. */
			if (signaled) {
				struct ibv_wc swc = {.wr_id = wr->wr_id, .status = IBV_WC_SUCCESS,
						     .opcode = IBV_WC_SEND, .qp_num = qp->qp_num};
				cq_push(qp->send_cq, &swc);
			}
			continue;
		}
		struct held_send *s = malloc(sizeof *s + sg->length);
		if (!s) { rc = ENOMEM; break; }
		s->next = NULL;
		s->src_qpn = qp->qp_num;
		s->wr_id = wr->wr_id;
		s->signaled = signaled;
		s->len = sg->length;
		memcpy(s->data, (void *)(uintptr_t)sg->addr, sg->length);
		q->sq_outstanding++;
		if (dst->held_tail) dst->held_tail->next = s; else dst->held_head = s;
		dst->held_tail = s;
		deliver(dst);
	}
	if (rc && bad) *bad = wr;
	pthread_mutex_unlock(&G);
	return rc;
}

static int emu_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad)
{
	struct emu_qp *q = (struct emu_qp *)qp;
	int rc = 0;
	pthread_mutex_lock(&G);
	for (; wr; wr = wr->next) {
		if (q->qp.state < IBV_QPS_INIT || q->qp.state > IBV_QPS_RTS) { rc = EINVAL; break; }
		if (wr->num_sge != 1) { rc = EINVAL; break; }
		if (q->rq_len >= q->cap.max_recv_wr) { rc = ENOMEM; break; }
		struct ibv_sge *sg = &wr->sg_list[0];
		if (!mr_covers(sg->lkey, sg->addr, sg->length)) { rc = EINVAL; break; }
		q->rq[(q->rq_head + q->rq_len) % q->cap.max_recv_wr] =
			(struct posted_recv){wr->wr_id, sg->addr, sg->length, sg->lkey};
		q->rq_len++;
	}
	if (rc && bad) *bad = wr;
	deliver(q);
	pthread_mutex_unlock(&G);
	return rc;
}

static int emu_poll_cq(struct ibv_cq *cq, int n, struct ibv_wc *wc)
{
	struct emu_cq *c = (struct emu_cq *)cq;
	int got = 0;
	pthread_mutex_lock(&G);
	if (c->overrun) {
		pthread_mutex_unlock(&G);
		return -1;
	}
	while (got < n && c->len) {
		wc[got++] = c->ring[c->head];
		c->head = (c->head + 1) % c->cap;
		c->len--;
	}
	pthread_mutex_unlock(&G);
	return got;
}

static int emu_req_notify_cq(struct ibv_cq *cq, int solicited_only)
{
	(void)cq; (void)solicited_only;
	return ENOTSUP; /* Completion channels are undocumented on Apple: callers busy-poll. */
}

EXPORT struct ibv_device **ibv_get_device_list(int *num)
{
	struct ibv_device **l = calloc(N_DEV + 1, sizeof *l);
	if (!l) { errno = ENOMEM; return NULL; }
	for (size_t i = 0; i < N_DEV; i++) {
		l[i] = &devices[i].ibdev;
		if (!devices[i].rng) devices[i].rng = 0x9e3779b97f4a7c15ULL + i;
	}
	if (num) *num = N_DEV;
	return l;
}

EXPORT void ibv_free_device_list(struct ibv_device **list) { free(list); }

EXPORT const char *ibv_get_device_name(struct ibv_device *d) { return d->name; }

EXPORT struct ibv_context *ibv_open_device(struct ibv_device *d)
{
	struct emu_context *c = calloc(1, sizeof *c);
	if (!c) { errno = ENOMEM; return NULL; }
	c->ctx.device = d;
	c->dev = (struct emu_device *)d;
	c->ctx.ops.poll_cq = emu_poll_cq;
	c->ctx.ops.req_notify_cq = emu_req_notify_cq;
	c->ctx.ops.post_send = emu_post_send;
	c->ctx.ops.post_recv = emu_post_recv;
	return &c->ctx;
}

EXPORT int ibv_close_device(struct ibv_context *c) { free(c); return 0; }

EXPORT int ibv_query_port(struct ibv_context *c, uint8_t port, struct _compat_ibv_port_attr *out)
{
	if (port != 1) return EINVAL;
	struct ibv_port_attr a;
	memset(&a, 0, sizeof a);
	a.state = (dev_of(c)->flags & F_DOWN) ? IBV_PORT_DOWN : IBV_PORT_ACTIVE;
	a.max_mtu = IBV_MTU_4096;
	a.active_mtu = IBV_MTU_4096;
	a.gid_tbl_len = GID_TBL;
	a.max_msg_sz = MAX_MSG;
	a.pkey_tbl_len = 1;
	a.link_layer = 100; /* IBV_LINK_LAYER_THUNDERBOLT, Apple's */
	memcpy(out, &a, sizeof a);
	return 0;
}

EXPORT int ibv_query_gid(struct ibv_context *c, uint8_t port, int index, union ibv_gid *gid)
{
	if (port != 1 || index < 0 || index >= GID_TBL) return EINVAL;
	memset(gid, 0, sizeof *gid);
	if (index == 0) {
		gid->raw[0] = 0xfe; gid->raw[1] = 0x80; gid->raw[15] = 1;
	} else if (index == 1 && !(dev_of(c)->flags & F_NOGID)) {
		static const unsigned char v4[16] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff,127,0,0,1};
		memcpy(gid->raw, v4, 16);
	}
	return 0;
}

EXPORT struct ibv_pd *ibv_alloc_pd(struct ibv_context *c)
{
	struct emu_device *d = dev_of(c);
	pthread_mutex_lock(&G);
	if (d->n_pd >= MAX_PD) { pthread_mutex_unlock(&G); errno = ENOMEM; return NULL; }
	d->n_pd++;
	pthread_mutex_unlock(&G);
	struct ibv_pd *pd = calloc(1, sizeof *pd);
	pd->context = c;
	return pd;
}

EXPORT int ibv_dealloc_pd(struct ibv_pd *pd)
{
	pthread_mutex_lock(&G);
	dev_of(pd->context)->n_pd--;
	pthread_mutex_unlock(&G);
	free(pd);
	return 0;
}

EXPORT struct ibv_mr *ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t len, int access)
{
	struct emu_device *d = dev_of(pd->context);
	if (access != IBV_ACCESS_LOCAL_WRITE || len == 0 || len > MAX_MR_LEN || ((uintptr_t)addr % PAGE)) {
		errno = EINVAL;
		return NULL;
	}
	pthread_mutex_lock(&G);
	if (d->n_mr >= MAX_MR) { pthread_mutex_unlock(&G); errno = ENOMEM; return NULL; }
	static uint32_t next_key = 0x1000;
	struct emu_mr *m = calloc(1, sizeof *m);
	m->mr.context = pd->context;
	m->mr.pd = pd;
	m->mr.addr = addr;
	m->mr.length = len;
	m->mr.lkey = m->mr.rkey = next_key++;
	m->dev = d;
	m->next = mrs;
	mrs = m;
	d->n_mr++;
	pthread_mutex_unlock(&G);
	return &m->mr;
}

EXPORT int ibv_dereg_mr(struct ibv_mr *mr)
{
	pthread_mutex_lock(&G);
	for (struct emu_mr **p = &mrs; *p; p = &(*p)->next)
		if (&(*p)->mr == mr) {
			struct emu_mr *m = *p;
			*p = m->next;
			m->dev->n_mr--;
			free(m);
			break;
		}
	pthread_mutex_unlock(&G);
	return 0;
}

EXPORT struct ibv_cq *ibv_create_cq(struct ibv_context *c, int cqe, void *ctx, struct ibv_comp_channel *ch, int vec)
{
	(void)vec;
	if (cqe < 1 || cqe > 65536 || ch) { errno = EINVAL; return NULL; }
	struct emu_cq *q = calloc(1, sizeof *q);
	q->ring = calloc(cqe, sizeof *q->ring);
	q->cap = cqe;
	q->cq.context = c;
	q->cq.cq_context = ctx;
	q->cq.cqe = cqe;
	return &q->cq;
}

EXPORT int ibv_destroy_cq(struct ibv_cq *cq)
{
	struct emu_cq *q = (struct emu_cq *)cq;
	free(q->ring);
	free(q);
	return 0;
}

EXPORT struct ibv_qp *ibv_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *a)
{
	struct emu_device *d = dev_of(pd->context);
	if (a->qp_type != IBV_QPT_UC && !(a->qp_type == IBV_QPT_RC && (d->flags & F_RC))) {
		errno = ENOTSUP;
		return NULL;
	}
	if (!a->cap.max_send_wr || a->cap.max_send_wr > MAX_WR || !a->cap.max_recv_wr ||
	    a->cap.max_recv_wr > MAX_WR || a->cap.max_send_sge > 1 || a->cap.max_recv_sge > 1 ||
	    a->cap.max_inline_data || a->srq) {
		errno = EINVAL;
		return NULL;
	}
	pthread_mutex_lock(&G);
	if (d->n_qp >= MAX_QP) { pthread_mutex_unlock(&G); errno = EBUSY; return NULL; }
	int slot = -1;
	for (int i = 0; i < MAX_QP_TOTAL; i++)
		if (!qps[i]) { slot = i; break; }
	if (slot < 0) { pthread_mutex_unlock(&G); errno = ENOMEM; return NULL; }
	struct emu_qp *q = calloc(1, sizeof *q);
	q->rq = calloc(a->cap.max_recv_wr, sizeof *q->rq);
	q->dev = d;
	q->cap = a->cap;
	q->sig_all = a->sq_sig_all;
	q->qp.context = pd->context;
	q->qp.pd = pd;
	q->qp.send_cq = a->send_cq;
	q->qp.recv_cq = a->recv_cq;
	q->qp.qp_num = next_qpn++;
	q->qp.state = IBV_QPS_RESET;
	q->qp.qp_type = a->qp_type;
	qps[slot] = q;
	d->n_qp++;
	pthread_mutex_unlock(&G);
	return &q->qp;
}

EXPORT int ibv_destroy_qp(struct ibv_qp *qp)
{
	struct emu_qp *q = (struct emu_qp *)qp;
	pthread_mutex_lock(&G);
	for (int i = 0; i < MAX_QP_TOTAL; i++)
		if (qps[i] == q) qps[i] = NULL;
	q->dev->n_qp--;
	while (q->held_head) {
		struct held_send *s = q->held_head;
		q->held_head = s->next;
		free(s);
	}
	pthread_mutex_unlock(&G);
	free(q->rq);
	free(q);
	return 0;
}

static int is_v4_mapped(const union ibv_gid *g)
{
	static const unsigned char p[12] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff};
	return memcmp(g->raw, p, 12) == 0;
}

EXPORT int ibv_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *a, int mask)
{
	struct emu_qp *q = (struct emu_qp *)qp;
	int rc_type = qp->qp_type == IBV_QPT_RC;
	if (!(mask & IBV_QP_STATE)) return EINVAL;
	pthread_mutex_lock(&G);
	int rc = 0;
	switch (a->qp_state) {
	case IBV_QPS_INIT: {
		int need = IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
		if (qp->state != IBV_QPS_RESET || (mask & need) != need || a->port_num != 1 ||
		    (a->qp_access_flags & ~IBV_ACCESS_LOCAL_WRITE))
			rc = EINVAL;
		break;
	}
	case IBV_QPS_RTR: {
		int need = IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN;
		if (rc_type) need |= IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
		union ibv_gid sgid;
		if (qp->state != IBV_QPS_INIT || (mask & need) != need || !a->ah_attr.is_global ||
		    a->ah_attr.port_num != 1 || !is_v4_mapped(&a->ah_attr.grh.dgid) ||
		    ibv_query_gid(qp->context, 1, a->ah_attr.grh.sgid_index, &sgid) || !is_v4_mapped(&sgid)) {
			rc = EINVAL;
			break;
		}
		q->dest_qpn = a->dest_qp_num;
		break;
	}
	case IBV_QPS_RTS: {
		int need = IBV_QP_SQ_PSN;
		if (rc_type) need |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC;
		if (qp->state != IBV_QPS_RTR || (mask & need) != need) rc = EINVAL;
		break;
	}
	case IBV_QPS_ERR:
	case IBV_QPS_RESET:
		break;
	default:
		rc = EINVAL;
	}
	if (!rc) qp->state = a->qp_state;
	pthread_mutex_unlock(&G);
	return rc;
}

EXPORT int ibv_query_qp(struct ibv_qp *qp, struct ibv_qp_attr *a, int mask, struct ibv_qp_init_attr *init)
{
	(void)mask;
	struct emu_qp *q = (struct emu_qp *)qp;
	memset(a, 0, sizeof *a);
	a->qp_state = qp->state;
	a->cap = q->cap;
	a->dest_qp_num = q->dest_qpn;
	if (init) {
		memset(init, 0, sizeof *init);
		init->cap = q->cap;
		init->qp_type = qp->qp_type;
		init->send_cq = qp->send_cq;
		init->recv_cq = qp->recv_cq;
	}
	return 0;
}
