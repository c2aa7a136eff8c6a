"""A rank that fails (issue #31, item 5): the run ends non-zero, shows that rank's error, and leaves no process."""

import contextlib
import os
import pathlib
import signal
import subprocess
import time

import pytest
from conftest import ROOT, deepspeed_launcher, script_args, script_env, tiny_args

MARK = "GRPO_TEST_RUN"  # in the environment of every process of the run (ranks, launcher, their children)


def processes_of(run: str) -> dict:
    """The processes whose environment has MARK=`run`: their command lines by id."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # gone, or not ours to read
            if f"{MARK}={run}".encode() in pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found[int(pid)] = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


@pytest.mark.needs_vllm
def test_failing_rank_ends_the_run(tiny_model, add_data, tmp_path):
    """Rank 1's reward function raises while rank 0 goes on into the update's collectives: the launcher exits
    non-zero within the hang guard, with rank 1's error in its output, and no process of the run is left (one left
    holding the output pipes shows as the hang guard's timeout)."""
    run = str(tmp_path)
    cmd = [*deepspeed_launcher(2), *script_args(os.path.join(ROOT, "grpo.py"), tiny_model, add_data, run),
           *tiny_args(prompts_per_step=4), "--reward-funcs", "toy_rewards:fails_on_rank_1"]
    try:
        proc = subprocess.run(cmd, cwd=run, env=script_env(env={MARK: run}), capture_output=True, text=True,
                              timeout=600)  # the hang guard: a healthy run fails in 1-5 minutes on a busy 2-core CPU
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, output[-3000:]
        assert "toy reward failed on rank 1 on purpose" in output, output[-3000:]
        deadline = time.monotonic() + 10  # the launcher kills the ranks before it exits: a grace period only
        while processes_of(run) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_of(run) == {}
    finally:  # a run that hung or left processes does not outlive the test
        for pid in processes_of(run):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
