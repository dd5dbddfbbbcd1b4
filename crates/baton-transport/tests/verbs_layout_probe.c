/*
 * Layout probe: prints the size, offset or value of everything baton declares by hand in
 * src/rdma/sys.rs, compiled against the real <infiniband/verbs.h> (Debian's libibverbs-dev, or
 * the macOS SDK). tests/verbs_layout.rs compiles it, runs it and compares line by line.
 */
#include <infiniband/verbs.h>
#include <stddef.h>
#include <stdio.h>

#define P(name, value) printf("%s %zu\n", name, (size_t)(value))

int main(void)
{
	P("offsetof(ibv_context,device)", offsetof(struct ibv_context, device));
	P("offsetof(ibv_context,ops)", offsetof(struct ibv_context, ops));
	P("offsetof(ibv_context_ops,poll_cq)", offsetof(struct ibv_context_ops, poll_cq));
	P("offsetof(ibv_context_ops,req_notify_cq)", offsetof(struct ibv_context_ops, req_notify_cq));
	P("offsetof(ibv_context_ops,post_send)", offsetof(struct ibv_context_ops, post_send));
	P("offsetof(ibv_context_ops,post_recv)", offsetof(struct ibv_context_ops, post_recv));
	P("offsetof(ibv_port_attr,state)", offsetof(struct ibv_port_attr, state));
	P("offsetof(ibv_port_attr,gid_tbl_len)", offsetof(struct ibv_port_attr, gid_tbl_len));
	P("offsetof(ibv_port_attr,max_msg_sz)", offsetof(struct ibv_port_attr, max_msg_sz));
	P("offsetof(ibv_port_attr,lid)", offsetof(struct ibv_port_attr, lid));
	P("offsetof(ibv_port_attr,link_layer)", offsetof(struct ibv_port_attr, link_layer));
	P("offsetof(ibv_port_attr,port_cap_flags2)", offsetof(struct ibv_port_attr, port_cap_flags2));
	P("offsetof(ibv_global_route,sgid_index)", offsetof(struct ibv_global_route, sgid_index));
	P("offsetof(ibv_global_route,hop_limit)", offsetof(struct ibv_global_route, hop_limit));
	P("offsetof(ibv_ah_attr,dlid)", offsetof(struct ibv_ah_attr, dlid));
	P("offsetof(ibv_ah_attr,is_global)", offsetof(struct ibv_ah_attr, is_global));
	P("offsetof(ibv_ah_attr,port_num)", offsetof(struct ibv_ah_attr, port_num));
	P("offsetof(ibv_qp_attr,path_mtu)", offsetof(struct ibv_qp_attr, path_mtu));
	P("offsetof(ibv_qp_attr,rq_psn)", offsetof(struct ibv_qp_attr, rq_psn));
	P("offsetof(ibv_qp_attr,sq_psn)", offsetof(struct ibv_qp_attr, sq_psn));
	P("offsetof(ibv_qp_attr,dest_qp_num)", offsetof(struct ibv_qp_attr, dest_qp_num));
	P("offsetof(ibv_qp_attr,qp_access_flags)", offsetof(struct ibv_qp_attr, qp_access_flags));
	P("offsetof(ibv_qp_attr,cap)", offsetof(struct ibv_qp_attr, cap));
	P("offsetof(ibv_qp_attr,ah_attr)", offsetof(struct ibv_qp_attr, ah_attr));
	P("offsetof(ibv_qp_attr,pkey_index)", offsetof(struct ibv_qp_attr, pkey_index));
	P("offsetof(ibv_qp_attr,max_rd_atomic)", offsetof(struct ibv_qp_attr, max_rd_atomic));
	P("offsetof(ibv_qp_attr,max_dest_rd_atomic)", offsetof(struct ibv_qp_attr, max_dest_rd_atomic));
	P("offsetof(ibv_qp_attr,min_rnr_timer)", offsetof(struct ibv_qp_attr, min_rnr_timer));
	P("offsetof(ibv_qp_attr,port_num)", offsetof(struct ibv_qp_attr, port_num));
	P("offsetof(ibv_qp_attr,timeout)", offsetof(struct ibv_qp_attr, timeout));
	P("offsetof(ibv_qp_attr,retry_cnt)", offsetof(struct ibv_qp_attr, retry_cnt));
	P("offsetof(ibv_qp_attr,rnr_retry)", offsetof(struct ibv_qp_attr, rnr_retry));
	P("offsetof(ibv_qp_init_attr,send_cq)", offsetof(struct ibv_qp_init_attr, send_cq));
	P("offsetof(ibv_qp_init_attr,recv_cq)", offsetof(struct ibv_qp_init_attr, recv_cq));
	P("offsetof(ibv_qp_init_attr,cap)", offsetof(struct ibv_qp_init_attr, cap));
	P("offsetof(ibv_qp_init_attr,qp_type)", offsetof(struct ibv_qp_init_attr, qp_type));
	P("offsetof(ibv_qp_init_attr,sq_sig_all)", offsetof(struct ibv_qp_init_attr, sq_sig_all));
	P("offsetof(ibv_qp,context)", offsetof(struct ibv_qp, context));
	P("offsetof(ibv_qp,qp_num)", offsetof(struct ibv_qp, qp_num));
	P("offsetof(ibv_qp,state)", offsetof(struct ibv_qp, state));
	P("offsetof(ibv_qp,qp_type)", offsetof(struct ibv_qp, qp_type));
	P("offsetof(ibv_mr,addr)", offsetof(struct ibv_mr, addr));
	P("offsetof(ibv_mr,length)", offsetof(struct ibv_mr, length));
	P("offsetof(ibv_mr,lkey)", offsetof(struct ibv_mr, lkey));
	P("offsetof(ibv_send_wr,sg_list)", offsetof(struct ibv_send_wr, sg_list));
	P("offsetof(ibv_send_wr,num_sge)", offsetof(struct ibv_send_wr, num_sge));
	P("offsetof(ibv_send_wr,opcode)", offsetof(struct ibv_send_wr, opcode));
	P("offsetof(ibv_send_wr,send_flags)", offsetof(struct ibv_send_wr, send_flags));
	P("offsetof(ibv_send_wr,wr)", offsetof(struct ibv_send_wr, wr));
	P("offsetof(ibv_recv_wr,num_sge)", offsetof(struct ibv_recv_wr, num_sge));
	P("offsetof(ibv_wc,status)", offsetof(struct ibv_wc, status));
	P("offsetof(ibv_wc,opcode)", offsetof(struct ibv_wc, opcode));
	P("offsetof(ibv_wc,byte_len)", offsetof(struct ibv_wc, byte_len));
	P("offsetof(ibv_wc,qp_num)", offsetof(struct ibv_wc, qp_num));
	P("sizeof(ibv_context_ops)", sizeof(struct ibv_context_ops));
	P("sizeof(ibv_gid)", sizeof(union ibv_gid));
	P("sizeof(ibv_global_route)", sizeof(struct ibv_global_route));
	P("sizeof(ibv_ah_attr)", sizeof(struct ibv_ah_attr));
	P("sizeof(ibv_qp_cap)", sizeof(struct ibv_qp_cap));
	P("sizeof(ibv_qp_attr)", sizeof(struct ibv_qp_attr));
	P("sizeof(ibv_qp_init_attr)", sizeof(struct ibv_qp_init_attr));
	P("sizeof(ibv_sge)", sizeof(struct ibv_sge));
	P("sizeof(ibv_send_wr)", sizeof(struct ibv_send_wr));
	P("sizeof(ibv_recv_wr)", sizeof(struct ibv_recv_wr));
	P("sizeof(ibv_wc)", sizeof(struct ibv_wc));
	P("IBV_QPT_RC", IBV_QPT_RC);
	P("IBV_QPT_UC", IBV_QPT_UC);
	P("IBV_QPS_INIT", IBV_QPS_INIT);
	P("IBV_QPS_RTR", IBV_QPS_RTR);
	P("IBV_QPS_RTS", IBV_QPS_RTS);
	P("IBV_MTU_1024", IBV_MTU_1024);
	P("IBV_QP_STATE", IBV_QP_STATE);
	P("IBV_QP_ACCESS_FLAGS", IBV_QP_ACCESS_FLAGS);
	P("IBV_QP_PKEY_INDEX", IBV_QP_PKEY_INDEX);
	P("IBV_QP_PORT", IBV_QP_PORT);
	P("IBV_QP_AV", IBV_QP_AV);
	P("IBV_QP_PATH_MTU", IBV_QP_PATH_MTU);
	P("IBV_QP_TIMEOUT", IBV_QP_TIMEOUT);
	P("IBV_QP_RETRY_CNT", IBV_QP_RETRY_CNT);
	P("IBV_QP_RNR_RETRY", IBV_QP_RNR_RETRY);
	P("IBV_QP_RQ_PSN", IBV_QP_RQ_PSN);
	P("IBV_QP_MAX_QP_RD_ATOMIC", IBV_QP_MAX_QP_RD_ATOMIC);
	P("IBV_QP_MIN_RNR_TIMER", IBV_QP_MIN_RNR_TIMER);
	P("IBV_QP_SQ_PSN", IBV_QP_SQ_PSN);
	P("IBV_QP_MAX_DEST_RD_ATOMIC", IBV_QP_MAX_DEST_RD_ATOMIC);
	P("IBV_QP_CAP", IBV_QP_CAP);
	P("IBV_QP_DEST_QPN", IBV_QP_DEST_QPN);
	P("IBV_WR_SEND", IBV_WR_SEND);
	P("IBV_SEND_SIGNALED", IBV_SEND_SIGNALED);
	P("IBV_ACCESS_LOCAL_WRITE", IBV_ACCESS_LOCAL_WRITE);
	P("IBV_WC_SUCCESS", IBV_WC_SUCCESS);
	P("IBV_WC_LOC_LEN_ERR", IBV_WC_LOC_LEN_ERR);
	P("IBV_WC_RECV", IBV_WC_RECV);
	P("IBV_PORT_ACTIVE", IBV_PORT_ACTIVE);
	/* Rust declares ibv_port_attr as 64 bytes; the header's must fit in it. */
	P("port_attr_fits_64", sizeof(struct ibv_port_attr) <= 64);
	return 0;
}
