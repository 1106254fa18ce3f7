"""Greedy equality on a GPU, in fp32 and bf16 (skipped where there is no GPU; run through the device tool).

On CUDA the verifier runs the Triton tree kernel, while ``model.generate`` runs SDPA one token at a time. In
fp32 the two agree token for token. In bf16 they round differently in the last bits, and the tiny random
models here (vocabulary 96, logits of a few units, bf16 spacing 1/32) have exact and near ties in their
logits at many steps, so a row may take the other side of a tie and continue differently from there.
What must hold is that every divergence starts at such a tie: both tokens are within a few bf16 steps
of the maximum of the target's own logits for the shared prefix. A wrong mask or position would
diverge at tokens far below the maximum.
"""

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import specdec
from specdec import heads
from specdec.heads.train import train
from models import VOCAB, perturbed, prompts, tiny
from test_train_heads import CYCLE, FAST, cycle_lines, target_dir, tokenizer  # noqa: F401 (fixtures)
from specdec.kernels import tree_attention as kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TIE = 0.05  # relative logit gap under which two tokens count as tied in bf16


@torch.no_grad()
def tie_gaps(model, expected, got, mask):
    """For each row where ``got`` differs from ``expected``: how far below the target's maximum logit each
    of the two tokens lies at the first difference, relative to the largest logit."""
    gaps = []
    for b in (got != expected).any(1).nonzero().flatten().tolist():
        j = int((got[b] != expected[b]).nonzero()[0])
        start = int((mask[b] == 0).sum())
        logits = model(expected[b, start:j][None]).logits[0, -1].float()
        top, scale = logits.max(), logits.abs().max()
        gaps.append(max(float(top - logits[got[b, j]]), float(top - logits[expected[b, j]])) / float(scale))
    return gaps


PATHS = {"graphs": {}, "dynamic": {"fast_path": False}, "compiled": {"compile": True}}


def compare(arch, dtype, path="graphs"):
    """Rows identical to ``model.generate``, rows compared, and the tie gaps of the rows that differ."""
    model = tiny(arch, attn="eager" if arch == "gemma2" else "sdpa").to("cuda", dtype)
    draft = perturbed(model.cpu().float()).to("cuda", dtype)
    model.to("cuda", dtype)
    same = total = 0
    gaps = []
    for seed in range(4):
        ids, mask = [t.cuda() for t in prompts(4, 9, seed)]
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
        drafters = [specdec.DraftModel(draft, 4, tree_width=2), specdec.PromptLookup(4),
                    heads.Medusa(heads.MedusaHeads(model, num_heads=3)), heads.Eagle(heads.EagleHead(model), 3, 4, 12)]
        for drafter in drafters:
            got = specdec.generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=32,
                                   **PATHS[path])
            same += int((got == expected).all(1).sum())
            total += got.shape[0]
            gaps += tie_gaps(model, expected, got, mask)
    return same, total, gaps


@pytest.mark.parametrize("arch,path", [(arch, path) for arch in ["llama", "qwen3", "mistral", "gemma2", "gpt2"]
                                       for path in ["graphs", "dynamic"]]
                         + [("llama", "compiled"), ("gemma2", "compiled")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_on_gpu(arch, dtype, path):
    """Compiled, bf16 rounds differently again: Inductor keeps fused chains of bf16 ops in fp32 and rounds once,
    where eager code rounds after every op, so fewer rows (29 of 64 on an H100) stay clear of the ties."""
    same, total, gaps = compare(arch, dtype, path)
    if dtype == torch.float32:
        assert same == total
    else:
        assert max(gaps, default=0.0) < TIE, f"a divergence away from a tie: relative gaps {gaps}"
        assert same >= total // (3 if path == "compiled" else 2), f"only {same}/{total} rows identical"


def test_tie_check_catches_a_wrong_tree(monkeypatch):
    """Guards the bf16 criterion itself: nodes that also see their siblings and descendants must fail it."""
    real = kernel.pack_visibility
    monkeypatch.setattr(kernel, "pack_visibility", lambda visible: real(torch.ones_like(visible)))
    same, total, gaps = compare("llama", torch.bfloat16)
    assert max(gaps, default=0.0) >= TIE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_head_training_on_gpu(target_dir, tokenizer, tmp_path, kind, dtype):
    """Training on CUDA runs under bf16 autocast; the trained heads draft well and stay lossless."""
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to("cuda").eval()
    records = [{"text": line} for line in cycle_lines(160, 1)]
    record = train(target, tokenizer, records, kind=kind, out=tmp_path, steps=300, lr=FAST[kind],
                               max_length=48)
    assert min(record["accuracy"]) > 60 / VOCAB and record["eval"]["tau"] > 2.5
    ids = torch.tensor([tokenizer(CYCLE[3:11])["input_ids"]], device="cuda")
    expected = target.generate(ids, do_sample=False, max_new_tokens=40)
    got = specdec.generate(target, ids, drafter=heads.load(tmp_path, target), max_new_tokens=40)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind,path", [("lookup", "graphs"), ("medusa", "graphs"), ("draft", "graphs"),
                                       ("eagle", "graphs"), ("medusa", "compiled"), ("eagle", "compiled")])
