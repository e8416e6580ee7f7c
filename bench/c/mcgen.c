/* mcgen: UDP multicast generator for the mcrelay benchmark.
 *
 * Sends datagrams to GROUP:PORT out of one interface with sendmmsg batches,
 * either flat out or paced at a target rate, for a duration or a count.
 * With --groups N the traffic is N interleaved flows: the datagram with
 * sequence number s goes to group GROUP + (s / BURST) % N (IPv4, counted in
 * host byte order: 239.1.1.1, 239.1.1.2, ...), i.e. BURST datagrams to one
 * group, then BURST to the next, round robin.
 * Every payload starts with a header the sink understands:
 *   u32 magic 'MCRB' | u32 stream | u64 sequence | u64 send time (ns, CLOCK_MONOTONIC)
 * (CLOCK_MONOTONIC is the same in every network namespace of one host, so the
 * sink can compute one-way latency). Prints one JSON object on stdout.
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
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x4252434dU /* "MCRB" little endian */
#define HDR 24
#define MAXBATCH 1024
#define MAXGROUPS 65536

static volatile sig_atomic_t stop;
static void on_sig(int s) { (void)s; stop = 1; }

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: mcgen --group ADDR --port N --iface NAME [--size BYTES] [--rate PPS]\n"
		"             [--duration SEC] [--count N] [--batch N] [--ttl N] [--stream N]\n"
		"             [--groups N] [--burst K]\n"
		"  --rate 0 (default) sends flat out; size >= %d (payload bytes)\n"
		"  --groups N (default 1, at most %d): datagram s goes to GROUP + (s / K) %% N,\n"
		"  i.e. --burst K (default 1) datagrams per group in turn\n", HDR, MAXGROUPS);
	exit(2);
}

