#!/usr/bin/env bash
# rig.sh: the host side of the Vagrant rig on libvirt, as vagrant/Makefile drives it.
#
#   rig.sh preflight MIB     root, /dev/kvm and MIB of free memory, or one line saying what
#                            is missing and how to get it; nothing is created
#   rig.sh libvirt-check     libvirtd, virtlogd, virsh and QEMU are installed
#   rig.sh libvirt-start     start virtlogd and libvirtd as plain processes (no systemd here)
#                            unless they run; remember the PIDs of those it started
#   rig.sh libvirt-stop      stop only what libvirt-start started, by PID
#   rig.sh pool-start        the rig's storage pool (its own directory), unless defined
#   rig.sh leftovers         remove every domain, network, volume and pool of the rig that
#                            `vagrant destroy` left (or a killed run), and libvirt's logs of them
#   rig.sh busy              exit 0 when a domain of the rig exists
#   rig.sh smoke             the smoke test from the host: smoke.sh in node1 (pods on every
#                            node, VXLAN, a service, NodePort, host port), the NodePort from
#                            this host, then the last node rebooted: it comes back (daemon
#                            under systemd) and the smoke test passes again, its NodePort too
#
# Environment (vagrant/Makefile sets these): RIG_STATE (directory for the PIDs and markers,
# default vagrant/.host), RIG_POOL (storage pool name, default atomnet-rig), RIG_NODES
# (number of nodes, default 2), RIG_NETWORK (first three octets, default 192.168.56);
# RIG_KVM, RIG_SYS_MODULE (the KVM device and /sys/module: for tests); RIG_IGNORE_PVM=1
# (start VMs even on PVM's KVM, whose guests need a PVM guest kernel: see preflight).
# Exit status: 0 done, 1 failed (a line saying why), 2 usage error.
set -euo pipefail

PROG=rig
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${RIG_STATE:-$HERE/.host}
POOL=${RIG_POOL:-atomnet-rig}
POOL_DIR=/var/lib/libvirt/images/$POOL
NODES=${RIG_NODES:-2}
NETWORK=${RIG_NETWORK:-192.168.56}
PREFIX=atomnet-                 # the Vagrantfile's libvirt default_prefix
NETWORKS=(atomnet-rig atomnet-mgmt)
URI=qemu:///system
KVM=${RIG_KVM:-/dev/kvm}         # changed only by tests
SYS_MODULE=${RIG_SYS_MODULE:-/sys/module}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}
say() { echo "$PROG: $*"; }
virsh() { command virsh -q -c "$URI" "$@"; }
# until_ok SECONDS COMMAND...: retry COMMAND until it succeeds or SECONDS pass.
until_ok() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}

preflight() {
    local need=$1 avail
    [[ $need =~ ^[0-9]+$ ]] || { echo "$PROG: error: preflight needs MiB, got $need" >&2; exit 2; }
    [ "$(id -u)" = 0 ] ||
        die "not root: run it as root (sudo make -C vagrant ...): libvirt's system instance, loop devices and mounts need it"
    [ -e "$KVM" ] ||
        die "no $KVM: enable KVM (BIOS virtualisation, modprobe kvm_intel or kvm_amd; in a VM, nested virtualisation)"
    { [ -r "$KVM" ] && [ -w "$KVM" ]; } || die "$KVM is not readable and writable by $(id -un)"
    # KVM by PVM (Ant Group's Pagetable-based VM: nested virtualisation without VT-x/AMD-V,
    # as on this project's build machines): a guest must run a PVM guest kernel
    # (CONFIG_PVM_GUEST); Debian's kernels are not, and hang right after the boot loader.
    if [ -d "$SYS_MODULE/kvm_pvm" ] && [ ! -d "$SYS_MODULE/kvm_intel" ] && [ ! -d "$SYS_MODULE/kvm_amd" ] &&
        [ "${RIG_IGNORE_PVM:-0}" != 1 ]; then
        die "$KVM is PVM (kvm_pvm, no kvm_intel/kvm_amd): its guests need a PVM guest kernel (CONFIG_PVM_GUEST," \
            "github.com/virt-pvm/linux), Debian's cannot boot; use a host with VT-x/AMD-V KVM (RIG_IGNORE_PVM=1 tries anyway)"
    fi
    avail=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
    [ "$avail" -ge "$need" ] ||
        die "not enough memory: the VMs need $need MiB, $avail MiB available (fewer nodes: NODES=1, or less MEMORY=...)"
}

