"""How a task's samples become micro-batches: the training encoding, the epoch's interleaved plan, each rank's share.

Every rank builds the same seeded plan, so a position in it fixes the data that follows (resume), and each
takes every world-th sample of a global micro-batch (`my_part`).
"""
import torch


def encode(tokenizer, records, max_len) -> list[dict]:
    """TRACE training encoding of {"prompt", "answer"} records as tensors."""
    out = []
    for r in records:
        ids, labels = tokenizer.encode_example(r["prompt"], r["answer"], max_len)
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return out


def interleave(streams: dict) -> list:
    """Merge {name: n_batches} evenly by volume: batch j of a stream of n sits at (j + 0.5) / n."""
    slots = [((j + 0.5) / n, name, j) for name, n in streams.items() for j in range(n)]
    return [(name, j) for _, name, j in sorted(slots, key=lambda s: (s[0], str(s[1])))]


def index_batches(n, batch_size, rng=None) -> list[list[int]]:
    """Indices 0..n−1 in batches, shuffled by `rng` when given."""
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def my_part(items, rank, world):
    """This rank's share of a global batch (every world-th item) and its weight. Every rank must run the same
    forwards (FSDP gathers weights collectively), so an empty share runs the batch's first item with weight 0."""
    mine = items[rank::world]
    return (mine, 1.0) if mine else (items[:1], 0.0)


def n_labels(labels) -> int:
    """Labelled tokens of a sample's labels: the terms of its loss."""
    return int((labels[1:] != -100).sum())
