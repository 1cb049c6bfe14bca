"""quant.heap: the process allocator's settings under glibc (no-ops elsewhere)."""
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quant import heap
from quant.errors import QtoolError

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


_KEPT = []


def _allocate_and_keep(n: int) -> int:
    """``n`` objects of 1 KiB from the C heap (above Python's small-object allocator), kept alive as tokenizing's
    debris is: the heap grows by ~n KiB."""
    _KEPT.append([bytes(1024) for _ in range(n)])
    return os.getpid()


def _touch(n: int) -> None:
    x = bytearray(n)
    for i in range(0, n, 4096):
        x[i] = 1


def _fail(message: str):
    raise QtoolError(message)


def test_work_in_a_child_returns_its_answer_raises_its_errors_and_leaves_the_heap_alone():
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc >= 2.33")

    class MI2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MI2
    before = libc.mallinfo2().uordblks
    pid = heap.in_child(_allocate_and_keep, 40_000)
    assert pid != os.getpid() and not _KEPT  # computed elsewhere: nothing kept here
    assert libc.mallinfo2().uordblks - before < 4 << 20
    assert _allocate_and_keep(40_000) == os.getpid()  # the same work here does grow this heap (the check can fail)
    assert libc.mallinfo2().uordblks - before > 32 << 20
    _KEPT.clear()
    rss = heap._status_mb("VmRSS")
    heap.in_child(_touch, 768 << 20)
    assert heap.peak_rss_mb() >= rss + 700  # the child's peak (the pages it shares with this process and 768 MiB)
    with pytest.raises(QtoolError, match="one sentence"):
        heap.in_child(_fail, "one sentence")


def test_work_for_a_child_runs_here_while_another_thread_holds_a_lock():
    """A child forked while another thread holds a lock finds it held forever: two quant.quantize calls from two
    threads hung (the import lock). With another thread alive the work runs in this process."""
    import threading
    import time

    lock = threading.Lock()
    lock.acquire()
    holder = threading.Thread(target=lambda: (time.sleep(0.5), lock.release()))
    holder.start()
    answers = []

    def under_lock():
        with lock:
            return os.getpid()

    caller = threading.Thread(target=lambda: answers.append(heap.in_child(under_lock)), daemon=True)
    caller.start()
    caller.join(timeout=30)
    holder.join()
    assert not caller.is_alive(), "in_child forked while another thread held a lock, and the child waits for it"
    assert answers == [os.getpid()]


def test_the_calibration_text_is_tokenized_outside_the_quantizing_process(tmp_path, monkeypatch):
    import quant
    from calib import data
    from tiny_models import save_tiny_model

    pids = tmp_path / "pids"
    real = data.tokenize_documents

    def spy(tokenizer, texts):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(tokenizer, texts)

    monkeypatch.setattr(data, "tokenize_documents", spy)
    src = save_tiny_model("llama", tmp_path / "src")
    quant.quantize(src, tmp_path / "out", method="awq", bits=4, group_size=32, n_samples=4, seqlen=32,
                   dtype="float32", progress=False)
    seen = set(pids.read_text().split())
    assert seen and str(os.getpid()) not in seen


def test_a_child_does_not_outlive_its_parent_killed_with_sigkill(tmp_path):
    import signal
    import time

    pid_file = tmp_path / "child"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from quant import heap\n"
            "def work(path):\n"
            "    import os; open(path, 'w').write(str(os.getpid())); time.sleep(60)\n"
            f"heap.in_child(work, {str(pid_file)!r})\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(600):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.05)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(100):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            if Path(f"/proc/{child}/stat").read_text().split(") ")[-1].startswith("Z"):
                break  # killed, not yet reaped
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child kept running after its parent was killed")
    finally:
        parent.kill()


def _die() -> None:
    os.kill(os.getpid(), 9)


def test_a_child_killed_before_it_answers_is_one_clear_error():
    with pytest.raises(QtoolError, match="^tokenizing: the child process doing it was killed by signal 9 "):
        heap.in_child(_die, what="tokenizing")


def test_an_error_in_the_child_keeps_its_traceback_and_a_child_reaped_elsewhere_still_answers():
    import signal

    with pytest.raises(QtoolError) as e:
        heap.in_child(_fail, "one sentence")
    assert isinstance(e.value.__cause__, heap.ChildTraceback) and "in _fail" in str(e.value.__cause__)
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps children at once: waitpid finds none
    try:
        assert heap.in_child(_allocate_and_keep, 10) != os.getpid()
    finally:
        signal.signal(signal.SIGCHLD, old)


def test_the_heap_is_trimmed_only_near_the_peak(monkeypatch):
    """Below ``NEAR_PEAK`` of the high-water mark a trim cannot lower the peak, and it is skipped; at or above it
    (or where /proc cannot be read) glibc's ``malloc_trim`` runs."""
    calls = []

    class Libc:
        def malloc_trim(self, pad):
            calls.append(pad)

    status = {"VmRSS": 500.0, "VmHWM": 1000.0}
    monkeypatch.setattr(heap, "_libc", Libc())
    monkeypatch.setattr(heap, "_status_fields", lambda *fields: {f: status[f] for f in fields})
    assert heap.trim() is False and calls == []
    status["VmRSS"] = heap.NEAR_PEAK * 1000.0
    assert heap.trim() is True and calls == [0]
    monkeypatch.setattr(heap, "_status_fields", lambda *fields: None)
    assert heap.trim() is True and calls == [0, 0]
    monkeypatch.setattr(heap, "_status_fields", lambda *fields: {"VmHWM": 1000.0})  # no VmRSS line
    assert heap.trim() is True and calls == [0, 0, 0]
