"""The fused attention KL (Eq. 5/12) against autograd through full attention maps, and its memory contract."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minseekr.network.model import ModelArgs, Transformer
from minseekr.seekr.kl import CHUNK_ELEMENTS, AttentionKL, _head_chunks, attention_kl, attention_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from dispatched import Dispatched  # noqa: E402

B, H, H_KV, S, D = 2, 4, 2, 9, 5
PAD = 3  # sample 1 is left-padded by PAD tokens
BLOCK = B * 5 * S  # entries of one head's (B, T, S) block at the 5 rows of ROWS


def key_mask():
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :PAD] = False
    return mask


# Row 0 (first token), the first real token after left padding, duplicated rows, the last token.
ROWS = torch.tensor([[0, 4, 4, 8, 1], [PAD, PAD, 5, 8, 4]])


def valid_keys(rows, mask):
    return (torch.arange(S) <= rows[..., None]) & mask[:, None, :]              # (B, T, S)


def select_rows(x, rows):
    """x (B, h, S, ...) at rows (B, T) -> (B, h, T, ...)."""
    return x[torch.arange(x.shape[0])[:, None, None], torch.arange(x.shape[1])[None, :, None], rows[:, None, :]]


def random_teacher(rows, mask, heads=H, dtype=torch.float64, normalised=True):
    a = torch.rand(B, heads, rows.shape[1], S, dtype=dtype) * valid_keys(rows, mask)[:, None]
    return a / a.sum(-1, keepdim=True) if normalised else a


def inputs(dtype=torch.float64, n_kv=H_KV):
    q = torch.randn(B, H, S, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, n_kv, S, D, dtype=dtype, requires_grad=True)
    return q, k


def naive_kl(q, k, rows, teacher, mask):
    """Full (B, H, S, S) masked softmax with autograd, rows picked afterwards, F.kl_div per row."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)                          # (B, H, S, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])                    # (B, H, S, S)
    full_valid = (torch.arange(S)[None, :] <= torch.arange(S)[:, None]) & mask[:, None, None, :]
    log_student = scores.masked_fill(~full_valid, float("-inf")).log_softmax(-1)
    log_student = select_rows(log_student, rows).masked_fill(~valid_keys(rows, mask)[:, None], 0.0)
    return F.kl_div(log_student, teacher, reduction="none").sum(-1)              # (B, H, T)


def fused_kl(q, k, rows, teacher, mask, **kw):
    return attention_kl(select_rows(q, rows), k, rows, teacher, mask, **kw)


def test_attention_rows_are_the_models_attention_maps_at_those_rows():
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=H, n_kv_heads=H_KV, vocab_size=31, hidden_dim=24))
    model.init_weights(0.3)
    seen = {}
    with torch.no_grad():
        _, maps = model(torch.randint(0, 31, (B, S)), key_mask().long(), return_attn=True,
                        probe=lambda layer, q, k, v, out: seen.update(q=q, k=k))
    rows_attn = attention_rows(select_rows(seen["q"], ROWS), seen["k"], ROWS, key_mask())
    assert rows_attn.dtype == torch.float32
    torch.testing.assert_close(rows_attn, select_rows(maps[0], ROWS), atol=1e-6, rtol=0)
    assert (rows_attn[1, :, :2, :PAD] == 0).all() and (rows_attn[0, :, 0, 1:] == 0).all()


def test_hand_computed_kl_and_gradient():
    # One head, d = 1, q = 1, keys 0 and ln 3: row 1 sees p = (1/4, 3/4); teacher (1/2, 1/2).
    q = torch.ones(1, 1, 2, 1, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([0.0, math.log(3)], dtype=torch.float64).view(1, 1, 2, 1).requires_grad_()
    rows = torch.tensor([[1, 0]])
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64).view(1, 1, 2, 2)
    kl = attention_kl(q, k, rows, teacher)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(kl, torch.tensor([[[expected, 0.0]]], dtype=torch.float64))
    kl[0, 0, 0].backward()
    # dKL/dq = Σ_j (p_j − a_j) k_j = (3/4 − 1/2)·ln 3;  dKL/dk_j = (p_j − a_j)·q.
    torch.testing.assert_close(q.grad, torch.tensor([[[[math.log(3) / 4], [0.0]]]], dtype=torch.float64))
    torch.testing.assert_close(k.grad, torch.tensor([[[[-0.25], [0.25]]]], dtype=torch.float64))


