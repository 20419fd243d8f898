"""report.md and loss.png for a run, from the files in its run directory alone.

Any file may be missing (a run still preparing, no evaluation yet, no samples): its section then says so,
so the report can be rewritten after every evaluation and once more at the end of `ftjob run`.
The plot uses matplotlib's Figure and Agg canvas directly, never pyplot, so no global backend is touched.
"""
from __future__ import annotations

import html
import io
import math
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

from .humanize import format_duration, megabytes, parse_time
from .rundir import (FINISHED, RunPaths, atomic_write, checkpoint_bytes, complete_checkpoints, measured_figures,
                     read_best, read_json, read_jsonl, read_marker, read_state)

LAST_N = 10  # speed figures average the last N metrics records (the first ones include warm-up)
OUTCOME = {"done": "finished", "trained": "finished training", "generate": "finished training, generating samples",
           "preempted": "preempted", "diverged": "diverged", "failed": "failed"}


def write_report(paths: RunPaths) -> Path:
    """Write report.md and loss.png into the run directory; returns the report's path."""
    plot_loss(paths)
    state, metrics, evals = read_state(paths), read_jsonl(paths.metrics), read_jsonl(paths.evals)
    spec = _load_spec(paths)
    name = spec.name if spec else paths.root.name
    parts = [f"# {name}: {_outcome(state, (paths.samples / 'after.jsonl').exists())}", "",
             f"Run directory `{paths.root}`; report written {time.strftime('%Y-%m-%d %H:%M:%S %z')}.", "",
             *_spec_section(spec, state, read_json(paths.plan)), *_data_section(read_json(paths.manifest)),
             *_training_section(metrics, state), *_validation_section(evals, state, read_best(paths)),
             *_plan_section(read_json(paths.plan), measured_figures(paths, metrics)),
             "## Loss", "", "![loss](loss.png)", "",
             *_samples_section(paths), *_checkpoint_section(paths)]
    atomic_write(paths.report, "\n".join(parts))  # replaced whole: a reader never sees half
    return paths.report


# ---------------------------------------------------------------- plot


def loss_series(paths: RunPaths) -> dict[str, tuple[list[int], list[float]]]:
    """The plotted data: {"train": (steps, losses), "valid": (steps, losses)}; empty lists when not logged."""
    def series(records):  # a diverged run's NaN/inf loss is named in the report, not plotted (it breaks autoscale)
        kept = [r for r in records if r.get("step") is not None and isinstance(r.get("loss"), (int, float))
                and math.isfinite(r["loss"])]
        return [r["step"] for r in kept], [float(r["loss"]) for r in kept]

    subset = [r for r in read_jsonl(paths.evals) if not r.get("full")]  # a final full pass is not comparable
    return {"train": series(read_jsonl(paths.metrics)), "valid": series(subset)}


