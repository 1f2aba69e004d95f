"""Many devices and many processes: sharded checkpoints restored onto other meshes,
layout-independent checksums, a GRPO run checkpointed on (2 x 4) and resumed on
(1 x 8) and on one device equal to the uninterrupted run, two processes x 4 host CPU
devices with jax.distributed (one checkpoint written by both, process 0 alone writing
the run's outputs, a final model gathered to process 0), and the launch settings of
sparsejax.parallel.distributed.

The device cases run in subprocesses (tests/distributed_worker.py): each pays JAX's
start and its compiles once for all its cases.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from sparsejax.parallel import distributed

from paths import REPO

ROOT = REPO
WORKER = ROOT / "tests" / "helpers" / "distributed_worker.py"
MULTI_CASES = ["processes_see_one_global_mesh",
               "two_processes_write_and_verify_one_sharded_checkpoint",
               "process_zero_alone_writes_run_outputs", "final_model_is_gathered_to_process_zero",
               "grpo_runs_on_two_processes"]
SINGLE_CASES = ["fingerprints_do_not_depend_on_layout", "fingerprints_see_one_bit_and_a_swap",
                "checkpoint_on_2x4_restores_on_1x8_and_one_device_bit_exact",
                "corrupted_sharded_checkpoint_is_detected_and_skipped",
                "unreshardable_checkpoint_names_the_tensor",
                "checkpoint_of_two_processes_restores_in_one", "grpo_two_processes_equal_one"]
TRAINER_CASES = ["grpo_checkpoint_on_2x4_resumes_on_1x8_and_one_device"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS", "SLURM_",
                                "OMPI_", "XLA_FLAGS"))}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cases_of(stdout: str) -> dict:
    return {r["case"]: r for r in (json.loads(l[5:]) for l in stdout.splitlines()
                                   if l.startswith("CASE "))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both groups' results: the 2-process group first (the 1-process group reads its
    checkpoint back)."""
    out = tmp_path_factory.mktemp("distributed")
    port, env = free_port(), worker_env()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "multi", str(out), str(i),
                               str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs.append(p.communicate())
    multi = cases_of(outs[0][0])
    for case, r in cases_of(outs[1][0]).items():  # process 1 prints only its failures
        multi[case] = {**r, "error": f"process 1: {r['error']}"}
    multi_log = "\n".join(err[-3000:] for _, err in outs)
    single = subprocess.run([sys.executable, str(WORKER), "single", str(out)], env=env,
                            capture_output=True, text=True, timeout=900)
    return {"multi": (multi, multi_log), "single": (cases_of(single.stdout), single.stderr)}


@pytest.mark.parametrize("case", MULTI_CASES)
def test_two_processes(results, case):
    got, log = results["multi"]
    assert case in got, f"the 2-process worker did not report {case}:\n{log}"
    assert got[case]["ok"], got[case]["error"]


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_one_process_eight_devices(results, case):
    got, log = results["single"]
    assert case in got, f"the 8-device worker did not report {case}:\n{log[-3000:]}"
    assert got[case]["ok"], got[case]["error"]


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed_trainer")
    proc = subprocess.run([sys.executable, str(WORKER), "trainer", str(out)], env=worker_env(),
                          capture_output=True, text=True, timeout=900)
    return cases_of(proc.stdout), proc.stderr


@pytest.mark.slow  # ~110 CPU s: GRPO compiled for three meshes
@pytest.mark.parametrize("case", TRAINER_CASES)
def test_grpo_trainer_across_meshes(trainer_results, case):
    got, log = trainer_results
    assert case in got, f"the trainer worker did not report {case}:\n{log[-3000:]}"
    assert got[case]["ok"], got[case]["error"]


# ---------------------------------------------------------------------- launch settings


@pytest.fixture
def clean_env(monkeypatch):
    for var in (*distributed.ENV, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_launch_settings_from_flags_env_and_clusters(clean_env):
    assert distributed.launch_settings() is None  # one process: nothing to start
    assert distributed.launch_settings(num_processes=1) is None
    assert distributed.launch_settings("h:1234", 2, 1) == {
        "coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:8476")
    clean_env.setenv("JAX_NUM_PROCESSES", "4")
    clean_env.setenv("JAX_PROCESS_ID", "3")
    assert distributed.launch_settings() == {
        "coordinator_address": "10.0.0.1:8476", "num_processes": 4, "process_id": 3}
    assert distributed.launch_settings(process_id=0)["process_id"] == 0  # flags first
    for var in distributed.ENV:
        clean_env.delenv(var)
    clean_env.setenv("SLURM_NTASKS", "2")
    assert distributed.launch_settings() == {}  # JAX detects SLURM itself
    clean_env.setenv("SLURM_NTASKS", "1")
    assert distributed.launch_settings() is None


@pytest.mark.parametrize("kwargs, env, words", [
    ({"coordinator": "h:1234", "num_processes": 2, "process_id": 2}, {}, "--process-id"),
    ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, {},
     "--coordinator-address"),
    ({"num_processes": 0}, {}, "--num-processes (JAX_NUM_PROCESSES) must be >= 1"),
    ({"coordinator": "h:1"}, {}, "needs --num-processes (JAX_NUM_PROCESSES), --process-id"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "must be an integer"),
])
def test_bad_launch_settings_are_one_line_errors(clean_env, kwargs, env, words):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=None) as err:
        distributed.launch_settings(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value), err.value


def test_one_process_is_main_without_jax_distributed():
    assert distributed.is_main() and distributed.process_index() == 0
    assert distributed.process_count() == 1 and not distributed.is_multiprocess()
    distributed.barrier("nothing to wait for")
    assert distributed.broadcast_flag(True) is True
