"""libbpf through ctypes: pin and open BPF objects, make and update links, read and write
map entries, ask the kernel about an object. ``libbpf.so.1`` comes with libbpfcc; its
calls return ``-errno``, raised here as ``OSError``. No bcc needed: the agent's helpers
that only touch pinned maps (``redirect/ebpf.py``) work without compiling anything."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

from nodeagent.errors import LocalStateError

_lib: Any = None


def libbpf() -> Any:
    global _lib
    if _lib is None:
        try:
            lib = ct.CDLL("libbpf.so.1", use_errno=True)
        except OSError as e:
            raise LocalStateError(f"libbpf.so.1 not found ({e}): install libbpfcc") from None
        lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        lib.bpf_obj_get.argtypes = [ct.c_char_p]
        lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
        lib.bpf_link_update.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
        lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
        lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
        lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
        lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
        lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        _lib = lib
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def obj_pin(fd: int, path: str) -> None:
    _check(libbpf().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    """An fd for a pinned map, program or link."""
    return _check(libbpf().bpf_obj_get(path.encode()), f"open pinned {path}")


@contextlib.contextmanager
def pinned(*path: str) -> Iterator[int]:
    """An fd for the pinned object at ``os.path.join(*path)``, closed afterwards."""
    fd = obj_get(os.path.join(*path))
    try:
        yield fd
    finally:
        os.close(fd)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A link of ``prog_fd`` to a cgroup directory fd or (SK_LOOKUP) a netns fd."""
    rc = libbpf().bpf_link_create(prog_fd, target_fd, attach_type, None)
    return _check(rc, f"link_create(attach type {attach_type})")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Attach a program to a map (SK_MSG_VERDICT): it replaces the one attached before."""
    _check(libbpf().bpf_prog_attach(prog_fd, target_fd, attach_type, 0), "prog_attach")


def map_count(map_fd: int, key_size: int) -> int:
    """How many entries a map holds (walks its keys)."""
    return len(map_keys(map_fd, key_size))


def link_update(link_fd: int, prog_fd: int) -> None:
    _check(libbpf().bpf_link_update(link_fd, prog_fd, None), "link_update")


def _info(fd: int, fmt: str) -> tuple[int, ...]:
    buf = ct.create_string_buffer(256)
    n = ct.c_uint32(256)
    _check(libbpf().bpf_obj_get_info_by_fd(fd, buf, ct.byref(n)), "obj_get_info")
    return struct.unpack_from(fmt, buf.raw)


def obj_id(fd: int) -> int:
    """The kernel id of a program or map fd (``bpf_*_info``: type, id, …)."""
    return _info(fd, "II")[1]


def map_shape(map_fd: int) -> tuple[int, int]:
    """A map's key and value sizes (``bpf_map_info``: type, id, key_size, value_size)."""
    _, _, key_size, value_size = _info(map_fd, "IIII")
    return key_size, value_size


def link_prog_id(link_fd: int) -> int:
    """The id of the program a link runs (``bpf_link_info``: type, id, prog_id)."""
    return _info(link_fd, "III")[2]


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    k = ct.create_string_buffer(key, len(key))
    v = ct.create_string_buffer(value, len(value))
    _check(libbpf().bpf_map_update_elem(map_fd, k, v, 0), "map_update")


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ct.create_string_buffer(key, len(key))
    v = ct.create_string_buffer(value_size)
    if libbpf().bpf_map_lookup_elem(map_fd, k, v) < 0:
        return None
    return v.raw


def map_delete(map_fd: int, key: bytes) -> None:
    k = ct.create_string_buffer(key, len(key))
    libbpf().bpf_map_delete_elem(map_fd, k)


def ip_key(ip: str) -> bytes:
    """An IPv4 address as the map key the C side uses (network byte order)."""
    return socket.inet_aton(ip)




def map_keys(fd: int, key_size: int) -> list[bytes]:
    lib = libbpf()
    out: list[bytes] = []
    prev, key = None, ct.create_string_buffer(key_size)
    while lib.bpf_map_get_next_key(fd, prev, key) == 0:
        out.append(key.raw)
        prev = ct.create_string_buffer(key.raw, key_size)
    return out


def link_cgroup_id(link_fd: int) -> int:
    """The id (the directory's inode) of the cgroup a cgroup link is attached to
    (``bpf_link_info``: type, id, prog_id, padding, cgroup_id); 0 once it is gone."""
    return _info(link_fd, "IIIIQ")[4]
