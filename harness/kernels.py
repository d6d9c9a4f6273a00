"""Opt-in kernels for the fast path: other formulations of the frozen backbone's attention, SETR-PUP's upsampling
and the frozen Linear layers. Each is switched on by name (`apply`, runtime.Settings.kernels, bench --kernels /
--fp8); none is on by default.

  qkv-attention      the qkv projection and attention of a frozen block as one autograd function (QKVAttention):
                     the temperature (Eq. 9) is folded into the query rows of the frozen qkv weight, and the
                     backward multiplies dq, dk, dv by their own weight rows instead of packing them into one qkv
                     gradient first. Same numbers as gated_prompt.Attention (tests: float64 on a CPU, 1e-10).
  attention-backend  scaled-dot-product attention run by a chosen kernel per sequence length (a table such as
                     bench's attention-backend unit measures: {297: "cudnn", 198: "flash"}), same math.
  upsample           nn.Upsample(bilinear, align_corners=False, integer scale) as a fixed separable filter whose
                     backward is a fixed stride-s correlation -- a gather, where the native backward scatters with
                     atomic adds (BilinearUpsample). Same numbers as F.interpolate (float64, 1e-12).
  channels-last      the SETR-PUP heads' convolutions in NHWC layout: a layout, same numbers.
  fp8                the frozen Linear weights of the blocks in float8 e4m3 with one scale per output channel,
                     computed once; activations quantised per row at every call (FP8Linear). CHANGES THE NUMERICS:
                     never a default, and refused where the hardware has no FP8 matmul (fp8_unsupported).

Nothing here knows a task or a harness; it imports gated_prompt and torch only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gated_prompt as gp

KERNELS = ("qkv-attention", "attention-backend", "upsample", "channels-last", "fp8")


class Unsupported(ValueError):
    """A kernel asked for on a device that cannot run it; the message is one line naming the flag and device."""

# -----------------------------------------------------------------------------
# Attention kernels: forward returns (out, saved), backward(dout, q, k, v, out, saved) -> (dq, dk, dv).
# q, k, v: [B, H, T, d] (views of the packed qkv projection); bias: None or an additive float mask
# broadcastable to [B, H, T, T] (0 = attend, -inf = masked key).


def _math_forward(q, k, v, bias):
    """Eq. 3 written out: softmax(q k^T / sqrt(d) + bias) v; saves the probabilities."""
    p = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + (0 if bias is None else bias), dim=-1)
    return p @ v, (p,)


def _math_backward(dout, q, k, v, out, saved, bias):
    (p,) = saved
    dv = p.transpose(-2, -1) @ dout
    dp = dout @ v.transpose(-2, -1)
    ds = p * (dp - (dout * out).sum(-1, keepdim=True))      # softmax backward: rowsum(dp * p) = rowsum(dout * out)
    scale = q.shape[-1] ** -0.5
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, dv


def _flash_forward(q, k, v, bias):
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)
        return out, (lse,)
    if bias is not None:
        raise ValueError("the CUDA flash kernel takes no attention mask")
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, False, False)
    return out, (lse, cum_q, cum_k, max_q, max_k, seed, offset)


def _flash_backward(dout, q, k, v, out, saved, bias):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, saved[0], 0.0, False, attn_mask=bias)
    lse, cum_q, cum_k, max_q, max_k, seed, offset = saved
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset)


def _efficient_forward(q, k, v, bias):
    out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False)
    return out, (lse, seed, offset)


def _efficient_backward(dout, q, k, v, out, saved, bias):
    lse, seed, offset = saved
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False], False)
    return dq, dk, dv


def _cudnn_forward(q, k, v, bias):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, bias, True, 0.0, False, False)
    return out, (lse, cum_q, cum_k, max_q, max_k, seed, offset)


def _cudnn_backward(dout, q, k, v, out, saved, bias):
    lse, cum_q, cum_k, max_q, max_k, seed, offset = saved
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, 0.0, False)


ATTENTION_KERNELS = {"math": (_math_forward, _math_backward), "flash": (_flash_forward, _flash_backward),
                     "efficient": (_efficient_forward, _efficient_backward),
                     "cudnn": (_cudnn_forward, _cudnn_backward)}
SDPA_BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def default_backend(device, dtype, head_dim, masked):
    """The kernel QKVAttention uses without a measured table: the CPU's flash kernel (any float dtype, masks
    included); on CUDA flash for bf16 / fp16 without a mask and head dim <= 256, the efficient kernel for other
    dtypes, the explicit math with a mask (the CUDA kernels' alignment rules for masks are not replicated here;
    masks only occur in MultiTask's inference)."""
    if device.type == "cpu":
        return "flash"
    if masked:
        return "math"
    return "flash" if dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 else "efficient"


def additive_mask(attn_mask, dtype):
    """bool [B, 1, 1, T] (False = a key no query attends to) -> 0 / -inf in `dtype`, as SDPA reads a bool mask."""
    if attn_mask is None:
        return None
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))