libvirt_check() {
    local tool
    for tool in libvirtd virtlogd virsh qemu-system-x86_64 qemu-img; do
        command -v "$tool" >/dev/null ||
            die "$tool not found: no libvirt/QEMU here; make -C vagrant apt installs them (libvirt-daemon-system, qemu-system-x86, qemu-utils)"
    done
}

connects() { virsh uri >/dev/null 2>&1; }

# start NAME PIDFILE: start daemon NAME with -d unless one runs; remember its PID.
start_daemon() {
    local name=$1 pidfile=$2 pid
    if pgrep -x "$name" >/dev/null; then
        return 0
    fi
    "$name" -d || die "$name -d failed"
    until_ok 20 test -s "$pidfile" || die "$name started but wrote no $pidfile"
    pid=$(cat "$pidfile")
    echo "$pid" >"$STATE/started-$name"
    say "started $name (pid $pid)"
}

# QEMU runs as libvirt-qemu (group kvm); without udev nothing gives /dev/kvm the group and
# mode Debian's udev rule does (kvm, 0660). Do that, and remember the old owner and mode so
# libvirt-stop puts them back.
kvm_access() {
    [ -e "$KVM" ] && getent group kvm >/dev/null || return 0
    [ "$(stat -c %G "$KVM")" != kvm ] || [ "$(( 0$(stat -c %a "$KVM") & 060 ))" != 48 ] || return 0
    [ -f "$STATE/kvm-mode" ] || stat -c '%u:%g %a' "$KVM" >"$STATE/kvm-mode"
    chgrp kvm "$KVM"
    chmod 0660 "$KVM"
    say "gave $KVM to group kvm, mode 0660 (what Debian's udev rule does) for QEMU as libvirt-qemu"
}

libvirt_start() {
    mkdir -p "$STATE"
    libvirt_check
    kvm_access
    start_daemon virtlogd /run/virtlogd.pid
    start_daemon libvirtd /run/libvirtd.pid
    until_ok 30 connects || die "libvirtd runs but $URI does not answer (see /var/log/libvirt/)"
}

# gone PID: the process exited (a zombie not yet reaped by its parent counts as gone).
gone() { [ ! -e "/proc/$1" ] || [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]; }

libvirt_stop() {
    local name pid
    for name in libvirtd virtlogd; do
        [ -f "$STATE/started-$name" ] || continue
        pid=$(cat "$STATE/started-$name")
        # Only the process we started: same PID and still that program.
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
            kill -TERM "$pid"
            until_ok 30 gone "$pid" || die "$name (pid $pid) did not stop on SIGTERM"
            say "stopped $name (pid $pid)"
        fi
        rm -f "$STATE/started-$name"
    done
    if [ -f "$STATE/kvm-mode" ]; then
        read -r owner mode <"$STATE/kvm-mode"
        chown "$owner" "$KVM" && chmod "$mode" "$KVM" && say "restored $KVM to $owner, mode $mode"
        rm -f "$STATE/kvm-mode"
    fi
}

pool_start() {
    if ! virsh pool-info "$POOL" >/dev/null 2>&1; then
        virsh pool-define-as "$POOL" dir --target "$POOL_DIR" >/dev/null
        virsh pool-build "$POOL" >/dev/null
        say "defined storage pool $POOL ($POOL_DIR)"
    fi
    [ "$(virsh pool-info "$POOL" | awk '/^State:/ {print $2}')" = running ] || virsh pool-start "$POOL" >/dev/null
}

rig_domains() { virsh list --all --name | grep "^$PREFIX" || true; }

busy() { [ -n "$(rig_domains)" ]; }

