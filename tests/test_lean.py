"""Memory-lean training kernels: same forward values and gradients as the modules they replace, less kept."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qlorax.engine import attention, lean, lean_native  # noqa: E402


@pytest.fixture(autouse=True)
def _llama_rotary_restored(monkeypatch):
    """make_lean replaces Llama's module-level apply_rotary_pos_emb (bit-identical); each test leaves it as found."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)


def _llama_config(**extra):
    from transformers import LlamaConfig

    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
    return LlamaConfig(**{**settings, **extra})


def _grads(module, inputs, grad_out):
    for t in inputs:
        t.grad = None
    out = module(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("autocast", [False, True])
def test_rmsnorm_matches_transformers(autocast):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(64, dtype=torch.bfloat16)
    x = (torch.randn(2, 5, 64) * 3).to(torch.bfloat16).requires_grad_()
    g = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    results = []
    for patched in (False, True):
        if patched:
            norm.forward = lean._bind(lean._rmsnorm_forward, norm)
        x.grad = norm.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = norm(x)
        y.backward(g)
        results.append((y.detach(), x.grad.float(), norm.weight.grad.float()))
    (want, want_dx, want_dw), (got, got_dx, got_dw) = results
    assert torch.equal(got, want)                                     # forward: bit-identical
    assert torch.allclose(got_dx, want_dx, rtol=2e-2, atol=2e-2)
    assert torch.allclose(got_dw, want_dw, rtol=2e-2, atol=5e-2)


def test_gated_mlp_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(_llama_config()).to(torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    params = [x, mlp.gate_proj.weight, mlp.up_proj.weight]
    want, want_grads = _grads(lambda *_: mlp(x), params, g)
    mlp.forward = lean._bind(lean._gated_mlp_forward, mlp)
    got, got_grads = _grads(lambda *_: mlp(x), params, g)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("fuse", [False, True], ids=["eager", "compiled"])
def test_gated_mlp_keeps_gate_and_up_as_int8_rows(fuse):
    """quant.int8_saved_mlp=int8: the forward is unchanged, gate and up are not kept, gradients stay close."""
    import gc
    import weakref

    from transformers.models.llama.modeling_llama import LlamaMLP

    from qlorax.engine.quant import int8

    torch.manual_seed(0)
    mlp = LlamaMLP(_llama_config()).to(torch.bfloat16)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    params = [x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    runs = {}
    for codec in (None, int8.row_codec(fuse)):
        mlp.forward = lean._bind(lean._gated_mlp_forward, mlp)
        mlp.qlorax_mlp_codec = codec
        outputs = []
        hooks = [m.register_forward_hook(lambda _, __, out: outputs.append(weakref.ref(out)))
                 for m in (mlp.gate_proj, mlp.up_proj)]
        y = mlp(x)
        for hook in hooks:
            hook.remove()
        gc.collect()
        alive = sum(ref() is not None for ref in outputs)
        for t in params:
            t.grad = None
        y.backward(g)
        runs[codec is None] = (y.detach(), [t.grad.float() for t in params], alive)
    (want, want_grads, kept_plain), (got, got_grads, kept_int8) = runs[True], runs[False]
    assert torch.equal(got, want)   # the forward is computed from the exact gate and up
    assert kept_plain == 2 and kept_int8 == 0, (kept_plain, kept_int8)
    for a, b in zip(got_grads, want_grads):
        assert 0 < float((a - b).norm() / b.norm()) < 0.03   # rounded, not the same, and close


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed-seed", "drawn-mask"])
def test_seeded_dropout_keeps_only_its_token_and_drops_at_rate_p(hashed, monkeypatch):
    from qlorax.engine import dropout as lora_dropout

    if not hashed:   # where torch.compile is unavailable: the mask is drawn and kept, one byte per element
        monkeypatch.setattr(lora_dropout, "_hashed_kernel", lambda: None)
    torch.manual_seed(0)
    dropout = lean.seeded_dropout(0.25)
    x = torch.ones(400, 500, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout(x)
    assert [(t.dtype, t.numel()) for t in saved] == ([(torch.int64, 1)] if hashed else [(torch.bool, x.numel())])
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, y.detach())            # d(x * mask * s)/dx = mask * s
    dropout.eval()
    assert dropout(x) is x
    assert lean.seeded_dropout(0.0).train()(x) is x


def _tiny_peft_model(dropout: float, seed: int = 0, targets=("q_proj", "v_proj"), **config):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(**config)).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets)))
    for p in model.parameters():
        if p.requires_grad:
            p.data = (torch.randn(p.shape) * 0.05).float()
    return model


def _step(model, ids):
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved_bytes(model, ids) -> int:
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss
    return sum(seen.values())


