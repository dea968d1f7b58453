/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every map, in one place. Declared the libbpf way; the loader (ctl/bpf/elf.py)
 * reads these definitions from the object's DWARF. LIBBPF_PIN_BY_NAME pins the
 * map under the node's bpffs root with its own name, so every program (and every
 * daemon generation) shares one instance.
 */
#ifndef ATOMNET_MAPS_H
#define ATOMNET_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "types.h"

#define MAX_ENDPOINTS 65536

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(max_entries, MAX_ENDPOINTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, CTR_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

#endif
