"""The demo-model recipe: a reproducible corpus that never trains on its held-out modules, and a (much
shrunk) training run whose checkpoints load offline as ordinary Hugging Face models."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import specdec
from specdec import corpus, pretrain
from specdec.pretrain import Config, Heads, Size

SMALL = Config(vocab_size=320, seq_len=64, target=Size(32, 2, 2, 1, 64), draft=Size(16, 1, 1, 1, 32), steps=40,
               batch_size=8, lr=1e-2, max_bytes=200_000, log_every=10,
               heads=Heads(steps=30, prompts=24, batch_size=4, distil_tokens=16, max_length=64))


def test_corpus_is_deterministic_and_never_trains_on_held_out(tmp_path):
    a, b = corpus.collect(max_bytes=1_000_000), corpus.collect(max_bytes=1_000_000)
    assert a.manifest() == b.manifest() and a.manifest_hash == b.manifest_hash
    assert 0 < sum(s.size for s in a.train) <= 1_000_000
    assert {s.path for s in a.held_out} == {p for p in corpus.HELD_OUT if (Path(a.roots["stdlib"]) / p).is_file()}
    full = corpus.collect()
    train_paths = {s.path for s in full.train}
    assert {s.path for s in a.train} <= train_paths
    assert not train_paths & set(corpus.HELD_OUT)
    assert not any(part in corpus.SKIP_DIRS for p in train_paths for part in p.split("/")[:-1])
    everything = "\0".join(s.text for s in full.train)
    assert not any(s.text in everything for s in full.held_out)

    a.save_manifest(tmp_path / "m.json")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["sha256"] == a.manifest_hash
    for entry in saved["train"] + saved["held_out"]:
        data = (Path(saved["roots"][entry["root"]]) / entry["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])


def test_held_out_prompts_are_fixed_prefixes_of_held_out_functions():
    c = corpus.collect(max_bytes=100_000)
    prompts = c.held_out_prompts(5, prompt_chars=150)
    assert prompts == c.held_out_prompts(5, prompt_chars=150) and len(set(prompts)) == 5
    held = "\0".join(s.text for s in c.held_out)
    for p in prompts:
        assert 0 < len(p) <= 150 and p.endswith("\n") and p in held
        assert p.lstrip().startswith(("def ", "async def ", "@"))
    with pytest.raises(ValueError, match="n=100000"):
        c.held_out_prompts(100_000)


def test_no_sources_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Python sources"):
        corpus.collect(stdlib=str(tmp_path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    return out, pretrain.train(SMALL, out, device="cpu", seed=0)


def test_recipe_writes_checkpoints_that_load_offline(run):
    out, record = run
    tok = AutoTokenizer.from_pretrained(out / "target", local_files_only=True)
    target = AutoModelForCausalLM.from_pretrained(out / "target", local_files_only=True)
    draft = AutoModelForCausalLM.from_pretrained(out / "draft", local_files_only=True)
    assert AutoTokenizer.from_pretrained(out / "draft", local_files_only=True).get_vocab() == tok.get_vocab()
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    assert draft.num_parameters() < target.num_parameters() == record["target"]["parameters"]
    assert target.generation_config.eos_token_id == tok.eos_token_id

    source = "def f(x):\r\n\treturn x  # snow: \u2603, tab\tand trailing   \n\n"
    ids = tok(source).input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == source

    prompt = tok(record["sample_prompt"], return_tensors="pt")
    greedy = target.generate(**prompt, do_sample=False, max_new_tokens=48)
    assert tok.decode(greedy[0, prompt.input_ids.shape[1]:], skip_special_tokens=True) == record["target"]["sample"]

    saved = json.loads((out / "recipe.json").read_text())
    assert saved["corpus"]["manifest_sha256"] == json.loads((out / "corpus.json").read_text())["sha256"]
    assert saved["config"]["steps"] == SMALL.steps and saved["versions"]["torch"] == torch.__version__


def test_training_lowers_the_loss(run):
    _, record = run
    for name in ("target", "draft"):
        r = record[name]
        assert r["train_loss"] < r["loss_start"] - 1.0
        assert r["held_out_loss"] < math.log(SMALL.vocab_size) - 1.0


def test_recipe_trains_heads_that_draft_losslessly(run):
    out, record = run
    target = AutoModelForCausalLM.from_pretrained(out / "target", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out / "target", local_files_only=True)
    prompt = tok(record["sample_prompt"], return_tensors="pt")
    expected = target.generate(**prompt, do_sample=False, max_new_tokens=24)
    for kind in ("medusa", "eagle"):
        trained = record["heads"][kind]
        assert trained["steps"] == SMALL.heads.steps and len(trained["accuracy"]) == (4 if kind == "medusa" else 1)
        assert not (out / kind / "checkpoint.pt").exists()  # the resumable checkpoint is not shipped
        drafter = specdec.heads.load(out / kind, target)
        assert torch.equal(specdec.generate(target, **prompt, drafter=drafter, max_new_tokens=24), expected)
    assert record["heads"]["prompts"] == SMALL.heads.prompts


def test_training_is_deterministic_given_the_seed(tmp_path):
    config = replace(SMALL, steps=3, heads=None)
    first = pretrain.train(config, tmp_path / "a", device="cpu", seed=1)
    second = pretrain.train(config, tmp_path / "b", device="cpu", seed=1)
    assert first["target"]["held_out_loss"] == second["target"]["held_out_loss"]
    weights = [(tmp_path / run / "target/model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]

