// capture.c -- eBPF traffic capture for nodeagent, compiled by bcc (0.26) at load time;
// loaded, attached and pinned by nodeagent/redirect/ebpf.py.
//
// One compiled object serves the whole node: the same programs are attached to every
// pod's cgroup (outbound) and every pod's netns (inbound). Per-pod state lives in maps
// keyed by netns cookie / pod IP, so nothing pod-specific is baked into the code.
//
// Flow of one outbound connection (app 10.0.0.5:41000 -> svc 10.250.0.1:8080):
//   connect4   app socket: storage := 10.250.0.1:8080; connect goes to 127.0.0.1:15001
//   sockops    app socket ESTABLISHED: tuple_dst[netns,127.0.0.1,41000] := storage
//   sockops    proxy child ESTABLISHED: child storage := tuple_dst[...]; delete it
//   getsockopt proxy: SO_ORIGINAL_DST answered from the child's storage
//   getpeername4 app: answered from the app socket's storage
//
// Local socket bypass (Merbridge-style; on when the `settings` map says so): the two
// loopback legs inside a pod's netns -- app <-> proxy outbound listener, and proxy <->
// app on the pod IP for inbound -- are put into the `local_socks` sockhash when they are
// established; msg_bypass (sk_msg) then hands each sendmsg() straight to the peer
// socket's receive queue, skipping TCP/IP. Only the payload path changes: connect,
// accept, FIN and RST still take the stack, so the proxy sees every connection and
// applies mTLS and policy as before. A socket whose first bytes went through the stack
// (its peer was not in the map yet) keeps using the stack, so bytes are never reordered.
//
// What connect4/6 capture: TCP to mesh addresses (`mesh_ips`); with the `settings` map's
// capture-all switch on (MeshConfig outboundTrafficPolicy REGISTRY_ONLY), TCP to every
// address but loopback, so the proxy refuses what the registry does not know (NR) as it
// does in iptables mode, and real IPv6 is refused at connect() (EPERM). Either way not
// the pod's excluded outbound ports (with the DNS proxy, 53 is one) nor the proxy's own.
//
// Constants come from cflags (-D...):
//   PROXY_MARK           SO_MARK of the proxy's own upstream sockets (0x539)
//   TRANSPARENT_MARK     SO_MARK of the proxy's sockets to the app from a client's address
//                        (0x1539, IP_TRANSPARENT); the app's accepted end carries it too
//                        (net.ipv4.tcp_fwmark_accept, see nodeagent/redirect/srcroute.py)
//   OUTBOUND_PORT        proxy outbound listener, on 127.0.0.1 in each pod netns (15001)
//   INBOUND_PORT         proxy inbound listener (15006)
//   HBONE_PORT           never steered inbound (15008)
//   PIN_DIR              bpffs directory for the maps, a string ("/sys/fs/bpf/x")
//
// Programs (load_func prog type / attach type):
//   connect4_capture  CGROUP_SOCK_ADDR (18) / CGROUP_INET4_CONNECT (10)     pod cgroup
//   connect6_capture  CGROUP_SOCK_ADDR (18) / CGROUP_INET6_CONNECT (11)     pod cgroup
//   getpeername6_fix  CGROUP_SOCK_ADDR (18) / CGROUP_INET6_GETPEERNAME (30) pod cgroup
//   sockops_rekey     SOCK_OPS (13)         / CGROUP_SOCK_OPS (3)           pod + PROXY cgroup
//   getpeername4_fix  CGROUP_SOCK_ADDR (18) / CGROUP_INET4_GETPEERNAME (29) pod cgroup
//   getsockopt_odst   CGROUP_SOCKOPT (25)   / CGROUP_GETSOCKOPT (21)        PROXY's cgroup
//   connect4_proxy    CGROUP_SOCK_ADDR (18) / CGROUP_INET4_CONNECT (10)     PROXY's cgroup
//   sk_lookup_inbound SK_LOOKUP (30)        / SK_LOOKUP (36)                pod netns (link)
//   msg_bypass        SK_MSG (16)           / SK_MSG_VERDICT (7)            local_socks map
//
// NB getsockopt_odst must be attached to the cgroup of the process that owns the proxy's
// LISTENING socket: an accepted socket inherits the listener's cgroup, not the client's.

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>      // IPPROTO_TCP (gotcha 3)
#include <linux/socket.h>
#include <linux/tcp.h>

