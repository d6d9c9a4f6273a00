"""harness/kernels.py: every opt-in kernel against the plain path it replaces.

  * QKVAttention: gradients w.r.t. the input tokens and the temperature equal autograd's through
    gated_prompt.Attention (both its SDPA and its explicit-softmax forward) in float64 to 1e-10, with tau != 1,
    with and without a key mask, for every kernel a CPU runs; through a whole gated+temp ViT, the gradients of
    prompts, gate logits, temperatures and head equal the plain model's.
  * bilinear_upsample: forward and backward equal F.interpolate(mode="bilinear", align_corners=False) in float64
    (1e-12) for even, odd and unit sizes and scales 2, 3, 4; its backward is the transpose of its forward.
  * FP8: scales and e4m3 rounding against a numpy reference written from the format's definition (4 exponent
    bits, bias 7, 3 mantissa bits, no infinities, 448 the largest value); refused on a CPU with one line.
Expected values come from gated_prompt's forward + autograd, F.interpolate, and numpy.
"""
import copy
import gc

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gated_prompt as gp
from harness import kernels

CPU_KERNELS = ("math", "flash")   # the attention kernels a CPU runs (flash: aten's CPU flash attention)


def frozen_attention(dim=16, heads=2, fused=True, seed=0):
    """A float64 Attention with O(1) activations: weights ~ N(0, 1/dim), nonzero biases."""
    torch.manual_seed(seed)
    attn = gp.Attention(gp.vit_config("vit_small", embed_dim=dim, num_heads=heads, fused_attention=fused)).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, dim ** -0.5)
            p.requires_grad_(False)
    return attn


def key_mask(batch, tokens):
    mask = torch.ones(batch, 1, 1, tokens, dtype=torch.bool)
    mask[0, ..., tokens - 2:] = False       # image 0 cannot attend to its last two tokens
    mask[1, ..., 1] = False
    return mask


def output_and_grads(attn, x, tau, mask, upstream):
    x, tau = x.detach().requires_grad_(), tau.detach().requires_grad_()
    y = attn(x, tau, mask=mask)
    dx, dtau = torch.autograd.grad(y, (x, tau), upstream)
    return y.detach(), dx, dtau


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-mask"])
def test_qkv_attention_gradients_equal_autograd_float64(fused, backend, masked):
    plain = frozen_attention(fused=fused)
    fast = copy.deepcopy(plain)
    kernels.use_fast_attention(fast, fused_qkv=True, backends=backend)
    fast.fused = True                                # the fast forward; `plain` keeps the reference's
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 16, dtype=torch.float64, generator=gen)
    tau = torch.tensor(0.37, dtype=torch.float64)   # != 1, so folding it into the projection is exercised
    mask = key_mask(3, 9) if masked else None
    upstream = torch.randn(3, 9, 16, dtype=torch.float64, generator=gen)
    expected, got = (output_and_grads(m, x, tau, mask, upstream) for m in (plain, fast))
    for name, e, g in zip(("output", "d tokens", "d tau"), expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)
    assert got[2].abs() > 1e-3                        # the temperature's gradient is not trivially zero


def test_qkv_attention_gives_frozen_weights_no_gradient_and_needs_none():
    attn = frozen_attention()
    kernels.use_fast_attention(attn)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    attn(x, torch.tensor(2.0, dtype=torch.float64))[0].sum().backward()
    assert x.grad is not None and all(p.grad is None for p in attn.parameters())


def test_fast_attention_takes_the_plain_forward_where_it_does_not_apply(monkeypatch):
    """Attention maps, per-image temperatures (MultiTask), the explicit-softmax reference and trainable qkv weights
    run gated_prompt.Attention's own forward."""
    calls = []
    monkeypatch.setattr(kernels.QKVAttention, "apply", lambda *a: calls.append(a) or pytest.fail("fused ran"))
    attn = frozen_attention()
    kernels.use_fast_attention(attn)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    maps = attn.probabilities(x)
    assert maps.shape == (2, 2, 5, 5)
    attn(x, torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1, 1, 1))
    attn.fused = False
    attn(x)
    attn.fused = True
    attn.qkv.weight.requires_grad_(True)
    attn(x)
    assert calls == []


