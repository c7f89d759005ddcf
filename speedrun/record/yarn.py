"""Rotary embeddings of record #89: half-truncated RoPE with YaRN steps when the window grows.

Half of each head's dims rotate in adjacent pairs at frequencies (1/1024)^(0..1); the other half
never rotate (they carry no position, which the key offset exploits). When the long attention
window grows from `old` to `new` tokens, YaRN rescales each frequency: those that turn fewer
than `alpha` times over the old window are stretched by old/new (they must keep their meaning
over the longer window), those that turn more than `beta` times are kept (they measure local
order), and those in between are blended; the attention scale grows by 0.2 ln(new/old) + 1.

Tables are bf16, indexed by the position in the flat micro-batch, and computed on the model's
device with the record's own sequence of operations (torch.pow, outer product, cos/sin in fp32,
then bf16), so they equal its tables. Paired-head layers (attention.py) see each token twice, at
positions 2t and 2t+1: their table has both halves side by side.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class Yarn:
    def __init__(self, head_dim: int, rows: int, paired: bool, device: torch.device):
        self.head_dim, self.rows, self.paired, self.device = head_dim, rows, paired, device
        width = head_dim * (2 if paired else 1)
        self.cos = torch.empty(rows, width, dtype=torch.bfloat16, device=device)
        self.sin = torch.empty(rows, width, dtype=torch.bfloat16, device=device)   # signed: see _fill
        self.reset()

    def reset(self) -> None:
        f = (1 / 1024) ** torch.linspace(0, 1, steps=self.head_dim // 4, dtype=torch.float32, device=self.device)
        f = f.repeat_interleave(2)
        self.freq = torch.cat([f, f.new_zeros(self.head_dim // 2)])
        self.attn_scale = 0.1
        self._fill()

    def _fill(self) -> None:
        t = torch.arange(self.rows, dtype=torch.float32, device=self.device)
        if not self.paired:
            theta = torch.outer(t, self.freq)
            self.cos.copy_(theta.cos())
            self.sin.copy_(theta.sin())
        else:
            even, odd = torch.outer(2 * t, self.freq), torch.outer(2 * t + 1, self.freq)
            self.cos.copy_(torch.cat((even.cos(), odd.cos()), dim=-1))
            self.sin.copy_(torch.cat((even.sin(), odd.sin()), dim=-1))
        # rotate pairs (x0, x1) -> (x0 cos + x1 sin, x1 cos - x0 sin): the odd lanes' sines flip
        self.sin[..., 1::2] *= -1

    def step(self, old: int, new: int, alpha: float = 1, beta: float = 32) -> None:
        """YaRN for a long window growing from `old` to `new` tokens."""
        rotations = old * self.freq / (2 * torch.pi)
        scaling = old / new
        weight = torch.clamp((rotations - alpha) / (beta - alpha), 0, 1)
        self.freq *= scaling + weight * (1 - scaling)
        self._fill()
        self.attn_scale *= 0.2 * math.log(new / old) + 1

    def replay(self, history: list[int]) -> None:
        """Reset, then the YaRN steps between successive windows of `history` (schedule.py)."""
        self.reset()
        for old, new in zip(history, history[1:]):
            self.step(old, new)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D] (D = the table's width) with position t rotated by row t of the tables."""
    T = x.size(-3)
    flip = x.view(*x.shape[:-1], x.size(-1) // 2, 2).flip(-1).view(x.shape)
    return cos[None, :T, None, :] * x + sin[None, :T, None, :] * flip