def test_kl_is_zero_with_zero_gradient_when_teacher_is_the_student():
    q, k = inputs()
    q_rows = select_rows(q, ROWS)
    kl = attention_kl(q_rows, k, ROWS, attention_rows(q_rows, k, ROWS, key_mask()), key_mask())
    assert kl.abs().max() < 1e-14
    kl.sum().backward()
    assert q.grad.abs().max() < 1e-14 and k.grad.abs().max() < 1e-14


@pytest.mark.parametrize("normalised", [True, False], ids=["teacher_rows_sum_to_1", "unnormalised_teacher"])
@pytest.mark.parametrize("n_kv", [H, H_KV, 1], ids=["mha", "gqa", "mqa"])
def test_gradcheck_in_float64(n_kv, normalised):
    q, k = inputs(n_kv=n_kv)
    q_rows = select_rows(q, ROWS).detach().requires_grad_()
    teacher = random_teacher(ROWS, key_mask(), normalised=normalised)
    assert torch.autograd.gradcheck(lambda q, k: attention_kl(q, k, ROWS, teacher, key_mask(), chunk_elements=3 * BLOCK), (q_rows, k))


@pytest.mark.parametrize("n_kv", [H, H_KV], ids=["mha", "gqa"])
def test_values_and_gradients_equal_the_naive_full_map(n_kv):
    q, k = inputs(n_kv=n_kv)
    teacher = random_teacher(ROWS, key_mask())
    upstream = torch.randn(B, H, ROWS.shape[1], dtype=torch.float64)
    grads = []
    for kl_fn in (naive_kl, fused_kl):
        kl = kl_fn(q, k, ROWS, teacher, key_mask())
        grads.append((kl, *torch.autograd.grad((kl * upstream).sum(), (q, k))))
    for naive, fused in zip(*grads):
        torch.testing.assert_close(fused, naive, atol=1e-6, rtol=0)
    assert grads[1][1][:, :, 6:7].abs().max() == 0, "no row at position 6: its query gets no gradient"


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float8_e5m2], ids=["bf16", "fp8"])
def test_a_rounded_teacher_is_distilled_as_its_renormalised_row_and_never_scores_below_zero(stored):
    """A row stored in bf16 or fp8 no longer sums to 1 (mass m): the value is m·KL(a/m ‖ p), written out here
    with the naive full map, so it is never negative and the student is pulled towards the distribution a/m."""
    q, k = inputs()
    student = attention_rows(select_rows(q, ROWS), k, ROWS, key_mask()).detach()   # the teacher is the student
    teacher = student.to(stored).double()
    mass = teacher.sum(-1)
    assert (mass - 1).abs().max() > 1e-4                                          # rounding moved the mass
    fused = fused_kl(q, k, ROWS, teacher, key_mask())
    renormalised = teacher / mass.clamp_min(1e-300)[..., None]
    naive = mass * naive_kl(q, k, ROWS, renormalised, key_mask())
    torch.testing.assert_close(fused, naive, atol=1e-12, rtol=1e-9)
    assert fused.min() > -1e-12
    grads = torch.autograd.grad(fused.sum(), (q, k))
    torch.testing.assert_close(grads, torch.autograd.grad(naive.sum(), (q, k)), atol=1e-12, rtol=1e-9)


def test_chunked_run_equals_unchunked():
    q, k = inputs()
    teacher = random_teacher(ROWS, key_mask())
    runs = []
    for chunk_elements in (CHUNK_ELEMENTS, 1, 3 * BLOCK, 3 * BLOCK - 1):   # 1 chunk; 1 head each; 3 + 1; 2 + 2
        kl = fused_kl(q, k, ROWS, teacher, key_mask(), chunk_elements=chunk_elements)
        runs.append((kl, *torch.autograd.grad(kl.sum(), (q, k))))
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


def counted(fn):
    """(operations dispatched, values read back) by fn(): kernel launches and host syncs on a GPU."""
    with Dispatched() as c:
        fn()
    return c.ops, c.syncs