def gated_vit(seed=0, depth=2):
    """gated+temp ViT (float64, 2 blocks, 4 prompts, gates 0.5, temperatures 0.6 and 1.7, no dropout); depth=1: its
    first block only."""
    torch.manual_seed(seed)
    cfg = gp.vit_config("vit_small", img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=4)
    model = gp.VisionTransformer(cfg, gp.prompt_config("gated+temp", num_classes=5, num_prompts=4, gate_init=0.0,
                                                       prompt_dropout=0.0)).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
        model.prompts.normal_(0, 1)
        model.temperatures.copy_(torch.tensor([0.6, 1.7][:depth]))
    return model


def trainable_grads(model, images, compile=False):
    def loss(x):
        return model(x).logsumexp(-1).sum()
    if compile:
        loss = torch.compile(loss, backend="aot_eager", fullgraph=True)
    model.zero_grad(set_to_none=True)
    loss(images).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_qkv_attention_in_a_gated_vit_gives_the_plain_gradients(backend):
    plain = gated_vit()
    fast = copy.deepcopy(plain)
    assert kernels.apply(fast, ["qkv-attention"], backends=None) == {"attention": 2}
    kernels.use_fast_attention(fast, backends=backend)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected, got = trainable_grads(plain, images), trainable_grads(fast, images)
    assert set(got) == {"prompts", "gate_logits", "temperatures", "head.weight", "head.bias"}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-10, msg=name)
    assert fast.state_dict().keys() == plain.state_dict().keys()


def test_qkv_attention_traces_whole_under_torch_compile():
    """dynamo + AOTAutograd trace the custom function's forward and backward as one graph (fullgraph: no break);
    float32, as the fast path compiles it. One block (temperature 0.6): tracing costs ~1 s per block."""
    plain = gated_vit(depth=1).float()
    fast = copy.deepcopy(plain)
    kernels.apply(fast, ["qkv-attention"])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    expected, got = trainable_grads(plain, images), trainable_grads(fast, images, compile=True)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn"])
def test_cuda_attention_kernels_are_called_with_their_schemas(backend):
    """The CUDA kernels cannot run here; their meta implementations check every argument of the calls QKVAttention
    makes, and the gradients come back [B, T, H, d]-ordered, so viewing them as [B*T, D] copies nothing."""
    forward, backward = kernels.ATTENTION_KERNELS[backend]
    qkv = torch.empty(2, 7, 3, 4, 64, device="meta", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    with torch.device("meta"):
        out, saved = forward(q, k, v, None)
        dq, dk, dv = backward(torch.empty_like(out), q, k, v, out, saved, None)
    for t in (out, dq, dk, dv):
        assert t.shape == (2, 4, 7, 64) and t.transpose(1, 2).is_contiguous()


def test_attention_backend_table_picks_the_kernel_per_sequence_length(monkeypatch):
    chosen = []
    real = kernels.sdpa_kernel
    monkeypatch.setattr(kernels, "sdpa_kernel", lambda backends: chosen.append(backends) or real(backends))
    attn = frozen_attention()
    kernels.use_fast_attention(attn, fused_qkv=False, backends={5: "math"})
    attn(torch.randn(2, 5, 16, dtype=torch.float64))
    attn(torch.randn(2, 6, 16, dtype=torch.float64))   # no entry: SDPA's own choice
    assert chosen == [[kernels.SDPBackend.MATH]]

# -----------------------------------------------------------------------------
# bilinear upsampling


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 5, 7), (2, 1, 1, 1), (1, 1, 1, 4), (1, 3, 2, 9)])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bilinear_upsample_equals_interpolate_float64(shape, scale):
    gen = torch.Generator().manual_seed(sum(shape) + scale)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    expected = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    got = kernels.bilinear_upsample(x, scale)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (dx_expected,), (dx_got,) = (torch.autograd.grad(y, x, upstream) for y in (expected, got))
    torch.testing.assert_close(dx_got, dx_expected, rtol=1e-12, atol=1e-12)


