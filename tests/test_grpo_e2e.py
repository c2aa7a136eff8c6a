"""grpo.py end to end: one process (transformers and vLLM), two ranks under the deepspeed launcher
with ZeRO-3 and colocated vLLM, --resume, and the errors on bad input."""

import glob
import json
import math
import os
import sys

import pytest
import torch
from conftest import (FAKE_VLLM, ROOT, assert_same_checkpoint, assert_same_step, deepspeed_launcher, read_metrics,
                      resume_from_step_1, run_script, script_args, tiny_args)

SCRIPT = os.path.join(ROOT, "grpo.py")
TINY = tiny_args()
# a reward a random tiny model earns some of, so that advantages (and updates) are non-zero
TOY = ["--reward-funcs", "toy_rewards:letter_a", "correctness", "--reward-weights", "1.0", "1.0"]
METRICS = [
    "reward",
    "reward_std",
    "rewards/correctness/mean",
    "rewards/toy_rewards:letter_a/mean",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/clipped_ratio",
    "entropy",
    "kl",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "mismatch/abs_diff_mean",
    "mismatch/abs_diff_max",
    "mismatch/ratio_outside_frac",
    "update/rows",
    "update/real_tokens",
    "policy_loss",
    "grad_norm",
    "lr",
    "tokens/generated_total",
    "time/generate",
    "time/logprobs",
    "time/update",
    "time/weight_sync",
    "time/step",
]
MOVED = 0.1  # a log-prob change that training, not float noise, made

needs_vllm = pytest.mark.needs_vllm


def logprobs_of(model_dir: str, prompt: list, completion: list) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, -1)[range(len(completion)), completion]


# on PYTHONPATH as sitecustomize.py: the process kills itself as it starts writing checkpoint-2
KILL_DURING_SAVE = """
import os, signal, torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if "checkpoint-2.tmp" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = save
"""


def check_run(out: str, steps: int) -> list:
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        missing = [k for k in METRICS if k not in m]
        assert not missing, f"metrics missing: {missing}"
        assert 0 <= m["reward"] <= 2 and 0 < m["completions/mean_length"] <= 16
    return metrics


