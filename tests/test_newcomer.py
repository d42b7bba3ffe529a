"""A newcomer's first hour (issue 21): every entry point run as a user runs it, in a
subprocess, and the one-line errors they must end in."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import default_sigint

from mlx_diffgemma import generate, load
from mlx_diffgemma.convert import convert_command

# Subprocess servers, CLIs or training: the full suite only (README: two tiers).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "sudoku_toy"
PUZZLE = "460200500004120306340520604102013065"
ENTRY = {
    "module": lambda name: [sys.executable, "-m", f"mlx_diffgemma.{name}"],
    "command": lambda name: [sys.executable, "-m", "mlx_diffgemma", name],
}


def env(**extra):
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def run(cmd, input=b"", **kw):
    return subprocess.run(cmd, input=input, capture_output=True, env=env(), timeout=300, **kw)


def assert_one_line(p, code, words):
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == code, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert words in err, err


@pytest.mark.parametrize("form", ["module", "command"])
def test_non_utf8_prompt_stdin_and_file_are_one_line(tiny_checkpoint, tmp_path, form):
    model = ["--model", str(tiny_checkpoint), "--max-tokens", "4"]
    gen = ENTRY[form]("generate") + model
    p = run([*gen, "-p", os.fsdecode(b"abc\xff")])
    assert_one_line(p, 1, "undecodable byte 0xff at character 3")
    assert_one_line(run([*gen, "-p", "-"], input=b"abc\xff"), 1, "stdin is not UTF-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a [[hole]] \xff")
    p = run([*ENTRY[form]("infill"), "--model", str(tiny_checkpoint), "-f", str(bad)])
    assert_one_line(p, 1, f"{bad} is not UTF-8 text: byte 0xff at position 11")


def test_api_names_the_position_of_a_lone_surrogate(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="lone surrogate U\\+D800 at character 1"):
        generate(model, tok, "a\ud800b", max_tokens=4)
    with pytest.raises(ValueError, match="Message 0's text holds the undecodable byte 0xff"):
        generate(model, tok, [{"role": "user", "content": "x\udcffy"}], max_tokens=4)


@pytest.mark.parametrize("form", ["module", "command"])
def test_ctrl_c_in_lora_is_one_line(tiny_checkpoint, tmp_path, form):
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"prompt": f"{i}", "completion": f"{i + 1}"}) for i in range(32)]
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    cmd = ENTRY[form]("lora") + ["--model", str(tiny_checkpoint), "--train", "--data", str(data)]
    cmd += ["--iters", "100000", "--num-layers", "-1", "--batch-size", "2"]
    cmd += ["--adapter-path", str(tmp_path / "adapters")]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), preexec_fn=default_sigint
    )
    # Wait for the trainable-parameter line: training has started.
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "Interrupted.", err


def test_num_layers_beyond_the_model_says_minus_one(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"prompt": "1", "completion": "2"}) + "\n")
    (data / "valid.jsonl").write_text(json.dumps({"prompt": "1", "completion": "2"}) + "\n")
    cmd = ENTRY["module"]("lora") + ["--model", str(tiny_checkpoint), "--train", "--data"]
    p = run([*cmd, str(data), "--iters", "1", "--adapter-path", str(tmp_path / "a")])
    assert_one_line(p, 1, "or -1 for all layers")


def test_fuse_without_an_adapter_is_one_line(tiny_checkpoint, tmp_path):
    cmd = ENTRY["command"]("fuse") + ["--model", str(tiny_checkpoint)]
    p = run([*cmd, "--adapter-path", str(tmp_path / "none"), "--save-path", str(tmp_path / "f")])
    assert_one_line(p, 1, "holds no adapter (adapter_config.json is missing)")
    assert "Errno" not in p.stderr.decode()


def test_text_never_shows_pad_bos_or_eos():
    """The shipped toy writes pad after its answer: the text drops it (issue 21)."""
    model, tok = load(TOY)
    text = generate(model, tok, PUZZLE, max_denoising_steps=4)
    assert text and not any(s in text for s in ("<pad>", "<bos>", "<eos>", "<turn|>"))
    p = run(ENTRY["command"]("generate") + ["--model", str(TOY), "-p", PUZZLE])
    assert p.returncode == 0 and b"<pad>" not in p.stdout


def test_offline_first_run_points_to_the_toy():
    p = subprocess.run(
        ENTRY["module"]("generate") + ["--prompt", "hi"],
        capture_output=True,
        env=env(HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert_one_line(p, 1, "is not in the local cache and the Hugging Face hub cannot be reached")
    assert "examples/sudoku_toy" in p.stderr.decode()


def test_infill_too_long_names_the_holes(tiny_checkpoint):
    p = run(
        ENTRY["command"]("infill")
        + ["--model", str(tiny_checkpoint), "--text", "a [[hole:2000]] b"]
    )
    assert_one_line(p, 1, "make the holes or the text after them shorter")
    assert "max_tokens" not in p.stderr.decode()


@pytest.mark.parametrize("name", ["serve", "lora", "fuse"])
def test_subcommand_help_shows_its_own_program_name(name):
    p = run(ENTRY["command"](name) + ["--help"])
    assert p.returncode == 0 and p.stdout.decode().startswith(f"Usage: mlx_diffgemma {name} ")


def test_convert_interrupted_after_saving_says_it_is_complete(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlx_diffgemma import convert as module

    def saved_then_interrupted(mlx_path, **_):
        Path(mlx_path).mkdir()
        (Path(mlx_path) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "convert", saved_then_interrupted)
    out = tmp_path / "out"
    result = CliRunner().invoke(convert_command, ["--hf-path", "x", "--mlx-path", str(out)])
    assert result.exit_code == 0, result.output
    assert "it is complete" in result.stderr


def test_quantization_warning_counts_every_float_matrix(tiny_checkpoint, tmp_path):
    import mlx.core as mx

    out = tmp_path / "q"
    p = run(
        ENTRY["module"]("convert")
        + ["--hf-path", str(tiny_checkpoint), "--mlx-path", str(out), "-q"]
    )
    assert p.returncode == 0, p.stderr
    weights = mx.load(str(out / "model.safetensors"))
    quantized = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}
    floats = [
        k
        for k, v in weights.items()
        if k.endswith(".weight") and v.ndim >= 2 and k.rsplit(".", 1)[0] not in quantized
    ]
    assert f"[WARNING] {len(floats)} matrices stay unquantized" in p.stdout.decode()


def test_training_log_off_a_terminal_is_plain_lines(tiny_checkpoint, tmp_path):
    """Off a terminal the trainer writes one plain line per report: no colour codes, no
    live table, no line twice (issue 22)."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"prompt": f"{i}", "completion": f"{i + 1}"}) for i in range(16)]
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    cmd = ENTRY["module"]("lora") + ["--model", str(tiny_checkpoint), "--train", "--data"]
    cmd += [str(data), "--iters", "4", "--num-layers", "-1", "--batch-size", "2"]
    cmd += ["--steps-per-report", "2", "--steps-per-eval", "2", "--val-batches", "1"]
    p = run([*cmd, "--adapter-path", str(tmp_path / "a")])
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr
    assert "\x1b[" not in out and "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith("Iter ")]
    assert len(lines) == len(set(lines)) and sum("train loss" in line for line in lines) == 2