#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif
#define SOL_IP 0
#define SO_ORIGINAL_DST 80
#define LOOPBACK_IFINDEX 1

// NB if you need socket cookies: bcc 0.26 declares bpf_get_socket_cookie() as returning
// u32 (truncated). Declare your own:
//   static __u64 (*get_socket_cookie)(void *) = (void *)BPF_FUNC_get_socket_cookie;

// Original destination, both fields in network byte order (as in struct sockaddr_in).
struct orig_dst {
    __u32 ip;
    __u16 port;
    __u16 pad;
};

// Hand-off key: a captured connection as seen from both ends of the loopback hop,
// i.e. the app's (ip, port) inside one netns.
struct tuple_key {
    __u64 netns;    // bpf_get_netns_cookie(): 127.0.0.1:port is only unique per netns
    __u32 ip;       // network byte order
    __u32 port;     // host byte order
};

// Per-socket storage (BPF_MAP_TYPE_SK_STORAGE): the original destination hangs off
// the socket itself and is freed with it -- no cleanup, no stale entries. This is
// "keyed by socket cookie" done by the kernel. Used on two sockets per connection:
//   the app's socket       (set by connect4; read by getpeername4 and sockops)
//   the proxy's accepted   (set by sockops PASSIVE_ESTABLISHED; read by getsockopt)
// bcc 0.26 has BPF_SK_STORAGE but no pinned variant: spell out the same struct with
// a "sk_storage:<pin path>" section, which bcc's frontend pins/reopens like
// BPF_TABLE_PINNED. Pinned so that getpeername still works for connections made
// before an agent restart.
struct sk_dst_table_t {
    int key;
    struct orig_dst leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage:" PIN_DIR "/sk_dst")))
struct sk_dst_table_t sk_dst = { .flags = BPF_F_NO_PREALLOC };
BPF_ANNOTATE_KV_PAIR(sk_dst, int, struct orig_dst);

// (netns, app ip, app port) -> orig dst: written when the app's socket is established,
// moved onto the proxy's accepted socket (and deleted) one step later, when that one
// is established. Lives for one handshake; LRU only guards against odd leftovers.
BPF_TABLE_PINNED("lru_hash", struct tuple_key, struct orig_dst, tuple_dst, 16384, PIN_DIR "/tuple_dst");
// pod IP (network byte order) -> that pod's inbound listener (INBOUND_PORT), for sk_lookup.
BPF_TABLE_PINNED("sockhash", __u32, int, inbound_listener, 1024, PIN_DIR "/inbound_listener");
// pod IP -> 1 for every pod whose inbound is captured. Outlives the proxy process (the
// sockhash entry does not: closing the listener removes it), so while the agent
// restarts inbound connects are refused (SK_DROP = lookup fails with ECONNREFUSED, the
// SYN gets a RST) instead of reaching the app around the proxy.
BPF_TABLE_PINNED("hash", __u32, __u32, inbound_pods, 1024, PIN_DIR "/inbound_pods");
// Mesh addresses (network byte order) -> 1: pod IPs and service cluster IPs, kept in step
// with the mesh snapshot by the agent. Connects to anything else are left alone.
BPF_TABLE_PINNED("hash", __u32, __u32, mesh_ips, 65536, PIN_DIR "/mesh_ips");
// The proxy's own connections to an app from a client's address (IP_TRANSPARENT, mark
// TRANSPARENT_MARK), while their SYN may still be in flight: sk_lookup lets them reach the
// app instead of steering them back to the proxy (they come from the pod's own netns, but
// look like inbound traffic from the client; inet_iif is the pod's interface, not lo).
// Written by sockops when the SYN is about to leave (TCP_CONNECT_CB, so before it), and
// deleted when the socket leaves SYN_SENT (STATE_CB): established, refused or timed out.
// LRU: an agent killed mid-handshake leaves entries that age out.
struct leg_key {
    __u32 client_ip;    // network byte order: the proxy socket's (transparent) address
    __u32 pod_ip;       // network byte order: the app's
    __u32 client_port;  // host byte order
    __u32 pod_port;     // host byte order
};
BPF_TABLE_PINNED("lru_hash", struct leg_key, __u32, own_legs, 65536, PIN_DIR "/own_legs");
// Counters for the demo / `ctl bpf`: 0 captured, 1 skipped (proxy mark),
// 2 odst answered, 3 inbound steered, 4 messages and 5 bytes bypassed, 6 messages that
// took the stack on a bypass socket (its peer was not, or no longer, in local_socks),
// 7 the proxy's transparent connections to an app let through by sk_lookup (own_legs),
// 8 IPv6 connects refused while all TCP is captured (SETTING_CAPTURE_ALL). 9-15 spare.
BPF_TABLE_PINNED("array", int, __u64, stats, 16, PIN_DIR "/stats");
// Istio's traffic.sidecar.istio.io/exclude{Outbound,Inbound}Ports, per pod, kept by the
// agent: a connect() from the pod (its netns cookie) to an excluded port is not captured,
// and inbound to an excluded port of the pod IP is not steered. The value is the pod IP,
// so the agent can drop a pod's entries without remembering its netns cookie.
struct exclude_out_key {
    __u64 netns;
    __u32 port;     // host byte order
    __u32 pad;
};
struct exclude_in_key {
    __u32 ip;       // pod IP, network byte order
    __u32 port;     // host byte order
};
BPF_TABLE_PINNED("hash", struct exclude_out_key, __u32, exclude_out, 4096, PIN_DIR "/exclude_out");
BPF_TABLE_PINNED("hash", struct exclude_in_key, __u32, exclude_in, 4096, PIN_DIR "/exclude_in");
// Written by the agent: 0 bypass (1 = on); 1 capture all outbound TCP, not only mesh
// addresses (1 = on: MeshConfig outboundTrafficPolicy REGISTRY_ONLY, so that the proxy
// refuses what is not in the registry).
BPF_TABLE_PINNED("array", int, __u32, settings, 4, PIN_DIR "/settings");
#define SETTING_BYPASS 0
#define SETTING_CAPTURE_ALL 1

// One end of a local leg, as seen from that end (addresses in network byte order, ports
// in host byte order). The peer's key is the same with source and destination swapped;
// the netns cookie keeps 127.0.0.1:port of different pods apart.
struct sock_key {
    __u64 netns;
    __u32 sip;
    __u32 dip;
    __u32 sport;
    __u32 dport;
};
// The local legs' sockets. A sockhash drops a socket by itself when it closes. As with
// sk_dst, bcc 0.26 has no pinned sockhash macro with the sockhash helpers: spelled out.
struct local_socks_table_t {
    struct sock_key key;
    int leaf;
    int (*update)(struct sock_key *, int *);
    int (*delete)(struct sock_key *);
    int (*sock_hash_update)(void *, void *, u64);
    int (*msg_redirect_hash)(void *, void *, u64);
    int (*sk_redirect_hash)(void *, void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/sockhash:" PIN_DIR "/local_socks")))
struct local_socks_table_t local_socks = { .max_entries = 65536 };
BPF_ANNOTATE_KV_PAIR(local_socks, struct sock_key, int);

// Sockets of local_socks that once sent through the stack: they keep doing so.
struct no_bypass_table_t {
    int key;
    __u32 leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage")))
struct no_bypass_table_t no_bypass = { .flags = BPF_F_NO_PREALLOC };
BPF_ANNOTATE_KV_PAIR(no_bypass, int, __u32);

static __always_inline void count_n(int idx, __u64 n)
{
    __u64 *v = stats.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, n);
}

static __always_inline void count(int idx)
{
    count_n(idx, 1);
}

static __always_inline int setting(int idx)
{
    __u32 *on = settings.lookup(&idx);
    return on && *on;
}

static __always_inline int is_loopback(__u32 ip)
{
    return (bpf_ntohl(ip) >> 24) == 127;
}

// ---------------------------------------------------------------- outbound: connect4/6
// excludeOutboundPorts of the connecting pod (its netns cookie)
static __always_inline int port_excluded(struct bpf_sock_addr *ctx)
{
    struct exclude_out_key ex = {};
    ex.netns = bpf_get_netns_cookie(ctx);
    ex.port = bpf_ntohs((__u16)ctx->user_port);
    return exclude_out.lookup(&ex) != 0;
}

// Whether a connect() to `dst` (network byte order) is captured: a TCP socket dialling a
// mesh address -- or, with SETTING_CAPTURE_ALL, any address but loopback and 0.0.0.0 --
// that is not the proxy's own. The original destination (dst, port) is then kept on the
// socket; the caller rewrites the address to the proxy's listener.
static __always_inline int capture(struct bpf_sock_addr *ctx, __u32 dst)
{
    if (ctx->type != SOCK_STREAM)
        return 0;
    if (!mesh_ips.lookup(&dst)) {
        // not a mesh destination: untouched, unless all TCP is captured (REGISTRY_ONLY)
        if (dst == 0 || is_loopback(dst) || !setting(SETTING_CAPTURE_ALL))
            return 0;
    }
    if (port_excluded(ctx))
        return 0;                       // excludeOutboundPorts

    // The proxy's own upstream sockets carry SO_MARK PROXY_MARK, set before connect().
    // A sock_addr program reads the socket's mark directly as ctx->sk->mark (there is
    // no skb yet). In nodeagent the proxy's sockets are created by the agent process,
    // so they belong to the agent's cgroup and never reach this program at all; the
    // mark is the second line of defence (proxy inside the pod cgroup, nested cgroups).
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 0;
    if (sk->mark == PROXY_MARK) {
        count(1);
        return 0;
    }

    struct orig_dst *od = sk_dst.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!od)
        return 0;                       // out of memory: leave the connect alone
    od->ip = dst;
    od->port = (__u16)ctx->user_port;   // network byte order in the low 16 bits
    count(0);
    return 1;
}

// Return 1 = allow the connect() (possibly rewritten), 0 = EPERM.
int connect4_capture(struct bpf_sock_addr *ctx)
{
    if (capture(ctx, ctx->user_ip4)) {
        ctx->user_ip4 = bpf_htonl(0x7f000001);          // 127.0.0.1
        ctx->user_port = bpf_htons(OUTBOUND_PORT);
    }
    return 1;
}

// The same for a dual-stack (AF_INET6) socket dialling an IPv4 address as ::ffff:a.b.c.d,
// as gRPC and others do: rewritten to ::ffff:127.0.0.1:OUTBOUND_PORT (the proxy's IPv4
// listener accepts it). Real IPv6 is not captured (the mesh is IPv4, and the original
// destination an IPv4 address): left alone, or refused while all TCP is captured.
static __always_inline int v4_mapped(__u32 a0, __u32 a1, __u32 a2)
{
    return a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff);
}

static __always_inline void set_v4_mapped(struct bpf_sock_addr *ctx, __u32 ip)
{
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
    ctx->user_ip6[3] = ip;
}

// A real IPv6 TCP connect while all TCP is captured (REGISTRY_ONLY): no registry entry
// can be dialled over IPv6, so it is refused (EPERM) -- but not ::1 or ::, an excluded
// port, nor the proxy's own sockets.
static __always_inline int refuse_v6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM || !setting(SETTING_CAPTURE_ALL))
        return 0;
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2];
    __u32 a3 = ctx->user_ip6[3];
    if ((a0 | a1 | a2) == 0 && (a3 == 0 || a3 == bpf_htonl(1)))
        return 0;                       // :: or ::1, this host
    if (port_excluded(ctx))
        return 0;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->mark == PROXY_MARK)
        return 0;
    count(8);
    return 1;
}

