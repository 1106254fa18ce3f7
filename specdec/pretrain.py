"""The recipe that trains the project's demo models: a byte-level BPE tokenizer, a Llama target and a much
smaller Llama draft sharing its vocabulary, all from the interpreter's own Python sources (``corpus``).

No model hub is reachable where the project runs, and code completion is a flagship workload for
speculative decoding, so the demo pair is trained here. ``tiny`` trains on a CPU in minutes; ``gpu`` trains
a ~200M-parameter target on one H100 in minutes. The checkpoints are ordinary Hugging Face ones:

    python -m specdec.pretrain --config tiny --out models/ [--steps N] [--device cuda] [--seed 0]

writes ``models/target`` and ``models/draft`` (safetensors, each with the tokenizer), ``models/corpus.json``
(the manifest) and ``models/recipe.json`` (config, losses, held-out perplexity, versions, device, date).
Runs are deterministic given ``--seed`` on a CPU; CUDA kernels may add run-to-run noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from . import corpus as corpus_lib
from .heads.train import CHECKPOINT, distil
from .heads.train import train as train_head

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class Heads:
    """Medusa heads and an EAGLE head trained on the target's own greedy continuations of training-function
    prefixes (self-distillation, done once for both)."""
    steps: int
    prompts: int
    batch_size: int = 16
    distil_tokens: int = 128
    max_length: int = 512


@dataclass(frozen=True)
class Config:
    vocab_size: int
    seq_len: int
    target: Size
    draft: Size
    steps: int
    batch_size: int
    lr: float
    warmup: float = 0.05  # fraction of the steps, so --steps keeps the schedule's shape
    weight_decay: float = 0.1
    include_site_packages: bool = False
    max_bytes: int | None = None
    tokenizer_bytes: int = 16 * 2**20  # BPE merges settle long before the whole corpus is read
    save_dtype: str = "float32"
    log_every: int = 25
    heads: Heads | None = None


CONFIGS = {
    # ~1.05M + 0.23M parameters, 2.6 MB together in fp16; about 4.5 minutes on 2 CPU cores. With so little
    # compute, many small steps beat few large ones (batch 4 reached a lower loss than batch 16 on as many tokens).
    "tiny": Config(vocab_size=2048, seq_len=256, target=Size(128, 4, 4, 2, 384), draft=Size(64, 2, 2, 1, 192),
                   steps=3000, batch_size=4, lr=1.5e-3, log_every=100),
    # The default shipped in the package (``specdec.embedded``): 3.9M + 0.66M parameters and trained heads, about
    # 11 MB in bf16 against a 12 MB budget; trained on a GPU, where minutes buy what a CPU would need a day for.
    "embedded": Config(vocab_size=2048, seq_len=512, target=Size(256, 6, 8, 2, 512), draft=Size(128, 2, 4, 2, 384),
                       steps=6000, batch_size=64, lr=2e-3, include_site_packages=True, max_bytes=128 * 2**20,
                       save_dtype="bfloat16", log_every=500, heads=Heads(steps=3000, prompts=4096)),
    # ~197M + 13M parameters; the installed packages' sources too, sampled down to what a few minutes use.
    # On an H100: 132k tokens/s eager, 229k with --compile (~80 s to compile); about 6-8 minutes in all.
    "gpu": Config(vocab_size=16384, seq_len=1024, target=Size(1024, 16, 16, 4, 2816),
                  draft=Size(384, 4, 6, 2, 1024), steps=1500, batch_size=32, lr=6e-4, include_site_packages=True,
                  max_bytes=256 * 2**20, save_dtype="bfloat16", log_every=100, heads=Heads(steps=3000, prompts=4096)),
}


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte sequence round-trips exactly, which source code (indentation, any
    Unicode) needs. Encoding prepends ``BOS`` as each training document starts with it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    # Left padding: batched prompts end where generation starts.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", clean_up_tokenization_spaces=False)


def tokenize(tokenizer, texts: list[str], chunk: int = 1024) -> torch.Tensor:
    """One stream of ``BOS text EOS`` documents, to be cut into packed windows; encoded a chunk of files at a
    time, so that the encodings (offsets and all) of a whole site-packages are never held at once."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    parts = [np.array([bos, *e.ids, eos], dtype=np.int32)
             for i in range(0, len(texts), chunk)
             for e in tokenizer.backend_tokenizer.encode_batch_fast(texts[i:i + chunk], add_special_tokens=False)]
    return torch.from_numpy(np.concatenate(parts))


