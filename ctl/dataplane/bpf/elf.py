"""Reads a compiled BPF object with pyelftools: programs, map definitions, relocations,
and the struct/enum layouts of the binary contract, all from the ELF and its DWARF.

Maps are declared the libbpf way, so each member of a map's anonymous struct encodes
one parameter in its *type*: `__uint(max_entries, N)` is `int (*max_entries)[N]`
(the array length is the value) and `__type(key, T)` is `T *key` (the pointee is the
key type). This module turns those types back into numbers.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from ...errors import AtomnetError

BPF_INSN_SIZE = 8
BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    size: int
    type_name: str  # typedef name when there is one (__be32, __u8[6], ...): byte order lives there


@dataclass(frozen=True)
class Layout:
    name: str
    size: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class MapDef:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    pinned: bool
    key_type: str    # C type name of the key, e.g. "endpoint_key" or "__u32"
    value_type: str
    inner: "MapDef | None" = None  # map-in-map: the template of the inner maps (`__array(values, ...)`)


@dataclass
class Program:
    name: str
    section: str
    insns: bytes
    map_relocs: list[tuple[int, str]] = field(default_factory=list)  # (instruction index, map name)


class ObjectError(AtomnetError):
    pass


def _die_name(die) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    return attr.value.decode() if attr else None


def _ref(die, attr="DW_AT_type"):
    return die.get_DIE_from_attribute(attr) if attr in die.attributes else None


def _strip_qualifiers(die):
    while die is not None and die.tag in ("DW_TAG_const_type", "DW_TAG_volatile_type"):
        die = _ref(die)
    return die


def _resolve(die):
    """Follows typedefs and qualifiers to the underlying type."""
    die = _strip_qualifiers(die)
    while die is not None and die.tag == "DW_TAG_typedef":
        die = _strip_qualifiers(_ref(die))
    return die


def _type_name(die) -> str:
    die = _strip_qualifiers(die)
    if die is None:
        return "void"
    if die.tag == "DW_TAG_array_type":
        return f"{_type_name(_ref(die))}[{_array_len(die)}]"
    if die.tag == "DW_TAG_pointer_type":
        return f"{_type_name(_ref(die))} *"
    return _die_name(die) or "<anonymous>"


def _array_len(die) -> int:
    for sub in die.iter_children():
        if sub.tag == "DW_TAG_subrange_type":
            if "DW_AT_count" in sub.attributes:
                return sub.attributes["DW_AT_count"].value
            if "DW_AT_upper_bound" in sub.attributes:
                return sub.attributes["DW_AT_upper_bound"].value + 1
    return 0


def _byte_size(die) -> int:
    die = _resolve(die)
    if die.tag == "DW_TAG_array_type":
        return _array_len(die) * _byte_size(_ref(die))
    return die.attributes["DW_AT_byte_size"].value


class BpfObject:
    """One compiled object (bpf/NAME.c -> NAME.o): one or more tc programs and the maps they use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
            self._elf = ELFFile(self._fh)
        except FileNotFoundError:
            raise ObjectError(f"BPF object {self.path} not found: run `make build`") from None
        except Exception as exc:
            raise ObjectError(f"cannot read BPF object {self.path}: {exc}") from None
        if self._elf["e_machine"] != "EM_BPF":
            raise ObjectError(f"{self.path} is not a BPF object")
        if not self._elf.has_dwarf_info():
            raise ObjectError(f"{self.path} has no DWARF: build with -g and do not strip")
        self._dwarf = self._elf.get_dwarf_info()
        self._symtab = self._elf.get_section_by_name(".symtab")

    def close(self):
        self._fh.close()

    @cached_property
    def license(self) -> str:
        sec = self._elf.get_section_by_name("license")
        return sec.data().rstrip(b"\0").decode() if sec else "GPL"

    @cached_property
    def _dies(self) -> list:
        return [die for cu in self._dwarf.iter_CUs() for die in cu.iter_DIEs()]

    def _variable(self, name: str):
        for die in self._dies:
            if die.tag == "DW_TAG_variable" and _die_name(die) == name and "DW_AT_type" in die.attributes:
                return die
        raise ObjectError(f"{self.path}: no DWARF for variable {name}")

    @cached_property
    def maps(self) -> dict[str, MapDef]:
        maps_sec = self._section_index(".maps")
        if maps_sec is None:
            return {}
        out = {}
        for sym in self._symtab.iter_symbols():
            if sym["st_shndx"] == maps_sec and sym["st_info"]["type"] == "STT_OBJECT":
                out[sym.name] = self._map_def(sym.name)
        return out

    def _map_def(self, name: str) -> MapDef:
        return self._map_struct(name, _resolve(_ref(self._variable(name))))

    def _map_struct(self, name: str, struct_die) -> MapDef:
        params, types, inner = {}, {}, None
        for member in struct_die.iter_children():
            mname = _die_name(member)
            if mname == "values":  # __array(values, struct inner): an array of pointers to the template
                template = _resolve(_ref(_ref(_ref(member))))
                inner = self._map_struct(f"{name}.inner", template)
                continue
            pointee = _strip_qualifiers(_ref(_ref(member)))  # members are pointers
            if pointee is not None and pointee.tag == "DW_TAG_array_type" and mname not in ("key", "value"):
                params[mname] = _array_len(pointee)   # __uint(name, N)
            else:
                types[mname] = pointee                 # __type(name, T)
        if inner is not None:  # map-in-map values are inner map fds (ids when read back)
            params.setdefault("value_size", 4)
        try:
            key_size = params.get("key_size") or _byte_size(types["key"])
            value_size = params.get("value_size") or _byte_size(types["value"])
            return MapDef(
                name=name, type=params["type"], key_size=key_size, value_size=value_size,
                max_entries=params["max_entries"], flags=params.get("map_flags", 0),
                pinned=params.get("pinning", 0) == 1,
                key_type=_type_name(types["key"]) if "key" in types else f"u8[{key_size}]",
                value_type=_type_name(types["value"]) if "value" in types else
                ("__u32" if inner else f"u8[{value_size}]"), inner=inner,
            )
        except KeyError as exc:
            raise ObjectError(f"{self.path}: map {name} lacks {exc.args[0]}") from None

    def _section_index(self, name: str) -> int | None:
        for i, sec in enumerate(self._elf.iter_sections()):
            if sec.name == name:
                return i
        return None

    @cached_property
    def programs(self) -> dict[str, Program]:
        """Every global function in an executable section other than .text."""
        progs = {}
        sections = list(self._elf.iter_sections())
        for sym in self._symtab.iter_symbols():
            if sym["st_info"]["type"] != "STT_FUNC" or sym["st_info"]["bind"] != "STB_GLOBAL":
                continue
            sec = sections[sym["st_shndx"]]
            if sec.name == ".text":
                continue
            data = sec.data()[sym["st_value"]: sym["st_value"] + sym["st_size"]]
            progs[sym.name] = Program(sym.name, sec.name, bytes(data),
                                      self._map_relocs(sec, sym["st_value"], sym["st_size"]))
        return progs

    def _map_relocs(self, sec, start: int, size: int) -> list[tuple[int, str]]:
        rel = self._elf.get_section_by_name(".rel" + sec.name)
        if not isinstance(rel, RelocationSection):
            return []
        maps_sec = self._section_index(".maps")
        out = []
        for r in rel.iter_relocations():
            if not start <= r["r_offset"] < start + size:
                continue
            sym = self._symtab.get_symbol(r["r_info_sym"])
            if sym["st_shndx"] != maps_sec:
                # Only map references are supported: helpers must be __always_inline
                # and run-time settings live in a config map, not in global data.
                raise ObjectError(
                    f"{self.path}: section {sec.name} references {sym.name or 'a section'}; "
                    "only maps may be referenced (inline helpers, no global variables)")
            out.append(((r["r_offset"] - start) // BPF_INSN_SIZE, sym.name))
        return out

    def layout(self, type_name: str) -> Layout:
        """The DWARF layout of a struct, for the binary contract test and the map decoders."""
        for die in self._dies:
            if die.tag == "DW_TAG_structure_type" and _die_name(die) == type_name and "DW_AT_byte_size" in die.attributes:
                members = tuple(
                    Member(_die_name(m), m.attributes["DW_AT_data_member_location"].value,
                           _byte_size(_ref(m)), _type_name(_ref(m)))
                    for m in die.iter_children() if m.tag == "DW_TAG_member")
                return Layout(type_name, die.attributes["DW_AT_byte_size"].value, members)
        raise ObjectError(f"{self.path}: no struct {type_name} in DWARF")

    def enum(self, type_name: str) -> dict[str, int]:
        for die in self._dies:
            if die.tag == "DW_TAG_enumeration_type" and _die_name(die) == type_name:
                return {_die_name(e): e.attributes["DW_AT_const_value"].value
                        for e in die.iter_children() if e.tag == "DW_TAG_enumerator"}
        raise ObjectError(f"{self.path}: no enum {type_name} in DWARF")


def patch_map_fds(prog: Program, fds: dict[str, int]) -> bytes:
    """Points each map-referencing ld_imm64 at the map's fd (src_reg = BPF_PSEUDO_MAP_FD)."""
    insns = bytearray(prog.insns)
    for index, map_name in prog.map_relocs:
        off = index * BPF_INSN_SIZE
        code, regs = insns[off], insns[off + 1]
        if code != BPF_LD_IMM64:
            raise ObjectError(f"program {prog.name}: relocation for {map_name} is not on ld_imm64")
        insns[off + 1] = (regs & 0x0F) | (BPF_PSEUDO_MAP_FD << 4)
        struct.pack_into("<i", insns, off + 4, fds[map_name])
    return bytes(insns)
