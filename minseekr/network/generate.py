"""Batched autoregressive generation: greedy (what TRACE evaluates) or sampling (temperature, top-k, nucleus, and a
repetition penalty on the tokens generated so far).

Prompts of different lengths are left-padded into one (B, P) block so that every sequence's next
token sits in the last column; the attention mask marks real tokens, and the model derives each
token's position from it, so a padded prompt gets exactly the logits of the unpadded one. The
prompt is run once to fill a `KVCache` (prefill); each later step feeds only the B new tokens and
a mask covering the cached prefix plus them. `use_cache=False` re-runs the whole sequence every
step instead: slower, with no cache involved, the reference the cached path is tested against.

A sequence stops at its first EOS, which is included in what it returns (so a caller can tell an
answer that ended from one cut at `max_new_tokens`; `Tokenizer.decode` drops it). After that its
column is fed `pad_id` with mask 0 and ignored; the loop ends when all sequences have stopped.
"""
import torch

from minseekr.network.model import KVCache


def next_token(logits, temperature: float = 0.0, top_p: float = 1.0, generator=None, top_k: int = 0,
               repetition_penalty: float = 1.0, seen=None):
    """The next token (B,) from last-position logits (B, V): argmax, or a sample from the top-k tokens' top-p
    nucleus. With `seen` (B, V) bool, the tokens already generated, a repetition penalty first divides their
    logits by `repetition_penalty` (multiplies the negative ones: lower either way), once per token, as HF's
    `repetition_penalty` does."""
    if repetition_penalty != 1.0 and seen is not None:
        logits = logits.float()
        logits = torch.where(seen, torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty),
                             logits)
    if temperature == 0.0:
        return logits.argmax(-1)
    if 0 < top_k < logits.shape[-1]:   # ties with the k-th logit stay
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix of the sorted tokens whose mass reaches top_p: a token stays if the
    # mass before it is still short of top_p. The most likely token always stays.
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    keep[:, 0] = True
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs, 1, generator=generator)                # (B, 1)
    return order.gather(-1, choice).squeeze(-1)


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int | None = None,
             pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, use_cache: bool = True, generator: torch.Generator | None = None,
             prefix: torch.Tensor | None = None) -> list[list[int]]:
    """The new tokens of each prompt, up to and including its first EOS, at most max_new_tokens (`next_token`
    picks each; the repetition penalty covers the tokens generated, not the prompt); `prefix` (B, n, dim): soft
    prompts before each prompt (and its padding), fed once (or every step without the cache); by default those an
    attached prompt method chooses (`model.soft_prompts(embeddings, mask)`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or not 0 <= top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
        raise ValueError(f"need temperature >= 0, 0 <= top_p <= 1, top_k >= 0 and repetition_penalty > 0, got "
                         f"temperature={temperature}, top_p={top_p}, top_k={top_k}, "
                         f"repetition_penalty={repetition_penalty}")
    weight = model.model.embed_tokens.weight
    B, P = len(prompts), max(len(p) for p in prompts)      # P: the longest prompt
    chooser = getattr(model, "soft_prompts", None)   # a method attached (pp.py, l2p.py, lfpt5.py, sapt.py)
    n = 0 if prefix is None else prefix.shape[1]            # the mask's first n columns: the soft prompts
    if prefix is not None and prefix.shape[0] != B:
        raise ValueError(f"prefix holds {prefix.shape[0]} sequences of soft prompts for {B} prompts")
    total = P + max_new_tokens
    tokens = torch.full((B, total), pad_id, dtype=torch.long, device=weight.device)
    mask = torch.zeros(B, n + total, dtype=torch.long, device=weight.device)
    mask[:, :n] = 1
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        mask[i, n + P - len(p):n + P] = 1
    if prefix is None and chooser is not None:   # its prompts (or SAPT's weights), from the prompt's embeddings
        with torch.no_grad():
            prefix = chooser(model.model.embed_tokens(tokens[:, :P]), mask[:, :P])
        n = 0 if prefix is None else prefix.shape[1]
        mask = torch.cat([mask.new_ones(B, n), mask], 1)
    done = torch.zeros(B, dtype=torch.bool, device=weight.device)
    seen = torch.zeros(B, model.args.vocab_size, dtype=torch.bool, device=weight.device) \
        if repetition_penalty != 1.0 else None   # the tokens each sequence has generated
    cache = KVCache(model.args, B, n + total, dtype=weight.dtype, device=weight.device) if use_cache else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            end = P
            logits = model(tokens[:, :P], mask[:, :n + P], cache=cache, prefix=prefix)[:, -1]
            for _ in range(max_new_tokens):
                new = next_token(logits, temperature, top_p, generator, top_k, repetition_penalty, seen)
                tokens[:, end] = torch.where(done, pad_id, new)
                if seen is not None:
                    seen[torch.arange(B, device=weight.device), new] = True
                mask[:, n + end] = (~done).long()
                if eos_id is not None:
                    done |= new == eos_id
                end += 1
                if done.all() or end == total:
                    break
                if use_cache:
                    logits = model(tokens[:, end - 1:end], mask[:, :n + end], cache=cache)[:, -1]
                else:
                    logits = model(tokens[:, :end], mask[:, :n + end], prefix=prefix)[:, -1]
    finally:
        model.train(was_training)
    return [row[P:end][m[n + P:n + end].bool()].tolist() for row, m in zip(tokens, mask)]
