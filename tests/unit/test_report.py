"""report.md and loss.png from a hand-written run directory (no DeepSpeed, no model)."""
import json

import matplotlib.image
import numpy as np
import pytest

from job import spec as spec_lib
from job.rundir import RunPaths
from job.report import loss_series, plot_loss, write_report

T0 = 1_714_564_800.0  # 2024-05-01 12:00 UTC


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_spec(paths: RunPaths, precision="fp32"):
    spec = spec_lib.from_dict({
        "name": paths.root.name, "output_dir": str(paths.root.parent),
        "data": {"database": "/data/wikibooks.sqlite", "table": "ru", "text_column": "body_text", "limit": 3300, "block_size": 64},
        "model": {"path": "/models/rugpt3small"},
        "train": {"epochs": 2, "micro_batch": 4, "grad_accum": 2, "lr": 3e-4, "optimizer": "adamw",
                  "scheduler": "cosine", "precision": precision, "zero_stage": 1},
        "generation": {"prompts": ["женщина", "a | b"]}})
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.spec.write_text(spec_lib.dump(spec), encoding="utf-8")


def write_manifest(paths: RunPaths):
    split = lambda docs, toks, nbytes: {"documents": docs, "tokens": toks, "blocks": toks // 64,  # noqa: E731
                                        "text_bytes": nbytes, "shards": []}
    manifest = {"format_version": 1, "created": "2024-05-01T11:50:00+0000",
                "source": "/data/wikibooks.sqlite: table 'ru', column 'body_text'",
                "rows_read": 3300, "rows_dropped": 6, "dropped_null": 2, "dropped_blank": 4,
                "tokenizer": {"source": "/models/rugpt3small", "vocab_size": 50264},
                "block_size": 64, "dtype": "uint16", "join": "newline",
                "splits": {"train": split(2635, 1_234_567, 4_000_000), "valid": split(659, 300_100, 1_000_000)},
                "seconds": {"text": 0.5, "tokenise": 1.5, "total": 2.0}}
    paths.data.mkdir(parents=True, exist_ok=True)
    paths.manifest.write_text(json.dumps(manifest), encoding="utf-8")


def write_metrics(paths: RunPaths, last_step=100, gpu=False):
    records = []
    for i, step in enumerate(range(10, last_step + 1, 10)):
        r = {"step": step, "epoch": step / 50, "loss": round(4.0 - 0.015 * step, 4), "lr": 3e-4, "loss_scale": None,
             "grad_norm": 1.0, "tokens_per_s": 1000.0 + i, "tokens": step * 1024, "time": T0 + 10 * (i + 1)}
        if gpu:
            r |= {"peak_mem_gib": 3.5 + i / 100, "mfu": 0.12}
        records.append(r)
    write_jsonl(paths.metrics, records)
    return records


def write_checkpoint(paths: RunPaths, step: int, complete=True):
    ckpt = paths.checkpoints / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    if complete:
        marker = {"step": step, "tokens": step * 1024, "epoch": step // 50, "time": "2024-05-01T12:05:00+0000",
                  "files": {"ds/model.pt": {"bytes": 2_500_000, "sha256": "0" * 64}}}
        (ckpt / "COMPLETE.json").write_text(json.dumps(marker))
    (paths.checkpoints / "latest").write_text(ckpt.name + "\n")


def samples(step, texts, **meta):
    return [{"step": step, **meta, "prompt": p, "samples": s} for p, s in texts.items()]


@pytest.fixture
def finished_run(tmp_path):
    paths = RunPaths(tmp_path / "out" / "demo")
    write_spec(paths)
    write_manifest(paths)
    write_metrics(paths, gpu=True)
    write_jsonl(paths.evals, [{"step": 0, "loss": 3.5, "perplexity": 33.12, "blocks": 4689, "tokens": 0},
                              {"step": 50, "loss": 2.9, "perplexity": 18.17, "blocks": 4689, "tokens": 51200},
                              {"step": 100, "loss": 2.5123, "perplexity": 12.33, "blocks": 4689, "tokens": 102400}])
    paths.state.write_text(json.dumps({"stage": "done", "step": 100, "total_steps": 100, "epoch": 2.0,
                                       "world_size": 2, "accelerator": "cuda", "started": "2024-05-01T11:49:00+0000",
                                       "updated": "2024-05-01T12:10:00+0000"}))
    write_checkpoint(paths, 50)
    write_checkpoint(paths, 100)
    write_checkpoint(paths, 150, complete=False)  # torn: no marker, must not be listed
    write_jsonl(paths.samples / "before.jsonl",
                samples(0, {"женщина": ["женщина qz xv"], "a | b": ["noise\nmore <noise>"]}, weights="training run"))
    write_jsonl(paths.samples / "after.jsonl",
                samples(100, {"женщина": ["женщина пришла домой", "женщина | мужчина"], "a | b": ["a | b c"]},
                        weights="final/"))
    return paths


