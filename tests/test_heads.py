"""Head scoring: sensitivity, forgettability, importance and budgets on toy models with known answers."""
import copy
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minseekr.network.model import ModelArgs, Transformer, sequence_loss
from minseekr.seekr import heads
from minseekr.seekr.heads import (HeadScores, attention_at_rows, attention_change, forgettability, importance,
                                  normalize_per_layer, sample_query_rows, select_heads, task_sensitivity)

V = 61


def tiny(**kw):
    args = ModelArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, hidden_dim=48), **kw})
    model = Transformer(args)
    model.init_weights(0.3)
    return model.eval()


def padded_batch(lengths=(9, 6, 4), n_answer=3, side="left"):
    """A padded batch: labels on each sample's last n_answer real tokens, pads id 0 with mask 0."""
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    labels = torch.full((len(lengths), S), -100)
    for b, n in enumerate(lengths):
        real = slice(S - n, S) if side == "left" else slice(0, n)
        mask[b, real] = 1
        ids[b, real] = torch.randint(1, V, (n,))
        labels[b, real.stop - n_answer:real.stop] = ids[b, real.stop - n_answer:real.stop]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def left_padded_batch(lengths=(9, 6, 4), n_answer=3):
    return padded_batch(lengths, n_answer, "left")


def valid_entries(mask):
    """(B, S, S) causal entries between real tokens, built independently of heads.py."""
    real = mask.bool()
    S = real.shape[1]
    return torch.ones(S, S).tril().bool() & real[:, None, :] & real[:, :, None]


def retain_grad_maps(model, batch):
    """∂L/∂A (B, H, S, S) per layer from materialised maps with retain_grad; the sum of per-sample losses."""
    model = copy.deepcopy(model)
    logits, maps = model(batch["input_ids"], batch["attention_mask"], return_attn=True)
    for a in maps:
        a.retain_grad()
    sequence_loss(logits, batch["labels"]).sum().backward()
    return [a.grad for a in maps]


def frobenius_over(grads, entries):
    """Mean over samples of the Frobenius norm over `entries` (B, S, S): (L, H)."""
    return torch.stack([(g.square() * entries[:, None]).sum((-2, -1)).sqrt().mean(0) for g in grads])


def two_batches():
    """Two batches of different sizes and lengths (3 and 2 samples)."""
    return [left_padded_batch((9, 6, 4)), left_padded_batch((8, 5), n_answer=2)]


# --- task sensitivity -------------------------------------------------------------------------------------


