#!/usr/bin/env bash
# smoke.sh: check a running atomnet cluster end to end, from one of its nodes, as root:
#
#   vagrant ssh node1 -c 'sudo /vagrant/vagrant/smoke.sh'
#
# 1. finds every node: this one, and each one whose subnet this node's overlay knows
#    (`atomnet tunnel list`); checks the count against the rig's /etc/hosts (or --nodes N);
# 2. creates a pod on every node (`pod add` runs ON the pod's node: this one directly, the
#    others over ssh, with the key and ssh config the Vagrantfile installed) and starts a
#    small HTTP server in each that answers with the pod's name;
# 3. checks every pod pings and fetches from every other pod (pod -> pod across nodes);
# 4. creates a service selecting all of them (backends on every node), with a NodePort, and
#    checks that each pod, through the VIP, is answered by every backend, and that the
#    NodePort of every other node answers this node from every backend;
# 5. publishes the last node's pod on a dynamically assigned host port and fetches it from
#    this node and from the pod's own node;
# 6. removes everything it created (also when a check failed or it was interrupted).
#
# Exit status: 0 every check passed, 1 a check failed (the line starting with FAIL says
# which), 2 usage error.
#
# Options:  --nodes N   the number of nodes expected (default: the rig's node* lines in
#                       /etc/hosts; 0: do not check)
#           --keep      leave the pods, service and forward in place (prints how to remove them)
#           --remove TAG  only remove what a --keep run with SMOKE_TAG=TAG left: its pods on
#                       this node, forwards to pods gone, the service once no pod of TAG
#                       is left (run it on every node)
# Environment:
#   ATOMNET_BIN    the atomnet command, split on blanks (default "atomnet"), on every node
#   SMOKE_TAG      prefix of every name it creates (default: smk + 4 random hex digits)
#   SMOKE_TIMEOUT  seconds to wait for anything to be programmed (default 30)
#   SMOKE_REMOTE   how to run a command on another node: "CMD..." run as `CMD... NODE_IP
#                  COMMAND...` (default: ssh NODE_IP sudo -n COMMAND, as the Vagrant rig sets up)
set -euo pipefail

PROG=smoke
PORT=8080
read -r -a ATOMNET <<<"${ATOMNET_BIN:-atomnet}"
TAG=${SMOKE_TAG:-smk$(printf '%04x' $((RANDOM % 65536)))}
TIMEOUT=${SMOKE_TIMEOUT:-30}
EXPECT=
KEEP=0
REMOVE=

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        --nodes)
            [[ ${2:-} =~ ^[0-9]+$ ]] || { echo "$PROG: error: --nodes needs a number (see --help)" >&2; exit 2; }
            EXPECT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --remove)
            [[ ${2:-} =~ ^[a-z0-9-]+$ ]] || { echo "$PROG: error: --remove needs a tag (see --help)" >&2; exit 2; }
            REMOVE=$2; shift 2 ;;
        *) echo "$PROG: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

CHECKS=0
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
pass() {
    CHECKS=$((CHECKS + 1))
    echo "ok   $*"
}
note() { echo "...  $*"; }

# --- running things on nodes ---------------------------------------------------------
# on IP COMMAND...: run COMMAND on the node at IP, or here when IP is empty.
on() {
    local ip=$1 remote=()
    shift
    if [ -z "$ip" ]; then
        "$@"
    elif [ -n "${SMOKE_REMOTE:-}" ]; then
        read -r -a remote <<<"$SMOKE_REMOTE"
        "${remote[@]}" "$ip" "$@"
    else
        ssh -o BatchMode=yes -o ConnectTimeout=5 "$ip" "sudo -n $(printf '%q ' "$@")"
    fi
}
an() { # an IP ARGS...: atomnet -j ARGS on a node
    local ip=$1
    shift
    on "$ip" "${ATOMNET[@]}" -j "$@"
}
json() { # json EXPR: evaluate EXPR on the JSON document `d` read from stdin, print the result
    python3 -c 'import json, sys
d = json.load(sys.stdin)
r = eval(sys.argv[1])
print("\n".join(map(str, r)) if isinstance(r, (list, tuple)) else r)' "$1"
}
# until_ok SECONDS COMMAND...: retry COMMAND until it succeeds or SECONDS pass.
until_ok() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}
node_label() { # IP -> a readable name for messages
    if [ -z "$1" ]; then echo "this node"; else echo "node $1"; fi
}