def test_bilinear_upsample_backward_is_the_transpose_of_its_forward():
    """<up(x), g> = <x, up^T(g)> for random x, g: the backward is the forward's adjoint, a fixed correlation."""
    x, g = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 3, 10, 8, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(kernels.bilinear_upsample(xr, 2), xr, g)
    assert torch.dot(kernels.bilinear_upsample(x, 2).flatten(), g.flatten()).item() == pytest.approx(
        torch.dot(x.flatten(), dx.flatten()).item(), rel=1e-12)


def test_bilinear_taps_are_the_bilinear_weights():
    """x2: outputs 2i and 2i+1 sample i - 1/4 and i + 1/4 (weights 3/4 near, 1/4 far); x4: i -3/8 .. i +3/8."""
    assert kernels.bilinear_taps(2) == [(0.75, 0.25, -1), (0.75, 0.25, 1)]
    assert kernels.bilinear_taps(4) == [(0.625, 0.375, -1), (0.875, 0.125, -1), (0.875, 0.125, 1),
                                        (0.625, 0.375, 1)]


def test_upsample_keeps_channels_last():
    x = torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last).requires_grad_()
    y = kernels.bilinear_upsample(x, 2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_use_fast_upsample_replaces_only_what_it_reproduces():
    model = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                          nn.Upsample(scale_factor=4.0, mode="bilinear"),
                          nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                          nn.Upsample(scale_factor=1.5, mode="bilinear"),
                          nn.Upsample(size=(4, 4), mode="bilinear"),
                          nn.Upsample(scale_factor=2, mode="nearest"))
    assert kernels.use_fast_upsample(model) == 2
    assert [type(m).__name__ for m in model] == ["BilinearUpsample", "BilinearUpsample"] + ["Upsample"] * 4
    assert (model[0].scale, model[1].scale) == (2, 4)


def setr_pair():
    from harness import segmentation
    torch.manual_seed(0)
    cfg = gp.vit_config("vit_base", "mae", img_size=64, embed_dim=32, depth=4, num_heads=2)
    backbone = gp.VisionTransformer(cfg, gp.prompt_config("gated+temp", num_classes=0, num_prompts=2,
                                                          prompt_dropout=0.0))
    plain = segmentation.SETRPUP(backbone, num_classes=5, aux_blocks=(2, 3), channels=8).double().train()
    return plain, copy.deepcopy(plain)


def test_setr_pup_with_fast_upsample_and_channels_last_gives_the_same_gradients():
    """SETR-PUP training forward (decode head x2 four times, aux heads x4 twice): same logits and same gradients
    for every trainable parameter, float64."""
    plain, fast = setr_pair()
    assert kernels.apply(fast, ["upsample", "channels-last"]) == {"upsample": 8, "channels-last": 19}
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for model in (plain, fast):
        model.zero_grad(set_to_none=True)
        logits, aux = model(images)
        (logits.square().mean() + sum(a.square().mean() for a in aux)).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (expected, expected_grads), (got, got_grads) = results
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    assert fast.decode_head.conv_seg.weight.is_contiguous(memory_format=torch.channels_last)

# -----------------------------------------------------------------------------
# FP8


def e4m3_reference(values):
    """numpy rounding of float64 values to float8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; normal
    numbers from 2^-6, subnormals in steps of 2^-9; nearest, ties to even; 448 the largest (no infinities)."""
    a = np.abs(values)
    exponent = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    step = 2.0 ** (np.maximum(exponent, -6) - 3)
    rounded = np.round(a / step) * step            # np.round: ties to even
    return np.sign(values) * np.minimum(rounded, 448.0)


def channel_scales_reference(w):
    amax = np.abs(w).max(axis=1)
    return np.where(amax > 0, amax.astype(np.float32) / np.float32(448.0), np.float32(1.0))


