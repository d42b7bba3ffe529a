"""The command line on tiny converted checkpoints: output, flags, chat, live view, errors."""

import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from conftest import default_sigint

from mlx_diffgemma import PromptCache, generate, stream_generate
from mlx_diffgemma.cli import cli
from mlx_diffgemma.generate import generate_command
from mlx_diffgemma.model import Model
from mlx_diffgemma.render import Output, fit

REPO = Path(__file__).resolve().parents[1]
SKY = "Why is the sky blue?"
# The Gemma 4 chat format (tokenizer.render_gemma4_chat): <bos><|turn>user\n{SKY}<turn|>\n<|turn>model\n
SKY_CHAT_IDS = [2, 105, 2364, 107, 11355, 563, 506, 7217, 3730, 236881, 106, 107, 105, 4368, 107]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def encoded(monkeypatch):
    """Every chunk the model encodes, in order."""
    calls = []
    original = Model.encode

    def spy(self, ids, cache):
        calls.append(ids[0].tolist())
        return original(self, ids, cache)

    monkeypatch.setattr(Model, "encode", spy)
    return calls


def run(checkpoint, *args, input=None):
    return CliRunner().invoke(generate_command, ["--model", str(checkpoint), *args], input=input)


def user(text):
    return [{"role": "user", "content": text}]


def assert_clean_error(result, code, message):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert message in result.stderr.splitlines()[-1]
    if code == 1:  # runtime errors: exactly one line
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1


def subprocess_env():
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


# Output


def test_plain_run_prints_the_answer_of_the_api(tiny_checkpoint, tiny, encoded):
    result = run(tiny_checkpoint, "--prompt", SKY, "--seed", "0")
    assert result.exit_code == 0, result.output
    # The checkpoint's chat template, rendered to the Gemma 4 chat format's ids.
    assert encoded[0] == SKY_CHAT_IDS
    assert result.stdout == generate(*tiny, user(SKY), seed=0) + "\n"
    assert result.stderr == ""


def test_max_tokens_trims_and_verbose_prints_stats(tiny_checkpoint, tiny):
    result = run(tiny_checkpoint, "-p", SKY, "--seed", "0", "--max-tokens", "3", "--verbose")
    assert result.exit_code == 0, result.output
    assert result.stdout == generate(*tiny, user(SKY), seed=0, max_tokens=3) + "\n"
    stats = result.stderr
    assert re.search(r"^Prompt: 15 tokens, [\d.]+ tokens-per-sec$", stats, re.M)
    assert re.search(r"^Generation: 3 tokens, [\d.]+ tokens-per-sec$", stats, re.M)
    assert "Canvases: 1, denoising steps per canvas: 2 (mean 2.0)" in stats
    assert "Tokens per forward: 1.50" in stats  # 3 output tokens / 2 forwards
    assert re.search(r"^Peak memory: [\d.]+ GB$", stats, re.M)
    assert "Seed: 0, finish: length" in stats


def test_prompt_from_stdin_system_and_thinking(tiny_checkpoint, tiny, encoded):
    result = run(
        tiny_checkpoint, "-p", "-", "--system", "Be brief.", "--think", "--seed", "0", input=SKY
    )
    assert result.exit_code == 0, result.output
    messages = [{"role": "system", "content": "Be brief."}] + user(SKY)
    assert encoded[0] == tiny[1].apply_chat_template(messages, enable_thinking=True)
    assert encoded[0][:6] == [2, 105, 9731, 107, 98, 107]  # <|turn>system\n<|think|>\n


def test_sampler_flags_override_the_checkpoint(tiny_checkpoint, tiny):
    result = run(
        tiny_checkpoint, "-p", SKY, "--seed", "0", "--steps", "3", "--entropy-bound", "0.5", "-v"
    )
    assert result.exit_code == 0, result.output
    assert "denoising steps per canvas: 3" in result.stderr
    expected = generate(*tiny, user(SKY), seed=0, max_denoising_steps=3, entropy_bound=0.5)
    assert result.stdout == expected + "\n"


def test_flags_without_effect_say_so(tiny_checkpoint):
    result = run(
        tiny_checkpoint, "-p", SKY, "--steps", "1", "--t-min", "0.1", "--stability-threshold", "0"
    )
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert (
        "[WARNING] --t-min has no effect: with 1 denoising step the only step runs at t_max."
        in lines
    )
    assert any(s.startswith("[WARNING] --stability-threshold has no effect") for s in lines)
    assert not any("--confidence-threshold" in s for s in lines)  # not given


def test_eos_stops_and_an_empty_answer_is_reported(tiny_eos_checkpoint):
    result = run(tiny_eos_checkpoint, "-p", SKY, "--seed", "0", "-m", "64", "-v")
    assert result.exit_code == 0, result.output
    assert result.stdout == "\n"
    assert "[WARNING] The answer is empty" in result.stderr
    assert "Canvases: 1," in result.stderr and "finish: stop" in result.stderr


