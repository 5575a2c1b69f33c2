"""The hand-written ZeRO-3 engine against one process, against FSDP2, and through its checkpoints (CPU, gloo).

Each world size (2 and 3) spawns two sets of fresh processes: one trains (plain, with activation
checkpointing, and with FSDP2), probes, exports and loads; the other resumes from the sharded checkpoint.
Results come back as files; the tests compare them with a single-process run of the same global batch.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from minseekr.fsdp import FSDP, all_gather, all_reduce, apply_torch_fsdp, decay_groups, load_hf_sharded
from minseekr.model import ModelArgs, Transformer, token_losses

# Odd sizes so that both world sizes pad: a block holds 4255 parameters, the tied root 1219.
ARGS = ModelArgs(dim=23, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=6, vocab_size=52, hidden_dim=37,
                 tie_embeddings=True, max_seq_len=16)
# AdamW's eps sits well above round-off: Adam divides each gradient element by its own magnitude, and an
# element that cancels to ~1e-8 (summed in another order on N ranks) would turn round-off into an update.
STEPS, MICRO, LR, WD, MAX_NORM, EPS = 3, 2, 1e-2, 0.1, 1.0, 1e-4
SPLITS = {1: [5], 2: [3, 2], 3: [2, 2, 1]}  # uneven per-rank shares of a global batch of 5 sequences


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


def train(model, rank, world, clip, step, steps=range(STEPS), after_step=None):
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
        norms.append(float(clip()))
        step()
        losses.append(float(all_reduce(total) / world if world > 1 else total))
        if after_step:
            after_step(s)
    return losses, norms


def engine_train(engine, rank, world, **kw):
    def step():
        engine.optimizer_step(LR)
        engine.zero_grad()
    return train(engine.model, rank, world, lambda: engine.clip_grad_norm_(MAX_NORM), step, **kw)


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
    tmp, r = Path(tmp), {}
    if task == "train":
        engine = FSDP(initial_model(), weight_decay=WD, eps=EPS)
        r["params_left_on_model"] = len(list(engine.model.parameters()))
        save = lambda s: s == 1 and engine.save_sharded(tmp / "ckpt", meta={"next_step": 2})
        r["losses"], r["norms"] = engine_train(engine, rank, world, after_step=save)
        r["owned"], r["gathered_after_training"] = held(engine)
        save0(rank, gathered(engine, "shard"), tmp / "fsdp.safetensors")
        engine.export_hf(tmp / "hf-export", dtype=torch.float32, max_shard_bytes=20_000 if world == 3 else 2**30)

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

        model = apply_torch_fsdp(initial_model(), "cpu")
        opt = torch.optim.AdamW(decay_groups(model, WD), lr=LR, eps=EPS)
        clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).full_tensor()
        r["torch_losses"], _ = train(model, rank, world, clip, lambda: (opt.step(), opt.zero_grad()))
        save0(rank, {n: p.full_tensor() for n, p in model.named_parameters()}, tmp / "torch.safetensors")

        save0(rank, dict(load_hf_sharded(tmp / "hf-initial").full_tensors()), tmp / "loaded.safetensors")
    else:  # resume: fresh processes, weights from elsewhere, then the step-2 checkpoint
        engine = load_hf_sharded(tmp / "hf-initial", weight_decay=WD, eps=EPS)
        r["meta"] = engine.load_sharded(tmp / "ckpt")
        r["losses"], _ = engine_train(engine, rank, world, steps=range(r["meta"]["next_step"], STEPS))
        save0(rank, gathered(engine, "shard"), tmp / "resumed.safetensors")
    if rank == 0:
        (tmp / f"{task}.json").write_text(json.dumps(r))
    (tmp / f"{task}-held{rank}.json").write_text(json.dumps(r.get("owned")))
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
    return dict(model=model, losses=losses, norms=norms, weights=dict(model.named_parameters()))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world, tmp = request.param, tmp_path_factory.mktemp(f"fsdp{request.param}")
    initial = write_hf(initial_model(), tmp / "hf-initial")
    # A fork server that has imported torch once starts each set of fresh processes in well under a second.
    mp.set_forkserver_preload(["minseekr.fsdp", "torch.distributed.fsdp", "torch._dynamo"])
    for task in ("train", "resume"):
        mp.start_processes(worker, args=(world, str(tmp), task), nprocs=world, start_method="forkserver")
    files = {f.stem: load_file(f) for f in tmp.glob("*.safetensors")}
    return dict(world=world, tmp=tmp, initial=initial, files=files,
                **json.loads((tmp / "train.json").read_text()),
                resume=json.loads((tmp / "resume.json").read_text()),
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


def test_training_matches_torch_fully_shard(run):
    assert run["torch_losses"] == pytest.approx(run["losses"], rel=1e-5)
    assert_weights(run["files"]["torch"], run["files"]["fsdp"])


def test_each_rank_owns_a_world_th_of_params_grads_and_adam_state(run):
    world, total = run["world"], ARGS.n_layers * 4255 + 1219
    per_rank = 4 * sum(-(-n // world) for n in [1219] + [4255] * ARGS.n_layers)  # shard, grad, 2 moments
    assert run["held"] == [per_rank] * world
    assert 4 * total / world <= per_rank < 4 * (total / world + 1 + ARGS.n_layers)
    assert run["params_left_on_model"] == 0 and run["gathered_after_training"] == 0


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


def test_sharded_checkpoint_resumes_identically_in_fresh_processes(run):
    assert run["resume"]["meta"] == {"next_step": 2}
    assert run["resume"]["losses"] == run["losses"][2:]
    resumed, uninterrupted = run["files"]["resumed"], run["files"]["fsdp"]
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in uninterrupted)


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


def test_hf_checkpoint_loads_into_shards_exactly(run):
    loaded, initial = run["files"]["loaded"], run["initial"]
    assert sorted(loaded) == sorted(initial)
    assert all(torch.equal(loaded[n], initial[n].float()) for n in initial)
