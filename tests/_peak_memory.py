"""Peak extra CPU memory measured in a fresh process (VmHWM): one probe-scorer call at 32K tokens
after a warm-up call at 1K (``peak_extra``), and the child environment every peak-memory test
runs with (``measure_env``), for the no-O(S²)-memory tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def measure_env() -> dict[str, str]:
    """The environment for a child process that measures its peak RSS: this one's, with glibc's
    mmap threshold fixed at 64 KiB.

    glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB on
    64-bit), after which freed tensors below that size stay in the heap and the peak RSS depends
    on fragmentation: the same call measured 36 and 67 MiB in two runs here and 86 MiB on CI. A
    fixed threshold keeps every tensor above 64 KiB in its own mapping, returned to the system
    when freed, so VmHWM tracks live memory (31 MiB in five runs of that call). Allocations above
    32 MiB (anything of O(S²) size) were mmapped before as well and are seen either way."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


SCRIPT = """
import json, os
if {interpret}:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import torch
import prism
torch.manual_seed(0)
B, HQ, HKV, S, D = {shape}
q = torch.randn(B, HQ, S, D)
k = torch.randn(B, HKV, S, D)
scorer = prism.build_scorer("probe", **json.loads({params!r}))
scorer(q[:, :, :1024], k[:, :, :1024])  # warm up code paths and the allocator
def status(key):  # VmHWM: this process's own peak (ru_maxrss starts at the parent's)
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":"))
base = status("VmHWM")
sel = scorer(q, k)
peak = status("VmHWM")
now = status("VmRSS")
control = torch.ones(64 << 18)  # 64 MiB above the current RSS: the measurement must see it
nkb = (sel.lists[1] if sel.lists is not None else sel.mask).shape[-1]
print(json.dumps({{"extra": peak - base, "control": status("VmHWM") - now, "nkb": nkb,
                  "path": scorer.last_path}}))
"""


def peak_extra(shape=(1, 8, 2, 32768, 64), interpret=False, **params) -> dict:
    """``{"extra": bytes above the warmed-up peak, "nkb", "path"}`` of one ``probe`` scorer call
    with ``params`` on random q/k of ``shape`` = (B, Hq, Hkv, S, D), in a fresh process (its own
    VmHWM; ``interpret``: under Triton's interpreter). Asserts that a 64 MiB control allocation
    after the call is seen."""
    code = SCRIPT.format(shape=tuple(shape), interpret=bool(interpret), params=json.dumps(params))
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=measure_env()
    )
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["control"] > 48 << 20, r  # else the measurement could not see anything
    return r


def probe_peak_extra(**params) -> dict:
    """:func:`peak_extra` for B 1, Hq 8, Hkv 2, D 64, 32768 tokens, ``chunk_mb=8``, top-p 0.9
    and ``params``."""
    return peak_extra(chunk_mb=8, threshold=0.9, **params)
