"""plot.py draws PNGs from metrics.jsonl files (offline), one panel per metric any run logged."""

import json
import os

import pytest
from conftest import ROOT, run_script

import plot


def write_run(path, rows):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_smoothing_is_debiased():
    assert plot.smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # a constant stays constant from the start
    assert plot.smooth([0.0, 1.0], 0.0) == [0.0, 1.0]  # weight 0: the raw values
    s = plot.smooth([0.0] * 10 + [1.0] * 10, 0.6)
    assert s[9] == 0 and 0 < s[10] < 1 and s[-1] > 0.99


def test_figures_for_grpo_and_a_variant(tmp_path):
    grpo = write_run(tmp_path / "grpo", [{"step": s, "tokens/generated_total": 100 * s, "reward": 0.1 * s,
                                          "completions/mean_length": 40 - s, "entropy": 2.0, "kl": 0.01 * s}
                                         for s in range(1, 11)])
    agpo = write_run(tmp_path / "agpo", [{"step": s, "tokens/generated_total": 200 * s, "reward": 0.05 * s,
                                          "completions/mean_length": 30.0, "entropy": 1.5, "kl": float("nan"),
                                          "agpo/tau_mean": 1.0 + 0.01 * s, "agpo/eps_mean": 0.2}
                                         for s in range(1, 6)])
    out = str(tmp_path / "figures")
    proc = run_script([os.path.join(ROOT, "plot.py"), grpo, agpo, "--labels", "GRPO", "AGPO", "--out", out],
                      cwd=str(tmp_path))
    for name in ("by_step.png", "by_tokens.png"):
        path = os.path.join(out, name)
        assert path in proc.stdout
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 20_000  # six panels with lines, not an empty canvas


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot.read_metrics(str(tmp_path / "nothing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(SystemExit, match="metrics.jsonl:2: not a JSON line"):
        plot.read_metrics(str(bad))