int connect6_capture(struct bpf_sock_addr *ctx)
{
    if (!v4_mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2]))
        return refuse_v6(ctx) ? 0 : 1;
    if (capture(ctx, ctx->user_ip6[3])) {
        set_v4_mapped(ctx, bpf_htonl(0x7f000001));
        ctx->user_port = bpf_htons(OUTBOUND_PORT);
    }
    return 1;
}

// ---------------------------------------------------------------- proxy: connect4
// Attached to the agent's cgroup. The proxy's transparent connection to an app binds the
// client's address on a port the kernel picks; a plaintext client's own connection to
// the same app port, steered by sk_lookup, lives in the same netns as (pod ip:port,
// client ip:its port). Were the kernel to pick that port, the proxy's SYN would land on
// that established socket and the connect would hang. Refuse it (EPERM) instead: the
// proxy then binds another port.
int connect4_proxy(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->mark != TRANSPARENT_MARK || ctx->type != SOCK_STREAM)
        return 1;
    struct bpf_sock_tuple t = {};
    t.ipv4.saddr = sk->src_ip4;
    t.ipv4.sport = bpf_htons((__u16)sk->src_port);
    t.ipv4.daddr = ctx->user_ip4;
    t.ipv4.dport = (__u16)ctx->user_port;
    struct bpf_sock *found = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!found)
        return 1;
    int taken = found->state != BPF_TCP_LISTEN;
    bpf_sk_release(found);
    return taken ? 0 : 1;
}

