"""libshadowfd from Python: ctypes and numpy over a lazy mapping.

Usage: numpy_sums.py LIBSHADOWFD_SO FILE MODE
numpy.frombuffer over a shadowfd_map mapping must give the same sums as
numpy.fromfile of the source, and a lazy mapping must have been filled by
faults (the shadow's stats). Exit 0 on success.
"""
import ctypes
import json
import sys

import numpy as np

lib_path, path, mode = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
lib = ctypes.CDLL(lib_path, use_errno=True)

P = ctypes.c_void_p
lib.shadowfd_config_new.restype = P
lib.shadowfd_config_set.argtypes = [P, ctypes.c_char_p, ctypes.c_char_p]
lib.shadowfd_config_free.argtypes = [P]
lib.shadowfd_engine_new.restype = P
lib.shadowfd_engine_new.argtypes = [P]
lib.shadowfd_engine_mode.argtypes = [P]
lib.shadowfd_engine_free.argtypes = [P]
lib.shadowfd_open_path.restype = P
lib.shadowfd_open_path.argtypes = [P, ctypes.c_char_p]
lib.shadowfd_shadow_size.restype = ctypes.c_uint64
lib.shadowfd_shadow_size.argtypes = [P]
lib.shadowfd_shadow_free.argtypes = [P]
lib.shadowfd_map.argtypes = [P, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, P,
                             ctypes.POINTER(P)]
lib.shadowfd_unmap.argtypes = [P, ctypes.c_size_t]
lib.shadowfd_stats_json.restype = P  # freed with shadowfd_string_free
lib.shadowfd_stats_json.argtypes = [P]
lib.shadowfd_string_free.argtypes = [P]
lib.shadowfd_last_error.restype = ctypes.c_char_p


def check(r, what):
    if r is None or (isinstance(r, int) and r < 0):
        msg = lib.shadowfd_last_error()
        sys.exit(f"{what} failed ({r}): {msg.decode() if msg else '?'}")
    return r


cfg = check(lib.shadowfd_config_new(), "shadowfd_config_new")
check(lib.shadowfd_config_set(cfg, b"mode", mode), "config mode")
# An error comes back as -EINVAL with the CLI's message.
assert lib.shadowfd_config_set(cfg, b"chunk", b"12 parsecs") == -22
assert b"--chunk" in lib.shadowfd_last_error()
engine = check(lib.shadowfd_engine_new(cfg), "shadowfd_engine_new")
lib.shadowfd_config_free(cfg)
assert lib.shadowfd_engine_mode(engine) == (1 if mode == b"lazy" else 2)

shadow = check(lib.shadowfd_open_path(engine, path), "shadowfd_open_path")
size = lib.shadowfd_shadow_size(shadow)
addr = P()
check(lib.shadowfd_map(shadow, 0, 0, 1, None, ctypes.byref(addr)), "shadowfd_map")
mem = (ctypes.c_char * size).from_address(addr.value)

want = np.fromfile(path.decode(), dtype=np.uint8)
assert want.size == size, (want.size, size)
# Touch the mapping through numpy only: every page is filled on first touch.
got64 = np.frombuffer(mem, dtype=np.uint64, count=size // 8)
want64 = np.fromfile(path.decode(), dtype=np.uint64, count=size // 8)
assert int(got64.sum(dtype=np.uint64)) == int(want64.sum(dtype=np.uint64))
got = np.frombuffer(mem, dtype=np.uint8)
assert int(got.sum(dtype=np.uint64)) == int(want.sum(dtype=np.uint64))
assert np.array_equal(got, want)
f32 = np.frombuffer(mem, dtype=np.float32, count=size // 4)
assert np.array_equal(f32.view(np.uint32), np.fromfile(path.decode(), dtype=np.uint32,
                                                       count=size // 4))

js_ptr = lib.shadowfd_stats_json(shadow)
stats = json.loads(ctypes.string_at(js_ptr).decode())
lib.shadowfd_string_free(js_ptr)
print("stats:", stats)
if mode == b"lazy":
    assert stats["faults"] > 0, stats
assert stats["bytes_filled"] >= size, stats

del f32, got, got64, mem
check(lib.shadowfd_unmap(addr, size), "shadowfd_unmap")
lib.shadowfd_shadow_free(shadow)
lib.shadowfd_engine_free(engine)
print(f"ok: {mode.decode()}: numpy sums over {size} bytes match numpy.fromfile")
