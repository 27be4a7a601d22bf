"""pyfastbayes._memory.allocation_cache: freed CPU blocks reused inside the scope, the allocator
restored after it (also on error, also nested), tensors that outlive the scope intact, and the
ATen paths that allocate through the raw interface (oneDNN convolution scratch) working inside."""
import pytest
import torch
import torch.nn.functional as F

from pyfastbayes._memory import allocation_cache
from pyfastbayes._native import _C

pytestmark = pytest.mark.skipif(_C is None, reason="the allocation cache is part of the native extension")


def test_a_freed_block_is_reused_inside_the_scope_only():
    n = 3 << 20  # 12 MB of float32: above glibc's mmap threshold
    with allocation_cache():
        assert _C.allocation_cache_active()
        a = torch.empty(n)
        ptr = a.data_ptr()
        del a
        b = torch.empty(n)
        assert b.data_ptr() == ptr  # the same block, handed out again
        c = torch.empty(n)
        assert c.data_ptr() != ptr
    assert not _C.allocation_cache_active()
    b.fill_(2.0), c.fill_(3.0)  # blocks from the scope stay valid after it
    assert float(b.sum()) == 2.0 * n and float(c.sum()) == 3.0 * n
    del b, c  # freed after the scope: straight back to the system (no crash, no reuse)


def test_nested_scopes_and_errors_restore_the_allocator():
    with allocation_cache():
        with allocation_cache():
            assert _C.allocation_cache_active()
        assert _C.allocation_cache_active()  # the outer scope is still open
    assert not _C.allocation_cache_active()
    with pytest.raises(ValueError, match="inside"):
        with allocation_cache():
            raise ValueError("raised inside the scope")
    assert not _C.allocation_cache_active()
    with allocation_cache(enabled=False):
        assert not _C.allocation_cache_active()


def test_results_inside_equal_results_outside():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 3, 16, 16, generator=g), torch.randn(8, 3, 3, 3, generator=g)
    a, m = torch.randn(300, 200, generator=g), torch.randn(200, 100, generator=g)
    want = (F.conv2d(x, w, padding=1).relu().sum((2, 3)), a @ m)
    with allocation_cache():
        for _ in range(3):  # oneDNN's scratch memory goes through raw_allocate / raw_deallocate
            got = (F.conv2d(x, w, padding=1).relu().sum((2, 3)), a @ m)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_public_name_is_the_scope():
    """``pyfastbayes.allocation_cache`` (README: CPU training loops) is this scope."""
    import pyfastbayes

    assert pyfastbayes.allocation_cache is allocation_cache and "allocation_cache" in pyfastbayes.__all__
    with pyfastbayes.allocation_cache():
        assert _C.allocation_cache_active()
    assert not _C.allocation_cache_active()
