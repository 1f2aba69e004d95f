"""Runs that survive: verified checkpoints with fallback, identity checks, torn metrics,
the out-dir lock, full disks, clean stops, flag checks, and a randomized
kill-and-resume of experiments/grpo_gsm8k.py compared bit for bit with an
uninterrupted run (tiny random Qwen2, CPU)."""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparsejax.runs import checkpoint as ckpt_lib
from sparsejax.runs import run_dir, signals
from sparsejax.runs.reporting import MetricsLog, read_metrics

from paths import REPO

ROOT = REPO
SHARED = ROOT.parent / "shared"
SCRIPT = ROOT / "experiments" / "grpo_gsm8k.py"


# ---------------------------------------------------------------------- checkpoints


def random_tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": {"w": rng.standard_normal((64, 32)).astype(np.float32),
                       "b": rng.standard_normal(32).astype(np.float32),
                       "frozen": np.zeros((0,), np.float32)},
            "step": np.asarray(seed, np.int64)}


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def damage(path: Path, how: str) -> None:
    if how == "flip":
        data = bytearray(path.read_bytes())
        i = len(data) // 2
        data[i:i + 8] = bytes(b ^ 0xFF for b in data[i:i + 8])
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 3])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "missing"])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, how):
    mgr = ckpt_lib.CheckpointManager(tmp_path / "ckpt", keep=3)
    trees = {s: random_tree(s) for s in (1, 2)}
    for s, tree in trees.items():
        mgr.save(s, tree, identity={"config": {"seed": 0}})
    damage(largest_file(tmp_path / "ckpt" / "2" / "state"), how)
    said = []
    with pytest.raises(ckpt_lib.CheckpointError, match="damaged"):
        mgr.restore(2, random_tree(0))
    step, got = mgr.restore_latest(random_tree(0), report=said.append)
    assert step == 1 and len(said) == 1 and "checkpoint" in said[0] and "falling back to "
    assert "damaged" in said[0] and "\n" not in said[0], said
    np.testing.assert_array_equal(got["params"]["w"], trees[1]["params"]["w"])
    assert got["params"]["frozen"].shape == (0,)


def test_incomplete_or_all_damaged_checkpoints(tmp_path):
    mgr = ckpt_lib.CheckpointManager(tmp_path / "ckpt")
    assert mgr.restore_latest(random_tree(0)) is None  # nothing saved: a fresh start
    mgr.save(1, random_tree(1))
    mgr.save(2, random_tree(2))
    (tmp_path / "ckpt" / "2" / ckpt_lib.MANIFEST).unlink()  # killed before the manifest
    said = []
    step, _ = mgr.restore_latest(random_tree(0), report=said.append)
    assert step == 1 and "incomplete" in said[0]
    damage(largest_file(tmp_path / "ckpt" / "1" / "state"), "flip")
    with pytest.raises(ckpt_lib.CheckpointError, match="no intact checkpoint") as err:
        mgr.restore_latest(random_tree(0), report=said.append)
    assert "\n" not in str(err.value)


def test_identity_mismatch_is_refused_naming_the_flags(tmp_path):
    mgr = ckpt_lib.CheckpointManager(tmp_path / "ckpt")
    stored = {"dtype": ["bfloat16"], "sparse": {"mask_seed": 0, "sparsity": 0.99},
              "config": {"steps": 10, "seed": 0}, "run": {"model": "a"}}
    mgr.save(1, random_tree(1), identity=stored)
    now = {"dtype": ["float32"], "sparse": {"mask_seed": 1, "sparsity": 0.99},
           "config": {"steps": 50, "seed": 0}, "run": {"model": "a"}}
    with pytest.raises(ValueError) as err:
        mgr.restore_latest(random_tree(0), check_identity=lambda ident, where:
                           run_dir.check_identity(ident, now, where))
    msg = str(err.value)
    assert "--mask-seed" in msg and "--dtype" in msg and "--steps" not in msg, msg
    assert "\n" not in msg


def test_a_setting_newer_than_the_checkpoint_resumes_at_its_default():
    stored = {"config": {"steps": 10, "seed": 0}}
    defaults = {"config.num_iterations": 1, "config.steps_per_generation": None}
    at_default = {"config": {"steps": 10, "seed": 0, "num_iterations": 1,
                             "steps_per_generation": None}}
    assert run_dir.identity_differences(stored, at_default, defaults) == []
    changed = {"config": {**at_default["config"], "num_iterations": 2}}
    assert run_dir.identity_differences(stored, changed, defaults) == [
        "--num-iterations (checkpoint None, now 2)"]
    # Without the defaults a setting the checkpoint lacks is a difference.
    assert run_dir.identity_differences(stored, at_default) == [
        "--num-iterations (checkpoint None, now 1)"]


