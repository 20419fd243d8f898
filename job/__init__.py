"""ftjob: full fine-tuning of GPT-2-style language models on text stored in SQLite."""

__version__ = "0.1.0"
