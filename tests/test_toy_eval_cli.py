"""`python -m minivar.toy.eval`: paired differences between two runs, and its command line's bad inputs."""
import json

import pytest

from minivar.numerics import resolve
from minivar.toy.geneval import main, paired_gap
from minivar.toy.scenes import CATEGORIES, eval_specs

SPECS = eval_specs(10)  # two prompts per category


def test_eval_specs_of_ten_hold_two_prompts_a_category():
    assert [sum(s.category == c for s in SPECS) for c in CATEGORIES] == [2] * len(CATEGORIES)


def verdicts(failing: set[tuple[str, int]]) -> list[bool]:
    """True for every prompt of SPECS but the i-th of a category named in `failing`."""
    seen, out = dict.fromkeys(CATEGORIES, 0), []
    for s in SPECS:
        out.append((s.category, seen[s.category]) not in failing)
        seen[s.category] += 1
    return out


def test_paired_gap_by_hand():
    before = verdicts(set())
    after = verdicts({("colour", 0)})
    gap = paired_gap(SPECS, before, after)
    # colour's differences are (-1, 0): mean -0.5, sample std sqrt(0.5), standard error sqrt(0.5) / sqrt(2) = 0.5
    assert gap["colour"] == pytest.approx((-0.5, 0.5))
    assert all(gap[c] == (0.0, 0.0) for c in CATEGORIES if c != "colour")
    # overall: the mean of the five categories' differences, their errors added in quadrature over five
    assert gap["overall"] == pytest.approx((-0.1, 0.1))
    # the other way round, and a loss in one category with a gain in another
    assert paired_gap(SPECS, after, before)["overall"] == pytest.approx((0.1, 0.1))
    mixed = paired_gap(SPECS, verdicts({("position", 1)}), verdicts({("counting", 0)}))
    assert mixed["position"][0] == 0.5 and mixed["counting"][0] == -0.5
    assert mixed["overall"] == pytest.approx((0.0, (2 * 0.5**2) ** 0.5 / 5))


def test_paired_gap_needs_one_verdict_a_prompt():
    with pytest.raises(ValueError):
        paired_gap(SPECS, [True] * 10, [True] * 9)


def run(capsys, *args):
    main(["--n", "10", *map(str, args)])
    return capsys.readouterr().out


def test_against_an_earlier_run(tmp_path, capsys):
    """The same run twice agrees prompt by prompt; a pruned run's difference is its scores' difference."""
    plain, again, pruned = tmp_path / "plain.json", tmp_path / "again.json", tmp_path / "pruned.json"
    run(capsys, "--json", plain)
    out = run(capsys, "--json", again, "--against", plain)
    assert "0 prompts pass there and fail here, 0 the other way round" in out
    a, b = json.loads(plain.read_text()), json.loads(again.read_text())
    assert a["passed"] == b["passed"] and len(a["passed"]) == 10
    assert b["against"]["overall"] == {"difference": 0.0, "se": 0.0}
    assert (b["numerics"], b["numerics_reason"]) == resolve(None, "cpu")  # what this machine's policy chose

    out = run(capsys, "--prune", "--json", pruned, "--against", plain)
    p = json.loads(pruned.read_text())
    assert p["against"]["overall"]["difference"] == pytest.approx(p["overall"] - a["overall"])
    for c in CATEGORIES:
        assert p["against"][c]["difference"] == pytest.approx(p["categories"][c] - a["categories"][c])
    assert f"against {plain} (prune=off" in out


@pytest.mark.parametrize("args, says", [
    (["--n", "0"], "--n 0"),
    (["--n", "-3"], "--n -3"),
    (["--batch", "0"], "--batch 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2**64 - 1), "--batch", "2"], "batch i is seeded seed + i"),
    (["--tau", "-1"], "tau=-1.0 is invalid"),
    (["--cfg", "nan"], "cfg=nan is invalid"),
    (["--cfg", "1,2"], "cfg has 2 per-scale values"),  # judged against the model's schedule, after loading
    (["--json", "{tmp}"], "is a folder"),
    (["--json", "{tmp}/no/such/folder/x.json"], "does not exist"),
    (["--against", "{tmp}/missing.json"], "no such file"),
    (["--against", "{tmp}/garbage.json"], "not a JSON file written by --json"),
    (["--against", "{tmp}/old.json"], "no per-prompt verdicts"),
    (["--against", "{tmp}/other_n.json"], "pairing needs the same three"),
    (["{tmp}/no_model_here"], "no_model_here"),
])
def test_bad_input_is_one_line_before_sampling(tmp_path, capsys, args, says):
    (tmp_path / "garbage.json").write_text("not json {")
    (tmp_path / "old.json").write_text(json.dumps({"n": 10, "overall": 0.5, "settings": {"seed": 0, "batch": 8}}))
    (tmp_path / "other_n.json").write_text(json.dumps({"n": 20, "passed": [True] * 20, "settings": {"seed": 0, "batch": 8}}))
    with pytest.raises(SystemExit) as e:
        main(["--n", "10", *[a.format(tmp=tmp_path) for a in args]])
    assert e.value.code == 2
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(error) == 1 and says in error[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""  # nothing sampled, nothing reported