def test_thinking_goes_to_stderr_off_a_terminal_or_is_hidden(capsys):
    def show(out):
        for thinking, text in [("Air scatters ", ""), ("blue.", "Rayleigh"), ("", " scattering.")]:
            out.show(SimpleNamespace(kind="commit", thinking=thinking, text=text))
        out.end()

    show(Output(None, show_thinking=True, live=False))
    captured = capsys.readouterr()
    assert captured.out == "Rayleigh scattering.\n"
    assert captured.err == "Air scatters blue.\n"
    show(Output(None, show_thinking=False, live=False))
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("Rayleigh scattering.\n", "")
    terminal = Output(None, show_thinking=True, live=False)
    terminal.tty = True  # thinking inline before the answer (dimmed on a real terminal)
    show(terminal)
    assert capsys.readouterr().out == "Air scatters blue.\n\nRayleigh scattering.\n"


def test_live_region_fits_one_wrapped_line():
    pieces, width = fit([("a\tb\n", ""), ("日本", "x"), ("\x07", "")], limit=100)
    assert pieces == [("a       b\u21b5", ""), ("日本", "x"), ("\ufffd", "")]
    assert width == 10 + 4 + 1
    pieces, width = fit([("abcdef", "")], limit=4)
    assert pieces == [("abcd\u2026", "")] and width == 5


def test_live_on_a_pipe_prints_plain_output(tiny_checkpoint, tiny):
    result = run(tiny_checkpoint, "-p", SKY, "--seed", "0", "--live")
    assert result.exit_code == 0, result.output
    assert result.stderr == "[WARNING] --live has no effect: stdout is not a terminal.\n"
    assert result.stdout == generate(*tiny, user(SKY), seed=0) + "\n"
    assert "\x1b" not in result.stdout


@pytest.mark.slow
def test_live_on_a_terminal_redraws_the_canvas(tiny_checkpoint, tiny):
    controller, terminal = pty.openpty()
    cmd = [sys.executable, "-m", "mlx_diffgemma.generate", "--model", str(tiny_checkpoint)]
    cmd += ["-p", SKY, "--seed", "0", "--live", "--steps", "3"]
    proc = subprocess.Popen(
        cmd,
        stdout=terminal,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env=subprocess_env(),
    )
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(controller)
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""  # no runpy warning, no note
    text = out.decode()
    # Three redraws (one per step), each erased before the next, some positions dimmed.
    assert text.count("\r\x1b[J") >= 3 and "\x1b[2m" in text
    # After the last erase: the answer's unfinished last line, printed for good.
    final = ANSI.sub("", text.split("\x1b[J")[-1])
    answer = generate(*tiny, user(SKY), seed=0, max_denoising_steps=3)
    assert final == answer.rsplit("\n", 1)[-1] + "\r\n"


# Chat


def test_chat_second_turn_sees_the_whole_conversation(tiny_checkpoint, tiny, encoded):
    result = run(tiny_checkpoint, "--chat", "--seed", "0", "-v", input=f"{SKY}\n\nSure?\n")
    assert result.exit_code == 0, result.output
    cli_encoded = list(encoded)
    # The same conversation through the API.
    model, tokenizer = tiny
    cache = PromptCache(model)
    first = generate(model, tokenizer, user(SKY), seed=0, prompt_cache=cache)
    second = list(stream_generate(model, tokenizer, user("Sure?"), seed=0, prompt_cache=cache))
    conversation = user(SKY) + [{"role": "assistant", "content": first}] + user("Sure?")
    whole = tokenizer.apply_chat_template(conversation)
    # The random model's answer does not re-tokenize as generated, so turn 2 encodes the
    # whole conversation afresh (a matching cache encodes only the new ids: see
    # test_generate.py), and -v says so.
    assert cli_encoded == [SKY_CHAT_IDS, whole]
    assert result.stdout == f">> {first}\n>> >> {''.join(r.text for r in second)}\n>> "
    prompts = re.findall(r"^Prompt: (\d+) tokens", result.stderr, re.M)
    assert prompts == [str(len(SKY_CHAT_IDS)), str(len(whole))]
    assert result.stderr.count("encoded all") == 1


def test_chat_after_an_eos_answer_closes_the_turn(tiny_eos_checkpoint, encoded):
    result = run(tiny_eos_checkpoint, "--chat", "--system", "Be brief.", input="Hi\nAgain\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("[WARNING] The answer is empty") == 2
    assert encoded[0][:3] == [2, 105, 9731]  # the system turn comes first, once
    assert len(encoded) == 2 and 9731 not in encoded[1]
    assert encoded[1][:2] == [106, 107]  # <turn|>\n closes the empty model turn


# Errors


def test_missing_model(tmp_path):
    result = run(tmp_path / "nope", "-p", SKY)
    assert_clean_error(result, 1, f"Model folder {tmp_path / 'nope'} does not exist.")


def test_not_a_diffusiongemma_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run(tmp_path, "-p", SKY)
    assert_clean_error(result, 1, "is not a DiffusionGemma checkpoint (model_type='llama'")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "Invalid value for '--steps': 0 is not in the range x>=1."),
        (["--entropy-bound", "0"], "Invalid value for '--entropy-bound'"),
        (["--max-tokens", "-4"], "Invalid value for '--max-tokens' / '-m'"),
        (["--t-min", "0.9"], "t_max must be greater than t_min (got t_max=0.8, t_min=0.9)."),
        (["--seed", "x"], "Invalid value for '--seed': 'x' is not a valid integer."),
    ],
)
def test_invalid_option_values(tiny_checkpoint, args, message):
    assert_clean_error(run(tiny_checkpoint, "-p", SKY, *args), 2, message)


