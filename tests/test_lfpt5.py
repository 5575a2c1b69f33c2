"""LFPT5 (#13): the loss is the authors' (1 − kd)·(CE + λ_gen·LM) + kd·KD, as written out here token by token,
the LM covering the prompt and the answer; a finished task's buffer holds samples θ_k wrote in the task's frame
(never a real one) with θ_k's logits under its prompt; a generated continuation counts only when it has an input
and an answer, and is sampled as theirs (top-k, repetition penalty: checked against a naive loop here); what
every PET run owes is in tests/test_pet_runs.py."""
import pytest
import torch
import torch.nn.functional as F
from conftest import logged

from minseekr.evaluation.data import Task
from minseekr.evaluation.synthetic import make_records, train_tokenizer
from minseekr.methods import pseudo
from minseekr.methods.pet import attach_saved
from minseekr.network.checkpoint import load_hf
from minseekr.network.generate import generate, next_token
from minseekr.network.tokenizer import Tokenizer
from minseekr.run.config import ContinualConfig
from minseekr.run.trainer import ContinualTrainer
from minseekr.seekr.buffer import TaskMemory
from test_continual import tiny_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "demo.model"
    train_tokenizer(path)
    return Tokenizer(str(path))


def lfpt5_step(tok, tmp_path, replayed: bool, kd: float, gen_weight: float):
    """One micro-step of LFPT5 on 4 training samples (a replayed batch, with random stored teacher logits, when
    `replayed`): the samples, the prompt, the logged terms and the prompt's gradient."""
    tasks = [Task("rev", make_records("rev", 8, 0), [], make_records("rev", 2, 1))]
    cfg = ContinualConfig(method="lfpt5", lr=1e-2, batch_size=4, epochs=[1], max_len=32, prompt_tokens=3,
                          lfpt5_gen_weight=gen_weight, lfpt5_kd=kd)
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg, tmp_path)
    trainer.method.pet.begin_task(0, trainer.method.embedding_rows)
    samples = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
               for ids, labels in (tok.encode_example(r["prompt"], r["answer"], 32) for r in tasks[0].train[:4])]
    answers = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    generator = torch.Generator().manual_seed(1)
    for s in samples if replayed else []:
        s["logits"] = torch.randn(int((s["labels"][1:] != -100).sum()), tok.vocab_size, generator=generator) * 3
    lm = sum(s["input_ids"].numel() - 1 for s in samples)   # every token after each sample's first
    terms = trainer.micro_step(samples, 1.0, {"tokens": answers, "samples": 4, "rows": 0, "lm": lm},
                               memory="task 0's pseudo-samples" if replayed else None)
    assert all(not p.requires_grad for p in trainer.model.parameters())   # the model frozen, the prompt trained
    return samples, trainer.method.pet.prompt.detach().clone(), terms, trainer.method.pet.prompt.grad.clone()


def naive_lfpt5(tok, samples, prompt, kd: float, gen_weight: float):
    """LFPT5's loss written out token by token, the prompt's 3 vectors read before each sample:
    (1 − kd)·(CE + λ_gen·LM) + kd·KD, CE the mean over answer tokens (EOS included), LM the mean over every token
    after BOS, KD the mean over answer tokens of Σ_v p_v (log p_v − log q_v), p from the stored logits; its terms and
    the prompt's gradient."""
    model = tiny_model(tok.vocab_size)   # the engine's weights, whole
    prompt = prompt.clone().requires_grad_(True)
    ce = lm = kd_sum = 0.0
    n_answer = n_lm = 0
    for s in samples:
        logits = model(s["input_ids"][None], prefix=prompt[None])[0, 3:].float()
        a = 0
        for p in range(1, len(s["input_ids"])):
            loss = F.cross_entropy(logits[p - 1], s["input_ids"][p])
            lm, n_lm = lm + loss, n_lm + 1
            if s["labels"][p] != -100:
                ce, n_answer = ce + loss, n_answer + 1
                if "logits" in s:
                    teacher, student = torch.softmax(s["logits"][a].float(), -1), torch.softmax(logits[p - 1], -1)
                    kd_sum = kd_sum + sum(t * (t.log() - q.log()) for t, q in zip(teacher, student))
                    a += 1
    total = (1 - kd) * (ce / n_answer + gen_weight * lm / n_lm) + kd * kd_sum / n_answer
    grad, = torch.autograd.grad(total, prompt)
    value = lambda x: float(torch.as_tensor(x).detach())   # noqa: E731
    return {"ce": value(ce) / n_answer, "lm": value(lm) / n_lm, "kd": value(kd_sum) / n_answer}, grad


