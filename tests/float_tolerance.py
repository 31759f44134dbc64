"""How far apart two float32 computations of the same tensor may lie, on any machine and thread count.

Two computations of one float32 quantity that differ in kernels or summation order (another CPU's vector width,
another BLAS, a reduction split over threads, a micro-batch split) differ by rounding. An entry that is a sum of terms
cancelling to near zero carries an error of the size of its terms, not of its own, so no entrywise relative
tolerance (rtol) bounds it: the error is bounded normwise, by the norm of the tensor the entry belongs to. With
round-to-nearest a float32 sum of n terms errs by about sqrt(n) * u of the terms' magnitudes, in any order; the
longest chain of sums behind a result of the tiny test models (T5: about 850 terms forward and as many back) gives
sqrt(n) * u <= 45u, rounded up to ROUNDING_EPS = 64u. Measured: at most 5.3u, normwise against float64, for the
gradients of every tiny architecture, with 1 and 2 threads.

Results that are the same computation of the same inputs (merged against unmerged, loaded against saved) are
compared with torch.equal instead.
"""

from __future__ import annotations

import torch

FLOAT32_EPS = 2.0**-24  # the unit roundoff u: one rounding errs by at most u of the result
ROUNDING_EPS = 64 * FLOAT32_EPS  # the normwise error of one float32 computation of a tiny model's tensor (above)


def normwise_atol(*terms: torch.Tensor) -> float:
    """The absolute tolerance between two float32 computations of the sum of `terms` (often one tensor): each
    computation errs by up to ROUNDING_EPS times the norm of each term."""
    return 2 * ROUNDING_EPS * sum(float(torch.linalg.vector_norm(term.detach().double())) for term in terms)
