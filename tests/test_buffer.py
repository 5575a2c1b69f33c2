"""The memory buffer stores each replay sample at its true length with correctly aligned teacher signals."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from minseekr.network.model import ModelArgs, Transformer
from minseekr.seekr.buffer import TaskMemory, collate, pack_rows, unpack_rows, write_task
from minseekr.seekr.distill import logit_kl, teacher_signals


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
        # Unsorted, with the first and last positions and a repeat: the prefix layout must not assume otherwise.
        out.append({"input_ids": ids, "labels": labels, "rows": torch.tensor([0, n - 1, n // 2, n // 2])})
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
        assert torch.equal(memory.labels(i), signals[i]["labels"])      # the labels alone, for token counts
    with pytest.raises(IndexError, match="sample 3 out of range"):
        memory.labels(3)
    replayed = collate([memory[i] for i in range(3)], pad_id=0)
    assert replayed["teacher_attn"].shape == (3, 2, 4, 9)
    assert replayed["teacher_attn"][1, :, :, 4:].abs().max() == 0
    assert torch.equal(replayed["attention_mask"].sum(1), torch.tensor([9, 4, 6]))
    assert replayed["teacher_logits"].shape == (9, 50)
    # Collated in the stored dtype (bf16 by default), not widened to fp32 on the host: half the bytes to a GPU.
    assert replayed["teacher_attn"].dtype == replayed["teacher_logits"].dtype == torch.bfloat16


def test_a_missing_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="task03.json"):
        TaskMemory(tmp_path, 3)


# ---- causal-prefix attention rows -----------------------------------------------------------------------

def causal_rows(H, rows, n):
    """Random attention rows (H, T, n), zero beyond each row's causal prefix, as a teacher produces."""
    keys = torch.arange(n)
    return torch.rand(H, rows.numel(), n) * (keys <= rows[:, None])


def test_prefix_rows_round_trip_exactly_including_repeated_unsorted_first_and_last_rows():
    n, rows = 7, torch.tensor([3, 0, 6, 3, 1, 6])
    dense = causal_rows(2, rows, n)
    packed = pack_rows(dense, rows)
    # Reference: row t's first rows[t]+1 keys, rows concatenated in their stored order.
    expected = torch.cat([dense[:, t, :r + 1] for t, r in enumerate(rows.tolist())], 1)
    assert packed.shape == (2, 4 + 1 + 7 + 4 + 2 + 7)
    assert torch.equal(packed, expected)
    assert torch.equal(unpack_rows(packed, rows, n), dense)


