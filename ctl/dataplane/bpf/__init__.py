"""Object loading, BPF syscalls, typed maps and tc attachment."""
