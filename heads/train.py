"""``specdec-train-heads``: train Medusa heads or an EAGLE head on a frozen target.

The target runs once over each training sequence to record its features, so a step costs only the head's
forward and backward. A step's batch is a function of (seed, epoch) and the step alone, which is what lets
a run stopped and resumed from its checkpoint end with exactly the weights of one run straight through.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import specdec
from specdec.drafters.base import require_positive
from specdec.features import capture

from . import data
from .store import CONFIG, KINDS, WEIGHTS, build, drafter, read_config, save
from .target import check_fingerprint, feature_size

CHECKPOINT = "checkpoint.pt"
IGNORE = -100
MEDUSA_DECAY = 0.8  # head k's loss weight is 0.8**k, as in Medusa
EAGLE_CE_WEIGHT = 0.1  # feature regression 1.0 + 0.1 token cross entropy, as in EAGLE
DEFAULT_LR = {"medusa": 1e-3, "eagle": 1e-4}


def _cross_entropy(logits, labels):
    """Mean cross entropy and top-1 accuracy over the labelled (batch, position) entries; dims after those
    (Medusa's heads) are kept."""
    valid = labels != IGNORE
    count = valid.sum((0, 1)).clamp(min=1)
    ce = F.cross_entropy(logits.movedim(-1, 1), labels, ignore_index=IGNORE, reduction="none")
    return ce.sum((0, 1)) / count, ((logits.argmax(-1) == labels) & valid).sum((0, 1)) / count


def medusa_loss(head, feats, tokens, mask):
    """Head k at position t against x_{t+k+2}; returns the loss and each head's accuracy."""
    logits = head(feats).float()  # (B, L, K, V)
    labels = torch.full(logits.shape[:3], IGNORE, device=tokens.device)
    for k in range(logits.shape[2]):
        labels[:, : -(k + 2), k] = tokens[:, k + 2 :].masked_fill(~mask[:, k + 2 :], IGNORE)
    ce, accuracy = _cross_entropy(logits, labels)
    weights = MEDUSA_DECAY ** torch.arange(len(ce), device=ce.device)
    return (weights * ce).sum() / weights.sum(), accuracy


def eagle_loss(head, feats, tokens, mask):
    """Pairs (f_c, x_{c+1}) teacher-forced: predicted f'_{c+1} against f_{c+1}, its logits against x_{c+2}."""
    predicted, logits = head(feats[:, :-1], tokens[:, 1:])
    real = mask[:, 1:]
    l1 = F.smooth_l1_loss(predicted.float(), feats[:, 1:].float(), reduction="none").mean(-1)
    labels = tokens[:, 2:].masked_fill(~mask[:, 2:], IGNORE)
    ce, accuracy = _cross_entropy(logits[:, :-1].float(), labels)
    return (l1 * real).sum() / real.sum().clamp(min=1) + EAGLE_CE_WEIGHT * ce, accuracy[None]


LOSSES = {"medusa": medusa_loss, "eagle": eagle_loss}


@torch.no_grad()
def target_features(target, tokens, mask):
    with capture(target) as got:
        target(input_ids=tokens, attention_mask=mask.long())
    return got[0]


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def _left_pad(rows, pad, device):
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, ids.shape[1] - len(row) :], mask[b, ids.shape[1] - len(row) :] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


class Features:
    """The target's features of every training sequence: recorded once (target dtype, CPU) when they fit in
    ``limit`` bytes, else recomputed per batch."""

    def __init__(self, target, seqs, pad, batch_size, limit):
        self.target, self.seqs, self.pad, self.stored = target, seqs, pad, None
        if sum(map(len, seqs)) * feature_size(target) * target.dtype.itemsize <= limit:
            self.stored = [None] * len(seqs)
            by_length = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding
            for chunk in tqdm(_chunks(by_length, batch_size), desc="recording target features"):
                feats = target_features(self.target, *self._tokens(chunk)).cpu()
                for row, i in enumerate(chunk):
                    self.stored[i] = feats[row, : len(seqs[i])].clone()

    def _tokens(self, idx):
        rows = [torch.tensor(self.seqs[i]) for i in idx]
        tokens = pad_sequence(rows, batch_first=True, padding_value=self.pad)
        mask = pad_sequence([torch.ones(len(r), dtype=torch.bool) for r in rows], batch_first=True)
        return tokens.to(self.target.device), mask.to(self.target.device)

    def batch(self, idx):
        """Features, tokens and mask of sequences ``idx``, right-padded, on the target's device."""
        tokens, mask = self._tokens(idx)
        if self.stored is None:
            return target_features(self.target, tokens, mask), tokens, mask
        return pad_sequence([self.stored[i] for i in idx], batch_first=True).to(tokens.device), tokens, mask


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


