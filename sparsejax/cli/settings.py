"""The command line's own settings (beyond the library's configs), declared as the configs
are (:func:`sparsejax.config.setting`), so every flag is generated the same way
(:mod:`sparsejax.cli.flags`): the model, where the data come from, the run folder and
the processes of a many-host launch. Standard library only.
"""

from __future__ import annotations

import dataclasses

from sparsejax.config.fields import check_choice, check_fields, setting

DTYPES = ("bfloat16", "float32")
TASK_NAMES = ("gsm8k", "math", "arithmetic")  # sparsejax.data.presets.TASKS (a test checks they agree)
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """The model and tokenizer a run starts from."""

    model: str = setting(DEFAULT_MODEL,
                         "Hugging Face hub id or local folder (config.json + safetensors)")
    tokenizer: str | None = setting(None, "tokenizer hub id or folder (default: the model's)")
    dtype: str = setting("bfloat16", "parameter dtype", choices=DTYPES)

    def __post_init__(self):
        check_choice("dtype", self.dtype, DTYPES)


@dataclasses.dataclass(frozen=True)
class OutputArgs:
    """The run folder and where the metrics go."""

    out_dir: str | None = setting(
        None, "the run folder: metrics.jsonl, checkpoints/, curves.png, final_eval.json, "
        "final_model/, config.yaml (default: runs/<job>)")
    resume: bool = setting(
        False, "continue from the newest intact checkpoint in --out-dir (a finished run: "
        "nothing to do)")
    overwrite: bool = setting(False, "replace an earlier run's outputs in --out-dir")
    progress: bool = setting(True, "show a progress bar")
    report_to: str = setting(
        "jsonl", "where metrics go, comma-separated: jsonl (<out-dir>/metrics.jsonl, always "
        "written), tensorboard (<out-dir>/tensorboard/), wandb (needs the wandb package), "
        "none", metavar="WRITERS")

    def __post_init__(self):
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")


@dataclasses.dataclass(frozen=True)
class ProcessArgs:
    """A launch as several processes (hosts): see :mod:`sparsejax.parallel.distributed`
    (SLURM and Open MPI launches are detected)."""

    coordinator_address: str | None = setting(
        None, "process 0's address for jax.distributed (default $JAX_COORDINATOR_ADDRESS; "
        "unset: one process)", metavar="HOST:PORT")
    num_processes: int | None = setting(
        None, "processes of the run (default $JAX_NUM_PROCESSES)")
    process_id: int | None = setting(
        None, "this process's index, 0 writes the run's outputs (default $JAX_PROCESS_ID)")


@dataclasses.dataclass(frozen=True)
class TaskDataArgs:
    """The data of a built-in task (``grpo_gsm8k.py``: its only data flags)."""

    data_dir: str | None = setting(
        None, "folder with the task's train.jsonl/test.jsonl in its fields (default: the hub)")
    train_limit: int | None = setting(None, "use the first N problems")
    system_prompt: str | None = setting(None, "optional system message")
    reward: tuple[str, ...] | None = setting(
        None, "a reward term (repeat, or comma-separate, to sum several): gsm8k, math, exact, "
        "format, module:function or path.py:function (default: the task's)",
        metavar="NAME[=WEIGHT]")

    def __post_init__(self):
        check_fields(self, {"train_limit": {"low": 1, "allow_none": True}})


@dataclasses.dataclass(frozen=True)
class GRPODataArgs(TaskDataArgs):
    """Prompts and gold answers: a built-in task, a hub dataset or a local file."""

    demo: bool = setting(
        False, "the shipped toy addition model and task: the whole run (rollouts, rewards, "
        "sparse steps, checkpoints, evaluation, HF save, plot) in about a minute on a CPU, "
        "nothing downloaded")
    task: str | None = setting(
        None, "a built-in task: its data, instruction and reward (default gsm8k unless "
        "--dataset is given)", choices=TASK_NAMES)
    dataset: str | None = setting(
        None, "training prompts: a hub dataset id or a local .jsonl/.json/.parquet file "
        "(replaces the task's training data)")
    dataset_config: str | None = setting(None, "hub dataset configuration")
    split: str | None = setting(None, "hub split of --dataset (default: train)")
    eval_dataset: str | None = setting(
        None, "evaluation prompts (hub id or local file; default: the task's, or --dataset's "
        "--eval-split, else no evaluation)")
    eval_split: str | None = setting(
        None, "hub split to evaluate on (default: test with --eval-dataset)")
    prompt_field: str | None = setting(
        None, "column of the question text (default: the task's, or prompt)")
    messages_field: str | None = setting(
        None, "instead, a column of chat turns [{role, content}, ...]")
    answer_field: str | None = setting(
        None, "column of the gold answer (default: the task's, or answer)")
    instruction: str | None = setting(
        None, "text put on its own line after the question (default: ask for the final "
        "answer in \\boxed{}; '' for none)")

    def __post_init__(self):
        super().__post_init__()
        if self.task is not None:
            check_choice("task", self.task, TASK_NAMES)
        if self.dataset is not None and self.data_dir is not None:
            raise ValueError("dataset and data_dir exclude each other (data_dir holds a "
                             "preset's train.jsonl/test.jsonl)")
        if self.messages_field is not None and self.prompt_field is not None:
            raise ValueError("messages_field and prompt_field exclude each other")
        if self.task is None and not self.reward:
            raise ValueError("dataset without task needs reward (gsm8k, math, exact, "
                             "format, module:function or path.py:function)")


@dataclasses.dataclass(frozen=True)
class DPODataArgs:
    """Preference pairs: a hub dataset, a .jsonl file or a folder of ``<split>.jsonl``."""

    dataset: str = setting(
        "trl-lib/ultrafeedback_binarized", "hub dataset id (datasets.load_dataset), a .jsonl "
        "file, or a folder with <split>.jsonl [and <eval-split>.jsonl]")
    split: str = setting("train", "training split")
    eval_split: str = setting(
        "test", "evaluation split ('' for none; a single .jsonl file has none)")
    limit: int | None = setting(None, "use only the first N pairs")

    def __post_init__(self):
        check_fields(self, {"limit": {"low": 1, "allow_none": True}})


@dataclasses.dataclass(frozen=True)
class KTODataArgs(DPODataArgs):
    """Labelled examples (``prompt``, ``completion``, ``label``; preference pairs are
    unpaired): a hub dataset, a .jsonl file or a folder of ``<split>.jsonl``."""

    dataset: str = setting(
        "trl-lib/kto-mix-14k", "hub dataset id (datasets.load_dataset), a .jsonl file, or a "
        "folder with <split>.jsonl [and <eval-split>.jsonl]")
    limit: int | None = setting(None, "use only the first N rows")
