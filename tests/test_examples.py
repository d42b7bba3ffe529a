"""The examples run on a tiny converted checkpoint and use only the public API."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_diffgemma
from mlx_diffgemma.tokenizer import Tokenizer

# Subprocess servers, CLIs or training: the full suite only (README: two tiers).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def test_examples_import_only_the_public_api():
    assert {p.name for p in EXAMPLES} >= {
        "minimal.py",
        "stream_drafts.py",
        "chat.py",
        "embed_in_app.py",
    }
    for path in EXAMPLES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("mlx_diffgemma"):
                assert node.module == "mlx_diffgemma", path.name
                assert {a.name for a in node.names} <= set(mlx_diffgemma.__all__), path.name
            elif isinstance(node, ast.Import):
                assert all(a.name in sys.stdlib_module_names for a in node.names), path.name


def test_examples_run(tiny_checkpoint):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    inputs = {"chat.py": "Hi\n\nAgain\n"}
    runs = {p.name: [p] for p in EXAMPLES}
    runs["minimal.py"] += ["--max-tokens", "8", "--steps", "2"]  # stream_drafts: its defaults
    runs["cancelled"] = [REPO / "examples" / "embed_in_app.py", "0"]  # cancel at once
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(script), str(tiny_checkpoint), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (script, *args) in runs.items()
    }
    out = {name: p.communicate(inputs.get(name, ""), timeout=300) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, (name, out[name][1])

    # The answer as it is committed, then the statistics of the flags given.
    answer, stats = out["minimal.py"][0].split("=" * 10)
    assert answer.strip() and "Generation: 8 tokens" in stats
    assert "denoising steps per canvas: 2 (mean 2.0)" in stats
    # The small defaults: 32 tokens (4 tiny canvases) of 8 steps (a random model never
    # stops a canvas early).
    drafts = out["stream_drafts.py"][0].splitlines()
    assert drafts[0].startswith("canvas 0 step  1 ") and "canvas 0 step  2 " in drafts[1]
    assert drafts[8].startswith("canvas 0 committed after 8 steps: ")
    assert sum(" committed after 8 steps: " in line for line in drafts) == 4
    assert drafts[-1].startswith("finish: length, ")
    # Turn 2 sees the whole conversation: the ids past turn 1's prompt if the answer
    # re-tokenizes as it was generated, else all of them afresh (see PromptCache).
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    chat = out["chat.py"][0]
    turns = re.findall(r"\[encoded (\d+) new tokens; the cache holds (\d+)\]", chat)
    first = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    reply = chat.split("\n[encoded", 1)[0]
    whole = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "Again"},
        ]
    )
    assert turns[0] == (str(len(first)), str(len(first))) and turns[1][1] == str(len(whole))
    assert turns[1][0] in (str(len(whole) - len(first)), str(len(whole)))
    answer, progress = out["embed_in_app.py"]
    assert answer.rstrip().endswith("[length]")
    assert progress.splitlines() == [
        "draft  canvas 0 step 1",
        "draft  canvas 0 step 2",
        "commit canvas 0 step 2",
    ]
    assert out["cancelled"] == ("\n[cancelled]\n", "")
