#!/usr/bin/env bash
# node-bootstrap.sh: join this machine to an atomnet cluster (configure it, start the
# node daemon). One script for every rig: the Vagrant VMs run it with --systemd, the
# e2e namespace rig with --foreground, tests with --background. See usage() below.
#
# Exit status: 0 done, 1 failed (one line on stderr), 2 usage error.
set -euo pipefail

PROG=node-bootstrap
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
READY_EVENT=dataplane_ready

usage() {
    cat <<'EOF'
Usage: node-bootstrap.sh --store URL [--node NAME] [options] MODE [-- DAEMON_ARGS...]

Join this machine to an atomnet cluster: configure the node, then start its daemon.

Mode (exactly one):
  --systemd              write $ATOMNET_ENV_FILE (/etc/atomnet/atomnet.env), install the
                         atomnet-daemon unit if it changed, `systemctl enable --now` it
                         (restart it when its settings changed)
  --foreground           exec the daemon in this process: its PID is this script's PID
  --background LOGFILE   start the daemon with nohup, output appended to LOGFILE;
                         print its PID on stdout

Options:
  --store URL            cluster store: sqlite:///PATH or etcd://HOST:PORT (env ATOMNET_STORE)
  --node NAME            this node's name (env ATOMNET_NODE; default: the hostname)
  --uplink IFACE         the node's uplink (env ATOMNET_UPLINK; default: the interface that
                         holds --public-ip; with --systemd, else the default route's)
  --public-ip IP         this node's underlay address (env ATOMNET_PUBLIC_IP; with
                         --systemd the default is the uplink's first IPv4 address)
  --bpffs DIR            bpffs directory for pins (env ATOMNET_BPFFS; default /sys/fs/bpf/atomnet)
  --init-network CIDR    first run `atomnet network init --cidr CIDR` (idempotent: the same
                         values again change nothing; different ones are an error)
  --subnet-len N         with --init-network (default 24)
  --service-cidr CIDR    with --init-network (default 10.96.0.0/12)
  --lease-ttl SECONDS    subnet lease TTL (daemon default: 86400, as flannel)
  --lease-renew-margin SECONDS
  --metrics HOST:PORT    serve Prometheus metrics
  --log-level LEVEL      debug, info, warning or error (default info)
  --log-file FILE        --foreground: append the daemon's output to FILE
  --restart              --systemd: restart the unit if it runs, even when its settings did
                         not change (to run newly installed code; pins are reused)
  --wait SECONDS         --background, --systemd: wait until the daemon logs dataplane_ready
                         (default 0: do not wait)
  --store-wait SECONDS   keep retrying --init-network this long while an etcd store is
                         unreachable (default 60)
  -h, --help             this text
  -- DAEMON_ARGS...      passed to `atomnet daemon` as they are

Environment:
  ATOMNET_BIN       the atomnet command, split on blanks (default "atomnet"),
                    e.g. "/opt/atomnet/.venv/bin/python -m ctl.cli"
  --systemd paths, to be changed only for tests (the unit reads /etc/atomnet/atomnet.env
  and runs /usr/local/bin/atomnet, which must exist):
  ATOMNET_ENV_FILE  the settings file (/etc/atomnet/atomnet.env)
  ATOMNET_UNIT_DIR  where the unit is installed (/etc/systemd/system)
  ATOMNET_UNIT_BIN  the command the unit runs, checked before anything is written

Examples:
  node-bootstrap.sh --store etcd://192.168.56.10:2379 --node node1 \
      --public-ip 192.168.56.11 --init-network 10.244.0.0/16 --systemd --wait 120
  nsenter --net=/run/netns/n1 node-bootstrap.sh --store sqlite:///tmp/s.db --node n1 \
      --bpffs /sys/fs/bpf/atomnet-n1 --foreground -- --lease-ttl 6
EOF
}

die() { # runtime failure: one line, exit 1
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit 1
}

usage_error() { # bad invocation: one line, exit 2
    printf '%s: error: %s (see --help)\n' "$PROG" "$*" >&2
    exit 2
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }

need_value() { # OPTION REMAINING_ARG_COUNT
    [ "$2" -ge 2 ] || usage_error "$1 needs a value"
}

is_number() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }

# --- arguments -----------------------------------------------------------------------
STORE=${ATOMNET_STORE:-}
NODE=${ATOMNET_NODE:-}
UPLINK=${ATOMNET_UPLINK:-}
PUBLIC_IP=${ATOMNET_PUBLIC_IP:-}
BPFFS=${ATOMNET_BPFFS:-/sys/fs/bpf/atomnet}
INIT_CIDR=
SUBNET_LEN=24
SERVICE_CIDR=10.96.0.0/12
LEASE_TTL=
RENEW_MARGIN=
METRICS=
LOG_LEVEL=
LOG_FILE=
WAIT=0
RESTART=0
STORE_WAIT=60
MODE=
BG_LOG=
PASSTHROUGH=()

