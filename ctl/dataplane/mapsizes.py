"""How many entries the service-side maps hold on this node: the daemon's flags, as Cilium's
agent has them (`--bpf-lb-map-max` for all, `--bpf-lb-service-map-max`,
`--bpf-lb-service-backend-map-max`, `--bpf-lb-maglev-map-max` for one each), each also read
from its environment variable (ATOMNET_BPF_LB_MAP_MAX, ...: what /etc/atomnet/atomnet.env sets).

Nothing given: the sizes compiled into the objects (bpf/include/maps.h), so a node that sets
nothing keeps its pinned maps. A size that differs from a pinned map's makes the loader
create the map anew and carry every entry over (ctl/dataplane/bpf/loader.py).

atomnet's backends map has one entry per (service port, backend), where Cilium's holds one
per backend: `--bpf-lb-map-max N` gives it 4 x N entries, which is what maps.h has at the
default N (65 536 services and Maglev tables, 262 144 backends): N services of 4 backends.
"""
from __future__ import annotations

import os

from ..errors import AtomnetError

# flag -> (environment variable, the maps it sizes with the factor applied to N)
LB_MAP_MAX = "--bpf-lb-map-max"
PER_MAP = {   # flag -> the one map it sizes
    "--bpf-lb-service-map-max": "services",
    "--bpf-lb-service-backend-map-max": "backends",
    "--bpf-lb-maglev-map-max": "maglev",
}
FACTORS = {"services": 1, "backends": 4, "maglev": 1}   # of --bpf-lb-map-max
# A hash map's bucket array is allocated whole (16 bytes per power-of-two bucket): 2^24
# entries is 256 MiB of it before one entry exists. Beyond that is surely a typo.
MAX_SIZE = 1 << 24


def env_name(flag: str) -> str:
    return "ATOMNET_" + flag.removeprefix("--").upper().replace("-", "_")


def _parse(flag: str, given) -> int | None:
    """The flag's value, else its environment variable's, else None; out of range: one line."""
    source, text = flag, given
    if text is None:
        source, text = env_name(flag), os.environ.get(env_name(flag))
        if text is None or text == "":
            return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise AtomnetError(f"invalid {source} {text!r}: a number of entries, 1-{MAX_SIZE}") from None
    if not 1 <= value <= MAX_SIZE:
        raise AtomnetError(f"invalid {source} {value}: a number of entries, 1-{MAX_SIZE}")
    return value


def lb_map_sizes(given: dict[str, object] | None = None) -> dict[str, int]:
    """{map name: max_entries} for the maps whose size is set (flags by name, e.g.
    {"--bpf-lb-map-max": 131072}); maps not in it keep their compiled size."""
    given = given or {}
    out: dict[str, int] = {}
    n = _parse(LB_MAP_MAX, given.get(LB_MAP_MAX))
    if n is not None:
        for name, factor in FACTORS.items():
            out[name] = min(n * factor, MAX_SIZE)
    for flag, name in PER_MAP.items():   # a per-map size wins over --bpf-lb-map-max
        value = _parse(flag, given.get(flag))
        if value is not None:
            out[name] = value
    return out


def flag_for(map_name: str) -> str:
    """The flag an operator raises when `map_name` is too small."""
    return next((flag for flag, name in PER_MAP.items() if name == map_name), LB_MAP_MAX)
