"""Tolerances derived from the magnitudes compared, not from one CPU's kernels.

Two float computations of one quantity that differ only in the order of their sums (another
CPU's vector width or kernel, another TP layout, a fused against an unfused path) disagree by a
few units of rounding (eps) of the *terms summed*, not of each result element: an element that is
a small difference of large terms may be off by far more than its own relative tolerance. So the
absolute tolerance is a number of eps of the tensor's scale, its largest magnitude. Measured: the
z-loss gradients of tests/unit/test_z_loss.py differ by at most 3.1 eps of their scale between
two summation orders on an AMD EPYC (avx512) CPU; the default of 16 leaves a 5x margin while a
wrong term or coefficient shows at 1e-3 of the scale or more.
"""

import torch

ULPS_OF_SCALE = 16


def summation_atol(reference: torch.Tensor, ulps: float = ULPS_OF_SCALE) -> float:
    """Absolute tolerance for `reference` recomputed in another summation order."""
    return ulps * torch.finfo(reference.dtype).eps * reference.detach().abs().max().item()


def assert_close_up_to_summation_order(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 1e-4,
                                       ulps: float = ULPS_OF_SCALE, msg=None) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=summation_atol(expected, ulps), msg=msg)