def plot_loss(paths: RunPaths) -> Path:
    """loss.png: training loss (line) and validation loss (markers) against the optimizer step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = loss_series(paths)
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*data["train"], label="training loss", color="tab:blue", linewidth=1.2)
    ax.plot(*data["valid"], label="validation loss", color="tab:orange", linestyle="none", marker="o")
    if not data["train"][0] and not data["valid"][0]:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{paths.root.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    atomic_write(paths.loss_plot, png.getvalue())
    return paths.loss_plot


# ---------------------------------------------------------------- sections


def _outcome(state: dict, sampled_after: bool) -> str:
    stage = state.get("stage")
    if stage is None:
        return "not started"
    if stage in FINISHED and sampled_after:  # `ftjob run` reports before it marks the run "done"
        return "finished" + (" (stopped early)" if state.get("stopped_early") else "")
    where = f" at step {state.get('step')}" + (f" of {state['total_steps']}" if state.get("total_steps") else "")
    if stage in ("preempted", "diverged", "failed"):
        why = state.get("reason") or state.get("signal")
        return OUTCOME[stage] + where + (f" ({why})" if why else "")
    return OUTCOME.get(stage) or f"in progress ({stage}{where})"


def _spec_section(spec, state: dict, plan: dict | None = None) -> list[str]:
    if spec is None:
        return ["## Spec", "", "No readable spec.yaml in the run directory.", ""]
    d, t = spec.data, spec.train
    world = state.get("world_size")
    per_step = world * t.micro_batch * t.grad_accum if world else None
    batch = f"{world or '?'} processes x {t.micro_batch} micro-batch x {t.grad_accum} accumulation"
    if per_step:
        batch += f" = {per_step:,} sequences ({per_step * d.block_size:,} tokens) per step"
    source = f"query `{d.query}`" if d.query else f"table `{d.table}`, column `{d.text_column}`"
    length = f"{t.max_steps:,} steps (max_steps)" if t.max_steps else f"{t.epochs:g} epochs"
    if state.get("total_steps"):
        length += f", {state['total_steps']:,} optimizer steps"
    model = f"`{spec.model.path}`" + (" (fresh weights from model.from_config)" if spec.model.from_config else "")
    described = (((plan or {}).get("plan") or {}).get("model") or {}).get("describe")
    if described:
        model += f": {described}"
    rows = [("model", model),
            ("data", f"`{d.database}`, {source}" + (f", first {d.limit:,} rows" if d.limit else "")),
            ("block size", f"{d.block_size} tokens"), ("batch", batch),
            ("learning rate", f"{t.lr:g}" + (f", {t.warmup_steps} warm-up steps" if t.warmup_steps else "")),
            ("optimizer", t.optimizer + (f", weight decay {t.weight_decay:g}" if t.weight_decay else "")),
            ("scheduler", t.scheduler), ("precision", _precision(t.precision, state.get("accelerator"))), ("ZeRO stage", str(t.zero_stage)),
            ("length", length), ("seed", str(t.seed))]
    return ["## Spec", "", *_table(("setting", "value"), rows), ""]


def _precision(precision: str, accelerator: str | None) -> str:
    if precision != "auto" or accelerator is None:
        return precision
    return f"auto: {'fp16' if accelerator == 'cuda' else 'fp32'} on {accelerator}"


def _data_section(m: dict | None) -> list[str]:
    if not m:
        return ["## Data", "", "Not prepared yet (no data/manifest.json).", ""]
    splits, sec = m.get("splits", {}), m.get("seconds", {})
    total_bytes = sum(s.get("text_bytes", 0) for s in splits.values())
    speed = f", {total_bytes / 1e6 / sec['total']:.1f} MB/s of text" if sec.get("total") else ""
    tok = m.get("tokenizer", {})
    lines = ["## Data", "",
             f"- source: `{m.get('source')}`",
             f"- rows read: {m.get('rows_read', 0):,}; dropped: {m.get('rows_dropped', 0):,} "
             f"({m.get('dropped_null', 0):,} null, {m.get('dropped_blank', 0):,} blank)",
             f"- tokenizer `{tok.get('source')}` (vocabulary {tok.get('vocab_size', 0):,}); blocks of "
             f"{m.get('block_size')} tokens, documents joined by {m.get('join')}, stored as {m.get('dtype')}",
             f"- prepared in {sec.get('total', 0):.1f} s ({_prepare_phases(sec)}){speed}", ""]
    rows = [(name, f"{s.get('documents', 0):,}", f"{s.get('tokens', 0):,}", f"{s.get('blocks', 0):,}",
             f"{s.get('text_bytes', 0) / 1e6:.2f}") for name, s in splits.items()]
    return lines + _table(("split", "documents", "tokens", "blocks", "text MB"), rows, right=4) + [""]


def _prepare_phases(sec: dict) -> str:
    if "read" in sec:
        return (f"reading rows {sec['read']:.1f} s, tokenising alongside and {sec.get('tokenise', 0):.1f} s after, "
                f"split and shards {sec.get('shards', 0):.1f} s")
    return f"text {sec.get('text', 0):.1f} s, tokenising {sec.get('tokenise', 0):.1f} s"  # manifests of earlier ftjob versions


def _training_section(metrics: list[dict], state: dict) -> list[str]:
    if not metrics:
        return ["## Training", "", "No training step logged yet.", ""]
    first, last, recent = metrics[0], metrics[-1], metrics[-LAST_N:]
    rows = [("steps", f"{last['step']:,}" + (f" of {state['total_steps']:,}" if state.get("total_steps") else "")),
            ("epochs", f"{last.get('epoch', 0):.2f}"), ("tokens", f"{last.get('tokens', 0):,}"),
            ("training loss", f"{_fmt(first.get('loss'), '.4f')} at step {first['step']} -> "
                              f"{_fmt(last.get('loss'), '.4f')} at step {last['step']}"),
            ("wall time, training", format_duration(_wall_seconds(metrics))),
            (f"tokens/s (mean of last {len(recent)} logs)", f"{_mean(recent, 'tokens_per_s'):,.0f}")]
    started, updated = parse_time(state.get("started")), parse_time(state.get("updated"))
    if started and updated:
        rows.append(("wall time, whole job", format_duration(updated - started)))
    if any(r.get("mfu") is not None for r in recent):
        rows.append(("MFU (per device)", f"{100 * _mean(recent, 'mfu'):.1f}%"))
    if any(r.get("peak_mem_gib") is not None for r in metrics):
        rows.append(("peak GPU memory", f"{max(r.get('peak_mem_gib') or 0 for r in metrics):.2f} GiB"))
    return ["## Training", "", *_table(("figure", "value"), rows), ""]


def _wall_seconds(metrics: list[dict]) -> float:
    """First to last record's `time`, plus the first logging window (each record is stamped at its window's
    end). A resumed run's figure includes the time between attempts."""
    first = metrics[0]
    window = first.get("tokens", 0) / first["tokens_per_s"] if first.get("tokens_per_s") else 0.0
    return (metrics[-1].get("time", 0) - first.get("time", 0)) + window


