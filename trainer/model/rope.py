"""RoPE theta schedules for stretching context, stage by stage.

Two published rules (head dim ``d``):

* NTK-aware, in its dynamic form: ``theta_k = theta_prev * (alpha*s - (alpha-1)) ** (d/(d-2))``
  with ``s = L_k / L_prev``.
* The critical-dimension scaling law (Liu et al. 2023, "Scaling Laws of
  RoPE-based Extrapolation"): ``ln theta(L) = ln theta0 * ln(L/2pi) / ln(L0/2pi)``.

>>> round(ntk_theta(500_000, 8192, 65536) / 1e6, 1)
15.3
>>> round(scaling_law_theta(500_000, 8192, 4_194_304) / 1e9, 1)
45.2
"""

from __future__ import annotations

import math


def ntk_theta(theta_prev: float, len_prev: int, len_new: int, head_dim: int = 128, alpha: float = 4.0) -> float:
    """Theta for ``len_new`` tokens from a model trained at ``len_prev`` with ``theta_prev``."""
    if len_new <= 0 or len_prev <= 0 or head_dim <= 2:
        raise ValueError(f"ntk_theta needs positive lengths and head_dim > 2, got {len_prev}, {len_new}, {head_dim}")
    scale = len_new / len_prev
    return theta_prev * (alpha * scale - (alpha - 1)) ** (head_dim / (head_dim - 2))


def scaling_law_theta(theta0: float, len0: int, length: int) -> float:
    """Theta whose critical dimension covers ``length``, from the base (theta0, len0)."""
    if length <= 2 * math.pi or len0 <= 2 * math.pi:
        raise ValueError(f"scaling_law_theta needs lengths above 2*pi, got {len0}, {length}")
    return math.exp(math.log(theta0) * math.log(length / (2 * math.pi)) / math.log(len0 / (2 * math.pi)))
