"""The comparison's task: the held-out split is never trained on, and the table's spread is what it says, an arm
names its run."""

import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import compare_algorithms  # noqa: E402


def operand_pairs(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    pairs = set()
    for r in rows:
        a, b = map(int, re.findall(r"\d+", r["question"]))
        assert r["answer"] == f"#### {a + b}", r
        pairs.add((a, b))
    return rows, pairs


def test_held_out_pairs_never_in_training(tmp_path):
    train, test = compare_algorithms.write_task(str(tmp_path), held_out_pairs=30)
    train_rows, train_pairs = operand_pairs(train)
    test_rows, test_pairs = operand_pairs(test)
    assert len(test_pairs) == 30 and len(train_pairs) == 70
    assert not train_pairs & test_pairs
    phrasings = len(compare_algorithms.PHRASINGS)
    assert len(train_rows) == 70 * phrasings and len(test_rows) == 30 * phrasings
    # the split is seeded: the same task every time
    assert compare_algorithms.write_task(str(tmp_path / "again"), held_out_pairs=30) and \
        operand_pairs(str(tmp_path / "again" / "test.jsonl"))[1] == test_pairs


def test_spread_is_mean_and_sample_sd_then_each_seed():
    assert compare_algorithms.spread([0.5]) == "50.0"
    assert compare_algorithms.spread([0.8, 0.9, 1.0]) == "90.0 ± 10.0 (80.0 / 90.0 / 100.0)"
    assert compare_algorithms.spread([10, 14], scale=1, digits=0) == "12 ± 3 (10 / 14)"


def test_an_arm_is_a_script_and_its_flags():
    assert compare_algorithms.name_of("agpo_adaptive.py") == "agpo_adaptive"
    assert compare_algorithms.name_of("grpo.py --no-skip-no-signal") == "grpo_no-skip-no-signal"
    assert compare_algorithms.Args(model="m").arms[-1] == "grpo.py --no-skip-no-signal"


def test_gpu_weight_change_counts_the_tensors_that_moved(tmp_path):
    import bench_gpu
    import torch
    from safetensors.torch import save_file

    a = {"w": torch.ones(3, 2), "norm": torch.ones(4)}
    b = {"w": a["w"] + torch.tensor([[0.0, 0.0], [0.0, -0.25], [0.0, 0.0]]), "norm": a["norm"].clone()}
    for name, tensors in (("a", a), ("b", b)):
        os.makedirs(tmp_path / name)
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    assert bench_gpu.weight_change(str(tmp_path / "a"), str(tmp_path / "b")) == \
        {"tensors": 2, "tensors_moved": 1, "max_abs_change": 0.25}


def test_gpu_report_has_a_row_per_run_with_its_memory(tmp_path):
    import bench_gpu

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "bench", "results", "gpu_h200.json")) as f:
        result = json.load(f)
    out = str(tmp_path / "gpu")
    bench_gpu.write(bench_gpu.Args(smollm2="x", dataset="y", out=out), result)
    with open(out + ".md") as f:
        rows = [line.split("|")[1:-1] for line in f if line.startswith("| ") and ".py |" in line]
    assert len(rows) == len(result["checks"]) == 16
    for row, r in zip(rows, result["checks"]):
        assert [c.strip() for c in row[:3]] == [r["script"], r["launcher"], r["model"]]
        peaks = [float(x) for x in row[9].split("/")]  # generate / logprobs / update / sync, GiB
        assert len(peaks) == 4 and peaks[2] == round(r["memory_gib"]["update_peak_gib"], 2)


def test_update_profile_variants_take_the_same_step(tiny_model, tmp_path):
    """bench/update_profile.py times settings that must not change the maths: the plain model, ZeRO-3 as the
    scripts set it up (leaf decoder layers, plain F.linear under checkpointing) and DeepSpeed's defaults give
    the same gradient norm on the same rollout, and the report has their rows and the profiler's table."""
    import subprocess

    out = str(tmp_path / "profile")
    variants = ["plain_ckpt", "zero3_ckpt", "zero3_dsdefault_ckpt"]
    script = os.path.join(os.path.dirname(compare_algorithms.__file__), "update_profile.py")
    proc = subprocess.run([sys.executable, script,
                           "--model", tiny_model, "--out", out, "--sequences", "8", "--micro-batch", "4",
                           "--completion-length", "16", "--repeats", "1", "--variants", *variants,
                           "--profile", "zero3_ckpt"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out + ".json") as f:
        result = json.load(f)["variants"]
    assert list(result) == variants and all("seconds" in r for r in result.values()), result
    norms = [result[v]["grad_norm"] for v in variants]
    assert norms[0] > 0 and max(abs(n - norms[0]) for n in norms) < 1e-5 * norms[0], norms
    assert result["zero3_ckpt"]["profile_total_ms"]["cpu"] > 0
    report = open(out + ".md").read()
    assert all(f"| {v} |" in report for v in variants) and "## zero3_ckpt: cpu time" in report


def test_report_only_tables_the_kept_runs_and_trains_nothing(tmp_path, monkeypatch):
    """A comparison in parts: --report-only reads OUT/per_run/ and never trains or evaluates."""
    work = tmp_path / "cmp"

    def keep(name, file, value):
        os.makedirs(work / "per_run" / name, exist_ok=True)
        with open(work / "per_run" / name / file, "w") as f:
            f.write("\n".join(json.dumps(v) for v in value) if file.endswith(".jsonl") else json.dumps(value))

    scores = lambda avg: {"avg@4": avg, "pass@4": 2 * avg, "maj@4": avg, "tokens_mean": 20.0}  # noqa: E731
    keep("base", "eval.json", scores(0.1))
    for seed, avg in ((1, 0.3), (2, 0.5)):
        name = f"grpo_no-skip-no-signal_seed{seed}"
        keep(name, "run.json", {"arm": "grpo.py --no-skip-no-signal", "seed": seed, "seconds": 60.0 * seed,
                                "steps": 10 + seed, "tokens": 32000, "eval": scores(avg)})
        keep(name, "metrics.jsonl", [{"step": s, "tokens/generated_total": 1000 * s, "reward": 0.1 * s,
                                      "rewards/correctness_last_number/mean": 0.1 * s} for s in (1, 2, 3)])
    monkeypatch.setattr(compare_algorithms, "run", lambda *a: pytest.fail(f"ran {a[0][:2]}"))
    monkeypatch.setattr(sys, "argv", ["compare_algorithms.py", "--model", "m", "--out", str(work), "--report-only",
                                      "--arms", "grpo.py", "grpo.py --no-skip-no-signal", "--seeds", "1", "2", "3"])
    compare_algorithms.main()
    table = (tmp_path / "cmp.md").read_text()
    assert "| grpo.py --no-skip-no-signal | 1 2 | 40.0 ± 14.1 (30.0 / 50.0) |" in table
    assert "| 12 ± 1 (11 / 12) | 1.5 ± 0.7 (1.0 / 2.0) | 10 → 20 |" in table and "| grpo.py |" not in table
    assert (work / "figures" / "seed2" / "by_tokens.png").is_file() and not (work / "figures" / "seed3").exists()