def _validation_section(evals: list[dict], state: dict, best: dict | None) -> list[str]:
    if not evals:
        return ["## Validation", "", "No evaluation yet.", ""]
    notes = []
    if best:
        notes.append(f"- best: validation loss {best['loss']:.4f} at step {best['step']} (`{best['checkpoint']}`, "
                     "kept whatever keep_checkpoints says; exported to `best/`)")
    if state.get("stopped_early"):
        notes.append(f"- stopped early: {state['stopped_early']}")
    full = [e for e in evals if e.get("full")]
    evals = [e for e in evals if not e.get("full")] or full
    first, last = evals[0], evals[-1]
    label_first = "before training" if first["step"] == 0 else "first evaluation"
    label_last = "after training" if state.get("stage") in FINISHED else "latest evaluation"
    rows = [(label_first, str(first["step"]), _fmt(first.get("loss"), ".4f"), _fmt(first.get("perplexity"), ".2f"))]
    if len(evals) > 1:
        rows.append((label_last, str(last["step"]), _fmt(last.get("loss"), ".4f"), _fmt(last.get("perplexity"), ".2f")))
        rows.append(("change", "", _change(first.get("loss"), last.get("loss"), ".4f"),
                     _change(first.get("perplexity"), last.get("perplexity"), ".2f")))
    if full and full[-1] is not last:
        f = full[-1]
        rows.append((f"all {f.get('blocks', 0):,} blocks", str(f["step"]), _fmt(f.get("loss"), ".4f"),
                     _fmt(f.get("perplexity"), ".2f")))
    blocks, of = last.get("blocks", 0), last.get("valid_blocks", last.get("blocks", 0))
    what = (f"Mean loss over all {blocks:,} validation blocks." if blocks >= of else
            f"Mean loss over the same {blocks:,} of the {of:,} validation blocks at every evaluation (a fixed "
            "subset drawn with train.seed; train.eval_blocks).")
    return ["## Validation", "", what, "",
            *_table(("", "step", "loss", "perplexity"), rows, right=3), "", *notes, *([""] if notes else [])]


def _plan_section(plan: dict | None, got: dict) -> list[str]:
    """The plan made before training beside what the run measured: the estimate's error on every run."""
    if not plan:
        return []
    est = plan.get("estimates", {})
    rows = []
    for label, key, got_key, fmt in (("tokens/s", "tokens_per_s", "tokens_per_s", lambda v: f"{v:,.0f}"),
                                     ("checkpoint size", "checkpoint_bytes", "checkpoint_bytes", megabytes),
                                     ("model state per process", "state_bytes", "state_bytes", megabytes),
                                     ("peak GPU memory", "peak_gpu_gib", "peak_gpu_gib", lambda v: f"{v:.2f} GiB"),
                                     ("peak worker memory (RSS)", "peak_rss_mib", "peak_rss_mib",
                                      lambda v: f"{v:,.0f} MiB")):
        e, a = est.get(key), got.get(got_key)
        if e is None and a is None:
            continue
        error = f"{100 * (e - a) / a:+.0f}%" if e and a else "-"
        rows.append((label, fmt(e) if e is not None else "-", fmt(a) if a is not None else "-", error))
    if not rows:
        return []
    return ["## Plan and measurement", "", f"Estimated by `ftjob plan` before training ({plan.get('basis', '')}).",
            "", *_table(("figure", "plan", "measured", "plan error"), rows, right=3), ""]


