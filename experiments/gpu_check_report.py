"""The markdown report of ``experiments/gpu_check.py``: one summary table, then the parts'."""

from __future__ import annotations


def _f(value, fmt: str = ".2f", scale: float = 1.0) -> str:
    if value is None or value == "":
        return "-"
    try:
        return format(float(value) * scale, fmt)
    except (TypeError, ValueError):
        return str(value)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda c: " ".join(str(c).split()).replace("|", "/")
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def _header(meta: dict) -> list[str]:
    dev = meta.get("device") or {}
    ver = meta.get("versions") or {}
    cuda = meta.get("cuda") or {}
    plugin = next((f"{k} {v}" for k, v in ver.items() if "plugin" in k and v), "no CUDA plugin")
    lines = [f"# GPU check ({meta.get('mode')}): {dev.get('device_kind', '?')}", "",
             f"- date {meta.get('date')}, commit `{meta.get('commit')}`, "
             f"total {meta.get('total_s')} s of a {meta.get('budget_s'):.0f} s budget",
             f"- command: `{meta.get('command')}`",
             f"- device: {dev.get('count', '?')} x {dev.get('device_kind', '?')} "
             f"({dev.get('platform', '?')}), compute capability "
             f"{dev.get('compute_capability') or '-'}, memory limit "
             f"{_f(dev.get('memory_bytes_limit'), '.1f', 2**-30)} GiB",
             f"- versions: python {ver.get('python')}, jax {ver.get('jax')}, jaxlib "
             f"{ver.get('jaxlib')}, {plugin}, flax {ver.get('flax')}, optax {ver.get('optax')}, "
             f"transformers {ver.get('transformers')}"
             + (f"; CUDA runtime {cuda.get('cuda_runtime')}, cuDNN {cuda.get('cudnn')}"
                if cuda else ""), ""]
    if meta.get("missing_optional"):
        lines[-1:] = [f"- optional packages missing: {', '.join(meta['missing_optional'])}", ""]
    if meta.get("sparsejax_warning"):
        lines[-1:] = [f"- warning: {meta['sparsejax_warning']}", ""]
    return lines


def _optimizer(rec: dict) -> list[str]:
    rows = []
    for r in rec.get("rows", []):
        rows.append([r.get("preset"), _f(r.get("density"), ".1%"), f"{r.get('k', 0):,}",
                     r.get("method"), r.get("backend"), _f(r.get("ms"), ".3f"),
                     _f(r.get("speedup"), ".1f") + "x" if r.get("speedup") else "-",
                     _f(r.get("model_bytes"), ".4g", 1e-6), _f(r.get("gbps"), ".4g"),
                     _f(r.get("fraction_of_hbm"), ".0%"), r.get("error", "")[:80]])
    return [f"HBM reference {_f(rec.get('hbm_gbps'), '.0f')} GB/s ({rec.get('hbm_source')}); "
            f"{rec.get('method', '')}; median of {rec.get('steps')} steps.", ""] + _table(
        ["preset", "density", "k", "method", "backend", "ms/step", "vs optax", "model MB",
         "GB/s", "of HBM", "error"], rows)


def _sampler(rec: dict) -> list[str]:
    rows = [[r.get("label"), _f(r.get("tokens_per_s"), ".0f"), _f(r.get("decode_step_ms")),
             _f(r.get("floor_step_ms")), _f(r.get("decode_fraction_of_roofline"), ".0%"),
             _f(r.get("prefill_tokens_per_s"), ".0f"),
             _f(r.get("prefill_fraction_of_matmul"), ".0%"), _f(r.get("compile_s"), ".1f")]
            for r in rec.get("rows", [])]
    return ([f"`{rec.get('command', '')}`; read bandwidth "
             f"{_f(rec.get('bandwidth_gbps'), '.0f')} GB/s", ""]
            + _table(["sampler", "useful tok/s", "decode step ms", "floor ms", "of roofline",
                      "prefill tok/s", "prefill of bf16 matmul", "compile s"], rows))


