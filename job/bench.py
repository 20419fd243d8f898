"""`ftjob bench`: the job's own training step beside the HF Trainer baseline, and the data path (`ftjob
prepare`) beside the raw tokenizer on as many processes and a pandas + per-document baseline, on one
machine in one run.

Each training variant runs in a fresh subprocess (its own CUDA context and compile caches) and prints one
`RESULT {json}` line; the parent prints a table. `--tiny` uses a 2-layer model so CI keeps the script
working on CPU; speed is never asserted. On a GPU, run without --tiny for the ruGPT3small shape.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUGPT3SMALL = dict(vocab_size=50264, n_positions=2048, n_embd=768, n_layer=12, n_head=12)
TINY = dict(vocab_size=1000, n_positions=1024, n_embd=64, n_layer=2, n_head=4)
PEAK_FLOPS = 989e12  # H100 SXM dense fp16/bf16

# name -> (block, micro_batch, grad_accum, optimizer, extra spec.train settings)
TRAIN_VARIANTS = {
    "ftjob_b64": (64, 128, 1, "adamw", {}),
    "ftjob_b64_compile": (64, 128, 1, "adamw", {"compile": True}),
    "ftjob_b64_zero0": (64, 128, 1, "adamw", {"zero_stage": 0}),
    "ftjob_original": (64, 64, 2, "adafactor", {}),
    "ftjob_b1024": (1024, 8, 1, "adamw", {}),
    "hf_trainer_original": (64, 64, 2, "adafactor", {}),
}


def flops_per_token(shape: dict, block: int) -> float:
    from .architecture import describe

    return describe(shape).flops_per_token(block)


# ------------------------------------------------------------------ training variants (one per process)


def _synthetic_run_dir(root: Path, shape: dict, block: int, micro: int, accum: int, optimizer: str,
                       train_extra: dict, steps: int) -> Path:
    """A run directory as `ftjob prepare` leaves it, holding random tokens: the Trainer reads it as is."""
    import yaml

    from .data.shards import token_dtype, write_token_shard
    from .demo import write_demo_assets

    assets = write_demo_assets(root / "assets", n_rows=200)
    run = root / "runs" / "bench"
    (run / "data" / "tokens").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n_blocks = micro * accum * (steps + 2)
    splits = {}
    for split, n in (("train", n_blocks), ("valid", micro)):
        blocks = rng.integers(0, shape["vocab_size"], (n, block)).astype(token_dtype(shape["vocab_size"]))
        write_token_shard(run / "data" / "tokens" / f"{split}-00000.bin", blocks)
        splits[split] = {"blocks": n, "shards": [{"tokens": f"tokens/{split}-00000.bin"}]}
    manifest = {"block_size": block, "tokenizer": {"vocab_size": shape["vocab_size"]}, "splits": splits}
    (run / "data" / "manifest.json").write_text(json.dumps(manifest))
    cuda = _cuda()
    spec = {"name": "bench", "output_dir": str(root / "runs"),
            "data": {"database": str(assets["database"]), "table": "en", "block_size": block},
            "model": {"path": str(assets["model"]), "from_config": shape},
            "train": {"max_steps": steps, "micro_batch": micro, "grad_accum": accum, "optimizer": optimizer,
                      "precision": "fp16" if cuda else "fp32", "eval_every": 0, "log_every": 10**6,
                      "checkpoint_every": 10**6, "lr": 2e-4, **train_extra},
            "resources": {"procs_per_node": 1}}
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    return run


def _single_process_env() -> None:
    """What the deepspeed launcher would set for a world of one, so the Trainer runs in this process."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_ftjob_variant(name: str, tiny: bool, warmup: int, steps: int) -> dict:
    """Times Trainer.train_step, the code `ftjob train` runs per optimizer step, engine included."""
    import torch

    from .rundir import RunPaths
    from .train.worker import Trainer

    block, micro, accum, optimizer, extra = TRAIN_VARIANTS[name]
    if tiny:
        micro = max(1, micro // 16)
    shape = TINY if tiny else RUGPT3SMALL
    _single_process_env()
    with tempfile.TemporaryDirectory() as tmp:
        run = _synthetic_run_dir(Path(tmp), shape, block, micro, accum, optimizer, extra, warmup + steps)
        t0 = time.perf_counter()
        trainer = Trainer(RunPaths(run))
        startup = time.perf_counter() - t0
        trainer.engine.train()
        for i in range(warmup + steps):
            if i == warmup:
                if trainer.cuda:
                    torch.cuda.synchronize()
                t_start = time.perf_counter()
            order = trainer.epoch_order(trainer.step)
            loss = trainer.train_step(order)
            trainer.step += 1
        loss = loss.item()  # one host sync, after the clock has what it needs
        if trainer.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t_start
    return _result(name, steps * micro * accum * block, seconds, shape, trainer.n_params, block,
                   {"startup_s": round(startup, 1), "loss": round(loss, 3), "batch": f"{micro}x{accum}"})


def run_hf_trainer(name: str, tiny: bool, warmup: int, steps: int) -> dict:
    """HF Trainer with the original run's settings: fp16, Adafactor, cosine, 64 x 2 sequences of 64."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers import default_data_collator

    from .architecture import as_config

    block, micro, accum, _, _ = TRAIN_VARIANTS[name]
    if tiny:
        micro = max(1, micro // 16)
    shape = TINY if tiny else RUGPT3SMALL
    model = AutoModelForCausalLM.from_config(as_config(shape))
    n = micro * accum * (warmup + steps + 2)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, shape["vocab_size"], (n, block))]
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, warmup + steps):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=warmup + steps, per_device_train_batch_size=micro,
                                 gradient_accumulation_steps=accum, fp16=cuda, optim="adafactor", learning_rate=2e-4,
                                 lr_scheduler_type="cosine", save_strategy="no", report_to="none",
                                 logging_steps=10**6, use_cpu=not cuda)
        Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                callbacks=[Clock()]).train()
    n_params = sum(p.numel() for p in model.parameters())
    return _result(name, steps * micro * accum * block, marks[warmup + steps] - marks[warmup], shape, n_params, block,
                   {"batch": f"{micro}x{accum}"})


def _result(name, tokens, seconds, shape, n_params, block, extra) -> dict:
    import torch

    tps = tokens / seconds
    out = {"variant": name, "tokens_per_s": round(tps), "block": block,
           "mfu": round(tps * flops_per_token(shape, block) / PEAK_FLOPS, 4) if torch.cuda.is_available() else None,
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    out.update(extra)
    return out


def run_checkpoint(tiny: bool) -> dict:
    """Seconds to write and to read back one complete checkpoint (ZeRO-1, AdamW, one process): what a
    preemption's grace period must cover."""
    from .rundir import RunPaths
    from .rundir import newest_complete
    from .train.worker import Trainer

    _single_process_env()
    shape = TINY if tiny else RUGPT3SMALL
    with tempfile.TemporaryDirectory() as tmp:
        run = _synthetic_run_dir(Path(tmp), shape, 64, 2, 1, "adamw", {}, 3)
        trainer = Trainer(RunPaths(run))
        trainer.engine.train()
        trainer.train_step(trainer.epoch_order(0))  # optimizer state exists only after a step
        trainer.step = 1
        t0 = time.perf_counter()
        path = trainer.checkpointer.save(1, trainer.trainer_state())
        save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        assert newest_complete(trainer.paths.checkpoints) == path  # includes the sha256 check
        trainer.checkpointer.load(path)
        load_s = time.perf_counter() - t0
    return {"checkpoint": {"params_m": round(trainer.n_params / 1e6, 1), "size_mb": round(size / 1e6),
                           "save_s": round(save_s, 2), "verify_and_load_s": round(load_s, 2)}}


# ------------------------------------------------------------------ data path


# A synthetic language for data-path measurements at scale: the demo's 50-word grammar tokenises at an
# unrealistic 8 MB/s per core into 5 bytes per token, while real text with a 32K BPE costs several times
# that per byte. Words are drawn from two lexicons of made-up words (Latin and Cyrillic syllables) by a
# Zipf law, as words of a natural language are; document lengths are log-normal (median 3 KB), as pages.
_SYLLABLES = {"latin": [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["th", "st", "ing", "er", "an"],
              "cyrillic": [c + v for c in "бвгджзклмнпрстфхцчшщ" for v in "аеиоуыяюєі"] + ["ння", "ськ", "ств"]}


def _lexicon(rng: np.random.Generator, syllables: list[str], n_words: int) -> np.ndarray:
    lengths = rng.choice([1, 2, 3, 4], size=n_words, p=[0.25, 0.4, 0.25, 0.1])
    picks = rng.integers(0, len(syllables), size=int(lengths.sum()))
    words, i = [], 0
    for n in lengths:
        words.append("".join(syllables[j] for j in picks[i:i + n]))
        i += n
    return np.array(words, dtype=object)


def synthetic_texts(total_bytes: int, seed: int = 0, n_words: int = 40_000):
    """Yield documents until about `total_bytes` of UTF-8 text: sentences of 4-24 Zipf-drawn words."""
    rng = np.random.default_rng(seed)
    lexicons = {k: _lexicon(rng, v, n_words) for k, v in _SYLLABLES.items()}
    zipf = np.cumsum(1.0 / np.arange(1, n_words + 1))
    zipf /= zipf[-1]
    made = 0
    while made < total_bytes:
        lex = lexicons["cyrillic" if rng.random() < 0.5 else "latin"]
        target = int(min(200_000, max(200, rng.lognormal(np.log(3000), 1.0))))
        n = max(8, target // 7)
        words = lex[np.searchsorted(zipf, rng.random(n))]
        cuts = np.cumsum(rng.integers(4, 25, size=n // 4 + 1))
        sentences = [" ".join(words[a:b]) for a, b in zip(np.r_[0, cuts[:-1]], cuts) if a < n]
        text = " ".join(s[:1].upper() + s[1:] + ("." if k % 7 else ",") for k, s in enumerate(sentences))
        made += len(text.encode())
        yield text


def write_synthetic_database(path: Path, total_bytes: int, seed: int = 0, table: str = "pages") -> Path:
    """A SQLite table (title, body_text) of about `total_bytes` of synthetic text, in one transaction."""
    import sqlite3

    path = Path(path)
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute(f'CREATE TABLE "{table}" (title TEXT, body_text TEXT)')
        conn.executemany(f'INSERT INTO "{table}" VALUES (?, ?)',
                         ((f"page {i}", t) for i, t in enumerate(synthetic_texts(total_bytes, seed))))
    conn.close()
    return path


def write_bpe_tokenizer(path: Path, database: Path, table: str = "pages", vocab_size: int = 32_000,
                        sample_bytes: int = 30_000_000) -> Path:
    """A byte-level BPE of `vocab_size` trained on the first `sample_bytes` of the table, saved as a
    Hugging Face tokenizer directory (what model.tokenizer points at)."""
    import sqlite3

    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    texts, seen = [], 0
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    for (text,) in conn.execute(f'SELECT body_text FROM "{table}"'):
        texts.append(text)
        seen += len(text)
        if seen >= sample_bytes:
            break
    conn.close()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(path)
    return Path(path)


def measure_tree(cmd: list[str], env: dict | None = None, timeout: float = 7200) -> dict:
    """Run `cmd` (which prints `RESULT {json}` last) and sample the memory of its whole process tree
    (it, its children and theirs) every 0.2 s: peak of the summed RSS (shared pages counted in every
    process, as `ps` shows them) and of the summed PSS (shared pages split between their processes: the
    memory the tree really holds). Returns the command's result with wall_s, peak_rss_mib, peak_pss_mib."""
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        top, peak_rss, peak_pss = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None and time.perf_counter() - t0 < timeout:
            rss = pss = 0
            try:
                tree = [top] + top.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in tree:
                try:
                    m = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss = rss + m.rss, pss + m.pss
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("RESULT ")]
        if not lines:
            return {"failed": " ".join(cmd[:4]), "rc": proc.returncode, "stderr": err.read()[-1500:]}
    return {**json.loads(lines[-1][7:]), "process_wall_s": round(wall, 1), "peak_rss_mib": round(peak_rss / 2**20),
            "peak_pss_mib": round(peak_pss / 2**20)}


def data_prepare_variant(database: str, table: str, tokenizer: str, workers: int, shards: int) -> dict:
    """`ftjob prepare` of the table, in a temporary run directory: figures from its manifest."""
    from . import spec as spec_lib
    from .data.prepare import prepare
    from .rundir import RunPaths

    with tempfile.TemporaryDirectory(dir=Path(database).parent) as tmp:
        spec = spec_lib.from_dict({"name": "bench", "output_dir": tmp, "model": {"path": tokenizer},
                                   "data": {"database": database, "table": table, "text_column": "body_text",
                                            "workers": workers, "shards": shards, "block_size": 64,
                                            "join": "newline"}})  # a tokenizer alone: no family to ask
        paths = RunPaths(spec.run_dir)
        paths.root.mkdir(parents=True)
        import transformers  # noqa: F401  (the module import is not data-path work; loading the tokenizer is)

        t0 = time.perf_counter()
        m = prepare(spec, paths, interval_s=3600)
        seconds = time.perf_counter() - t0
    splits = m["splits"].values()
    return {"rows": m["rows_read"], "documents": sum(s["documents"] for s in splits),
            "text_bytes": sum(s["text_bytes"] for s in splits),
            # tokens without the boundaries prepare puts around documents: what the raw tokenizer counts
            "tokens": sum(s["tokens"] for s in splits) - (len(m["tokenizer"]["document_prefix"]) + len(
                m["tokenizer"]["document_suffix"])) * sum(s["documents"] for s in splits),
            "seconds": round(seconds, 2), "phases_s": m["seconds"], "processes": workers,
            "worker_max_rss_mib": round((m["worker_max_rss_bytes"] or 0) / 2**20)}


def _raw_part(database: str, table: str, tokenizer: str, part: int, parts: int) -> dict:
    """One process of the raw-tokenizer measurement: its share of the rows into memory, then, timed, only
    `encode_batch` over them in batches of prepare's size."""
    import sqlite3

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process, as prepare's workers
    from tokenizers import Tokenizer

    from .data.prepare import BATCH_DOCS

    backend = Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json"))  # what prepare's workers run
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    texts = [t for (t,) in conn.execute(f'SELECT body_text FROM "{table}" WHERE rowid % {parts} = {part}')
             if t and t.strip()]
    conn.close()
    _barrier.wait()  # every process has its texts: the clock starts for all at once
    start, tokens = time.time(), 0
    for i in range(0, len(texts), BATCH_DOCS):
        tokens += sum(len(e) for e in encode(texts[i:i + BATCH_DOCS], add_special_tokens=False))
    return {"start": start, "end": time.time(), "tokens": tokens, "text_bytes": sum(len(t.encode()) for t in texts)}


_barrier = None


def _set_barrier(barrier) -> None:
    global _barrier
    _barrier = barrier


def data_raw_variant(database: str, table: str, tokenizer: str, processes: int) -> dict:
    """The raw tokenizer on the same texts and as many processes: tokens over the time from the moment
    every process has its texts and starts to encode to the last one finishing (reading the rows and
    loading the tokenizer not counted)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    barrier = ctx.Barrier(processes)
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_set_barrier, initargs=(barrier,)) as pool:
        parts = list(pool.map(_raw_part, *zip(*[(database, table, tokenizer, k, processes) for k in range(processes)])))
    seconds = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    return {"text_bytes": sum(p["text_bytes"] for p in parts), "tokens": sum(p["tokens"] for p in parts),
            "seconds": round(seconds, 2), "processes": processes}


def data_baseline_variant(database: str, table: str, tokenizer: str) -> dict:
    """The straightforward way (the original run's): pandas read_sql, one tokenizer call per document,
    Python packing into blocks of 64, all in memory."""
    import sqlite3

    import pandas as pd
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    with sqlite3.connect(database) as conn:
        df = pd.read_sql(f'SELECT body_text FROM "{table}"', conn)
    texts = [t for t in df["body_text"].dropna().tolist() if t.strip()]
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t + "\n")["input_ids"])
    blocks = [ids[i:i + 64] for i in range(0, len(ids) - 63, 64)]
    return {"text_bytes": sum(len(t.encode()) for t in texts), "blocks": len(blocks),
            "seconds": round(time.perf_counter() - t0, 2), "processes": 1}


DATA_VARIANTS = {"data_prepare": data_prepare_variant, "data_raw": data_raw_variant,
                 "data_baseline": data_baseline_variant}


def data_corpus(directory: Path, text_mb: float, kind: str = "synthetic") -> tuple[Path, Path]:
    """A corpus of about text_mb MB in a table `pages` and its tokenizer, made once in `directory`:
    synthetic (the synthetic language, a 32K byte-level BPE trained on it), or demo (the demo's grammar
    and tokenizer, which tokenises 3-4 times faster per byte; rows repeat: 1/32 of them, doubled in SQL)."""
    directory.mkdir(parents=True, exist_ok=True)
    db, tok = directory / f"{kind}-{text_mb:g}mb.sqlite", directory / f"{kind}-{text_mb:g}mb-tokenizer"
    if not db.exists():
        tmp = db.with_suffix(".tmp")
        if kind == "demo":
            import sqlite3

            from .demo import write_database, write_tiny_model

            write_database(tmp, n_rows=max(1000, int(text_mb * 1e6 / 350 / 32)), table="pages")
            write_tiny_model(tok, tmp, table="pages")
            with sqlite3.connect(tmp) as conn:
                for _ in range(5):
                    conn.execute("INSERT INTO pages SELECT * FROM pages")
            conn.close()
        else:
            write_synthetic_database(tmp, int(text_mb * 1e6))
        tmp.rename(db)
    if not (tok / "tokenizer.json").exists():
        write_bpe_tokenizer(tok, db, vocab_size=32_000 if text_mb >= 20 else 4_000)
    return db, tok


def run_data_path(text_mb: float, workers: int, corpus_dir: Path | None = None, repeat: int = 2) -> dict:
    """SQLite rows -> token shards with `ftjob prepare` on `workers` processes, beside the raw tokenizer
    (`encode_batch` of the same texts on as many processes), each in a fresh process whose whole tree's
    memory is sampled, alternately `repeat` times (the best of each is kept: on a shared machine, the load
    of the moment weighs less); and, up to 100 MB, the straightforward pandas + per-document baseline."""
    with tempfile.TemporaryDirectory() as tmp:
        db, tok = data_corpus(corpus_dir or Path(tmp), text_mb)
        me = [sys.executable, "-m", "job.bench", "--variant"]
        args = [str(db), "pages", str(tok)]
        runs = {"prepare": [], "raw_tokenizer": []}
        for _ in range(repeat):
            runs["raw_tokenizer"].append(measure_tree(me + ["data_raw"] + args + [str(workers)]))
            runs["prepare"].append(measure_tree(me + ["data_prepare"] + args + [str(workers), "4"]))
        out = {name: min(rs, key=lambda r: r.get("seconds", float("inf"))) for name, rs in runs.items()}
        if text_mb <= 100:
            out["baseline"] = measure_tree(me + ["data_baseline"] + args)
    prep, raw = out["prepare"], out["raw_tokenizer"]
    if "failed" not in prep and "failed" not in raw:
        for name, r in (("prepare", prep), ("raw_tokenizer", raw)):
            # MB of UTF-8 text (prepare's text_bytes are its JSON lines: a little more)
            r["tokens_per_s_per_process"] = round(r["tokens"] / r["seconds"] / r["processes"])
            r["mb_per_s_per_process"] = round(raw["text_bytes"] / 1e6 / r["seconds"] / r["processes"], 2)
            r["all_seconds"] = [x.get("seconds") for x in runs[name]]
        out["prepare_vs_raw"] = round(prep["tokens"] / prep["seconds"] / (raw["tokens"] / raw["seconds"]), 3)
    return out


def run_loader(block: int = 64, batch: int = 128, n_blocks: int = 200_000) -> dict:
    """Batches per second the loader gathers from memory-mapped shards (CPU side of the input pipeline)."""
    import torch

    from .data.schedule import EpochSchedule
    from .data.shards import BlockStore, TokenShard, write_token_shard

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.bin"
        write_token_shard(path, np.random.default_rng(0).integers(0, 50264, (n_blocks, block)).astype("<u2"))
        store = BlockStore([TokenShard.open(path)])
        sched = EpochSchedule(n_blocks, 1, batch, 1, 0)
        order = sched.order(0)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 2.0:
            mb = sched.micro_batches(n % sched.steps_per_epoch, 0, order)[0]
            torch.from_numpy(store.gather(mb.indices))
            n += 1
        seconds = time.perf_counter() - t0
    return {"batches_per_s": round(n / seconds), "tokens_per_s": round(n * batch * block / seconds)}


# ------------------------------------------------------------------ driver


def _print_table(results: list[dict]) -> None:
    base = next((r["tokens_per_s"] for r in results if r.get("variant") == "hf_trainer_original"), None)
    print(f"\n{'variant':24} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs HF':>6} {'batch':>7} device")
    for r in results:
        if "variant" not in r:
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = r["peak_mem_gib"] if r.get("peak_mem_gib") is not None else "-"
        print(f"{r['variant']:24} {r['tokens_per_s']:>10,} {mfu:>6} {mem!s:>9} {ratio:>6} {r.get('batch', ''):>7} {r['device']}")
    for d in (r["data_path"] for r in results if "data_path" in r):
        print(f"\n{'data path':24} {'processes':>9} {'seconds':>8} {'tokens/s/proc':>13} {'MB/s/proc':>9} "
              f"{'peak RSS':>9} {'peak PSS':>9}")
        for name in ("prepare", "raw_tokenizer", "baseline"):
            r = d.get(name)
            if r and "failed" not in r:
                print(f"{name:24} {r['processes']:>9} {r['seconds']:>8} {r.get('tokens_per_s_per_process', '-'):>13} "
                      f"{r.get('mb_per_s_per_process', '-'):>9} {r['peak_rss_mib']:>5} MiB {r['peak_pss_mib']:>5} MiB")
        if "prepare_vs_raw" in d:
            print(f"prepare / raw tokenizer: {d['prepare_vs_raw']:.2f} (tokens/s, same texts, same processes)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ftjob bench", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer model, small batches (CPU smoke)")
    p.add_argument("--only", default="", help="comma list of: " + ",".join(list(TRAIN_VARIANTS) + ["data", "loader", "checkpoint"]))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--data-mb", type=float, default=200, help="MB of synthetic text in the data-path benchmark")
    p.add_argument("--data-dir", type=Path, help="keep the data-path corpus here (made once, reused)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data-path processes (default: cores)")
    p.add_argument("--repeat", type=int, default=2, help="data-path runs of each, alternately (the best is kept)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--json", type=Path, help="also write all results to this file")
    args, rest = p.parse_known_args(argv)
    if args.variant in DATA_VARIANTS:
        print("RESULT " + json.dumps(DATA_VARIANTS[args.variant](*[int(a) if a.isdigit() else a for a in rest])),
              flush=True)
        return 0
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.variant == "checkpoint":
        print("RESULT " + json.dumps(run_checkpoint(args.tiny)), flush=True)
        return 0
    if args.variant:
        fn = run_hf_trainer if args.variant.startswith("hf_") else run_ftjob_variant
        print("RESULT " + json.dumps(fn(args.variant, args.tiny, args.warmup, args.steps)), flush=True)
        return 0
    wanted = [w for w in args.only.split(",") if w] or list(TRAIN_VARIANTS) + ["data", "loader", "checkpoint"]
    results = []
    for name in wanted:
        t0 = time.perf_counter()
        if name == "data":
            r = {"data_path": run_data_path(args.data_mb, args.workers, args.data_dir, args.repeat)}
        elif name == "loader":
            r = {"loader": run_loader()}
        else:  # training and checkpoint variants: each in a fresh process
            cmd = [sys.executable, "-m", "job.bench", "--variant", name, "--warmup", str(args.warmup),
                   "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {"failed": name, "rc": proc.returncode,
                                                          "stderr": proc.stderr[-1500:]}
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(r), flush=True)
        results.append(r)
    _print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any("failed" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