def test_make_lean_same_training_step_and_less_kept_for_backward():
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    plain = _tiny_peft_model(dropout=0.0)
    patched = _tiny_peft_model(dropout=0.0)
    counts = lean.make_lean(patched, autocast=True)
    # 2 layers x 2 norms + final; q and v of 2 layers; attention's backward on AMX tiles where the CPU has them
    assert counts == {"rmsnorm": 5, "gated_mlp": 2, "lora_dropout": 0, "fused_lora": 4, "chunked_loss": 1,
                      "attention": int(attention.library() is not None),
                      "rotary": 2 * int(lean_native.library() is not None)}
    loss_a, grads_a = _step(plain, ids)
    loss_b, grads_b = _step(patched, ids)
    assert abs(loss_a - loss_b) < 1e-3
    for name, grad in grads_a.items():
        assert torch.allclose(grads_b[name], grad, rtol=5e-2, atol=2e-3), name

    with_dropout, lean_dropout = _tiny_peft_model(dropout=0.1), _tiny_peft_model(dropout=0.1)
    assert lean.make_lean(lean_dropout, autocast=True)["lora_dropout"] == 4
    assert _saved_bytes(lean_dropout, ids) < 0.75 * _saved_bytes(with_dropout, ids)


def _lora_nodes(loss) -> list:
    """The LoRA path's backward nodes in ``loss``'s graph."""
    nodes, seen, todo = [], set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "LoraPathBackward":
            nodes.append(node)
        todo += [n for n, _ in node.next_functions]
    return nodes


