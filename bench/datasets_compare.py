"""One-off measurement: `ftjob prepare` (bounded memory, every core) against Hugging Face `datasets`
(`Dataset.from_sql` + `map(batched, num_proc)`) and the raw tokenizer, on a generated corpus of 1 GB or
more, in one run: wall time and peak memory of each one's whole process tree (job/bench.py measure_tree).

ftjob does not depend on `datasets`; give its directory for that variant alone, e.g. after
`pip install --target /tmp/dsdeps --no-deps datasets pyarrow dill xxhash multiprocess`:

    python bench/datasets_compare.py --dir /tmp/corpus --mb 1050 --datasets-path /tmp/dsdeps

The corpus (job/bench.py data_corpus: the synthetic language and a 32K byte-level BPE trained on its
first 30 MB, or --corpus demo) is made once in --dir and reused. The figures are in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def datasets_variant(database: str, table: str, tokenizer: str, processes: int) -> dict:
    """The usual `datasets` recipe for the same job: rows from SQLite, blank ones dropped, an 80/20 split,
    each document tokenised and followed by the newline's ids, packed into blocks of 64 (run_clm's
    group_texts), every step cached on disk as Arrow files by `datasets` itself."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # `processes` processes, one core each, as ftjob's
    import sqlite3

    from datasets import Dataset
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(dir=Path(database).parent) as cache:
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(tokenizer)
        sep = tok("\n", add_special_tokens=False)["input_ids"]
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        ds = Dataset.from_sql(f'SELECT body_text AS text FROM "{table}"', conn, cache_dir=cache)
        ds = ds.filter(lambda b: [t is not None and t.strip() != "" for t in b["text"]], batched=True,
                       num_proc=processes)
        split = ds.train_test_split(test_size=0.2, seed=0)

        def tokenize(batch):
            ids = [x + sep for x in tok(batch["text"], add_special_tokens=False)["input_ids"]]
            return {"input_ids": ids, "n": [len(x) - len(sep) for x in ids]}

        def group(batch):
            stream = list(chain.from_iterable(batch["input_ids"]))
            return {"input_ids": [stream[i:i + 64] for i in range(0, len(stream) - 63, 64)]}

        tokens = blocks = 0
        for part in split.values():
            tokenized = part.map(tokenize, batched=True, num_proc=processes, remove_columns=["text"])
            tokens += sum(tokenized["n"])
            blocks += len(tokenized.map(group, batched=True, num_proc=processes, remove_columns=["n"]))
        seconds = time.perf_counter() - t0
        conn.close()
        cache_bytes = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
    return {"documents": len(ds), "tokens": tokens, "blocks": blocks, "seconds": round(seconds, 2),
            "processes": processes, "cache_mb": round(cache_bytes / 1e6)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="where the corpus is made once and kept")
    p.add_argument("--mb", type=float, default=1050, help="MB of text in the corpus")
    p.add_argument("--corpus", choices=["synthetic", "demo"], default="synthetic",
                   help="synthetic language and a 32K BPE, or the demo's grammar and tokenizer (faster)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--datasets-path", required=True, help="a directory where `datasets` is importable")
    p.add_argument("--only", default="prepare,raw_tokenizer,datasets")
    p.add_argument("--json", type=Path)
    p.add_argument("--variant", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        db, table, tok, n = args.variant
        print("RESULT " + json.dumps(datasets_variant(db, table, tok, int(n))), flush=True)
        return 0
    sys.path.insert(0, str(ROOT))
    from job.bench import data_corpus, measure_tree

    t0 = time.perf_counter()
    db, tok = data_corpus(args.dir, args.mb, args.corpus)
    print(f"corpus {db} ({db.stat().st_size / 1e9:.2f} GB file), tokenizer {tok}: ready in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ds_env = dict(env, PYTHONPATH=env["PYTHONPATH"] + os.pathsep + args.datasets_path, HF_DATASETS_OFFLINE="1")
    me = [sys.executable, "-m", "job.bench", "--variant"]
    runs = {"prepare": (me + ["data_prepare", str(db), "pages", str(tok), str(args.workers), "4"], env),
            "raw_tokenizer": (me + ["data_raw", str(db), "pages", str(tok), str(args.workers)], env),
            "datasets": ([sys.executable, __file__, "--dir", str(args.dir), "--datasets-path", args.datasets_path,
                          "--variant", str(db), "pages", str(tok), str(args.workers)], ds_env)}
    results = {"corpus": args.corpus, "corpus_mb": args.mb, "workers": args.workers, "cpus": os.cpu_count()}
    for name in args.only.split(","):
        cmd, e = runs[name]
        r = measure_tree(cmd, env=e)
        if "tokens" in r:
            r["tokens_per_s_per_process"] = round(r["tokens"] / r["seconds"] / r["processes"])
        results[name] = r
        print(name, json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
