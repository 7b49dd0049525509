"""Training commands run torch's OpenMP threads with a passive wait policy unless the user chose one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from skindistil.cli import TRAINING_COMMANDS, openmp_wait_policy

# records OMP_WAIT_POLICY at the moment torch is first imported: libgomp reads it then, never later
PROBE = """
import importlib.abc, os, sys
seen = {}
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, Spy())
from skindistil.cli import main
main(sys.argv[1:])
print("policy when torch loaded:", seen.get("policy"))
"""


def test_train_sets_the_policy_before_torch_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PROBE, "train", "--config", str(tmp_path / "absent.yaml")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300).stdout
    assert "policy when torch loaded: PASSIVE" in out, out


def test_the_users_choice_and_other_commands_are_left_alone():
    assert {"train", "distill", "ablate", "run", "demo", "store-teacher"} == TRAINING_COMMANDS
    for command in TRAINING_COMMANDS:
        environ = {}
        openmp_wait_policy(command, environ)
        assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        environ = dict(user)
        openmp_wait_policy("train", environ)
        assert environ == user
    for command in ("predict", "serve", "benchmark", "evaluate"):
        environ = {}
        openmp_wait_policy(command, environ)
        assert environ == {}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_worker_defaults_follow_the_cpu_affinity():
    """A process pinned to one core (taskset, a container's cpuset) defaults to one worker everywhere."""
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from skindistil.devices import usable_cores; from skindistil.data.prepare import default_workers; "
            "from skindistil.data.datamodule import default_num_workers; "
            "print(usable_cores(), default_workers(), default_num_workers())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["1", "1", "1"], out.stderr