# --- what was created, removed on exit ------------------------------------------------
NODE_IPS=()                            # "" = this node, then the others' IPs
POD_NAMES=() POD_IPS=() POD_HOSTS=()   # POD_HOSTS: the pod's node IP
SERVICE='' NODE_PORT=''
FORWARD_ID='' FORWARD_HOST=''
cleanup() {
    local status=$? i
    trap - EXIT INT TERM
    if [ "$KEEP" = 1 ]; then
        echo "kept: pods ${POD_NAMES[*]:-}, service ${SERVICE:-none} (NodePort ${NODE_PORT:-none})," \
             "forward ${FORWARD_ID:-none};" \
             "remove them with: atomnet pod del NAME (on each pod's node), atomnet service del $TAG," \
             "atomnet forward del ID, and kill \$(ip netns pids POD)"
        exit "$status"
    fi
    [ -z "$FORWARD_ID" ] || on "$FORWARD_HOST" "${ATOMNET[@]}" forward del "$FORWARD_ID" >/dev/null 2>&1 || true
    [ -z "$SERVICE" ] || on "" "${ATOMNET[@]}" service del "$SERVICE" >/dev/null 2>&1 || true
    for i in "${!POD_NAMES[@]}"; do
        # The pod's processes (our HTTP server) by their PIDs, then the pod itself.
        # shellcheck disable=SC2016 # expanded by the remote sh
        on "${POD_HOSTS[$i]}" sh -c 'for p in $(ip netns pids "$1" 2>/dev/null); do kill "$p"; done' sh \
            "${POD_NAMES[$i]}" >/dev/null 2>&1 || true
        on "${POD_HOSTS[$i]}" "${ATOMNET[@]}" pod del "${POD_NAMES[$i]}" >/dev/null 2>&1 ||
            echo "$PROG: could not delete pod ${POD_NAMES[$i]} on $(node_label "${POD_HOSTS[$i]}")" >&2
    done
    if [ "$status" = 0 ]; then
        echo "PASS: $CHECKS checks on ${#NODE_IPS[@]} node(s); everything created was removed"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# --- --remove TAG: what a --keep run left --------------------------------------------
if [ -n "$REMOVE" ]; then
    trap - EXIT
    [ "$(id -u)" = 0 ] || fail "run me as root (sudo): pods are network namespaces"
    me=${ATOMNET_NODE:-$(hostname)}
    for name in $(an "" pod list | json "[p['name'] for p in d if p['name'].startswith('$REMOVE-') and p['node'] == '$me']"); do
        for p in $(ip netns pids "$name" 2>/dev/null); do kill "$p"; done
        "${ATOMNET[@]}" pod del "$name" >/dev/null || fail "pod del $name failed"
        echo "removed pod $name"
    done
    # Forwards to pods that are gone; the service once no pod of the tag is left anywhere.
    left=$(an "" pod list | json "[p['name'] for p in d if p['name'].startswith('$REMOVE-')]")
    left=${left//$'\n'/ }
    for id in $(an "" forward list | json "[f['id'] for f in d if f['pod'].startswith('$REMOVE-') and f['pod'] not in '$left'.split()]"); do
        "${ATOMNET[@]}" forward del "$id" >/dev/null || fail "forward del $id failed"
        echo "removed forward $id"
    done
    if [ -z "$left" ] && an "" service list | json "'$REMOVE' in [s['name'] for s in d]" | grep -qx True; then
        "${ATOMNET[@]}" service del "$REMOVE" >/dev/null || fail "service del $REMOVE failed"
        echo "removed service $REMOVE"
    fi
    exit 0
fi

# --- 1. the nodes ---------------------------------------------------------------------
[ "$(id -u)" = 0 ] || fail "run me as root (sudo): pods are network namespaces"
command -v "${ATOMNET[0]}" >/dev/null || fail "atomnet not found: ${ATOMNET[0]} (set ATOMNET_BIN)"
tunnels=$(an "" tunnel list) || fail "atomnet tunnel list failed on this node: is its daemon running?"
mapfile -t REMOTE < <(json '[r["node_ip"] for r in d]' <<<"$tunnels" | sort -u | sed '/^$/d')
NODE_IPS=("" "${REMOTE[@]}")
if [ -z "$EXPECT" ] && [ -r /etc/hosts ]; then
    EXPECT=$(grep -cE '^[0-9.]+[[:space:]]+node[0-9]+[[:space:]]+# atomnet-rig$' /etc/hosts) || true
fi
if [ -n "$EXPECT" ] && [ "$EXPECT" != 0 ] && [ "${#NODE_IPS[@]}" != "$EXPECT" ]; then
    fail "expected $EXPECT nodes, this node's overlay knows ${#NODE_IPS[@]} (itself and ${REMOTE[*]:-no other}):" \
         "is the daemon running on every node? (systemctl status atomnet-daemon)"
fi
for ip in "${REMOTE[@]}"; do
    on "$ip" true || fail "cannot run commands on node $ip (ssh, sudo)"
done
pass "${#NODE_IPS[@]} node(s): this one${REMOTE[*]:+ and ${REMOTE[*]}}"

# --- 2. a pod with an HTTP server on every node ---------------------------------------
SERVER='import http.server, sys
body = (sys.argv[1] + "\n").encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), Handler).serve_forever()'