# -----------------------------------------------------------------------------
# qkv projection + attention of a frozen block in one autograd function


def _q_row_scale(temperature, dim, device):
    """[3 dim] row scale of the qkv weight (fp32, fp64 for an fp64 tau): 1 / tau on the query rows, 1 on the key
    and value rows -- Eq. 9 folded into the projection: (x Wq^T + bq) / tau = x (Wq / tau)^T + bq / tau."""
    if temperature is None:
        return None
    inv = (1.0 / gp.at_least_fp32(temperature.detach())).reshape(1).to(device)
    return torch.cat([inv.expand(dim), torch.ones(2 * dim, dtype=inv.dtype, device=device)])


def _scaled_rows(t, scale):
    """t (a weight [3D, D] or a bias [3D]) with row i multiplied by scale[i], rounded once to t's dtype."""
    if t is None or scale is None:
        return t
    wide = gp.at_least_fp32(t)
    return (wide * scale.to(wide.dtype).view(-1, *[1] * (t.dim() - 1))).to(t.dtype)


class QKVAttention(torch.autograd.Function):
    """softmax(q k^T / (sqrt(d) tau)) v with [q, k, v] = x W^T + b, for a FROZEN W, b: gradients flow to x (hence
    prompts and gates) and to the temperature tau, never to W or b.

    Forward: the query rows of W and b are scaled by 1 / tau (a [3D, D] product instead of a [B, T, D] one; with
    FP8 weights, their per-row scales), one GEMM gives q, k, v as views of the packed projection, and the chosen
    attention kernel runs on them. Backward: the kernel's dq, dk, dv (laid out [B, T, H, d] by the fused kernels,
    so viewing them as [B*T, D] copies nothing) meet their own weight rows in three accumulating GEMMs -- no
    [B, T, 3D] qkv gradient is packed -- and dL/dtau = -<dq, q> / tau, q being the scaled query.

    weight: the frozen [3D, D] weight (with fp8 = (e4m3 weight, per-row scales), its dequantised copy, which the
    backward multiplies by)."""

    @staticmethod
    def forward(ctx, x, temperature, weight, bias, num_heads, attn_bias, backend, fp8=None):
        B, T, C = x.shape
        d = C // num_heads
        rows = _q_row_scale(temperature, C, x.device)
        w = _scaled_rows(weight, rows)
        if fp8 is None:
            qkv = F.linear(x, w, _scaled_rows(bias, rows))
        else:
            weight_fp8, scales = fp8
            qkv = fp8_linear(x, weight_fp8, scales if rows is None else scales * rows, _scaled_rows(bias, rows),
                             compute_dtype(x))
        q, k, v = qkv.view(B, T, 3, num_heads, d).permute(2, 0, 3, 1, 4)
        attn_bias = None if attn_bias is None else attn_bias.to(q.dtype)
        out, saved = ATTENTION_KERNELS[backend][0](q, k, v, attn_bias)
        ctx.backend, ctx.num_heads, ctx.x_dtype = backend, num_heads, x.dtype
        ctx.is_tensor = [isinstance(t, torch.Tensor) for t in saved]
        ctx.others = [None if tensor else t for t, tensor in zip(saved, ctx.is_tensor)]
        ctx.save_for_backward(qkv, out, w, attn_bias, temperature,
                              *[t for t, tensor in zip(saved, ctx.is_tensor) if tensor])
        return out.transpose(1, 2).reshape(B, T, C)

    @staticmethod
    def backward(ctx, grad):
        qkv, out, w, attn_bias, temperature, *tensors = ctx.saved_tensors
        tensors = iter(tensors)
        saved = [next(tensors) if tensor else other for tensor, other in zip(ctx.is_tensor, ctx.others)]
        B, T, C = grad.shape
        H, d = ctx.num_heads, C // ctx.num_heads
        q, k, v = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
        dout = grad.to(out.dtype).reshape(B, T, H, d).transpose(1, 2)
        dq, dk, dv = ATTENTION_KERNELS[ctx.backend][1](dout, q, k, v, out, saved, attn_bias)
        dx = dtau = None
        if ctx.needs_input_grad[0]:
            w = w.to(dq.dtype)
            dx = dq.transpose(1, 2).reshape(B * T, C) @ w[:C]
            dx.addmm_(dk.transpose(1, 2).reshape(B * T, C), w[C:2 * C])
            dx.addmm_(dv.transpose(1, 2).reshape(B * T, C), w[2 * C:])
            dx = dx.view(B, T, C).to(ctx.x_dtype)
        if temperature is not None and ctx.needs_input_grad[1]:
            inner = (gp.at_least_fp32(dq) * q).sum()
            dtau = (-inner / temperature).to(temperature.dtype)
        return dx, dtau, None, None, None, None, None, None


