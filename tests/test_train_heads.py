"""Head training (specdec-train-heads): learning, saving, resuming, the CLI and its refusals.

The target is a tiny Llama with a character tokenizer, trained for a few seconds to follow a fixed cycle of
36 characters, so its features carry structure that heads can learn and its greedy output is predictable.
"""

import json
import random
import subprocess
import sys

import pytest
import torch
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import specdec
from models import VOCAB, tiny
from specdec.features import capture
from specdec.heads import build, drafter, load, load_head
from specdec.heads import data
from specdec.heads.store import KINDS
from specdec.heads.train import CHECKPOINT, main, train

SPECIAL = ["<pad>", "<s>", "<unk>", "</s>"]
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
CYCLE = "".join(random.Random(0).sample(ALPHABET, len(ALPHABET)))
FAST = {"medusa": 1e-2, "eagle": 3e-3}  # learning rates for a tiny target


def char_tokenizer(extra: int = 0):
    vocab = SPECIAL + list(ALPHABET + " .,:\n") + [f"<extra{i}>" for i in range(extra)]
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>",
                                   eos_token="</s>")


def cycle_lines(n, seed):
    rng = random.Random(seed)
    return [(CYCLE * 4)[o : o + rng.randint(30, 70)] for o in (rng.randrange(len(CYCLE)) for _ in range(n))]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are too small to split across threads: on a busy machine a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """The cycle, and the cycle after random junk, resumed from the junk's last character: the target follows
    the cycle whatever precedes it."""
    path = tmp_path_factory.mktemp("target")
    tok = char_tokenizer()
    rng = random.Random(0)

    def batch():
        junk = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))) for _ in CYCLE]
        rows = [(CYCLE * 3)[o : o + 64] for o in range(len(CYCLE))]
        rows += [(j + (CYCLE * 4)[CYCLE.index(j[-1]) + 1 :])[:64] for j in junk]
        return torch.tensor([tok(row)["input_ids"] for row in rows])

    model = tiny("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        ids = batch()
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def target(target_dir):
    return AutoModelForCausalLM.from_pretrained(target_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(target_dir):
    return AutoTokenizer.from_pretrained(target_dir)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    lines = cycle_lines(160, 1)
    return write_jsonl(tmp_path_factory.mktemp("data") / "cycle.jsonl",
                       [{"prompt": s[:8], "response": s[8:]} for s in lines[:120]] + [{"text": s} for s in lines[120:]])


@pytest.fixture(scope="module")
def trained(target, tokenizer, jsonl, tmp_path_factory):
    """Heads of each kind trained for 300 steps: kind -> (out dir, training record)."""
    runs = {}
    for kind in KINDS:
        out = tmp_path_factory.mktemp(kind)
        runs[kind] = out, train(target, tokenizer, [jsonl], kind=kind, out=out, steps=300, lr=FAST[kind], max_length=48)
    return runs


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_training_lowers_loss_and_heads_predict_far_above_chance(kind, target, tokenizer, jsonl, trained, tmp_path):
    first = train(target, tokenizer, [jsonl], kind=kind, out=tmp_path, steps=1, lr=FAST[kind], max_length=48,
                  eval_prompts=0)
    record = trained[kind][1]
    assert len(record["accuracy"]) == (4 if kind == "medusa" else 1)
    assert record["loss"] < first["loss"] / 5
    assert min(record["accuracy"]) > 60 / VOCAB  # chance is 1 / VOCAB
    assert max(first["accuracy"]) < 0.5
    assert record["steps"] == 300 and record["data"] == [str(jsonl)] and record["self_distil"] is False


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_load_round_trips_state_and_drafts(kind, target, tokenizer, trained):
    out = trained[kind][0]
    head = build(kind, target).eval()
    head.load_state_dict(torch.load(out / CHECKPOINT, weights_only=True)["head"])  # the weights as trained
    loaded = load_head(out, target)
    assert head.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in head.state_dict().items())

    ids = torch.tensor([tokenizer(CYCLE[:20])["input_ids"]])
    with capture(target) as got:
        target(ids)
    inputs = (got[0],) if kind == "medusa" else (got[0][:, :-1], ids[:, 1:])
    outputs = [h(*inputs) if kind == "eagle" else (h(*inputs),) for h in (head, loaded)]
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    runs = [specdec.generate(target, ids, drafter=d, max_new_tokens=24, return_dict_in_generate=True)
            for d in (drafter(head), load(out, target))]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    drafts = [(r.stats.drafted_tokens, r.stats.accepted_tokens) for r in runs]
    assert drafts[0] == drafts[1] and drafts[0][1] > 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_trained_drafter_is_lossless_and_raises_tau(kind, target, tokenizer, trained):
    out, record = trained[kind]
    rows = [tokenizer(s)["input_ids"] for s in (CYCLE[5:12], CYCLE[20:23], "hello world")]
    ids = torch.zeros(3, max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, ids.shape[1] - len(row) :], mask[b, ids.shape[1] - len(row) :] = torch.tensor(row), 1
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40)
    taus = []
    for trained_or_not in (load(out, target), drafter(build(kind, target).eval())):
        res = specdec.generate(target, ids, attention_mask=mask, drafter=trained_or_not, do_sample=False, max_new_tokens=40,
                               return_dict_in_generate=True)
        assert torch.equal(res.sequences, expected)
        taus.append(res.stats.tau)
    assert taus[0] > taus[1] + 1.5
    assert record["eval"]["prompts"] == 8 and record["eval"]["tau"] > 2.5


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_resume_continues_the_same_run_exactly(kind, target, tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in cycle_lines(22, 2)])
    run = dict(kind=kind, steps=14, batch_size=4, lr=FAST[kind], max_length=80, eval_prompts=2, seed=3)
    # 20 sequences, 5 batches an epoch: the first half stops inside epoch 1, the second crosses into epoch 2.
    train(target, tokenizer, [source], out=tmp_path / "a", **{**run, "steps": 7})
    half = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)
    train(target, tokenizer, [source], out=tmp_path / "a", resume=True, **run)
    train(target, tokenizer, [source], out=tmp_path / "b", **run)
    a, b = (torch.load(tmp_path / d / CHECKPOINT, weights_only=True) for d in "ab")
    assert half["step"] == 7 and a["step"] == b["step"] == 14 and a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(v, b["head"][k]) for k, v in a["head"].items())
    assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for i, s in a["optimizer"]["state"].items()
               for k, v in s.items())

    with pytest.raises(ValueError, match="no checkpoint.pt"):
        train(target, tokenizer, [source], out=tmp_path / "c", resume=True, **run)
    # The resumed run starts from the checkpoint's weights, not afresh: other weights there, another result.
    (tmp_path / "c").mkdir()
    torch.save({**half, "head": {k: v + 0.01 for k, v in half["head"].items()}}, tmp_path / "c" / CHECKPOINT)
    train(target, tokenizer, [source], out=tmp_path / "c", resume=True, **run)
    c = torch.load(tmp_path / "c" / CHECKPOINT, weights_only=True)
    assert not all(torch.equal(v, b["head"][k]) for k, v in c["head"].items())
    with pytest.raises(ValueError, match="used lr=.*drop --resume"):
        train(target, tokenizer, [source], out=tmp_path / "a", resume=True, **{**run, "lr": 0.5})