for i in "${!NODE_IPS[@]}"; do
    host=${NODE_IPS[$i]} name=$TAG-$((i + 1))
    POD_NAMES+=("$name") POD_HOSTS+=("$host") POD_IPS+=("")
    pod=$(an "$host" pod add "$name" --label "app=$TAG") || fail "pod add $name on $(node_label "$host") failed"
    POD_IPS[i]=$(json 'd["ip"]' <<<"$pod")
    # shellcheck disable=SC2016 # expanded by the remote sh
    on "$host" sh -c 'ip netns exec "$1" setsid python3 -c "$2" "$1" "$3" </dev/null >/dev/null 2>&1 &' \
        sh "$name" "$SERVER" "$PORT" || fail "could not start the HTTP server in $name"
done
fetch() { # fetch HOST_IP POD_OR_EMPTY URL EXPECTED [-any]: curl URL (in the pod, or on the node)
    local got  # gives EXPECTED (with -any: any answer)
    if [ -n "$2" ]; then
        got=$(on "$1" ip netns exec "$2" curl -sS --max-time 3 "$3") || return 1
    else
        got=$(on "$1" curl -sS --max-time 3 "$3") || return 1
    fi
    [ "${5:-}" = -any ] || [ "$got" = "$4" ]
}
has_endpoint() { an "$1" endpoint list | json "'$2' in [e['ip'] for e in d]" | grep -x True >/dev/null; }
for i in "${!POD_NAMES[@]}"; do
    host=${POD_HOSTS[$i]} name=${POD_NAMES[$i]} ip=${POD_IPS[$i]}
    until_ok "$TIMEOUT" has_endpoint "$host" "$ip" || fail "pod $name ($ip) never programmed on $(node_label "$host")"
    until_ok "$TIMEOUT" fetch "$host" "" "http://$ip:$PORT/" "$name" ||
        fail "the HTTP server in $name ($ip) does not answer its own node"
done
pass "${#POD_NAMES[@]} pod(s) up: ${POD_NAMES[*]} (${POD_IPS[*]})"

# --- 3. pod -> pod, across nodes ------------------------------------------------------
for s in "${!POD_NAMES[@]}"; do
    for d in "${!POD_NAMES[@]}"; do
        [ "$s" != "$d" ] || continue
        src=${POD_NAMES[$s]} dst=${POD_NAMES[$d]} dip=${POD_IPS[$d]}
        until_ok 10 on "${POD_HOSTS[$s]}" ip netns exec "$src" ping -c1 -W2 "$dip" ||
            fail "ping $src -> $dst ($dip) gets no answer"
        until_ok 10 fetch "${POD_HOSTS[$s]}" "$src" "http://$dip:$PORT/" "$dst" ||
            fail "HTTP $src -> $dst ($dip:$PORT) failed"
    done
done
if [ "${#POD_NAMES[@]}" -gt 1 ]; then
    pass "every pod pings and fetches from every other pod"
else
    note "one node: no pod -> pod check across nodes"
fi