def compute_dtype(x):
    """The dtype a matmul on x computes in: autocast's where it is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def qkv_attention(attention, x, temperature=None, attn_mask=None, backend=None):
    """gated_prompt.Attention's forward minus the output projection, through QKVAttention: [B, T, D] -> [B, T, D].
    temperature: None or one scalar (a tensor or a number); backend: a name of ATTENTION_KERNELS or None for
    default_backend (also used for a masked call on a GPU). An FP8Linear qkv projection computes in FP8."""
    if temperature is not None and not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor(float(temperature), device=x.device)
    if temperature is not None:
        temperature = temperature.reshape(())
    qkv = attention.qkv
    if backend is None or (attn_mask is not None and x.device.type != "cpu"):   # the CUDA kernels take no mask here
        backend = default_backend(x.device, compute_dtype(x), x.shape[-1] // attention.num_heads,
                                  attn_mask is not None)
    fp8 = (qkv.weight_fp8, qkv.weight_scales) if isinstance(qkv, FP8Linear) else None
    return QKVAttention.apply(x, temperature, qkv.weight_dq if fp8 else qkv.weight, qkv.bias, attention.num_heads,
                              additive_mask(attn_mask, x.dtype), backend, fp8)


class FastAttention(gp.Attention):
    """gated_prompt.Attention whose frozen forward runs QKVAttention (fused_qkv) and / or a chosen SDPA kernel per
    sequence length (`backends`: {T: name} or one name for every T). Anything else -- attention maps, the
    explicit-softmax reference, per-image temperatures, DINOv3's rotated q / k, trainable qkv weights -- takes
    the plain forward."""
    fused_qkv = False
    backends = None

    def backend_for(self, tokens):
        if isinstance(self.backends, dict):
            return self.backends.get(tokens)
        return self.backends

    def forward(self, x, tau=None, mask=None, rope=None):
        per_image = isinstance(tau, torch.Tensor) and tau.numel() != 1
        if rope is not None or not self.fused or per_image or self.qkv.weight.requires_grad:
            return super().forward(x, tau, mask, rope)
        backend = self.backend_for(x.shape[1])
        if self.fused_qkv:
            return self.proj(qkv_attention(self, x, tau, mask, backend))
        if backend is None:
            return super().forward(x, tau, mask, rope)
        with sdpa_kernel([SDPA_BACKENDS[backend]]):
            return super().forward(x, tau, mask, rope)


def use_fast_attention(model, fused_qkv=True, backends=None):
    """Turn every gated_prompt.Attention inside `model` into a FastAttention (in place; parameters, state dict and
    the plain paths unchanged). Returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, gp.Attention):
            module.__class__ = FastAttention
            module.fused_qkv = fused_qkv or module.fused_qkv
            module.backends = backends if backends is not None else module.backends
            count += 1
    return count