int main(int argc, char **argv)
{
	const char *group = NULL, *iface = NULL;
	int port = 0, size = 64, batch = 32, ttl = 16, groups = 1, burst = 1;
	double rate = 0, duration = 0;
	long long count = 0;
	unsigned stream = 0;
	static const struct option opts[] = {
		{"group", required_argument, 0, 'g'}, {"port", required_argument, 0, 'p'},
		{"iface", required_argument, 0, 'i'}, {"size", required_argument, 0, 's'},
		{"rate", required_argument, 0, 'r'},  {"duration", required_argument, 0, 'd'},
		{"count", required_argument, 0, 'c'}, {"batch", required_argument, 0, 'b'},
		{"ttl", required_argument, 0, 't'},   {"stream", required_argument, 0, 'S'},
		{"groups", required_argument, 0, 'G'}, {"burst", required_argument, 0, 'B'},
		{"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
	int c;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'g': group = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'i': iface = optarg; break;
		case 's': size = atoi(optarg); break;
		case 'r': rate = atof(optarg); break;
		case 'd': duration = atof(optarg); break;
		case 'c': count = atoll(optarg); break;
		case 'b': batch = atoi(optarg); break;
		case 't': ttl = atoi(optarg); break;
		case 'S': stream = (unsigned)atoi(optarg); break;
		case 'G': groups = atoi(optarg); break;
		case 'B': burst = atoi(optarg); break;
		default: usage();
		}
	}
	if (!group || !iface || port <= 0 || port > 65535 || size < HDR || size > 65000 ||
	    batch < 1 || batch > MAXBATCH || rate < 0 || (duration <= 0 && count <= 0) ||
	    ttl < 1 || ttl > 255 || groups < 1 || groups > MAXGROUPS || burst < 1)
		usage();
	struct in_addr base;
	if (inet_pton(AF_INET, group, &base) != 1) {
		fprintf(stderr, "mcgen: bad group %s\n", group);
		return 2;
	}
	uint32_t base_h = ntohl(base.s_addr);
	if ((uint64_t)base_h + (uint64_t)groups - 1 > UINT32_MAX) {
		fprintf(stderr, "mcgen: %s + %d groups runs past 255.255.255.255\n", group, groups);
		return 2;
	}
	struct sockaddr_in *dsts = calloc((size_t)groups, sizeof *dsts);
	if (!dsts) return 1;
	for (int g = 0; g < groups; g++) {
		dsts[g].sin_family = AF_INET;
		dsts[g].sin_port = htons((uint16_t)port);
		dsts[g].sin_addr.s_addr = htonl(base_h + (uint32_t)g);
	}
	unsigned ifindex = if_nametoindex(iface);
	if (!ifindex) {
		fprintf(stderr, "mcgen: no interface %s\n", iface);
		return 2;
	}
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) { perror("socket"); return 1; }
	struct ip_mreqn mr = {.imr_ifindex = (int)ifindex};
	int one = 1, zero = 0, sndbuf = 4 << 20;
	if (setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &mr, sizeof mr) ||
	    setsockopt(fd, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof ttl) ||
	    setsockopt(fd, IPPROTO_IP, IP_MULTICAST_LOOP, &zero, sizeof zero)) {
		perror("setsockopt");
		return 1;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf))
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
	(void)one;
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	signal(SIGINT, on_sig);
	signal(SIGTERM, on_sig);

	static struct mmsghdr msgs[MAXBATCH];
	static struct iovec iov[MAXBATCH];
	char *bufs = calloc((size_t)batch, (size_t)size);
	if (!bufs) return 1;
	for (int i = 0; i < batch; i++) {
		char *b = bufs + (size_t)i * (size_t)size;
		for (int k = HDR; k < size; k++) b[k] = (char)(k & 0xff);
		iov[i].iov_base = b;
		iov[i].iov_len = (size_t)size;
		msgs[i].msg_hdr.msg_name = &dsts[0];
		msgs[i].msg_hdr.msg_namelen = sizeof dsts[0];
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	uint64_t seq = 0, sent = 0, errors = 0, calls = 0;
	uint64_t t0 = now_ns(), end = duration > 0 ? t0 + (uint64_t)(duration * 1e9) : UINT64_MAX;
	double interval = rate > 0 ? 1e9 / rate : 0; /* ns per packet */
	double next = (double)t0;
	while (!stop) {
		uint64_t t = now_ns();
		if (t >= end) break;
		int n = batch;
		if (count > 0 && (long long)(count - (long long)sent) < n) n = (int)(count - (long long)sent);
		if (n <= 0) break;
		if (interval > 0) {
			if ((double)t < next) {
				uint64_t w = (uint64_t)next;
				struct timespec ts = {.tv_sec = (time_t)(w / 1000000000ULL),
						      .tv_nsec = (long)(w % 1000000000ULL)};
				clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
				t = now_ns();
			}
			/* a late wake-up is made up for, but never by more than 1 ms of traffic */
			if ((double)t - next > 1e6) next = (double)t;
			next += interval * n;
		}
		for (int i = 0; i < n; i++) {
			uint32_t *h = (uint32_t *)(bufs + (size_t)i * (size_t)size);
			uint64_t s = seq + (uint64_t)i;
			h[0] = MAGIC;
			h[1] = stream;
			memcpy(&h[2], &s, 8);
			memcpy(&h[4], &t, 8);
			if (groups > 1) /* one flow (the default) keeps dsts[0]: no division per datagram */
				msgs[i].msg_hdr.msg_name =
				    &dsts[(s / (uint64_t)burst) % (uint64_t)groups];
		}
		int r = sendmmsg(fd, msgs, (unsigned)n, 0);
		calls++;
		if (r < 0) {
			if (errno == EINTR) continue;
			errors++;
			seq++; /* the first message is lost: keep the sequence honest */
			continue;
		}
		sent += (uint64_t)r;
		seq += (uint64_t)r;
	}
	double el = (double)(now_ns() - t0) / 1e9;
	printf("{\"sent\": %llu, \"errors\": %llu, \"calls\": %llu, \"elapsed\": %.6f, "
	       "\"pps\": %.1f, \"size\": %d, \"batch\": %d, \"rate\": %.1f, \"groups\": %d, "
	       "\"burst\": %d}\n",
	       (unsigned long long)sent, (unsigned long long)errors, (unsigned long long)calls, el,
	       el > 0 ? (double)sent / el : 0.0, size, batch, rate, groups, burst);
	return 0;
}
