"""Slot layouts: the Python mirror (pyfastbayes/ops/layouts.py) equals what the extension was
built with (``_C.layouts()``, from csrc/common/layouts.h), and is self-consistent."""
import pytest

from pyfastbayes import _native
from pyfastbayes.ops import layouts

from _helpers import NATIVE, in_ci

HAS_LAYOUTS = NATIVE and hasattr(_native._C, "layouts")


@pytest.mark.skipif(not HAS_LAYOUTS and not in_ci(), reason="the extension does not export layouts()")
def test_mirror_equals_the_native_layouts():
    native = layouts.native_layouts()
    assert native is not None, "the extension must export _C.layouts()"
    mirror = {name: lay.as_dict() for name, lay in layouts.MIRROR.items()}
    assert sorted(native) == sorted(mirror), "the same layouts on both sides"
    for name in mirror:
        assert native[name] == mirror[name], f"layout {name}: native {native[name]} vs mirror {mirror[name]}"


def test_native_layouts_is_none_without_layouts(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    assert layouts.native_layouts() is None


@pytest.mark.parametrize("name", sorted(layouts.MIRROR))
def test_slots_are_distinct_and_within_size(name):
    slots = layouts.MIRROR[name].as_dict()
    if "size" in slots:
        size = slots.pop("size")
        assert sorted(slots.values()) == list(range(size)), f"{name}: slots must be 0..size-1, each once"


def test_layouts_are_read_only():
    with pytest.raises(AttributeError, match="read-only"):
        layouts.HYPER.lr = 3
    assert layouts.HYPER.lr == 0 and layouts.HYPER.size == 6 and layouts.RNG.size == 2
