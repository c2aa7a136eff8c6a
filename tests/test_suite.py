"""The suite itself: CI cannot turn green with the vLLM tests unrun."""

import os
import subprocess
import sys

from conftest import ROOT, TESTS

# the cheapest test that needs real vLLM
NEEDS_VLLM = "tests/test_eval.py::test_vllm_request_carries_the_stop_tokens_and_no_seed"


def pytest_with_broken_vllm(tmp_path, **env) -> subprocess.CompletedProcess:
    """NEEDS_VLLM run by pytest in a process whose `import vllm` raises, as with a broken install."""
    broken = tmp_path / "broken" / "vllm"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "__init__.py").write_text('raise ImportError("broken on purpose")\n')
    env = {**{k: v for k, v in os.environ.items() if k != "REQUIRE_VLLM"}, **env,
           "PYTHONPATH": os.pathsep.join([str(broken.parent), ROOT, TESTS])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", NEEDS_VLLM]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_test_that_needs_vllm_fails_under_require_vllm(tmp_path):
    """.ci/run exports REQUIRE_VLLM=1: where vLLM does not import, a test that needs it fails (an error in set-up)
    and says why; elsewhere it is skipped."""
    required = pytest_with_broken_vllm(tmp_path, REQUIRE_VLLM="1")
    assert required.returncode == 1 and "1 error" in required.stdout, required.stdout  # it fails in set-up
    assert "REQUIRE_VLLM=1 and vLLM is not importable (ImportError: broken on purpose)" in required.stdout
    optional = pytest_with_broken_vllm(tmp_path)
    assert optional.returncode == 0 and "1 skipped" in optional.stdout, optional.stdout