def test_a_layers_heads_run_as_one_chunk_whose_operations_do_not_grow_with_them():
    def ops(heads, **kw):
        k = inputs()[1]
        teacher = random_teacher(ROWS, key_mask(), heads=heads)
        q_rows = torch.randn(B, heads, ROWS.shape[1], D, dtype=torch.float64, requires_grad=True)
        kv_heads = torch.arange(heads) // (H // H_KV)
        return counted(lambda: attention_kl(q_rows, k, ROWS, teacher, key_mask(), kv_heads=kv_heads,
                                            **kw).sum().backward())[0]
    assert ops(1) == ops(H)
    assert ops(H, chunk_elements=BLOCK) > ops(H)                          # the check can fail: a chunk per head
    assert _head_chunks(5, 10, 25) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert _head_chunks(5, 10, 1) == [slice(h, h + 1) for h in range(5)]   # at least one head per chunk
    # #14's setting, 30 heads in 6 layers at B = 2, B_T = 100, S = 4096: a layer's 5 heads in one chunk, up to 20.
    assert _head_chunks(5, 2 * 100 * 4096, CHUNK_ELEMENTS) == [slice(0, 20)]


def test_the_probe_reads_no_value_back_in_any_layer():
    # On a GPU every read of a value is a host-device sync; the probe checks the rows once per batch instead.
    q, k = inputs(n_kv=H_KV)
    pairs = [(0, 1), (0, 2), (1, 3)]
    probe = AttentionKL(pairs, ROWS, random_teacher(ROWS, key_mask(), heads=3), key_mask())
    def layers():
        for layer in (0, 1):
            probe(layer, q, k, None, None)
        probe.total().backward()
    assert counted(layers)[1] == 0
    # attention_kl called alone checks the rows and the KV heads it is given with one read-back.
    q_rows, kv_heads = select_rows(q, ROWS), torch.arange(H) // (H // H_KV)
    teacher = random_teacher(ROWS, key_mask())
    assert counted(lambda: attention_kl(q_rows, k, ROWS, teacher, key_mask(), kv_heads=kv_heads))[1] == 1


def test_bf16_inputs_match_fp32_and_return_bf16_gradients():
    q, k = inputs(torch.bfloat16)
    teacher = random_teacher(ROWS, key_mask(), dtype=torch.float32)
    kl = fused_kl(q, k, ROWS, teacher.bfloat16(), key_mask())
    dq, dk = torch.autograd.grad(kl.sum(), (q, k))
    assert kl.dtype == torch.float32 and dq.dtype == dk.dtype == torch.bfloat16
    q32, k32 = (x.detach().float().requires_grad_() for x in (q, k))
    kl32 = fused_kl(q32, k32, ROWS, teacher.bfloat16().float(), key_mask())
    dq32, dk32 = torch.autograd.grad(kl32.sum(), (q32, k32))
    # Same bf16 values computed in fp32: only accumulation order and the final bf16 rounding differ.
    torch.testing.assert_close(kl, kl32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq.float(), dq32, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dk.float(), dk32, atol=1e-2, rtol=1e-2)


def test_a_row_with_no_visible_key_gives_zeros_not_nan():
    q, k = inputs()
    rows = torch.tensor([[0, 1, 2, 3, 4], [0, 1, PAD, 4, 8]])                     # sample 1 rows 0, 1 are padding
    q_rows = select_rows(q, rows)
    assert (attention_rows(q_rows, k, rows, key_mask())[1, :, :2] == 0).all()
    kl = attention_kl(q_rows, k, rows, random_teacher(rows, key_mask()).nan_to_num(0.0), key_mask())
    assert (kl[1, :, :2] == 0).all()
    dq, dk = torch.autograd.grad(kl.sum(), (q, k))
    assert dq.isfinite().all() and dk.isfinite().all()