set_mode() {
    [ -z "$MODE" ] || usage_error "choose one of --systemd, --foreground, --background (got --$MODE and $1)"
    MODE=${1#--}
}

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --store) need_value "$1" $#; STORE=$2; shift 2 ;;
        --node) need_value "$1" $#; NODE=$2; shift 2 ;;
        --uplink) need_value "$1" $#; UPLINK=$2; shift 2 ;;
        --public-ip) need_value "$1" $#; PUBLIC_IP=$2; shift 2 ;;
        --bpffs) need_value "$1" $#; BPFFS=$2; shift 2 ;;
        --init-network) need_value "$1" $#; INIT_CIDR=$2; shift 2 ;;
        --subnet-len) need_value "$1" $#; SUBNET_LEN=$2; shift 2 ;;
        --service-cidr) need_value "$1" $#; SERVICE_CIDR=$2; shift 2 ;;
        --lease-ttl) need_value "$1" $#; LEASE_TTL=$2; shift 2 ;;
        --lease-renew-margin) need_value "$1" $#; RENEW_MARGIN=$2; shift 2 ;;
        --metrics) need_value "$1" $#; METRICS=$2; shift 2 ;;
        --log-level) need_value "$1" $#; LOG_LEVEL=$2; shift 2 ;;
        --log-file) need_value "$1" $#; LOG_FILE=$2; shift 2 ;;
        --wait) need_value "$1" $#; WAIT=$2; shift 2 ;;
        --restart) RESTART=1; shift ;;
        --store-wait) need_value "$1" $#; STORE_WAIT=$2; shift 2 ;;
        --systemd | --foreground) set_mode "$1"; shift ;;
        --background) need_value "$1" $#; set_mode "$1"; BG_LOG=$2; shift 2 ;;
        --) shift; PASSTHROUGH=("$@"); break ;;
        -*) usage_error "unknown option $1" ;;
        *) usage_error "unexpected argument $1" ;;
    esac
done

[ -n "$MODE" ] || usage_error "choose a mode: --systemd, --foreground or --background LOGFILE"
[ -n "$STORE" ] || usage_error "no store: pass --store URL (or set ATOMNET_STORE)"
[ -n "$NODE" ] || NODE=$(hostname)
for pair in "--lease-ttl:$LEASE_TTL" "--lease-renew-margin:$RENEW_MARGIN" "--wait:$WAIT" \
            "--store-wait:$STORE_WAIT" "--subnet-len:$SUBNET_LEN"; do
    value=${pair#*:}
    [ -z "$value" ] || is_number "$value" || usage_error "${pair%%:*} needs a number of seconds, got '$value'"
done
case $LOG_LEVEL in
    "" | debug | info | warning | error) ;;
    *) usage_error "--log-level must be debug, info, warning or error, got '$LOG_LEVEL'" ;;
esac
[ -z "$LOG_FILE" ] || [ "$MODE" = foreground ] || usage_error "--log-file is for --foreground (--background takes LOGFILE)"
[ "$WAIT" = 0 ] || [ "$MODE" != foreground ] || usage_error "--wait is for --background and --systemd"
[ "$RESTART" = 0 ] || [ "$MODE" = systemd ] || usage_error "--restart is for --systemd"

read -r -a ATOMNET <<<"${ATOMNET_BIN:-atomnet}"
[ "${#ATOMNET[@]}" -gt 0 ] || die "ATOMNET_BIN is empty"
command -v "${ATOMNET[0]}" >/dev/null 2>&1 ||
    die "atomnet command not found: ${ATOMNET[0]} (install atomnet, or set ATOMNET_BIN)"

# --- the node's uplink and address (ip(8) reads them over netlink) ----------------------
# (awk reads all its input: an early exit would kill ip with SIGPIPE, and pipefail this script.)
iface_with_ip() { # IP -> the interface holding it
    ip -o -4 addr show | awk -v want="$1" '{ split($4, a, "/") } a[1] == want && !found { print $2; found = 1 }'
}
first_ip_of() { # IFACE -> its first global IPv4 address
    ip -o -4 addr show dev "$1" scope global | awk '!found { split($4, a, "/"); print a[1]; found = 1 }'
}
default_route_iface() {
    ip -o -4 route show default |
        awk '!found { for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); found = 1; break } }'
}