def _kept_by_adapters(model, ids, names: tuple[str, ...], inputs: bool) -> tuple[int, int]:
    """(tensors seen: the inputs, else the outputs, of the modules whose names end with ``names``; how many of them
    a LoRA backward node keeps) after one forward."""
    seen = []   # held here, so a recomputed tensor cannot take a freed one's address
    modules = [m for name, m in model.named_modules() if name.endswith(names)]
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0])) if inputs
             else m.register_forward_hook(lambda _, args, out: seen.append(out)) for m in modules]
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    for hook in hooks:
        hook.remove()
    kept = {t.untyped_storage().data_ptr() for node in _lora_nodes(loss) for t in node.saved_tensors if t is not None}
    return len(seen), sum(t.untyped_storage().data_ptr() in kept for t in seen)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_down_proj_adapter_input_is_recomputed_not_kept(monkeypatch, checkpointing):
    """LoRA on down_proj keeps silu(gate) * up for its A gradient; backward recomputes it from gate and up."""
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(5))
    runs = {}
    for recompute in (True, False):
        if not recompute:   # the plain path: down_proj's adapter keeps its input
            monkeypatch.setattr(lean, "_other_saved_tensor_hooks", lambda: True)
        model = _tiny_peft_model(dropout=0.1, targets=("q_proj", "down_proj"))
        assert lean.make_lean(model, autocast=True)["gated_mlp"] == 2
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(11)
        runs[recompute] = (_step(model, ids), None if checkpointing
                           else _kept_by_adapters(model, ids, ("mlp.down_proj",), inputs=True))
    (loss_a, grads_a), kept_a = runs[True]
    (loss_b, grads_b), kept_b = runs[False]
    assert loss_a == loss_b
    assert any("down_proj.lora_A" in name for name in grads_a)
    for name, grad in grads_b.items():
        assert torch.equal(grads_a[name], grad), name   # the recomputed input is bit-identical
    if not checkpointing:
        assert kept_a == (2, 0) and kept_b == (2, 2)   # 2 layers: kept by the plain path, by neither here


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-ops"])
def test_norm_output_feeding_adapters_is_recomputed_not_kept(monkeypatch, checkpointing, native):
    """The q/k/v and gate/up adapters save the RMSNorm's input and row scales (already kept by the norm), not its
    output; backward makes the output again, bit-identical, once per norm, and drops it after its last adapter."""
    from qlorax.engine import lora_native

    if not native:
        monkeypatch.setattr(lora_native, "usable", lambda *args: False)
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(6))
    runs = {}
    for recompute in (True, False):
        if not recompute:   # no recipe on the norm's output: the adapters keep the output itself
            monkeypatch.setattr(lean, "NormOutput", lambda *args: None)
        model = _tiny_peft_model(dropout=0.1, targets=("q_proj", "v_proj", "gate_proj", "up_proj"))
        assert lean.make_lean(model, autocast=True)["fused_lora"] == 8
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(12)
        runs[recompute] = (_step(model, ids), None if checkpointing else _kept_by_adapters(
            model, ids, ("input_layernorm", "post_attention_layernorm"), inputs=False))
        if recompute:   # every rebuild ends its backward with no adopter left and nothing held
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            rebuilds = {node.recompute for node in _lora_nodes(loss) if node.recompute is not None}
            # 2 layers x 2 norms, less the first layer's input norm unless checkpointing makes the embeddings'
            # output want a gradient; each norm adopted by its two adapters
            assert len(rebuilds) == (4 if checkpointing else 3) and {r.users for r in rebuilds} == {2}
            loss.backward()
            assert all(r.users == 0 and r.cached is None for r in rebuilds)
    (loss_a, grads_a), kept_a = runs[True]
    (loss_b, grads_b), kept_b = runs[False]
    assert loss_a == loss_b
    for name, grad in grads_b.items():
        assert torch.equal(grads_a[name], grad), name
    if not checkpointing:   # the first layer's input needs no gradient: its input norm has no recipe (kept by both)
        assert kept_b == (4, 4) and kept_a == (4, 1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_native_rotary_in_a_model_gives_the_same_step(monkeypatch, checkpointing):
    """A model whose heads the native rotary takes (head size 32): loss and gradients bit-identical to transformers'
    rotary, with and without gradient checkpointing."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(8))
    runs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(lean, "_native_rotary", lambda attention_class: 0)
            monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", getattr(original, "qlorax_original", original))
        model = _tiny_peft_model(dropout=0.0, hidden_size=128, intermediate_size=256)
        assert lean.make_lean(model, autocast=True)["rotary"] == (2 * int(lean_native.library() is not None)
                                                                   if native else 0)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        runs.append(_step(model, ids))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert loss_a == loss_b
    for name, grad in grads_b.items():
        assert torch.equal(grads_a[name], grad), name


def _unfuse(model) -> int:
    """Back to peft's own LoRA forward (the lean dropout stays): the reference for the fused path."""
    undone = 0
    for module in model.modules():
        if "forward" in vars(module) and hasattr(module, "lora_A"):
            del module.forward
            undone += 1
    return undone


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_path_matches_peft_with_the_same_dropout_mask(dropout):
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (True, False):
        model = _tiny_peft_model(dropout=dropout)
        assert lean.make_lean(model, autocast=True)["fused_lora"] == 4
        if not fused:
            assert _unfuse(model) == 4
        torch.manual_seed(7)
        results.append(_step(model, ids))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 2e-3
    for name, grad in grads_b.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(grads_a[name], grad, rtol=5e-2, atol=5e-3), name


def test_fused_lora_leaves_dora_and_disabled_adapters_to_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dora = get_peft_model(LlamaForCausalLM(_llama_config()), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert lean.make_lean(dora, autocast=False)["fused_lora"] == 0
    model = _tiny_peft_model(dropout=0.0)
    lean.make_lean(model, autocast=False)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        reference = _unfuse(model) and model(input_ids=ids).logits
    assert not torch.equal(adapted, base)
    assert torch.allclose(adapted.float(), reference.float(), atol=2e-2)


def test_lean_dropout_mask_is_replayed_by_gradient_checkpointing():
    """Recomputation must draw the same mask, or checkpointed gradients would be wrong."""
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    results = []
    for checkpointing in (False, True):
        model = _tiny_peft_model(dropout=0.3)
        lean.make_lean(model, autocast=True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(123)
        results.append(_step(model, ids))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b
    for name, grad in grads_a.items():
        assert torch.allclose(grads_b[name], grad, rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("grad", [True, False])
def test_chunked_loss_matches_full_logits(monkeypatch, grad):
    from qlorax.engine.data import IGNORE_INDEX
    from qlorax.engine.lm import loss_sum

    monkeypatch.setattr(lean, "HEAD_CHUNK_ELEMENTS", 300 * 7)   # 7 rows per chunk: several chunks, a ragged last
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX            # masked prompt tokens
    labels[1, -5:] = IGNORE_INDEX            # padding
    mask = torch.ones_like(ids)
    results = []
    for patched in (False, True):
        model = _tiny_peft_model(dropout=0.0)
        if patched:
            lean.make_lean(model, autocast=True)
            assert lean.chunked_head(model) is not None
        model.train()
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            summed, count = loss_sum(model, ids, mask, labels)
        grads = {}
        if grad:
            (summed / count).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(summed), count, grads))
    (want, want_count, want_grads), (got, got_count, got_grads) = results
    assert got_count == want_count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert abs(got - want) < 1e-3 * abs(want)
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=5e-2, atol=2e-3), name


def test_chunked_loss_keeps_the_models_own_head_when_it_is_trained():
    model = _tiny_peft_model(dropout=0.0)
    lean.make_lean(model, autocast=True)
    model.get_base_model().lm_head.weight.requires_grad_(True)
    assert lean.chunked_head(model) is None


def test_lean_patches_survive_train_mode_on_a_plain_load(stories260k):
    """transformers 5 kernelizes a from_pretrained model (Hub kernels, ``kernels`` installed) and re-kernelizes
    on every ``train()``, which put its own RMSNorm forward back over the lean one; qlorax's loader turns that off."""
    from qlorax.engine.model import attach_lora
    from qlorax.engine.quant import load_base_model
    from qlorax.engine.train import prepare_for_training
    from qlorax.spec import compose

    spec = compose(["model=stories260k", f"model.path={stories260k}", "quant=none"])
    model = attach_lora(load_base_model(spec, str(stories260k), "bf16"), spec)
    prepare_for_training(model, spec, "bf16")
    for mode in (False, True):
        model.train(mode)
        norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
        assert norms and all(m.forward.__func__ is lean._rmsnorm_forward for m in norms), mode