# --- 4. a service with a backend on every node ----------------------------------------
svc=$(an "" service add "$TAG" --port "80:$PORT" --selector "app=$TAG" --node-port auto) ||
    fail "service add $TAG failed"
SERVICE=$TAG
VIP=$(json 'd["vip"]' <<<"$svc")
NODE_PORT=$(json 'd["ports"][0]["node_port"]' <<<"$svc")
lb_ready() { # lb_ready HOST: the node programmed the VIP with every backend
    an "$1" lb list | json "[len(r['backends']) for r in d if r['vip'] == '$VIP' and r['port'] == 80]" |
        grep -x "${#POD_NAMES[@]}" >/dev/null
}
for host in "${NODE_IPS[@]}"; do
    until_ok "$TIMEOUT" lb_ready "$host" ||
        fail "service $TAG ($VIP:80) not programmed with ${#POD_NAMES[@]} backends on $(node_label "$host")"
done
for i in "${!POD_NAMES[@]}"; do
    seen=" "
    for _ in $(seq 60); do
        body=$(on "${POD_HOSTS[$i]}" ip netns exec "${POD_NAMES[$i]}" curl -sS --max-time 3 "http://$VIP/") ||
            fail "HTTP ${POD_NAMES[$i]} -> service $TAG ($VIP:80) failed"
        [[ $seen == *" $body "* ]] || seen="$seen$body "
        [ "$(wc -w <<<"$seen")" -lt "${#POD_NAMES[@]}" ] || break
    done
    for name in "${POD_NAMES[@]}"; do
        [[ $seen == *" $name "* ]] || fail "${POD_NAMES[$i]} -> $VIP: backend $name never answered (answered:$seen)"
    done
done
pass "service $TAG ($VIP:80): every pod is answered by all ${#POD_NAMES[@]} backends"

# --- 4b. its NodePort on every other node, from this node (outside any pod) ------------
# answered_all URL: fetching URL from this node, every backend answers (at most 60 tries).
answered_all() {
    local seen=" " body name
    for _ in $(seq 60); do
        body=$(curl -sS --max-time 3 "$1" 2>/dev/null) || continue
        [[ $seen == *" $body "* ]] || seen="$seen$body "
        [ "$(wc -w <<<"$seen")" -lt "${#POD_NAMES[@]}" ] || break
    done
    for name in "${POD_NAMES[@]}"; do
        [[ $seen == *" $name "* ]] || { echo "$1: backend $name never answered (answered:$seen)" >&2; return 1; }
    done
}
if [ "${#REMOTE[@]}" -gt 0 ]; then
    for ip in "${REMOTE[@]}"; do
        until_ok "$TIMEOUT" fetch "" "" "http://$ip:$NODE_PORT/" "" -any ||
            fail "NodePort $NODE_PORT of service $TAG on node $ip does not answer this node"
        answered_all "http://$ip:$NODE_PORT/" || fail "NodePort $NODE_PORT on node $ip: not every backend answers"
    done
    pass "service $TAG: NodePort $NODE_PORT on ${REMOTE[*]} answers this node from all ${#POD_NAMES[@]} backends"
else
    note "one node: no NodePort check from another node"
fi

# --- 5. a host port forward -----------------------------------------------------------
last=$((${#POD_NAMES[@]} - 1))
FORWARD_HOST=${POD_HOSTS[$last]}
fwd=$(an "$FORWARD_HOST" forward add "${POD_NAMES[$last]}:$PORT" --host-port auto) ||
    fail "forward add ${POD_NAMES[$last]}:$PORT on $(node_label "$FORWARD_HOST") failed"
FORWARD_ID=$(json 'd["id"]' <<<"$fwd")
url="http://$(json 'd["host_ip"]' <<<"$fwd"):$(json 'd["host_port"]' <<<"$fwd")/"
until_ok "$TIMEOUT" fetch "" "" "$url" "${POD_NAMES[$last]}" ||
    fail "forward $FORWARD_ID: $url from this node does not reach ${POD_NAMES[$last]}"
until_ok "$TIMEOUT" fetch "$FORWARD_HOST" "" "$url" "${POD_NAMES[$last]}" ||
    fail "forward $FORWARD_ID: $url from its own node does not reach ${POD_NAMES[$last]}"
pass "forward $FORWARD_ID: $url reaches ${POD_NAMES[$last]} from this node and from its own"
