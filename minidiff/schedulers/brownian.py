"""A seeded Brownian motion that can be queried on any interval, for the SDE samplers (DPM++ SDE).

An SDE sampler needs the increment ``W(t1) - W(t0)`` of one fixed Brownian path over each step it takes, so that
the same seed gives the same path whatever the step sizes. The path is built as a binary tree over ``[t0, t1]``
(Li et al. 2020, "Scalable Gradients for Stochastic Differential Equations", Section 5 "virtual Brownian tree";
Kidger et al. 2021, "Efficient and Accurate Gradients for Neural SDEs", the "Brownian interval"): the root holds
``W(t1) - W(t0) ~ N(0, t1 - t0)``; a node is split at its midpoint by the Brownian bridge (Levy's construction),

    W_left = (m - s) / (e - s) * W + sqrt((m - s)(e - m) / (e - s)) * Z,    W_right = W - W_left,

with ``Z ~ N(0, I)`` drawn from a seed fixed by the node's position in the tree, so every node's increment is a
function of the entropy alone (the tree is dyadic, ``halfway_tree``), not of the order of the queries. A query is
the sum of the increments of the nodes that tile it, nodes split down to the query points (rounded to ``tol``).

This is a re-implementation of ``torchsde.BrownianInterval(halfway_tree=True, levy_area_approximation="none")``,
the object diffusers' ``BrownianTreeNoiseSampler`` wraps, with the same seeds (numpy ``SeedSequence`` of the
entropy and the node's (spawn key, depth)), the same splits and the same floating-point operations, so its draws
equal torchsde's bit for bit (checked in parity/test_schedulers_dpm_sde.py) and minidiff does not need torchsde.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch


def brownian_bridge_split(W: torch.Tensor, start: float, midway: float, end: float, noise: torch.Tensor,
                          is_left: bool) -> torch.Tensor:
    """The increment over ``[start, midway]`` (or ``[midway, end]``) of a Brownian motion with increment ``W`` over
    ``[start, end]``: the bridge's Gaussian with mean ``(m - s)/(e - s) W`` and variance ``(m - s)(e - m)/(e - s)``
    (Revuz & Yor, "Continuous Martingales and Brownian Motion", Ch. I.3), sampled with ``noise ~ N(0, I)``; the
    right part is the rest, so the two always sum to ``W``."""
    h_reciprocal = 1 / (end - start)
    left_diff, right_diff = midway - start, end - midway
    left = left_diff * W * h_reciprocal + math.sqrt(left_diff * right_diff * h_reciprocal) * noise
    return left if is_left else W - left


def seeded_randn(size: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed) -> torch.Tensor:
    """``torch.randn`` from a fresh generator seeded with ``seed`` (one per tree node)."""
    generator = torch.Generator(device).manual_seed(int(seed))
    return torch.randn(size, dtype=dtype, device=device, generator=generator)


class _Node:
    """One interval ``[start, end]`` of the tree; split at ``midway`` into ``left`` and ``right`` once queried."""

    __slots__ = ("start", "end", "parent", "is_left", "key", "depth", "midway", "left", "right", "seed")

    def __init__(self, start: float, end: float, parent: _Node | None, is_left: bool) -> None:
        self.start, self.end, self.parent, self.is_left = start, end, parent, is_left
        # position in the dyadic tree: the root is (0, 0); children append one bit to the parent's key
        self.key = 0 if parent is None else 2 * parent.key + (0 if is_left else 1)
        self.depth = 0 if parent is None else parent.depth + 1
        self.midway = self.left = self.right = self.seed = None


class BrownianInterval:
    """A Brownian motion on ``[t0, t1]`` with tensors of shape ``size``, fixed by ``entropy``; call it with
    ``(ta, tb)`` for ``W(tb) - W(ta)``. Queries outside ``[t0, t1]`` are clamped to it (torchsde also warns; here
    they are routine: ``exp(log(sigma))`` rounds just past the ends).
    ``cache_size`` bounds the memo of node increments (recomputing gives the same values)."""

    def __init__(self, t0: float, t1: float, size: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", entropy: int | None = None, tol: float = 1e-6,
                 pool_size: int = 24, cache_size: int = 45) -> None:
        t0, t1 = float(t0), float(t1)
        if not t0 <= t1:
            raise ValueError(f"BrownianInterval needs t0 <= t1, got t0={t0} and t1={t1}")
        if not tol > 0:
            raise ValueError(f"BrownianInterval: tol={tol!r} must be > 0 (the resolution the queries are rounded to)")
        if entropy is None:
            entropy = int(np.random.randint(0, 2**31 - 1))
        self.size, self.dtype, self.device = tuple(size), dtype, torch.device(device)
        self.entropy, self.pool_size, self.cache_size = entropy, pool_size, cache_size
        digits = -int(math.log10(tol))
        self._round = lambda x: round(x, digits)
        self.root = _Node(self._round(t0), self._round(t1), None, True)
        root_seed = np.random.SeedSequence(entropy=entropy, pool_size=pool_size).generate_state(1)[0]
        self.root_W = seeded_randn(self.size, dtype, self.device, root_seed) * math.sqrt(t1 - t0)
        self._cache: OrderedDict[_Node, torch.Tensor] = OrderedDict()

    def __call__(self, ta: float, tb: float) -> torch.Tensor:
        """``W(tb) - W(ta)`` for ``ta <= tb``."""
        ta, tb = self._clamp(float(ta)), self._clamp(float(tb))
        if ta > tb:
            raise ValueError(f"BrownianInterval: query times must satisfy ta <= tb, got ta={ta} and tb={tb}")
        if ta == tb:
            return torch.zeros(self.size, dtype=self.dtype, device=self.device)
        nodes = self._tiling(self._round(ta), self._round(tb))
        W = self._increment(nodes[0])
        for node in nodes[1:]:
            W = W + self._increment(node)
        return W

    def _clamp(self, t: float) -> float:
        return min(max(t, self.root.start), self.root.end)

    def _split(self, node: _Node, point: float) -> None:
        """Halve ``node`` and then the child holding ``point``, until ``point`` is a split point."""
        while True:
            node.midway = self._round(0.5 * (node.end + node.start))
            seeds = np.random.SeedSequence(entropy=self.entropy, spawn_key=(node.key, node.depth),
                                           pool_size=self.pool_size)
            node.seed = seeds.generate_state(1)[0]
            node.left = _Node(node.start, node.midway, node, True)
            node.right = _Node(node.midway, node.end, node, False)
            if point == node.midway:
                return
            node = node.right if point > node.midway else node.left

    def _tiling(self, ta: float, tb: float) -> list[_Node]:
        """The nodes whose intervals tile ``[ta, tb]``, left to right, splitting nodes as needed."""
        tiles, pending = [], [(self.root, ta, tb)]
        while pending:
            node, a, b = pending.pop()
            while not (a == node.start and b == node.end):
                if node.midway is None:
                    self._split(node, b if a == node.start else a)
                if b <= node.midway:
                    node = node.left
                elif a >= node.midway:
                    node = node.right
                else:  # straddles the split: the left part now, the right part after it
                    pending.append((node.right, node.midway, b))
                    node, b = node.left, node.midway
            tiles.append(node)
        return tiles

    def _increment(self, node: _Node) -> torch.Tensor:
        """The node's increment, bridged down from the nearest memoised ancestor (or the root)."""
        path = []
        while node.parent is not None and node not in self._cache:
            path.append(node)
            node = node.parent
        W = self.root_W if node.parent is None else self._cache[node]
        for child in reversed(path):
            parent = child.parent
            noise = seeded_randn(self.size, self.dtype, self.device, parent.seed)
            W = brownian_bridge_split(W, parent.start, parent.midway, parent.end, noise, child.is_left)
            self._cache[child] = W
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return W


class BrownianTreeNoiseSampler:
    """Standard-normal noise for a step sigma -> sigma_next from one Brownian path over ``[sigma_min, sigma_max]``:
    ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)`` (k-diffusion / diffusers
    ``BrownianTreeNoiseSampler``). ``seed`` is an int, None (drawn from torch's global generator, as diffusers) or a
    list of one int per batch item (one path each)."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | list[int] | None = None):
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple))
        if self.batched and len(seed) != x.shape[0]:
            raise ValueError(f"BrownianTreeNoiseSampler: {len(seed)} seeds for a batch of {x.shape[0]}; pass one seed "
                             "per batch item or a single int")
        size = x.shape[1:] if self.batched else x.shape
        self.trees = [BrownianInterval(min(t0, t1), max(t0, t1), size, x.dtype, x.device, entropy=s)
                      for s in (seed if self.batched else [seed])]
        self.sign = 1.0 if t0 < t1 else -1.0

    def __call__(self, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = (t0, t1, 1.0) if t0 < t1 else (t1, t0, -1.0)
        W = torch.stack([tree(low, high) for tree in self.trees]) * (self.sign * sign)  # (trees, *size)
        W = W if self.batched else W[0]
        return W / (t1 - t0).abs().sqrt()