def build_model(size: Size, config: Config, tokenizer) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=config.seq_len, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def _optimizer(model, config: Config, device: torch.device):
    """AdamW with decay on matrices only, linear warmup, then a cosine down to a tenth of the peak."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": rest}],
                            lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda")
    warmup = max(1, round(config.warmup * config.steps))

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, config: Config, device: torch.device) -> float:
    """Mean next-token loss (nats) over ``ids`` cut into ``seq_len`` windows, the short last one included."""
    n = len(ids) // config.seq_len * config.seq_len
    batches = list(ids[:n].view(-1, config.seq_len).split(config.batch_size)) + [ids[n:][None]]
    total = count = 0
    for batch in (b.to(device, torch.long) for b in batches if b.shape[1] > 1):
        with _autocast(device):
            loss = model(batch, labels=batch).loss
        predicted = batch.shape[0] * (batch.shape[1] - 1)
        total += loss.item() * predicted
        count += predicted
    return total / count


def _fit(runs: dict, windows: torch.Tensor, config: Config, seed: int, device: torch.device) -> None:
    """Trains every model on the same batches, each window once per epoch in a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(config.steps * config.batch_size / len(windows))
    order = torch.cat([torch.randperm(len(windows), generator=gen) for _ in range(epochs)]).to(device)
    last = time.perf_counter()
    for step in range(config.steps):
        batch = windows[order[step * config.batch_size:(step + 1) * config.batch_size]].long()
        for run in runs.values():
            with _autocast(device):
                loss = run["forward"](batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run["model"].parameters(), 1.0)
            opt, sched = run["opt"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            run["losses"][step] = loss.detach()  # a list of detached losses kept each step's logits alive
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            now = time.perf_counter()
            recent = slice(max(0, step + 1 - config.log_every), step + 1)
            losses = ", ".join(f"{name} {run['losses'][recent].mean().item():.3f}" for name, run in runs.items())
            tokens = (step % config.log_every + 1) * batch.numel()
            print(f"step {step + 1:5d}/{config.steps}  loss: {losses}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{tokens / (now - last):,.0f} tok/s (both models)", flush=True)
            last = now


def _tokenized(corpus, config: Config, device):
    """The tokenizer (trained on a sample spread over all packages, as collect's), the training stream on
    ``device``, the held-out stream, and the training windows of ``seq_len``."""
    sample, budget = [], config.tokenizer_bytes
    for source in sorted(corpus.train, key=lambda s: s.sha256):
        if budget <= 0:
            break
        sample.append(source.text)
        budget -= source.size
    tokenizer = train_tokenizer(sample, config.vocab_size)
    ids = tokenize(tokenizer, [s.text for s in corpus.train]).to(device)
    held_ids = tokenize(tokenizer, [s.text for s in corpus.held_out])
    windows = ids[: len(ids) // config.seq_len * config.seq_len].view(-1, config.seq_len)
    if not len(windows):
        raise ValueError(f"the corpus gives {len(ids)} tokens, fewer than seq_len={config.seq_len}; raise max_bytes")
    return tokenizer, ids, held_ids, windows


def _evaluate_and_save(run: dict, name: str, tokenizer, inputs, held_ids, held_bytes: int, config: Config,
                       out: Path, device) -> dict:
    """One trained model's record (held-out loss, a sample completion), and the model saved to ``out/name``."""
    model, losses = run["model"].eval(), run["losses"]
    held = evaluate(model, held_ids, config, device)
    with _autocast(device):
        completion = model.generate(**inputs, do_sample=False, max_new_tokens=48)
    record = {
        "parameters": model.num_parameters(), "fp16_bytes": 2 * model.num_parameters(),
        "loss_start": losses[0].item(), "train_loss": losses[-config.log_every:].mean().item(),
        "held_out_loss": held, "held_out_perplexity": math.exp(held),
        "held_out_bits_per_byte": held / math.log(2) * len(held_ids) / held_bytes,
        "sample": tokenizer.decode(completion[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True),
    }
    model.to(getattr(torch, config.save_dtype)).save_pretrained(out / name)
    tokenizer.save_pretrained(out / name)
    return record


def train(config: Config, out: str | Path, *, device: str | None = None, seed: int = 0,
          compile: bool = False) -> dict:
    """Runs the recipe into ``out`` and returns what it records in ``out/recipe.json``."""
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus_lib.collect(config.include_site_packages, config.max_bytes)
    corpus.save_manifest(out / "corpus.json")
    tokenizer, ids, held_ids, windows = _tokenized(corpus, config, device)
    train_bytes, held_bytes = (sum(s.size for s in part) for part in (corpus.train, corpus.held_out))
    print(f"corpus: {len(corpus.train)} files, {train_bytes:,} bytes, {len(ids):,} tokens ({len(windows)} windows "
          f"of {config.seq_len}); held out: {len(held_ids):,} tokens; vocabulary {len(tokenizer)}; "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    runs = {}
    for name in ("target", "draft"):
        torch.manual_seed(seed)
        model = build_model(getattr(config, name), config, tokenizer).to(device).train()
        runs[name] = dict(model=model, forward=torch.compile(model) if compile else model,
                          opt=_optimizer(model, config, device), losses=torch.zeros(config.steps, device=device))
        print(f"{name}: {model.num_parameters():,} parameters", flush=True)
    train_start = time.perf_counter()
    _fit(runs, windows, config, seed, device)
    train_seconds = time.perf_counter() - train_start

    prompt = corpus.held_out_prompts(1)[0]
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    record = {
        "config": asdict(config), "seed": seed, "steps": config.steps,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu, {torch.get_num_threads()} threads"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "corpus": {"manifest_sha256": corpus.manifest_hash, "train_files": len(corpus.train),
                   "train_bytes": train_bytes, "train_tokens": len(ids), "held_out": [s.path for s in corpus.held_out],
                   "held_out_bytes": held_bytes, "held_out_tokens": len(held_ids)},
        "sample_prompt": prompt,
    }
    for name, run in runs.items():
        record[name] = _evaluate_and_save(run, name, tokenizer, inputs, held_ids, held_bytes, config, out, device)
    if config.heads:
        heads_start = time.perf_counter()
        record["heads"] = train_heads(runs["target"]["model"], tokenizer, corpus, config.heads, out, seed)
        record["heads"]["seconds"] = time.perf_counter() - heads_start
    record["seconds"] = {"train": train_seconds, "total": time.perf_counter() - start}
    (out / "recipe.json").write_text(json.dumps(record, indent=1))
    return record


def train_heads(target, tokenizer, corpus: corpus_lib.Corpus, heads: Heads, out: Path, seed: int) -> dict:
    """Self-distils once, then trains Medusa heads into ``out/medusa`` and an EAGLE head into ``out/eagle`` (in
    the target's dtype, without their resumable checkpoints); returns their training records."""
    prompts = corpus.train_prompts(heads.prompts)
    responses = distil(target, [tokenizer(p)["input_ids"] for p in prompts], heads.distil_tokens, batch_size=64,
                       pad=tokenizer.pad_token_id)
    records = [{"prompt": p, "response": tokenizer.decode(r)} for p, r in zip(prompts, responses)]
    trained = {"prompts": len(records), "distil_tokens": heads.distil_tokens}
    for kind in ("medusa", "eagle"):
        trained[kind] = train_head(target, tokenizer, records, kind=kind, out=out / kind, steps=heads.steps,
                                   batch_size=heads.batch_size, max_length=heads.max_length, seed=seed,
                                   eval_prompts=max(1, min(8, len(records) // 8)))
        (out / kind / CHECKPOINT).unlink()
    return trained


def main(argv=None) -> None:
    from .cli import HelpWithDefaults

    parser = argparse.ArgumentParser(prog="python -m specdec.pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny",
                        help="the recipe: tiny (a CPU, minutes), embedded (what ships in the package), gpu (~200M)")
    parser.add_argument("--out", required=True, help="directory for target/, draft/, corpus.json, recipe.json")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    parser.add_argument("--heads-steps", type=int, help="steps for each kind of head (default: the config's; 0: none)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward passes")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: give a positive number of steps")
    if args.heads_steps is not None and args.heads_steps < 0:
        parser.error(f"--heads-steps {args.heads_steps}: give a number of steps, or 0 for no heads")
    config = replace(CONFIGS[args.config], steps=args.steps or CONFIGS[args.config].steps)
    if args.heads_steps is not None:
        heads = config.heads or Heads(steps=args.heads_steps, prompts=1024)
        config = replace(config, heads=replace(heads, steps=args.heads_steps) if args.heads_steps else None)
    record = train(config, args.out, device=args.device, seed=args.seed, compile=args.compile)
    for name in ("target", "draft"):
        r = record[name]
        print(f"{name}: train loss {r['train_loss']:.3f}, held-out loss {r['held_out_loss']:.3f} "
              f"(perplexity {r['held_out_perplexity']:.1f}, {r['held_out_bits_per_byte']:.2f} bits/byte), "
              f"{r['fp16_bytes']:,} bytes in fp16")
    for kind in ("medusa", "eagle") if config.heads else ():
        r = record["heads"][kind]
        print(f"{kind}: {r['steps']} steps, loss {r['loss']:.3f}, top-1 {r['accuracy']}, "
              f"held-out tau {r['eval']['tau']:.2f}")
    print("greedy completion by the target of a held-out prompt:")
    print(record["sample_prompt"] + record["target"]["sample"])


if __name__ == "__main__":
    main()
