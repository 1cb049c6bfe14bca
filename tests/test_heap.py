"""quant.heap: the process allocator's settings under glibc (no-ops elsewhere)."""
import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

# In a fresh process (the settings are the process's): a tensor below the mmap threshold comes from the heap, and a
# larger block freed at the top of the heap stays there; glibc's `keepcost` is the free memory kept at the top.
CODE = """
import ctypes, sys, torch
sys.path.insert(0, {root!r})
from quant import heap
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI2
ok = heap.keep_large_allocations_mapped() if {set_up} else libc.mallopt(heap._M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD) == 1
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
p = libc.malloc(24 << 20)  # carved from the heap's top, and freed back onto it (nothing allocated in between)
libc.free(p)
keep = libc.mallinfo2().keepcost
before = libc.mallinfo2().hblkhd
x = torch.ones(16 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd - before
del x
print(ok, mapped, keep)
big = torch.ones(heap.MMAP_THRESHOLD, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before >= heap.MMAP_THRESHOLD)
"""


def _run(set_up: bool) -> list[str]:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")
    out = subprocess.run([sys.executable, "-c", CODE.format(root=str(ROOT), set_up=set_up)], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    return out


def test_activation_sized_temporaries_stay_in_the_heap_and_are_not_handed_back_on_every_free():
    """Below the mmap threshold a tensor comes from the heap; freed, it stays for the next forward's temporaries
    (each free returning it made every forward fault them in again) until the per-block trim."""
    from quant import heap

    ok, mapped, keep, big_mapped = _run(True)
    assert ok == "True" and int(mapped) == 0 and int(keep) >= 24 << 20 and big_mapped == "True"
    assert heap.TRIM_THRESHOLD > heap.MMAP_THRESHOLD  # every heap-sized temporary fits under it
    # With the mmap threshold fixed alone (glibc's trim threshold then stays at 128 KiB), the freed block is handed back.
    ok, mapped, keep, _ = _run(False)
    assert ok == "True" and int(mapped) == 0 and int(keep) < 24 << 20
