# atomnet: the README's commands. Every target installs what it needs first, so
# `make demo` and `make test` work from a clean clone on a fresh Debian 12 machine.
SHELL := /bin/bash
.DEFAULT_GOAL := build

VENV     := .venv
PY       := $(VENV)/bin/python
OBJDIR   := ctl/dataplane/bpf/objects
BPF_DIR  := bpf
BPF_SRC  := $(wildcard $(BPF_DIR)/*.c)
BPF_HDRS := $(wildcard $(BPF_DIR)/include/*.h)
BPF_OBJS := $(patsubst $(BPF_DIR)/%.c,$(OBJDIR)/%.o,$(BPF_SRC))
CLANG    ?= clang
BPF_CFLAGS := -O2 -g -target bpf -Wall -Werror -I/usr/include/$(shell uname -m)-linux-gnu
# to_netdev claims masquerade ports with a compare-and-swap (BPF atomics: -mcpu=v3, kernel >= 5.12)
BPF_CFLAGS_to_netdev := -mcpu=v3

# Debian packages: build toolchain, bcc's Python bindings, and what tests/demo run.
APT_PACKAGES := clang llvm libbpf-dev bpftool python3-bpfcc python3-venv iproute2 \
	etcd-server etcd-client iperf3 nginx-light wrk socat curl iputils-ping tcpdump shellcheck vagrant vagrant-libvirt
# The CNI plugin's e2e tests: podman 4.3 (CNI backend), containerd 1.6 (ctr), the reference
# plugins chained after atomnet (bandwidth, tuning), runc, and busybox for an offline image.
APT_PACKAGES += podman containerd containernetworking-plugins runc busybox-static
# The Docker plugin's e2e tests: a real dockerd (20.10) and busybox for an image built offline.
APT_PACKAGES += docker.io
# cluster DNS (ctl/dns): dig for the e2e tests, dnsmasq as the upstream and the benchmark's baseline, dnsperf
APT_PACKAGES += dnsutils dnsmasq-base dnsperf wget

.PHONY: setup apt venv build test test-unit test-prog test-e2e bench demo demo-clean clean

setup: apt venv

# Installs only what is missing (dpkg-query is fast), so this runs every time.
# No service may start on install (docker.io and containerd would): a policy-rc.d that
# says no for the duration, unless the machine has its own.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		[ "$$(id -u)" = 0 ] || { echo "need root to install:" $$missing >&2; exit 1; }; \
		made=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
			chmod 755 /usr/sbin/policy-rc.d; made=1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		rc=$$?; [ -z "$$made" ] || rm -f /usr/sbin/policy-rc.d; [ $$rc = 0 ] || exit $$rc; \
	fi

# The OS Python with --system-site-packages: bcc's bindings come from python3-bpfcc.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

build: setup $(BPF_OBJS) $(VENV)/.launcher

# .venv/bin/atomnet: pip's console script replaced by a launcher of the same entry point that
# starts Python without site (ctl/launch.py: pod add through the node API needs only the stdlib).
$(VENV)/.launcher: $(VENV)/.installed ctl/launch.py
	$(PY) -m ctl.launch atomnet
	touch $@

# ctl/ byte-compiled: Python writes a module's .pyc when it first imports it, except with
# PYTHONDONTWRITEBYTECODE set (as in this environment, and many container images); then every
# command compiles its modules again (ctl/cli.py alone: ~4 ms of CPU per start).
CTL_SOURCES := $(shell find ctl -name '*.py')
build: $(VENV)/.bytecode
$(VENV)/.bytecode: $(CTL_SOURCES) | $(VENV)/.installed
	$(PY) -m compileall -q ctl
	touch $@

# Maglev's populate loop, compiled for the host (ctl/dataplane/native/maglev.c, loaded with ctypes).
MAGLEV_SO := ctl/dataplane/native/_maglev.so
build: $(MAGLEV_SO)
$(MAGLEV_SO): ctl/dataplane/native/maglev.c
	$(CLANG) -O2 -Wall -Werror -shared -fPIC -pthread $< -o $@

$(OBJDIR)/%.o: $(BPF_DIR)/%.c $(BPF_HDRS)
	@command -v $(CLANG) >/dev/null || { echo "clang not found: apt-get install clang llvm" >&2; exit 1; }
	@mkdir -p $(OBJDIR)
	$(CLANG) $(BPF_CFLAGS) $(BPF_CFLAGS_$*) $(EXTRA_BPF_CFLAGS) -c $< -o $@

test: build
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests/unit tests/prog tests/e2e tests/bench/test_smoke.py

test-unit: build
	$(PY) -m pytest -q tests/unit
test-prog: build
	$(PY) -m pytest -q tests/prog
test-e2e: build
	$(PY) -m pytest -q tests/e2e

demo: build
	$(PY) scripts/demo.py

demo-clean: venv
	$(PY) scripts/demo.py --remove

bench: build
	@# matplotlib for the charts; the Debian tools of the baselines (sockperf, iptables) are
	@# installed by the harness itself if missing (tests/bench/harness.py: ensure_tools).
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) -m tests.bench.run --out bench/results

clean:
	rm -rf $(OBJDIR) $(VENV) *.egg-info
