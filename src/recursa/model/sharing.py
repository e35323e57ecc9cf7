"""Depth-wise parameter sharing: which unique layer runs at each depth, and the loop structure.

A Recursive Transformer has depth L (= `cfg.n_layers`) but only a few unique layers. In DESIGN
terms a *stage* is a set of weights, so the stages of a shared model are its unique layers:

    prelude   unique layers run once before the shared block   (middle_*: the first layer)
    shared    K unique layers looped n_loops times              (all depths for cycle/sequence)
    coda      unique layers run once after the shared block     (middle_*: the last layer)

Order inside the shared block (K = 3, n_loops = 2):
    cycle     f0 f1 f2 f0 f1 f2      a token leaves loop r after f2 and enters loop r+1 at f0
    sequence  f0 f0 f1 f1 f2 f2      loop r of layer k is the r-th repetition of f_k

Tokens at the same unique layer share weights whatever loop they are in, which is what lets the
engine batch them together (continuous depth-wise batching). `Structure` is what the engine
reads: `depth_to_layer[d]`, `loop_of[d]` (None outside the shared block), the prelude / coda
depths, and `loop_ends` (the last depth of each loop: where loop-end exits read the hidden state).

    s = structure(cfg)         # or model.structure()
    s.depth_to_layer           # (0, 1, 2, 0, 1, 2) for cycle K=3, n_loops=2
"""
from __future__ import annotations

from dataclasses import dataclass

from recursa.config import ModelConfig


@dataclass(frozen=True)
class Structure:
    sharing: str
    depth_to_layer: tuple[int, ...]    # unique layer run at each depth
    loop_of: tuple[int | None, ...]    # loop index of each depth inside the shared block, else None
    prelude: tuple[int, ...]           # depths before the shared block (each its own unique layer)
    shared: tuple[int, ...]            # depths of the shared block, in order
    shared_layers: tuple[int, ...]     # unique layers of the shared block, in order of first use
    n_loops: int
    coda: tuple[int, ...]              # depths after the shared block

    @property
    def depth(self) -> int:
        return len(self.depth_to_layer)

    @property
    def loop_ends(self) -> tuple[int, ...]:
        """Last depth of each loop of a cycle-style block: where loop r's exit reads h (r = 0..n_loops-1)."""
        if self.sharing not in ("cycle", "middle_cycle"):
            raise ValueError(f"loop-end exits need cycle or middle_cycle sharing, this model uses {self.sharing!r}")
        k = len(self.shared_layers)
        return tuple(self.shared[(r + 1) * k - 1] for r in range(self.n_loops))

    def depths_of_layer(self, layer: int) -> tuple[int, ...]:
        """The depths that run unique layer `layer`."""
        return tuple(d for d, u in enumerate(self.depth_to_layer) if u == layer)


def structure(cfg: ModelConfig) -> Structure:
    """The sharing structure a config describes (vanilla: every depth its own prelude layer)."""
    L, n = cfg.n_layers, cfg.n_loops
    if cfg.sharing == "none":
        depths = tuple(range(L))
        return Structure("none", depths, (None,) * L, depths, (), (), 0, ())
    middle = cfg.sharing.startswith("middle_")
    first = 1 if middle else 0                  # unique layer id of the shared block's first layer
    k = cfg.n_shared_layers
    if cfg.sharing.endswith("cycle"):
        block = [(first + i % k, i // k) for i in range(k * n)]      # (layer, loop) per shared depth
    else:
        block = [(first + i // n, i % n) for i in range(k * n)]
    prelude = (0,) if middle else ()
    coda = (L - 1,) if middle else ()
    layers = [0] * len(prelude) + [u for u, _ in block] + [first + k] * len(coda)
    loops = [None] * len(prelude) + [r for _, r in block] + [None] * len(coda)
    shared = tuple(range(len(prelude), len(prelude) + k * n))
    return Structure(cfg.sharing, tuple(layers), tuple(loops), prelude, shared,
                     tuple(range(first, first + k)), n, coda)


__all__ = ["Structure", "structure"]
