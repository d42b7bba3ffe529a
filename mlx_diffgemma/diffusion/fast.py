"""Fast mode's loops: the exact loop (`loop.py`) with approximations, chosen once.

`FastLoop` owns what fast mode changes in a step (`FastSettings`): top-k statistics and
gathered self-conditioning (`topk.py`), monotone commit (with argmax or stable
commits), the shorter last canvas, and the repair passes after a canvas
stops. `CompactLoop` adds active-set compaction: after a canvas's first step the
decoder runs only on the positions still undecided. Each is an approximation of
transformers' sampler (FastSettings says how).
"""

import functools
import time

import mlx.core as mx

from . import sampler as S
from . import topk as T
from .canvas import CanvasPlan
from .lanes import split_stats
from .loop import DenoiseStep, DenoisingLoop, compiled_stats


def fast_loop(model, config, draws, accept, batch) -> DenoisingLoop:
    """Fast mode's loop for `config.fast`: compacting or not."""
    cls = CompactLoop if config.fast.compact else FastLoop
    return cls(model, config, draws, accept, batch)


@functools.lru_cache(maxsize=8)
def _top_k_stats(k: int):
    return functools.partial(T.top_k_stats, k=k)


def bucket(n: int, C: int) -> int:
    """The forward width for n live positions of a C-position canvas (compaction): a
    power of two from 16 on, at most C, so MLX compiles few shapes."""
    return min(C, max(16, 1 << max(0, n - 1).bit_length()))


class FastLoop(DenoisingLoop):
    """The denoising loop with fast mode's settings (`config.fast`)."""

    def __init__(self, model, config, draws, accept, batch):
        super().__init__(model, config, draws, accept, batch)
        self.fast = config.fast

    def canvas_length(self, block: int) -> int:
        """canvas_shrink: a last canvas has max(canvas_shrink, tokens left) positions."""
        C, shrink = self.model.args.canvas_length, self.fast.canvas_shrink
        if not shrink:
            return C
        return min(C, max(shrink, self.config.max_new_tokens - block * C))

    def canvas(self, block: int, plan: CanvasPlan, cache, drafts: bool):
        """The exact loop's canvas, with a late forward (compaction) and the repair
        passes once the canvas stops: each one's argmax is the new draft."""
        encode_s = self.encode_last(cache)
        tic = time.perf_counter()
        state = self.start(plan)
        logits = self.first_forward(state, cache)
        N = n = self.config.max_denoising_steps  # n: steps left
        while n > 0:
            state, accepted = self.step(state, logits, plan.allowed, n)
            mx.async_eval(state.canvas, state.argmax, state.conditioning, state.done, self.forwards)
            if n > 1:
                logits = self.early_forward(state, cache)
            if drafts:
                yield DenoiseStep(block, N - n + 1, state.argmax, accepted, state.canvas)
            end = self.sync(state)
            n -= 1
            if end.stop:
                break
            if n > 0:
                logits = self.late_forward(state, cache, end, logits)
        for _ in range(self.fast.repair):
            state = self.repair(state, plan, cache)
            end = self.sync(state)
        return self.finish(block, end, N - n, encode_s, tic)

    def first_forward(self, state: S.StepState, cache) -> mx.array:
        return self.forward(state, cache)

    def early_forward(self, state: S.StepState, cache) -> mx.array:
        """The next step's forward, built while this step runs (as the exact loop)."""
        return self.forward(state, cache)

    def late_forward(self, state: S.StepState, cache, end, logits) -> mx.array:
        """The next step's forward once the sync is back: the early one here."""
        return logits

    def conditioning(self, conditioning) -> dict:
        if self.fast.self_conditioning_top_k:  # a soft embedding (B, C, H)
            return {"self_conditioning_embeddings": conditioning}
        return {"self_conditioning_probs": conditioning}

    def propose(self, state, logits, temp, allowed, n: int) -> S.Proposal:
        """The step's statistics on each position's top k tokens (top_k), and the next
        step's conditioning from the top self_conditioning_top_k (gathered)."""
        cap = self.model.args.final_logit_softcapping
        k, sc_k = self.fast.top_k, self.fast.self_conditioning_top_k
        steps_left = mx.array(n, mx.int32)
        if not k:
            p, ent, argmax = split_stats(compiled_stats, logits, temp, cap, allowed, self.lanes)
            cond = self._gathered(p, sc_k, None) if sc_k else None
            return S.Proposal(p, ent, argmax, self.draws.sample(p), steps_left, cond)
        stats = _top_k_stats(k)
        p, ent, argmax, ids = split_stats(stats, logits, temp, cap, allowed, self.lanes)
        sampled = mx.take_along_axis(ids, self.draws.sample(p)[..., None], axis=-1)[..., 0]
        if sc_k:
            cond = self._gathered(p, sc_k, ids)
        else:  # top_k alone: condition on the whole vocabulary's probabilities
            cond = split_stats(compiled_stats, logits, temp, cap, allowed, self.lanes)[0]
        return S.Proposal(p, ent, argmax, sampled, steps_left, cond)

    def _gathered(self, probs, k: int, ids):
        weights, ids = T.top_k_weights(probs, k, ids)
        return self.model.gathered_self_conditioning(ids, weights)

    def step(self, state: S.StepState, logits, allowed, n: int):
        """The exact step, then monotone commit."""
        f = self.fast
        previous = state.argmax if f.commit_stable else None
        state, accepted = super().step(state, logits, allowed, n)
        with mx.stream(self.stream):
            if f.monotone_commit:
                state = S.commit(state, accepted, f.commit_argmax, previous)
        return state, accepted

    def full_forward(self, state: S.StepState, cache) -> mx.array:
        """The logits of the whole canvas's draft (fresh K/V, the last conditioning)."""
        return self.forward(state._replace(canvas=state.argmax), cache)

    def repair(self, state: S.StepState, plan: CanvasPlan, cache) -> S.StepState:
        """A repair pass after a canvas stopped: one forward of the whole canvas on its
        draft, whose argmax (keeping the layout's fixed ids and token classes) becomes
        the new draft."""
        with mx.stream(self.stream):
            self.count(~self.finished, plan.ids.shape[1])
            logits = self.full_forward(state, cache)
            masked = logits if plan.allowed is None else mx.where(plan.allowed, logits, -mx.inf)
            argmax = mx.where(plan.fixed, plan.ids, mx.argmax(masked, axis=-1))
            return state._replace(argmax=argmax.astype(state.argmax.dtype))


