"""State copying (CALM): a token that exits at depth e gives the skipped layers K/V from its exit state.

The approximate baseline among the engine's exit strategies (EngineConfig.exit_strategy "copy"):
when a decode token exits after e layers, its hidden state h_e is copied upward as the input of
every deeper layer, which computes only its K/V from it (its attention norm + k/v projections,
with rope at the token's position) and writes them into the paged cache right away. Nothing
waits on a stack; later tokens attend to those entries as if the token had run there. Exited
tokens never reach full depth, so they label no exits (FREE's calibration sees deep tokens only).

Memory pressure must not change outputs: a preempted request is recomputed in prefill chunks,
and a chunk position whose token had exited (its recorded depth, Sequence.depths) leaves the
chunk at that exit with copied K/V again, so the recomputed cache equals the one it replaced.

    llm = recursa.LLM(model, exit_policy=policy, exit_strategy="copy")

Reference (tests/reference.py `copied_state_hidden`): one uncached full-sequence forward in which
a position's hidden state stops changing after its exit depth.
"""
from __future__ import annotations

import torch

from recursa.engine.depth_router import Done, EarlyExit
from recursa.engine.sequence import Sequence


class StateCopy(EarlyExit):
    """EarlyExit whose exited tokens write copied-state K/V for the layers they skip."""

    def __init__(self, model, runner, policy):
        super().__init__(model, runner, policy)
        self.num_copied_kv = 0     # K/V-only token-layer projections (a small fraction of a layer each)

    def exit(self, seq: Sequence, depth: int) -> None:
        st = self._of(seq)
        st.obs, st.seen, st.exit_depth = [], {}, depth

    def exited(self, seqs: list[Sequence], hidden: torch.Tensor, depth: int) -> None:
        if seqs:
            self.copy_up([s.positions[-1:] for s in seqs], seqs, hidden, depth)

    @torch.inference_mode()
    def copy_up(self, positions: list[torch.Tensor], seqs: list[Sequence], hidden: torch.Tensor, depth: int) -> None:
        """Write K/V of depths >= `depth` computed from hidden [n, D] (positions[i] of seqs[i], host)."""
        model, kv, runner = self.model, self.runner.kv, self.runner
        pos = torch.cat(positions)
        slots = torch.cat([torch.tensor(s.block_table)[p // kv.block_size] * kv.group_slots + p % kv.block_size
                           for s, p in zip(seqs, positions)]).to(runner.device)
        cos, sin = model.rope(pos.to(runner.device), runner.dtype)
        x = hidden[None]
        for d in range(depth, self.depth):
            if model.kv_source(d) != d:   # this depth reads another depth's cache: nothing of its own
                continue
            block = model.stage(d)
            _, k, v = block.attn.qkv(block.attn_norm(x), cos, sin, model.adapters(d))
            kv.write(slots + runner.offset[d], k[0].transpose(0, 1), v[0].transpose(0, 1))
            self.num_copied_kv += len(pos)

    def arrive(self, seqs: list[Sequence]) -> list[Done]:
        done, going = [], []
        for s in seqs:   # recomputed chunks: positions whose token exited here leave again, with copied K/V
            if s.is_decode or s.depth not in self.exits or s.chunk_end <= s.num_prompt_tokens:
                going.append(s)
                continue
            first = s.num_prompt_tokens - 1      # Sequence.depths[i] belongs to position first + i
            depth = torch.tensor(s.depths)[(s.positions - first).clamp(min=0)]
            leave = (depth == s.depth) & (s.positions > first)
            if not bool(leave.any()):
                going.append(s)
                continue
            self.copy_up([s.positions[leave]], [s], s.hidden[leave.to(s.hidden.device)], s.depth)
            if bool(leave.all()):
                done.append((s, None))      # the whole chunk stopped here (a recompute never samples)
            else:
                s.set_tokens(s.positions[~leave], s.hidden[~leave.to(s.hidden.device)])
                going.append(s)
        return done + super().arrive(going)

    def stats(self) -> dict:
        return {"copied_kv_layer_tokens": self.num_copied_kv}


__all__ = ["StateCopy"]