# -----------------------------------------------------------------------------
# Bilinear upsampling by an integer factor as a fixed filter


def bilinear_taps(scale):
    """For each output phase p of an x`scale` bilinear upsample with align_corners=False: (weight of x[i], weight
    of the neighbour, -1 for x[i-1] or +1 for x[i+1]). Output s*i + p samples the input at i + f with
    f = (p + 0.5) / s - 0.5; beyond the borders the edge value repeats (PyTorch clamps the source index)."""
    taps = []
    for p in range(scale):
        f = (p + 0.5) / scale - 0.5
        taps.append((1 + f, -f, -1) if f < 0 else (1 - f, f, 1))
    return taps


def _shifted(x, dim, side):
    """x[i - 1] (side -1) or x[i + 1] (side +1) along `dim`, the edge repeated."""
    n = x.shape[dim]
    if side < 0:
        return torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
    return torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)


def _shifted_adjoint(g, dim, side):
    """The transpose of _shifted: g moved back by one, the value that fell off the edge added onto the edge."""
    n = g.shape[dim]
    zero = torch.zeros_like(g.narrow(dim, 0, 1))
    if side < 0:   # x[j] <- g[j + 1]; x[0] also <- g[0]
        moved = torch.cat([g.narrow(dim, 1, n - 1), zero], dim)
        return torch.cat([moved.narrow(dim, 0, 1) + g.narrow(dim, 0, 1), moved.narrow(dim, 1, n - 1)], dim)
    moved = torch.cat([zero, g.narrow(dim, 0, n - 1)], dim)   # x[j] <- g[j - 1]; x[n-1] also <- g[n-1]
    return torch.cat([moved.narrow(dim, 0, n - 1), moved.narrow(dim, n - 1, 1) + g.narrow(dim, n - 1, 1)], dim)


def _upsample_axis(x, dim, scale):
    """x2 (x`scale`) along one axis: phase p = near * x + far * neighbour, phases interleaved."""
    neighbours = {side: _shifted(x, dim, side) for side in (-1, 1)}
    phases = [near * x + far * neighbours[side] for near, far, side in bilinear_taps(scale)]
    return torch.stack(phases, dim + 1).flatten(dim, dim + 1)