// ---------------------------------------------------------------- sockops
// Attached to the pod cgroup (app side) AND the agent cgroup (proxy side).
//  ACTIVE_ESTABLISHED (app socket): its local port is now known; publish the orig dst
//    under (netns, local ip, local port).
//  PASSIVE_ESTABLISHED (proxy's new child socket; fires after the app's side on the
//    same loopback hop, before accept()): take the entry for (netns, remote ip, remote
//    port) onto the child socket's storage and delete it. A direct, uncaptured connect
//    to 127.0.0.1:15001 therefore never inherits a stale destination.
// The IPv4 address of one end (`local` or `remote`) of a sockops or sk_msg context: the
// v4 field, or for a dual-stack socket the low word of its v4-mapped v6 address (its
// ::ffff:127.0.0.1 is the same 127.0.0.1 the proxy sees). Read through volatile: clang
// would otherwise select the ctx offset, and the verifier rejects a modified ctx pointer
// (both fields are read, then one is chosen: a conditional read is rejected the same way).
#define END_IP4(ctx, end, is_v4) ({                              \
    __u32 _v4 = *(volatile __u32 *)&(ctx)->end##_ip4;           \
    __u32 _mapped = *(volatile __u32 *)&(ctx)->end##_ip6[3];    \
    (is_v4) ? _v4 : _mapped;                                     \
})

