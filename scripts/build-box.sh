#!/usr/bin/env bash
# build-box.sh: build a vagrant-libvirt box (Debian 12 "bookworm", atomnet's run-time
# packages preinstalled) from Debian packages alone: no Vagrant Cloud, no PyPI inside the
# VMs. See usage() below.
#
# How: a raw disk image with one ext4 partition, mounted through a loop device;
# mmdebstrap installs Debian into it; GRUB (BIOS) is installed on the image from inside
# the chroot; the Python dependencies of atomnet are downloaded on this host as wheels
# (`pip download`: the host's index settings) and installed offline into a virtualenv in
# the image (/opt/atomnet/venv, --system-site-packages for python3-bpfcc), so a VM only
# needs the checkout. The image is converted to a compressed qcow2 and packed with
# metadata.json as vagrant-libvirt's box format.
#
# Exit status: 0 built, 1 failed (one line on stderr), 2 usage error.
set -euo pipefail

PROG=build-box
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")

usage() {
    cat <<'EOF'
Usage: build-box.sh --out FILE.box [options]

Build a vagrant-libvirt box of Debian 12 with atomnet's run-time packages, from the
Debian archive (mmdebstrap) and wheels downloaded on this host. Needs root (loop
devices, mount, chroot).

Options:
  --out FILE.box      the box to write (required; written atomically: FILE.box.tmp, then renamed)
  --mirror URL        Debian mirror (default http://deb.debian.org/debian)
  --suite NAME        Debian suite (default bookworm)
  --size GiB          virtual disk size, 4 to 256 (default 10; the qcow2 is sparse)
  --pyproject FILE    whose [project] dependencies go into /opt/atomnet/venv
                      (default: the checkout's pyproject.toml)
  --keep-work         keep the work directory (printed) for inspection
  -h, --help          this text

Environment:
  BOX_WORKDIR         parent of the work directory (default /var/tmp)
  BOX_PIP             the pip that downloads the wheels, split on blanks (default
                      "python3 -m pip": the host's index settings apply)
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}
usage_error() {
    echo "$PROG: error: $* (see --help)" >&2
    exit 2
}

OUT='' MIRROR=http://deb.debian.org/debian SUITE=bookworm SIZE=10 KEEP=0
PYPROJECT=$REPO_DIR/pyproject.toml
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --out | --mirror | --suite | --size | --pyproject)
            [ $# -ge 2 ] || usage_error "$1 needs a value"
            [ -n "$2" ] || usage_error "$1 needs a value"
            case $1 in
                --out) OUT=$2 ;;
                --mirror) MIRROR=$2 ;;
                --suite) SUITE=$2 ;;
                --size) SIZE=$2 ;;
                --pyproject) PYPROJECT=$2 ;;
            esac
            shift 2 ;;
        --keep-work) KEEP=1; shift ;;
        *) usage_error "unknown argument $1" ;;
    esac
