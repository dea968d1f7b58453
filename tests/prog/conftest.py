"""Golden-packet harness: loads a compiled program against fresh, unpinned maps and runs
packets through it with BPF_PROG_TEST_RUN. Nothing is pinned or attached; the fds close
at teardown, so the kernel frees everything."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from ctl.dataplane.bpf import syscalls as sc
from ctl.dataplane.bpf.elf import BpfObject
from ctl.dataplane.bpf.loader import Loader, close_loaded, object_path
from ctl.dataplane.bpf.types import CounterId, U32
from tests.conftest import require_root

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7


@dataclass
class Harness:
    loaded: object
    skb_layout: object

    @property
    def maps(self):
        return self.loaded.maps

    def ctx(self, ingress_ifindex: int) -> bytes:
        """A struct __sk_buff image, laid out from the object's own DWARF."""
        buf = bytearray(self.skb_layout.size)
        off = next(m.offset for m in self.skb_layout.members if m.name == "ingress_ifindex")
        struct.pack_into("<I", buf, off, ingress_ifindex)
        return bytes(buf)

    def run(self, prog: str, packet: bytes, ingress_ifindex: int = 0) -> tuple[int, bytes]:
        rc, out, _ = sc.test_run(self.loaded.programs[prog], packet, self.ctx(ingress_ifindex))
        return rc, out

    def counter(self, cid: CounterId) -> int:
        return sum(v.packets for v in self.maps["counters"].get(U32(value=int(cid))))

    def counters(self) -> dict[CounterId, int]:
        return {cid: self.counter(cid) for cid in CounterId if cid != CounterId.CTR_MAX}


@pytest.fixture
def harness(tmp_path):
    require_root()
    loader = Loader(str(tmp_path / "no-pins"))  # no pins there: every map is created fresh
    loaded = loader.load()
    obj = BpfObject(object_path("from_pod"))
    try:
        yield Harness(loaded, obj.layout("__sk_buff"))
    finally:
        obj.close()
        close_loaded(loaded)




def program_service(h: Harness, vip: str, port: int, proto: str, backends: list[tuple[str, int]], sid: int = 1,
                    affinity: int = 0, table_size: int = 251) -> None:
    """Programs one service port the way the daemon does (reconcile's Maglev swap), straight into the maps."""
    from ctl.dataplane.bpf.types import BackendKey, Counter, ServiceInfo, ServiceKey
    from ctl.dataplane.desired import MaglevSpec
    from ctl.state.model import PROTOCOLS
    from ctl.dataplane.maglev_tables import MaglevTables

    spec = MaglevSpec(table_size, tuple(sorted(backends)), 0)
    tables = MaglevTables(h.maps["maglev"])
    tables.set_many({sid: spec})
    for k in list(h.maps["backends"].keys()):
        if k.service_id == sid:
            h.maps["backends"].delete(k)
    for ip, bport in backends:
        h.maps["backends"].put(BackendKey.from_dict({"service_id": sid, "ip": ip, "port": bport}), Counter())
    h.maps["services"].put(ServiceKey.from_dict({"vip": vip, "port": port, "proto": PROTOCOLS[proto]}),
                           ServiceInfo.from_dict({"id": sid, "backend_count": len(backends), "table_size": table_size,
                                                  "affinity_timeout": affinity, "table": tables.key_of(sid)}))


def set_service_cidr(h: Harness, cidr: str) -> None:
    import ipaddress
    from ctl.dataplane.bpf.types import Config
    net = ipaddress.IPv4Network(cidr)
    h.maps["config"].put(U32(value=0), Config.from_dict({"service_net": str(net.network_address),
                                                          "service_mask": str(net.netmask)}))