@pytest.mark.parametrize("args, input", [(["-p", "  "], None), (["-p", "-"], "\n")])
def test_empty_prompt(tiny_checkpoint, args, input):
    result = run(tiny_checkpoint, *args, input=input)
    assert_clean_error(result, 2, "Invalid value for '--prompt': the prompt is empty")


def test_missing_prompt_and_prompt_with_chat(tiny_checkpoint):
    assert_clean_error(run(tiny_checkpoint), 2, "Missing --prompt")
    assert_clean_error(
        run(tiny_checkpoint, "--chat", "-p", SKY), 2, "--prompt cannot be used with --chat"
    )


def test_prompt_longer_than_the_context(tiny_checkpoint):
    result = run(tiny_checkpoint, "-p", "word " * 600)
    assert_clean_error(
        result, 1, "more than the model's context of 512 tokens (max_position_embeddings)."
    )
    result = run(tiny_checkpoint, "-p", SKY, "--max-tokens", "600")
    assert_clean_error(result, 1, "lower max_tokens.")


@pytest.mark.slow
def test_ctrl_c_exits_cleanly(tiny_checkpoint):
    # Many canvases of many steps: long enough to interrupt after the first commit.
    cmd = [sys.executable, "-m", "mlx_diffgemma", "generate", "--model", str(tiny_checkpoint)]
    cmd += ["-p", SKY, "--seed", "0", "--max-tokens", "400", "--steps", "8"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env=subprocess_env(),
        preexec_fn=default_sigint,
    )
    first = proc.stdout.read(1)  # blocks until the first canvas is committed
    assert first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.decode().strip() == "Interrupted."


# The command group


def test_group_has_generate_and_convert(tiny_checkpoint, tiny):
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "generate" in result.output and "convert" in result.output
    result = runner.invoke(cli, ["convert", "--help"])
    assert result.exit_code == 0 and "--mlx-path" in result.output
    result = runner.invoke(
        cli, ["generate", "--model", str(tiny_checkpoint), "-p", SKY, "--seed", "0"]
    )
    assert result.exit_code == 0 and result.stdout == generate(*tiny, user(SKY), seed=0) + "\n"


@pytest.mark.slow
def test_entry_points_print_no_warning():
    # runpy warns when the package has imported the module it runs; it must not have.
    for module in ["mlx_diffgemma", "mlx_diffgemma.generate", "mlx_diffgemma.infill"]:
        result = subprocess.run(
            [sys.executable, "-W", "default", "-m", module, "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=subprocess_env(),
        )
        assert result.returncode == 0 and result.stdout.startswith("Usage: ")
        assert result.stderr == "", module


@pytest.mark.slow
def test_the_package_imports_lazily():
    code = (
        "import sys, warnings, mlx_diffgemma\n"
        "assert not any(m.startswith(('mlx.', 'mlx_diffgemma.')) for m in sys.modules)\n"
        "assert not [f for f in warnings.filters if 'mlx_diffgemma' in str(f[1])]\n"
        "import mlx_diffgemma.generate, mlx_diffgemma.tasks.infill\n"
        "from mlx_diffgemma import generate, infill\n"
        "assert callable(generate) and callable(infill)\n"
        "assert generate.__module__ == 'mlx_diffgemma.generate'\n"
        "assert infill.__module__ == 'mlx_diffgemma.tasks.infill'\n"
        "assert sorted(mlx_diffgemma.__all__) == sorted(set(dir(mlx_diffgemma)) & set(mlx_diffgemma.__all__))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
    )
    assert result.returncode == 0, result.stderr


def test_group_lists_each_command_with_its_own_help():
    import importlib

    from mlx_diffgemma.cli import COMMANDS

    for name, (module, command, short) in COMMANDS.items():
        cmd = getattr(importlib.import_module(f"mlx_diffgemma.{module}"), command)
        assert cmd.name == name and cmd.get_short_help_str(limit=200) == short


@pytest.mark.slow
def test_chat_with_the_shipped_toy_runs_three_turns():
    """The toy's template drops earlier answers: chat still goes on (issue 21)."""
    toy = REPO / "examples" / "sudoku_toy"
    puzzle = "460200500004120306340520604102013065"
    for cmd in (
        [sys.executable, "-m", "mlx_diffgemma", "generate", "--model", str(toy), "--chat", "-v"],
        [sys.executable, str(REPO / "examples" / "chat.py"), str(toy)],
    ):
        p = subprocess.run(
            cmd,
            input=f"{puzzle}\n{puzzle}\n{puzzle}\n",
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=300,
        )
        assert p.returncode == 0, p.stderr
        assert "Error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
        if "--chat" in cmd:
            assert p.stderr.count("encoded all") == 2  # turns 2 and 3, afresh
        else:
            assert p.stdout.count("[encoded ") == 3