done
[ -n "$OUT" ] || usage_error "--out FILE.box is required"
[[ $OUT == *.box ]] || usage_error "--out must name a .box file, got $OUT"
if ! [[ $SIZE =~ ^[0-9]+$ ]] || [ "$SIZE" -lt 4 ] || [ "$SIZE" -gt 256 ]; then usage_error "--size must be a whole number of GiB from 4 to 256, got $SIZE"; fi
[[ $MIRROR =~ ^(https?|file)://[^[:space:]]+$ ]] || usage_error "--mirror must be an http(s):// or file:// URL, got $MIRROR"
[[ $SUITE =~ ^[a-z]+$ ]] || usage_error "--suite must be a Debian suite name such as bookworm, got $SUITE"
[ -r "$PYPROJECT" ] || usage_error "--pyproject: cannot read $PYPROJECT"
out_dir=$(dirname "$OUT")
[ -d "$out_dir" ] || usage_error "--out: directory $out_dir does not exist"

# Preconditions, before anything is created.
[ "$(id -u)" = 0 ] || die "run me as root: the image is built through a loop device, mount and chroot"
for tool in mmdebstrap qemu-img sfdisk losetup mkfs.ext4 python3 tar; do
    command -v "$tool" >/dev/null ||
        die "$tool not found: apt-get install mmdebstrap qemu-utils fdisk mount e2fsprogs (make -C vagrant apt does)"
done
[ -e /dev/loop-control ] || die "no /dev/loop-control: this kernel offers no loop devices (modprobe loop)"

# The Python dependencies, read from pyproject.toml (tomllib: Python 3.11).
mapfile -t PY_DEPS < <(python3 -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$PYPROJECT") ||
    die "cannot read [project] dependencies from $PYPROJECT"
[ "${#PY_DEPS[@]}" -gt 0 ] || die "$PYPROJECT lists no [project] dependencies"

# What a node and the etcd VM run; `make build` is not run in the VMs (the checkout comes
# with host-built BPF objects), so no clang. Kernel: the suite's own (Debian 12: 6.1).
PACKAGES=(
    # boot and the Vagrant contract: systemd, udev, GRUB, sshd, sudo, rsync (synced folder)
    systemd-sysv udev dbus linux-image-amd64 initramfs-tools grub-pc-bin grub2-common
    openssh-server sudo rsync ca-certificates netbase kmod procps iproute2 less
    # atomnet at run time, and what the smoke test uses in pods
    python3 python3-venv python3-bpfcc curl iputils-ping socat
    # the etcd VM (Debian's etcd 3.4); nodes leave it disabled
    etcd-server etcd-client
    # the Makefile's `make` (a user's `make -C /vagrant ...` in a VM)
    make
)
include=$(IFS=,; echo "${PACKAGES[*]}")

WORK=$(mktemp -d "${BOX_WORKDIR:-/var/tmp}/atomnet-box.XXXXXX")
LOOP='' PART_NODE='' MNT=$WORK/root MOUNTS=()
cleanup() {
    local status=$? m
    trap - EXIT INT TERM
    for ((m = ${#MOUNTS[@]} - 1; m >= 0; m--)); do
        umount "${MOUNTS[$m]}" 2>/dev/null || umount -l "${MOUNTS[$m]}" 2>/dev/null || true
    done
    [ -z "$PART_NODE" ] || rm -f "$PART_NODE"
    [ -z "$LOOP" ] || losetup -d "$LOOP" 2>/dev/null || true
    rm -f "$OUT.tmp"
    if [ "$KEEP" = 1 ]; then
        echo "$PROG: work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
mountit() { # mountit ARGS... TARGET: mount, remembered for cleanup (reverse order)
    mount "$@"
    MOUNTS+=("${!#}")
}
step() { echo "$PROG: $*"; }

read -r -a PIP <<<"${BOX_PIP:-python3 -m pip}"
start=$SECONDS
step "wheels: ${PY_DEPS[*]}"
mkdir -p "$WORK/wheels"
"${PIP[@]}" download -q --only-binary=:all: --dest "$WORK/wheels" "${PY_DEPS[@]}" ||
    "${PIP[@]}" download -q --dest "$WORK/wheels" "${PY_DEPS[@]}" ||
    die "pip download of ${PY_DEPS[*]} failed (the host's pip index must be reachable)"

step "disk: ${SIZE} GiB raw, one ext4 partition"
qemu-img create -q -f raw "$WORK/disk.raw" "${SIZE}G"
echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$WORK/disk.raw"
LOOP=$(losetup --find --show --partscan "$WORK/disk.raw") || die "losetup failed"
part=${LOOP}p1 PART_NODE=''
# No udev on a machine without systemd: make the partition's device node from sysfs.
# The partition scan may lag losetup: ask again (partx), then wait for sysfs to show it.
partx --add "$LOOP" 2>/dev/null || true
for _ in $(seq 100); do [ -e "/sys/class/block/${part##*/}/dev" ] && break; sleep 0.1; done
if [ ! -b "$part" ]; then
    devno=$(cat "/sys/class/block/${part##*/}/dev" 2>/dev/null) || die "the kernel shows no partition ${part##*/} of $LOOP"
    mknod "$part" b "${devno%%:*}" "${devno##*:}"
    PART_NODE=$part
fi
mkfs.ext4 -q -L atomnet-root "$part"
uuid=$(blkid -s UUID -o value "$part")
mkdir -p "$MNT"
mountit "$part" "$MNT"

step "mmdebstrap $SUITE from $MIRROR (${#PACKAGES[@]} packages and their dependencies)"
# --variant=minbase: only what is listed (and what it depends on); no recommends.
mmdebstrap --quiet --mode=root --variant=minbase --include="$include" \
    --aptopt='APT::Install-Recommends "false"' \
    "$SUITE" "$MNT" "deb $MIRROR $SUITE main" || die "mmdebstrap failed"

step "configure: fstab, GRUB, network, vagrant user, sshd, venv"
mountit --bind /dev "$MNT/dev"
mountit -t proc proc "$MNT/proc"
mountit -t sysfs sysfs "$MNT/sys"
cp -a "$WORK/wheels" "$MNT/tmp/wheels"
install -m 644 /dev/stdin "$MNT/tmp/requirements.txt" < <(printf '%s\n' "${PY_DEPS[@]}")
vagrant_pub=$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant -path '*/keys/vagrant.pub' \
    2>/dev/null | head -n1) || true  # (find fails on the directories that do not exist)
[ -n "$vagrant_pub" ] || die "Vagrant's insecure public key (keys/vagrant.pub) not found: apt-get install vagrant"
install -m 644 "$vagrant_pub" "$MNT/tmp/vagrant.pub"

chroot "$MNT" /bin/bash -euo pipefail -s "$uuid" "$LOOP" <<'CHROOT'
uuid=$1 loop=$2
trap 'echo "build-box: error: in the image, line $LINENO: $BASH_COMMAND failed" >&2' ERR
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
echo "UUID=$uuid / ext4 errors=remount-ro 0 1" >/etc/fstab
echo atomnet-box >/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 atomnet-box\n' >/etc/hosts

# GRUB for BIOS on the image's MBR; grub.cfg by hand (no os-prober, no device guessing):
# /vmlinuz and /initrd.img are the links the kernel package keeps current.
grub-install --target=i386-pc --boot-directory=/boot --modules='part_msdos ext2' "$loop" 2>&1 |
    grep -v 'Installation finished' || true
cat >/boot/grub/grub.cfg <<EOF
set timeout=1
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
search --no-floppy --fs-uuid --set=root $uuid
linux /vmlinuz root=UUID=$uuid ro console=ttyS0,115200 console=tty0 net.ifnames=0 biosdevname=0
initrd /initrd.img
boot
EOF

# Network: systemd-networkd, DHCP on every ethN (libvirt's management network);
# Vagrant writes its static private-network files (50-vagrant-*) before this one.
cat >/etc/systemd/network/99-dhcp.network <<'EOF'
[Match]
Name=eth*

[Network]
DHCP=ipv4
EOF
systemctl enable systemd-networkd.service >/dev/null 2>&1
# Boot without waiting for every link: the private network may come up later.
systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1

# The vagrant user, Vagrant's insecure key (replaced by a generated one on first `up`).
useradd -m -s /bin/bash -U vagrant
echo 'vagrant:vagrant' | chpasswd
install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh
install -m 600 -o vagrant -g vagrant /tmp/vagrant.pub /home/vagrant/.ssh/authorized_keys
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/vagrant
chmod 440 /etc/sudoers.d/vagrant
printf 'UseDNS no\n' >/etc/ssh/sshd_config.d/vagrant.conf
# Host keys made at each VM's first boot, not shared by every VM of the box.
rm -f /etc/ssh/ssh_host_*
cat >/etc/systemd/system/ssh-hostkeys.service <<'EOF'
[Unit]
Description=Generate missing SSH host keys
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
systemctl enable ssh-hostkeys.service ssh.service >/dev/null 2>&1
# Debian enables etcd on install; only the etcd VM's provisioning turns it on.
systemctl disable etcd.service >/dev/null 2>&1 || true
# Lean apt in the VMs, should anyone use it (the VMs have no route to an archive).
echo 'APT::Install-Recommends "false";' >/etc/apt/apt.conf.d/90no-recommends

# atomnet's Python dependencies, offline, from the host's wheels.
python3 -m venv --system-site-packages /opt/atomnet/venv
/opt/atomnet/venv/bin/pip install -q --no-index --find-links /tmp/wheels -r /tmp/requirements.txt
/opt/atomnet/venv/bin/python -c 'import bcc, pyroute2, elftools, structlog, prometheus_client, yaml, etcd3gw'
install -m 644 /tmp/requirements.txt /opt/atomnet/requirements.txt

apt-get clean
rm -rf /tmp/wheels /tmp/requirements.txt /tmp/vagrant.pub /var/lib/apt/lists/* /var/log/*.log
: >/etc/machine-id
CHROOT
[ -e "$MNT/vmlinuz" ] || die "the image has no /vmlinuz"
[ -e "$MNT/initrd.img" ] || die "the image has no /vmlinuz or /initrd.img"
# Zeroes are what qemu-img leaves out: fstrim the free space before converting.
fstrim "$MNT" 2>/dev/null || true
for ((m = ${#MOUNTS[@]} - 1; m >= 0; m--)); do umount "${MOUNTS[$m]}"; done
MOUNTS=()
[ -z "$PART_NODE" ] || rm -f "$PART_NODE"
PART_NODE=''
losetup -d "$LOOP"
LOOP=''

step "pack: qcow2 (compressed) + metadata.json + Vagrantfile"
qemu-img convert -q -c -O qcow2 "$WORK/disk.raw" "$WORK/box.img"
rm -f "$WORK/disk.raw"
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$SIZE" >"$WORK/metadata.json"
cat >"$WORK/Vagrantfile" <<'EOF'
# The box's defaults: built by atomnet's scripts/build-box.sh.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "kvm"
    lv.disk_bus = "virtio"
    lv.nic_model_type = "virtio"
  end
end
EOF
tar -C "$WORK" -cf "$OUT.tmp" metadata.json Vagrantfile box.img
mv "$OUT.tmp" "$OUT"
step "done: $OUT ($(du -h "$OUT" | cut -f1)) in $((SECONDS - start)) s"