def test_full_disk_while_checkpointing_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    mgr = ckpt_lib.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, random_tree(1))
    real_save = ckpt_lib.ocp.StandardCheckpointer.save

    def full(self, directory, *a, **k):
        real_save(self, directory, *a, **k)  # what orbax wrote is then lost to ENOSPC
        raise ValueError("write failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_lib.ocp.StandardCheckpointer, "save", full)
    with pytest.raises(run_dir.DiskFullError, match="no space left") as err:
        mgr.save(2, random_tree(2))
    assert str(tmp_path / "ckpt" / "2") in str(err.value)
    assert mgr.all_steps() == [1]
    step, got = mgr.restore_latest(random_tree(0))
    assert step == 1 and int(got["step"]) == 1


def unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


# ---------------------------------------------------------------------- metrics, lock


def test_torn_last_metrics_line_is_dropped_and_said(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(3):
        log.write({"kind": "train", "step": step, "loss": 0.5 + step})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "st')  # a crash mid-append
    MetricsLog(path, resume_step=2, final_step=5)
    assert "torn last line" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_metrics_write_on_a_full_disk_is_one_error(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(run_dir.DiskFullError, match="no space left.*metrics.jsonl"):
        log.write({"kind": "train", "step": 0})


def test_lock_excludes_a_second_process_and_a_stale_lock_does_not(tmp_path):
    held = tmp_path / "held"
    run_dir.lock(held)
    try:
        code = ("import sys; from sparsejax.runs import run_dir\n"
                "try: run_dir.lock(sys.argv[1])\n"
                "except run_dir.RunError as e: print(e); sys.exit(3)\n")
        other = subprocess.run([sys.executable, "-c", code, str(held)], capture_output=True,
                               text=True, timeout=120)
        assert other.returncode == 3 and f"pid {os.getpid()}" in other.stdout
        stale = tmp_path / "stale"
        stale.mkdir()
        (stale / run_dir.LOCK).write_text("999999\n")  # left by a dead process
        again = subprocess.run([sys.executable, "-c", code, str(stale)], capture_output=True,
                               text=True, timeout=120)
        assert again.returncode == 0, again.stdout
    finally:
        run_dir.unlock(held)


def test_earlier_outputs_are_refused_unless_overwritten(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="metrics.jsonl.*--overwrite"):
        run_dir.refuse_earlier_run(tmp_path)
    run_dir.refuse_earlier_run(tmp_path, overwrite=True)
    assert not (tmp_path / "metrics.jsonl").exists() and (tmp_path / "notes.txt").exists()
    with pytest.raises(ValueError, match="is a file"):
        run_dir.check_out_dir(tmp_path / "notes.txt" / "run")


def test_signal_inside_the_loop_waits_for_the_safe_point():
    saved = []
    old = {s: signal.getsignal(s) for s in signals.EXIT_CODES}
    signals.install()
    try:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler ran and only recorded the request
            with pytest.raises(signals.Interrupted) as err:
                signals.check(7, lambda: saved.append(7))
        assert saved == [7] and err.value.exit_code == 143
        assert err.value.message() == "interrupted at step 7; resume with --resume"
        with pytest.raises(signals.Interrupted):  # outside the loop: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------- the scripts


@pytest.fixture(scope="module")
def cli():
    """experiments/grpo_gsm8k.py imported in-process (flag errors need no interpreter)."""
    spec = importlib.util.spec_from_file_location("grpo_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen2 folder (transformers) with the real tokenizer."""
    from tiny_models import save_tiny_qwen2
    root = tmp_path_factory.mktemp("survival")
    save_tiny_qwen2(root / "model")
    return root


def script_cmd(tiny, out, *extra) -> list[str]:
    return [sys.executable, str(SCRIPT), "--model", str(tiny / "model"),
            "--data-dir", str(SHARED / "data" / "gsm8k"), "--train-limit", "8",
            "--eval-limit", "4", "--prompts-per-step", "2", "--num-generations", "4",
            "--max-new-tokens", "8", "--micro-batch-size", "4", "--generation-batch-size", "8",
            "--eval-batch-size", "4", "--eval-every", "0", "--save-every", "1",
            "--dtype", "float32", "--sparsity", "0.9", "--lr", "1e-2", "--weight-decay", "0.1",
            "--out-dir", str(out), "--no-progress", *map(str, extra)]


def script_env(tiny) -> dict:
    """A persistent compilation cache shared by the runs (speed only)."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tiny / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run(tiny, out, *extra, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(script_cmd(tiny, out, *extra), capture_output=True, text=True,
                          timeout=timeout, env=script_env(tiny))


def weights(out: Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(out / "final_model" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def one_error_line(proc) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def reference(tiny):
    """An uninterrupted 3-step run."""
    out = tiny / "reference"
    proc = run(tiny, out, "--steps", 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("extra,needle", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--save-every", "-1"], "--save-every"),
    (["--top-k", "-1"], "--top-k"), (["--warmup-steps", "-5"], "--warmup-steps"),
    (["--seed", "-1"], "--seed"), (["--top-p", "0"], "--top-p"),
    (["--epsilon", "-1"], "--epsilon"), (["--beta", "-1"], "--beta"),
    (["--eval-limit", "0"], "--eval-limit"), (["--train-limit", "0"], "--train-limit"),
    (["--eval-max-new-tokens", "0"], "--eval-max-new-tokens"),
    (["--mask-path", "MISSING"], "--mask-path"), (["--mask-path", "NOTMASK"], "--mask-path"),
    (["--out-dir", "FILE"], "is a file"), (["--resume", "--overwrite"], "--overwrite"),
    (["--model", "NOTOK"], "no tokenizer files"), (["--model", "BADCONFIG"], "config.json"),
    (["--model", "TRUNCATED"], "truncated"), (["--tokenizer", "NOTOK"], "--tokenizer"),
    (["--data-dir", "EMPTY"], "has no records"), (["--data-dir", "NOTOBJECT"], "train.jsonl:2"),
])
def test_bad_flags_and_files_fail_in_one_line_before_heavy_work(cli, tiny, tmp_path, capsys,
                                                                extra, needle):
    model = tiny / "model"
    bad = {"MISSING": tmp_path / "none.safetensors", "FILE": tmp_path / "file",
           "NOTMASK": tmp_path / "mask.safetensors", "NOTOK": tmp_path / "notok",
           "BADCONFIG": tmp_path / "badcfg", "TRUNCATED": tmp_path / "trunc",
           "EMPTY": tmp_path / "empty", "NOTOBJECT": tmp_path / "notobj"}
    (tmp_path / "file").write_text("x")
    (tmp_path / "mask.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    for name in ("notok", "badcfg", "trunc"):
        (tmp_path / name).mkdir()
        shutil.copy(model / "config.json", tmp_path / name)
        os.symlink(model / "model.safetensors", tmp_path / name / "model.safetensors")
    (tmp_path / "badcfg" / "config.json").write_text("{broken")
    (tmp_path / "trunc" / "model.safetensors").unlink()
    data = (model / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[:len(data) // 2])
    shutil.copy(model / "tokenizer.json", tmp_path / "trunc")
    for name, lines in (("empty", ["\n"]), ("notobj", ['{"question": "q", "answer": "#### 1"}\n',
                                                       "[1, 2]\n"])):
        (tmp_path / name).mkdir()
        for split in ("train", "test"):
            (tmp_path / name / f"{split}.jsonl").write_text("".join(lines))
    extra = [str(bad.get(x, x)) for x in extra]
    argv = ["--model", str(model), "--data-dir", str(SHARED / "data" / "gsm8k"),
            "--out-dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), lines
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_script_model_types_match_the_library(cli):
    from sparsejax.models.config import SUPPORTED_MODEL_TYPES
    assert tuple(sys.modules["sparsejax.cli.checks"].MODEL_TYPES) == tuple(SUPPORTED_MODEL_TYPES)


HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "numpy", "transformers", "datasets",
         "torch", "yaml")


@pytest.mark.parametrize("command", [
    ["experiments/grpo_gsm8k.py"], ["experiments/grpo.py"], ["experiments/dpo.py"],
    ["experiments/toy_rlvr.py"], ["-m", "sparsejax.cli.main"],
    ["-m", "sparsejax.cli.main", "grpo"], ["-m", "sparsejax.cli.main", "dpo"]])
def test_help_answers_without_importing_jax(command):
    """``--help`` of each script and of the ``sparsejax`` command (``python -m
    sparsejax.cli.main``: the console script without reinstalling) imports no jax nor
    any other heavy package: only the command line and the settings of sparsejax."""
    command = [str(ROOT / c) if c.endswith(".py") else c for c in command]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0 and "--" in proc.stdout, proc.stderr[-2000:]
    imported = {l.rsplit("|", 1)[-1].strip() for l in proc.stderr.splitlines() if "|" in l}
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, heavy[:20]
    ours = {m for m in imported if m.split(".")[0] == "sparsejax"}
    assert all(m in ("sparsejax", "sparsejax._lazy") or m.startswith(
        ("sparsejax.cli", "sparsejax.config")) for m in ours), sorted(ours)
    assert seconds < 3.0, seconds  # well under a second on an idle machine


def test_a_second_run_on_a_locked_folder_fails_at_once(tiny, tmp_path):
    out = tmp_path / "locked"
    run_dir.lock(out)
    try:
        proc = run(tiny, out, "--steps", 1, timeout=120)
    finally:
        run_dir.unlock(out)
    assert proc.returncode == 1
    assert one_error_line(proc) == (f"error: {out} is in use by another run (pid {os.getpid()});"
                                    " wait for it or choose another --out-dir")


def test_randomized_kill_and_resume_is_bit_identical(tiny, reference, tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    sig = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
    out = tmp_path / "killed"
    proc = subprocess.Popen(script_cmd(tiny, out, "--steps", 3), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=script_env(tiny))
    first = out / "checkpoints" / "1" / ckpt_lib.MANIFEST
    deadline = time.time() + 400
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 3.0))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    context = f"seed {seed}, signal {sig.name}, rc {proc.returncode}: {err[-2000:]}"
    assert proc.returncode in (0, 130, 143, -9), context
    if proc.returncode in (130, 143):
        assert proc.returncode == signals.EXIT_CODES[sig], context
        last = err.strip().splitlines()[-1]
        assert last.startswith("interrupted at step ") and last.endswith(
            "; resume with --resume"), context
        assert "Traceback" not in err and "Exception in thread" not in err, context
    if not (out / run_dir.FINISHED).exists():
        changed = run(tiny, out, "--steps", 3, "--resume", "--mask-seed", 1)
        assert changed.returncode == 2, changed.stderr[-2000:]
        assert "--mask-seed (checkpoint 0, now 1)" in one_error_line(changed)
    resumed = run(tiny, out, "--steps", 3, "--resume")
    assert resumed.returncode == 0, context + resumed.stderr[-3000:]
    assert_same_weights(weights(reference), weights(out))
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [0, 1, 2], context
    # A finished run: --resume changes nothing; a new run there is refused.
    def files():  # the lock file is rewritten with the pid of whoever holds it
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*")
                if p.is_file() and p.name != run_dir.LOCK}

    before = files()
    again = run(tiny, out, "--steps", 3, "--resume", timeout=120)
    assert again.returncode == 0 and "finished" in again.stderr
    assert before == files()
    fresh = run(tiny, out, "--steps", 3, timeout=120)
    assert fresh.returncode == 2 and "--overwrite" in one_error_line(fresh)


def test_resume_after_the_last_step_with_a_damaged_newest_checkpoint(tiny, reference,
                                                                     tmp_path):
    """Stopped after the final checkpoint (no final model yet), and that checkpoint is
    damaged: the resume says so in one line, redoes the last step from the one before,
    and finishes with the same weights."""
    out = tmp_path / "end"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns(".lock"))
    for name in (run_dir.FINISHED, "final_eval.json"):
        (out / name).unlink()
    shutil.rmtree(out / "final_model")
    damage(largest_file(out / "checkpoints" / "3" / "state"), "flip")
    proc = run(tiny, out, "--steps", 3, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoints/3 is damaged" in warnings[0] \
        and "falling back to checkpoint 2" in warnings[0], warnings
    assert_same_weights(weights(reference), weights(out))
    assert (out / run_dir.FINISHED).exists() and (out / "final_eval.json").exists()


@pytest.mark.skipif(not unshare_works(), reason="needs unshare -rm to mount a small tmpfs")
@pytest.mark.parametrize("size, where, kept", [
    (2500, "checkpoints/2", ["1"]),  # KiB beside the mask file: a checkpoint (~1.7 MB each)
    (6144, "final_model", ["2", "3"]),  # meets the full disk; the final model (~20 MB) does
])
def test_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(tiny, reference,
                                                                       tmp_path, size, where,
                                                                       kept):
    """The out dir on a small tmpfs (a private mount namespace): one line naming the
    path, exit 1, earlier checkpoints intact, and a resume elsewhere (space freed)
    finishes with the weights of an uninterrupted run."""
    mnt, saved = tmp_path / "mnt", tmp_path / "saved"
    mnt.mkdir()
    mask_file = reference / "mask.safetensors"  # written first, as in the reference run
    size = f"{size + (mask_file.stat().st_size // 1024 + 1 if mask_file.exists() else 0)}k"
    cmd = " ".join(f"'{c}'" for c in script_cmd(tiny, mnt / "run", "--steps", 3))
    shell = (f"mount -t tmpfs -o size={size} tmpfs '{mnt}' && {{ {cmd}; rc=$?; "
             f"cp -a '{mnt}/run' '{saved}'; exit $rc; }}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True,
                          text=True, timeout=600, env=script_env(tiny))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert line.startswith("error: no space left on device writing ") and where in line, line
    assert sorted(os.listdir(saved / "checkpoints")) == kept
    assert all((saved / "checkpoints" / s / ckpt_lib.MANIFEST).exists() for s in kept)
    resumed = run(tiny, saved, "--steps", 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(reference), weights(saved))