def _upsample_axis_adjoint(g, dim, scale):
    """The transpose of _upsample_axis (its backward): each input sample collects the phases that read it -- a
    stride-`scale` correlation of g with the same taps, edges folded back. A gather: no atomic adds."""
    g = g.unflatten(dim, (g.shape[dim] // scale, scale))
    near, far = 0, {-1: 0, 1: 0}
    for p, (w_near, w_far, side) in enumerate(bilinear_taps(scale)):
        phase = g.select(dim + 1, p)
        near = near + w_near * phase
        far[side] = far[side] + w_far * phase
    return near + sum(_shifted_adjoint(t, dim, side) for side, t in far.items() if isinstance(t, torch.Tensor))


class _BilinearUpsample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale, ctx.channels_last = scale, x.is_contiguous(memory_format=torch.channels_last)
        y = _upsample_axis(_upsample_axis(x, 2, scale), 3, scale)
        return y.contiguous(memory_format=torch.channels_last) if ctx.channels_last else y

    @staticmethod
    def backward(ctx, g):
        dx = _upsample_axis_adjoint(_upsample_axis_adjoint(g, 3, ctx.scale), 2, ctx.scale)
        return (dx.contiguous(memory_format=torch.channels_last) if ctx.channels_last else dx), None


def bilinear_upsample(x, scale):
    """F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) for [B, C, H, W] and an integer
    scale >= 1, written as the separable fixed filter (bilinear_taps) with its transpose as the backward."""
    if scale == 1:
        return x
    return _BilinearUpsample.apply(x, scale)


class BilinearUpsample(nn.Module):
    """nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False) through bilinear_upsample."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return bilinear_upsample(x, self.scale)

    def extra_repr(self):
        return f"scale={self.scale}"


def upsample_scale(module):
    """The integer factor of an nn.Upsample that bilinear_upsample reproduces (bilinear, align_corners False, one
    integer scale_factor, no size), else None (left as it is)."""
    if not isinstance(module, nn.Upsample) or module.mode != "bilinear" or module.align_corners or module.size:
        return None
    factors = module.scale_factor if isinstance(module.scale_factor, tuple) else (module.scale_factor,)
    if len(set(factors)) != 1 or factors[0] is None or float(factors[0]) != int(factors[0]) or factors[0] < 1:
        return None
    return int(factors[0])


def use_fast_upsample(model):
    """Replace every nn.Upsample that upsample_scale accepts by a BilinearUpsample, in place. Returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            scale = upsample_scale(child)
            if scale is not None:
                setattr(parent, name, BilinearUpsample(scale))
                count += 1
    return count


def use_channels_last(model):
    """Convolutions and BatchNorms outside the ViT in channels_last (NHWC) layout; the ViT's patch embedding stays.
    Returns how many modules moved."""
    frozen = {id(m) for vit in model.modules() if isinstance(vit, gp.VisionTransformer) for m in vit.modules()}
    count = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) and id(module) not in frozen:
            module.to(memory_format=torch.channels_last)
            count += 1
    return count

# -----------------------------------------------------------------------------
# FP8 (e4m3) frozen Linear weights

E4M3_MAX = 448.0        # the largest finite float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)   # Ada / Hopper and newer: FP8 tensor cores


def fp8_unsupported(device, flag="--fp8"):
    """None where `device` can run FP8 matmuls (CUDA, compute capability >= 8.9, torch._scaled_mm), else the one-line
    reason naming `flag` and the device."""
    device = torch.device(device)
    if device.type != "cuda":
        name = f"a {device.type.upper() if device.type == 'cpu' else device.type} ({device})"
        return f"{flag}: FP8 (e4m3) matmuls need a CUDA GPU of compute capability 8.9 or newer; this device is {name}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY or not hasattr(torch, "_scaled_mm"):
        return (f"{flag}: FP8 (e4m3) matmuls need compute capability 8.9 or newer; {torch.cuda.get_device_name(device)}"
                f" is {capability[0]}.{capability[1]}")
    return None


def channel_scales(weight):
    """One fp32 scale per output channel (row) of a [N, K] weight: max |w| / 448, so that each row's largest weight
    lands on e4m3's largest value; 1 for an all-zero row."""
    amax = weight.detach().abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_rows(x, scales):
    """x / scales (one per row), clamped to +-448 and rounded to float8_e4m3fn (nearest, ties to even)."""
    return (x.float() / scales[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_rows(q, scales):
    return q.float() * scales[:, None]


def _scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """torch._scaled_mm with one scale per row of a and per column of b (the hook tests replace on a CPU)."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def fp8_linear(x, weight_fp8, weight_scales, bias, out_dtype):
    """x W^T (+ bias) in `out_dtype` from an e4m3 weight [N, K] with one scale per output channel: x is quantised
    per row (its own scales, at every call), the FP8 GEMM applies both scales. No gradient (FP8Matmul adds it)."""
    shape, K = x.shape, x.shape[-1]
    rows = x.reshape(-1, K)
    pad = -rows.shape[0] % 16                     # FP8 GEMMs want every dimension a multiple of 16
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))
    row_scales = channel_scales(rows)
    y = _scaled_mm(quantize_rows(rows, row_scales), weight_fp8.t(), row_scales[:, None], weight_scales[None, :],
                   out_dtype)
    y = y[:rows.shape[0] - pad] if pad else y
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], -1)


class FP8Matmul(torch.autograd.Function):
    """fp8_linear with the straight-through backward dx = dy W_dq, W_dq the dequantised weight (in the
    gradient's dtype): the gradient of the function the forward computes, up to the activations' rounding."""

    @staticmethod
    def forward(ctx, x, weight_fp8, weight_scales, weight_dq, bias, out_dtype):
        ctx.save_for_backward(weight_dq)
        ctx.x_dtype = x.dtype
        return fp8_linear(x, weight_fp8, weight_scales, bias, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight_dq,) = ctx.saved_tensors
        return (grad @ weight_dq.to(grad.dtype)).to(ctx.x_dtype), None, None, None, None, None


class FP8Linear(nn.Linear):
    """A frozen nn.Linear computing through FP8Matmul. Its weight and bias parameters stay (state dict, prompt
    packs and fingerprints unchanged); the e4m3 copy, its scales and the dequantised weight are buffers made once
    by `prepare` (not saved)."""

    def prepare(self):
        with torch.no_grad():
            scales = channel_scales(self.weight)
            q = quantize_rows(self.weight, scales)
            self.register_buffer("weight_fp8", q, persistent=False)
            self.register_buffer("weight_scales", scales, persistent=False)
            self.register_buffer("weight_dq", dequantize_rows(q, scales).to(self.weight.dtype), persistent=False)
        return self

    def forward(self, x):
        if self.weight.requires_grad:
            raise RuntimeError("FP8Linear is for frozen weights; this one requires a gradient")
        return FP8Matmul.apply(x, self.weight_fp8, self.weight_scales, self.weight_dq, self.bias, compute_dtype(x))


def use_fp8(model, device, flag="--fp8"):
    """Every frozen nn.Linear inside the ViT blocks of `model` becomes an FP8Linear (in place). Refused with
    Unsupported(one line) on a device without FP8 matmuls. Returns how many."""
    reason = fp8_unsupported(device, flag)
    if reason:
        raise Unsupported(reason)
    count = 0
    for vit in [m for m in model.modules() if isinstance(m, gp.VisionTransformer)]:
        for module in vit.blocks.modules():
            if type(module) is nn.Linear and not module.weight.requires_grad:
                module.__class__ = FP8Linear
                module.prepare()
                count += 1
    return count

# -----------------------------------------------------------------------------


def check_names(names):
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernel(s) {', '.join(unknown)}; the kernels are {', '.join(KERNELS)}")


def apply(model, names, device=None, backends=None, flag="--fp8"):
    """Switch the named KERNELS on inside `model` (in place, after it is placed on its device and dtype).
    backends: the attention-backend table ({T: name}), which "attention-backend" needs. Returns {name: modules changed}."""
    check_names(names)
    if "attention-backend" in names and not backends:
        raise ValueError("attention-backend needs a table {sequence length: kernel name} (bench --report's "
                         "attention-backends unit measures one)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    done = {}
    if "qkv-attention" in names or "attention-backend" in names:
        table = backends if "attention-backend" in names else None
        done["attention"] = use_fast_attention(model, fused_qkv="qkv-attention" in names, backends=table)
    if "upsample" in names:
        done["upsample"] = use_fast_upsample(model)
    if "channels-last" in names:
        done["channels-last"] = use_channels_last(model)
    if "fp8" in names:
        done["fp8"] = use_fp8(model, device, flag)
    return done