def test_recomputed_features_train_as_recorded_ones(target, tokenizer, jsonl, tmp_path):
    run = dict(kind="medusa", steps=10, lr=1e-2, max_length=48, eval_prompts=0)
    train(target, tokenizer, [jsonl], out=tmp_path / "kept", **run)
    train(target, tokenizer, [jsonl], out=tmp_path / "recomputed", feature_memory=0, **run)
    kept, recomputed = (torch.load(tmp_path / d / CHECKPOINT, weights_only=True)["head"]
                        for d in ("kept", "recomputed"))
    assert all(torch.allclose(v, recomputed[k], atol=1e-5) for k, v in kept.items())
    assert any(v.abs().max() > 1e-3 for k, v in kept.items() if k.endswith("weight"))


def test_cli_trains_from_jsonl(target_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "heads"
    main(["--target", str(target_dir), "--kind", "eagle", "--data", str(jsonl), "--out", str(out), "--steps", "60",
          "--lr", "3e-3", "--max-length", "48", "--eval-prompts", "4", "--eval-tokens", "32", "--seed", "1"])
    config = json.loads((out / "config.json").read_text())
    training = config["training"]
    assert config["kind"] == "eagle" and training["steps"] == 60 and training["seed"] == 1
    assert training["eval"]["prompts"] == 4 and training["eval"]["tau"] > 1.5
    assert (out / CHECKPOINT).is_file()
    assert f"saved the eagle heads in {str(out)!r}" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a finished run is not overwritten by accident
        main(["--target", str(target_dir), "--kind", "eagle", "--data", str(jsonl), "--out", str(out), "--steps", "1"])
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 60


def test_cli_names_the_shipped_target_and_defaults_max_length_to_its_positions(tmp_path, capsys):
    text = tmp_path / "code.txt"
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(8)))
    main(["--target", "embedded", "--kind", "medusa", "--data", str(text), "--out", str(tmp_path / "h"),
          "--steps", "2", "--eval-prompts", "1", "--eval-tokens", "4", "--device", "cpu"])
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["target"]["hidden_size"] == 256 and config["training"]["max_length"] == 512