leftovers() {
    local d n v
    connects || { iptables_leftovers; return 0; }
    for d in $(rig_domains); do
        virsh destroy "$d" >/dev/null 2>&1 || true
        virsh undefine "$d" --remove-all-storage --nvram >/dev/null 2>&1 || virsh undefine "$d" >/dev/null
        say "removed domain $d"
    done
    for n in "${NETWORKS[@]}"; do
        virsh net-info "$n" >/dev/null 2>&1 || continue
        virsh net-destroy "$n" >/dev/null 2>&1 || true
        virsh net-undefine "$n" >/dev/null
        say "removed network $n"
    done
    if virsh pool-info "$POOL" >/dev/null 2>&1; then
        virsh pool-start "$POOL" >/dev/null 2>&1 || true
        for v in $(virsh vol-list "$POOL" 2>/dev/null | awk '{print $1}'); do
            virsh vol-delete --pool "$POOL" "$v" >/dev/null
            say "removed volume $v"
        done
        virsh pool-destroy "$POOL" >/dev/null 2>&1 || true
        virsh pool-delete "$POOL" >/dev/null 2>&1 || true
        virsh pool-undefine "$POOL" >/dev/null
        say "removed storage pool $POOL"
    fi
    # What libvirt keeps of a gone domain or network: its logs and dnsmasq's files.
    rm -f /var/log/libvirt/qemu/"$PREFIX"*.log* /var/lib/libvirt/dnsmasq/atomnet-*
    iptables_leftovers
}