def test_one_process_zero2_checkpointing_mini_batches(tiny_model, add_data, tmp_path):
    """ZeRO-2, gradient checkpointing, μ = 2 with 2 mini-batches (old log-probs recomputed, ratios move, the clip
    can bind), wandb offline, generation by tests/fake_vllm; args.json records the flags as settled."""
    out = str(tmp_path / "runs")
    run_script(
        [
            *script_args(SCRIPT, tiny_model, add_data, out),
            *TINY,
            *TOY,
            "--learning-rate",
            "1e-2",
            "--zero-stage",
            "2",
            "--gradient-checkpointing",
            "on",
            "--num-iterations",
            "2",
            "--num-mini-batches",
            "2",
            "--track",
        ],
        cwd=str(tmp_path),
        pythonpath=(FAKE_VLLM,),
    )
    metrics = check_run(out, 2)
    run_dir = os.path.join(out, os.listdir(out)[0])
    with open(os.path.join(run_dir, "args.json")) as f:
        recorded = json.load(f)
    assert (recorded["zero_stage"], recorded["gradient_checkpointing"]) == (2, "on")
    wandb_log = "".join(open(p).read() for p in _files(str(tmp_path / "wandb"), "debug.log"))  # holds the config
    assert "'zero_stage': 2" in wandb_log and "'gradient_checkpointing': 'on'" in wandb_log
    assert any(
        m["clip_ratio/low_mean"] + m["clip_ratio/high_mean"] > 0 for m in metrics
    )  # ρ ≠ 1 after the first update
    per_step = [m["completions/mean_length"] * 8 for m in metrics]
    assert metrics[-1]["tokens/generated_total"] == pytest.approx(sum(per_step))
    ckpt = os.path.join(run_dir, "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, "trainer_state.json"))
    assert not any(d.endswith(".tmp") for d in os.listdir(run_dir))
    change = logprobs_of(ckpt, [5, 6, 7], [8, 9, 10]) - logprobs_of(tiny_model, [5, 6, 7], [8, 9, 10])
    assert change.abs().max() > 1e-2  # the saved checkpoint holds the trained weights


def _files(root: str, name: str):
    return [os.path.join(d, name) for d, _, files in os.walk(root) if name in files]


@needs_vllm
def test_one_process_vllm_and_resume(tiny_untied_model, add_data, tmp_path):
    """--resume from the step-1 checkpoint reproduces step 2 of the uninterrupted run; the model has its
    own lm_head (as Qwen2.5-7B). A reward drawn from
    Python's RNG reproduces too: its state is restored after vLLM's engine (which reseeds it) has started."""
    out = str(tmp_path / "runs")
    common = [
        *script_args(SCRIPT, tiny_untied_model, add_data),
        *TINY,
        *TOY[:3],
        "toy_rewards:python_random",
        "--reward-weights",
        "1.0",
        "1.0",
        "0.5",
        "--learning-rate",
        "1e-2",
        "--save-steps",
        "1",
    ]
    run_script(common + ["--output-dir", out], cwd=str(tmp_path))
    full = check_run(out, 2)
    assert all(m["update/real_tokens"] > 0 and 0 <= m["update/padding_fraction"] < 1 for m in full)

    # the same run killed (SIGKILL) while it writes checkpoint-2, after step 2's row of metrics.jsonl, then resumed
    # from its run directory: the latest complete checkpoint is checkpoint-1, and step 2's row is not kept twice
    out2 = str(tmp_path / "runs_resumed")
    hook = tmp_path / "kill_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_DURING_SAVE)
    with pytest.raises(AssertionError, match="exited -9"):
        run_script(common + ["--output-dir", out2], cwd=str(tmp_path), pythonpath=(str(hook),))
    name2 = os.listdir(out2)[0]
    assert os.path.isdir(os.path.join(out2, name2, "checkpoint-2.tmp"))
    assert [m["step"] for m in read_metrics(out2)] == [1, 2]
    proc = run_script(common + ["--output-dir", out2, "--resume", os.path.join(out2, name2)], cwd=str(tmp_path))
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = read_metrics(out2)
    assert [m["step"] for m in resumed] == [1, 2]
    assert len(assert_same_step(full[1], resumed[1])) > 15
    # after step 2's optimizer step (its metrics come before it): the weights, Adam's moments, the RNG states
    name = os.listdir(out)[0]
    assert_same_checkpoint(os.path.join(out, name, "checkpoint-2"), os.path.join(out2, name2, "checkpoint-2"))


TWO_RANKS = [
    *TINY,
    *TOY,
    "--prompts-per-step",
    "4",
    "--zero-stage",
    "3",
    "--beta",
    "0.04",
    "--learning-rate",
    "1e-2",
    "--save-steps",
    "1",
]


@pytest.fixture(scope="module")
def two_rank_run(tiny_model, add_data, tmp_path_factory):
    """Two ranks, ZeRO-3, reference model (β > 0), a vLLM engine in each rank, a checkpoint every step."""
    cwd = tmp_path_factory.mktemp("two_ranks")
    out = str(cwd / "runs")
    launcher = deepspeed_launcher(2)
    run_script(
        [*script_args(SCRIPT, tiny_model, add_data, out), *TWO_RANKS],
        cwd=str(cwd),
        launcher=launcher,
    )
    LEFT_IN_SHM.extend(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{launcher[-1]}_*"))  # this run's port
    return out


LEFT_IN_SHM = []


@needs_vllm
def test_two_ranks_leave_nothing_in_shared_memory(two_rank_run):
    """DeepSpeed's CPU all-reduce never unlinks its per-rank buffer in /dev/shm (~70 MB of RAM each, for good);
    the scripts remove it once every rank has mapped it."""
    assert LEFT_IN_SHM == []


@needs_vllm
def test_deepspeed_two_ranks_zero3_vllm(two_rank_run, tiny_model):
    """The weights change; the policy leaves the reference."""
    metrics = check_run(two_rank_run, 2)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6) and metrics[1]["kl"] > 0  # the policy left the reference
    assert all(m["grad_norm"] > 0 for m in metrics)
    # (6.12): vLLM's CPU engine samples in fp32 from what the trainer computes, up to float noise
    assert all(m["mismatch/abs_diff_max"] < 1e-4 and m["mismatch/ratio_outside_frac"] == 0 for m in metrics)
    ckpt = os.path.join(two_rank_run, os.listdir(two_rank_run)[0], "checkpoint-2")
    before = logprobs_of(tiny_model, [5, 6, 7], [8, 9, 10, 11])
    after = logprobs_of(ckpt, [5, 6, 7], [8, 9, 10, 11])
    assert (after - before).abs().max() > MOVED


@needs_vllm
def test_vllm_logprobs_are_after_top_p_and_the_tis_flag_runs(tiny_model, add_data, tmp_path):
    """docs/algorithms.md (6.12): vLLM returns the log-prob of the distribution it sampled from, after top-p: with
    --top-p 0.9 on the random tiny model (its nucleus holds just over 0.9 of the probability) every sampled token's
    log-prob is the trainer's plus −log(nucleus mass), up to −log 0.9 = 0.105. --tis-cap 2 trains on it."""
    out = str(tmp_path / "runs")
    run_script([*script_args(SCRIPT, tiny_model, add_data, out), *tiny_args(total_steps=1), *TOY, "--top-p", "0.9",
                "--tis-cap", "2"], cwd=str(tmp_path))
    (m,) = check_run(out, 1)
    assert 0.09 < m["mismatch/abs_diff_mean"] <= m["mismatch/abs_diff_max"] <= -math.log(0.9) + 1e-4
    assert m["mismatch/ratio_outside_frac"] == 0 and m["grad_norm"] > 0


@needs_vllm
def test_deepspeed_two_ranks_zero3_resume(two_rank_run, tiny_model, add_data, tmp_path):
    """--resume from checkpoint-1 on two ranks with ZeRO-3 and β > 0: step 2's metrics and checkpoint-2 (the
    weights, both ranks' optimizer shards and rank states) as uninterrupted."""
    common = [*script_args(SCRIPT, tiny_model, add_data), *TWO_RANKS]
    resumed = resume_from_step_1(common, two_rank_run, str(tmp_path), launcher=deepspeed_launcher(2))
    assert len(assert_same_step(read_metrics(two_rank_run)[1], read_metrics(os.path.dirname(resumed))[1])) > 15
    full = os.path.join(two_rank_run, os.listdir(two_rank_run)[0], "checkpoint-2")
    compared = assert_same_checkpoint(full, os.path.join(resumed, "checkpoint-2"))
    assert any("zero_pp_rank_1_mp_rank_00_optim_states.pt" in p for p in compared)
    assert any(p.startswith("rank_state_1.pt/") for p in compared)


def test_generation_stops_at_the_token_budget(tiny_model, add_data, tmp_path):
    """--max-generated-tokens: training stops once the cumulative generated tokens reach the budget
    (here within the first step: ≤ 2 prompts × 4 × 16 tokens), and the last step is saved."""
    out = str(tmp_path / "runs")
    proc = run_script(
        [*script_args(SCRIPT, tiny_model, add_data, out), *TINY, *TOY, "--total-steps", "5",
         "--max-generated-tokens", "60"],
        cwd=str(tmp_path),
        pythonpath=(FAKE_VLLM,),
    )
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1] and metrics[0]["tokens/generated_total"] >= 60
    assert "--max-generated-tokens 60 reached after 1 steps" in proc.stdout + proc.stderr
    run_dir = os.path.join(out, os.listdir(out)[0])
    assert os.path.isdir(os.path.join(run_dir, "checkpoint-1"))
    with open(os.path.join(run_dir, "args.json")) as f:
        recorded = json.load(f)
    # --gradient-checkpointing auto is recorded as what it resolved to: on with CUDA, else off
    assert recorded["gradient_checkpointing"] == ("on" if torch.cuda.is_available() else "off")


