"""Fast mode's settings: FastSettings' rules, the flat names of the edges, the CLI flags."""

import pytest
from click.testing import CliRunner

from mlx_diffgemma.diffusion.config import DiffusionConfig
from mlx_diffgemma.generate import generate_command, resolve_config


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"mode": "turbo"}, "mode must be one of exact, fast (got 'turbo')."),
        ({"top_k": 64}, "top_k=64 is a fast-mode approximation; pass mode='fast'"),
        ({"monotone_commit": True}, "monotone_commit=True is a fast-mode approximation"),
        ({"mode": "fast", "top_k": -1}, "top_k must be an integer >= 0"),
        ({"mode": "fast", "self_conditioning_top_k": 1.5}, "self_conditioning_top_k must be"),
        ({"mode": "fast", "commit_rule": "greedy"}, "commit_rule must be one of entropy_bound"),
        ({"mode": "fast", "commit_threshold": 0}, "commit_threshold must be a number in (0, 1]"),
    ],
)
def test_mode_and_settings_are_validated(kw, message):
    with pytest.raises(ValueError) as e:
        DiffusionConfig().replace(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_mode_fills_the_settings_not_given(tiny):
    model = tiny[0]
    exact = resolve_config(model)
    assert (exact.mode, exact.fast) == ("exact", None)
    fast_config = resolve_config(model, mode="fast", top_k=8)
    fast = fast_config.fast
    assert (fast.top_k, fast.self_conditioning_top_k, fast.canvas_shrink) == (8, 64, 64)
    # Monotone commit and what builds on it cost accuracy: opt-in (benchmarks/README.md).
    assert not (fast.monotone_commit or fast.compact or fast.repair)
    back = fast_config.replace(mode="exact")
    assert back == exact
    # A checkpoint's own top_k (transformers' sampling option) never turns fast mode on.
    assert DiffusionConfig.from_generation_config({"top_k": 64}).fast is None


def test_cli_mode_flags(tiny_checkpoint):
    def run(*args):
        argv = ["--model", str(tiny_checkpoint), "-p", "Hi", "--seed", "0", *args]
        return CliRunner().invoke(generate_command, argv)

    bad = run("--top-k", "8")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "pass mode='fast' (CLI: --mode fast)" in bad.stderr.splitlines()[-1]
    assert run("--mode", "turbo").exit_code == 2
    ok = run("--mode", "fast", "--commit-rule", "confidence", "--commit-threshold", "0.5")
    assert ok.exit_code == 0, ok.output
    warn = run("--mode", "fast", "--commit-threshold", "0.5")
    assert "[WARNING] --commit-threshold has no effect" in warn.stderr


def test_cli_compact_and_repair(tiny_checkpoint):
    def run(*args):
        argv = ["--model", str(tiny_checkpoint), "-p", "Hi", "--seed", "0", "--mode", "fast"]
        return CliRunner().invoke(generate_command, argv + list(args))

    ok = run("--monotone-commit", "--compact", "--repair", "1")
    assert ok.exit_code == 0, ok.output
    bad = run("--monotone-commit", "--compact", "--self-conditioning-top-k", "0")
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert "compact=True needs top_k > 0" in bad.stderr.splitlines()[-1]
    assert run("--repair", "-1").exit_code == 2


def test_every_fast_setting_is_a_flag_and_a_request_field_from_one_table():
    import dataclasses

    from mlx_diffgemma.diffusion.config import FAST_SETTINGS, FastSettings
    from mlx_diffgemma.options import SAMPLER_FLAGS
    from mlx_diffgemma.server.protocol import parse_chat

    names = [f.name for f in dataclasses.fields(FastSettings)]
    assert list(FAST_SETTINGS) == names
    assert [SAMPLER_FLAGS["--" + n.replace("_", "-")] for n in names] == names
    assert set(names) <= {p.name for p in generate_command.params}
    given = {"top_k": 16, "monotone_commit": True, "repair": 2, "commit_stable": True}
    body = {"messages": [{"role": "user", "content": "x"}], "mode": "fast", **given}
    assert parse_chat(body).fast_settings == given
    fast = DiffusionConfig().replace(mode="fast", **given).fast
    assert fast == FastSettings(**given) and fast.self_conditioning_top_k == 64
