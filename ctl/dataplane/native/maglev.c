/* Maglev populate loop (ctl/dataplane/maglev.py documents it; its pure-Python `table()` is
 * the reference this must equal, checked by tests/unit/test_maglev_tables.py), compiled for
 * speed: 10 000 distinct tables of 16381 slots are ~160 million slot claims, which take
 * minutes in CPython and about a second here. Host code, built by `make build` into
 * _maglev.so next to this file and loaded with ctypes (which releases the GIL while it runs,
 * so tables can be built on every core). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* out[k] = index of the backend owning slot k. offset[i] < m, 1 <= skip[i] < m, m prime. */
int maglev_populate(uint32_t n, const uint64_t *offset, const uint64_t *skip, uint32_t m, int32_t *out)
{
	uint64_t *cur;
	uint8_t *taken;   /* one byte per slot: the probes stay in L1 (16 KiB at m = 16381) */
	uint32_t filled = 0, i;

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
			if (++filled == m) {
				free(cur);
				free(taken);
				return 0;
			}
		}
	}
}

/* Fills a BPF_F_MMAPABLE array map of m entries of esize bytes: slot k gets the esize bytes
 * of the backend that owns it (addrs holds n of them, packed). */
int maglev_fill(int map_fd, uint32_t n, const uint64_t *offset, const uint64_t *skip, uint32_t m,
		const uint8_t *addrs, uint32_t esize)
{
	long page = sysconf(_SC_PAGESIZE);
	size_t len = ((size_t)m * esize + page - 1) / page * page;
	int32_t *idx;
	uint8_t *dst;
	uint32_t k;
	int rc;

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
	for (k = 0; k < m; k++)
		memcpy(dst + (size_t)k * esize, addrs + (size_t)idx[k] * esize, esize);
	munmap(dst, len);
	free(idx);
	return 0;
}
