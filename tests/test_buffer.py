"""The memory buffer stores each replay sample at its true length with correctly aligned teacher signals."""
import json

import pytest
import torch

from minseekr.buffer import TaskMemory, collate, teacher_signals, write_task
from minseekr.model import ModelArgs, Transformer


@pytest.fixture
def model():
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48))
    m.init_weights(0.2)
    return m.eval()


def samples_of(lengths, answer=3):
    out = []
    for n in lengths:
        ids = torch.randint(3, 50, (n,))
        labels = torch.full((n,), -100)
        labels[-answer:] = ids[-answer:]
        out.append({"input_ids": ids, "labels": labels, "rows": torch.tensor([0, n - 1, n // 2])})
    return out


def test_teacher_logits_are_the_distributions_that_predict_each_label(model):
    batch = collate(samples_of([7, 5]), pad_id=0)
    signals = teacher_signals(model, batch, heads=[], dtype=torch.float32)
    with torch.no_grad():
        full = model(batch["input_ids"][:1, :7])[0]
    # Labels sit at positions 4, 5, 6 of the first sample: positions 3, 4, 5 predict them (not 4, 5, 6).
    torch.testing.assert_close(signals[0]["logits"], full[3:6])
    assert signals[1]["logits"].shape == (3, 50) and signals[1]["input_ids"].numel() == 5


def test_teacher_rows_equal_the_full_maps_at_the_sampled_rows(model):
    batch = collate(samples_of([8, 6]), pad_id=0)
    heads = [(1, 3), (0, 0), (1, 0)]
    signals = teacher_signals(model, batch, heads, dtype=torch.float32)
    for b, n in enumerate([8, 6]):
        with torch.no_grad():
            _, maps = model(batch["input_ids"][b:b + 1, :n], return_attn=True)
        rows = batch["rows"][b]
        expected = torch.stack([maps[l][0, h, rows] for l, h in heads])      # (|H|, T, n)
        torch.testing.assert_close(signals[b]["attn"], expected, atol=1e-6, rtol=0)


def test_written_task_reads_back_at_true_length_and_pads_in_batches(model, tmp_path):
    batch = collate(samples_of([9, 4, 6]), pad_id=0)
    heads = [(0, 1), (1, 2)]
    signals = teacher_signals(model, batch, heads)
    write_task(tmp_path, 0, "toy", signals, heads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task00.json", "task00.safetensors"]
    memory = TaskMemory(tmp_path, 0)
    assert len(memory) == 3 and memory.heads == heads and memory.name == "toy"
    assert [memory[i]["attn"].shape[-1] for i in range(3)] == [9, 4, 6]
    assert json.loads((tmp_path / "task00.json").read_text())["lengths"] == [9, 4, 6]
    for i in range(3):
        for key, t in signals[i].items():
            assert torch.equal(memory[i][key], t)
    replayed = collate([memory[i] for i in range(3)], pad_id=0)
    assert replayed["teacher_attn"].shape == (3, 2, 3, 9)
    assert replayed["teacher_attn"][1, :, :, 4:].abs().max() == 0
    assert torch.equal(replayed["attention_mask"].sum(1), torch.tensor([9, 4, 6]))
    assert replayed["teacher_logits"].shape == (9, 50)


def test_a_missing_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="task03.json"):
        TaskMemory(tmp_path, 3)