def test_fp8_scales_and_rounding_equal_the_numpy_reference():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(12, 40, generator=gen) * torch.logspace(-6, 3, 12).view(12, 1)   # rows over 9 decades
    w[3] = 0                                                                           # an all-zero row
    w[4, :3] = torch.tensor([448.0, -1e-9, 3.0])
    scales = kernels.channel_scales(w)
    np.testing.assert_array_equal(scales.numpy(), channel_scales_reference(w.numpy()))
    q = kernels.quantize_rows(w, scales)
    assert q.dtype == torch.float8_e4m3fn
    scaled = w.numpy() / scales.numpy()[:, None]          # float32 division, as quantize_rows does
    np.testing.assert_array_equal(q.float().numpy().astype(np.float64), e4m3_reference(scaled.astype(np.float64)))
    assert np.abs(q.float().numpy()).max(axis=1).tolist() == [448.0] * 3 + [0.0] + [448.0] * 8   # rows reach 448
    dq = kernels.dequantize_rows(q, scales)
    np.testing.assert_array_equal(dq.numpy(), q.float().numpy() * scales.numpy()[:, None])
    rel = (dq - w).abs() / w.abs().amax(1, keepdim=True).clamp_min(1e-30)
    assert rel.max() <= 16 / 448        # half the step of e4m3's top binade (32 in [256, 448]), relative to 448


def test_e4m3_reference_on_hand_values():
    values = np.array([0.0, 1.0, 1.0625, 1.0626, 1.1875, 448.0, 460.0, -3.3, 2 ** -9, 2 ** -10 * 1.01, 2 ** -11])
    assert e4m3_reference(values).tolist() == [0.0, 1.0, 1.0, 1.125, 1.25, 448.0, 448.0, -3.25, 2 ** -9, 2 ** -9,
                                               0.0]


def test_fp8_refused_on_a_cpu_in_one_line():
    reason = kernels.fp8_unsupported(torch.device("cpu"))
    assert reason.startswith("--fp8: ") and "cpu" in reason and "8.9" in reason and "\n" not in reason
    model = gated_vit().float()
    with pytest.raises(kernels.Unsupported, match="^--fp8: .*cpu"):
        kernels.apply(model, ["fp8"], device="cpu")
    assert not any(isinstance(m, kernels.FP8Linear) for m in model.modules())


def emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """What torch._scaled_mm computes, in float64 on a CPU: (a * scale_a) @ (b * scale_b)."""
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.shape[0] % 16 == 0
    assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1]) and b.t().is_contiguous()
    return ((a.double() * scale_a.double()) @ (b.double() * scale_b.double())).to(out_dtype)


def test_fp8_linear_plumbing_with_an_emulated_gemm(monkeypatch):
    """FP8Linear (and the FP8 qkv projection with tau folded into its scales) around an emulated GEMM: output
    within e4m3 rounding of the float Linear, rows padded to 16 and cut back, dx = dy W_dequantised."""
    monkeypatch.setattr(kernels, "_scaled_mm", emulated_scaled_mm)
    monkeypatch.setattr(kernels, "fp8_unsupported", lambda device, flag="--fp8": None)
    plain = gated_vit().float()
    fast = copy.deepcopy(plain)
    assert kernels.apply(fast, ["fp8", "qkv-attention"], device="cpu") == {"attention": 2, "fp8": 8}
    lin = fast.blocks[0].mlp.fc1
    x = torch.randn(3, 7, 32, requires_grad=True)                   # 21 rows: padded to 32 inside
    y = lin(x)
    reference = F.linear(x, lin.weight, lin.bias)
    assert y.shape == (3, 7, 128) and (y - reference).abs().max() < 0.1 * reference.abs().max()
    upstream = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(dx, upstream @ lin.weight_dq)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    expected, got = plain(images), fast(images)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    assert plain.state_dict().keys() == fast.state_dict().keys()

# -----------------------------------------------------------------------------
# Wiring: runtime.Settings.kernels / place_model, bench --kernels / --fp8


def test_place_model_switches_on_the_settings_kernels():
    from harness import runtime
    model = runtime.place_model(gated_vit().float(), torch.device("cpu"), False, ("qkv-attention",))
    assert all(type(b.attn) is kernels.FastAttention and b.attn.fused_qkv for b in model.blocks)
    assert runtime.Settings(kernels=("fp8",)).record()["kernels"] == ["fp8"]
    plain = runtime.place_model(gated_vit().float(), torch.device("cpu"), False)
    assert all(type(b.attn) is gp.Attention for b in plain.blocks)      # off by default
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.apply(plain, ["fast"])
    with pytest.raises(ValueError, match="attention-backend needs a table"):
        kernels.apply(plain, ["attention-backend"])


