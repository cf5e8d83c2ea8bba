"""prism.masks.blockmask.span_block_mask: one key span per query row, applied by flex."""

from __future__ import annotations

import pytest
import torch

from prism.kernels import get_backend
from prism.masks.blockmask import bool_to_block_lists, span_block_mask

BS = 32


def test_span_block_mask_applies_each_rows_span_inside_the_listed_blocks():
    b, hq, hkv, s, d = 2, 4, 2, 96, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    # row q sees keys [start, q]: a sliding window of random width, one span inside causality
    pos = torch.arange(s)
    width = torch.randint(1, 50, (b, s), generator=g)
    start = (pos - width + 1).clamp_min(0).to(torch.int32)
    count = (pos + 1 - start).to(torch.int32)
    nb = s // BS
    blocks = torch.rand(b, hq, nb, nb, generator=g) < 0.6
    blocks |= torch.eye(nb, dtype=torch.bool)  # the diagonal: every row keeps a key
    blocks &= torch.ones(nb, nb, dtype=torch.bool).tril()
    num, idx = bool_to_block_lists(blocks)
    bm = span_block_mask(num, idx, start, count, s, s, BS)
    out = get_backend("flex")(q, k, v, bm)

    in_span = (pos[None, None, :] >= start[..., None]) & (
        pos[None, None, :] < (start + count)[..., None]
    )
    tokens = blocks[:, :, pos // BS][..., pos // BS]  # [B, Hq, S, S]
    allowed = tokens & in_span[:, None]
    kd = k.double().repeat_interleave(hq // hkv, 1)
    vd = v.double().repeat_interleave(hq // hkv, 1)
    scores = (q.double() @ kd.transpose(-1, -2) * d**-0.5).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, -1)
    ref = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros_like(p)) @ vd
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    # the span mattered: plain block-causal attention over the same blocks differs
    causal_only = tokens & (pos[:, None] >= pos[None, :])
    assert not torch.equal(causal_only, allowed)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])],
)  # fmt: skip
def test_block_masks_carry_full_block_tensors_on_cuda(device):
    """FA4 (FlexAttention's FLASH backend) refuses a BlockMask without full-block tensors, even
    when every block is partial: on CUDA the span and list builders always pass them (empty if
    none); on CPU they do not (Inductor's CPU flex template fails to compile a span mask with
    them)."""
    from prism.masks.blockmask import lists_to_block_mask

    num = torch.tensor([[[1, 2]]], dtype=torch.int32, device=device)
    idx = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32, device=device)
    start = torch.zeros(1, 64, dtype=torch.int64, device=device)
    count = torch.arange(1, 65, device=device)[None]
    for bm in (
        span_block_mask(num, idx, start, count, 64, 64, 32),
        lists_to_block_mask(num, idx, None, None, 64, 64, 32),
    ):
        assert torch.equal(bm.kv_num_blocks, num)
        if device == "cuda":
            assert bm.full_kv_num_blocks is not None and bm.full_kv_indices is not None
            assert int(bm.full_kv_num_blocks.sum()) == 0
        else:
            assert bm.full_kv_num_blocks is None
