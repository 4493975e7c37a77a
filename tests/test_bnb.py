"""The bitsandbytes NF4 path on CPU and the pitfalls qlorax handles (each with its own test)."""
from __future__ import annotations

import gc
import warnings

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from conftest import linear4bit  # noqa: E402
from qlorax import hardware  # noqa: E402
from qlorax.engine.quant import dequantize, linear_weight_bytes, load_base_model  # noqa: E402
from qlorax.engine.model import attach_lora, load_tokenizer  # noqa: E402
from qlorax.spec import compose  # noqa: E402


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    """A 2-layer Llama saved in bf16, with every linear size a multiple of bnb's CPU kernel block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlorax.engine.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("llama128")
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _lora_model(spec, path, quantized: bool, repack_guard: bool = True):
    model = load_base_model(spec, str(path), "bf16", quantize=True)
    if not repack_guard:   # what plain transformers + bitsandbytes leaves in place
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
                del module.forward   # bitsandbytes' own forward, which does the repack
    if not quantized:
        model = dequantize(model).to(torch.bfloat16)   # bf16 model holding the dequantized weights
    model = attach_lora(model, spec)
    generator = torch.Generator().manual_seed(1)
    for param in (p for p in model.parameters() if p.requires_grad):
        param.data = torch.randn(param.shape, generator=generator) * 0.02
    return model


def _adapter_grads(model, ids, eval_first: bool):
    if eval_first:
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _relative_error(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return num / sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


def test_adapter_gradients_after_eval_pass_match_dequantized_bf16(bf16_model_dir):
    spec = compose([f"model.path={bf16_model_dir}", "lora=all_linear", "lora.dropout=0"])
    ids = load_tokenizer(spec, str(bf16_model_dir))("Once upon a time there was a cat", return_tensors="pt")["input_ids"]
    reference = _adapter_grads(_lora_model(spec, bf16_model_dir, quantized=False), ids, eval_first=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = _adapter_grads(_lora_model(spec, bf16_model_dir, quantized=True), ids, eval_first=True)
    assert _relative_error(fixed, reference) < 0.05
    if "avx512_bf16" in hardware.detect().flags:
        # Control: without the guard the eval pass repacks the weights and the gradients go wrong.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            broken = _adapter_grads(_lora_model(spec, bf16_model_dir, quantized=True, repack_guard=False), ids, True)
        assert _relative_error(broken, reference) > 0.3


def test_no_fp32_upcast_of_frozen_weights(bf16_model_dir):
    spec = compose([f"model.path={bf16_model_dir}"])
    model = attach_lora(load_base_model(spec, str(bf16_model_dir), "bf16"), spec)
    base = model.base_model.model
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert base.model.embed_tokens.weight.requires_grad is False


def test_checkpoint_file_is_not_kept_mapped_after_quantizing(bf16_model_dir):
    spec = compose([f"model.path={bf16_model_dir}"])
    checkpoint = str(bf16_model_dir / "model.safetensors")
    model = load_base_model(spec, str(bf16_model_dir), "bf16")
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert checkpoint not in maps.read()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16   # still usable
    # Control: plain transformers keeps the mapping alive through the unquantized tensors.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    plain = AutoModelForCausalLM.from_pretrained(bf16_model_dir, dtype=torch.bfloat16, quantization_config=
                                                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert checkpoint in maps.read()
    del plain


def test_nf4_linear_weights_take_a_quarter_of_bf16(bf16_model_dir):
    spec = compose([f"model.path={bf16_model_dir}"])
    nf4 = linear_weight_bytes(load_base_model(spec, str(bf16_model_dir), "bf16"))
    bf16 = linear_weight_bytes(load_base_model(spec, str(bf16_model_dir), "bf16", quantize=False))
    ratio = nf4["linear"] / bf16["linear"]
    assert 0.25 <= ratio < 0.30, (nf4, bf16)   # 4 bits + one fp32 scale per 64 weights
    assert nf4["other"] == bf16["other"]        # embeddings, norms and head stay unquantized


@pytest.mark.parametrize("overrides,quant_type,nested", [(["quant=nf4"], "nf4", False), (["quant=fp4"], "fp4", False),
                                                         (["quant=nf4_dq"], "nf4", True)])
def test_quant_type_and_double_quant_are_honoured(bf16_model_dir, overrides, quant_type, nested):
    spec = compose([f"model.path={bf16_model_dir}", *overrides])
    model = load_base_model(spec, str(bf16_model_dir), "bf16")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and "lm_head" not in [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        assert layer.weight.quant_state.quant_type == quant_type
        assert bool(layer.weight.quant_state.nested) is nested


def _logits(model, ids):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids).logits.float()


def test_streaming_quantizer_matches_transformers_quantization(bf16_model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlorax.engine.quant.bnb import prepare_cpu

    spec = compose([f"model.path={bf16_model_dir}"])
    streamed = load_base_model(spec, str(bf16_model_dir), "bf16")
    reference = AutoModelForCausalLM.from_pretrained(bf16_model_dir, dtype=torch.bfloat16, quantization_config=
                                                     BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                        bnb_4bit_compute_dtype=torch.bfloat16))
    prepare_cpu(reference)
    a = streamed.model.layers[1].mlp.down_proj.weight
    b = reference.model.layers[1].mlp.down_proj.weight
    assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax)
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    assert torch.equal(_logits(streamed, ids), _logits(reference, ids))


def test_prequantized_checkpoint_round_trip(bf16_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    saved = tmp_path / "nf4"
    spec = compose([f"model.path={bf16_model_dir}", f"quant.prequantized_dir={saved}"])
    first = load_base_model(spec, str(bf16_model_dir), "bf16")       # quantizes and saves
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").stat().st_size < (
        bf16_model_dir / "model.safetensors").stat().st_size * 0.5
    second = load_base_model(spec, str(bf16_model_dir), "bf16")      # loads the saved 4-bit weights
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    assert torch.equal(_logits(first, ids), _logits(second, ids))
    assert isinstance(second.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    plain = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)   # plain transformers reads it too
    assert isinstance(plain.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("shape,quant_type,double", [((512, 256), "nf4", False), ((256, 512), "fp4", False),
                                                      ((384, 128), "nf4", True), ((64, 172), "nf4", False),
                                                      ((100, 64), "fp4", False)])
def test_threaded_dequantization_is_bit_identical(shape, quant_type, double):
    import bitsandbytes.functional as F

    from qlorax.engine.quant import bnb_cpu

    torch.manual_seed(0)
    q, state = F.quantize_4bit(torch.randn(*shape, dtype=torch.bfloat16), blocksize=64, quant_type=quant_type,
                               compress_statistics=double)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if double else state.absmax
    serial = bnb_cpu.dequantize_rows(q, absmax, 64, quant_type, shape, torch.bfloat16, threads=1)
    threaded = bnb_cpu.dequantize_rows(q, absmax, 64, quant_type, shape, torch.bfloat16, threads=4)
    assert serial is not None and torch.equal(serial, threaded)
    assert bnb_cpu.install()
    assert torch.equal(F.dequantize_4bit(q, state), serial)   # the op bitsandbytes' layers call


@pytest.mark.parametrize("shape,quant_type,blocksize", [((1100, 256), "nf4", 64), ((512, 640), "fp4", 64),
                                                         ((96, 512), "nf4", 128), ((3, 256), "fp4", 256)])
def test_native_dequantization_equals_bitsandbytes_kernel(shape, quant_type, blocksize, monkeypatch):
    import bitsandbytes.functional as F

    from qlorax.engine.quant import bnb_cpu

    bnb_cpu._native_dequant.cache_clear()
    if bnb_cpu._native_dequant(quant_type) is None:
        pytest.skip("no vectorized native kernel here (needs a C compiler and AVX-512BW)")
    torch.manual_seed(1)
    weight = torch.randn(*shape, dtype=torch.bfloat16)
    weight[0, :5] = torch.tensor([30.0, -0.0, 1e-6, -7.5, 0.25])   # a wide block: ties and tiny values round
    q, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    native = bnb_cpu.dequantize_rows(q, state.absmax, blocksize, quant_type, shape, torch.bfloat16, threads=2)
    monkeypatch.setattr(bnb_cpu, "_native_dequant", lambda quant_type: None)   # bitsandbytes' own kernel
    own = bnb_cpu.dequantize_rows(q, state.absmax, blocksize, quant_type, shape, torch.bfloat16, threads=2)
    assert torch.equal(native.view(torch.int16), own.view(torch.int16))


@pytest.mark.parametrize("quant_type,double,bias", [("nf4", False, False), ("fp4", False, True), ("nf4", True, True)])
def test_scratch_buffer_linear_is_bit_identical_to_bitsandbytes(quant_type, double, bias):
    """qlorax's Linear4bit forward (dequantize into one reused buffer) = bitsandbytes' MatMul4Bit, values and grads."""
    from qlorax.engine.quant import bnb_cpu

    torch.manual_seed(0)
    layers = []
    for n_in, n_out in ((128, 192), (192, 128), (128, 192)):   # every layer, of any shape, shares the buffer
        layer = linear4bit(n_in, n_out, quant_type, double, bias)
        layer.qlorax_tiles = False   # quant.bf16_matmul=torch: AMX's tile kernels sum in another order
        layers.append(layer)
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 7, 192, dtype=torch.bfloat16)

    def run(forward):
        x.grad = None
        for layer in layers:
            if layer.bias is not None:
                layer.bias.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(layers[2], forward(layers[1], forward(layers[0], x))) + 2 * forward(layers[0], x)
        y.backward(g)
        return [y.detach(), x.grad.clone()] + [layer.bias.grad.clone() for layer in layers if layer.bias is not None]

    reference = run(lambda layer, inp: bnb.nn.Linear4bit.forward(layer, inp))
    ours = run(bnb_cpu.linear4bit_forward)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    for got, want in zip(ours[2:], reference[2:]):   # bitsandbytes sums the bias gradient in two bf16 steps
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
