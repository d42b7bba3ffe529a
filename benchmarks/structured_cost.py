"""What a structured reply costs: canvas positions and time, vs free generation of as many.

For each pydantic model of the test suite (flat, Literal, Enum, Optional, nested, list,
list of nested, union), lays out its frame (`json_frame`), then times `generate_json`
against `stream_generate` with `max_tokens` equal to the frame's canvases, same seed and
step budget; prints a table. A reply costs its frame's canvases only, whatever max_tokens.

    python -m benchmarks.structured_cost --model PATH [--steps 4] [--repeats 2]
"""

import argparse
import statistics
import time

from mlx_diffgemma import generate_json, json_frame, load, stream_generate


def models():
    from tests.test_json_schema import MODELS  # the suite's pydantic models

    return MODELS


def timed(fn, repeats: int) -> float:
    times = []
    for seed in range(repeats):
        tic = time.perf_counter()
        fn(seed)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=4, help="max_denoising_steps [4].")
    p.add_argument("--repeats", type=int, default=2, help="Seeds per row (median) [2].")
    args = p.parse_args()
    model, tok = load(args.model)
    C = model.args.canvas_length
    ask = [{"role": "user", "content": "Answer in JSON."}]
    print(f"canvas {C} tokens; max_denoising_steps {args.steps}; median of {args.repeats} seeds\n")
    print("| model | holes | positions (canvases) | reply s | free s | reply / free |")
    print("|---|---|---|---|---|---|")
    for cls in models():
        frame = json_frame(tok, cls.model_json_schema(), model.args.max_position_embeddings)
        t = frame.template
        n = t.positions(C)
        kw = {"max_denoising_steps": args.steps}

        def reply_once(seed, cls=cls, kw=kw):
            generate_json(model, tok, cls, messages=ask, seed=seed, **kw)

        def free_once(seed, n=n, kw=kw):
            list(stream_generate(model, tok, ask, max_tokens=n, seed=seed, **kw))

        reply, free = timed(reply_once, args.repeats), timed(free_once, args.repeats)
        row = f"| {cls.__name__} | {len(t.holes)} | {n} ({n // C}) | {reply:.2f} | {free:.2f} |"
        print(f"{row} {reply / free:.2f} |", flush=True)


if __name__ == "__main__":
    main()