// Put an established local-leg socket into local_socks (when the bypass is on).
static __always_inline void bypass_add(struct bpf_sock_ops *skops, __u64 netns,
                                       __u32 lip, __u32 rip)
{
    if (!setting(SETTING_BYPASS))
        return;
    struct sock_key sk = {};
    sk.netns = netns;
    sk.sip = lip;
    sk.dip = rip;
    sk.sport = skops->local_port;
    sk.dport = bpf_ntohl(skops->remote_port);
    int err = local_socks.sock_hash_update(skops, &sk, BPF_NOEXIST);  // gotcha 2
    (void)err;
}

int sockops_rekey(struct bpf_sock_ops *skops)
{
    int op = skops->op;
    int family = skops->family;
    if (family != 2 /* AF_INET */ && family != 10 /* AF_INET6, v4-mapped only */)
        return 1;
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 1;
    struct tuple_key k = {};
    k.netns = bpf_get_netns_cookie(skops);
    __u32 lip = END_IP4(skops, local, family == 2);
    __u32 rip = END_IP4(skops, remote, family == 2);

    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB || op == BPF_SOCK_OPS_STATE_CB) {
        // the proxy's transparent connection to an app (the agent's cgroup): own_legs
        if (sk->mark != TRANSPARENT_MARK || family != 2)
            return 1;
        struct leg_key lk = {};
        lk.client_ip = lip;
        lk.pod_ip = rip;
        lk.client_port = skops->local_port;
        lk.pod_port = bpf_ntohl(skops->remote_port);
        if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
            __u32 one = 1;
            own_legs.update(&lk, &one);
            bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        } else if (skops->args[0] == BPF_TCP_SYN_SENT) {
            own_legs.delete(&lk);
            bpf_sock_ops_cb_flags_set(skops, 0);    // no more state callbacks
        }
        return 1;
    }
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        struct orig_dst *od = sk_dst.sk_storage_get(sk, 0, 0);
        if (!od) {
            // the proxy dialling the app (inbound leg, proxy's end): from the pod IP, or
            // from the client's address (transparent)
            if ((sk->mark == PROXY_MARK && rip == lip) || sk->mark == TRANSPARENT_MARK)
                bypass_add(skops, k.netns, lip, rip);
            return 1;
        }
        struct orig_dst copy = *od;
        k.ip = lip;
        k.port = skops->local_port;     // host byte order
        tuple_dst.update(&k, &copy);
        bypass_add(skops, k.netns, lip, rip);   // outbound leg, app's end
    } else if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        if (skops->local_port != OUTBOUND_PORT) {
            // the app's end of the inbound leg: accepted from its own pod IP (only the
            // proxy's marked socket is a peer in local_socks; others find none), or from
            // the proxy's transparent socket, whose mark it took
            if ((rip == lip && !is_loopback(lip)) || sk->mark == TRANSPARENT_MARK)
                bypass_add(skops, k.netns, lip, rip);
            return 1;
        }
        k.ip = rip;
        // sockops remote_port is the be16 port shifted left by 16: ntohl() gives it.
        k.port = bpf_ntohl(skops->remote_port);
        struct orig_dst *od = tuple_dst.lookup(&k);
        if (!od)
            return 1;
        struct orig_dst copy = *od;
        struct orig_dst *st = sk_dst.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
        if (st)
            *st = copy;
        tuple_dst.delete(&k);
        bypass_add(skops, k.netns, lip, rip);   // outbound leg, proxy's end
    }
    return 1;
}

