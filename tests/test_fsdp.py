"""The hand-written ZeRO-3 engine and the FSDP2 engine against one process and each other, and through their
checkpoints (CPU, gloo).

Each world size (2 and 3) spawns sets of fresh processes: one trains (hand engine plain, with activation
checkpointing and in bf16; both engines plain and with an EWC-style gradient added onto their local shards),
probes, scores heads and distils attention under both engines, exports and loads; the others resume from both
engines' sharded checkpoints, the hand engine's also after `reshard_checkpoint` to the other world sizes
(1, 2, 3). Results come back as files; the tests compare them with a single-process run of the same global batch.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from minseekr.engines.engine import export_hf, load_engine
from minseekr.engines.fsdp import FSDP, all_gather
from minseekr.engines.fsdp_torch import TorchFSDP, decay_groups
from minseekr.network.checkpoint import load_hf
from minseekr.network.model import ModelArgs, Transformer, token_losses
from minseekr.run.resume import load_sharded, reshard_checkpoint, save_sharded
from minseekr.runtime import all_reduce
from minseekr.seekr.heads import task_sensitivity
from minseekr.seekr.kl import AttentionKL

# Odd sizes so that both world sizes pad: a block holds 4255 parameters, the tied root 1219.
ARGS = ModelArgs(dim=23, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=6, vocab_size=52, hidden_dim=37,
                 tie_embeddings=True, max_seq_len=16)
# AdamW's eps sits well above round-off: Adam divides each gradient element by its own magnitude, and an
# element that cancels to ~1e-8 (summed in another order on N ranks) would turn round-off into an update.
STEPS, MICRO, LR, WD, MAX_NORM, EPS = 3, 2, 1e-2, 0.1, 1.0, 1e-4
SPLITS = {1: [5], 2: [3, 2], 3: [2, 2, 1]}  # uneven per-rank shares of a global batch of 5 sequences
FISHER = 5.0  # EWC-style penalty F·(θ − θ*) with F = FISHER·|θ*|, so that each element's F differs
KL_HEADS = {0: [1, 3], 2: [0, 2]}  # distilled heads; layer 2's weights get a gradient only through the probe


def initial_model():
    torch.manual_seed(1234)
    model = Transformer(ARGS)
    model.init_weights(std=0.1)
    return model


def batches():
    """STEPS × MICRO global batches (5, 9) with ~30% of labels ignored, so ranks see unequal token counts."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS * MICRO):
        tokens = torch.randint(0, ARGS.vocab_size, (5, 9), generator=g)
        labels = tokens.masked_fill(torch.rand(5, 9, generator=g) < 0.3, -100)
        out.append((tokens, labels))
    return out


def local(t, rank, world):
    sizes = SPLITS[world]
    return t[sum(sizes[:rank]):sum(sizes[:rank + 1])]


def train(model, rank, world, clip, step, steps=range(STEPS), after_step=None, penalty=lambda: None):
    """Global-token-mean loss per step (summed over micro-batches) and pre-clip gradient norms."""
    losses, norms, data = [], [], batches()
    for s in steps:
        micro = data[s * MICRO:(s + 1) * MICRO]
        n_global = sum((labels[:, 1:] != -100).sum() for _, labels in micro)
        total = torch.zeros(())
        for tokens, labels in micro:
            # Gradients are averaged over ranks, so a rank's loss is its share of the global mean times world.
            tokens, labels = local(tokens, rank, world), local(labels, rank, world)
            loss = token_losses(model(tokens), labels).sum() * world / n_global
            loss.backward()
            total += loss.detach()
        penalty()
        norms.append(float(clip()))
        step()
        losses.append(float(all_reduce(total) / world if world > 1 else total))
        if after_step:
            after_step(s)
    return losses, norms


def engine_train(engine, rank, world, ewc=False, **kw):
    def step():
        engine.optimizer_step(LR)
        engine.zero_grad()
    if ewc:  # as the trainer does it: θ* and F kept per rank in the local shards' shapes, added onto their grads
        anchors = [p.clone() for p, _ in engine.local_shards()]
        pairs = lambda: zip(engine.local_shards(), anchors)
        kw["penalty"] = lambda: [g.add_(FISHER * a.abs() * (p - a)) for (p, g), a in pairs()]
    return train(engine.model, rank, world, lambda: engine.clip_grad_norm_(MAX_NORM), step, **kw)