def saved_float_shapes(fn):
    """Shapes of the floating tensors autograd saves while fn() builds its graph."""
    shapes = []
    def pack(t):
        if t.is_floating_point():
            shapes.append((tuple(t.shape), t.data_ptr()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_graph_saves_no_attention_sized_tensor_but_the_teacher():
    q, k = inputs(n_kv=H_KV)
    q_rows = select_rows(q, ROWS).detach().requires_grad_()
    teacher = random_teacher(ROWS, key_mask())
    big = B * H * ROWS.shape[1] * S                                                # a (B, H, T, S) block
    fused = saved_float_shapes(lambda: attention_kl(q_rows, k, ROWS, teacher, key_mask()))
    assert [s for s, ptr in fused if math.prod(s) >= big] == [tuple(teacher.shape)]
    assert [ptr for s, ptr in fused if math.prod(s) >= big] == [teacher.data_ptr()]
    # The check can fail: the naive route keeps full (B, H, S, S) maps.
    naive = saved_float_shapes(lambda: naive_kl(q, k, ROWS, teacher, key_mask()))
    assert (B, H, S, S) in [s for s, _ in naive]


def test_probe_in_the_model_gives_the_naive_loss_and_parameter_gradients():
    args = ModelArgs(dim=16, n_layers=2, n_heads=H, n_kv_heads=H_KV, vocab_size=31, hidden_dim=24)
    torch.manual_seed(1)
    teacher_model, model = Transformer(args).double(), Transformer(args).double()
    teacher_model.init_weights(0.3)
    model.init_weights(0.3)
    tokens, mask = torch.randint(0, 31, (B, S)), key_mask()
    heads = {0: [1, 2], 1: [3]}                                                   # a GQA group split, one head
    with torch.no_grad():
        _, old_maps = teacher_model(tokens, mask.long(), return_attn=True)
    teacher = {l: select_rows(old_maps[l][:, h], ROWS) for l, h in heads.items()}

    pairs = [(layer, head) for layer, hs in heads.items() for head in hs]
    probe = AttentionKL(pairs, ROWS, torch.cat([teacher[0], teacher[1]], 1), mask, chunk_elements=1)
    logits = model(tokens, mask.long(), probe=probe)
    assert sorted(probe.kl) == [0, 1] and probe.kl[0].shape == (B, 2, ROWS.shape[1])
    probe.total().backward()
    # lm_head, the final norm and the last MLP do not reach any attention: their grad stays None.
    fused_grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    naive_logits, maps = model(tokens, mask.long(), return_attn=True)
    valid = valid_keys(ROWS, mask)[:, None]
    naive = 0
    for l, h in heads.items():
        student = select_rows(maps[l][:, h], ROWS)
        log_student = torch.where(valid, student, 1.0).log()                     # log 1 = 0 off the prefix
        naive = naive + F.kl_div(log_student, teacher[l], reduction="sum")
    naive.backward()
    # model.py computes return_attn's softmax in fp32 even for an fp64 model, so the naive route is
    # fp32-accurate (~1e-6); a wrong scale or a missed GQA group would be off by O(1).
    torch.testing.assert_close(logits, naive_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probe.total(), naive, atol=1e-5, rtol=1e-5)
    assert naive > 0
    for name, p in model.named_parameters():
        if p.grad is None or fused_grads[name] is None:
            assert p.grad is fused_grads[name] is None and "layers.0" not in name, name
        else:
            torch.testing.assert_close(fused_grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert fused_grads["model.layers.1.self_attn.k_proj.weight"].abs().max() > 0


def test_bad_inputs_are_refused_by_name():
    q, k = inputs()
    q_rows = select_rows(q, ROWS)
    teacher = random_teacher(ROWS, key_mask())
    with pytest.raises(ValueError, match="teacher has shape"):
        attention_kl(q_rows, k, ROWS, teacher[:, :1], key_mask())
    with pytest.raises(ValueError, match="rows must be a long tensor"):
        attention_kl(q_rows, k, ROWS.float(), teacher, key_mask())
    with pytest.raises(ValueError, match=r"rows must index positions in \[0, 9\)"):
        attention_kl(q_rows, k, ROWS + 5, teacher, key_mask())
    with pytest.raises(ValueError, match="not a multiple of k's 3 heads"):
        attention_kl(q_rows, torch.randn(B, 3, S, D, dtype=torch.float64), ROWS, teacher, key_mask())
    with pytest.raises(ValueError, match=r"kv_heads must be indices into k's 2 heads, got \[0, 1, 2, 1\]"):
        attention_kl(q_rows, k, ROWS, teacher, key_mask(), kv_heads=torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="teacher requires grad"):
        attention_kl(q_rows, k, ROWS, teacher.requires_grad_(), key_mask())
    with pytest.raises(ValueError, match=r"teacher has shape \(2, 1, 5, 9\), expected \(B, 2, T, S\)"):
        AttentionKL([(0, 0), (1, 2)], ROWS, teacher[:, :1], key_mask())