@torch.no_grad()
def distil(target, prompts, new_tokens, batch_size, pad):
    """The target's greedy continuation of each prompt, cut after its first eos: specdec's loop with no
    drafter, which is ``generate``'s output and, on a GPU, replays each step from a CUDA graph."""
    eos = target.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    responses = [None] * len(prompts)
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for chunk in tqdm(_chunks(by_length, batch_size), desc="self-distillation"):
        ids, mask = _left_pad([prompts[i] for i in chunk], pad, target.device)
        out = specdec.generate(target, ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                               pad_token_id=pad)[:, ids.shape[1] :].tolist()
        for row, i in zip(out, chunk):
            ends = [n for n, t in enumerate(row) if t in eos]
            responses[i] = row[: ends[0] + 1] if ends else row
    return responses


def evaluate(target, drafter, prompts, new_tokens, pad) -> dict:
    """τ and acceptance rate of greedy speculative decoding with ``drafter`` on ``prompts``."""
    ids, mask = _left_pad(prompts, pad, target.device)
    stats = specdec.generate(target, ids, attention_mask=mask, drafter=drafter, do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=pad, return_dict_in_generate=True).stats
    return {"prompts": len(prompts), "new_tokens": new_tokens, "tau": round(stats.tau, 4),
            "acceptance_rate": round(stats.acceptance_rate, 4)}