def test_loss_series_holds_train_and_valid_points(finished_run):
    series = loss_series(finished_run)
    assert series["train"] == (list(range(10, 101, 10)), [round(4.0 - 0.015 * s, 4) for s in range(10, 101, 10)])
    assert series["valid"] == ([0, 50, 100], [3.5, 2.9, 2.5123])


def test_plot_is_a_png_of_the_expected_size_with_both_series(finished_run):
    path = plot_loss(finished_run)
    assert path == finished_run.loss_plot
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (480, 840)  # 7 x 4 inches at 120 dpi
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not a blank canvas

    def pixels_near(color):  # how many pixels carry a series' colour
        return int((np.abs(rgb - np.array(color)).max(axis=-1) < 0.1).sum())

    assert pixels_near((0.122, 0.467, 0.706)) > 200  # tab:blue, training line
    assert pixels_near((1.0, 0.498, 0.055)) > 100  # tab:orange, validation markers


def test_report_holds_the_figures_from_the_files(finished_run):
    path = write_report(finished_run)
    assert path == finished_run.report and finished_run.loss_plot.exists()
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# demo: finished\n")
    # spec
    assert "`/models/rugpt3small`" in text
    assert "2 processes x 4 micro-batch x 2 accumulation = 16 sequences (1,024 tokens) per step" in text
    assert "| learning rate | 0.0003 |" in text and "| optimizer | adamw |" in text
    assert "| precision | fp32 |" in text and "| ZeRO stage | 1 |" in text and "2 epochs, 100 optimizer steps" in text
    # data
    assert "- rows read: 3,300; dropped: 6 (2 null, 4 blank)" in text
    assert "| train | 2,635 | 1,234,567 | 19,290 | 4.00 |" in text
    assert "| valid | 659 | 300,100 | 4,689 | 1.00 |" in text
    assert "2.5 MB/s" in text
    # training
    assert "| steps | 100 of 100 |" in text and "| tokens | 102,400 |" in text
    assert "3.8500 at step 10 -> 2.5000 at step 100" in text
    assert "| wall time, training | 1:40 |" in text  # 90 s between first and last record + 10.24 s first window
    assert "| wall time, whole job | 21:00 |" in text
    assert "| tokens/s (mean of last 10 logs) | 1,004 |" in text
    assert "| MFU (per device) | 12.0% |" in text and "| peak GPU memory | 3.59 GiB |" in text
    # validation before / after
    assert "| before training | 0 | 3.5000 | 33.12 |" in text
    assert "| after training | 100 | 2.5123 | 12.33 |" in text
    assert "| change |  | -0.9877 (-28.2%) | -20.79 (-62.8%) |" in text
    assert "![loss](loss.png)" in text
    # samples side by side, escaped
    assert "| женщина | женщина qz xv | 1. женщина пришла домой<br>2. женщина \\| мужчина |" in text
    assert "| a \\| b | noise<br>more &lt;noise&gt; | a \\| b c |" in text
    assert "- after: step: 100, weights: final/" in text
    # checkpoints: complete ones only, newest first
    newest, older = "| `step-00000100` | 2024-05-01T12:05:00+0000 | 100 | 102,400 | 2.5 |", "| `step-00000050` |"
    assert newest in text and older in text and text.index(newest) < text.index(older)
    assert "step-00000150" not in text