def _change(before, after, fmt: str) -> str:
    if before is None or after is None:
        return "-"
    diff = after - before
    pct = f" ({100 * diff / before:+.1f}%)" if before and math.isfinite(before) else ""
    return f"{diff:+{fmt}}{pct}"


def _samples_section(paths: RunPaths) -> list[str]:
    before = read_jsonl(paths.samples / "before.jsonl")
    after, after_label = _after_samples(paths)
    if not before and not after:
        return ["## Samples", "", "No samples yet.", ""]
    by_prompt: dict[str, list[list[str]]] = {}
    for col, records in enumerate((before, after)):
        for r in records:
            by_prompt.setdefault(r.get("prompt", ""), [[], []])[col] = r.get("samples", [])
    rows = [(_cell([p]), _cell(b), _cell(a)) for p, (b, a) in by_prompt.items()]
    notes = [f"- {label}: {_meta(records)}" for label, records in (("before", before), (after_label, after)) if records]
    return ["## Samples", "", *notes, "", *_table(("prompt", "before", after_label), rows), ""]


def _after_samples(paths: RunPaths) -> tuple[list[dict], str]:
    """samples/after.jsonl, else the newest samples/step-N.jsonl written during training."""
    after = read_jsonl(paths.samples / "after.jsonl")
    if after:
        return after, "after"
    steps = sorted(paths.samples.glob("step-*.jsonl")) if paths.samples.exists() else []
    if not steps:
        return [], "after"
    return read_jsonl(steps[-1]), "step " + (steps[-1].stem.removeprefix("step-").lstrip("0") or "0")


def _meta(records: list[dict]) -> str:
    meta = {k: v for k, v in records[0].items() if k not in ("prompt", "samples")}
    return ", ".join(f"{k}: {v}" for k, v in meta.items()) or "-"


def _checkpoint_section(paths: RunPaths) -> list[str]:
    rows = []
    for step, path in complete_checkpoints(paths.checkpoints):
        try:
            m = read_marker(path)
        except (OSError, ValueError):
            continue
        size = checkpoint_bytes(m) / 1e6
        rows.append((f"`{path.name}`", str(m.get("time", "-")), f"{step:,}", f"{m.get('tokens', 0):,}", f"{size:,.1f}"))
    final = "present" if (paths.final / "config.json").exists() else "not exported yet"
    best = "present" if (paths.best / "config.json").exists() else "not exported yet"
    lines = ["## Checkpoints", "", f"Final model (`final/`, Hugging Face format): {final}. Best model (`best/`): "
             f"{best}.", ""]
    if not rows:
        return lines + ["No complete checkpoint yet.", ""]
    lines += ["Complete checkpoints, newest first:", ""]
    return lines + _table(("checkpoint", "written", "step", "tokens", "MB"), rows, right=3) + [""]


# ---------------------------------------------------------------- helpers


def _load_spec(paths: RunPaths):
    """spec.yaml as written by the job (every key present), read as plain YAML: the report reads files,
    not the spec's validation rules."""
    try:
        raw = yaml.safe_load(paths.spec.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), dict) for k in ("data", "model", "train")):
        return None
    return SimpleNamespace(**{k: SimpleNamespace(**v) if isinstance(v, dict) else v for k, v in raw.items()})


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else 0.0


def _cell(texts: list[str]) -> str:
    """Table-safe text: HTML-escaped, `|` escaped, newlines as <br>; several samples numbered."""
    safe = [html.escape(t, quote=False).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")
            for t in texts]
    if len(safe) <= 1:
        return safe[0] if safe else "-"
    return "<br>".join(f"{i + 1}. {t}" for i, t in enumerate(safe))


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: int = 0) -> list[str]:
    """A markdown table; the last `right` columns are right-aligned (numbers)."""
    align = ["---"] * (len(header) - right) + ["---:"] * right
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + \
           ["| " + " | ".join(row) + " |" for row in rows]
