"""Bad inputs to the commands: one line naming the value or file and the fix, no traceback.

Each case runs the command as a user would (click's CliRunner) on a damaged copy of the
tiny checkpoint, and checks the exit status, the one line, and that nothing was written.
"""

import importlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from conftest import REAL_VOCAB, random_tiny_model, save_checkpoint
from mlx.utils import tree_flatten

import mlx_diffgemma.cli as cli_module
from mlx_diffgemma.cli import cli
from mlx_diffgemma.generate import generate_command
from mlx_diffgemma.render import Output, fit

SKY = "Why is the sky blue?"
# The module (`import mlx_diffgemma.generate` names the function of the same name).
gen = importlib.import_module("mlx_diffgemma.generate")


def listing(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def one_line_error(result, code: int = 1) -> str:
    """The error line of a command that failed cleanly."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    if code == 2:  # click's usage errors: the usage, a hint, then the error line
        return lines[-1]
    assert len(lines) == 1, result.stderr
    return lines[0]


def generate_on(folder, *args, input=None):
    before = listing(folder)
    result = CliRunner().invoke(
        generate_command, ["--model", str(folder), "-p", SKY, "--seed", "0", *args], input=input
    )
    assert listing(folder) == before  # nothing written
    return result


@pytest.fixture
def damaged(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint to break."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


# 1. Unquantized bf16 experts on the CPU backend


def test_bf16_experts_are_cast_to_float32_on_cpu(tmp_path):
    assert mx.default_device().type == mx.DeviceType.cpu  # the case of this test
    model = random_tiny_model(vocab_size=REAL_VOCAB)
    model.load_weights([(k, v.astype(mx.bfloat16)) for k, v in tree_flatten(model.parameters())])
    folder = save_checkpoint(model, tmp_path / "bf16")
    result = generate_on(folder, "--max-tokens", "4")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    assert result.stderr.startswith(
        "[WARNING] The CPU backend runs expert matmuls in float32 only: casting 4 bfloat16 "
        "expert matrices to float32"
    )
    assert result.stderr.count("\n") == 1


# 2. Truncated or garbage weights, a corrupt tokenizer


def test_truncated_weights(damaged):
    shard = damaged / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    line = one_line_error(generate_on(damaged))
    assert line.startswith(f"Error: Shard {shard} is truncated")
    assert line.endswith("; re-download it.")


def test_garbage_weights(damaged):
    (damaged / "model.safetensors").write_bytes(b"<html>Not found</html>" * 10)
    line = one_line_error(generate_on(damaged))
    shard = damaged / "model.safetensors"
    assert line == f"Error: Shard {shard} is not a safetensors file; re-download it."


def test_corrupt_tokenizer_model(damaged):
    spm = damaged / "tokenizer.model"
    spm.write_bytes(spm.read_bytes()[:1000])
    line = one_line_error(generate_on(damaged))
    assert line == (
        f"Error: {spm} is not a SentencePiece model (corrupt or truncated); download it again."
    )


def test_corrupt_tokenizer_json(damaged):
    (damaged / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    line = one_line_error(generate_on(damaged))
    assert line.startswith(f"Error: {damaged / 'tokenizer.json'} is not a valid tokenizer.json (")
    assert line.endswith("); download it again.")


# 3. A shard listed in the index but missing


def test_missing_shard(tiny, tmp_path):
    params = dict(tree_flatten(tiny[0].parameters()))
    folder = save_checkpoint(random_tiny_model(vocab_size=REAL_VOCAB), tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    keys = sorted(params)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    for name, part in zip(names, halves):
        mx.save_safetensors(str(folder / name), {k: params[k] for k in part})
    index = {"weight_map": {k: name for name, part in zip(names, halves) for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert generate_on(folder, "--max-tokens", "1").exit_code == 0  # complete, it loads
    (folder / names[1]).unlink()
    line = one_line_error(generate_on(folder))
    assert line == (
        f"Error: Shard {folder / names[1]} listed in model.safetensors.index.json is missing "
        "(1 of 2 shards missing); re-download the checkpoint."
    )


# 4. Seeds out of range


@pytest.mark.parametrize("command", ["generate", "infill"])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range(tiny_checkpoint, command, seed):
    args = [command, "--model", str(tiny_checkpoint), "--seed", seed]
    args += ["-p", SKY] if command == "generate" else ["-t", "a [[hole]] b"]
    line = one_line_error(CliRunner().invoke(cli, args), code=2)
    assert (
        line == f"Error: Invalid value for '--seed': {seed} is not in the range 0<=x<=4294967295."
    )


# 6. Live view widths: combining marks and CJK


@pytest.mark.parametrize(
    "text, width",
    [
        ("के", 1),  # KA + vowel sign E (a nonspacing mark, combining class 0)
        ("नमस्ते", 4),  # virama and vowel signs join their consonants
        ("e\u0301", 1),  # e + combining acute
        ("日本語", 6),
        ("ab", 2),
    ],
)
def test_live_widths_count_clusters(text, width):
    assert fit([(text * 10, "")], limit=1000) == ([(text * 10, "")], 10 * width)


def test_a_mark_decoded_apart_from_its_letter_joins_it():
    # Accepted "क" then a dimmed vowel sign: one cell, as the terminal draws it.
    assert fit([("क", ""), ("\u0947", "d")], limit=10) == ([("के", "")], 1)


def test_live_redraw_counts_the_rows_it_drew(monkeypatch, capsys):
    # The next redraw moves the cursor up rows - 1 lines: one row too many would erase
    # a line above the output.
    monkeypatch.setattr(shutil, "get_terminal_size", lambda: (10, 24))
    out = Output(None, True, live=True)
    out.redraw([("के" * 10, "")])  # 10 cells: one row of 10 columns
    assert out.rows == 1
    out.redraw([("日本語" * 3, "")])  # 18 cells: two rows
    assert out.rows == 2
    out.redraw([("नमस्ते" * 2 + "e\u0301" * 2, "")])  # 10 cells
    assert out.rows == 1


# 7. Chat: Ctrl-C stops an answer, an over-long turn is refused; the session goes on


class Encoded(list):
    """Chunks the model encoded; `hook(self, cache)` runs after each encode."""

    def hook(self, cache):
        pass


@pytest.fixture
def encoded(monkeypatch):
    from mlx_diffgemma.model import Model

    calls, original = Encoded(), Model.encode

    def spy(self, ids, cache):
        calls.append(ids[0].tolist())
        out = original(self, ids, cache)
        calls.hook(cache)
        return out

    monkeypatch.setattr(Model, "encode", spy)
    return calls


def chat(checkpoint, lines, *args):
    return CliRunner().invoke(
        generate_command,
        ["--model", str(checkpoint), "--chat", "--seed", "0", *args],
        input="".join(line + "\n" for line in lines),
    )


def user(text):
    return [{"role": "user", "content": text}]


def test_chat_ctrl_c_stops_the_answer_and_keeps_it(tiny_checkpoint, tok, encoded, monkeypatch):
    real, answers = gen.stream_generate, []

    def interrupted_after_the_first_canvas(*args, **kwargs):
        stream = real(*args, **kwargs)
        try:
            for r in stream:
                yield r
                answers.append(list(r.token_ids))
                if len(answers) == 1:
                    raise KeyboardInterrupt
        finally:
            stream.close()

    monkeypatch.setattr(gen, "stream_generate", interrupted_after_the_first_canvas)
    result = chat(tiny_checkpoint, [SKY, "Again"], "--max-tokens", "16")
    assert result.exit_code == 0, result.output
    assert "[Stopped: the answer so far stays in the conversation.]" in result.stderr.splitlines()
    assert "Traceback" not in result.output
    # Turn 2 sees the conversation with the stopped answer so far: the model's view is
    # a fresh encoding of it (the first canvas and the new turn when the cache matches).
    assert len(answers[0]) == 8
    so_far = result.stdout.split(">> ")[1].rstrip("\n")
    whole = tok.apply_chat_template(
        [*user(SKY), {"role": "assistant", "content": so_far}, *user("Again")]
    )
    assert encoded[0] + encoded[1] == whole or encoded[1] == whole
    assert result.stdout.count(">> ") == 3  # two answers, then the prompt that got Ctrl-D


def test_chat_ctrl_c_inside_an_encode_rebuilds_the_cache(tiny_checkpoint, tok, encoded):
    def break_turn_2(cache):
        if len(encoded) == 2:  # turn 2's encode stops after its first layer
            for layer in cache[1:]:
                layer.offset -= len(encoded[-1])
            raise KeyboardInterrupt

    encoded.hook = break_turn_2
    result = chat(tiny_checkpoint, [SKY, "Again", "Third"])
    assert result.exit_code == 0, result.output
    assert "[Stopped: the answer so far stays in the conversation.]" in result.stderr.splitlines()
    # Turn 3 starts a new cache: the conversation before turn 2, then turn 3, encoded as
    # a fresh encoding of it gives.
    first = result.stdout.split(">> ")[1].rstrip("\n")
    whole = tok.apply_chat_template(
        [*user(SKY), {"role": "assistant", "content": first}, *user("Third")]
    )
    assert encoded[2] == whole


def test_chat_refuses_an_overlong_turn_and_goes_on(tiny_checkpoint, encoded):
    result = chat(tiny_checkpoint, ["word " * 600, "Hi"])
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "more than the model's context of 512 tokens" in errors[0]
    assert len(encoded) == 1  # only "Hi" was encoded
    assert result.stdout.count(">> ") == 3


# 8. Invalid JSON


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_invalid_json_names_the_file(damaged, name):
    (damaged / name).write_text('{"model_type": "diffusion_gemma",')
    line = one_line_error(generate_on(damaged))
    assert line.startswith(f"Error: {damaged / name} is not valid JSON (")
    assert line.endswith("); fix it or download it again.")


# 9. Ctrl-C while the command's module imports, or while the model loads


def test_ctrl_c_while_importing(monkeypatch):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module.importlib, "import_module", interrupted)
    result = CliRunner().invoke(cli, ["generate", "-p", SKY])
    assert result.exit_code == 130 and result.stderr == "Interrupted.\n"


def test_ctrl_c_while_loading(tiny_checkpoint, monkeypatch):
    def interrupted(path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mlx_diffgemma.loader.load", interrupted)
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_checkpoint), "-p", SKY])
    assert result.exit_code == 130 and result.stderr == "Interrupted.\n"
    result = CliRunner().invoke(generate_command, ["--model", str(tiny_checkpoint), "--chat"])
    assert result.exit_code == 130 and result.stderr == "Interrupted.\n"


def test_missing_adapter_folder_is_one_line(tiny_checkpoint, tmp_path):
    missing = tmp_path / "no_adapter"
    args = ["generate", "--model", str(tiny_checkpoint), "--adapter-path", str(missing)]
    result = CliRunner().invoke(cli, args + ["-p", SKY])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == f"Error: No adapter_config.json in adapter path {missing}.\n"
