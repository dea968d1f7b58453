/* Maglev populate loop (ctl/dataplane/maglev.py documents it; its pure-Python `table()` is
 * the reference this must equal, checked by tests/unit/test_maglev_tables.py), compiled for
 * speed: 10 000 distinct tables of 16381 slots are ~160 million slot claims, which take
 * minutes in CPython and about a second here. Host code, built by `make build` into
 * _maglev.so next to this file and loaded with ctypes (which releases the GIL while it runs,
 * so tables can be built on every core); maglev_build_many builds a whole sync's tables in one
 * call on its own threads. */
#include <errno.h>
#include <linux/bpf.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Below this many free slots, a backend's next free slot is found from the free list by
 * arithmetic instead of by probing its permutation: probing costs about m/free probes per
 * claim (half of all probes of a table fall in its last 1 %), the free list costs `free`
 * multiplications. The slots chosen are exactly the probing loop's. */
#define TAIL 32

/* s^-1 mod m (m prime, 0 < s < m), by the extended Euclidean algorithm. */
static uint64_t inverse(uint64_t s, uint64_t m)
{
	int64_t t = 0, nt = 1, r = (int64_t)m, nr = (int64_t)s;

	while (nr) {
		int64_t q = r / nr, tmp;

		tmp = t - q * nt; t = nt; nt = tmp;
		tmp = r - q * nr; r = nr; nr = tmp;
	}
	return (uint64_t)(t < 0 ? t + (int64_t)m : t);
}

/* The tail: every backend in turn claims the free slot x that comes first in its
 * permutation from cur[i] on, i.e. with the least j = (x - cur[i]) * skip[i]^-1 mod m. */
static int populate_tail(uint32_t n, uint32_t start, const uint64_t *skip, uint32_t m, uint64_t *cur,
			 const uint8_t *taken, int32_t *out)
{
	uint32_t free_slots[TAIL], nfree = 0, k, i = start;
	uint64_t *inv = malloc(sizeof(*inv) * n);

	if (!inv)
		return -ENOMEM;

	for (k = 0; k < m; k++)
		if (!taken[k])
			free_slots[nfree++] = k;
	for (k = 0; k < n; k++)
		inv[k] = inverse(skip[k], m);
	while (nfree) {
		uint64_t c = cur[i], best_j = m;
		uint32_t best = 0, f;

		for (f = 0; f < nfree; f++) {
			uint64_t j = (free_slots[f] + m - c) % m * inv[i] % m;

			if (j < best_j) {
				best_j = j;
				best = f;
			}
		}
		k = free_slots[best];
		out[k] = (int32_t)i;
		free_slots[best] = free_slots[--nfree];
		cur[i] = (k + skip[i]) % m;
		i = (i + 1) % n;
	}
	free(inv);
	return 0;
}

/* out[k] = index of the backend owning slot k. offset[i] < m, 1 <= skip[i] < m, m prime. */
int maglev_populate(uint32_t n, const uint64_t *offset, const uint64_t *skip, uint32_t m, int32_t *out)
{
	uint64_t *cur;
	uint8_t *taken;   /* one byte per slot: the probes stay in L1 (16 KiB at m = 16381) */
	uint32_t filled = 0, i;
	int rc = 0;

	if (n == 0 || n > m)
		return -EINVAL;
	cur = malloc(sizeof(*cur) * n);
	taken = calloc(m, 1);
	if (!cur || !taken) {
		free(cur);
		free(taken);
		return -ENOMEM;
	}
	for (i = 0; i < n; i++)
		cur[i] = offset[i];
	for (;;) {
		for (i = 0; i < n; i++) {
			uint64_t c = cur[i], s = skip[i];

			if (m - filled <= TAIL) {   /* backend i's turn, by the free list from here on */
				rc = populate_tail(n, i, skip, m, cur, taken, out);
				goto done;
			}
			while (taken[c]) {   /* backend i's next preferred slot that is still free */
				c += s;
				if (c >= m)
					c -= m;
			}
			taken[c] = 1;
			out[c] = (int32_t)i;
			c += s;
			if (c >= m)
				c -= m;
			cur[i] = c;
			filled++;
		}
	}
done:
	free(cur);
	free(taken);
	return rc;
}

/* Fills a BPF_F_MMAPABLE array map of m entries of esize bytes: slot k gets the esize bytes
 * of the backend that owns it (addrs holds n of them, packed); n = 0 zeroes it. */
