"""Peak extra CPU memory of one probe-scorer call at 32K tokens, measured in a fresh process
(``ru_maxrss`` after a warm-up call at 1K), for the no-O(S²)-memory tests."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, resource, torch
import prism
torch.manual_seed(0)
B, HQ, HKV, S, D = 1, 8, 2, 32768, 64
q = torch.randn(B, HQ, S, D)
k = torch.randn(B, HKV, S, D)
scorer = prism.build_scorer("probe", chunk_mb=8, threshold=0.9, **json.loads({params!r}))
scorer(q[:, :, :1024], k[:, :, :1024])  # warm up code paths and the allocator
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
sel = scorer(q, k)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"extra": peak - base, "nkb": sel.mask.shape[-1]}}))
"""


def probe_peak_extra(**params) -> dict:
    """``{"extra": bytes above the warmed-up peak, "nkb": 256}`` for B 1, Hq 8, Hkv 2, D 64,
    32768 tokens, ``chunk_mb=8``, top-p 0.9 and ``params``."""
    code = SCRIPT.format(params=json.dumps(params))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])