# libvirt's first network leaves its iptables chains (LIBVIRT_INP, _FWX, ... and their
# jumps from INPUT/FORWARD/OUTPUT/POSTROUTING) after the last one is gone. Removed when no
# libvirt network is active and each chain is empty: libvirtd makes them again when needed.
iptables_leftovers() {
    local table chain active
    command -v iptables >/dev/null || return 0
    active=$(virsh net-list --name 2>/dev/null | sed '/^$/d') || true
    [ -z "$active" ] || return 0
    for table in filter nat mangle; do
        for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^LIBVIRT_/ {print $2}'); do
            [ "$(iptables -t "$table" -S "$chain" | grep -vc '^-N')" = 0 ] || continue
            while read -r rule; do
                # shellcheck disable=SC2086 # the rule's words, as iptables -S printed them
                iptables -t "$table" ${rule/#-A/-D}
            done < <(iptables -t "$table" -S | grep -E -- "-j $chain\$")
            iptables -t "$table" -X "$chain"
        done
    done
}

# --- smoke ----------------------------------------------------------------------------
vm() { # vm MACHINE COMMAND: run COMMAND (a shell line) in a VM over vagrant ssh
    local machine=$1
    shift
    (cd "$HERE" && vagrant ssh "$machine" -c "$*" -- -o LogLevel=ERROR </dev/null)
}
json() { python3 -c 'import json, sys
d = json.load(sys.stdin)
r = eval(sys.argv[1])
print("\n".join(map(str, r)) if isinstance(r, (list, tuple)) else r)' "$1"; }

# host_node_port TAG PORT PODS...: from this host, NodePort PORT of every node is answered by every pod.
host_node_port() {
    local port=$1 i ip body seen name
    shift
    for i in $(seq "$NODES"); do
        ip=$NETWORK.$((10 + i)) seen=" "
        for _ in $(seq 60); do
            body=$(curl -sS --max-time 3 "http://$ip:$port/" 2>/dev/null) || { sleep 0.5; continue; }
            [[ $seen == *" $body "* ]] || seen="$seen$body "
            [ "$(wc -w <<<"$seen")" -lt "$#" ] || break
        done
        for name in "$@"; do
            [[ $seen == *" $name "* ]] ||
                { echo "FAIL: NodePort $ip:$port from this host: backend $name never answered (answered:$seen)" >&2; return 1; }
        done
    done
    echo "ok   NodePort $port on ${NETWORK}.11..$((10 + NODES)) answers this host from all $# backends"
}

KEPT_TAG=''
remove_kept() { # remove_kept TAG: what smoke.sh --keep left, on every node
    local i
    for i in $(seq "$NODES"); do
        vm "node$i" "sudo /vagrant/vagrant/smoke.sh --remove $1" || echo "$PROG: could not remove all of $1 on node$i" >&2
    done
}

smoke() {
    local tag last boot_before boot_after svc port pods status
    tag=smk$(printf '%04x' $((RANDOM % 65536)))
    last=node$NODES
    KEPT_TAG=$tag
    trap '[ -z "$KEPT_TAG" ] || remove_kept "$KEPT_TAG"' EXIT

    say "1. smoke.sh in node1 (kept for the host's checks: $tag)"
    vm node1 "sudo SMOKE_TAG=$tag /vagrant/vagrant/smoke.sh --keep --nodes $NODES" || die "smoke.sh failed in node1"
    svc=$(vm node1 "sudo atomnet -j service show $tag") || die "service show $tag failed"
    port=$(json 'd["ports"][0]["node_port"]' <<<"$svc")
    mapfile -t pods < <(json '[b["pod"] for b in d["backends"]]' <<<"$svc")

    say "2. the NodePort from this host"
    host_node_port "$port" "${pods[@]}" || exit 1

    say "3. reboot $last"
    boot_before=$(vm "$last" 'cat /proc/sys/kernel/random/boot_id')
    local t0=$SECONDS
    vm "$last" 'sudo systemctl reboot' || true
    # shellcheck disable=SC2317 # called through until_ok
    rebooted() { boot_after=$(vm "$last" 'cat /proc/sys/kernel/random/boot_id') && [ "$boot_after" != "$boot_before" ]; }
    until_ok 600 rebooted || die "$last did not come back within 600 s"
    until_ok 300 vm "$last" 'sudo journalctl -b -u atomnet-daemon -o cat | grep -q dataplane_ready' ||
        die "$last is back but its daemon never logged dataplane_ready (journalctl -u atomnet-daemon)"
    status=$(vm "$last" 'systemctl is-active atomnet-daemon; systemctl is-enabled atomnet-daemon' | tr -d '\r' | tr '\n' ' ')
    [ "$status" = "active enabled " ] || die "$last: atomnet-daemon is '$status' after the reboot"
    echo "ok   $last rebooted and back in $((SECONDS - t0)) s; atomnet-daemon under systemd: $status"

    say "4. after the reboot: the kept service's NodePort from this host (its pod on $last is gone with the"
    say "   reboot (/run/netns is a tmpfs): the backends left are on the other nodes)"
    vm "$last" "sudo /vagrant/vagrant/smoke.sh --remove $tag" || die "removing $tag's pod on $last after its reboot failed"
    # shellcheck disable=SC2317 # called through until_ok
    backends_left() { [ "$(vm node1 "sudo atomnet -j lb list" | json "[len(r['backends']) for r in d if r['port'] == $port]" | sort -u)" = "$((NODES - 1))" ]; }
    if [ "$NODES" -gt 1 ]; then
        until_ok 60 backends_left || die "NodePort $port: the deleted pod's backend is still programmed"
        host_node_port "$port" "${pods[@]:0:$((NODES - 1))}" || exit 1
    fi

    say "5. smoke.sh in node1 again: pods on every node, $last's included, talk again"
    vm node1 "sudo /vagrant/vagrant/smoke.sh --nodes $NODES" || die "smoke.sh failed after $last rebooted"
    remove_kept "$tag"
    KEPT_TAG=''
    echo "PASS: the rig's smoke test, from the host, with $last rebooted"
}

[ $# -ge 1 ] || { echo "$PROG: error: a command is needed (see the header of $0)" >&2; exit 2; }
cmd=$1
shift
case $cmd in
    preflight) [ $# = 1 ] || { echo "$PROG: error: preflight MIB" >&2; exit 2; }; preflight "$1" ;;
    libvirt-check) libvirt_check ;;
    libvirt-start) libvirt_start ;;
    libvirt-stop) libvirt_stop ;;
    pool-start) pool_start ;;
    leftovers) leftovers ;;
    busy) busy ;;
    smoke) smoke ;;
    *) echo "$PROG: error: unknown command $cmd (see the header of $0)" >&2; exit 2 ;;
esac