int maglev_fill(int map_fd, uint32_t n, const uint64_t *offset, const uint64_t *skip, uint32_t m,
		const uint8_t *addrs, uint32_t esize)
{
	long page = sysconf(_SC_PAGESIZE);
	size_t len = ((size_t)m * esize + page - 1) / page * page;
	int32_t *idx;
	uint8_t *dst;
	uint32_t k;
	int rc;

	if (n == 0) {   /* no backends: every slot zero ("no backend"); a recycled table held others */
		dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
		if (dst == MAP_FAILED)
			return -errno;
		memset(dst, 0, (size_t)m * esize);
		munmap(dst, len);
		return 0;
	}
	idx = malloc(sizeof(*idx) * m);
	if (!idx)
		return -ENOMEM;
	rc = maglev_populate(n, offset, skip, m, idx);
	if (rc) {
		free(idx);
		return rc;
	}
	dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, map_fd, 0);
	if (dst == MAP_FAILED) {
		rc = -errno;
		free(idx);
		return rc;
	}
	if (esize == 8) {   /* struct backend_addr: one aligned 8-byte store per slot, no memcpy call */
		uint64_t *slots = (uint64_t *)dst;
		const uint64_t *src = (const uint64_t *)addrs;

		for (k = 0; k < m; k++)
			slots[k] = src[idx[k]];
	} else {
		for (k = 0; k < m; k++)
			memcpy(dst + (size_t)k * esize, addrs + (size_t)idx[k] * esize, esize);
	}
	munmap(dst, len);
	free(idx);
	return 0;
}

/* ------------------------------------------------------------------ many tables in one call
 *
 * A big sync (10 000 services, each its own backend set) builds thousands of tables. One call
 * creates the inner maps that are missing, populates and fills every table through mmap, on
 * `threads` threads of its own: no Python (and no GIL) between two tables, and the kernel's
 * map creation runs on every core too. Mirrored by ctl/dataplane/native/__init__.py Job. */
struct maglev_job {
	int32_t fd;       /* in: the inner map to fill, or -1: create one (out: its fd) */
	uint32_t n;       /* backends (0: every slot zeroed) */
	uint32_t first;   /* index of its first backend in offset[], skip[] and addrs */
	uint32_t m;       /* slots (prime) */
	uint32_t map_id;  /* out: the id of a map created here */
	int32_t err;      /* out: 0, or -errno of the step that failed */
};

struct build_ctx {
	struct maglev_job *jobs;
	uint32_t count, esize, create_flags;
	const uint64_t *offset, *skip;
	const uint8_t *addrs;
	uint32_t next;   /* the next job to take (atomic) */
};

static int create_table(uint32_t m, uint32_t esize, uint32_t flags, uint32_t *id)
{
	union bpf_attr attr;
	struct bpf_map_info info;
	int fd;

	memset(&attr, 0, sizeof(attr));
	attr.map_type = BPF_MAP_TYPE_ARRAY;
	attr.key_size = 4;
	attr.value_size = esize;
	attr.max_entries = m;
	attr.map_flags = flags;
	memcpy(attr.map_name, "maglev_table", sizeof("maglev_table"));
	fd = (int)syscall(__NR_bpf, BPF_MAP_CREATE, &attr, sizeof(attr));
	if (fd < 0)
		return -errno;
	memset(&info, 0, sizeof(info));
	memset(&attr, 0, sizeof(attr));
	attr.info.bpf_fd = (uint32_t)fd;
	attr.info.info_len = sizeof(info);
	attr.info.info = (uint64_t)(uintptr_t)&info;
	if (syscall(__NR_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr)) < 0) {
		int rc = -errno;

		close(fd);
		return rc;
	}
	*id = info.id;
	return fd;
}

static void *build_worker(void *arg)
{
	struct build_ctx *ctx = arg;
	uint32_t j;

	while ((j = __atomic_fetch_add(&ctx->next, 1, __ATOMIC_RELAXED)) < ctx->count) {
		struct maglev_job *job = &ctx->jobs[j];

		if (job->fd < 0) {
			int fd = create_table(job->m, ctx->esize, ctx->create_flags, &job->map_id);

			if (fd < 0) {
				job->err = fd;
				continue;
			}
			job->fd = fd;
		}
		job->err = maglev_fill(job->fd, job->n, ctx->offset + job->first, ctx->skip + job->first, job->m,
				       ctx->addrs + (size_t)job->first * ctx->esize, ctx->esize);
	}
	return NULL;
}

/* Runs every job (on `threads` threads, this one included); returns how many failed (each
 * job's err says why; its fd, when created, is returned even so: the caller closes it). */
int maglev_build_many(struct maglev_job *jobs, uint32_t count, const uint64_t *offset, const uint64_t *skip,
		      const uint8_t *addrs, uint32_t esize, uint32_t create_flags, uint32_t threads)
{
	struct build_ctx ctx = { jobs, count, esize, create_flags, offset, skip, addrs, 0 };
	pthread_t tid[16];
	uint32_t started = 0, t, failed = 0;

	if (threads > 16)
		threads = 16;
	for (t = 1; t < threads && t < count; t++)
		if (pthread_create(&tid[started], NULL, build_worker, &ctx) == 0)
			started++;
	build_worker(&ctx);   /* this thread works too; with no extra thread, it does them all */
	for (t = 0; t < started; t++)
		pthread_join(tid[t], NULL);
	for (t = 0; t < count; t++)
		failed += jobs[t].err != 0;
	return (int)failed;
}