def test_cli_self_distils_from_plain_text(target, target_dir, tmp_path):
    """On random text the target still answers with its cycle: heads that learn the target's responses
    predict it, heads that learn the text do not."""
    rng = random.Random(4)
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join("".join(rng.choice(ALPHABET) for _ in range(12)) for _ in range(40)))
    args = ["--target", str(target_dir), "--kind", "medusa", "--data", str(notes), "--steps", "300", "--lr", "1e-2",
            "--max-length", "64", "--eval-prompts", "4", "--eval-tokens", "32"]
    main(args + ["--out", str(tmp_path / "plain")])
    main(args + ["--out", str(tmp_path / "distilled"), "--self-distil", "--distil-tokens", "40"])
    plain, distilled = (json.loads((tmp_path / d / "config.json").read_text())["training"]
                        for d in ("plain", "distilled"))
    assert distilled["self_distil"] and not plain["self_distil"]
    assert distilled["tokens"] == plain["tokens"] + 36 * 40  # each training prompt gained its response
    assert distilled["eval"]["tau"] > plain["eval"]["tau"] + 1


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "specdec.heads.train", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--self-distil" in res.stdout


def test_heads_for_another_target_are_refused(target, tokenizer, jsonl, trained):
    other = tiny("llama", seed=5)
    out = trained["medusa"][0]
    with pytest.raises(ValueError, match="trained for another LlamaForCausalLM"):
        load(out, other)
    with pytest.raises(ValueError, match="already in --out.*train new ones"):
        train(other, tokenizer, [jsonl], kind="medusa", out=out, steps=1)
    with pytest.raises(ValueError, match="hidden_size=32"):
        train(tiny("llama", hidden_size=48), tokenizer, [jsonl], kind="medusa", out=out, steps=1)


def test_tokenizer_larger_than_the_targets_vocabulary_is_refused(target_dir, jsonl, tmp_path):
    char_tokenizer(extra=VOCAB).save_pretrained(tmp_path / "tok")
    with pytest.raises(SystemExit, match="--tokenizer"):
        main(["--target", str(target_dir), "--tokenizer", str(tmp_path / "tok"), "--kind", "medusa",
              "--data", str(jsonl), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_bad_data_is_refused_with_file_and_line(target_dir, tokenizer, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ab"}, {"question": "ab"}])
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "ab"}\n{"text": \n')
    for source, message in [(bad, r"bad.jsonl', line 2: expected .*got \['question'\]"),
                            (tmp_path / "empty.txt", "empty.txt' is empty"),
                            (tmp_path / "broken.jsonl", "line 2 is not valid JSON"),
                            (tmp_path / "missing.txt", "missing.txt' cannot be read")]:
        with pytest.raises(ValueError, match=message):
            data.read([source], tokenizer)
    with pytest.raises(SystemExit, match="line 2"):
        main(["--target", str(target_dir), "--kind", "medusa", "--data", str(bad), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_conversations_split_before_the_last_reply(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    [plain] = data.read([{"messages": messages}], tokenizer)
    assert plain.prompt == tokenizer("user: hi\nassistant: ")["input_ids"]
    assert plain.response == tokenizer("yo\n", add_special_tokens=False)["input_ids"]
    tokenizer.chat_template = "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}assistant:{% endif %}"
    try:
        [templated] = data.read([{"messages": messages}], tokenizer)
    finally:
        tokenizer.chat_template = None
    assert templated.prompt == tokenizer("user:hi\nassistant:", add_special_tokens=False)["input_ids"]
    assert templated.response == tokenizer("yo\n", add_special_tokens=False)["input_ids"]