def _grpo(records: list[dict]) -> list[str]:
    rows = []
    for rec in records:
        for r in rec.get("rows", []):
            rows.append([rec.get("variant", rec["part"]), r["step"] if not r.get(
                "includes_compile") else f"{r['step']} (compile)", _f(r.get("step_s")),
                _f(r.get("generation_s")), _f(r.get("reference_s")), _f(r.get("backward_s")),
                _f(r.get("optimizer_s"), ".3f"), _f(r.get("other_s")),
                _f(r.get("peak_memory_bytes"), ".2f", 2**-30), _f(r.get("tokens_per_s"), ".0f"),
                f"{rec.get('trainable', 0):,}", _f(rec.get("optimizer_state_bytes"), ".1f",
                                                   2**-20)])
    lines = _table(["run", "step", "step s", "generation", "reference", "backward",
                    "optimizer", "other", "peak GiB", "gen tok/s", "trainable", "opt state MiB"],
                   rows)
    steady = {rec.get("variant"): rec["rows"][-1] for rec in records if rec.get("rows")}
    if "sparse" in steady and "full" in steady:
        s, f = steady["sparse"], steady["full"]
        ratio = lambda k: _f(f[k] / s[k], ".2f") + "x" if s.get(k) and f.get(k) else "-"
        lines += [f"full / sparse (last step): step {ratio('step_s')}, backward "
                  f"{ratio('backward_s')}, optimizer {ratio('optimizer_s')}, peak memory "
                  f"{ratio('peak_memory_bytes')}", ""]
    return lines


def _grpo_step(rec: dict) -> list[str]:
    rows = [[r.get("arm"), _f(r.get("step_s_median")), _f(r.get("first_step_s"), ".1f"),
             _f(r.get("sample_s_median")), _f(r.get("compile_s_later"), ".1f"),
             _f(r.get("completion_tokens_per_s"), ".0f"),
             _f(r.get("ratio_to_trl"), ".2f") + ("x" if r.get("ratio_to_trl") else "")]
            for r in rec.get("rows", [])]
    return [f"`{rec.get('command', '')}`; model: {rec.get('model')}", ""] + _table(
        ["arm", "step s (median)", "first step s", "sampling s", "later compile s",
         "completion tok/s", "vs TRL"], rows) + [f"- {n}" for n in rec.get("notes", [])]


def _train_step(rec: dict) -> list[str]:
    rows = [[r.get("method"), _f(r.get("density"), ".1%"), f"{r.get('k') or 0:,}",
             _f(r.get("ms"), ".1f"), _f(r.get("speedup_vs_dense"), ".2f"),
             _f(r.get("peak_bytes"), ".1f", 2**-20)] for r in rec.get("rows", [])]
    return [f"`{rec.get('command', '')}`", ""] + _table(
        ["method", "density", "k", "ms", "vs dense", "compiled peak MiB"], rows)


def markdown(meta: dict, records: list[dict]) -> str:
    """The report: header (device, versions, date, commit), one row per part, details."""
    lines = _header(meta) + _table(
        ["part", "status", "time s", "timeout s", "summary"],
        [[r["part"], r["status"], _f(r.get("seconds"), ".1f"), _f(r.get("timeout_s"), ".0f"),
          r.get("summary", "")] for r in records])
    by = {r["part"]: r for r in records}
    if by.get("optimizer", {}).get("rows"):
        lines += ["## optimizer step", ""] + _optimizer(by["optimizer"])
    if by.get("sampler", {}).get("rows"):
        lines += ["## sampler", ""] + _sampler(by["sampler"])
    grpo = [r for r in records if r["part"].partition(":")[0] == "grpo" and r.get("rows")]
    if grpo:
        lines += ["## GRPO step (phases in s)", ""] + _grpo(grpo)
    if by.get("grpo_step", {}).get("rows"):
        lines += ["## whole GRPO step vs TRL", ""] + _grpo_step(by["grpo_step"])
    if by.get("train_step", {}).get("rows"):
        lines += ["## train step", ""] + _train_step(by["train_step"])
    failed = by.get("tests", {}).get("failed_tests")
    if failed:
        lines += ["## failed gpu tests", ""] + [f"- `{t}`" for t in failed] + [""]
    notes = [(r["part"], n) for r in records for n in r.get("notes", [])]
    problems = [(r["part"], r.get("error") or "\n".join(r.get("log_tail", [])[-3:]))
                for r in records if r["status"] in ("failed", "timeout")]
    if notes or problems:
        lines += ["## notes", ""] + [f"- {p}: {n}" for p, n in notes]
        lines += [f"- {p} ({'error'}): {e.splitlines()[0] if e else '?'}" for p, e in problems]
        lines.append("")
    return "\n".join(lines)
