"""Where a layer keeps its output and input units in its weight, for layout-aware defaults.

`MaxNorm` and `UnitNorm` take one unit per output feature, `NMSparsity` groups along the input
dim; which dim that is depends on the layer that owns the weight:

=====================================  =====================  ======  =====
owner                                  weight layout          output  input
=====================================  =====================  ======  =====
``nn.Linear``, unknown, None           (out, in)              0       -1
``nn.Conv*d``                          ``(out, in/g, *k)``    0       1
``nn.ConvTranspose*d``                 ``(in, out/g, *k)``    1       0
transformers' ``Conv1D``               (in, out)              -1      0
``nn.Embedding``                       (rows, features)       0       -1
=====================================  =====================  ======  =====

A parameter of fewer than 2 dims (a bias, a norm's scale) has no such layout: output 0 and
input -1 (its only dim). Pure functions of the module's type and the parameter's rank.

>>> import torch
>>> output_dim(torch.nn.ConvTranspose2d(4, 8, 3), torch.zeros(4, 8, 3, 3)), input_dim(None, torch.zeros(3, 5))
(1, -1)
"""

from __future__ import annotations

import torch
from torch import nn


def _layout(owner, param: torch.Tensor) -> tuple[int, int]:
    """``(output, input)`` dims of ``param`` for a weight of ``owner``."""
    if param.dim() < 2 or owner is None:
        return 0, -1
    if isinstance(owner, nn.modules.conv._ConvNd):
        return (1, 0) if owner.transposed else (0, 1)
    # Hugging Face's GPT-2 style Conv1D stores (in, out); recognised by name, not imported
    if type(owner).__name__ == "Conv1D" and hasattr(owner, "nf"):
        return -1, 0
    return 0, -1  # nn.Linear, nn.Embedding (a row per unit) and anything unknown


def output_dim(owner, param: torch.Tensor) -> int:
    """The dim of ``param`` that indexes the owner's output units."""
    return _layout(owner, param)[0]


def input_dim(owner, param: torch.Tensor) -> int:
    """The dim of ``param`` that runs over the owner's inputs."""
    return _layout(owner, param)[1]
