"""Fused projections: one GEMM per group during specdec's calls, the model unchanged outside them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

import specdec
from specdec import fusion
from models import prompts, tiny


class CountLinear(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.linear
        return func(*args, **(kwargs or {}))


def linear_calls(model, ids) -> int:
    with CountLinear() as count:
        model(ids)
    return count.calls


@pytest.mark.parametrize("arch,groups", [("llama", 4), ("qwen2", 4), ("opt", 2), ("phi3", 0), ("gpt2", 0)])
def test_one_gemm_per_group_same_logits(arch, groups):
    """q/k/v (with biases for Qwen2 and OPT) and gate/up run as one GEMM each inside the block, with the
    logits of the unfused model; models whose projections are fused already (Phi-3, GPT-2) are left alone."""
    model = tiny(arch)
    ids, _ = prompts(2, 9, 0, ragged=False)
    want, plain_calls = model(ids).logits, linear_calls(model, ids)
    with fusion.fused(model) as projections:
        got, fused_calls = model(ids).logits, linear_calls(model, ids)
    assert len(projections.groups) == groups
    saved = sum(len(g.members) - 1 for g in projections.groups)
    assert fused_calls == plain_calls - saved
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_weights_move_into_one_buffer_with_their_names_and_values():
    model = tiny("qwen2")
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bytes_before = sum(p.untyped_storage().nbytes() for p in params.values())
    fusion.prepare(model)
    attn = model.model.layers[0].self_attn
    for name in ("weight", "bias"):
        parts = [getattr(getattr(attn, p), name) for p in ("q_proj", "k_proj", "v_proj")]
        assert len({p.untyped_storage().data_ptr() for p in parts}) == 1
        assert parts[1].data_ptr() == parts[0].data_ptr() + parts[0].numel() * parts[0].element_size()
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    shared = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(shared.values()) == bytes_before


def test_modules_are_restored_after_each_call_even_on_error():
    model = tiny()
    ids, mask = prompts(1, 6, 1)
    specdec.generate(model, ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    layers = model.model.layers
    assert not any("forward" in vars(m) for layer in layers for m in (layer.self_attn.q_proj, layer.mlp.up_proj))

    class Boom:
        def put(self, value):
            raise RuntimeError("boom")

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="boom"):
        specdec.generate(model, ids, attention_mask=mask, max_new_tokens=4, do_sample=False, streamer=Boom())
    assert not any("forward" in vars(m) for layer in layers for m in (layer.self_attn.q_proj, layer.mlp.up_proj))
    assert fusion.prepare(model).depth == 0


def test_moved_model_is_fused_again_and_right_meanwhile():
    """``model.to`` gives each weight its own buffer again: outside a call the modules still run right on
    them, and the next call fuses them anew."""
    model = tiny()
    ids, mask = prompts(2, 7, 2)
    fusion.prepare(model)
    model.to(torch.float64)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    got = specdec.generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           prompt_lookup_num_tokens=3)
    assert torch.equal(got, want)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()
    assert attn.q_proj.weight.dtype == torch.float64


def test_nothing_is_held_between_calls():
    """Between calls only the parameters reference the fused buffers, so a model moved or cast afterwards
    frees them: the groups keep no view of them, and no output."""
    model = tiny()
    ids, mask = prompts(1, 6, 5)
    specdec.generate(model, ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert all(g.weight is None and g.bias is None and g.pending is None for g in fusion.prepare(model).groups)


def test_a_member_called_on_another_input_runs_alone():
    """Cross-attention-like use: k and v of another tensor than q's get their own GEMMs, not q's input's."""
    model = tiny()
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    with fusion.fused(model):
        q, k, v = attn.q_proj(x), attn.k_proj(other), attn.v_proj(other)
    torch.testing.assert_close(q, F.linear(x, attn.q_proj.weight))
    torch.testing.assert_close(k, F.linear(other, attn.k_proj.weight))
    torch.testing.assert_close(v, F.linear(other, attn.v_proj.weight))


def test_fused_model_saves_and_loads(tmp_path):
    model = tiny()
    ids, mask = prompts(1, 6, 3)
    specdec.generate(model, ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_unfused_on_request_and_bad_value():
    model = tiny()
    ids, mask = prompts(1, 6, 4)
    specdec.generate(model, ids, attention_mask=mask, max_new_tokens=3, do_sample=False, fuse_projections=False)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="fuse_projections"):
        specdec.generate(model, ids, max_new_tokens=3, fuse_projections="yes")


def test_a_peft_model_runs_with_its_adapters_and_its_lora_layers_unfused():
    """A LoRA layer is not an ``nn.Linear`` (it adds its adapter's output): its group stays apart, the others
    fuse, and the text is what the PEFT model's own ``generate`` writes (the model was refused before)."""
    peft = pytest.importorskip("peft")
    model = tiny()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False)).eval()
    ids, mask = prompts(2, 7, 0)
    want = lora.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert torch.equal(specdec.generate(lora, ids, attention_mask=mask, assistant_model=lora, max_new_tokens=10),
                       want)
    layer = model.model.layers[0]
    assert not fusion._Group.fusable([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
    assert layer.mlp.gate_proj.weight.untyped_storage().data_ptr() == layer.mlp.up_proj.weight.untyped_storage().data_ptr()


def test_modules_that_another_library_hooks_are_left_alone():
    """accelerate's hooks replace ``forward``; a forward hook acts on every call: fusing would skip them."""
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    model = tiny()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    accelerate_hooks.add_hook_to_module(attn.k_proj, accelerate_hooks.ModelHook())
    calls = []
    mlp.up_proj.register_forward_hook(lambda *_: calls.append(1))
    ids, mask = prompts(1, 6, 0)
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
    calls.clear()
    assert torch.equal(specdec.generate(model, ids, attention_mask=mask, max_new_tokens=6), want)
    assert calls  # the hook saw specdec's passes
    groups = [g.members for g in fusion.prepare(model).groups]
    assert [attn.q_proj, attn.k_proj, attn.v_proj] not in groups and [mlp.gate_proj, mlp.up_proj] not in groups
    assert [model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj] in groups