def _resume_state(out: Path, target, run: dict):
    """The checkpoint in ``out`` for ``--resume``, refused if it belongs to another target or run."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: there is no {CHECKPOINT} in --out {str(out)!r}; drop --resume to start afresh.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_fingerprint(state["target"], target, f"The heads being trained in --out {str(out)!r}")
    for key, value in run.items():
        if state["run"][key] != value:
            raise ValueError(f"--resume: the run in {str(out)!r} used {key}={state['run'][key]!r}, not {value!r}; "
                             f"pass the same settings to continue it, or drop --resume to start afresh.")
    return state


def train(target, tokenizer, sources, *, kind: str = "medusa", out="heads", steps: int | None = None,
          epochs: int | None = None, batch_size: int = 8, lr: float | None = None, max_length: int = 1024,
          self_distil: bool = False, distil_tokens: int = 256, resume: bool = False, eval_prompts: int = 8,
          eval_tokens: int = 64, seed: int = 0, save_every: int = 1000, feature_memory: float = 4.0,
          **options) -> dict:
    """Train ``kind`` heads for ``target`` on ``sources`` (JSONL or text files, or record dicts), save them to
    ``out`` with a resumable checkpoint, and return the training record saved with them. ``steps`` and
    ``epochs`` both bound the run (one epoch when neither is given); ``feature_memory`` is in GiB;
    ``options`` go to the head (``num_heads``, ``num_layers``)."""
    head, lr = _new_head(target, tokenizer, kind, options, batch_size=batch_size, max_length=max_length,
                         distil_tokens=distil_tokens, eval_tokens=eval_tokens, save_every=save_every, steps=steps,
                         epochs=epochs, eval_prompts=eval_prompts, seed=seed, lr=lr)
    out = Path(out)
    if (out / CONFIG).is_file():
        check_fingerprint(read_config(out)["target"], target, f"The heads already in --out {str(out)!r}")
    sources = [sources] if isinstance(sources, (str, os.PathLike, dict)) else list(sources)
    examples = data.read(sources, tokenizer)
    held = set(np.random.default_rng(seed).permutation(len(examples))[:eval_prompts].tolist())
    train_examples = [ex for i, ex in enumerate(examples) if i not in held]
    if not train_examples:
        raise ValueError(f"--data holds {len(examples)} examples and --eval-prompts holds out {eval_prompts}: "
                         f"nothing is left to train on. Add data or lower --eval-prompts.")
    run = {"kind": kind, "options": head.options, "seed": seed, "batch_size": batch_size, "lr": lr,
           "max_length": max_length, "self_distil": self_distil, "distil_tokens": distil_tokens,
           "eval_prompts": eval_prompts, "data": [str(s) for s in sources if not isinstance(s, dict)]}
    state = _resume_state(out, target, run) if resume else None

    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    if self_distil:
        responses = distil(target, [ex.prompt[-max_length:] for ex in train_examples], distil_tokens, batch_size, pad)
        train_examples = [data.Example(ex.prompt, r) for ex, r in zip(train_examples, responses)]
    seqs = data.sequences(train_examples, max_length)
    if not seqs:
        raise ValueError(f"--data yields no training sequence of {data.MIN_LENGTH} tokens or more; add text.")
    features = Features(target, seqs, pad, batch_size, feature_memory * 2**30)
    per_epoch = math.ceil(len(seqs) / batch_size)
    total = int(min(steps or math.inf, (epochs or (1 if steps is None else math.inf)) * per_epoch))
    step, loss, accuracy = _optimize(head, features, len(seqs), out, run, state, total=total, per_epoch=per_epoch,
                                     save_every=save_every)

    head.to(target.dtype).eval()
    record = {"steps": step, "loss": round(loss, 6), "accuracy": accuracy,
              "sequences": len(seqs), "tokens": sum(map(len, seqs)), **run}
    prompts = [examples[i].prompt[-max_length:] for i in sorted(held) if examples[i].prompt]
    if prompts:
        record["eval"] = evaluate(target, drafter(head), prompts, eval_tokens, pad)
        print(f"held-out acceptance ({len(prompts)} prompts, {eval_tokens} new tokens): "
              f"tau {record['eval']['tau']:.2f}, acceptance rate {record['eval']['acceptance_rate']:.2f}")
    save(head, out, training=record)
    return record


def _new_head(target, tokenizer, kind: str, options: dict, *, max_length: int, eval_prompts: int, seed: int,
              lr: float | None, steps: int | None, epochs: int | None, **counts):
    """The untrained head (fp32 while training) and its learning rate, once every setting is checked."""
    require_positive(max_length=max_length, **counts,
                     **{k: v for k, v in (("steps", steps), ("epochs", epochs)) if v is not None})
    for name, value in (("eval_prompts", eval_prompts), ("seed", seed)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    torch.manual_seed(seed)
    head = build(kind, target, **options).float()  # fp32 while training, the target's dtype once saved
    needed = max(data.MIN_LENGTH, head.options.get("num_heads", 0) + 2)
    if max_length < needed:
        raise ValueError(f"--max-length {max_length} leaves some heads nothing to predict; use at least {needed}.")
    lr = DEFAULT_LR[kind] if lr is None else lr
    if not lr > 0:
        raise ValueError(f"`lr` must be positive, got {lr!r}.")
    vocab = target.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(f"The tokenizer (--tokenizer) has {len(tokenizer)} tokens but the target's LM head only "
                         f"{vocab}: it is not this target's tokenizer. Pass the target's own with --tokenizer.")
    return head, lr


def _optimize(head, features, n_seqs: int, out: Path, run: dict, state: dict | None, *, total: int,
              per_epoch: int, save_every: int) -> tuple[int, float, list]:
    """The optimizer steps up to ``total`` (from ``state``'s when resuming), checkpointed every ``save_every``
    and at the end; returns the step reached, the last loss and each head's last top-1 accuracy."""
    kind, seed, batch_size = run["kind"], run["seed"], run["batch_size"]
    params = list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=run["lr"])
    step, epoch = 0, 0
    if state is not None:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch = state["step"], state["epoch"]
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and len(state["cuda_rng"]):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = features.target.device, features.target.dtype
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" or dtype != torch.float32)
    loss, accuracy = float("nan"), []
    head.train()
    with tqdm(total=total, initial=step, desc=f"training {kind} heads") as bar:
        while step < total:
            epoch, i = divmod(step, per_epoch)
            order = _epoch_order(seed, epoch, n_seqs)
            feats, tokens, mask = features.batch(order[i * batch_size : (i + 1) * batch_size])
            with autocast:
                batch_loss, batch_accuracy = LOSSES[kind](head, feats, tokens, mask)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward(inputs=params)  # the borrowed target weights get no gradient
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            loss, accuracy = batch_loss.item(), [round(a, 4) for a in batch_accuracy.tolist()]
            bar.set_postfix_str(f"loss {loss:.4f} top-1 " + " ".join(f"{a:.2f}" for a in accuracy), refresh=False)
            bar.update()
            if step % save_every == 0:
                _checkpoint(out, head, optimizer, step, epoch, run)
    _checkpoint(out, head, optimizer, step, epoch, run)
    return step, loss, accuracy