@pytest.mark.parametrize("replayed", [False, True])
def test_the_loss_is_lfpt5s_weighted_sum_written_out(tok, tmp_path, replayed):
    """(1 − kd)·(CE + λ_gen·LM) on a new-task batch, + kd·KD on a replayed one, LM over the prompt and the answer:
    the logged terms and the prompt's gradient against the formula, token by token, at weights far from 0, 1 and
    each other (so that dropping, swapping or changing one shows)."""
    kd, gen_weight = 0.3, 0.7
    samples, prompt, terms, grad = lfpt5_step(tok, tmp_path, replayed, kd, gen_weight)
    want, want_grad = naive_lfpt5(tok, samples, prompt, kd, gen_weight)
    assert terms["replay_ce" if replayed else "task_ce"] == pytest.approx(want["ce"], rel=1e-5)
    assert terms["lm"] == pytest.approx(want["lm"], rel=1e-5)
    if replayed:
        assert want["kd"] > 0.1 and terms["logit_kl"] == pytest.approx(want["kd"], rel=1e-5)
    else:
        assert "logit_kl" not in terms
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_a_finished_tasks_buffer_holds_samples_the_model_wrote_with_its_logits(pet_runs):
    (model_dir, data), out = pet_runs("lfpt5")
    memory = TaskMemory(out / "buffer", 0)
    tok = Tokenizer(str(model_dir / "tokenizer.model"))
    real = {(r["prompt"], r["answer"]) for r in make_records("rev", 24, 0)}
    checkpoint = out / "checkpoints" / "task01"
    model = attach_saved(load_hf(checkpoint), checkpoint).eval()
    assert 1 <= len(memory) <= 6                                  # --replay-ratio 0.25 of 24
    for i in range(len(memory)):
        s = memory[i]
        text = tok.decode(s["input_ids"][s["labels"] == -100])
        answer = tok.decode(s["input_ids"][s["labels"] != -100])
        assert text.startswith("rev:") and text.endswith("=") and answer and (text, answer) not in real
        prefix = model.soft_prompts(model.model.embed_tokens(s["input_ids"][None]), None)
        with torch.no_grad():
            logits = model(s["input_ids"][None], prefix=prefix)[0, prefix.shape[1]:]
        predicting = (s["labels"][1:] != -100).nonzero().squeeze(1)
        torch.testing.assert_close(s["logits"].float(), logits[predicting], rtol=2e-2, atol=2e-2)
    steps = [r for r in logged(out) if "step" in r]
    assert any("replay_ce" in r and "logit_kl" in r and "lm" in r for r in steps if r["task"] == 1)
    new_task = [r for r in steps if "task_ce" in r]
    assert new_task and all("lm" in r for r in new_task)


