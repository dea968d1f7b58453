"""Mirror.pack_many (the batch-syscall buffers the map caches write) equals the
from_dict path byte for byte, for every mirror and for frozen-tuple input."""
import random

from ctl.dataplane.bpf.types import MIRRORS, BackendKey, EndpointInfo, ServiceInfo, ServiceKey, _packer
from ctl.dataplane.desired import freeze


def _sample(cls, rng):
    d = {}
    for name, ctype in cls._fields_:
        if name.startswith("pad"):
            continue
        fmt = cls._format_.get(name)
        if fmt == "ipv4":
            d[name] = ".".join(str(rng.randint(0, 255)) for _ in range(4))
        elif fmt == "mac":
            d[name] = ":".join(f"{rng.randint(0, 255):02x}" for _ in range(6))
        elif fmt == "be16":
            d[name] = rng.randint(0, 65535)
        elif hasattr(ctype, "_length_") or hasattr(ctype, "_fields_"):
            return None
        else:
            d[name] = rng.randint(0, 2 ** (8 * min(ctypes_size(ctype), 4)) - 1)
    return d


def ctypes_size(ctype):
    import ctypes
    return ctypes.sizeof(ctype)


def test_pack_many_equals_from_dict_for_every_mirror():
    rng = random.Random(7)
    checked = 0
    for cls in MIRRORS.values():
        rows = [_sample(cls, rng) for _ in range(20)]
        if any(r is None for r in rows):
            continue
        want = b"".join(cls.from_dict(r).to_bytes() for r in rows)
        assert cls.pack_many(rows) == want, cls.__name__
        assert cls.pack_many([freeze(r) for r in rows]) == want, cls.__name__
        checked += 1
    assert checked >= 5


def test_the_map_keys_take_the_fast_path_and_missing_members_are_zero():
    for cls in (BackendKey, ServiceKey, ServiceInfo, EndpointInfo):
        assert _packer(cls) is not None, cls.__name__
    assert BackendKey.pack_many([{"service_id": 3}]) == BackendKey.from_dict({"service_id": 3}).to_bytes()
    assert ServiceInfo.pack_many([()]) == bytes(ServiceInfo())


def test_big_batches_of_frozen_tuples_take_the_column_path_and_equal_the_row_path():
    """pack_many's column path (>= 64 frozen tuples of one shape) against from_dict, and
    batches it must refuse (mixed shapes, a field missing from some rows) still exact."""
    from ctl.dataplane.bpf.types import _columns
    rng = random.Random(11)
    for cls in MIRRORS.values():
        rows = [_sample(cls, rng) for _ in range(200)]
        if any(r is None for r in rows) or _packer(cls) is None:
            continue
        want = b"".join(cls.from_dict(r).to_bytes() for r in rows)
        frozen = [freeze(r) for r in rows]
        assert _columns(cls, frozen) is not None, cls.__name__
        assert cls.pack_many(frozen) == want, cls.__name__
        # one row without its first field (zero there), one with a field the struct lacks (ignored)
        name = next(iter(rows[0]))
        partial = [dict(r) for r in rows]
        del partial[5][name]
        partial[9]["not_a_member"] = 1
        assert _columns(cls, [freeze(r) for r in partial]) is None
        want = b"".join(cls.from_dict({k: v for k, v in r.items() if k != "not_a_member"}).to_bytes()
                        for r in partial)
        assert cls.pack_many([freeze(r) for r in partial]) == want, cls.__name__
    keys = [freeze({"service_id": i, "ip": f"10.244.{i % 250}.{i % 200}", "port": 8080}) for i in range(1000)]
    assert BackendKey.pack_many(keys) == b"".join(BackendKey.from_dict(dict(k)).to_bytes() for k in keys)