def seekr_batch():
    """A batch for head scoring and distillation: sample 1 left-padded, 3 query rows per sample, 2 teachers."""
    tokens, labels = batches()[0]
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    g = torch.Generator().manual_seed(11)
    rows = torch.randint(2, 9, (5, 3), generator=g).sort(-1).values
    valid = (torch.arange(9) <= rows[..., None]) & mask.bool()[:, None]                 # (B, T, S)
    teachers = [torch.randn(5, 2, 3, 9, generator=g).masked_fill(~valid[:, None], float("-inf")).softmax(-1)
                for _ in KL_HEADS]
    return {"input_ids": tokens, "labels": labels.masked_fill(mask == 0, -100), "attention_mask": mask,
            "rows": rows, **{f"teacher{layer}": t for layer, t in zip(KL_HEADS, teachers)}}


def seekr_run(model, rank, world):
    """Eq. 7's sensitivity (mean over the global batch) and ∂/∂θ of the mean KL distillation loss of KL_HEADS."""
    batch = {k: local(v, rank, world) for k, v in seekr_batch().items()}
    reduce = all_reduce if world > 1 else lambda t: t
    sensitivity = reduce(task_sensitivity(model, [batch]) * len(batch["rows"])) / 5
    pairs = [(layer, head) for layer, heads in KL_HEADS.items() for head in heads]
    teacher = torch.cat([batch[f"teacher{layer}"] for layer in KL_HEADS], 1)             # (B, 4, T, S) in pair order
    probe = AttentionKL(pairs, batch["rows"], teacher, batch["attention_mask"])
    model(batch["input_ids"], batch["attention_mask"], probe=probe)
    loss = probe.total() * world / 5  # this rank's share of the global mean, times world (grads are averaged)
    loss.backward()
    return {"sensitivity": sensitivity, "kl": reduce(loss.detach()) / world}


def full_grads(engine):
    """{name: full gradient} of either engine (zeros where backward gave none)."""
    if isinstance(engine, FSDP):
        return gathered(engine, "grad")
    engine.trainable()
    return {n: p.grad.full_tensor() for n, p in engine.params.items()}


def gathered(engine, attr):
    """{name: full tensor} of the engine's shard (attr='shard') or gradient shard (attr='grad')."""
    out = {}
    for u in engine.units:
        flat = torch.empty(u.padded)
        all_gather(flat, getattr(u, attr))
        out.update({n: t.view(s).clone() for n, s, t in zip(u.names, u.shapes, flat.split(u.numels + [u.pad]))})
    return out


def probe_run(model, rank, world, after_grad=lambda: None):
    """∂L/∂O of every layer's attention output via autograd.grad, then backward of a loss on layer 1's O alone."""
    outs = {}
    tokens, labels = (local(t, rank, world) for t in batches()[0])
    logits = model(tokens, probe=lambda layer, q, k, v, out: outs.setdefault(layer, out))
    loss = token_losses(logits, labels).sum()
    grads = torch.autograd.grad(loss, [outs[i] for i in range(ARGS.n_layers)], retain_graph=True)
    after_grad()
    outs.clear()
    model(tokens, probe=lambda layer, q, k, v, out: outs.setdefault(layer, out))
    (outs[1] ** 2).sum().backward()  # reaches block 1 only through the probe, never through its output
    return {f"dO{i}": g.contiguous() for i, g in enumerate(grads)}


def held(engine):
    """Numel of the fp32 state this rank owns, and bytes still gathered in the all-gather buffers."""
    owned = sum(t.numel() for u in engine.units for t in (u.shard, u.grad, u.exp_avg, u.exp_avg_sq))
    return owned, sum(u.buffer.untyped_storage().nbytes() for u in engine.units)


def save0(rank, tensors, path):
    """Rank 0 writes what every rank computed (the gathers are collectives, the file is written once)."""
    if rank == 0:
        save_file(tensors, path)


