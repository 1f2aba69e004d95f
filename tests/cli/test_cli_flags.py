"""The command line generated from the settings dataclasses (sparsejax.cli.flags), the
``--config`` file and the run folder's ``config.yaml`` (sparsejax.cli.config_file), and
the ``sparsejax`` console command. In-process and cheap; one subprocess opens a run
folder for real."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from sparsejax.cli import config_file, dpo, grpo, tasks
from sparsejax.cli import main as console
from sparsejax.cli.flags import FILE_SOURCES, add_flags, build, flag_message, specs
from sparsejax.cli.settings import (
    TASK_NAMES,
    DPODataArgs,
    GRPODataArgs,
    ModelArgs,
    OutputArgs,
    ProcessArgs,
    TaskDataArgs,
)
from sparsejax.config import AdapterConfig, DPOConfig, GRPOConfig, RunConfig, TrainableConfig, names
from sparsejax.config.adapter import ADAPTERS
from sparsejax.config.trainable import SPARSE_GRADS

from paths import REPO

ROOT = REPO

COMMON = (ModelArgs, TrainableConfig, AdapterConfig, OutputArgs, ProcessArgs)
PARSERS = {  # name -> (parser, the dataclasses whose flags it has)
    "grpo": (grpo.build_parser, (GRPOConfig, GRPODataArgs, *COMMON)),
    "grpo_gsm8k": (lambda: grpo.build_parser("gsm8k"), (GRPOConfig, TaskDataArgs, *COMMON)),
    "dpo": (dpo.build_parser, (DPOConfig, DPODataArgs, *COMMON)),
}


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions
            if a.dest not in ("help", "config")}


# ---------------------------------------------------------------------- defaults, choices


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_is_a_field_with_its_default_and_choices(name):
    make, classes = PARSERS[name]
    parser = make()
    acts = actions(parser)
    parsed = parser.parse_args([])
    seen = set()
    for cls in classes:
        for field in dataclasses.fields(cls):
            if not field.metadata.get("cli", True):
                assert not any(getattr(a, "flag_spec", None) and a.flag_spec.field == field.name
                               and a.flag_spec.owner is cls for a in acts.values())
                continue
            spec = next(s for s in specs(cls) if s.field == field.name)
            action = acts[spec.dest]
            assert spec.flag in action.option_strings, (cls, field.name)
            assert action.default == field.default, (cls, field.name, action.default)
            assert getattr(parsed, spec.dest) == field.default, (cls, field.name)
            want = field.metadata.get("choices")
            assert (None if action.choices is None else tuple(action.choices)) == want
            assert field.metadata["help"].split()[0] in action.help
            seen.add(spec.dest)
    assert seen == set(acts), set(acts) ^ seen  # no flag declared outside a dataclass
    # The defaults build the dataclasses' own defaults.
    for cls in (GRPOConfig, TrainableConfig, AdapterConfig, DPOConfig, ModelArgs, OutputArgs,
                ProcessArgs, DPODataArgs):
        if cls in classes:
            assert build(cls, parsed) == cls(), cls


def test_choices_are_the_library_constants():
    from sparsejax.data.presets import TASKS
    from sparsejax.models.config import SUPPORTED_MODEL_TYPES
    g, d = actions(grpo.build_parser()), actions(dpo.build_parser())
    assert tuple(g["loss_type"].choices) == names.GRPO_LOSS_TYPES
    assert tuple(d["loss_type"].choices) == names.DPO_LOSS_TYPES
    assert tuple(g["advantage_scale"].choices) == names.ADVANTAGE_SCALES
    assert tuple(g["advantage_estimator"].choices) == names.ADVANTAGE_ESTIMATORS
    assert tuple(g["importance_sampling_level"].choices) == names.IMPORTANCE_SAMPLING_LEVELS
    assert tuple(g["lr_scheduler_type"].choices) == tuple(d["lr_scheduler_type"].choices) == (
        names.LR_SCHEDULER_TYPES)
    assert tuple(g["remat"].choices) == tuple(d["remat"].choices) == names.REMAT_POLICIES
    assert tuple(g["backend"].choices) == names.BACKENDS
    assert tuple(g["mask_strategy"].choices) == ("auto", *names.MASK_STRATEGIES)
    assert tuple(g["sparse_grads"].choices) == SPARSE_GRADS
    assert tuple(g["adapter"].choices) == ADAPTERS
    assert tuple(g["task"].choices) == TASK_NAMES == tuple(TASKS)
    assert names.MODEL_TYPES == tuple(SUPPORTED_MODEL_TYPES)


def test_the_old_command_lines_defaults_live_in_the_dataclasses():
    args = grpo.parse_args([])
    assert (args.eval_every, args.save_every, args.lr) == (25, 10, None)
    assert build(TrainableConfig, args).learning_rate == 1e-4
    assert build(TrainableConfig, grpo.parse_args(["--sparsity", "0"])).learning_rate == 1e-6
    assert args.out_dir == "runs/grpo_gsm8k" and args.task == "gsm8k" and args.progress
    assert grpo.parse_args(["--dataset", "x.jsonl", "--reward", "exact"]).out_dir == "runs/grpo"
    d = dpo.parse_args([])
    assert d.eval_limit == 256 and d.out_dir == "runs/dpo"
    assert dpo.parse_args(["--eval-limit", "none"]).eval_limit is None


def test_flag_types_none_bools_and_repeats():
    args = grpo.parse_args(["--lr", "none", "--epsilon-high", "None", "--no-kl-bias-correction",
                            "--no-progress", "--reward", "exact", "--reward", "format=0.1",
                            "--resume", "--lora-rslora", "--eval-limit", "7"])
    assert args.lr is None and args.epsilon_high is None and args.kl_bias_correction is False
    assert args.progress is False and args.resume is True and args.lora_rslora is True
    assert args.reward == ["exact", "format=0.1"] and args.eval_limit == 7
    assert build(GRPODataArgs, args).reward == ("exact", "format=0.1")
    assert dpo.parse_args(["--reference-free"]).reference_free is True
    assert dpo.parse_args(["--reference-free", "--no-reference-free"]).reference_free is False
    with pytest.raises(SystemExit):
        grpo.parse_args(["--steps", "none"])  # not optional: "none" is no int


def test_demo_presets_are_flags_and_flags_beside_demo_win():
    dests = set(actions(grpo.build_parser()))
    assert set(tasks.DEMO) <= dests
    args = grpo.parse_args(["--demo", "--steps", "6", "--reward", "exact"])
    assert args.steps == 6 and args.lr == 1e-2 and args.out_dir == "runs/grpo_demo"
    assert args.reward == ["exact"]  # replaces the demo's reward (not appended to it)
    assert grpo.parse_args(["--demo"]).reward == [tasks.DEMO_REWARD]


# ---------------------------------------------------------------------- field errors -> flags


def test_field_errors_name_flags():
    cases = [(TrainableConfig, ["--lr", "-1"], "--lr must be a finite number in (0, inf)"),
             (TrainableConfig, ["--sparsity", "1"], "--sparsity must be"),
             (GRPOConfig, ["--micro-batch-size", "7"],
              "--prompts-per-step * --num-generations must be a multiple of --micro-batch-size"),
             (GRPOConfig, ["--seed", "-1"], "--seed must be >= 0, got -1"),
             (AdapterConfig, ["--adapter", "partial-lora"],
              "--adapter partial-lora needs --lora-ratios"),
             (AdapterConfig, ["--adapter", "lora", "--lora-ratios", "r.json"],
              "--lora-ratios needs --adapter partial-lora or targeted-lora"),
             (GRPODataArgs, ["--dataset", "d.jsonl"], "--dataset without --task needs --reward"),
             (OutputArgs, ["--resume", "--overwrite"], "--resume and --overwrite exclude")]
    for cls, argv, needle in cases:
        with pytest.raises(ValueError) as err:
            build(cls, grpo.parse_args(argv))
        assert str(err.value).startswith(needle), (argv, str(err.value))
    with pytest.raises(ValueError, match=r"^--batch-size \(3\) must be a multiple of "
                                         r"--micro-batch-size \(4\)"):
        build(DPOConfig, dpo.parse_args(["--batch-size", "3"]))
    with pytest.raises(ValueError, match=r"^--label-smoothing must be 0 for --loss-type 'hinge'"):
        build(DPOConfig, dpo.parse_args(["--loss-type", "hinge", "--label-smoothing", "0.1"]))


def test_flag_message_leaves_values_and_other_words_alone():
    msg = "mask_strategy must be one of auto, per_tensor; got 'seed' (a seeds' learning_rate)"
    assert flag_message(msg, [TrainableConfig, RunConfig]) == (
        "--mask-strategy must be one of auto, per_tensor; got 'seed' (a seeds' --lr)")
    assert flag_message("learning_rate must be > 0", [TrainableConfig],
                        {"lr": "run.yaml"}) == "lr (in run.yaml) must be > 0"


def test_every_flag_name_is_unique_across_a_commands_dataclasses():
    for name, (make, classes) in PARSERS.items():
        flags = [s.flag for cls in classes for s in specs(cls)]
        assert len(flags) == len(set(flags)), name
        make()  # argparse itself refuses a flag added twice


def test_a_dataclass_gets_one_argument_group_per_title():
    parser = argparse.ArgumentParser()
    add_flags(parser, GRPOConfig, "GRPO", groups={RunConfig: "run"})
    groups = {g.title: {a.dest for a in g._group_actions}
              for g in parser._action_groups if g.title in ("GRPO", "run")}
    assert groups["run"] == {s.dest for s in specs(RunConfig)}
    assert groups["GRPO"] == {s.dest for s in specs(GRPOConfig)} - groups["run"]


# ---------------------------------------------------------------------- --config


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_config_file_sets_values_and_flags_override_it(tmp_path):
    path = write(tmp_path / "run.yaml", "lr: 1e-3\nsteps: 7\nreport_to: jsonl,tensorboard\n"
                 "kl_bias_correction: false\nreward: [exact, format=0.1]\nepsilon_high: null\n"
                 "max-new-tokens: 9\nmask_path: none\n")
    args = grpo.parse_args(["--config", path, "--dataset", "d.jsonl"])
    assert args.lr == 1e-3 and isinstance(args.lr, float) and args.steps == 7
    assert args.report_to == "jsonl,tensorboard" and args.kl_bias_correction is False
    assert args.reward == ["exact", "format=0.1"] and args.max_new_tokens == 9
    assert args.epsilon_high is None and args.mask_path is None
    over = grpo.parse_args(["--config", path, "--steps", "3", "--reward", "gsm8k",
                            "--kl-bias-correction"])
    assert over.steps == 3 and over.reward == ["gsm8k"] and over.kl_bias_correction is True
    assert over.lr == 1e-3
    assert getattr(over, FILE_SOURCES) == {d: path for d in (
        "lr", "report_to", "epsilon_high", "max_new_tokens", "mask_path")}
    # A value from the file that a dataclass refuses names the key and the file.
    bad = grpo.parse_args(["--config", write(tmp_path / "neg.yaml", "lr: -1\n")])
    with pytest.raises(ValueError, match=r"^lr \(in .*neg.yaml\) must be"):
        build(TrainableConfig, bad)
    # The file sits between --demo's presets and the flags.
    demo = grpo.parse_args(["--demo", "--config", write(tmp_path / "d.yaml", "steps: 5\n"
                                                        "reward: exact\n")])
    assert demo.steps == 5 and demo.lr == 1e-2 and demo.reward == ["exact"]
    on = grpo.parse_args(["--config", write(tmp_path / "on.yaml", "demo: true\n")])
    assert on.demo and on.steps == 60 and on.out_dir == "runs/grpo_demo"


def test_dpo_loss_combinations_from_flags_and_files(tmp_path):
    """``--loss-type`` repeats (the values given replace the default ``sigmoid``), with
    one ``--loss-weights`` each; a file gives lists; a mismatch is one line."""
    assert build(DPOConfig, dpo.parse_args([])).loss_type == ("sigmoid",)
    assert dpo.parse_args(["--loss-type", "ipo"]).loss_type == ["ipo"]  # not appended
    mpo = build(DPOConfig, dpo.parse_args([
        "--loss-type", "sigmoid", "--loss-type", "bco_pair", "--loss-type", "sft",
        "--loss-weights", "0.8", "--loss-weights", "0.2", "--loss-weights", "1"]))
    assert mpo.loss_type == ("sigmoid", "bco_pair", "sft") and mpo.loss_weights == (0.8, 0.2, 1.0)
    assert mpo.needs_reference
    path = write(tmp_path / "simpo.yaml", "loss_type: [simpo, sft]\nloss_weights: [1, 0.5]\n"
                 "simpo_gamma: 0.8\nld_alpha: 0.3\n")
    simpo = build(DPOConfig, dpo.parse_args(["--config", path]))
    assert simpo.loss_type == ("simpo", "sft") and simpo.loss_weights == (1.0, 0.5)
    assert simpo.simpo_gamma == 0.8 and simpo.ld_alpha == 0.3 and not simpo.needs_reference
    orpo = build(DPOConfig, dpo.parse_args(["--config", path, "--loss-type", "orpo",
                                            "--loss-weights", "2"]))
    assert orpo.loss_type == ("orpo",) and orpo.loss_weights == (2.0,)
    assert DPOConfig(loss_type="robust").loss_type == ("robust",)  # a string is one loss
    with pytest.raises(ValueError) as e:
        build(DPOConfig, dpo.parse_args(["--loss-type", "sigmoid", "--loss-type", "sft",
                                         "--loss-weights", "1"]))
    assert str(e.value).startswith("--loss-weights has 1 weights for 2 loss types (sigmoid+sft "
                                   "in --loss-type)"), e.value
    bad = write(tmp_path / "bad.yaml", "loss_type: [simpo, sft]\nloss_weights: [1]\n")
    with pytest.raises(ValueError) as e:
        build(DPOConfig, dpo.parse_args(["--config", bad]))
    assert "\n" not in str(e.value) and f"loss_weights (in {bad}) has 1 weights" in str(e.value)


@pytest.mark.parametrize("text, needle", [
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("stepz: 1\n", "unknown key 'stepz' (did you mean 'steps'?)"),
    ("lr: abc\n", "lr: expected a number, got 'abc'"),
    ("steps: 1.5\n", "steps: expected an integer, got 1.5"),
    ("steps: true\n", "steps: expected an integer, got True"),
    ("resume: 3\n", "resume: expected true or false, got 3"),
    ("loss_type: nope\n", "loss_type: 'nope' is not one of grpo, bnpo, dr_grpo, dapo"),
    ("steps: null\n", "steps: expected an integer, got null"),
    ("- a\n", "not a mapping"),
    ("lr: [1\n", "not valid YAML"),
])
def test_bad_config_files_fail_in_one_line_naming_key_and_file(tmp_path, capsys, text, needle):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(["--config", path, "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and path in lines[0], lines
    assert needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dpo.main(["--config", str(tmp_path / "none.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.yaml" in err[0] and "cannot read" in err[0], err


@pytest.mark.parametrize("job, argv", [
    ("grpo", ["--demo", "--steps", "6", "--reward", "exact", "--reward", "format=0.1",
              "--lr", "3e-3", "--no-progress", "--mesh", "auto", "--epsilon-high", "0.3"]),
    ("grpo_gsm8k", ["--data-dir", "somewhere", "--system-prompt", "Be brief.", "--sparsity",
                    "0", "--report-to", "none"]),
    ("dpo", ["--eval-limit", "none", "--reference-free", "--loss-type", "ipo", "--adapter",
             "lora", "--lora-rank", "2", "--eval-split", ""]),
])
def test_saved_settings_reparse_to_the_same_settings(tmp_path, job, argv):
    parse = {"grpo": grpo.parse_args, "dpo": dpo.parse_args,
             "grpo_gsm8k": lambda a: grpo.parse_args(a, task="gsm8k")}[job]
    args = parse(argv)
    path = config_file.save(args, str(tmp_path))
    saved = yaml.safe_load(Path(path).read_text())
    assert saved == config_file.settings(args)
    assert set(saved) == set(actions({"grpo": grpo.build_parser, "dpo": dpo.build_parser,
                                      "grpo_gsm8k": lambda: grpo.build_parser("gsm8k")}[job]()))
    again = parse(["--config", path])
    assert config_file.settings(again) == config_file.settings(args)
    for cls in (TrainableConfig, AdapterConfig, OutputArgs):
        assert build(cls, again) == build(cls, args)


def test_a_run_folder_gets_its_config_yaml_after_the_lock(tmp_path):
    """open_out_dir (lock, earlier outputs, then config.yaml on process 0), in a process of
    its own (it installs signal handlers); --config of the file gives the same settings."""
    out = tmp_path / "run"
    argv = ["--demo", "--steps", "4", "--out-dir", str(out), "--reward", "exact"]
    code = ("import sys, json\n"
            "from sparsejax.cli import grpo, training, config_file\n"
            f"args = grpo.parse_args({argv!r})\n"
            "print(json.dumps([training.open_out_dir(args), config_file.settings(args)]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished, settings = json.loads(proc.stdout.strip().splitlines()[-1])
    assert finished is False and (out / ".lock").exists()
    text = (out / "config.yaml").read_text()
    assert text.startswith("# The resolved settings of this run")
    again = grpo.parse_args(["--config", str(out / "config.yaml")])
    assert config_file.settings(again) == settings
    assert settings["steps"] == 4 and settings["lr"] == 1e-2 and settings["reward"] == ["exact"]


# ---------------------------------------------------------------------- the console command


def test_console_command(capsys):
    assert console.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("grpo", "dpo", "lora", "analysis"))
    assert console.main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    assert console.main([]) == 2
    for name in ("grpo", "dpo"):
        with pytest.raises(SystemExit) as exit_info:
            console.main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: sparsejax {name}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        console.main(["dpo", "--loss-type", "bogus"])
    assert exit_info.value.code == 2
    import importlib
    for module, function, _ in console.COMMANDS.values():
        assert callable(getattr(importlib.import_module(module), function))
    with pytest.raises(SystemExit) as exit_info:
        console.main(["analysis", "--help"])
    assert exit_info.value.code == 0 and "overlap" in capsys.readouterr().out


def test_pyproject_installs_the_command_and_pyyaml():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["sparsejax"] == "sparsejax.cli.main:main"
    assert any(d.replace(" ", "").startswith("pyyaml>=6") for d in project["dependencies"])