def _checkpoint(out: Path, head, optimizer, step: int, epoch: int, run: dict) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "target": head.target_fingerprint, "run": run, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp)
    os.replace(tmp, out / CHECKPOINT)


def main(argv=None) -> None:
    from specdec.cli import HelpWithDefaults
    from specdec.embedded import DEFAULT

    p = argparse.ArgumentParser(prog="specdec-train-heads", formatter_class=HelpWithDefaults,
                                description="Train Medusa heads or an EAGLE head on a frozen target.")
    p.add_argument("--target", required=True,
                   help="the target model: a path for AutoModelForCausalLM, or `embedded` for the shipped target")
    p.add_argument("--kind", required=True, choices=sorted(KINDS))
    p.add_argument("--data", required=True, nargs="+",
                   help='JSONL files of {"prompt"[, "response"]}, {"text"} or {"messages"}; other files are plain text')
    p.add_argument("--out", required=True, help="where the heads and checkpoint go")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs epochs)")
    p.add_argument("--epochs", type=int, help="passes over the data (default 1 without --steps)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default {DEFAULT_LR})")
    p.add_argument("--max-length", type=int, help="tokens per training sequence (default: the target's "
                   "max_position_embeddings)")
    p.add_argument("--self-distil", action="store_true", help="train on the target's own greedy responses")
    p.add_argument("--distil-tokens", type=int, default=256, help="tokens per self-distilled response")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    p.add_argument("--overwrite", action="store_true", help="replace finished heads already in --out")
    p.add_argument("--tokenizer", help="tokenizer path (default: --target)")
    p.add_argument("--eval-prompts", type=int, default=8, help="prompts held out to measure acceptance")
    p.add_argument("--eval-tokens", type=int, default=64, help="new tokens per held-out prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--feature-memory", type=float, default=4.0, help="GiB of recorded features to keep")
    p.add_argument("--num-heads", type=int, help="Medusa heads (default 4)")
    p.add_argument("--num-layers", type=int, help="residual blocks per Medusa head (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = vars(p.parse_args(argv))  # the other options are train()'s keyword arguments, same names
    path, tokenizer_path, device, sources = (args.pop(k) for k in ("target", "tokenizer", "device", "data"))
    path = DEFAULT / "target" if path == "embedded" else path
    options = {k: v for k in ("num_heads", "num_layers") if (v := args.pop(k)) is not None}
    if options and args["kind"] != "medusa":
        p.error("--num-heads and --num-layers are Medusa options; drop them for --kind eagle.")
    out, overwrite = Path(args["out"]), args.pop("overwrite")
    if (out / WEIGHTS).is_file() and not (args["resume"] or overwrite):
        p.error(f"--out {str(out)!r} holds finished heads; pass --overwrite to replace them, or --resume to continue.")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
    target = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    args["max_length"] = args["max_length"] or getattr(target.config, "max_position_embeddings", None) or 1024
    try:
        train(target, tokenizer, sources, **args, **options)
    except ValueError as e:
        raise SystemExit(f"specdec-train-heads: error: {e}") from e
    print(f"saved the {args['kind']} heads in {str(out)!r} (config.json, heads.safetensors; {CHECKPOINT} resumes)")


if __name__ == "__main__":
    main()
