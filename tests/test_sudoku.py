"""Sudoku: built-in puzzles, prompt, clamped answer layout, Google's metrics, the step sweep.

On the tiny random checkpoint (canvas 8, so the 162-token answer spans 21 canvases) only the
mechanics are asserted: givens and the grid frame hold, the metrics are computed as defined.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from mlx_diffgemma import stream_generate
from mlx_diffgemma.tasks import sudoku as S

REPO = Path(__file__).resolve().parents[1]
PUZZLE, SOLUTION = S.PUZZLES[0]  # 45 givens, 36 empty cells


def count_solutions(grid: str, limit: int = 2) -> int:
    g = list(grid)

    def candidates(i):
        r, c = divmod(i, 9)
        b = 27 * (r // 3) + 3 * (c // 3)
        used = {g[9 * r + k] for k in range(9)} | {g[9 * k + c] for k in range(9)}
        used |= {g[b + 9 * a + k] for a in range(3) for k in range(3)}
        return [d for d in "123456789" if d not in used]

    def search():
        empty = [i for i in range(81) if g[i] == "0"]
        if not empty:
            return 1
        i = min(empty, key=lambda j: len(candidates(j)))
        n = 0
        for d in candidates(i):
            g[i] = d
            n += search()
            g[i] = "0"
            if n >= limit:
                break
        return n

    return search()


def is_solution(grid: str) -> bool:
    units = [[9 * r + c for c in range(9)] for r in range(9)]
    units += [[9 * r + c for r in range(9)] for c in range(9)]
    units += [
        [27 * br + 3 * bc + 9 * r + c for r in range(3) for c in range(3)]
        for br in range(3)
        for bc in range(3)
    ]
    return all(sorted(grid[i] for i in u) == list("123456789") for u in units)


def test_built_in_puzzles_are_valid_with_unique_solutions():
    assert {S.hardness(p) for p, _ in S.PUZZLES} == {"easy", "medium", "hard"}
    for puzzle, solution in S.PUZZLES:
        assert is_solution(solution)
        assert all(p in ("0", s) for p, s in zip(puzzle, solution))
        assert count_solutions(puzzle) == 1


def test_grid_parsing_and_hardness_bins():
    assert S.format_grid("53..7" + "0" * 76).startswith("5 3 0 0 7 0")
    assert S.parse_grid(" ".join(SOLUTION)) == SOLUTION
    with pytest.raises(ValueError, match=r"needs 81 digits .* \(80 cells\)"):
        S.parse_grid("1" * 80)
    bins = {n: S.hardness("1" * n + "0" * (81 - n)) for n in (29, 30, 39, 40)}
    assert bins == {29: "hard", 30: "medium", 39: "medium", 40: "easy"}


def test_extraction_takes_the_last_81_digits():
    grid = S.format_grid(SOLUTION)
    assert S.extract(grid) == SOLUTION
    assert S.extract("Sure, 12 steps:\n" + grid + "<turn|>") == SOLUTION
    assert S.extract(grid + " 4") == SOLUTION[1:] + "4"
    assert S.extract("1 2 3") is None


def test_scores_of_hand_made_answers():
    blanks = [i for i in range(81) if PUZZLE[i] == "0"]
    given = [i for i in range(81) if PUZZLE[i] != "0"]
    assert (len(blanks), len(given)) == (36, 45)
    solved = S.format_grid(SOLUTION)
    assert S.score(solved, PUZZLE, SOLUTION) == S.Score(1.0, 36 / 81, 1.0, 1.0, 1.0)

    wrong = list(SOLUTION)
    for i in blanks[:2] + given[:1]:  # two wrong fills, one overwritten given
        wrong[i] = str(int(wrong[i]) % 9 + 1)
    s = S.score(S.format_grid("".join(wrong)), PUZZLE, SOLUTION)
    assert s == S.Score(0.0, 34 / 81, 34 / 36, 0.0, 44 / 45)

    echo = S.score(S.format_grid(PUZZLE), PUZZLE, SOLUTION)  # the puzzle repeated back
    assert echo == S.Score(0.0, 0.0, 0.0, 1.0, 1.0)
    assert S.score("no grid here", PUZZLE, SOLUTION) == S.Score(0.0, 0.0, 0.0, 0.0, 0.0)


def test_summary_is_stratified_by_hardness():
    easy, hard = S.PUZZLES[0][0], S.PUZZLES[5][0]
    a, b = S.Score(1, 0.5, 1, 1, 1), S.Score(0, 0.1, 0.2, 0, 0.5)
    out = S.summarize([a, b, b], [easy, easy, hard])
    assert out["all"]["count"] == 3 and out["easy"]["count"] == 2
    assert out["medium"] == {"count": 0.0, **{k: 0.0 for k in S.Score.__dataclass_fields__}}
    assert out["easy"]["exact"] == 0.5 and out["hard"]["givens_partial"] == 0.5
    assert out["all"]["cell"] == pytest.approx(0.7 / 3)


def test_load_puzzles_reads_kaggle_csv(tmp_path):
    path = tmp_path / "sudoku.csv"
    rows = [(PUZZLE.replace("0", "."), SOLUTION), (S.PUZZLES[5][0], S.PUZZLES[5][1])]
    path.write_text("puzzle,solution\n" + "".join(f"{p},{s}\n" for p, s in rows))
    assert S.load_puzzles(path) == [(PUZZLE, SOLUTION), S.PUZZLES[5]]
    assert S.load_puzzles(path, limit=1) == [(PUZZLE, SOLUTION)]
    (tmp_path / "old.csv").write_text(f"quizzes,solutions\n{PUZZLE},{SOLUTION}\n")
    assert S.load_puzzles(tmp_path / "old.csv") == [(PUZZLE, SOLUTION)]
    (tmp_path / "bad.csv").write_text(f"q,a\n{PUZZLE},{SOLUTION}\n")
    with pytest.raises(ValueError, match="needs 'puzzle' and 'solution' columns"):
        S.load_puzzles(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text(f"puzzle,solution\n{PUZZLE[:80]},{SOLUTION}\n")
    with pytest.raises(ValueError, match="data row 1: A Sudoku grid needs 81 digits"):
        S.load_puzzles(tmp_path / "short.csv")


def test_prompts(tiny):
    _, tok = tiny
    grid = S.format_grid(PUZZLE)
    recipe = S.prompt_ids(tok, PUZZLE, "recipe")
    assert tok.decode(recipe) == (
        "<bos><|turn>system Solve the following Sudoku puzzle. Empty cells are represented by 0. "
        "Output ONLY the solved puzzle immediately as a 9x9 grid of numbers separated by spaces. "
        f"Do not include ####, explanations, or any other text.<turn|>\n<|turn>user {grid}<turn|>\n"
        "<|turn>model\n"
    )
    chat = tok.decode(S.prompt_ids(tok, PUZZLE, "chat"))
    assert chat.startswith("<bos><|turn>system\nSolve the following Sudoku puzzle.")
    assert chat.endswith(f"<|turn>user\n{grid}<turn|>\n<|turn>model\n")
    with pytest.raises(ValueError, match="Unknown prompt style 'raw'"):
        S.prompt_ids(tok, PUZZLE, "raw")


def test_answer_layout_is_one_token_per_cell_and_space(tiny):
    model, tok = tiny
    lay = S.answer_layout(tok, PUZZLE, 8, model.args.vocab_size, 1, digits_only=True)
    assert len(lay) == 168  # 161 answer tokens + EOS, padded to whole canvases of 8
    assert tok.decode(lay.ids[:161]) == S.format_grid(PUZZLE)  # byte for byte
    assert lay.ids[161:] == (1,) + (0,) * 6 and all(lay.fixed[161:])
    cells = [lay.fixed[2 * i] for i in range(81)]
    assert cells == [c != "0" for c in PUZZLE] and all(lay.fixed[1:161:2])
    allowed = {tok.decode([i]) for i, a in enumerate(lay.token_masks[0].tolist()) if a}
    assert allowed == set("123456789")
    assert lay.token_class[:4] == (-1, -1, 0, -1)  # "8 0 0 1...": cell 1 is empty


@pytest.mark.parametrize("seed", [0, 1])
def test_clamped_givens_and_frame_hold_in_the_output(tiny, seed):
    model, tok = tiny
    lay = S.answer_layout(tok, PUZZLE, 8, model.args.vocab_size, 1)
    ids = []
    prompt = S.prompt_ids(tok, PUZZLE)
    for r in stream_generate(model, tok, prompt, layout=lay, seed=seed, max_denoising_steps=1):
        ids += r.token_ids
    fixed = [(i, t) for i, (t, f) in enumerate(zip(lay.ids, lay.fixed)) if f and i < 161]
    if len(ids) == 161:  # the clamped EOS ended it
        assert all(ids[i] == t for i, t in fixed)
    else:  # the model wrote an EOS in a free cell: what came before it still holds
        assert all(ids[i] == t for i, t in fixed if i < len(ids))


def test_solve_modes(tiny):
    model, tok = tiny
    text, r = S.solve(model, tok, PUZZLE, digits_only=True, seed=0, max_denoising_steps=1)
    assert r.finish_reason == "stop" and r.generation_tokens == 161
    assert S.extract(text) is not None and S.score(text, PUZZLE, SOLUTION).givens_exact == 1.0
    assert len(text.split(" ")) == 81
    text, r = S.solve(model, tok, PUZZLE, clamp=False, seed=0, max_denoising_steps=1)
    assert r.canvases == 21  # ceil(162 / 8): the model writes everything
    with pytest.raises(ValueError, match="digits_only needs clamp"):
        S.solve(model, tok, PUZZLE, clamp=False, digits_only=True)


@pytest.mark.slow
def test_harness_runs_end_to_end(tiny_checkpoint, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sudoku_bench", REPO / "benchmarks" / "sudoku.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    csv = tmp_path / "p.csv"
    hard = S.PUZZLES[5]
    csv.write_text(f"puzzle,solution\n{PUZZLE},{SOLUTION}\n{hard[0]},{hard[1]}\n")
    out = tmp_path / "rows.json"
    args = ["--model", str(tiny_checkpoint), "--puzzles", str(csv), "--steps", "1,2"]
    bench.main(args + ["--digits-only", "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Sudoku: 2 puzzles (easy 1, medium 0, hard 1) | prompt recipe | ")
    assert lines[1].split()[:4] == ["steps", "exact", "cell", "blank"]
    assert [line.split()[0] for line in lines[2:4]] == ["1", "2"]
    rows = json.loads(out.read_text())["rows"]
    assert [r["steps"] for r in rows] == [1, 2]
    for r in rows:
        m = r["metrics"]
        assert (m["all"]["count"], m["easy"]["count"], m["hard"]["count"]) == (2, 1, 1)
        assert m["all"]["givens_exact"] == 1.0 and m["all"]["givens_partial"] == 1.0
        assert 0 <= m["all"]["cell"] <= m["all"]["blank"] <= 1
        assert 1 <= r["steps_used"] <= r["steps"] and r["tokens_per_second"] > 0

    with pytest.raises(SystemExit) as e:
        bench.main(args[:2] + ["--steps", "0"])
    assert e.value.code == 2 and "positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^error: "):
        bench.main(["--model", str(tmp_path / "missing")])


def test_readme_sudoku_table_command_matches_its_puzzles():
    """docs/FINE_TUNING.md's table is of the first 100 puzzles of test.csv: its command says
    --limit 100, and those puzzles have the hardness mix the table states."""
    from mlx_diffgemma.tasks.sudoku import hardness, load_puzzles

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "docs" / "FINE_TUNING.md").read_text()
    command = readme[readme.index("python -m benchmarks.sudoku --model examples/sudoku_toy") :]
    command = command[: command.index("# table below")]
    assert "--limit 100" in command
    puzzles = load_puzzles(repo / "examples" / "sudoku_toy" / "test.csv", limit=100)
    counts = {h: sum(hardness(q) == h for q, _ in puzzles) for h in ("easy", "medium", "hard")}
    stated = "{easy} easy,\n  {medium} medium, {hard} hard".format(**counts)
    assert stated in readme, counts


def test_the_shipped_distilled_adapter_solves_in_fewer_forwards():
    """examples/sudoku_toy_distilled (docs/FINE_TUNING.md) is an adapter of the shipped
    toy: on the first 10 test puzzles (clamped, seeds 0..9) it solves at least as many as
    the base in fewer decoder forwards per canvas."""
    from mlx_diffgemma import load
    from mlx_diffgemma.tasks.sudoku import load_puzzles, score, solve

    toy = REPO / "examples" / "sudoku_toy"
    puzzles = load_puzzles(toy / "test.csv", limit=10)
    results = {}
    for adapter in (None, REPO / "examples" / "sudoku_toy_distilled"):
        model, tok = load(str(toy), adapter_path=adapter and str(adapter))
        solved = forwards = 0
        for i, (puzzle, solution) in enumerate(puzzles):
            text, r = solve(model, tok, puzzle, style="toy", digits_only=True, seed=i)
            solved += score(text, puzzle, solution).exact
            forwards += r.decoder_forwards
        results[adapter is not None] = (solved, forwards)
    (base_solved, base_fwd), (student_solved, student_fwd) = results[False], results[True]
    assert student_solved >= base_solved and student_fwd < base_fwd, results
