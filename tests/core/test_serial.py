"""Helper-thread tensor work in pieces under torch's parallel grain: same results as the plain ops."""

from __future__ import annotations

import pytest
import torch

from loramux.core.serial import GRAIN, all_finite_serial, copy_serial


@pytest.mark.parametrize(
    "shape", [(), (7,), (3, 5), (GRAIN + 3,), (40, 3000), (3000, 40), (1, 5 * GRAIN), (2, 3, GRAIN)]
)
def test_copy_serial_equals_copy(shape):
    src = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    dst = torch.empty(shape)
    assert copy_serial(dst, src) is dst
    assert torch.equal(dst, src)


def test_copy_serial_reads_strided_sources_into_strided_targets():
    src = torch.randn(3000, 40)
    dst = torch.empty(40, 3000)
    copy_serial(dst, src.T)  # a transposed (non-contiguous) source, as adapter loads place A.T and B.T
    assert torch.equal(dst, src.T)
    back = torch.empty(3000, 40)
    copy_serial(back.T, dst)  # a non-contiguous target
    assert torch.equal(back, src)


def test_copy_serial_refuses_other_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        copy_serial(torch.empty(4, 5), torch.empty(5, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("at", [0, GRAIN - 1, GRAIN, 3 * GRAIN + 11])
def test_all_finite_serial_finds_one_bad_value_anywhere(bad, at):
    t = torch.randn(3 * GRAIN + 12)
    assert all_finite_serial(t)
    t[at] = bad
    assert not all_finite_serial(t)
    assert not all_finite_serial(t.view(12, -1).T)  # non-contiguous views are checked too


def test_all_finite_serial_on_large_finite_values_and_integers():
    assert all_finite_serial(torch.full((GRAIN * 2,), 3e38))  # a sum would overflow; min and max do not
    assert all_finite_serial(torch.arange(10))
    assert all_finite_serial(torch.empty(0))
