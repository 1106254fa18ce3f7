"""``python -m specdec.demo``: plain ``generate`` against each drafter on one model, same text, counted.

Until the project's trained demo models exist, the target is a small Llama whose weights are made to
repeat itself the way code does (random weights, trained for a few seconds on a looping sequence), and
the draft is the same model with noise added. Tokens per second on a CPU say little; τ and the forward
counts are what carry over to a GPU.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import specdec


def build_models(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    target = LlamaForCausalLM(config)
    # A few seconds of training on a repeating pattern with variations gives the target structure that
    # drafters can predict, as real text has.
    pattern = torch.randint(1, 256, (48,))
    opt = torch.optim.AdamW(target.parameters(), lr=3e-3)
    for _ in range(60):
        noisy = pattern.repeat(4).clone()
        flips = torch.rand(noisy.shape) < 0.05
        noisy[flips] = torch.randint(1, 256, (int(flips.sum()),))
        loss = target(noisy[None], labels=noisy[None]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    target.eval()
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    prompt = torch.cat([pattern, pattern[:20]])[None]
    return target, draft, prompt


def main(max_new_tokens: int = 96) -> None:
    target, draft, prompt = build_models()
    runs = {
        "model.generate": None,
        "specdec, no drafter": dict(),
        "draft model (chain of 5)": dict(drafter=specdec.DraftModel(draft, num_draft_tokens=5)),
        "draft model (tree 4x2)": dict(drafter=specdec.DraftModel(draft, num_draft_tokens=4, tree_width=2)),
        "prompt lookup (10)": dict(prompt_lookup_num_tokens=10),
    }
    reference = None
    print(f"{'strategy':28s} {'tok/s':>8s} {'tau':>6s} {'accept':>7s} {'target fwd':>10s} {'same text':>9s}")
    for name, kwargs in runs.items():
        start = time.perf_counter()
        if kwargs is None:
            out, stats = target.generate(prompt, do_sample=False, max_new_tokens=max_new_tokens), None
        else:
            res = specdec.generate(target, prompt, max_new_tokens=max_new_tokens, return_dict_in_generate=True, **kwargs)
            out, stats = res.sequences, res.stats
        tps = max_new_tokens / (time.perf_counter() - start)
        reference = out if reference is None else reference
        tau = f"{stats.tau:.2f}" if stats else "1.00"
        acc = f"{stats.acceptance_rate:.2f}" if stats else "-"
        fwd = str(stats.target_forwards) if stats else str(max_new_tokens)
        print(f"{name:28s} {tps:8.1f} {tau:>6s} {acc:>7s} {fwd:>10s} {str(torch.equal(out, reference)):>9s}")


if __name__ == "__main__":
    main()