def test_stored_attention_is_causal_prefixes_and_the_manifest_counts_the_bytes(model, tmp_path):
    lengths = [9, 4, 6]
    batch = collate(samples_of(lengths), pad_id=0)
    heads = [(0, 1), (1, 2), (1, 3)]
    write_task(tmp_path, 0, "toy", teacher_signals(model, batch, heads), heads)
    with safe_open(str(tmp_path / "task00.safetensors"), "pt") as f:
        for i, n in enumerate(lengths):
            assert f.get_tensor(f"{i}.attn").shape == (3, 1 + n + 2 * (n // 2 + 1))
    # Hand count: ids, labels, rows in int64; 3 answer rows of 50 bf16 logits; 3 heads' prefixes in bf16.
    prefix = [1 + n + 2 * (n // 2 + 1) for n in lengths]
    expected = sum(8 * (2 * n + 4) + 2 * 3 * 50 + 2 * 3 * p for n, p in zip(lengths, prefix))
    assert json.loads((tmp_path / "task00.json").read_text())["bytes"] == expected
    dense_rows = sum(2 * 3 * 4 * n for n in lengths)                  # today's (|H|, T, n) layout
    assert expected == sum(8 * (2 * n + 4) + 300 for n in lengths) + dense_rows - 2 * 3 * sum(
        4 * n - p for n, p in zip(lengths, prefix))


def test_fp8_attention_rows_halve_the_bytes_within_e5m2_precision(model, tmp_path):
    torch.manual_seed(0)
    batch = collate(samples_of([40, 33]), pad_id=0)
    heads = [(0, 1), (1, 2)]
    exact = teacher_signals(model, batch, heads, dtype=torch.float32)
    for root, attn_dtype in (("bf16", None), ("fp8", torch.float8_e5m2)):
        write_task(tmp_path / root, 0, "toy", teacher_signals(model, batch, heads, torch.bfloat16, attn_dtype=attn_dtype), heads)
    bf16, fp8 = (json.loads((tmp_path / r / "task00.json").read_text())["bytes"] for r in ("bf16", "fp8"))
    memory = TaskMemory(tmp_path / "fp8", 0)
    assert memory[0]["attn"].dtype == torch.float8_e5m2 and memory[0]["logits"].dtype == torch.bfloat16
    logits_bytes = sum(2 * s["logits"].numel() + 16 * s["input_ids"].numel() + 8 * 4 for s in exact)
    assert fp8 - logits_bytes == (bf16 - logits_bytes) // 2                 # the attention rows alone halve
    for i, s in enumerate(exact):
        a, q = s["attn"], memory[i]["attn"].float()
        big = a >= 2 ** -14                                                  # e5m2's normal range
        assert ((q[big] - a[big]).abs() <= a[big] / 8 + 1e-12).all()        # 2 mantissa bits: ≤ 12.5%
        kl = (a * (a.clamp_min(1e-30).log() - (q / q.sum(-1, keepdim=True)).clamp_min(1e-30).log())).sum(-1)
        assert kl.max() < 5e-3                                               # the distilled rows barely move


def test_writing_refuses_attention_beyond_a_rows_causal_prefix(tmp_path):
    sample = {"input_ids": torch.arange(5), "labels": torch.arange(5), "rows": torch.tensor([1, 4]),
              "logits": torch.zeros(4, 50), "attn": torch.ones(1, 2, 5)}
    with pytest.raises(ValueError, match="sample 0: attn has non-zero entries beyond"):
        write_task(tmp_path, 0, "bad", [sample], [(0, 0)])
    sample["attn"] = torch.ones(1, 3, 5)
    with pytest.raises(ValueError, match=r"sample 0: attn is \(1, 3, 5\), expected \(\|H\|, 2, 5\)"):
        write_task(tmp_path, 0, "bad", [sample], [(0, 0)])


# ---- top-k teacher logits -----------------------------------------------------------------------------

def test_topk_signals_are_torch_topk_of_the_teachers_log_softmax(model, tmp_path):
    batch = collate(samples_of([7, 5]), pad_id=0)
    signals = teacher_signals(model, batch, heads=[(1, 1)], dtype=torch.float32, topk=6)
    with torch.no_grad():
        full = model(batch["input_ids"][:1, :7])[0]
    values, ids = full[3:6].log_softmax(-1).topk(6, -1)          # the positions that predict labels 4, 5, 6
    torch.testing.assert_close(signals[0]["topk_logp"], values)
    assert torch.equal(signals[0]["topk_ids"], ids.to(torch.int16)) and signals[0]["topk_ids"].dtype == torch.int16
    assert "logits" not in signals[0]
    write_task(tmp_path, 0, "toy", signals, [(1, 1)])
    memory = TaskMemory(tmp_path, 0)
    assert set(memory[0]) == {"input_ids", "labels", "rows", "attn", "topk_logp", "topk_ids"}
    assert memory[0]["topk_ids"].dtype == torch.int64 and torch.equal(memory[0]["topk_ids"], ids)
    replayed = collate([memory[0], memory[1]], pad_id=0)
    assert replayed["teacher_topk_ids"].shape == (6, 6) and replayed["teacher_topk_ids"].dtype == torch.int64
    assert replayed["teacher_topk_logp"].dtype == torch.float32 and "teacher_logits" not in replayed


def test_topk_must_fit_the_vocabulary(model):
    batch = collate(samples_of([5]), pad_id=0)
    with pytest.raises(ValueError, match=r"topk must be in \[0, 50\]"):
        teacher_signals(model, batch, heads=[], topk=51)


def test_collate_stacks_teacher_tokens_in_the_batchs_row_major_label_order():
    # Labels with gaps, in samples of different lengths; each stored teacher row peaks at the label it predicts.
    samples = []
    for n, labelled in [(6, [2, 3, 5]), (4, [1]), (7, [4, 6])]:
        ids = torch.randint(3, 50, (n,))
        labels = torch.full((n,), -100)
        labels[labelled] = ids[labelled]
        peaked = F.one_hot(ids[labelled], 50).float() * 10
        samples.append({"input_ids": ids, "labels": labels, "logits": peaked,
                        "topk_logp": peaked.log_softmax(-1).topk(2, -1).values,
                        "topk_ids": peaked.topk(2, -1).indices})
    batch = collate(samples, pad_id=0)
    order = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    assert torch.equal(batch["teacher_logits"].argmax(-1), order)
    assert torch.equal(batch["teacher_topk_ids"][:, 0], order)
    # The student's own (B, S, V) output is read at the same positions: equal distributions give zero KL.
    student = torch.randn(3, 7, 50)
    predicting = batch["labels"][:, 1:] != -100
    batch["teacher_logits"] = student[:, :-1][predicting]
    torch.testing.assert_close(logit_kl(student, batch), torch.zeros(6), atol=1e-6, rtol=0)


# ---- logit_kl (Eq. 3) -----------------------------------------------------------------------------------

def naive_bucket_kl(student, ids, logp):
    """KL over the k stored tokens and one rest bucket, from the full softmax, written out in float64."""
    out = []
    for s, i, lp in zip(student.double(), ids, logp.double()):
        q = s.softmax(-1)
        p_top, q_top = lp.exp(), q[i]
        p = torch.cat([p_top, (1 - p_top.sum()).clamp(min=0)[None]])
        rest = torch.ones_like(q, dtype=torch.bool)
        rest[i] = False
        q = torch.cat([q_top, q[rest].sum()[None]])                 # empty sum 0 when k = V
        out.append(sum(pj * (pj.log() - qj.log()) for pj, qj in zip(p, q) if pj > 0))
    return torch.stack(out)


def topk_batch(teacher, k, dtype=torch.float32):
    logp, ids = teacher.double().log_softmax(-1).topk(k, -1)
    return {"teacher_topk_ids": ids, "teacher_topk_logp": logp.to(dtype).float()}


def test_logit_kl_on_full_logits_is_kl_div_per_token():
    student, teacher = torch.randn(5, 40) * 3, torch.randn(5, 40) * 3
    expected = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(logit_kl(student, {"teacher_logits": teacher}), expected)


def test_logit_kl_with_k_equal_to_the_vocabulary_is_the_full_kl_in_value_and_gradient():
    student, teacher = (torch.randn(5, 40) * 3).requires_grad_(), torch.randn(5, 40) * 3
    full = logit_kl(student, {"teacher_logits": teacher})
    coarse = logit_kl(student, topk_batch(teacher, 40))
    torch.testing.assert_close(coarse, full, atol=2e-5, rtol=1e-5)
    # The rest bucket is empty: it must contribute neither a value nor a NaN gradient.
    grad_full, = torch.autograd.grad(full.sum(), student)
    grad_coarse, = torch.autograd.grad(coarse.sum(), student)
    torch.testing.assert_close(grad_coarse, grad_full, atol=1e-5, rtol=1e-4)
    # Rounding can leave Σp a hair below 1 (here 1e-6): that phantom rest mass must stay a rounding-sized error.
    shifted = topk_batch(teacher, 40)
    shifted["teacher_topk_logp"] -= 1e-6
    torch.testing.assert_close(logit_kl(student, shifted), full, atol=1e-4, rtol=0)


def test_logit_kl_with_k_below_the_vocabulary_is_the_coarsened_kl_and_never_negative():
    student, teacher = torch.randn(6, 40) * 3, torch.randn(6, 40) * 3
    student[0, :5] += 40                      # a confident student: its rest mass is ~1e-17, not 1 − Σq = 0
    teacher[1] = student[1]                   # identical distributions: the coarsened KL is 0 as well
    for k in (1, 5, 39):
        for dtype in (torch.float32, torch.bfloat16):     # bf16 logp can sum above 1: the rest clamps to 0
            batch = topk_batch(teacher, k, dtype)
            kl = logit_kl(student, batch)
            expected = naive_bucket_kl(student, batch["teacher_topk_ids"], batch["teacher_topk_logp"])
            torch.testing.assert_close(kl.double(), expected, atol=1e-5, rtol=1e-5)
            assert kl.dtype == torch.float32 and (kl >= -1e-6).all()
    assert logit_kl(student, topk_batch(teacher, 5))[1].abs() < 1e-6


def test_logit_kl_gradient_matches_autograd_of_the_naive_coarsened_kl():
    student = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    batch = topk_batch(torch.randn(3, 7), 3, torch.float64)
    batch["teacher_topk_logp"] = batch["teacher_topk_logp"].double()
    assert torch.autograd.gradcheck(lambda s: logit_kl(s, batch), (student,))
    ours = torch.autograd.grad(logit_kl(student, batch).sum(), student)[0]
    naive = torch.autograd.grad(naive_bucket_kl(student, batch["teacher_topk_ids"],
                                                batch["teacher_topk_logp"]).sum(), student)[0]
    torch.testing.assert_close(ours, naive)
    full = {"teacher_logits": torch.randn(3, 7, dtype=torch.float64)}
    assert torch.autograd.gradcheck(lambda s: logit_kl(s, full), (student,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the teacher runs there, signals come to the CPU")
def test_teacher_signals_of_a_gpu_model_are_cpu_tensors_equal_to_the_cpu_ones(model):
    batch = collate(samples_of([7, 5]), pad_id=0)
    on_cpu = teacher_signals(model, batch, [(0, 1)], dtype=torch.float32, topk=4)
    on_gpu = teacher_signals(model.cuda(), {k: v.cuda() for k, v in batch.items()}, [(0, 1)], torch.float32, 4)
    for a, b in zip(on_cpu, on_gpu):
        for key in a:
            assert b[key].device.type == "cpu"
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
