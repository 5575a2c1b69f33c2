"""LFPT5 (#13): the prompt also learns to write the task's inputs (the LM loss on the prompt tokens, as written
out here), a finished task's buffer holds samples θ_k wrote in the task's frame (never a real one) with θ_k's
logits under its prompt, and a generated continuation counts only when it has an input and an answer (what every
PET run owes, tests/test_pet_runs.py)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import logged

from minseekr import pseudo
from minseekr.buffer import TaskMemory
from minseekr.checkpoint import load_hf
from minseekr.config import ContinualConfig
from minseekr.continual import ContinualTrainer
from minseekr.data import Task
from minseekr.pet import attach_saved
from minseekr.synthetic import make_records, train_tokenizer
from minseekr.tokenizer import Tokenizer
from test_continual import tiny_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "demo.model"
    train_tokenizer(path)
    return Tokenizer(str(path))


def test_the_input_writing_loss_is_the_lm_loss_on_the_prompt_tokens(tok, tmp_path):
    tasks = [Task("rev", make_records("rev", 8, 0), [], make_records("rev", 2, 1))]
    cfg = ContinualConfig(method="lfpt5", lr=1e-2, batch_size=4, epochs=[1], max_len=32, prompt_tokens=3,
                          lfpt5_gen_weight=0.25)
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg, tmp_path)
    trainer.pet.begin_task(0, trainer.embedding_rows)
    records = tasks[0].train[:4]
    samples = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
               for ids, labels in (tok.encode_example(r["prompt"], r["answer"], 32) for r in records)]
    inputs = sum(int((s["labels"][1:] == -100).sum()) for s in samples)
    answers = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    terms = trainer.micro_step(samples, 1.0, {"tokens": answers, "samples": 4, "rows": 0, "inputs": inputs})
    # Naively, sample by sample: the prompt's 3 vectors, then the tokens; every prompt token after BOS is a target.
    model, prompt = tiny_model(tok.vocab_size), trainer.pet.prompt.detach()   # the engine's weights, whole
    lm = ce = 0.0
    for s in samples:
        with torch.no_grad():
            logits = model(s["input_ids"][None], prefix=prompt[None])[0, 3:]
        is_input = s["labels"] == -100
        for p in range(1, len(s["input_ids"])):
            loss = F.cross_entropy(logits[p - 1].float(), s["input_ids"][p])
            lm, ce = (lm + float(loss), ce) if is_input[p] else (lm, ce + float(loss))
    assert terms["input_lm"] == pytest.approx(lm / inputs, rel=1e-5)
    assert terms["task_ce"] == pytest.approx(ce / answers, rel=1e-5)
    grad = trainer.pet.prompt.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(not p.requires_grad for p in trainer.model.parameters())


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
    assert any("replay_ce" in r and "logit_kl" in r for r in logged(out) if r.get("task") == 1)
    assert all("input_lm" in r for r in logged(out) if "step" in r and "task_ce" in r)


def test_a_generated_sample_counts_only_with_an_input_and_an_answer(tok, monkeypatch):
    prompts = ["rev:abc=", "rev:bca="]                  # the frame: "rev:" … "="
    rounds = iter([["ab=ba", "cc", "=c", "a="], ["ca=ac"]])
    asked = []

    def write(model, starts, max_new_tokens, **kw):
        asked.append((tok.decode(starts[0]), len(starts)))
        return [tok.encode(text, bos=False) for text in next(rounds)]
    monkeypatch.setattr(pseudo, "generate", write)
    samples = pseudo.generate_samples(tiny_model(tok.vocab_size), tok, prompts, 4, 8, seed=0, tries=2)
    assert asked == [("rev:", 4), ("rev:", 3)]        # continued from P; the second round redraws the three lost
    assert samples == [{"prompt": "rev:ab=", "answer": "ba"}, {"prompt": "rev:ca=", "answer": "ac"}]
    # SAPT needs inputs only: a continuation that never reaches "=" is all input, one without any input is not
    rounds = iter([["ab=ba", "cc", "=c", "a="]])
    inputs = pseudo.generate_samples(tiny_model(tok.vocab_size), tok, prompts, 4, 8, seed=0, answers=False, tries=1)
    assert [x["prompt"] for x in inputs] == ["rev:ab=", "rev:cc=", "rev:a="]


def test_prompts_without_a_shared_ending_stop_the_run_before_training(tok, tmp_path):
    records = [{"prompt": "rev:abc=", "answer": "cba"}, {"prompt": "rev:ab", "answer": "ba"}]
    cfg = ContinualConfig(method="lfpt5", replay_ratio=0.5)
    with pytest.raises(ValueError, match="task rev: its prompts share no ending, so --method lfpt5 cannot tell"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, [Task("rev", records, [], records)], cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()
