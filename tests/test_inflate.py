"""Function-preserving inflation: a model rewritten at a named shape computes the source's function."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

import specdec
from specdec import cli, embedded, heads
from specdec.inflate import SHAPES, Shape, inflate, inflate_directory, inflate_head

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             intermediate_size=64, vocab_size=97, max_position_embeddings=64)
# Each named shape at test size: widths divided, depth and head counts kept.
SCALED = {"llama-3.2-1b": 16, "llama-3-8b": 32, "llama-3-70b": 64}


def source(config_class, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_class(**{**SMALL, **overrides}), dtype=torch.float32).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", sorted(SCALED))
@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config], ids=["llama", "qwen2"])
def test_inflated_logits_equal_the_sources(config_class, name):
    shape = SHAPES[name].scaled(SCALED[name])
    small = source(config_class)
    big = inflate(small, shape)
    assert (big.config.hidden_size, big.config.num_hidden_layers, big.config.intermediate_size) == (
        shape.hidden, shape.layers, shape.intermediate)
    assert big.config.num_key_value_heads * big.config.head_dim == shape.kv_width
    assert big.num_parameters() > 10 * small.num_parameters()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 24))
    with torch.no_grad():
        assert relative_error(big(ids).logits, small(ids).logits) < 1e-5


def test_bf16_inflation_is_exact_where_the_width_grows_by_a_power_of_two():
    """The stream is copied 4 times and the source's embeddings are tied: untied, the embedding writes each
    copy and the LM head reads them divided by 4, exactly in bf16 (before, the logits came out 4x)."""
    models = embedded.load(dtype=torch.bfloat16)
    assert models.target.config.tie_word_embeddings
    big = inflate(models.target, Shape(hidden=1024, layers=7, intermediate=1024, heads=32, kv_heads=8, head_dim=32))
    x = models.tokenizer(models.prompts(1), return_tensors="pt")
    with torch.no_grad():
        assert relative_error(big(**x).logits.float(), models.target(**x).logits.float()) < 2e-2
    expected = models.target.generate(**x, do_sample=False, max_new_tokens=32)
    assert torch.equal(big.generate(**x, do_sample=False, max_new_tokens=32), expected)


def test_a_source_with_the_shapes_head_dim_inflates_to_its_exact_head_layout():
    shape = Shape(hidden=64, layers=3, intermediate=128, heads=8, kv_heads=4, head_dim=8)
    big = inflate(source(LlamaConfig), shape)
    assert (big.config.num_attention_heads, big.config.num_key_value_heads, big.config.head_dim) == (8, 4, 8)


def test_kv_heads_are_copied_when_the_shapes_groups_are_smaller():
    """4 query heads per KV head in the source, 2 in the shape: each source KV head is held twice."""
    small = source(LlamaConfig, num_key_value_heads=1)
    big = inflate(small, Shape(hidden=64, layers=2, intermediate=64, heads=8, kv_heads=4, head_dim=8))
    ids = torch.randint(0, SMALL["vocab_size"], (1, 16))
    with torch.no_grad():
        assert relative_error(big(ids).logits, small(ids).logits) < 1e-5


def test_qwen3_is_equal_to_its_norms_epsilon():
    """Qwen3's q/k norms share the config's epsilon, which the hidden norms need scaled (see the module)."""
    small = source(Qwen3Config)
    big = inflate(small, SHAPES["llama-3-8b"].scaled(32))
    ids = torch.randint(0, SMALL["vocab_size"], (1, 16))
    with torch.no_grad():
        assert relative_error(big(ids).logits, small(ids).logits) < 1e-3


def test_inflation_refuses_what_it_cannot_preserve():
    small = source(LlamaConfig)
    with pytest.raises(ValueError, match="smaller than the source"):
        inflate(small, Shape(hidden=16, layers=2, intermediate=64, heads=2, kv_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="head dimension 8 must divide"):
        inflate(small, Shape(hidden=60, layers=2, intermediate=64, heads=4, kv_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="wider KV cache"):  # groups of 4 in 3s need 6 KV heads
        inflate(source(LlamaConfig, hidden_size=96, num_attention_heads=12, num_key_value_heads=3),
                Shape(hidden=96, layers=2, intermediate=64, heads=12, kv_heads=4, head_dim=8))
    with pytest.raises(ValueError, match="whole groups"):
        inflate(small, Shape(hidden=40, layers=2, intermediate=64, heads=5, kv_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="Unknown shape"):
        inflate(small, "llama-4")
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=97))
    with pytest.raises(ValueError, match="'gpt2'"):
        inflate(gpt2, SHAPES["llama-3-8b"].scaled(32))


@pytest.fixture(scope="module")
def inflated():
    """The embedded pair and heads, the target and heads inflated to a small shape and the draft to another."""
    models = embedded.load()
    target_shape = Shape(hidden=384, layers=8, intermediate=1024, heads=12, kv_heads=4, head_dim=32)
    draft_shape = Shape(hidden=192, layers=3, intermediate=512, heads=6, kv_heads=3, head_dim=32)
    big = inflate(models.target, target_shape)
    return models, big, inflate(models.draft, draft_shape), target_shape


def test_every_drafter_writes_the_same_text_on_the_inflated_target(inflated):
    models, big, big_draft, shape = inflated
    x = models.tokenizer(models.prompts(2)[1], return_tensors="pt")

    def run(target, drafter):
        out = specdec.generate(target, **x, drafter=drafter, max_new_tokens=24, return_dict_in_generate=True)
        return out.sequences, out.stats.tau

    pairs = [(specdec.DraftModel(models.draft), specdec.DraftModel(big_draft)),
             (specdec.PromptLookup(), specdec.PromptLookup())]
    for kind in ("medusa", "eagle"):
        head = heads.load_head(getattr(models, kind), models.target)
        pairs.append((heads.drafter(head), heads.drafter(inflate_head(head, big, shape))))
    reference = models.target.generate(**x, do_sample=False, max_new_tokens=24)
    for small_drafter, big_drafter in pairs:
        (small_seq, small_tau), (big_seq, big_tau) = run(models.target, small_drafter), run(big, big_drafter)
        assert torch.equal(big_seq, small_seq) and torch.equal(big_seq, reference), type(small_drafter).__name__
        assert big_tau == small_tau


def test_cli_inflates_a_recipe_directory_that_loads_and_drafts(tmp_path, capsys):
    out = tmp_path / "big"
    cli.main(["inflate", str(embedded.DEFAULT), str(out), "--shape", "384,8,1024,12,4,32",
              "--draft-shape", "192,3,512,6,3,32"])
    printed = capsys.readouterr().out
    assert printed.count("wrote") == 4
    models = embedded.load(out)
    assert models.target.config.hidden_size == 384 and models.draft.config.hidden_size == 192
    eagle = heads.load(models.eagle, models.target)  # the fingerprint is the inflated target's
    x = models.tokenizer(models.prompts(1), return_tensors="pt")
    small = embedded.load()
    expected = small.target.generate(**x, do_sample=False, max_new_tokens=16)
    assert torch.equal(specdec.generate(models.target, **x, drafter=eagle, max_new_tokens=16), expected)
    with pytest.raises(SystemExit):
        cli.main(["inflate", str(embedded.DEFAULT / "target"), str(tmp_path / "x"), "--shape", "llama-3-8b",
                  "--draft-shape", "llama-3.2-1b"])
    assert "no draft/" in capsys.readouterr().err


def test_inflate_directory_writes_a_single_model(tmp_path):
    lines = list(inflate_directory(embedded.DEFAULT / "draft", tmp_path / "d", Shape(192, 3, 512, 6, 3, 32)))
    assert lines == [f"wrote {tmp_path / 'd'} (Shape(hidden=192, layers=3, intermediate=512, heads=6, kv_heads=3, head_dim=32))"]
    assert (tmp_path / "d" / "tokenizer.json").is_file()