class CompactLoop(FastLoop):
    """Fast mode with active-set compaction: after a canvas's first step the decoder runs
    only on the positions undecided before the last commit (in a bucket of `bucket`
    positions); the others are seen through their K/V from the last step that forwarded
    them (stale: the approximation)."""

    def __init__(self, model, config, draws, accept, batch):
        super().__init__(model, config, draws, accept, batch)
        # The pending forward's canvas positions (B, n), the canvas K/V per layer, and
        # the positions still to forward after this step.
        self.active = self.canvas_kv = self.live = None

    def first_forward(self, state: S.StepState, cache) -> mx.array:
        return self.forward_all(state.canvas, None, cache)  # a new canvas: all positions

    def early_forward(self, state: S.StepState, cache):
        return None  # the width is known only after the sync

    def late_forward(self, state: S.StepState, cache, end, logits) -> mx.array:
        """The logits of a bucket of positions holding each row's live ones."""
        with mx.stream(self.stream):
            positions = S.active_positions(self.live, bucket(end.extra[0], state.canvas.shape[1]))
            ids = mx.take_along_axis(state.canvas, positions, axis=1)
            cond = mx.take_along_axis(state.conditioning, positions[..., None], axis=1)
            return self.forward_active(ids, cond, positions, cache)

    def full_forward(self, state: S.StepState, cache) -> mx.array:
        # Fresh K/V everywhere, for the steps that may follow.
        return self.forward_all(state.argmax, state.conditioning, cache)

    def forward_all(self, ids, cond, cache) -> mx.array:
        """The logits of every position, with fresh K/V for all of them."""
        self.canvas_kv = None
        every = mx.broadcast_to(mx.arange(ids.shape[1], dtype=mx.int32), ids.shape)
        return self.forward_active(ids, cond, every, cache)

    def forward_active(self, ids, cond, positions, cache) -> mx.array:
        """The logits of canvas `positions` (B, n) holding `ids`, the other positions
        seen through the canvas K/V of earlier steps."""
        with mx.stream(self.stream):
            self.shapes.add(positions.shape[1])
            self.active = positions
            logits, self.canvas_kv = self.model.denoise_active(
                ids, positions, cache, self.canvas_kv, cond
            )
            return logits

    def propose(self, state, logits, temp, allowed, n: int) -> S.Proposal:
        """The forwarded positions' proposal, spread over the whole canvas."""
        if allowed is not None:
            B, C, V = state.canvas.shape + allowed.shape[-1:]
            allowed = mx.take_along_axis(
                mx.broadcast_to(allowed, (B, C, V)), self.active[..., None], axis=1
            )
        proposal = super().propose(state, logits, temp, allowed, n)
        cond = state.conditioning
        if cond is None:  # the first step forwards every position
            B, C = state.canvas.shape
            H = proposal.conditioning.shape[-1]
            cond = mx.zeros((B, C, H), proposal.conditioning.dtype)
        return S.scatter_proposal(proposal, self.active, state, cond)

    def step(self, state: S.StepState, logits, allowed, n: int):
        fixed_before = state.fixed
        state, accepted = super().step(state, logits, allowed, n)
        with mx.stream(self.stream):  # what was undecided before this step's commit
            self.live = ~fixed_before & ~state.done[:, None]
        return state, accepted

    def watch(self, state: S.StepState):
        return [self.live.sum(axis=-1).max()]  # the most live positions of a row
