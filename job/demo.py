"""Offline demo assets: a Wikibooks-shaped SQLite file and a tiny GPT-2 with its own tokenizer.

Nothing here touches the network: the tokenizer is trained on the demo corpus itself and the model is a
small random GPT-2 saved with `save_pretrained`, so the demo (and the tests) load them through exactly
the code path a real run uses for a downloaded checkpoint.
"""
from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from .rundir import apply_umask

# A small grammar: enough structure that a 2-layer model's validation loss falls visibly in a minute.
_SUBJECTS = ["the gardener", "a student", "the old teacher", "my neighbour", "the engineer", "a child",
             "the baker", "our captain", "the doctor", "a traveller"]
_VERBS = ["reads", "writes", "builds", "paints", "repairs", "opens", "carries", "finds", "cleans", "sells"]
_OBJECTS = ["a book", "the door", "a small boat", "the garden wall", "an old clock", "the red bicycle",
            "a wooden chair", "the kitchen window", "a letter", "the blue cup"]
_TAILS = ["in the morning.", "after lunch.", "with great care.", "every sunday.", "before the rain.",
          "near the river.", "for the village.", "without a word.", "at the market.", "in winter."]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"


def demo_rows(n_rows: int, seed: int = 0):
    """Rows shaped like the Wikibooks dump: (title, url, abstract, body_text, body_html)."""
    rng = random.Random(seed)
    for i in range(n_rows):
        title = f"Book {i}: {rng.choice(_OBJECTS)}"
        body = " ".join(_sentence(rng) for _ in range(rng.randint(3, 12)))
        if i % 50 == 7:
            body = ""  # the real dump has empty pages; the job must drop them
        elif i % 50 == 23:
            body = "   \n  "
        elif i % 50 == 41:
            body = None
        yield (title, f"https://example.org/wiki/Book_{i}", body[:60] if body else "", body,
               f"<p>{body}</p>" if body else None)


def write_database(path: Path, n_rows: int = 600, table: str = "en", seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute(f'CREATE TABLE "{table}" (title TEXT, url TEXT, abstract TEXT, body_text TEXT, body_html TEXT)')
        conn.executemany(f'INSERT INTO "{table}" VALUES (?, ?, ?, ?, ?)', demo_rows(n_rows, seed))
    conn.close()
    return path


def write_tiny_model(path: Path, corpus_db: Path, table: str = "en", vocab_size: int = 512,
                     n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 256,
                     seed: int = 0) -> Path:
    """Train a byte-level BPE on the demo corpus and save it with a random GPT-2 of that vocabulary."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(f"file:{corpus_db}?mode=ro", uri=True) as conn:
        texts = [r[0] for r in conn.execute(f'SELECT body_text FROM "{table}" WHERE body_text IS NOT NULL')]
    conn.close()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=n_positions)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    apply_umask(path)  # save_pretrained's model.safetensors is 0600: unreadable for the image's uid 1000
    return path


def write_demo_assets(directory: Path, n_rows: int = 600) -> dict:
    directory = Path(directory)
    db = write_database(directory / "wikibooks-demo.sqlite", n_rows=n_rows)
    model = write_tiny_model(directory / "tiny-gpt2", db)
    return {"database": db, "model": model}