def test_segmentation_training_takes_the_settings_kernels():
    from bench import bench, runs
    from harness import runtime, segmentation
    cfg = runs.segmentation_config(bench.parse_args(["--segmentation", "--arch", "tiny", "--img-size", "32"]))
    training = segmentation.Training(cfg, runtime.Settings(kernels=("upsample",)), verbose=False)
    ups = [m for m in training.model.modules() if isinstance(m, (nn.Upsample, kernels.BilinearUpsample))]
    assert ups and all(isinstance(m, kernels.BilinearUpsample) for m in ups)


def test_bench_fp8_is_refused_on_a_cpu_in_one_line_before_any_timing(monkeypatch, capsys):
    from bench import bench
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("timed before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        bench.cli(["--fp8", "--arch", "tiny", "--device", "cpu"])
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and out.out == ""
    assert out.err.count("\n") == 1 and "--fp8" in out.err and "cpu" in out.err
    assert bench.parse_args([]).kernels == []                               # nothing unless asked


@pytest.mark.parametrize("argv,message", [
    (["--report", "--fp8"], "--kernels and --fp8 do not apply"),
    (["--report", "--kernels", "upsample"], "--kernels and --fp8 do not apply"),
    (["--kernels", "fp8"], "argument --kernels: invalid choice: 'fp8'"),
])
def test_bench_kernel_flags_refused_where_they_do_not_apply(argv, message, capsys):
    from bench import bench
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_step_table_with_kernels(monkeypatch):
    """--kernels switches them on in the fast path only; its rows say so."""
    from bench import bench
    out = bench.main(["--arch", "tiny", "--img-size", "32", "--prompts", "2", "--batch", "2", "--steps", "1",
                      "--warmup", "0", "--repeats", "1", "--kernels", "qkv-attention"])
    assert {(r["path"], tuple(r["kernels"])) for r in out["results"]} == {("fast", ("qkv-attention",)),
                                                                          ("reference", ())}

# -----------------------------------------------------------------------------
# The bench units


def test_step_gemms_hand_count():
    """D = 8, one block, 32px images of 16px patches (N = 4), one prompt: T = 6 tokens, batch 2: M = 12."""
    from bench import bench
    cfg = gp.vit_config("vit_small", img_size=32, patch_size=16, embed_dim=8, depth=1, num_heads=2)
    vit = gp.VisionTransformer(cfg, gp.prompt_config("gated+temp", num_classes=3, num_prompts=1))
    assert bench.step_gemms(vit, 2) == [
        ["patch embedding", 8, 8, 768, 1],
        ["qkv", 12, 24, 8, 1], ["proj", 12, 8, 8, 1], ["fc1", 12, 32, 8, 1], ["fc2", 12, 8, 32, 1],
        ["qkv dx", 12, 8, 24, 1], ["proj dx", 12, 8, 8, 1], ["fc1 dx", 12, 8, 32, 1], ["fc2 dx", 12, 32, 8, 1]]
    probe = gp.VisionTransformer(cfg, gp.prompt_config("linear", num_classes=3))   # nothing flows back
    assert [g[0] for g in bench.step_gemms(probe, 2)] == ["patch embedding", "qkv", "proj", "fc1", "fc2"]
    deep = gp.VisionTransformer(gp.vit_config("vit_small", img_size=32, patch_size=16, embed_dim=8, depth=3,
                                              num_heads=2), gp.prompt_config("gated", num_prompts=1, insert_at=2))
    gemms = {(g[0], g[1]): g[4] for g in bench.step_gemms(deep, 2)}
    assert gemms[("qkv", 10)] == 1 and gemms[("qkv", 12)] == 2            # block 1 sees no prompt
    assert ("qkv dx", 10) not in gemms and gemms[("qkv dx", 12)] == 2      # no temperature: no gradient into block 1


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
     "__5x_cublas", "GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "GEMM"),
    ("triton_tem_fused_addmm_gelu_0", "GEMM"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0", "attention"),
    ("triton_poi_fused__to_copy_add_native_layer_norm_3", "elementwise"),
    ("triton_red_fused_native_layer_norm_backward_7", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("aten::addmm", "GEMM"), ("aten::mm", "GEMM"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::native_layer_norm", "elementwise"), ("aten::copy_", "elementwise"),
    ("Memcpy HtoD (Pageable -> Device)", "other"), ("Optimizer.step#SGD.step", "other"),
])
def test_kernel_types_of_typical_names(name, kind):
    from bench import bench
    assert bench.kernel_type(name) == kind


@pytest.fixture(scope="module")
def kernels_report(tmp_path_factory):
    """`bench --report --arch tiny --only kernels` with the step points shrunk to (2 prompts, 2 images) and
    (1 prompt, 2 images), SETR-PUP to batch 2, one timed call per row and one profiled step in the kernel split
    (reading the profile back costs ~0.6 s per step): every unit of the stage runs once, in order."""
    from bench import bench, report, runs
    out_dir = tmp_path_factory.mktemp("kernels")
    mp = pytest.MonkeyPatch()
    mp.setattr(report, "REPORT_POINTS", ((2, 32, 3700, "cub"), (1, 32, 5700, "dtd")))
    mp.setattr(bench, "PROFILED_STEPS", 1)
    real_config = runs.segmentation_config
    mp.setattr(runs, "segmentation_config", lambda args: real_config(args).replace(batch_size=2))
    gc.collect()
    gc.freeze()   # what lives now (imports, earlier tests' caches): the stage's 23 gc.collect calls need not walk it
    try:
        out = bench.main(["--report", "--arch", "tiny", "--only", "kernels", "--out-dir", str(out_dir), "--steps", "1",
                          "--warmup", "0", "--repeats", "1"])
    finally:
        mp.undo()
    return out, (out_dir / "BENCHMARKS.md").read_text()


def test_kernels_stage_units_in_order(kernels_report):
    out, markdown = kernels_report
    assert list(out["units"]) == [
        "attention backends", "lever qkv-attention+attention-backend 2x2", "lever qkv-attention+attention-backend 1x2",
        "lever qkv-attention+attention-backend+fp8 2x2", "lever qkv-attention+attention-backend+fp8 1x2",
        "segmentation lever upsample+channels-last", "gemm ceiling", "kernel split 2x2", "lever qkv-attention 2x2",
        "lever attention-backend 2x2", "lever fp8 2x2", "lever max-autotune 2x2", "segmentation lever upsample",
        "segmentation lever channels-last"]
    assert out["units"]["lever max-autotune 2x2"]["left_out"] == {
        "max-autotune": "a torch.compile mode, and compile is off here"}
    assert "## Kernels (opt-in, harness/kernels.py)" in markdown


def test_kernels_stage_attention_backends_are_na_on_a_cpu(kernels_report):
    out, markdown = kernels_report
    assert out["units"]["attention backends"]["n/a"].startswith("SDPA's CUDA kernels; this device is cpu")
    assert "n/a: SDPA's CUDA kernels" in markdown


def test_kernels_stage_lever_rows_beside_todays(kernels_report):
    """Each lever row beside today's path from the same unit; what a CPU cannot run is named, FP8 sets not timed;
    the lever computes today's numbers (bf16 rounding apart)."""
    out, markdown = kernels_report
    units = out["units"]
    together = units["lever qkv-attention+attention-backend 2x2"]
    assert together["kernels"] == ["qkv-attention"] and list(together["left_out"]) == ["attention-backend"]
    assert together["today"]["kernels"] == [] and together["lever"]["kernels"] == ["qkv-attention"]
    assert together["ratio"] == together["lever"]["images_per_s"] / together["today"]["images_per_s"]
    assert 0 < together["agreement"]["logits"] < 5e-2 and 0 < together["agreement"]["prompt_grad"] < 5e-2
    for key in ("lever qkv-attention+attention-backend+fp8 2x2", "lever fp8 2x2", "lever attention-backend 2x2"):
        assert "today" not in units[key] and "ratio" not in units[key]
    assert units["lever fp8 2x2"]["left_out"]["fp8"].startswith("fp8: FP8 (e4m3) matmuls need a CUDA GPU")
    targets = {t["figure"]: t for t in out["targets"]}
    assert targets["train step with qkv-attention, 2 prompts, batch 2"]["target"] == 3700
    assert all(t["met"] is None for t in out["targets"])                   # a CPU judges nothing


def test_kernels_stage_gemm_ceiling(kernels_report):
    out, _ = kernels_report
    ceiling = out["units"]["gemm ceiling"]
    assert ceiling["matmul_peak"]["tflops"] > 0 and [(p["prompts"], p["batch"]) for p in ceiling["points"]] == [
        (2, 2), (1, 2)]
    for point in ceiling["points"]:
        assert [r["name"] for r in point["shapes"]][:5] == ["patch embedding", "qkv", "proj", "fc1", "fc2"]
        assert point["gemm_ms_per_step"] == pytest.approx(sum(r["ms_per_step"] for r in point["shapes"]))
        assert point["ceiling_images_per_s"] == pytest.approx(point["batch"] / point["gemm_ms_per_step"] * 1000)


def test_kernels_stage_kernel_split(kernels_report):
    out, markdown = kernels_report
    split = out["units"]["kernel split 2x2"]
    assert split["source"] == "CPU operators (self time)" and set(split["ms_per_step"]) == {
        "attention", "GEMM", "elementwise", "other"}
    assert split["ms_per_step"]["GEMM"] > 0 and split["ms_per_step"]["attention"] > 0
    assert split["total_ms_per_step"] == pytest.approx(sum(split["ms_per_step"].values()))
    assert "Kernel-type split of today's training step at 2 prompts, batch 2" in markdown


def test_kernels_stage_setr_pup_levers(kernels_report):
    out, markdown = kernels_report
    unit = out["units"]["segmentation lever upsample+channels-last"]
    assert unit["kernels"] == ["upsample", "channels-last"] and unit["today"]["kernels"] == []
    assert unit["batch_size"] == 2
    assert unit["ratio"] == pytest.approx(unit["lever"]["iters_per_s"] / unit["today"]["iters_per_s"])
    assert "| upsample+channels-last |" in markdown


def test_a_failing_kernel_unit_is_recorded_and_the_stage_goes_on(tmp_path, monkeypatch):
    """An opt-in kernel the device rejects (here: the GEMM ceiling and SETR-PUP's levers raising) leaves its reason
    in the unit and in BENCHMARKS.md; the units after it are measured."""
    from bench import bench, report

    def rejected(*args):
        raise RuntimeError("no kernel image is available for execution on the device\nsecond line")
    monkeypatch.setattr(report, "REPORT_POINTS", ((2, 32, 3700, "cub"), (1, 32, 5700, "dtd")))
    monkeypatch.setattr(bench, "time_gemm_ceiling", rejected)
    monkeypatch.setattr(bench, "time_segmentation_lever", rejected)
    monkeypatch.setattr(bench, "time_lever", lambda *a: {"prompts": 2, "batch": 2, "asked": [], "kernels": [],
                                                         "left_out": {}})
    monkeypatch.setattr(bench, "profile_step_split", lambda *a: {"prompts": 2, "batch": 2})
    out = bench.main(["--report", "--arch", "tiny", "--only", "kernels", "--out-dir", str(tmp_path), "--steps", "1",
                      "--warmup", "0", "--repeats", "1"])
    why = "RuntimeError: no kernel image is available for execution on the device"
    assert out["units"]["gemm ceiling"] == {"failed": why}
    assert out["units"]["segmentation lever upsample"] == {"failed": why}
    assert "failed" not in out["units"]["kernel split 2x2"]                 # measured after the failure
    assert out["kernels"]["failed"]["gemm ceiling"] == why
    assert f"- gemm ceiling: {why}" in (tmp_path / "BENCHMARKS.md").read_text()
