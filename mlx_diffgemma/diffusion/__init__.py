"""Block diffusion on token ids, below the text layer (imports point down the list):

- steps.py: `generate_step`, the token-level generator; picks a loop once.
- fast.py: fast mode's loops (`FastLoop`, `CompactLoop`), subclasses of the exact one.
- loop.py: the exact loop (`DenoisingLoop`), transformers' algorithm and nothing else.
- lanes.py: the CPU row split of a step (bit for bit the same).
- sampler.py: the sampler's math on arrays; topk.py: fast mode's top-k math.
- canvas.py: what a canvas starts as and may hold (`CanvasLayout`, `CanvasPlan`).
- config.py: the settings (`DiffusionConfig`, fast mode's `FastSettings`).
"""
