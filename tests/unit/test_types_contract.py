"""The binary contract: every ctypes mirror in ctl/dataplane/bpf/types.py matches the DWARF of the
built objects (sizes, member offsets and sizes, byte order), and every map's key/value
type has a mirror. No root needed: this only reads the objects."""
import ctypes as ct

import pytest

from ctl.dataplane.bpf.elf import BpfObject, ObjectError
from ctl.dataplane.bpf.loader import OBJECT_NAMES, object_path
from ctl.dataplane.bpf.types import BE16, ENUMS, IPV4, MIRRORS


@pytest.fixture(scope="module", params=OBJECT_NAMES)
def obj(request):
    o = BpfObject(object_path(request.param))
    yield o
    o.close()


def _all_maps(obj):
    for m in obj.maps.values():
        yield m
        if m.inner:
            yield m.inner


def test_every_map_type_has_a_mirror_of_the_right_size(obj):
    assert obj.maps, "the object defines no maps"
    for m in _all_maps(obj):
        for type_name, size in ((m.key_type, m.key_size), (m.value_type, m.value_size)):
            assert type_name in MIRRORS, f"map {m.name}: no mirror for {type_name}"
            assert ct.sizeof(MIRRORS[type_name]) == size, f"map {m.name}: {type_name} size"


def test_struct_layouts_match_dwarf(obj):
    used = {t for m in _all_maps(obj) for t in (m.key_type, m.value_type)}
    for type_name in sorted(set(MIRRORS) - {"__u32"}):
        cls = MIRRORS[type_name]
        try:
            layout = obj.layout(type_name)
        except ObjectError:
            assert type_name not in used, f"{type_name} is a map type but has no DWARF"
            continue   # not used by this object; test_every_mirror_is_checked_somewhere covers it
        assert ct.sizeof(cls) == layout.size, f"{type_name}: size"
        py = [(name, getattr(cls, name).offset, getattr(cls, name).size) for name, _ in cls._fields_]
        c = [(m.name, m.offset, m.size) for m in layout.members]
        assert py == c, f"{type_name}: members differ\n python {py}\n C      {c}"
        for m in layout.members:
            big_endian_in_c = m.type_name.startswith("__be")
            big_endian_in_py = cls._format_.get(m.name) in (IPV4, BE16)
            assert big_endian_in_c == big_endian_in_py, f"{type_name}.{m.name}: byte order ({m.type_name})"


def test_enums_match_dwarf(obj):
    for c_name, py_enum in ENUMS.items():
        try:
            c_enum = obj.enum(c_name)
        except ObjectError:
            continue  # this object does not use it; test_every_enum_is_checked covers absence everywhere
        assert c_enum == {e.name: e.value for e in py_enum}, c_name


def test_every_mirror_is_checked_somewhere():
    objs = [BpfObject(object_path(n)) for n in OBJECT_NAMES]
    try:
        for type_name in set(MIRRORS) - {"__u32"}:
            found = 0
            for o in objs:
                try:
                    o.layout(type_name)
                    found += 1
                except ObjectError:
                    pass
            assert found, f"struct {type_name} is in no object's DWARF"
    finally:
        for o in objs:
            o.close()


def test_every_enum_is_checked_somewhere():
    objs = [BpfObject(object_path(n)) for n in OBJECT_NAMES]
    try:
        for c_name in ENUMS:
            found = 0
            for o in objs:
                try:
                    o.enum(c_name)
                    found += 1
                except ObjectError:
                    pass
            assert found, f"enum {c_name} is in no object's DWARF"
    finally:
        for o in objs:
            o.close()