# --- bad input: a clear message naming the fix, before any model is loaded --------------------


def run_main(argv, monkeypatch, capsys=None):
    """grpo.py's main() on `argv`, whose completions fit the tiny model's 1,024 positions unless argv sets them."""
    import grpo

    short = [] if "--max-completion-length" in argv else ["--max-completion-length", "64"]
    monkeypatch.setattr(sys, "argv", ["grpo.py", *argv, *short])
    with pytest.raises(SystemExit) as e:
        grpo.main()
    return str(e.value.code)


def test_missing_model_path(monkeypatch, add_data):
    msg = run_main(["--model", "/no/such/model", "--dataset", add_data], monkeypatch)
    assert "--model /no/such/model" in msg and "local directory" in msg


def test_hub_model_without_hub(monkeypatch, add_data):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import (else 23 s of retries)
    msg = run_main(["--model", "nobody/no-such-model", "--dataset", add_data], monkeypatch)
    assert "prepare_smollm2.sh" in msg


def test_missing_dataset_file(monkeypatch, tiny_model):
    msg = run_main(["--model", tiny_model, "--dataset", "/no/such.jsonl"], monkeypatch)
    assert "no such file" in msg


def test_dataset_without_the_fields(monkeypatch, tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hello", "label": 1}\n')
    msg = run_main(["--model", tiny_model, "--dataset", str(path)], monkeypatch)
    assert "--question-field" in msg and "'text'" in msg and "question/problem" in msg and "None" not in msg


def test_completions_longer_than_the_models_positions(monkeypatch, tiny_model, add_data):
    """transformers 5 gives every config a rope_scaling ({"rope_type": "default"}); the check reads its type."""
    msg = run_main(["--model", tiny_model, "--dataset", add_data, "--max-completion-length", "1000"], monkeypatch)
    assert "1512 tokens, more than the 1024 positions" in msg and "lower one of the two" in msg


def test_unknown_reward_function_is_one_line(monkeypatch, tiny_model, add_data):
    msg = run_main(["--model", tiny_model, "--dataset", add_data, "--reward-funcs", "nosuch"], monkeypatch)
    assert "unknown reward 'nosuch'" in msg and "module:function" in msg


def test_empty_dataset(monkeypatch, tiny_model, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n')
    msg = run_main(["--model", tiny_model, "--dataset", str(path), "--prompts-per-step", "2"], monkeypatch)
    assert "only 1 usable prompts" in msg


def test_hub_dataset_without_hub(monkeypatch, tiny_model):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read these once, at import: without this the test waited on the network's retries (~25 s)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    msg = run_main(["--model", tiny_model, "--dataset", "gsm8k"], monkeypatch)
    assert "data/gsm8k_sample.jsonl" in msg


def test_vllm_not_importable(monkeypatch, tiny_model, add_data):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    msg = run_main(["--model", tiny_model, "--dataset", add_data], monkeypatch)
    assert "vLLM is not importable" in msg and "install it" in msg


def test_prompts_too_long_are_counted(monkeypatch, tiny_model, add_data):
    msg = run_main(["--model", tiny_model, "--dataset", add_data, "--max-prompt-length", "5"], monkeypatch)
    assert "100 longer than --max-prompt-length 5" in msg


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["--prompts-per-step", "3", "--num-generations", "4", "--micro-batch-size", "5"],
            "multiple of --micro-batch-size 5",
        ),
        (["--num-generations", "1"], "at least 2"),
        (["--num-mini-batches", "3", "--prompts-per-step", "1", "--num-generations", "4"], "--num-mini-batches 3"),
        (["--reward-weights", "1", "2"], "one --reward-weights value each"),
        (["--top-p", "0"], "--top-p"),
        (["--tis-cap", "0.5"], "--tis-cap 0 or >= 1"),
    ],
)
def test_batch_arithmetic_and_flags(monkeypatch, argv, needle):
    msg = run_main(argv, monkeypatch)
    assert needle in msg


def test_indivisible_across_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    msg = run_main(["--prompts-per-step", "3"], monkeypatch)
    assert "multiple of the 2 ranks" in msg