def test_steps_replay_captured_graphs(monkeypatch, kind, path):
    """On a GPU the default path captures the step once per tree shape and replays it from then on, every
    drafter's drafting with it (a drafter reading the device would fail the capture and warn)."""
    replays = []
    real = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or real(self))
    model = tiny("llama")
    draft = perturbed(model).to("cuda")
    model.to("cuda")
    drafter = {"lookup": lambda: specdec.PromptLookup(4),
               "medusa": lambda: heads.Medusa(heads.MedusaHeads(model, num_heads=3)),
               "draft": lambda: specdec.DraftModel(draft, 3, tree_width=2),
               "eagle": lambda: heads.Eagle(heads.EagleHead(model), 3, 4, 12)}[kind]()
    ids, mask = [t.cuda() for t in prompts(2, 9, 0)]
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40, eos_token_id=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be captured")  # no fallback to the dynamic path
        out = specdec.generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=40,
                               eos_token_id=None, return_dict_in_generate=True, **PATHS[path])
    assert torch.equal(out.sequences, expected)
    assert out.stats.steps >= 5
    # The first step of the shape runs eagerly, as warm-up. The host reads "all finished" one step late, so one
    # more step may run past the end: every row masked out, and not counted.
    assert out.stats.steps - 1 <= len(replays) <= out.stats.steps
    assert out.stats.target_forwards == 1 + out.stats.steps  # the prompt's pass, then one per counted step


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_auto_times_rounds_on_the_device(monkeypatch, kind):
    """``speculation="auto"`` on a GPU: rounds timed by CUDA events and read a round late (``DeviceClock``),
    every mode measured, the text ``generate``'s through the switches, and the draft model's catch-up after
    steps it sat out captured as a graph of its own."""
    from specdec import adaptive, session as sessions

    monkeypatch.setattr(adaptive, "ROUND_STEPS", 3)
    model = tiny("llama")
    draft = perturbed(model).to("cuda")
    model.to("cuda")
    drafter = specdec.PromptLookup(4) if kind == "lookup" else specdec.DraftModel(draft, 3)
    ids, mask = [t.cuda() for t in prompts(2, 9, 0)]
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=60, eos_token_id=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be captured")  # the catch-up's capture included
        got = specdec.generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=60,
                               eos_token_id=None, speculation="auto")
    assert torch.equal(got, expected)
    costs = sessions.measured_costs(model)
    assert len(costs) == 3 and all(0 < cost < 1 for cost in costs.values())
    resyncs = [graph for graphs in sessions._sessions[model].recipes.values() for key, graph in graphs.items()
               if key[0] == "resync"]
    assert (kind == "draft") == bool(resyncs)  # prompt lookup keeps nothing to catch up


class Repeat(specdec.Drafter):
    """Drafts each row's last token three more times, on the host, with one ``parents`` row for the batch
    (stride 0), as a hand-written drafter may."""

    max_depth = 3

    def propose(self, seqs):
        batch = seqs.last.shape[0]
        parents = torch.arange(-1, 3, device=seqs.last.device).expand(batch, -1)
        valid = torch.ones(batch, 4, dtype=torch.bool, device=seqs.last.device)
        valid[:, 1:] &= ~seqs.finished[:, None]
        return specdec.Tree(seqs.last[:, None].expand(-1, 4).clone(), parents, valid, max_depth=3, max_children=1)


def test_compiled_step_captures_a_tree_of_expanded_tensors():
    """The warm-up step saw the drafter's expanded tensors and the capture their dense copies, so the compiled
    step recompiled inside the capture, which failed it ("BackendCompilerFailed"): the call ran uncaptured."""
    model = tiny("llama").to("cuda")
    ids, mask = [t.cuda() for t in prompts(2, 9, 0)]
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be captured")
        got = specdec.generate(model, ids, attention_mask=mask, drafter=Repeat(), max_new_tokens=24, compile=True)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind,path", [("none", "graphs"), ("lookup", "graphs"), ("assistant", "graphs"),
                                       ("medusa", "graphs"), ("eagle", "graphs"), ("eagle", "compiled")])
def test_later_calls_replay_steps_captured_before(monkeypatch, kind, path):
    """A later call with prompts of another width and length replays every step from the graphs the first
    call captured (``specdec.session``): no warm-up and no capture, and the same text as ``generate``. The
    draft model is passed as ``assistant_model``, so a new drafter object drafts in each call."""
    from specdec import graphs

    replays, captures = [], []
    real_replay, real_capture = torch.cuda.CUDAGraph.replay, graphs.StepGraphs._capture
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or real_replay(self))
    monkeypatch.setattr(graphs.StepGraphs, "_capture", staticmethod(lambda *a: captures.append(1) or real_capture(*a)))
    model = tiny("llama")
    draft = perturbed(model).to("cuda")
    model.to("cuda")
    drafter = {"none": lambda: {}, "lookup": lambda: {"prompt_lookup_num_tokens": 4},
               "assistant": lambda: {"assistant_model": draft},
               "medusa": lambda: {"drafter": heads.Medusa(heads.MedusaHeads(model, num_heads=3))},
               "eagle": lambda: {"drafter": heads.Eagle(heads.EagleHead(model), 3, 4, 12)}}[kind]()
    for call, (width, new) in enumerate([(9, 40), (13, 30), (6, 48)]):
        ids, mask = [t.cuda() for t in prompts(2, width, call)]
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=None)
        replays.clear(), captures.clear()
        out = specdec.generate(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None,
                               return_dict_in_generate=True, **drafter, **PATHS[path])
        assert torch.equal(out.sequences, expected), f"call {call}"
        if call:
            assert not captures and out.stats.steps <= len(replays) <= out.stats.steps + 1, f"call {call}"


