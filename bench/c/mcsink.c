/* mcsink: multicast sink for the mcrelay benchmark.
 *
 * Joins GROUP on IFACE for each --listen GROUP:PORT@IFACE (one UDP socket
 * each, bound to the group and the device, IP_MULTICAST_ALL off), reads with
 * recvmmsg, counts packets and bytes per listen, and computes one-way latency
 * percentiles from the send time mcgen puts in each payload (CLOCK_MONOTONIC).
 * Writes "ready" on stderr once joined; exits after --duration seconds, or
 * --idle seconds without a packet once traffic has started; prints JSON.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x4252434dU
#define HDR 24
#define MAXL 64
#define VLEN 64
#define SLOT 2048
#define MAXLAT (8u << 20)

static volatile sig_atomic_t stop;
static void on_sig(int s) { (void)s; stop = 1; }

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

struct listen {
	char spec[96];
	int fd;
	uint64_t packets, bytes, foreign, reordered, max_seq;
	int seen;
};

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static void usage(void)
{
	fprintf(stderr, "usage: mcsink --listen GROUP:PORT@IFACE [--listen ...] [--duration SEC]\n"
			"              [--idle SEC] [--rcvbuf BYTES]\n");
	exit(2);
}

static int open_listen(struct listen *l, const char *spec, int rcvbuf)
{
	char g[64], ifn[IF_NAMESIZE + 1];
	int port;
	if (sscanf(spec, "%63[^:]:%d@%16s", g, &port, ifn) != 3 || port <= 0 || port > 65535) {
		fprintf(stderr, "mcsink: bad listen spec %s (GROUP:PORT@IFACE)\n", spec);
		return -1;
	}
	snprintf(l->spec, sizeof l->spec, "%s", spec);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (inet_pton(AF_INET, g, &sa.sin_addr) != 1) {
		fprintf(stderr, "mcsink: bad group %s\n", g);
		return -1;
	}
	unsigned ifindex = if_nametoindex(ifn);
	if (!ifindex) {
		fprintf(stderr, "mcsink: no interface %s\n", ifn);
		return -1;
	}
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
	int one = 1, zero = 0;
	if (fd < 0) return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf))
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
	setsockopt(fd, IPPROTO_IP, IP_MULTICAST_ALL, &zero, sizeof zero);
	if (setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, ifn, (socklen_t)strlen(ifn)) ||
	    bind(fd, (struct sockaddr *)&sa, sizeof sa)) {
		perror("mcsink: bind");
		return -1;
	}
	struct ip_mreqn mr = {.imr_multiaddr = sa.sin_addr, .imr_ifindex = (int)ifindex};
	if (IN_MULTICAST(ntohl(sa.sin_addr.s_addr)) &&
	    setsockopt(fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mr, sizeof mr)) {
		perror("mcsink: IP_ADD_MEMBERSHIP");
		return -1;
	}
	l->fd = fd;
	return 0;
}

int main(int argc, char **argv)
{
	static struct listen ls[MAXL];
	int nl = 0, rcvbuf = 16 << 20;
	double duration = 30, idle = 0.5;
	static const struct option opts[] = {
		{"listen", required_argument, 0, 'l'}, {"duration", required_argument, 0, 'd'},
		{"idle", required_argument, 0, 'I'},   {"rcvbuf", required_argument, 0, 'r'},
		{"help", no_argument, 0, 'h'},         {0, 0, 0, 0}};
	const char *specs[MAXL];
	int c;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'l':
			if (nl == MAXL) usage();
			specs[nl++] = optarg;
			break;
		case 'd': duration = atof(optarg); break;
		case 'I': idle = atof(optarg); break;
		case 'r': rcvbuf = atoi(optarg); break;
		default: usage();
		}
	}
	if (nl == 0 || duration <= 0 || idle <= 0 || rcvbuf <= 0) usage();
	int ep = epoll_create1(0);
	for (int i = 0; i < nl; i++) {
		if (open_listen(&ls[i], specs[i], rcvbuf)) return 2;
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
		epoll_ctl(ep, EPOLL_CTL_ADD, ls[i].fd, &ev);
	}
	signal(SIGINT, on_sig);
	signal(SIGTERM, on_sig);
	static struct mmsghdr msgs[VLEN];
	static struct iovec iov[VLEN];
	static char bufs[VLEN][SLOT];
	for (int i = 0; i < VLEN; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = SLOT;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	uint32_t *lat = malloc(MAXLAT * sizeof *lat); /* microseconds x 10 */
	size_t nlat = 0;
	uint64_t total = 0, first = 0, last = 0;
	fprintf(stderr, "ready\n");
	fflush(stderr);
	uint64_t t0 = now_ns(), end = t0 + (uint64_t)(duration * 1e9);
	uint64_t idle_ns = (uint64_t)(idle * 1e9);
	while (!stop) {
		struct epoll_event evs[MAXL];
		int n = epoll_wait(ep, evs, MAXL, 50);
		uint64_t t = now_ns();
		if (t >= end) break;
		if (total && t - last >= idle_ns) break;
		for (int e = 0; e < n; e++) {
			struct listen *l = &ls[evs[e].data.u32];
			for (;;) {
				int r = recvmmsg(l->fd, msgs, VLEN, MSG_DONTWAIT, NULL);
				if (r <= 0) break;
				uint64_t rt = now_ns();
				if (!first) first = rt;
				last = rt;
				total += (uint64_t)r;
				for (int i = 0; i < r; i++) {
					unsigned len = msgs[i].msg_len;
					uint32_t *h = (uint32_t *)bufs[i];
					l->packets++;
					l->bytes += len;
					if (len < HDR || h[0] != MAGIC) {
						l->foreign++;
						continue;
					}
					uint64_t seq, st;
					memcpy(&seq, &h[2], 8);
					memcpy(&st, &h[4], 8);
					if (l->seen && seq < l->max_seq) l->reordered++;
					if (!l->seen || seq > l->max_seq) l->max_seq = seq;
					l->seen = 1;
					if (lat && nlat < MAXLAT && rt >= st) {
						uint64_t d = (rt - st) / 100; /* 0.1 us units */
						lat[nlat++] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
					}
				}
				if (r < VLEN) break;
			}
		}
	}
	printf("{\"packets\": %llu, \"first_ns\": %llu, \"last_ns\": %llu, \"listens\": [",
	       (unsigned long long)total, (unsigned long long)first, (unsigned long long)last);
	for (int i = 0; i < nl; i++)
		printf("%s{\"listen\": \"%s\", \"packets\": %llu, \"bytes\": %llu, \"foreign\": %llu, "
		       "\"reordered\": %llu, \"max_seq\": %llu}",
		       i ? ", " : "", ls[i].spec, (unsigned long long)ls[i].packets,
		       (unsigned long long)ls[i].bytes, (unsigned long long)ls[i].foreign,
		       (unsigned long long)ls[i].reordered, (unsigned long long)ls[i].max_seq);
	printf("], \"latency_us\": ");
	if (nlat) {
		qsort(lat, nlat, sizeof *lat, cmp_u32);
		double q[] = {0.5, 0.9, 0.99, 0.999};
		const char *k[] = {"p50", "p90", "p99", "p999"};
		printf("{\"samples\": %zu", nlat);
		for (int i = 0; i < 4; i++)
			printf(", \"%s\": %.1f", k[i], lat[(size_t)(q[i] * (double)(nlat - 1))] / 10.0);
		printf(", \"max\": %.1f}}\n", lat[nlat - 1] / 10.0);
	} else {
		printf("null}\n");
	}
	return 0;
}