def worker(rank, world, tmp, task):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg-{task}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tmp, r, held_ranks = Path(tmp), {}, {}
    if task == "train":
        engine = FSDP(initial_model(), weight_decay=WD, eps=EPS)
        r["params_left_on_model"] = len(list(engine.model.parameters()))
        held_ranks["hand_local"] = [[list(p.shape), list(g.shape)] for p, g in engine.local_shards()]
        save = lambda s: s == 1 and save_sharded(engine, tmp / "ckpt", meta={"next_step": 2})
        r["losses"], r["norms"] = engine_train(engine, rank, world, after_step=save)
        held_ranks["owned"], r["gathered_after_training"] = held(engine)
        save0(rank, gathered(engine, "shard"), tmp / "fsdp.safetensors")
        export_hf(engine, tmp / "hf-export", dtype=torch.float32, max_shard_size=20_000 if world == 3 else 2**30)

        ac = FSDP(initial_model(), weight_decay=WD, eps=EPS, activation_checkpointing=True, prefetch=False)
        r["ac_losses"], _ = engine_train(ac, rank, world)
        save0(rank, gathered(ac, "shard"), tmp / "ac.safetensors")

        bf16 = FSDP(initial_model(), compute_dtype=torch.bfloat16, weight_decay=WD, eps=EPS)
        r["bf16_losses"], _ = engine_train(bf16, rank, world)
        r["bf16_dtypes"] = sorted({str(t.dtype) for u in bf16.units for t in (u.shard, u.grad, u.exp_avg_sq)})
        r["bf16_gathered_dtypes"] = sorted({str(u.buffer.dtype) for u in bf16.units})

        for name, kwargs in (("probe", {}), ("probe_ac", dict(activation_checkpointing=True))):
            engine = FSDP(initial_model(), **kwargs)
            after_grad = lambda: r.__setitem__(f"{name}_gathered_after_grad", held(engine)[1])
            grads = probe_run(engine.model, rank, world, after_grad)
            r[f"{name}_gathered"] = held(engine)[1]
            save_file({**grads, **{f"grad.{k}": v for k, v in gathered(engine, "grad").items()}},
                      tmp / f"{name}{rank}.safetensors")

        engine = TorchFSDP(initial_model(), weight_decay=WD, eps=EPS)
        save = lambda s: s == 1 and save_sharded(engine, tmp / "torch-ckpt", meta={"next_step": 2})
        r["torch_losses"], r["torch_norms"] = engine_train(engine, rank, world, after_step=save)
        save0(rank, dict(engine.full_tensors()), tmp / "torch.safetensors")
        export_hf(engine, tmp / "torch-export", dtype=torch.float32, max_shard_size=20_000 if world == 3 else 2**30)
        held_ranks["torch_local"] = [[list(p.shape), list(g.shape)] for p, g in engine.local_shards()]

        for name, cls in (("fsdp_ewc", FSDP), ("torch_ewc", TorchFSDP)):
            engine = cls(initial_model(), weight_decay=WD, eps=EPS)
            r[f"{name}_losses"], _ = engine_train(engine, rank, world, ewc=True)
            save0(rank, dict(engine.full_tensors()), tmp / f"{name}.safetensors")

        for name, cls, ac in (("FSDP", FSDP, False), ("FSDP_ac", FSDP, True), ("TorchFSDP", TorchFSDP, False),
                              ("TorchFSDP_ac", TorchFSDP, True)):
            engine = cls(initial_model(), activation_checkpointing=ac)
            out = seekr_run(engine.model, rank, world)
            save0(rank, {**out, **{f"grad.{n}": g for n, g in full_grads(engine).items()}},
                  tmp / f"seekr_{name}.safetensors")

        save0(rank, dict(load_engine(tmp / "hf-initial", device="cpu").full_tensors()), tmp / "loaded.safetensors")
    else:  # resume: fresh processes, weights from elsewhere, then the step-2 checkpoint `task`
        if task == "torch-ckpt":
            torch.manual_seed(99)
            engine = TorchFSDP(Transformer(ARGS), weight_decay=WD, eps=EPS)
        else:
            engine = load_engine(tmp / "hf-initial", device="cpu", weight_decay=WD, eps=EPS)
        r["meta"] = load_sharded(engine, tmp / task)
        r["losses"], _ = engine_train(engine, rank, world, steps=range(r["meta"]["next_step"], STEPS))
        save0(rank, dict(engine.full_tensors()), tmp / f"resumed-{task}.safetensors")
    if rank == 0:
        (tmp / f"{task}.json").write_text(json.dumps(r))
    (tmp / f"{task}-held{rank}.json").write_text(json.dumps(held_ranks))
    dist.destroy_process_group()