if [ -n "$UPLINK" ]; then
    ip link show dev "$UPLINK" >/dev/null 2>&1 || die "uplink interface $UPLINK does not exist on this node"
elif [ -n "$PUBLIC_IP" ]; then
    UPLINK=$(iface_with_ip "$PUBLIC_IP")
    [ -n "$UPLINK" ] || die "public IP $PUBLIC_IP is not configured on any interface of this node"
elif [ "$MODE" = systemd ]; then
    UPLINK=$(default_route_iface)
    [ -n "$UPLINK" ] || die "cannot find this node's uplink (no default route): pass --uplink IFACE or --public-ip IP"
fi
if [ -z "$PUBLIC_IP" ] && [ "$MODE" = systemd ]; then
    PUBLIC_IP=$(first_ip_of "$UPLINK")
    [ -n "$PUBLIC_IP" ] || die "uplink $UPLINK has no IPv4 address: pass --public-ip IP"
fi

# --- the daemon's command line ---------------------------------------------------------
DAEMON_ARGS=()
[ -z "$LEASE_TTL" ] || DAEMON_ARGS+=(--lease-ttl "$LEASE_TTL")
[ -z "$RENEW_MARGIN" ] || DAEMON_ARGS+=(--lease-renew-margin "$RENEW_MARGIN")
[ -z "$METRICS" ] || DAEMON_ARGS+=(--metrics "$METRICS")
DAEMON_ARGS+=("${PASSTHROUGH[@]}")

daemon_command() { # the full argv of the daemon, for --foreground and --background
    local cmd=("${ATOMNET[@]}" --store "$STORE" --node "$NODE" --bpffs "$BPFFS" daemon --log-format json)
    [ -z "$UPLINK" ] || cmd+=(--uplink "$UPLINK")
    [ -z "$PUBLIC_IP" ] || cmd+=(--public-ip "$PUBLIC_IP")
    [ -z "$LOG_LEVEL" ] || cmd+=(--log-level "$LOG_LEVEL")
    printf '%s\0' "${cmd[@]}" "${DAEMON_ARGS[@]}"
}

# --- the cluster network (once per cluster; harmless again) ---------------------------
init_network() {
    local deadline out
    deadline=$((SECONDS + ${STORE_WAIT%.*}))
    while :; do
        if out=$("${ATOMNET[@]}" --store "$STORE" --node "$NODE" network init --cidr "$INIT_CIDR" \
            --subnet-len "$SUBNET_LEN" --service-cidr "$SERVICE_CIDR" 2>&1 >/dev/null); then
            say "cluster network $INIT_CIDR (service CIDR $SERVICE_CIDR) is configured"
            return 0
        fi
        out=${out//$'\n'/ }
        # Only an etcd store that is not up yet is worth waiting for; anything else is final.
        case $STORE in etcd://*) ;; *) die "network init failed: ${out#atomnet: }" ;; esac
        case $out in *"already initialised"* | *"already set"* | *invalid* | *overlaps*)
            die "network init failed: ${out#atomnet: }" ;;
        esac
        [ "$SECONDS" -lt "$deadline" ] || die "network init failed after ${STORE_WAIT}s: ${out#atomnet: }"
        say "store not ready, retrying network init: ${out#atomnet: }"
        sleep 2
    done
}
[ -z "$INIT_CIDR" ] || init_network

# --- start -----------------------------------------------------------------------------
ready_count() { # LOGFILE -> how many dataplane_ready lines it holds
    local n
    n=$(grep -c "\"event\": \"$READY_EVENT\"" "$1" 2>/dev/null) || true
    echo "${n:-0}"
}

run_foreground() {
    local cmd=()
    mapfile -d '' cmd < <(daemon_command)
    if [ -n "$LOG_FILE" ]; then
        exec >>"$LOG_FILE" 2>&1
    fi
    exec "${cmd[@]}"
}

run_background() {
    local cmd=() before pid deadline
    mapfile -d '' cmd < <(daemon_command)
    mkdir -p "$(dirname "$BG_LOG")"
    before=$(ready_count "$BG_LOG")
    nohup "${cmd[@]}" >>"$BG_LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid"
    [ "$WAIT" != 0 ] || return 0
    deadline=$((SECONDS + ${WAIT%.*}))
    while [ "$(ready_count "$BG_LOG")" -le "$before" ]; do
        kill -0 "$pid" 2>/dev/null || die "the daemon (PID $pid) exited; last log line: $(tail -n 1 "$BG_LOG")"
        [ "$SECONDS" -lt "$deadline" ] || die "no $READY_EVENT from the daemon (PID $pid) in ${WAIT}s: see $BG_LOG"
        sleep 0.2
    done
    say "daemon (PID $pid) is up: $READY_EVENT"
}

