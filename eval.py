"""Evaluation entry point (not built yet: see the open continual-learning issue)."""
import sys

if __name__ == "__main__":
    sys.exit("eval.py: evaluation is not built yet (see README).")
