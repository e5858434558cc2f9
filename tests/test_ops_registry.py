import pytest
import torch

from minidiff import ops


def qkv(n=33, m=17, d=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, n, d, generator=g), torch.randn(2, 3, m, d, generator=g), torch.randn(2, 3, m, d, generator=g))


@pytest.mark.parametrize("backend", ["math", "sdpa", "chunked"])
def test_builtin_backends_agree(backend):
    q, k, v = qkv()
    reference = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    with ops.use_backend("attention", backend):
        out = ops.attention(q, k, v)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_chunked_attention_small_chunks_matches_math():
    q, k, v = qkv(n=50)
    torch.testing.assert_close(ops.chunked_attention(q, k, v, chunk_size=7), ops.math_attention(q, k, v))


def test_with_block_overrides_per_model_choice_and_nests():
    assert ops.current_backend("attention", "math") == "math"
    with ops.use_backend("attention", "chunked"):
        assert ops.current_backend("attention", "math") == "chunked"
        with ops.use_backend("attention", "sdpa"):
            assert ops.current_backend("attention") == "sdpa"
        assert ops.current_backend("attention") == "chunked"


def test_user_backend_is_called_and_checked():
    calls = []

    def mine(q, k, v, **kwargs):
        calls.append(q.shape)
        return ops.math_attention(q, k, v, **kwargs)

    ops.register_backend("attention", "test-mine", mine)
    try:
        q, k, v = qkv()
        with ops.use_backend("attention", "test-mine"):
            ops.attention(q, k, v)
        assert calls == [q.shape]
        with pytest.raises(ValueError, match="already has a backend 'test-mine'"):
            ops.register_backend("attention", "test-mine", mine)
    finally:
        ops.unregister_backend("attention", "test-mine")
    assert "test-mine" not in ops.available_backends("attention")


def test_wrong_shape_or_dtype_from_user_kernel_is_rejected():
    ops.register_backend("attention", "test-bad", lambda q, k, v, **kw: q.double())
    try:
        q, k, v = qkv()
        with pytest.raises(ValueError, match=r"test-bad.*returned .*float64.*expected shape \(2, 3, 33, 8\)"):
            with ops.use_backend("attention", "test-bad"):
                ops.attention(q, k, v)
    finally:
        ops.unregister_backend("attention", "test-bad")


def test_unknown_backend_and_op_list_what_exists():
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'; registered backends: .*'chunked'.*'math'.*'sdpa'"):
        with ops.use_backend("attention", "nope"):
            pass
    with pytest.raises(ValueError, match="unknown op 'conv9'"):
        ops.set_backend("conv9", "x")
    with pytest.raises(ValueError, match="built-in"):
        ops.unregister_backend("attention", "math")
