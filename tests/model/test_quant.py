"""Reduced-precision weights (recursa.model.quant, recursa.convert.q4) and fused projections.

Each quantized module is checked against an independent fp32 reference (its dequantized weight);
the int4 layout against its own inverse; Q4_1 blocks against w = d * q + m; fusion against the
unfused model (fp32, vanilla and relaxed-LoRA); an engine run in bf16 / int8 / int4 against fp32.
"""
import copy

import numpy as np
import pytest
import torch

from recursa import LLM, SamplingParams, kernels
from recursa.cli import main
from recursa.presets import preset
from recursa.convert.q4 import dequantize, q4_1_blocks
from reference import full_forward_generate
from recursa.errors import RecursaError
from recursa.model import Decoder
from recursa.model.int4_weights import load_int4_weights, save_int4_weights
from recursa.model.quant import Int4Linear, Int8Linear, int4_affine, pack_int4, prepare, unpack_int4


def _x(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


def test_int8_module_matches_its_dequantized_weight():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    m = Int8Linear.from_float(w)
    deq = m.dequantize()
    # rounding to the nearest code, plus the bf16 rounding of each row's scale
    assert ((deq - w).abs() <= m.scales.float()[:, None] / 2 + w.abs() * 2 ** -8 + 1e-7).all()
    x = _x(2, 5, 64)
    ref = x.float() @ deq.t()
    torch.testing.assert_close(m(x).float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
    assert m(x.float()).dtype == torch.float32 and m(x).shape == (2, 5, 96)


@pytest.mark.parametrize("n", [64, 96, 40])   # 96 and 40: the rows are padded to the layout's 64
def test_int4_pack_unpack_round_trip(n):
    torch.manual_seed(0)
    q = torch.randint(0, 16, (n, 96), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (-(-n // 64) * 64, 48)
    assert torch.equal(unpack_int4(packed, n), q)


@pytest.mark.parametrize("n", [128, 40])
def test_int4_module_matches_its_dequantized_weight(n):
    torch.manual_seed(0)
    w = torch.randn(n, 96) * 0.05
    m = Int4Linear.from_float(w, group_size=32)
    q, scale, lo = int4_affine(w, 32)
    exact = dequantize(q, scale, lo)                       # scale * q + min in fp32
    assert (exact - w).abs().max() <= scale.max() / 2 + 1e-6
    deq = m.dequantize()                                   # what the kernel multiplies by (bf16 scales)
    assert (deq - exact).abs().max() <= 2e-2 * w.abs().max()
    for rows in (1, 3, 20, 64):   # recursa's int4 GEMV (<= 4 tokens); AMX's tiles where the CPU has them (5-64)
        x = _x(rows, 96)
        ref = x.float() @ deq.t()
        torch.testing.assert_close(m(x).float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
        assert m(x).shape == (rows, n)


@pytest.mark.skipif(not kernels.amx_available(), reason="no AMX-BF16")
def test_int4_amx_tiles_widen_the_same_weights():
    torch.manual_seed(0)
    w = torch.randn(72, 128) * 0.05   # 72: a part-filled block of 32 columns
    q, scale, lo = int4_affine(w, 32)
    wq, sm = kernels.pack_amx_int4(q, scale, lo)
    # w = scale * q + minimum with the scales rounded to bf16, as the kernel reads them
    deq = dequantize(q, scale.bfloat16().float(), lo.bfloat16().float())
    for rows in (1, 17, 40):
        x = _x(rows, 128)
        ref = x.float() @ deq.t()
        got = kernels.linear_amx_int(x, wq, sm, 72, 4).float()
        # one bf16 rounding of each widened weight and of the result
        assert ((got - ref).abs() <= 2**-7 * (x.float().abs() @ deq.abs().t()) + 1e-3).all()
        assert torch.equal(kernels.linear_amx_int(x[-1:], wq, sm, 72, 4)[0], got[-1].bfloat16())


def test_int4_needs_whole_groups():
    with pytest.raises(RecursaError, match="multiple of the group size"):
        Int4Linear.from_float(torch.randn(64, 48), group_size=32)


def _q4_1_rows(q, d, m):
    """GGUF Q4_1 bytes for codes q [N, K], fp16 d, m [N, K/32] (written from the format's definition)."""
    N, K = q.shape
    g = q.reshape(N, K // 32, 32).numpy().astype(np.uint8)
    codes = g[..., :16] | (g[..., 16:] << 4)
    dm = np.stack([d.numpy().view(np.uint8).reshape(N, -1, 2), m.numpy().view(np.uint8).reshape(N, -1, 2)], 2)
    return np.concatenate([dm.reshape(N, K // 32, 4), codes], -1).reshape(N, -1)


def test_q4_1_blocks_carry_over_to_int4_up_to_scale_rounding(tmp_path):
    torch.manual_seed(0)
    N, K = 64, 96
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    d = (torch.rand(N, K // 32) * 0.01 + 1e-3).half()
    m = (-torch.rand(N, K // 32) * 0.08).half()
    q2, d2, m2 = q4_1_blocks(_q4_1_rows(q, d, m))
    assert torch.equal(q2, q) and torch.equal(d2, d) and torch.equal(m2, m)
    w = q.float() * d.float().repeat_interleave(32, 1) + m.float().repeat_interleave(32, 1)
    torch.testing.assert_close(dequantize(q2, d2, m2), w, atol=0, rtol=0)
    err = (Int4Linear(q2, d2, m2, 32).dequantize() - w).abs().max().item()
    assert err <= 2 ** -8 * (w.abs().max().item() + 8 * d.float().max().item())   # bf16 scale and zero rounding
    save_int4_weights({"lm_head.weight": (q2, d2, m2)}, tmp_path)
    back = load_int4_weights(tmp_path)["lm_head.weight"]
    assert all(torch.equal(a, b) for a, b in zip(back, (q2, d2, m2)))


def test_q_k_rows_go_back_to_hf_order():
    from recursa.convert.q4 import _unpermute_rows

    heads, hd = 3, 8
    hf = torch.arange(heads * hd)
    gguf = hf.reshape(heads, 2, hd // 2).transpose(1, 2).reshape(-1)   # llama.cpp's RoPE row permutation
    assert torch.equal(gguf[_unpermute_rows(heads * hd, heads)], hf)


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Decoder(preset("tiny", **kw)).eval()


def _relaxed():
    m = _tiny(n_layers=6, sharing="cycle", n_loops=3, lora_rank_attn=4, lora_rank_mlp=2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("lora."):
                p.normal_(std=0.05)
    return m


def _mor_share():   # shared-KV stages run queries only (Attention.query on the fused matmul)
    m = _tiny(n_layers=6, sharing="cycle", n_loops=3, mor_router="expert", mor_kv="share", init_std=0.2)
    with torch.no_grad():
        for p in m.router.parameters():
            if p.dim() > 1:
                p.normal_(std=1.0)
    return m


@pytest.mark.parametrize("build", [_tiny, _relaxed, _mor_share], ids=["vanilla", "relaxed", "mor-share"])
def test_fused_equals_unfused_fp32(build):
    model = build()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.inference_mode():
        ref = model(ids)
        assert prepare(copy.deepcopy(model), "float32", fuse=False).layers[0].attn.qkv_proj is None
        fused = prepare(copy.deepcopy(model), "float32")   # fused by default, fp32 included
        assert fused.layers[0].attn.qkv_proj is not None and not hasattr(fused.layers[0].attn, "q_proj")
        # to fp32 rounding: the prepared model's matmuls (recursa.kernels.linear_f32) sum in another order
        torch.testing.assert_close(fused(ids), ref, atol=5e-5, rtol=1e-5)
    assert "layers.0.attn.q_proj.weight" in model.state_dict()   # the unfused model is untouched


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_prepared_model_close_to_fp32(quantization):
    model = _tiny(vocab_size=512)
    ids = torch.randint(0, 512, (1, 16))
    with torch.inference_mode():
        ref = model(ids)
        m = prepare(copy.deepcopy(model), "bfloat16", quantization)
        out = m(ids).float()
    assert m.embed_tokens.weight.dtype == torch.bfloat16 and m.inv_freq.dtype == torch.float32
    # the tied LM head keeps the compute dtype by default (bf16: on recursa's kernel, same weight)
    assert m.lm_head is None or m.lm_head.weight is m.embed_tokens.weight
    tol = {None: 0.02, "int8": 0.03, "int4": 0.25}[quantization]
    assert (out - ref).abs().max() <= tol * ref.abs().max()


def test_int4_head_on_request():
    m = prepare(_tiny(), None, "int4", head="int4")
    assert isinstance(m.lm_head, Int4Linear) and isinstance(m.layers[0].mlp.gate_up_proj, Int4Linear)
    assert m.embed_tokens.weight.dtype == torch.bfloat16   # the lookup keeps the compute dtype
    assert isinstance(prepare(_tiny(), None, "int4", head="int8").lm_head, Int8Linear)


def _peaked(seed=1):
    """A tiny untied model with large logit margins, so greedy tokens survive reduced precision."""
    m = _tiny(seed, vocab_size=256, tie_embeddings=False)
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)
    return m


@pytest.mark.parametrize("dtype,quantization", [("bfloat16", None), ("bfloat16", "int8"), (None, "int4")])
def test_engine_reduced_precision_close_to_fp32(dtype, quantization):
    """bf16 / int8 keep fp32's greedy tokens on a model with clear margins; int4 on random weights is
    too coarse for that, so its engine run is held to the quantized model's own single-request
    greedy decode and its first tokens to fp32's."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 17, 33], [100, 3, 7]]
    ref = [o.token_ids for o in LLM(_peaked(), kv_cache_memory=2**22).generate(prompts, params)]
    llm = LLM(_peaked(), kv_cache_memory=2**22, dtype=dtype, quantization=quantization)
    assert llm.kv.k.dtype == torch.bfloat16   # the KV cache takes the compute dtype
    out = [o.token_ids for o in llm.generate(prompts, params)]
    if quantization == "int4":
        assert [o[0] for o in out] == [r[0] for r in ref]
        ref = [full_forward_generate(llm.model, p, 8) for p in prompts]
    agree = sum(a == b for r, o in zip(ref, out) for a, b in zip(r, o)) / sum(map(len, ref))
    assert agree >= 0.85, (ref, out)


def test_bad_precision_is_one_line_error(tmp_path):
    with pytest.raises(RecursaError, match="unsupported dtype"):
        prepare(_tiny(), "float16x")
    with pytest.raises(RecursaError, match="unknown quantization"):
        prepare(_tiny(), None, "int3")


def test_cli_generate_takes_precision_flags(tmp_path, capsys):
    from recursa.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat. " * 40], vocab_size=300)
    model = _tiny(vocab_size=tok.vocab_size)
    model.save(tmp_path)
    tok.save(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "the cat", "--max-tokens", "4", "--quantization", "int4"]) == 0
    assert main(["generate", str(tmp_path), "--prompt", "the cat", "--max-tokens", "4", "--dtype", "bfloat16"]) == 0
    with pytest.raises(SystemExit):   # argparse: one usage line, non-zero exit
        main(["generate", str(tmp_path), "--prompt", "the", "--dtype", "float16x"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dequant_fallback_matches_cpu_kernels():
    torch.manual_seed(0)
    w, x = torch.randn(128, 96) * 0.05, _x(4, 96)
    for m in (Int8Linear.from_float(w), Int4Linear.from_float(w)):
        ref = m(x).float()
        out = copy.deepcopy(m).cuda()(x.cuda()).float().cpu()
        torch.testing.assert_close(out, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.skipif(not kernels.amx_available(), reason="no AMX-BF16")
def test_compiled_int4_linear_calls_the_same_amx_kernel():
    torch.manual_seed(0)
    m = Int4Linear.from_float(torch.randn(64, 96) * 0.05, group_size=32).to(torch.bfloat16)
    x = _x(1, 24, 96)
    with torch.no_grad():
        assert torch.equal(torch.compile(m, dynamic=True)(x), m(x))