def test_uncapturable_model_falls_back_and_says_so_once(monkeypatch):
    """A forward that reads the device cannot be captured: the call still matches ``generate``, on the
    dynamic path, and the warning comes once, not per call."""
    from specdec import graphs

    monkeypatch.setattr(graphs, "_said", set())
    model = tiny("llama").to("cuda")
    model.model.layers[0].register_forward_pre_hook(lambda module, args: float(args[0].sum()) and None)
    ids, mask = [t.cuda() for t in prompts(2, 9, 0)]
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        got = specdec.generate(model, ids, attention_mask=mask, drafter=specdec.PromptLookup(4), max_new_tokens=24)
    assert torch.equal(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = specdec.generate(model, ids, attention_mask=mask, drafter=specdec.PromptLookup(4), max_new_tokens=24)
    assert torch.equal(again, expected)
    sampled = specdec.generate(model, ids, attention_mask=mask, do_sample=True, max_new_tokens=8)  # random draws
    assert sampled.shape[0] == 2  # still work after the failed capture (they raised before the fix)


@pytest.mark.parametrize("kind,path", [(kind, path) for kind in ["chain", "lookup", "medusa", "eagle"]
                                       for path in ["graphs", "dynamic"]] + [("medusa", "compiled")])
def test_sampling_on_gpu_matches_target_distribution(monkeypatch, kind, path):
    """The chi-square test of tests/test_sampling.py, on a GPU, one token later: the second step is the
    first one replayed from a graph, so tokens 2-3 (given the most frequent first token) are tested; random
    numbers drawn inside a replayed graph must be fresh at every replay. A second call replays from its
    first step the graphs the first one captured, and is tested the same way."""
    import test_sampling as ts

    replays = []
    real = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or real(self))
    target, draft = ts.make_pair()
    gpu_target = copy.deepcopy(target).cuda()  # ``target`` stays on the CPU for the exact distribution
    torch.manual_seed(0)
    drafter = ts.make_drafter(kind, gpu_target, draft.cuda())
    options = dict(drafter=drafter, do_sample=True, max_new_tokens=3, eos_token_id=None, pad_token_id=0,
                   return_dict_in_generate=True, **PATHS[path], **ts.SETTINGS[0])
    torch.manual_seed(0)
    out = specdec.generate(gpu_target, ts.PROMPT.repeat(ts.ROWS, 1).cuda(), **options)
    assert (len(replays) > 0) == (path != "dynamic")
    check_distribution(ts, target, out)
    # Again, in the buffers the first call left: every step now replays a graph that call captured.
    replays.clear()
    out = specdec.generate(gpu_target, ts.PROMPT.repeat(ts.ROWS, 1).cuda(), **options)
    if path != "dynamic":
        assert len(replays) >= out.stats.steps
    check_distribution(ts, target, out)


def check_distribution(ts, target, out):
    new = out.sequences[:, ts.PROMPT.shape[1]:].cpu()
    assert ts.chi2_pvalue(new[:, :2].numpy(), ts.exact_joint(target, ts.SETTINGS[0])) > 1e-3
    first = new[:, 0].mode().values
    given = new[new[:, 0] == first][:, 1:].numpy()
    assert len(given) > 500
    prompt = torch.cat([ts.PROMPT, first.view(1, 1)], 1)
    assert ts.chi2_pvalue(given, ts.exact_joint(target, ts.SETTINGS[0], prompt)) > 1e-3
    assert out.stats.accepted_tokens > 0.05 * ts.ROWS


def test_bench_counts_forwards_replayed_from_graphs():
    """A graph replay runs no Python, so a forward hook misses it: the 2026-11-24 GPU table showed τ 38.5
    for every fast-path strategy. τ must not depend on the path."""
    from specdec import bench, embedded

    models = embedded.load()
    models.target.cuda()
    models.draft.cuda()
    models.medusa = models.eagle = None
    record = bench.measure(models, models.prompts(2), modes=("greedy",), max_new_tokens=32, progress=False,
                           only=["specdec: prompt lookup", "specdec: prompt lookup, dynamic"])
    tau = {r["strategy"]: r["tau"] for r in record["results"]}
    assert tau["specdec: prompt lookup"] == tau["specdec: prompt lookup, dynamic"] < 8
