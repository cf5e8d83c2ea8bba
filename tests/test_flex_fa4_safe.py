"""The flex backend's causal mask is FA4-safe: it captures no Python int (FA4 rejects a
captured int once Dynamo makes it dynamic). Prefix-free masks capture nothing; with a cached
prefix the offset travels as a device tensor. Checked against the oracle across new lengths
(dynamic recompiles) and inside an outer ``torch.compile`` (dynamic shapes without a prefix;
a cached prefix under an outer dynamic compile is a known limitation of Inductor's CPU
lowering of a symbolic capture, see the README)."""

import pytest
import torch

import prism
from prism.kernels import get_backend, reference_attention
from prism.kernels.flex import _offset_tensor
from prism.masks.blockmask import causal_mask_mod, is_causal_mask_mod


def test_prefix_free_mask_mod_captures_nothing():
    fn = causal_mask_mod(0)
    assert fn.__closure__ is None and is_causal_mask_mod(fn)
    assert is_causal_mask_mod(causal_mask_mod(100))
    off = _offset_tensor(100, 7, torch.device("cpu"))
    assert off.tolist() == list(range(100, 107)) and off.dtype == torch.int32


@pytest.mark.parametrize("sq,sk", [(256, 256), (300, 300), (200, 456), (333, 700), (512, 1100)])
def test_flex_matches_reference_across_lengths(sq, sk):
    torch.manual_seed(sq + sk)
    q, k = torch.randn(2, 4, sq, 32), torch.randn(2, 2, sk, 32)
    v = torch.randn_like(k)
    sel = prism.build_scorer("meanpool", block_size=64, threshold=0.7)(q, k)
    assert sel.density < 1
    bm = sel.block_mask()
    out = get_backend("flex")(q, k, v, bm)
    ref = reference_attention(q.double(), k.double(), v.double(), bm).float()
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize(
    "dynamic,shapes",
    [
        (True, ((192, 192), (320, 320))),  # prefix-free: the mask captures nothing
        (False, ((192, 320),)),  # a cached prefix under an outer compile: static shapes
    ],
)
def test_inside_an_outer_compile(dynamic, shapes):
    def fn(q, k, v):
        return prism.sparse_attention(q, k, v, scorer="window", backend="flex", block_size=64)

    compiled = torch.compile(fn, dynamic=dynamic)
    for sq, sk in shapes:
        torch.manual_seed(sq + sk)
        q, k = torch.randn(1, 2, sq, 32), torch.randn(1, 2, sk, 32)
        v = torch.randn_like(k)
        bm = prism.build_scorer("window", block_size=64)(q, k).block_mask()
        ref = reference_attention(q.double(), k.double(), v.double(), bm).float()
        assert (compiled(q, k, v) - ref).abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_flex_runs_every_dtype_with_or_without_fa4(dtype):
    """``flex`` picks FA4 only for half precision: float32 inputs run on FlexAttention's Triton
    backend even where FA4 is installed (FA4 would reject them); ``flex_flash`` says so."""
    from prism.kernels.flex import flash_available

    torch.manual_seed(0)
    q = torch.randn(1, 4, 1000, 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, 2, 1000, 64, device="cuda", dtype=dtype) for _ in range(2))
    sel = prism.build_scorer("meanpool", threshold=0.7)(q, k)
    bm = sel.block_mask()
    out = get_backend("flex")(q, k, v, bm).float()
    ref = reference_attention(q.double(), k.double(), v.double(), bm).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < (1e-4 if dtype == torch.float32 else 3e-2)
    if dtype == torch.float32 and flash_available():
        with pytest.raises(ValueError, match="float16 / bfloat16"):
            get_backend("flex_flash")(q, k, v, bm)