def test_a_generated_sample_counts_only_with_an_input_and_an_answer(tok, monkeypatch):
    prompts = ["rev:abc=", "rev:bca="]                  # the frame: "rev:" … "="
    rounds = iter([["ab=ba", "cc", "=c", "a="], ["ca=ac"]])
    asked = []

    def write(model, starts, max_new_tokens, **kw):
        asked.append((tok.decode(starts[0]), len(starts)))
        assert (kw["temperature"], kw["top_k"], kw["repetition_penalty"]) == (1.0, 64, 2.5)   # LFPT5's sampling
        assert kw.get("top_p", 1.0) == 1.0
        return [tok.encode(text, bos=False) for text in next(rounds)]
    monkeypatch.setattr(pseudo, "generate", write)
    samples = pseudo.generate_samples(tiny_model(tok.vocab_size), tok, prompts, 4, 8, seed=0, tries=2)
    assert asked == [("rev:", 4), ("rev:", 3)]        # continued from P; the second round redraws the three lost
    assert samples == [{"prompt": "rev:ab=", "answer": "ba"}, {"prompt": "rev:ca=", "answer": "ac"}]
    # SAPT needs inputs only: a continuation that never reaches "=" is all input, one without any input is not
    rounds = iter([["ab=ba", "cc", "=c", "a="]])
    inputs = pseudo.generate_samples(tiny_model(tok.vocab_size), tok, prompts, 4, 8, seed=0, answers=False, tries=1)
    assert [x["prompt"] for x in inputs] == ["rev:ab=", "rev:cc=", "rev:a="]


def test_top_k_and_the_repetition_penalty_sample_as_written_out():
    """LFPT5 samples with top-k and a repetition penalty: a seen token's logit is divided by the penalty (multiplied
    where negative), then only the k largest stay."""
    logits = torch.tensor([[2.0, 1.0, -0.5, -1.0]]).expand(20000, -1)
    seen = torch.tensor([[True, False, False, True]]).expand(20000, -1)
    draws = next_token(logits, 1.0, 1.0, torch.Generator().manual_seed(0), top_k=2, repetition_penalty=2.0, seen=seen)
    # penalised [1, 1, −0.5, −2]: the top 2 are tokens 0 and 1, equally likely (without the penalty 0.73 / 0.27)
    torch.testing.assert_close(torch.bincount(draws, minlength=4) / 20000., torch.tensor([0.5, 0.5, 0, 0]),
                               atol=0.015, rtol=0)
    draws = next_token(logits, 1.0, 1.0, torch.Generator().manual_seed(1), repetition_penalty=2.0, seen=seen)
    torch.testing.assert_close(torch.bincount(draws, minlength=4) / 20000., torch.softmax(torch.tensor(
        [1.0, 1.0, -0.5, -2.0]), 0), atol=0.015, rtol=0)   # no top-k: all four, the seen negative one lowered
    assert next_token(torch.tensor([[2.0, 1.5]]), repetition_penalty=2.0, seen=torch.tensor([[True, False]])) == 1


def test_generation_penalises_the_tokens_it_generated_as_a_naive_loop_does(tok):
    """Greedy with a repetition penalty against a loop that reruns the whole sequence and penalises each token
    generated so far (not the prompt's), once per token."""
    model = tiny_model(tok.vocab_size).eval()
    prompts, penalty = [[1, 5, 9, 5], [1, 7]], 3.0
    want = []
    for prompt in prompts:
        sequence, new = list(prompt), []
        for _ in range(10):
            with torch.no_grad():
                logits = model(torch.tensor([sequence]))[0, -1].float()
            for t in set(new):
                logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
            new.append(int(logits.argmax()))
            sequence.append(new[-1])
        want.append(new)
    assert generate(model, prompts, 10, repetition_penalty=penalty) == want
    assert generate(model, prompts, 10, repetition_penalty=penalty, use_cache=False) == want
    assert generate(model, prompts, 10) != want     # the penalty changes what this model writes


def test_prompts_without_a_shared_ending_stop_the_run_before_training(tok, tmp_path):
    records = [{"prompt": "rev:abc=", "answer": "cba"}, {"prompt": "rev:ab", "answer": "ba"}]
    cfg = ContinualConfig(method="lfpt5", replay_ratio=0.5)
    with pytest.raises(ValueError, match="task rev: its prompts share no ending, so --method lfpt5 cannot tell"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, [Task("rev", records, [], records)], cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()