def write_hf(model, path):
    """An HF directory in fp16 over two files with an index, as LLaMA checkpoints ship."""
    path.mkdir()
    state = {k: v.half() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in files.items():
        save_file({k: state[k] for k in keys}, path / file)
    weight_map = {k: f for f, keys in files.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(ARGS.to_hf_config(torch.float16)))
    return state


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and stays fast on a loaded machine (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """The single-process run: same global batches, torch.optim.AdamW, clip_grad_norm_."""
    model = initial_model()
    opt = torch.optim.AdamW(decay_groups(model, WD), lr=LR, eps=EPS)
    clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    losses, norms = train(model, 0, 1, clip, lambda: (opt.step(), opt.zero_grad()))

    ewc = initial_model()  # the same with the EWC-style gradient F·(θ − θ*) added to each .grad
    anchors = {n: p.detach().clone() for n, p in ewc.named_parameters()}
    penalty = lambda: [p.grad.add_(FISHER * anchors[n].abs() * (p.detach() - anchors[n]))
                       for n, p in ewc.named_parameters()]
    opt = torch.optim.AdamW(decay_groups(ewc, WD), lr=LR, eps=EPS)
    clip = lambda: torch.nn.utils.clip_grad_norm_(ewc.parameters(), MAX_NORM)
    ewc_losses, _ = train(ewc, 0, 1, clip, lambda: (opt.step(), opt.zero_grad()), penalty=penalty)

    seekr = initial_model()
    seekr_out = seekr_run(seekr, 0, 1)
    seekr_grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in seekr.named_parameters()}
    return dict(model=model, losses=losses, norms=norms, weights=dict(model.named_parameters()),
                ewc_losses=ewc_losses, ewc_weights=dict(ewc.named_parameters()),
                seekr=seekr_out, seekr_grads=seekr_grads)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world, tmp = request.param, tmp_path_factory.mktemp(f"fsdp{request.param}")
    initial = write_hf(initial_model(), tmp / "hf-initial")
    # A fork server that has imported torch once starts each set of fresh processes in well under a second.
    mp.set_forkserver_preload(["minseekr.engines.fsdp", "minseekr.seekr.heads", "torch.distributed.fsdp", "torch._dynamo"])
    spawn = lambda task, n: mp.start_processes(worker, args=(n, str(tmp), task), nprocs=n, start_method="forkserver")
    spawn("train", world)
    others = sorted({1, 2, 3} - {world})
    for n in others:
        reshard_checkpoint(tmp / "ckpt", tmp / f"ckpt-w{n}", n)
    for task, n in [("ckpt", world), ("torch-ckpt", world)] + [(f"ckpt-w{n}", n) for n in others]:
        spawn(task, n)
    files = {f.stem: load_file(f) for f in tmp.glob("*.safetensors")}
    return dict(world=world, tmp=tmp, initial=initial, files=files, others=others,
                **json.loads((tmp / "train.json").read_text()),
                resumed={task: json.loads((tmp / f"{task}.json").read_text()) for task in
                         ["ckpt", "torch-ckpt"] + [f"ckpt-w{n}" for n in others]},
                held=[json.loads((tmp / f"train-held{r}.json").read_text()) for r in range(world)])


def assert_weights(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_training_matches_one_process_with_clipping_and_accumulation(run, reference):
    assert max(reference["norms"]) > MAX_NORM, "clipping must actually trigger"
    assert run["norms"] == pytest.approx(reference["norms"], rel=1e-5)
    assert run["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert_weights(run["files"]["fsdp"], reference["weights"])


def test_torch_fsdp_engine_trains_like_one_process_and_the_hand_engine(run, reference):
    assert run["torch_norms"] == pytest.approx(reference["norms"], rel=1e-5)  # clipping included
    assert run["torch_losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert run["torch_losses"] == pytest.approx(run["losses"], rel=1e-5)
    assert_weights(run["files"]["torch"], reference["weights"])
    assert_weights(run["files"]["torch"], run["files"]["fsdp"])


def test_each_rank_owns_a_world_th_of_params_grads_and_adam_state(run):
    world, total = run["world"], ARGS.n_layers * 4255 + 1219
    per_rank = 4 * sum(-(-n // world) for n in [1219] + [4255] * ARGS.n_layers)  # shard, grad, 2 moments
    assert [h["owned"] for h in run["held"]] == [per_rank] * world
    assert 4 * total / world <= per_rank < 4 * (total / world + 1 + ARGS.n_layers)
    assert run["params_left_on_model"] == 0 and run["gathered_after_training"] == 0


@pytest.mark.parametrize("engine", ["hand", "torch"])
def test_local_shards_are_a_world_th_of_the_parameters_with_same_shape_grads(run, engine):
    world, total = run["world"], ARGS.n_layers * 4255 + 1219
    shards = [h[f"{engine}_local"] for h in run["held"]]
    assert all(p == g for rank in shards for p, g in rank)
    sizes = [sum(torch.Size(p).numel() for p, _ in rank) for rank in shards]
    if engine == "hand":  # one flat padded shard per unit: the same size on every rank
        assert sizes == [sum(-(-n // world) for n in [1219] + [4255] * ARGS.n_layers)] * world
    else:  # FSDP2 shards each parameter on dim 0 without padding: whole rows, ≤ 1 row per parameter over 1/N
        assert sum(sizes) == total
        rows = sum(p.numel() // p.shape[0] for p in initial_model().parameters())
        assert all(abs(n - total / world) <= rows for n in sizes)


@pytest.mark.parametrize("engine", ["fsdp_ewc", "torch_ewc"])
def test_a_penalty_gradient_added_onto_local_shards_trains_like_one_process(run, reference, engine):
    assert run[f"{engine}_losses"] == pytest.approx(reference["ewc_losses"], rel=1e-5)
    assert_weights(run["files"][engine], reference["ewc_weights"])
    drift = max((reference["ewc_weights"][n] - reference["weights"][n]).abs().max() for n in reference["weights"])
    assert drift > 1e-2  # the penalty changed the training, so the check above can fail


@pytest.mark.parametrize("engine", ["FSDP", "FSDP_ac", "TorchFSDP", "TorchFSDP_ac"])
def test_head_sensitivity_and_attention_kl_backward_match_one_process(run, reference, engine):
    got, ref = run["files"][f"seekr_{engine}"], reference["seekr"]
    torch.testing.assert_close(got["sensitivity"], ref["sensitivity"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got["kl"], ref["kl"], rtol=1e-5, atol=1e-9)
    grads = reference["seekr_grads"]
    # Layer 2's distilled q/k weights are reached only through the probe; its MLP and the final norm not at all.
    assert grads["model.layers.2.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["model.layers.2.mlp.down_proj.weight"].abs().sum() == grads["model.norm.weight"].abs().sum() == 0
    for n, g in grads.items():
        torch.testing.assert_close(got[f"grad.{n}"], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_activation_checkpointing_gives_the_same_training(run):
    assert run["ac_losses"] == pytest.approx(run["losses"], rel=1e-5)
    assert_weights(run["files"]["ac"], run["files"]["fsdp"])


def test_bf16_compute_keeps_fp32_master_state_and_tracks_the_fp32_run(run, reference):
    assert run["bf16_gathered_dtypes"] == ["torch.bfloat16"] and run["bf16_dtypes"] == ["torch.float32"]
    assert run["bf16_losses"] == pytest.approx(reference["losses"], rel=2e-2)  # bf16 rounding, not exactness
    assert run["bf16_losses"] != pytest.approx(reference["losses"], rel=1e-6)  # it did compute in bf16


@pytest.mark.parametrize("name", ["probe", "probe_ac"])
def test_autograd_grad_through_probe_matches_and_leaves_nothing_gathered(run, name):
    world, model = run["world"], initial_model()
    assert run[f"{name}_gathered_after_grad"] == 0 and run[f"{name}_gathered"] == 0
    mean_grad = {}
    for rank in range(world):
        got = run["files"][f"{name}{rank}"]
        for key, g in probe_run(model, rank, world).items():  # ∂L/∂O of this rank's own batch
            torch.testing.assert_close(got[key], g, rtol=1e-5, atol=1e-6, msg=key)
        for n, p in model.named_parameters():
            mean_grad[n] = mean_grad.get(n, 0) + (torch.zeros_like(p) if p.grad is None else p.grad) / world
        model.zero_grad()
    assert all(mean_grad[f"model.layers.1.self_attn.{p}_proj.weight"].abs().sum() > 0 for p in "qkv")
    for n, g in mean_grad.items():  # the gradient shards hold the mean over ranks
        torch.testing.assert_close(got[f"grad.{n}"], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("ckpt, uninterrupted", [("ckpt", "fsdp"), ("torch-ckpt", "torch")])
def test_sharded_checkpoint_resumes_identically_in_fresh_processes(run, ckpt, uninterrupted):
    losses = run["losses"] if ckpt == "ckpt" else run["torch_losses"]
    assert run["resumed"][ckpt]["meta"] == {"next_step": 2}
    assert run["resumed"][ckpt]["losses"] == losses[2:]
    resumed, uninterrupted = run["files"][f"resumed-{ckpt}"], run["files"][uninterrupted]
    assert sorted(resumed) == sorted(uninterrupted)
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in uninterrupted)


def test_resharded_checkpoint_holds_the_same_state_for_another_world_size(run):
    src = run["tmp"] / "ckpt"
    manifest = json.loads((src / "manifest.json").read_text())
    old = [load_file(src / f"rank{r:05d}.safetensors") for r in range(run["world"])]
    for world in run["others"]:
        dst = run["tmp"] / f"ckpt-w{world}"
        new_manifest = json.loads((dst / "manifest.json").read_text())
        assert new_manifest["world"] == world and new_manifest["step"] == 2 and new_manifest["meta"] == manifest["meta"]
        new = [load_file(dst / f"rank{r:05d}.safetensors") for r in range(world)]
        assert sorted(new[0]) == sorted(old[0])
        for i, unit in enumerate(new_manifest["units"]):
            numel = sum(torch.Size(s).numel() for s in unit["shapes"])
            assert unit["padded"] == -(-numel // world) * world
            for key in ("shard", "exp_avg", "exp_avg_sq"):
                name = f"unit{i}.{key}"
                flat = torch.cat([f[name] for f in new])
                assert all(f[name].numel() == unit["padded"] // world for f in new)
                assert torch.equal(flat[:numel], torch.cat([f[name] for f in old])[:numel])
                assert not flat[numel:].any()  # new padding is zero


def test_resharded_checkpoint_continues_training_at_another_world_size(run):
    for world in run["others"]:
        resumed = run["resumed"][f"ckpt-w{world}"]
        assert resumed["meta"] == {"next_step": 2}
        assert resumed["losses"] == pytest.approx(run["losses"][2:], rel=1e-5)  # sums in another order
        assert_weights(run["files"][f"resumed-ckpt-w{world}"], run["files"]["fsdp"])


def test_reshard_refuses_an_existing_target_and_a_torch_fsdp_checkpoint(run):
    tmp = run["tmp"]
    with pytest.raises(FileExistsError, match="ckpt-w1 exists"):
        reshard_checkpoint(tmp / "ckpt", tmp / "ckpt-w1", 1)
    with pytest.raises(ValueError, match="not an FSDP sharded checkpoint"):
        reshard_checkpoint(tmp / "torch-ckpt", tmp / "torch-ckpt-w1", 1)


def test_exported_hf_directory_gives_the_trained_logits(run, reference):
    path = run["tmp"] / "hf-export"
    assert ModelArgs.from_hf_config(json.loads((path / "config.json").read_text())) == ARGS
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    assert (len(files) > 1) == (run["world"] == 3)  # world 3 exports with a small max file size
    state = {k: v for f in files for k, v in load_file(path / f).items()}
    assert "lm_head.weight" not in state  # tied: stored once, as HF does
    model = Transformer(ARGS)
    model.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]})
    tokens = batches()[0][0]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference["model"](tokens), rtol=1e-5, atol=1e-5)


def test_torch_fsdp_export_loads_with_load_hf_and_gives_the_trained_logits(run, reference):
    path, hand = run["tmp"] / "torch-export", run["tmp"] / "hf-export"
    assert (path / "config.json").read_text() == (hand / "config.json").read_text()
    names = lambda p: sorted(k for f in p.glob("*.safetensors") for k in load_file(f))
    assert names(path) == names(hand)  # the same HF names, tied lm_head stored once
    assert (path / "model.safetensors.index.json").exists() == (run["world"] == 3)
    tokens = batches()[0][0]
    with torch.no_grad():
        torch.testing.assert_close(load_hf(path)(tokens), reference["model"](tokens), rtol=1e-5, atol=1e-5)


def test_hf_checkpoint_loads_into_shards_exactly(run):
    loaded, initial = run["files"]["loaded"], run["initial"]
    assert sorted(loaded) == sorted(initial)
    assert all(torch.equal(loaded[n], initial[n].float()) for n in initial)