def test_sensitivity_equals_retain_grad_on_full_maps_with_left_padding_and_gqa(monkeypatch):
    monkeypatch.setattr(heads, "CHUNK_ELEMENTS", 50)   # force several row chunks
    model = tiny()
    batches = two_batches()
    got = task_sensitivity(model, batches)
    per_batch = [frobenius_over(retain_grad_maps(model, b), valid_entries(b["attention_mask"])) for b in batches]
    expected = (per_batch[0] * 3 + per_batch[1] * 2) / 5
    assert got.shape == (2, 4) and (got > 0).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sensitivity_equals_retain_grad_on_transformers_eager_attentions():
    model = tiny()
    batch = left_padded_batch((9, 6, 4))
    cfg = LlamaConfig(**model.args.to_hf_config(), attn_implementation="eager")
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(model.state_dict())
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = hf(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    sequence_loss(out.logits, batch["labels"]).sum().backward()
    expected = frobenius_over([a.grad for a in out.attentions], valid_entries(mask))
    torch.testing.assert_close(task_sensitivity(model, [batch]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sensitivity_options_match_their_naive_definitions(side):
    model = tiny()
    batch = padded_batch((9, 6, 4), side=side)
    grads = retain_grad_maps(model, batch)
    valid = valid_entries(batch["attention_mask"])
    everything = torch.ones_like(valid)

    def mean_square(entries):
        return torch.stack([((g.square() * entries[:, None]).sum((-2, -1)) / entries.sum((-2, -1))[:, None]).mean(0)
                            for g in grads])

    def check(expected, **options):
        torch.testing.assert_close(task_sensitivity(model, [batch], **options), expected, atol=1e-5, rtol=0)

    check(frobenius_over(grads, everything), entries="all")
    check(mean_square(valid), norm="mean_square")
    check(mean_square(everything), entries="all", norm="mean_square")
    # Masked entries carry gradient (⟨∂L/∂o_q, v_k⟩ is not zero for a future key), so the option matters.
    assert (task_sensitivity(model, [batch], entries="all") > task_sensitivity(model, [batch]) + 1e-6).all()


def test_sensitivity_leaves_grads_and_mode_alone_and_works_on_frozen_models():
    model = tiny().train()
    batch = left_padded_batch()
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    s = task_sensitivity(model, [batch])
    assert model.training
    assert torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")
    frozen = tiny()
    frozen.load_state_dict(model.state_dict())
    frozen.requires_grad_(False)
    torch.testing.assert_close(task_sensitivity(frozen, [batch]), s, atol=1e-6, rtol=0)
    assert not frozen.training


def test_a_head_with_zero_values_or_zero_output_columns_has_zero_sensitivity():
    model = tiny(n_kv_heads=4)   # one value head per query head
    D = model.args.head_dim
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[1 * D:2 * D] = 0    # V of head (0, 1) is 0: ∂L/∂A = ∂L/∂O·0
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * D:3 * D] = 0  # head (1, 2) unread: ∂L/∂O = 0
    s = task_sensitivity(model, [left_padded_batch()])
    zero = torch.zeros(2, 4, dtype=torch.bool)
    zero[0, 1] = zero[1, 2] = True
    assert (s[zero] == 0).all() and (s[~zero] > 1e-4).all()


def test_sensitivity_refuses_samples_without_labels_and_bad_options():
    model = tiny()
    batch = left_padded_batch()
    batch["labels"][1] = -100
    with pytest.raises(ValueError, match=r"labels: samples \[1\]"):
        task_sensitivity(model, [batch])
    with pytest.raises(ValueError, match="sensitivity norm must be one of frobenius|mean_square"):
        task_sensitivity(model, [left_padded_batch()], norm="max")
    with pytest.raises(ValueError, match="sensitivity entries must be one of valid|all"):
        task_sensitivity(model, [left_padded_batch()], entries="some")


# --- forgettability ---------------------------------------------------------------------------------------


def naive_change(model_a, model_b, batch, rows=None, norm="frobenius"):
    """Per-head mean over samples of the change of full materialised maps, at `rows` if given: (L, H).

    At sampled rows the Frobenius norm is sqrt(n/T · Σ over the T rows), n the sample's real tokens."""
    with torch.no_grad():
        _, maps_a = model_a(batch["input_ids"], batch["attention_mask"], return_attn=True)
        _, maps_b = model_b(batch["input_ids"], batch["attention_mask"], return_attn=True)
    entries = valid_entries(batch["attention_mask"]).float()                        # (B, S, S)
    result = []
    for a, b in zip(maps_a, maps_b):
        d2 = (a - b).square() * entries[:, None]                                    # (B, H, S, S)
        n = entries
        scale = torch.ones(len(batch["input_ids"]), 1)
        if rows is not None:
            d2 = torch.stack([d2[i][:, rows[i]] for i in range(len(rows))])         # (B, H, T, S)
            n = torch.stack([entries[i][rows[i]] for i in range(len(rows))])
            scale = batch["attention_mask"].sum(-1, keepdim=True) / rows.shape[1]
        sums = d2.sum((-2, -1))
        result.append(((sums * scale).sqrt() if norm == "frobenius" else sums / n.sum((-2, -1))[:, None]).mean(0))
    return torch.stack(result)


def nudged(model, layer, head, scale=0.5):
    """A copy whose query weights of one head (its q_proj rows) are perturbed."""
    other = copy.deepcopy(model)
    D = model.args.head_dim
    with torch.no_grad():
        w = other.model.layers[layer].self_attn.q_proj.weight[head * D:(head + 1) * D]
        w += scale * torch.randn_like(w)
    return other


@pytest.mark.parametrize("norm", ["frobenius", "mean_square"])
def test_changing_one_head_of_the_last_layer_changes_only_that_head(norm):
    before = tiny()
    after = nudged(before, layer=1, head=3)
    batch = left_padded_batch()
    f = forgettability(after, before, [batch], norm=norm)
    assert f[1, 3] > 1e-4
    f[1, 3] = 0
    assert torch.equal(f, torch.zeros(2, 4))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("norm", ["frobenius", "mean_square"])
def test_forgettability_matches_full_maps_at_all_rows_and_at_sampled_rows(norm, side):
    before = tiny()
    after = copy.deepcopy(before)
    with torch.no_grad():
        for p in after.parameters():
            p += 0.05 * torch.randn_like(p)
    batch = padded_batch((9, 6, 4), side=side)
    expected = naive_change(before, after, batch, norm=norm)
    torch.testing.assert_close(forgettability(after, before, [batch], norm=norm), expected, atol=1e-6, rtol=0)
    batch = padded_batch((9, 7, 6), side=side)                 # every sample longer than B_T: T = 5 rows each
    rows = sample_query_rows(batch["attention_mask"], 5, torch.Generator().manual_seed(1))
    expected = naive_change(before, after, batch, rows, norm=norm)
    got = forgettability(after, before, [batch], rows=[rows], norm=norm)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_forgettability_at_sampled_rows_is_unbiased_for_the_full_squared_norm_and_exact_with_every_row():
    """Over every draw of T of a sample's n rows, the mean of the squared estimate is the full map's square."""
    import itertools
    before = tiny()
    after = copy.deepcopy(before)
    with torch.no_grad():
        for p in after.parameters():
            p += 0.05 * torch.randn_like(p)
    batch = left_padded_batch((6,))
    full = forgettability(after, before, [batch])
    draws = [torch.tensor([subset]) for subset in itertools.combinations(range(6), 3)]
    mean_square = sum(forgettability(after, before, [batch], rows=[r]).square() for r in draws) / len(draws)
    torch.testing.assert_close(mean_square, full.square(), atol=1e-6, rtol=1e-5)
    every_row = sample_query_rows(batch["attention_mask"], 8)    # B_T ≥ n: each of the 6 rows once
    assert every_row.tolist() == [list(range(6))]
    assert torch.equal(forgettability(after, before, [batch], rows=[every_row]), full)


def test_forgettability_is_attention_at_rows_then_attention_change_over_several_batches():
    before = tiny()
    after = nudged(before, layer=0, head=0)
    batches = two_batches()
    rows = [sample_query_rows(b["attention_mask"], 4, torch.Generator().manual_seed(i)) for i, b in enumerate(batches)]
    stored = attention_at_rows(before, batches, rows)
    assert [m.shape for m in stored] == [(2, 3, 4, 4, 9), (2, 2, 4, 4, 8)]
    torch.testing.assert_close(stored[0].sum(-1), torch.ones(2, 3, 4, 4))       # rows are real: distributions
    split = attention_change(stored, after, batches, rows)
    torch.testing.assert_close(split, forgettability(after, before, batches, rows=rows), atol=1e-7, rtol=1e-6)
    expected = (naive_change(before, after, batches[0], rows[0]) * 3 + naive_change(before, after, batches[1], rows[1]) * 2) / 5
    torch.testing.assert_close(split, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        attention_change(stored[:1], after, batches, rows)


# --- importance and selection -----------------------------------------------------------------------------


def test_a_model_whose_loss_depends_on_one_head_ranks_that_head_first():
    before = tiny()
    D = before.args.head_dim
    with torch.no_grad():
        for layer, block in enumerate(before.model.layers):
            for h in range(4):
                if (layer, h) != (1, 2):
                    block.self_attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
    after = copy.deepcopy(before)
    with torch.no_grad():
        for block in after.model.layers:
            block.self_attn.q_proj.weight += 0.3 * torch.randn_like(block.self_attn.q_proj.weight)
    batch = left_padded_batch()
    scores = HeadScores(2, 4)
    scores.add_task("toy", task_sensitivity(after, [batch]), forgettability(after, before, [batch]))
    assert (scores.forgettability > 0).all()
    ranked = scores.importance().flatten().argsort(descending=True)
    assert ranked[0] == 1 * 4 + 2 and (scores.importance().flatten()[ranked[1:]] == 0).all()
    assert scores.select(1, 1) == [(1, 2)]


def test_normalize_per_layer_divides_by_the_head_sum_and_keeps_zero_layers_zero():
    s = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    torch.testing.assert_close(normalize_per_layer(s), torch.tensor([[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]]))


def test_importance_is_the_product_and_checks_shapes():
    torch.testing.assert_close(importance(torch.tensor([[2.0, 3.0]]), torch.tensor([[0.5, 4.0]])),
                               torch.tensor([[1.0, 12.0]]))
    with pytest.raises(ValueError, match="same"):
        importance(torch.ones(2, 3), torch.ones(3, 2))


@pytest.mark.parametrize("matrix, layer_budget, head_budget, expected", [
    # layer sums 3, 5, 4, 0 -> layers {1, 2}; the tie 2 = 2 in layer 2 goes to the lower head
    ([[1, 1, 1], [5, 0, 0], [2, 2, 0], [0, 0, 0]], 2, 2, [(1, 0), (2, 0)]),
    ([[1, 1, 1], [5, 0, 0], [2, 2, 0], [0, 0, 0]], 2, 3, [(1, 0), (2, 0), (2, 1)]),
    # tied layer sums 4 = 4: the lower layer wins; then the tied heads 2 = 2: the lower head wins
    ([[2, 2, 0], [4, 0, 0], [1, 1, 1]], 1, 1, [(0, 0)]),
    # heads concentrate in one layer although two were selected (layers 0 and 1: 1 wins the 3 = 3 tie)
    ([[9, 8, 7], [1, 1, 1], [3, 0, 0]], 2, 3, [(0, 0), (0, 1), (0, 2)]),
    ([[9, 8, 7], [1, 1, 1], [3, 0, 0]], 2, 4, [(0, 0), (0, 1), (0, 2), (1, 0)]),
    # the single largest head (0, 2) is not chosen: its layer loses the layer budget
    ([[0, 0, 10], [4, 4, 4]], 1, 2, [(1, 0), (1, 1)]),
    # every head
    ([[0, 0, 10], [4, 4, 4]], 2, 6, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]),
])
def test_select_heads_on_hand_made_importances(matrix, layer_budget, head_budget, expected):
    assert select_heads(torch.tensor(matrix, dtype=torch.float32), layer_budget, head_budget) == expected


def test_random_heads_draw_distinct_heads_from_every_layer_seeded():
    picked = heads.random_heads(3, 4, 5, torch.Generator().manual_seed(0))
    assert len(set(picked)) == 5 and picked == sorted(picked) and all(0 <= l < 3 and 0 <= h < 4 for l, h in picked)
    assert picked == heads.random_heads(3, 4, 5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"--head-budget \(B_H\) must be in 1..12"):
        heads.random_heads(3, 4, 13, torch.Generator())


def test_select_heads_names_the_budget_that_is_out_of_range():
    imp = torch.rand(4, 3)
    with pytest.raises(ValueError, match=r"--layer-budget \(B_L\) must be in 1..4 .*got 0"):
        select_heads(imp, 0, 1)
    with pytest.raises(ValueError, match=r"--layer-budget \(B_L\) must be in 1..4 .*got 5"):
        select_heads(imp, 5, 1)
    with pytest.raises(ValueError, match=r"--head-budget \(B_H\) must be in 1..6 .*got 7"):
        select_heads(imp, 2, 7)
    with pytest.raises(ValueError, match=r"--head-budget \(B_H\) must be in 1..6 .*got 0"):
        select_heads(imp, 2, 0)
    with pytest.raises(ValueError, match="NaN"):
        select_heads(torch.tensor([[float("nan"), 1.0]]), 1, 1)


# --- query rows -------------------------------------------------------------------------------------------


def test_query_rows_are_distinct_sorted_real_tokens_and_seeded():
    mask = left_padded_batch((12, 10, 7))["attention_mask"]
    rows = sample_query_rows(mask, 6, torch.Generator().manual_seed(0))
    assert rows.shape == (3, 6) and rows.dtype == torch.long
    assert (mask.gather(1, rows) == 1).all()
    assert all(len(set(r.tolist())) == 6 and r.tolist() == sorted(r.tolist()) for r in rows)
    assert torch.equal(rows, sample_query_rows(mask, 6, torch.Generator().manual_seed(0)))
    assert not torch.equal(rows, sample_query_rows(mask, 6, torch.Generator().manual_seed(1)))


def test_a_sample_shorter_than_the_budget_gets_each_real_row_once_then_padding():
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    rows = sample_query_rows(mask, 5, torch.Generator().manual_seed(0))
    assert rows[0].tolist() == [3, 4, 5, heads.PAD_ROW, heads.PAD_ROW]
    assert len(set(rows[1].tolist())) == 5
    assert sample_query_rows(mask, 0).tolist() == [[3, 4, 5, -1, -1, -1], [0, 1, 2, 3, 4, 5]]   # B_T = 0: every row
    assert sample_query_rows(mask[:1], 5).tolist() == [[3, 4, 5]]                                # T = most rows
    with pytest.raises(ValueError, match="sample 1 has no real token"):
        sample_query_rows(torch.tensor([[1, 1], [0, 0]]), 2)
    with pytest.raises(ValueError, match=r"query budget \(B_T\)"):
        sample_query_rows(mask, -1)


def test_padding_rows_change_nothing_in_forgettability_or_the_stored_rows():
    before = tiny()
    after = nudged(before, layer=0, head=2)
    batch = left_padded_batch((9, 4))
    rows = sample_query_rows(batch["attention_mask"], 6, torch.Generator().manual_seed(0))
    assert (rows[1] == heads.PAD_ROW).sum() == 2                 # 4 real rows of 6
    maps = attention_at_rows(before, [batch], [rows])[0]
    assert (maps[:, 1, :, 4:] == 0).all()                        # padding rows are zero rows
    per_sample = [forgettability(after, before, [{k: v[b:b + 1] for k, v in batch.items()}], rows=[rows[b:b + 1, :n]])
                  for b, n in ((0, 6), (1, 4))]
    torch.testing.assert_close(forgettability(after, before, [batch], rows=[rows]), sum(per_sample) / 2,
                               atol=1e-6, rtol=1e-5)


# --- HeadScores -------------------------------------------------------------------------------------------


def test_head_scores_accumulate_tasks_and_round_trip_through_safetensors(tmp_path):
    s1, s2 = torch.rand(3, 4), torch.rand(3, 4)
    f1, f2 = torch.rand(3, 4), torch.rand(3, 4)
    scores = HeadScores(3, 4)
    assert torch.equal(scores.importance(), torch.zeros(3, 4))   # Algorithm 1, line 1
    scores.add_task("FOMC", s1, f1)
    scores.add_task("NumGLUE-cm", s2, f2)
    expected = (s1 / s1.sum(1, keepdim=True) + s2 / s2.sum(1, keepdim=True)) * (f1 + f2)
    torch.testing.assert_close(scores.importance(), expected)
    path = tmp_path / "scores.safetensors"
    scores.save(path)
    assert os.listdir(tmp_path) == ["scores.safetensors"]   # no temporary file left behind
    loaded = HeadScores.load(path)
    assert (loaded.n_layers, loaded.n_heads, loaded.tasks) == (3, 4, ["FOMC", "NumGLUE-cm"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.task_sensitivity, [s1, s2]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.task_forgettability, [f1, f2]))
    assert loaded.select(2, 3) == scores.select(2, 3)
    official = s1 / s1.sum(1, keepdim=True) * f1 + s2 / s2.sum(1, keepdim=True) * f2   # Σ_k S̃^k·F^k
    torch.testing.assert_close(scores.importance("official"), official)
    assert scores.select(2, 3, "official") == select_heads(official, 2, 3)
    HeadScores(3, 4).save(path)                              # overwrite with an empty record
    assert HeadScores.load(path).tasks == []
    with pytest.raises(ValueError, match=r"sensitivity of task 'x' has shape \(4, 3\)"):
        scores.add_task("x", torch.rand(4, 3), torch.rand(3, 4))


# --- tools/head_maps.py -----------------------------------------------------------------------------------


def test_head_maps_tool_scores_a_chain_of_models_draws_both_figures_and_selects(tmp_path):
    pytest.importorskip("matplotlib", reason="tools/head_maps.py draws with matplotlib (pip install .[tools])")
    import importlib.util
    spec = importlib.util.spec_from_file_location("head_maps", heads.__file__.replace("minseekr/seekr/heads.py",
                                                                                        "tools/head_maps.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    m0 = tiny()
    m1 = nudged(m0, layer=1, head=3)
    m2 = nudged(m1, layer=0, head=1)   # also moves every map of the later layer 1
    data = [[left_padded_batch()], [left_padded_batch((7, 5))]]
    scores, selected = tool.head_maps([m0, m1, m2], data, tmp_path, names=["a", "b"], query_budget=3,
                                      layer_budget=1, head_budget=2)
    assert scores.tasks == ["a", "b"] and len(selected) == 2
    assert selected == select_heads(scores.importance(), 1, 2)
    f1, f2 = scores.task_forgettability
    assert f1[1, 3] > 0 and f1.count_nonzero() == 1 and f2[0].nonzero().flatten().tolist() == [1] and (f2[1] > 0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head_scores.safetensors", "importance.png", "variation.png"]
    assert HeadScores.load(tmp_path / "head_scores.safetensors").tasks == ["a", "b"]