def test_report_of_a_run_still_preparing(tmp_path):
    paths = RunPaths(tmp_path / "early")
    paths.root.mkdir()
    paths.state.write_text(json.dumps({"stage": "prepare", "updated": "2024-05-01T12:00:00+0000"}))
    text = write_report(paths).read_text(encoding="utf-8")
    assert text.startswith("# early: in progress (prepare")
    for line in ("No readable spec.yaml", "Not prepared yet", "No training step logged yet", "No evaluation yet",
                 "No samples yet", "No complete checkpoint yet"):
        assert line in text
    assert matplotlib.image.imread(paths.loss_plot).shape[:2] == (480, 840)
    assert loss_series(paths) == {"train": ([], []), "valid": ([], [])}


def test_report_mid_training_uses_latest_eval_and_step_samples(tmp_path):
    paths = RunPaths(tmp_path / "mid")
    write_spec(paths, precision="auto")
    write_manifest(paths)
    write_metrics(paths, last_step=40)
    with open(paths.metrics, "a") as f:
        f.write('{"step": 50, "loss": 3.')  # a line cut short by a kill
    write_jsonl(paths.evals, [{"step": 0, "loss": 3.5, "perplexity": 33.12, "blocks": 10, "tokens": 0}])
    paths.state.write_text(json.dumps({"stage": "train", "step": 40, "total_steps": 100, "world_size": 2,
                                       "accelerator": "cpu"}))
    write_jsonl(paths.samples / "before.jsonl", samples(0, {"женщина": ["до"]}))
    write_jsonl(paths.samples / "step-00000020.jsonl", samples(20, {"женщина": ["в середине"]}))
    text = write_report(paths).read_text(encoding="utf-8")
    assert text.startswith("# mid: in progress (train at step 40 of 100)")
    assert "| before training | 0 | 3.5000 | 33.12 |" in text and "change" not in text
    assert "| prompt | before | step 20 |" in text and "| женщина | до | в середине |" in text
    assert "| precision | auto: fp32 on cpu |" in text
    assert "MFU" not in text and "peak GPU memory" not in text
    assert loss_series(paths)["train"][0] == [10, 20, 30, 40]


def test_report_names_why_a_run_stopped(tmp_path):
    paths = RunPaths(tmp_path / "bad")
    paths.root.mkdir()
    paths.state.write_text(json.dumps({"stage": "diverged", "step": 70, "total_steps": 100,
                                       "reason": "loss became nan near step 70"}))
    text = write_report(paths).read_text(encoding="utf-8")
    assert text.startswith("# bad: diverged at step 70 of 100 (loss became nan near step 70)")


def test_report_written_before_the_run_is_marked_done_says_finished(finished_run):
    state = json.loads(finished_run.state.read_text())
    finished_run.state.write_text(json.dumps(state | {"stage": "generate"}))  # as `ftjob run` leaves it
    assert write_report(finished_run).read_text(encoding="utf-8").startswith("# demo: finished\n")
    (finished_run.samples / "after.jsonl").unlink()
    text = write_report(finished_run).read_text(encoding="utf-8")
    assert text.startswith("# demo: finished training, generating samples\n")
    assert "| prompt | before | after |" in text and "| женщина | женщина qz xv | - |" in text


def test_report_of_an_evaluation_subset_and_a_final_full_pass(finished_run):
    """train.eval_blocks: the report says the subset; train.final_eval: full: its own row, not plotted."""
    write_jsonl(finished_run.evals, [
        {"step": 0, "loss": 3.5, "perplexity": 33.12, "blocks": 512, "valid_blocks": 4689, "tokens": 0},
        {"step": 100, "loss": 2.5123, "perplexity": 12.33, "blocks": 512, "valid_blocks": 4689, "tokens": 102400},
        {"step": 100, "loss": 2.6, "perplexity": 13.46, "blocks": 4689, "valid_blocks": 4689, "tokens": 102400,
         "full": True}])
    text = write_report(finished_run).read_text(encoding="utf-8")
    assert "Mean loss over the same 512 of the 4,689 validation blocks at every evaluation" in text
    assert "| after training | 100 | 2.5123 | 12.33 |" in text and "| all 4,689 blocks | 100 | 2.6000 | 13.46 |" in text
    assert loss_series(finished_run)["valid"] == ([0, 100], [3.5, 2.5123])
