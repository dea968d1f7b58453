/* SPDX-License-Identifier: GPL-2.0 */
/* Full checksums for headers atomnet builds itself (incremental updates use the helpers). */
#ifndef ATOMNET_CSUM_H
#define ATOMNET_CSUM_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

#endif
