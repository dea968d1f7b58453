/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every map, in one place. Declared the libbpf way; the loader (ctl/dataplane/bpf/elf.py)
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
#define MAX_SERVICE_PORTS 65536
#define MAX_BACKENDS 262144
#ifndef MAX_CONNTRACK		/* overridable: the upgrade test builds a larger table */
#define MAX_CONNTRACK 262144
#endif
#define MAX_AFFINITY 65536
#define MAX_FRAGMENTS 8192
#define MAX_NODES 16384
#define MAX_SNAT_EXCLUDE 16384	/* cluster + services + every node + the user's CIDRs */
/* The template of every per-service Maglev table; BPF_F_INNER_MAP lets each service
 * have its own (prime) size. */
#define MAGLEV_TEMPLATE_SIZE 1021

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

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct service_key);
	__type(value, struct service_info);
	__uint(max_entries, MAX_SERVICE_PORTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct tunnel_key);
	__type(value, struct tunnel_info);
	__uint(max_entries, MAX_NODES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tunnels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 0);		/* 0: one slot per possible CPU (set by the loader, as libbpf does) */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

struct maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct backend_addr);
	__uint(max_entries, MAGLEV_TEMPLATE_SIZE);
	__uint(map_flags, BPF_F_INNER_MAP | BPF_F_MMAPABLE);	/* filled through mmap: ctl/dataplane/maglev_tables.py */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, __u32);		/* service_info.table */
	__uint(max_entries, MAX_SERVICE_PORTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct maglev_table);
} maglev SEC(".maps");

/* Preallocated: without it every new key takes its per-CPU value from the kernel's per-CPU
 * allocator, ~15 us of CPU each plus waits for its background populating (100 000 keys of
 * a 10 000-service apply: 1.6 s of CPU, 3.3 s wall standalone on this 2-CPU machine at load
 * ~6, 9-11 s inside a sync; preallocated: 0.04 s of CPU). The price is kernel memory reserved
 * up front: 30 MiB here (memlock, 2 CPUs), 4 MiB of it per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct backend_key);
	__type(value, struct counter);
	__uint(max_entries, MAX_BACKENDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(max_entries, MAX_CONNTRACK);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, MAX_AFFINITY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
	__uint(max_entries, MAX_FRAGMENTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fragments SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct snat_exclude_key);
	__type(value, struct snat_exclude_value);
	__uint(max_entries, MAX_SNAT_EXCLUDE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} snat_exclude SEC(".maps");

#define MAX_DNS_NAMES 131072	/* services + pods + nodes (+ forward targets) with an A record */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct dns_name_key);
	__type(value, struct dns_name_value);
	__uint(max_entries, MAX_DNS_NAMES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct dns_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct dns_scratch);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);	/* pinned like every map: `explain` and `map list` expect it */
} dns_scratch SEC(".maps");

#endif
