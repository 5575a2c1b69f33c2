"""Continual-learning training entry point (not built yet: see the open continual-learning issue)."""
import sys

if __name__ == "__main__":
    sys.exit("train.py: the continual-learning trainer is not built yet; minseekr currently provides the model, "
             "checkpoints, tokenizer and generation (see README).")
