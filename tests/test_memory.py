"""No O(S^2) memory: estimation + BlockMask at 64K tokens on the CPU stays within a small
multiple of the block-level tensors. Measured as the peak RSS growth of a fresh process."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    import prism
    name, params = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    B, H, HKV, S, D = 1, 8, 8, 65536, 64
    q = torch.randn(B, H, S, D)
    k = torch.randn(B, HKV, S, D)
    scorer = prism.build_scorer(name, **params)
    # warm up allocator / code paths on a short input, then measure at full length
    scorer(q[:, :, :1024], k[:, :, :1024]).block_mask()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sel = scorer(q, k)
    bm = sel.block_mask()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra": peak - base, "density": sel.density, "nkb": sel.mask.shape[-1]}))
    """
)


@pytest.mark.parametrize(
    "name,params",
    [
        ("prism", {"threshold": 0.9}),
        ("meanpool", {"threshold": 0.9}),
    ],
)
def test_estimation_memory_is_block_level(name, params):
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, name, json.dumps(params)],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(res.stdout.strip().splitlines()[-1])
    nqb = nkb = r["nkb"]
    assert nkb == 512
    block_level = 1 * 8 * nqb * nkb * 4  # one fp32 [B, H, NQB, NKB] tensor: 8 MiB
    dense_scores = 1 * 8 * 65536 * 65536 * 4  # what an S x S fp32 score matrix would take: 128 GiB
    # generous: sort buffers (int64), two bands, indices... but far below one S x S row-chunk
    bound = 20 * block_level
    print(f"{name}: extra peak {r['extra'] / 2**20:.1f} MiB, bound {bound / 2**20:.0f} MiB")
    assert r["extra"] < bound, (r, bound)
    assert bound < dense_scores / 300
