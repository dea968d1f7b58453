"""The eBPF dataplane: loading and typed maps (bpf/), the desired map content, reconcile, Maglev."""
