"""Bad input raises a clear error (never a silently wrong answer)."""

import pytest
import torch

import prism


def qkv(b=1, hq=4, hkv=2, sq=256, sk=256, d=64, dtype=torch.float32):
    return (
        torch.randn(b, hq, sq, d, dtype=dtype),
        torch.randn(b, hkv, sk, d, dtype=dtype),
        torch.randn(b, hkv, sk, d, dtype=dtype),
    )


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="rank 4"):
        prism.sparse_attention(q[0], k, v, backend="reference")


def test_gqa_not_divisible():
    q, k, v = qkv(hq=6, hkv=4)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        prism.sparse_attention(q, k, v)


def test_sq_greater_than_sk():
    q, k, v = qkv(sq=300, sk=200)
    with pytest.raises(ValueError, match="Sq .* > Sk"):
        prism.sparse_attention(q, k, v)


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="dtype mismatch"):
        prism.sparse_attention(q.half(), k, v)
    with pytest.raises(TypeError, match="dtype mismatch"):
        prism.sparse_attention(q, k, v.half())


def test_device_mismatch():
    q, k, v = qkv()
    meta = k.to("meta")
    with pytest.raises(ValueError, match="device mismatch"):
        prism.build_scorer("prism")(q, meta)


def test_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="head dim mismatch"):
        prism.sparse_attention(q, k[..., :32], v)


def test_unsupported_block_size():
    with pytest.raises(ValueError, match="supported block sizes"):
        prism.build_scorer("prism", block_size=100)


def test_unknown_scorer_lists_valid():
    with pytest.raises(ValueError, match="valid scorers: .*prism"):
        prism.build_scorer("prisma")


def test_unknown_backend_lists_valid():
    with pytest.raises(ValueError, match="valid backends: .*flex"):
        prism.SparseAttention(backend="cuda-magic")


def test_unknown_config_key_lists_valid():
    with pytest.raises(
        ValueError, match=r"unknown config key\(s\) \['treshold'\].*valid keys: .*threshold"
    ):
        prism.build_scorer("prism", treshold=0.9)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_threshold_range(bad):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        prism.build_scorer("meanpool", threshold=bad)


def test_bad_rule_and_layout():
    with pytest.raises(ValueError, match="valid rules"):
        prism.build_scorer("prism", rule="best")
    with pytest.raises(ValueError, match="rope_layout"):
        prism.build_scorer("prism", rope_layout="diagonal")


def test_band_wider_than_head_dim():
    q, k, _ = qkv(d=64)
    with pytest.raises(ValueError, match="exceeds the head dim"):
        prism.build_scorer("prism", high_dims=96)(q, k)


def test_selection_length_mismatch():
    q, k, _ = qkv()
    sel = prism.build_scorer("prism")(q, k)
    with pytest.raises(ValueError, match="selection was made for"):
        sel.block_mask(128, 256)