# systemd: the unit reads these settings; the CLI wrapper of a node may source them too,
# so each value must be one shell word and one systemd word: no blanks, quotes or '$'.
check_env_value() { # NAME VALUE
    [[ $2 =~ ^[A-Za-z0-9_.:/,@%+=-]*$ ]] || die "$1 value '$2' has characters the env file cannot hold"
}

install_if_changed() { # SOURCE TARGET MODE -> 0 if TARGET changed
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        rm -f "$1"
        return 1
    fi
    chmod "$3" "$1"
    mv -f "$1" "$2"
}

run_systemd() {
    local env_file=${ATOMNET_ENV_FILE:-/etc/atomnet/atomnet.env}
    local unit_dir=${ATOMNET_UNIT_DIR:-/etc/systemd/system}
    local unit_bin=${ATOMNET_UNIT_BIN:-/usr/local/bin/atomnet}
    local unit_src=$SCRIPT_DIR/../systemd/atomnet-daemon.service
    local unit=atomnet-daemon.service
    local changed=0 was_active=0 tmp arg pid deadline
    [ -f "$unit_src" ] || die "unit file not found: $unit_src"
    [ -x "$unit_bin" ] || die "the unit runs $unit_bin, which is not an executable: install atomnet there (or link it)"
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: --systemd needs systemd (use --background)"
    for arg in "ATOMNET_STORE:$STORE" "ATOMNET_NODE:$NODE" "ATOMNET_BPFFS:$BPFFS" "ATOMNET_UPLINK:$UPLINK" \
               "ATOMNET_PUBLIC_IP:$PUBLIC_IP" "ATOMNET_DAEMON_LOG_LEVEL:$LOG_LEVEL"; do
        check_env_value "${arg%%:*}" "${arg#*:}"
    done
    for arg in "${DAEMON_ARGS[@]}"; do
        check_env_value ATOMNET_DAEMON_ARGS "$arg"
    done

    mkdir -p "$(dirname "$env_file")" "$unit_dir"
    tmp=$(mktemp "$env_file.XXXXXX")
    {
        echo "# Written by node-bootstrap.sh: the settings of atomnet-daemon.service and of the node's atomnet CLI."
        echo "ATOMNET_STORE=$STORE"
        echo "ATOMNET_NODE=$NODE"
        echo "ATOMNET_BPFFS=$BPFFS"
        echo "ATOMNET_UPLINK=$UPLINK"
        echo "ATOMNET_PUBLIC_IP=$PUBLIC_IP"
        echo "ATOMNET_DAEMON_LOG_LEVEL=${LOG_LEVEL:-info}"
        echo "ATOMNET_DAEMON_ARGS=\"${DAEMON_ARGS[*]}\""
    } >"$tmp"
    if install_if_changed "$tmp" "$env_file" 0644; then
        changed=1
        say "wrote $env_file"
    fi
    tmp=$(mktemp "$unit_dir/.$unit.XXXXXX")
    cp "$unit_src" "$tmp"
    if install_if_changed "$tmp" "$unit_dir/$unit" 0644; then
        changed=1
        say "installed $unit_dir/$unit"
        systemctl daemon-reload
    fi
    if systemctl is-active --quiet "$unit"; then
        was_active=1
    fi
    systemctl enable --now "$unit"
    if [ "$was_active" = 1 ] && [ "$changed" = 1 ]; then
        say "settings changed: restarting $unit"
        systemctl restart "$unit"
    elif [ "$was_active" = 1 ] && [ "$RESTART" = 1 ]; then
        say "restarting $unit (--restart)"
        systemctl restart "$unit"
    fi
    [ "$WAIT" != 0 ] || return 0
    deadline=$((SECONDS + ${WAIT%.*}))
    while :; do
        # MainPID changes if systemd restarts a crashed daemon: look at the current one's lines.
        pid=$(systemctl show --property MainPID --value "$unit")
        if [ "${pid:-0}" != 0 ] &&
            journalctl --quiet --output cat "_SYSTEMD_UNIT=$unit" "_PID=$pid" |
            grep -F "\"event\": \"$READY_EVENT\"" >/dev/null; then
            say "$unit (PID $pid) is up: $READY_EVENT"
            return 0
        fi
        [ "$SECONDS" -lt "$deadline" ] ||
            die "no $READY_EVENT from $unit in ${WAIT}s: see journalctl -u $unit"
        sleep 1
    done
}

case $MODE in
    foreground) run_foreground ;;
    background) run_background ;;
    systemd) run_systemd ;;
esac