// ---------------------------------------------------------------- local bypass: sk_msg
// Runs on every sendmsg() of a socket in local_socks. The peer socket is the one whose
// key is ours reversed; its receive queue gets the bytes directly (BPF_F_INGRESS).
int msg_bypass(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_PASS;
    __u32 *stuck = no_bypass.sk_storage_get(sk, 0, 0);
    if (stuck) {
        count(6);
        return SK_PASS;
    }
    struct sock_key peer = {};
    peer.netns = bpf_get_netns_cookie(msg);
    int v4 = msg->family == 2;
    peer.sip = END_IP4(msg, remote, v4);
    peer.dip = END_IP4(msg, local, v4);
    peer.sport = bpf_ntohl(msg->remote_port);
    peer.dport = msg->local_port;
    __u64 size = msg->size;
    long verdict = local_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict == SK_PASS) {
        count(4);
        count_n(5, size);
        return SK_PASS;
    }
    // No peer (not established yet, or gone): through the stack, now and from now on --
    // later bytes redirected past these would overtake them.
    __u32 *mark = no_bypass.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (mark)
        *mark = 1;
    count(6);
    return SK_PASS;
}

// ---------------------------------------------------------------- outbound: getpeername
// The app asked for its peer: give back the address it dialled, not 127.0.0.1:15001.
static __always_inline struct orig_dst *dialled(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 0;
    return sk_dst.sk_storage_get(sk, 0, 0);
}

