"""MUDD connections and gates of record #89 (Multiway Dynamic Dense connections, Xiao et al. 2025,
arXiv:2502.12170, trimmed for the speedrun).

Both are small per-token MLPs, out = (W2 gelu(W1 x) + b2) * scale, whose outputs are coefficients:

* MUDD proper (`mudd_*`, fixed scale 0.1): at the start of the last layer, 14 coefficients mix the
  residual stream with earlier snapshots (the input of layer 0, the outputs of layers 7 and 9)
  into the values and the residual, gate the value embedding per head pair, and replace the
  layer's fixed residual lambdas with per-token ones; after the last layer, 5 coefficients add
  the snapshots (and the first value embedding) back into the final state.
* The gates (`mudd_gate_*`, learned scale, init 0.1): one from the block input x0 ("pre", 26
  outputs) and one at the start of layer 4 ("post", 41 outputs) make the XSA strengths, the
  attention gates, the per-layer x0 and bigram injection weights, the skip gate and the DC
  weights of the layers listed in PRE_LAYOUT / POST_LAYOUT.

The bias inits (in the pre-scale domain) make every coefficient start at the value the fixed
version would have: sqrt(1.1) residual lambdas, 1.0 post lambdas, 0.25 attention gates,
0.05 bigram weights, 2.0 value-embedding gates, 0.5 skip gate, 1.0 DC w1; the rest at 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

HIDDEN = 64            # width of the coefficient MLPs
MUDD_SCALE = 0.1       # fixed output scale of MUDD proper (the gates learn theirs)
MUDD_COEFS = (14, 5)   # outputs of the two MUDD MLPs: start of the last layer, after it
GATE_COEFS = (26, 41)  # outputs of the pre and post gate MLPs
POST_GATE_LAYER = 4    # the post gates are computed from the input of this layer

# pre gate (from x0): XSA strength of layers 1 and 3 (6 heads each), attention gate of layer 3,
# then for layers 0-3 the pair (x0 weight, bigram weight)
PRE_XSA = {1: slice(0, 6), 3: slice(6, 12)}
PRE_ATTN_GATE = {3: slice(12, 18)}
PRE_INJECT = {layer: 18 + 2 * j for j, layer in enumerate((0, 1, 2, 3))}
# post gate (from layer 4's input): XSA of layers 4 and 7, attention gate of layer 10, (x0,
# bigram) weights of layers 4, 5, 7, 8, 9, the skip gate of layer 6, DC w1 and w2 of layer 10
POST_XSA = {4: slice(0, 6), 7: slice(6, 12)}
POST_ATTN_GATE = {10: slice(12, 18)}
POST_INJECT = {layer: 18 + 2 * j for j, layer in enumerate((4, 5, 7, 8, 9))}
POST_SKIP = 28
POST_DC = (slice(29, 35), slice(35, 41))


def coefficient_mlp(x: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, scale) -> Tensor:
    """(W2 gelu(W1 x) + b2) * scale, for the first w2.size(0) outputs."""
    h = F.gelu(F.linear(x, w1))
    return (F.linear(h, w2) + b2) * scale


def mudd_bias_init() -> Tensor:
    """[2, 14] initial biases of MUDD proper (effective value = bias * MUDD_SCALE)."""
    b = torch.zeros(2, MUDD_COEFS[0])
    s = MUDD_SCALE
    b[0, 6] = b[0, 7] = 2.0 / s          # value-embedding gate of the last layer, per head pair
    b[0, 8] = 1.1 ** 0.5 / s             # its residual lambda (attention)
    b[0, 9] = 1.0 / s                    # its post lambda (attention)
    b[0, 11] = 0.05 / s                  # its bigram weight (x0 weight: 0)
    b[0, 12] = 1.1 ** 0.5 / s            # residual lambda (MLP)
    b[0, 13] = 1.0 / s                   # post lambda (MLP)
    b[1, 1] = -0.5 / s                   # after the last layer: minus half of layer 7's output
    return b


def gate_bias_init(scale: float = 0.1) -> Tensor:
    """[2, 41] initial biases of the pre and post gates (effective = bias * scale)."""
    b = torch.zeros(2, GATE_COEFS[1])
    b[0, 12:18] = 0.25 / scale           # attention gate of layer 3
    b[0, 19:26:2] = 0.05 / scale         # bigram weights of layers 0-3
    b[1, 12:18] = 0.25 / scale           # attention gate of layer 10
    b[1, 19:28:2] = 0.05 / scale         # bigram weights of layers 4, 5, 7, 8, 9
    b[1, 28] = 0.5 / scale               # skip gate
    b[1, 29:35] = 1.0 / scale            # DC w1
    return b


def kaiming_rows(t: Tensor) -> None:
    """nn.Linear's default init on each [out, in] matrix of a stacked weight, in order."""
    for j in range(t.size(0)):
        torch.nn.init.kaiming_uniform_(t.data[j], a=math.sqrt(5))