int getpeername4_fix(struct bpf_sock_addr *ctx)
{
    struct orig_dst *od = dialled(ctx);
    if (od) {
        ctx->user_ip4 = od->ip;
        ctx->user_port = od->port;
    }
    return 1;
}

int getpeername6_fix(struct bpf_sock_addr *ctx)
{
    struct orig_dst *od = dialled(ctx);
    if (od) {
        set_v4_mapped(ctx, od->ip);
        ctx->user_port = od->port;
    }
    return 1;
}

// ---------------------------------------------------------------- proxy: getsockopt
// getsockopt(SOL_IP, SO_ORIGINAL_DST) on the proxy's accepted socket. Runs after the
// kernel's own handler (conntrack: ENOENT/ENOPROTOOPT when not NATed); we only override
// when the socket carries our storage, so iptables mode keeps working beside it.
int getsockopt_odst(struct bpf_sockopt *ctx)
{
    if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct orig_dst *od = sk_dst.sk_storage_get(sk, 0, 0);
    if (!od)
        return 1;

    struct sockaddr_in *sin = ctx->optval;
    if ((void *)(sin + 1) > ctx->optval_end)
        return 1;                               // user buffer < 16 bytes
    sin->sin_family = AF_INET;
    sin->sin_port = od->port;
    sin->sin_addr.s_addr = od->ip;
    // Gotcha 4: clang merges these two adjacent 4-byte stores into one 8-byte store,
    // which the verifier rejects for this context. volatile keeps them separate.
    *(volatile int *)&ctx->optlen = sizeof(*sin);
    *(volatile int *)&ctx->retval = 0;
    count(2);
    return 1;
}

// ---------------------------------------------------------------- inbound: sk_lookup
// Runs in the pod's netns when a SYN finds no established socket, before the normal
// listener lookup. Steers TCP to any port of the pod IP to the proxy's inbound listener;
// the proxy learns the original destination with getsockname() (like TPROXY).
int sk_lookup_inbound(struct bpf_sk_lookup *ctx)
{
    if (ctx->family != 2 /* AF_INET */ || ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    // No packet: a lookup by a BPF helper (connect4_proxy), answered as without us.
    if (ctx->ingress_ifindex == 0)
        return SK_PASS;
    // Only traffic arriving from outside the pod: the proxy delivering to the app on
    // the pod IP (over lo) must not be looped back to itself.
    if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
        return SK_PASS;
    // Connections made inside the pod's netns (the proxy dialling the app on the pod
    // IP, the app calling itself) come from the pod IP itself: leave them alone, or the
    // proxy would be steered back to its own listener.
    if (ctx->remote_ip4 == ctx->local_ip4 || (bpf_ntohl(ctx->remote_ip4) >> 24) == 127)
        return SK_PASS;
    if (ctx->local_port == HBONE_PORT || ctx->local_port == INBOUND_PORT)
        return SK_PASS;
    // the proxy's own connection to the app from the client's address (own_legs)
    struct leg_key lk = {};
    lk.client_ip = ctx->remote_ip4;
    lk.pod_ip = ctx->local_ip4;
    lk.client_port = bpf_ntohs(ctx->remote_port);
    lk.pod_port = ctx->local_port;
    if (own_legs.lookup(&lk)) {
        count(7);
        return SK_PASS;
    }
    __u32 podip = ctx->local_ip4;
    struct exclude_in_key ex = {};
    ex.ip = podip;
    ex.port = ctx->local_port;
    if (exclude_in.lookup(&ex))
        return SK_PASS;                 // excludeInboundPorts: straight to the app
    struct bpf_sock *sk = (struct bpf_sock *)inbound_listener.lookup(&podip);
    if (!sk) {
        __u32 *captured = inbound_pods.lookup(&podip);
        if (captured)
            return SK_DROP;             // captured pod, proxy down: fail closed
        return SK_PASS;                 // not a captured pod: normal lookup
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err == 0)
        count(3);
    return SK_PASS;                     // PASS + assigned socket = steer
}
