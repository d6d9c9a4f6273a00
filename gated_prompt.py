"""Gated Prompt Tuning in one file.

Reference implementation of "Improving Visual Prompt Tuning for Self-supervised Vision
Transformers" (Yoo, Kim, Jung, Lee, Yoon; ICML 2023): a frozen ViT steered by prompt tokens whose
update by each block is gated (Eq. 6-7), with learnable per-block attention temperatures
(Eq. 9). The same class also runs the baselines: linear probe, VPT-shallow (Eq. 4) and
VPT-deep (Eq. 5). Depends on torch and numpy only; copy it into your project.

    import gated_prompt as gp
    model = gp.build_model("vit_base", ssl="mae", method="gated+temp", num_classes=200,
                           num_prompts=100, gate_init=5.0,
                           checkpoint="mae_pretrain_vit_base.pth")  # any format in load_backbone
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9)  # lr: Table 5's, per task
    # with AdamW: no weight decay on gate logits, temperatures and biases (decay would pull them toward 0)
    # opt = torch.optim.AdamW(gp.param_groups(model, weight_decay=0.05), lr=1e-3)
    loss = F.cross_entropy(model(images), labels)   # images: [B, 3, H, W], ImageNet-normalised, any H, W
    opt.zero_grad(); loss.backward(); opt.step()
    gp.project_temperatures(model)           # Eq. 9's tau back into [0.01, 10] after every step
    model.selection_ratio()                  # Eq. 10-11, one value per gated block
    model.attention_maps(images, blocks=(3, 7, 12))   # Figure 5
    model.save_pack("cub.pack.pt")                     # the trained prompt side, one self-describing file
    serve = gp.MultiTask("mae_pretrain_vit_base.pth", {"cub": "cub.pack.pt", "dtd": "dtd.pack.pt"})
    serve(images, ["cub", "dtd", ...])                   # one batch, each image with its own task's prompts

ssl="dino" / "dinov2" / "dinov3" / "supervised" (DeiT) read those backbones; ViT-S has 6 heads except with
ssl="mocov3" (12, as MoCo v3's). Prompt packs and MultiTask are the method's practical payoff: one frozen
backbone serves many tasks.

Reading order: configuration, layers (Eq. 1-3 and 9), the token layout and the one block loop (Eq. 2, 4, 5, 7),
VisionTransformer, gates (Eq. 6-11), build_model, then checkpoint formats, prompt packs and MultiTask.
Blocks are numbered 1..L as in the paper; Python lists are indexed 0..L-1.
"""
import contextlib
import hashlib
import json
import math
import numbers
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ARCHS", "SSL", "SSL_POOLING", "METHODS", "TEMPERATURE_RANGE", "IMAGENET_MEAN", "IMAGENET_STD",
           "ViTConfig", "PromptConfig", "vit_config", "prompt_config", "rope_periods", "rope_sincos", "apply_rope",
           "resize_pos_embed", "PromptStep", "VisionTransformer", "hard_gates", "gate_aggregation_weights",
           "gate_selection_ratio", "project_temperatures", "param_groups", "classification_head", "build_model",
           "load_exactly", "load_backbone", "read_checkpoint", "detect_format", "convert_state_dict",
           "checkpoint_layout", "NAME_TABLES", "CheckpointError", "PickledCodeError", "backbone_fingerprint",
           "default_preprocess", "save_pack", "read_pack", "load_pack", "MultiTask"]

# -----------------------------------------------------------------------------
# Configuration

ARCHS = {  # name: (patch_size, embed_dim, depth, num_heads): the timm / DINO / DeiT sizes
    "vit_small": (16, 384, 12, 6),
    "vit_base": (16, 768, 12, 12),
    "vit_large": (16, 1024, 24, 16),
    "vit_huge": (14, 1280, 32, 16),
}
SSL = {  # name: the ViTConfig fields a pretraining fixes, on top of ARCHS
    "mae": dict(pool="mean"),
    "mocov3": dict(pool="cls"),
    "supervised": dict(pool="cls"),   # DeiT, Google ViT
    "dino": dict(pool="cls"),         # DINO v1: CLS after the final norm
    # DINOv2: position table for 518 px, resized as the official code does: with registers antialiased
    # (vit_config picks it from num_reg_tokens), without registers with its 0.1 offset ("bicubic-offset")
    "dinov2": dict(pool="cls", patch_size=14, layer_scale=True, pos_grid=37),
    # DINOv3: no position table but 2-D RoPE on the patch tokens, 4 storage tokens (registers), CLS after the
    # final norm, LayerNorm eps 1e-5 (the official training's RoPE coordinate jitter does not apply: the frozen
    # backbone runs in eval mode)
    "dinov3": dict(pool="cls", layer_scale=True, norm_eps=1e-5, num_reg_tokens=4, pos_embed="rope"),
}
ARCH_FOR_SSL = {("vit_small", "mocov3"): dict(num_heads=12)}  # the MoCo v3 ViT-S has 12 heads, not 6
DINOV3_ARCHS = ("vit_small", "vit_base", "vit_large")   # DINOv3's ViT-S/16, ViT-B/16, ViT-L/16
REFUSED_ARCHS = {  # SwiGLU MLPs
    "vit_giant": "ViT-g/14 (DINOv2's SwiGLU MLP) is not supported",
    "vit_g": "ViT-g/14 (DINOv2's SwiGLU MLP) is not supported",
    "vit_small_plus": "DINOv3 ViT-S+/16 (SwiGLU MLP) is not supported; DINOv3 ViT-S/16 is vit_small",
    "vit_huge_plus": "DINOv3 ViT-H+/16 (SwiGLU MLP) is not supported; DINOv3 ViT-L/16 is vit_large",
    "vit_7b": "DINOv3 ViT-7B/16 (SwiGLU MLP, 4096 wide) is not supported",
}
SSL_POOLING = {name: fields["pool"] for name, fields in SSL.items()}
METHODS = {  # name: (prompt, gates, learn_temperature)
    "linear": ("none", "none", False),
    "vpt-shallow": ("shallow", "none", False),
    "vpt-deep": ("deep", "none", False),
    "gated": ("shallow", "soft", False),
    "gated+temp": ("shallow", "soft", True),      # the paper's method
    "gated-hard": ("shallow", "hard", True),      # Table 4: our method with Gumbel-sigmoid gates
}
TEMPERATURE_RANGE = (0.01, 10.0)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # every backbone above but Google's .npz


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass
class ViTConfig:
    img_size: int = 224          # the input size the model is built for (a pack's default transform); any multiple
    #                              of patch_size runs: the stored position grid is resized per input
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    pool: str = "cls"            # "cls": norm then CLS (MoCo v3, DINO, DINOv2/3, DeiT); "mean": mean of non-CLS
    #                              tokens then norm (MAE)
    fused_attention: bool = True  # SDPA kernels; False = explicit softmax (the official code's numerics)
    pos_embed: str = "learned"   # "learned": a position table added to the patch tokens (Eq. 1); "rope": DINOv3's
    #                              2-D rotary embedding of the patch tokens' queries and keys (rope_periods)
    rope_base: float = 100.0     # RoPE periods rope_base ** (4 j / head_dim)
    # resizing the stored position grid to the input's: "bicubic" (the official MAE / MoCo v3 / DINO code),
    # "bicubic-antialias" (timm >= 0.9; the official DINOv2 code with registers), "bicubic-offset" (the official
    # DINOv2 code without registers: scale factor (n + 0.1) / grid, no antialiasing), "bilinear" (mmseg's SETR)
    pos_embed_interpolation: str = "bicubic"
    layer_scale: bool = False    # DINOv2 / v3: x + gamma * f(x) in both residual branches (ls1.gamma, ls2.gamma)
    num_reg_tokens: int = 0      # DINOv2 registers, DINOv3 storage tokens (build_model reads the checkpoint's count)
    pos_grid: int = 0            # side of the stored position grid, the checkpoint's own (build_model reads it);
    #                              0: img_size // patch_size; none with RoPE
    ssl: str = ""                # the pretraining vit_config applied (recorded in packs); "": set field by field

    def __post_init__(self):
        _check_choice("pool", self.pool, ("cls", "mean"))
        _check_choice("pos_embed", self.pos_embed, ("learned", "rope"))
        _check_choice("pos_embed_interpolation", self.pos_embed_interpolation,
                      ("bicubic", "bicubic-antialias", "bicubic-offset", "bilinear"))
        if self.embed_dim % self.num_heads or self.img_size % self.patch_size:
            raise ValueError(f"embed_dim {self.embed_dim} must divide by num_heads {self.num_heads} and img_size "
                             f"{self.img_size} by patch_size {self.patch_size}")
        if self.num_reg_tokens and self.pool == "mean":
            raise ValueError("pool='mean' averages every token but CLS; with register tokens use pool='cls'")
        if self.pos_embed == "rope" and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"RoPE needs a head width divisible by 4, got {self.embed_dim // self.num_heads}")
        self.pos_grid = 0 if self.pos_embed == "rope" else self.pos_grid or self.img_size // self.patch_size


@dataclass
class PromptConfig:
    prompt: str = "shallow"      # "none" | "shallow" (Eq. 4) | "deep" (Eq. 5)
    num_prompts: int = 100       # tokens in the sequence (per block for "deep")
    gates: str = "soft"          # "none" | "soft" (Eq. 6-7) | "hard" (Gumbel-sigmoid, Table 4)
    gate_init: float = 5.0       # gate logits start at -gate_init (Table 5 "gate init")
    learn_temperature: bool = True  # Eq. 9
    insert_at: int = 1           # first block that sees prompts (Figure 1)
    prompt_dropout: float = 0.1
    num_classes: int = 1000      # 0: no head (features only)

    def __post_init__(self):
        _check_choice("prompt", self.prompt, ("none", "shallow", "deep"))
        _check_choice("gates", self.gates, ("none", "soft", "hard"))
        if self.gates != "none" and self.prompt != "shallow":
            raise ValueError("gates act on prompts inserted once (prompt='shallow')")
        if self.prompt != "none" and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 with prompt={self.prompt!r}, got {self.num_prompts}")
        if not 0.0 <= self.prompt_dropout < 1.0 or self.num_classes < 0:
            raise ValueError(f"prompt_dropout must be in [0, 1) and num_classes >= 0, got {self.prompt_dropout}, "
                             f"{self.num_classes}")


def vit_config(arch="vit_base", ssl="mae", **overrides):
    """ARCHS[arch], then what the pretraining `ssl` fixes (SSL, ARCH_FOR_SSL), then `overrides`."""
    if arch in REFUSED_ARCHS:
        raise ValueError(f"arch={arch!r}: {REFUSED_ARCHS[arch]}")
    _check_choice("arch", arch, tuple(ARCHS))
    _check_choice("ssl", ssl, tuple(SSL))
    if ssl == "dinov3" and arch not in DINOV3_ARCHS:   # DINOv3's larger releases are H+/16 and 7B: SwiGLU MLPs
        raise ValueError(f"arch={arch!r}: DINOv3 has no such release here (ViT-H+/16 and ViT-7B/16 have SwiGLU "
                         f"MLPs, not supported); DINOv3 is {', '.join(DINOV3_ARCHS)}")
    patch_size, embed_dim, depth, num_heads = ARCHS[arch]
    fields = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, ssl=ssl)
    for layer in (SSL[ssl], ARCH_FOR_SSL.get((arch, ssl), {}), overrides):
        fields.update(layer)
    if ssl == "dinov2" and "pos_embed_interpolation" not in overrides:   # as the official hub models
        fields["pos_embed_interpolation"] = "bicubic-antialias" if fields.get("num_reg_tokens") else "bicubic-offset"
    return ViTConfig(**fields)


def prompt_config(method="gated+temp", **overrides):
    _check_choice("method", method, tuple(METHODS))
    prompt, gates, learn_temperature = METHODS[method]
    return replace(PromptConfig(prompt=prompt, gates=gates, learn_temperature=learn_temperature), **overrides)

# -----------------------------------------------------------------------------
# Layers (parameter names follow timm / MAE, so those files load unrenamed). Each returns a tensor.


def at_least_fp32(x):
    """bf16 / fp16 -> fp32; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LayerNorm(nn.LayerNorm):
    """Statistics in at least fp32 (fp64 stays fp64), output in the input's dtype: under bf16 autocast the
    residual stream stays bf16 (plain nn.LayerNorm under CUDA autocast returns fp32, which would promote every
    later add)."""

    def forward(self, x):
        h = at_least_fp32(x)
        w, b = (None if t is None else t.to(h.dtype) for t in (self.weight, self.bias))
        return F.layer_norm(h, self.normalized_shape, w, b, self.eps).to(x.dtype)


def rope_periods(cfg):
    """DINOv3's RoPE periods, one per quarter of a head's channels: rope_base ** (4 j / head_dim), j < head_dim / 4
    (timm computes them so; official release files store them, and load_backbone uses the stored ones)."""
    head = cfg.embed_dim // cfg.num_heads
    return cfg.rope_base ** (2 * torch.arange(head // 4, dtype=torch.float32) / (head // 2))


def rope_sincos(periods, grid):
    """DINOv3's 2-D rotary embedding of an h x w patch grid: (sin, cos), each [h * w, head_dim]. Patch centres are
    normalised per axis to [-1, 1] (row (i + 0.5) / h * 2 - 1, column alike); the angles 2 pi c / period of the
    row coordinate, then of the column coordinate, fill half a head and repeat for the other half (rotate-half
    layout). Computed in at least fp32."""
    dtype, device = at_least_fp32(periods).dtype, periods.device
    rows, cols = ((torch.arange(n, dtype=dtype, device=device) + 0.5) / n * 2 - 1 for n in grid)
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)   # [h * w, 2]
    angles = (2 * math.pi * coords[:, :, None] / periods.to(dtype)).flatten(1).tile(2)     # [h * w, head_dim]
    return angles.sin(), angles.cos()


def apply_rope(t, sin, cos):
    """Rotate the last N tokens of t [B, heads, T, head_dim], the patches, by their angles (rotate-half: the pair
    of channels j and j + head_dim / 2 turns together), in sin's dtype. The tokens before them (CLS, prompts,
    registers) are not rotated: they carry no position."""
    n = sin.shape[0]
    patches = t[..., -n:, :].to(sin.dtype)
    first, second = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([t[..., :-n, :], rotated.to(t.dtype)], dim=-2)


class Attention(nn.Module):
    """Multi-head self-attention: Eq. 3, with Eq. 9's temperature, softmax(Q K^T / (sqrt(d) tau)) V.
    tau: a scalar or one per image [B, 1, 1, 1]; mask: bool [B, 1, 1, T], False = a key no query attends to
    (MultiTask's padding slots); rope: (sin, cos) of the patch tokens, DINOv3's position."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.fused = cfg.num_heads, cfg.fused_attention
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def heads(self, x, tau=None, rope=None):
        """[B, T, D] -> q, k, v, each [B, heads, T, D / heads], the patches' q and k rotated (DINOv3), tau folded
        into q (Eq. 9)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return (q if tau is None else q / tau.to(q.dtype)), k, v

    @staticmethod
    def softmax(q, k, mask=None):
        """Eq. 3 / 9, explicitly: [B, heads, T, T], each row sums to 1."""
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        return (logits if mask is None else logits.masked_fill(~mask, float("-inf"))).softmax(dim=-1)

    def probabilities(self, x, tau=None, mask=None, rope=None):
        """The attention of every query to every key [B, heads, T, T] (Figure 5)."""
        q, k, _ = self.heads(x, tau, rope)
        return self.softmax(q, k, mask)

    def forward(self, x, tau=None, mask=None, rope=None):
        q, k, v = self.heads(x, tau, rope)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:   # the official code's numerics
            out = self.softmax(q, k, mask) @ v
        B, H, T, Dh = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, T, H * Dh))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """DINOv2's per-channel residual scale (timm and the official code name it `gamma`)."""

    def __init__(self, dim, init=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Eq. 2: one pre-norm transformer block, [B, T, D] -> [B, T, D]:
    x + MSA(LN(x)), then + MLP(LN(.)), each branch scaled by LayerScale where the backbone has it."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x, tau=None, mask=None, rope=None):
        x = x + self.ls1(self.attn(self.norm1(x), tau, mask, rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, 3, H, W] -> [B, N, D], N = (H/p)(W/p)


def resize_pos_embed(pos_embed, new_grid, mode="bicubic"):
    """[1, 1+h*w, D] -> [1, 1+H*W, D] on the patch grid, CLS kept. mode: "bicubic" (the official MAE / MoCo v3 /
    DINO code), "bicubic-antialias" (timm >= 0.9's resample_abs_pos_embed; official DINOv2 with registers),
    "bicubic-offset" (official DINOv2 without registers: the scale factor (n + 0.1) / old, not the size, sets
    where output pixels sample the grid), "bilinear" (mmseg's SETR)."""
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.isqrt(grid_pos.shape[1]))
    if old * old != grid_pos.shape[1]:
        raise ValueError(f"position embedding of {grid_pos.shape[1]} patches is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    g = grid_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    size = dict(scale_factor=tuple((n + 0.1) / old for n in new_grid)) if mode == "bicubic-offset" else \
        dict(size=tuple(new_grid))
    g = F.interpolate(g, mode=mode.split("-")[0], align_corners=False, antialias=mode.endswith("-antialias"), **size)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, g], dim=1)

# -----------------------------------------------------------------------------
# The token layout, [B, T, D] with T = 1 + P + R + N, and what the prompt side does at each block.
#
#   cls      x[:, :1]          [B, 1, D]      the class token
#   prompts  x[:, 1:1 + P]     [B, P, D]      P prompt slots (P = 0 before the first block that writes prompts)
#   rest     x[:, 1 + P:]      [B, R + N, D]  R registers (DINOv2) / storage tokens (DINOv3), then the N = (H/p)(W/p)
#                                             patch tokens
#
# Prompts go right after CLS (VPT), also on backbones with registers. Neither prompts nor registers carry a
# position and attention does not see order, so this is the same model as [CLS, registers, prompts, patches];
# this order keeps the prompts at positions 1..P for every backbone. With DINOv3's RoPE only the last N tokens
# (the patches) are rotated: prompts join the unrotated prefix (CLS, storage tokens), as registers do.


class PromptStep(NamedTuple):
    """The prompt side at one block, for VisionTransformer.run_blocks. A tensor's first dimension is the batch (one
    row per image: MultiTask, or several runs trained in one batch) or 1 (the same for every image); None: nothing
    of that kind at this block."""
    write: Optional[torch.Tensor] = None       # [B|1, P, D] prompt tokens written into the slots before the
    #                                            block: Eq. 4 where the slots appear, Eq. 5 where they are replaced
    write_rows: Optional[torch.Tensor] = None  # bool [B, 1, 1]: the rows that write; the others keep their slots
    #                                            (zeros where the slots appear); None: every row
    live: Optional[torch.Tensor] = None        # bool [B, P]: the slots a query may attend to (and MAE pooling
    #                                            averages); None: every slot
    tau: Optional[torch.Tensor] = None         # the block's temperature (Eq. 9): a scalar or [B|1, 1, 1, 1]
    gate: Optional[torch.Tensor] = None        # g_l of Eq. 7 after the block: a scalar or [B|1, 1, 1]


def key_mask(live, T):
    """bool [B, P] live prompt slots -> [B, 1, 1, T]: CLS, the live slots, registers and patches."""
    B, P = live.shape
    ones = live.new_ones(B, 1)
    return torch.cat([ones, live, ones.expand(B, T - 1 - P)], dim=1).view(B, 1, 1, T)


class VisionTransformer(nn.Module):
    """A frozen ViT plus the prompt-side parameters: prompts, gate logits, temperatures, head.
    The token sequence is laid out as named above the class."""

    def __init__(self, cfg: ViTConfig, pcfg: PromptConfig = None):
        super().__init__()
        pcfg = pcfg or PromptConfig(prompt="none", gates="none", learn_temperature=False)
        self.cfg, self.pcfg = cfg, pcfg
        D, L, grid = cfg.embed_dim, cfg.depth, cfg.pos_grid
        if not 1 <= pcfg.insert_at <= L:
            raise ValueError(f"insert_at must be in 1..{L}, got {pcfg.insert_at}")
        # backbone (frozen)
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_reg_tokens, D)) if cfg.num_reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, D)) if cfg.pos_embed == "learned" else None
        #                                              CLS + grid; registers get none; DINOv3 rotates instead:
        self.register_buffer("rope_periods", rope_periods(cfg) if cfg.pos_embed == "rope" else None)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(L)])
        self.norm = LayerNorm(D, eps=cfg.norm_eps)
        self._init_backbone()
        self.backbone_file = None  # the file load_backbone read, recorded in packs
        # prompt side (trainable)
        self.num_prompts = pcfg.num_prompts if pcfg.prompt != "none" else 0
        bound = math.sqrt(6.0 / (3 * cfg.patch_size ** 2 + D))  # VPT's uniform (xavier-style) init
        self.prompts = self.deep_prompts = self.gate_logits = self.temperatures = None
        if self.num_prompts:
            self.prompts = nn.Parameter(torch.empty(1, self.num_prompts, D).uniform_(-bound, bound))
        if pcfg.prompt == "deep":  # fresh prompts for blocks insert_at+1 .. L
            self.deep_prompts = nn.Parameter(torch.empty(L - pcfg.insert_at, self.num_prompts, D)
                                             .uniform_(-bound, bound))
        if pcfg.gates != "none":   # gamma_1 .. gamma_{L-1}; the last block is ungated
            self.gate_logits = nn.Parameter(torch.full((L - 1,), -float(pcfg.gate_init)))
        if pcfg.learn_temperature:  # tau_1 .. tau_L
            self.temperatures = nn.Parameter(torch.ones(L))
        self.prompt_dropout = nn.Dropout(pcfg.prompt_dropout)
        self.head = classification_head(D, pcfg.num_classes) if pcfg.num_classes else nn.Identity()  # 0: features
        self.freeze_backbone()

    def _init_backbone(self):  # only matters without a checkpoint
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- what trains ---------------------------------------------------------
    BACKBONE = ("patch_embed", "cls_token", "reg_token", "pos_embed", "rope_periods", "blocks", "norm")

    def freeze_backbone(self):
        for name, p in self.named_parameters():
            p.requires_grad = not name.startswith(self.BACKBONE)
        return self

    def backbone_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.BACKBONE)}

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def prompt_state_dict(self):
        """Everything that training changes: prompts, deep_prompts, gate_logits, temperatures, head."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.BACKBONE)}

    def load_prompt_state_dict(self, state):
        """Load what prompt_state_dict saved (e.g. trained prompts onto a freshly loaded backbone); every key
        must be there with its shape. Temperatures are projected into TEMPERATURE_RANGE."""
        return load_exactly(self, self.prompt_state_dict(), state).project_temperatures()

    def store_frozen_weights(self, dtype):
        """Keep the frozen Linear and patch-embedding weights and biases in `dtype` (bf16 under bf16 autocast:
        the matmuls see exactly the same inputs, with half the memory and no cast per step). LayerNorms, the
        position embedding and everything trainable stay fp32."""
        for module in [self.patch_embed.proj, *(m for m in self.blocks.modules() if isinstance(m, nn.Linear))]:
            module.to(dtype)
        return self

    def train(self, mode=True):
        super().train(mode)
        for name in ("patch_embed", "blocks", "norm"):  # the frozen backbone always runs in eval mode
            getattr(self, name).train(False)
        return self

    # --- gates and temperatures, Eq. 6-11 (the math is in the functions below the class) ---------
    def gates(self):
        """g_1 .. g_{L-1} (Eq. 6); hard gates sample Gumbel-sigmoid while training."""
        if self.pcfg.gates == "hard":
            return hard_gates(at_least_fp32(self.gate_logits), sample=self.training)
        return torch.sigmoid(at_least_fp32(self.gate_logits))

    @torch.no_grad()
    def aggregation_weights(self):
        return gate_aggregation_weights(self._gates_or_error("aggregation_weights"), self.pcfg.insert_at)

    @torch.no_grad()
    def selection_ratio(self):
        return gate_selection_ratio(self._gates_or_error("selection_ratio"), self.pcfg.insert_at)

    def _gates_or_error(self, what):
        if self.gate_logits is None:
            method = next((name for name, spec in METHODS.items() if spec == (
                self.pcfg.prompt, self.pcfg.gates, self.pcfg.learn_temperature)), "of this model")
            gated = ", ".join(name for name, spec in METHODS.items() if spec[1] != "none")
            raise ValueError(f"{what}(): method {method!r} has no gates (the gated methods: {gated})")
        return self.gates()

    @torch.no_grad()
    def project_temperatures(self):
        """Projected SGD for Eq. 9: clamp each stored tau into TEMPERATURE_RANGE. Call it after every
        optimizer.step() (project_temperatures(model) does it for every ViT inside a wrapper). The official code
        clamps the stored value before every forward: the same iterates, while the forward itself stays pure
        (two forwards before one backward work). A clamp inside the graph would zero a tau's gradient outside
        the range."""
        if self.temperatures is not None:
            self.temperatures.clamp_(*TEMPERATURE_RANGE)
        return self

    # --- forward ---------------------------------------------------------------
    def grid(self, images):
        """The patch grid (H / p, W / p) of [B, 3, H, W] images."""
        H, W, p = images.shape[-2], images.shape[-1], self.cfg.patch_size
        if H % p or W % p or H < p or W < p:
            raise ValueError(f"images of {H}x{W} px: height and width must be positive multiples of the patch "
                             f"size {p}")
        return H // p, W // p

    def embed(self, images):
        """Eq. 1: [B, 3, H, W] -> [B, 1 + R + N, D]: CLS, the R registers, the N patch tokens plus their positions
        (the stored grid resized to this input's; none with RoPE, see rope), in the patch embedding's dtype (bf16
        under autocast)."""
        grid = self.grid(images)
        x = self.patch_embed(images)
        cls = self.cls_token
        if self.pos_embed is not None:
            pos = resize_pos_embed(self.pos_embed, grid, self.cfg.pos_embed_interpolation)
            x, cls = x + pos[:, 1:].to(x.dtype), cls + pos[:, :1]
        prefix = [cls.to(x.dtype).expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.to(x.dtype).expand(x.shape[0], -1, -1))
        return torch.cat([*prefix, x], dim=1)

    def rope(self, images):
        """DINOv3: (sin, cos) [N, head_dim] rotating the patch tokens' queries and keys in every block; None
        without RoPE."""
        return None if self.rope_periods is None else rope_sincos(self.rope_periods, self.grid(images))

    def batch_prompts(self, prompts, batch):
        """[P, D] -> [B, P, D], then dropout: every image draws its own mask (the official code expands the
        prompts to the batch before its dropout)."""
        return self.prompt_dropout(prompts.reshape(1, -1, prompts.shape[-1]).expand(batch, -1, -1))

    def prompt_plan(self, batch):
        """This model's prompt side for a batch, one PromptStep per block: its prompts written at insert_at
        (Eq. 4) and, for VPT-deep, fresh ones before every later block (Eq. 5); gates after blocks
        insert_at..L-1 (Eq. 6-7; the last block is ungated); temperatures (Eq. 9). The same for every image but
        the prompt dropout mask."""
        k, L = self.pcfg.insert_at, len(self.blocks)
        gates = self.gates() if self.gate_logits is not None else None
        plan = []
        for l in range(1, L + 1):
            write = None
            if self.prompts is not None and l == k:
                write = self.batch_prompts(self.prompts[0], batch)
            elif self.deep_prompts is not None and l > k:
                write = self.batch_prompts(self.deep_prompts[l - k - 1], batch)
            plan.append(PromptStep(write=write, tau=None if self.temperatures is None else self.temperatures[l - 1],
                                   gate=gates[l - 1] if gates is not None and k <= l < L else None))
        return plan

    def run_blocks(self, images, plan=None, blocks=(), attention=False, stop_early=False):
        """The block loop: Eq. 1, then Eq. 2 block by block with the prompt side `plan` (one PromptStep per
        block: prompt_plan's, MultiTask's; None: the frozen backbone alone). Returns (the tokens after the last
        block run [B, T, D], {block l: the tokens after it [B, T, D]}, or with attention=True {block l: its
        softmax attention [B, heads, T, T]}). stop_early: stop after the last of `blocks`. Changes no parameter
        or buffer."""
        self._check_blocks(blocks, "blocks")
        x, rope = self.embed(images), self.rope(images)
        B, P, found = x.shape[0], 0, {}
        plan = plan or [PromptStep()] * len(self.blocks)
        for i, blk in enumerate(self.blocks):
            l, step = i + 1, plan[i]
            cls, prompts, rest = x[:, :1], x[:, 1:1 + P], x[:, 1 + P:]   # prompts: Z_P^{l-1}, block l's input
            if step.write is not None:   # Eq. 4 where the P slots appear right after CLS, Eq. 5 where they exist
                new = step.write.to(x.dtype).expand(B, -1, -1)
                if step.write_rows is not None:
                    new = torch.where(step.write_rows, new, prompts if P else torch.zeros_like(new))
                prompts, P = new, new.shape[1]
                x = torch.cat([cls, prompts, rest], dim=1)
            mask = None if step.live is None else key_mask(step.live, x.shape[1])
            if attention and l in blocks:
                found[l] = blk.attn.probabilities(blk.norm1(x), step.tau, mask, rope)
            x = blk(x, step.tau, mask, rope)   # Eq. 2 (Eq. 3 with Eq. 9's tau inside)
            if step.gate is not None:    # x[:, 1:1 + P] is Z~_P^l; the mix is computed in at least fp32
                g, out = step.gate, at_least_fp32(x[:, 1:1 + P])
                mixed = g * out + (1 - g) * at_least_fp32(prompts)   # Eq. 7: Z_P^l = g Z~_P^l + (1 - g) Z_P^{l-1}
                x = torch.cat([x[:, :1], mixed.to(x.dtype), x[:, 1 + P:]], dim=1)
            if l in blocks and not attention:
                found[l] = x
            if stop_early and l == max(blocks, default=0):
                break
        return x, found

    def forward_intermediates(self, images, blocks=(), attention=False, stop_early=False):
        """(the tokens after block L [B, T, D], {block l: the tokens after it}) with this model's prompts, or with
        attention=True {block l: its softmax attention [B, heads, T, T]}. Blocks are numbered 1..L."""
        return self.run_blocks(images, self.prompt_plan(len(images)), blocks, attention, stop_early)

    def pool(self, x, live=None):
        """The last block's tokens -> features [B, D]. "cls": norm, then CLS (MoCo v3, DINO, DINOv2/3, DeiT);
        "mean": the mean over every token but CLS (prompts included, a row's dead slots not: live [B, P]), then
        norm (MAE)."""
        if self.cfg.pool == "cls":
            return self.norm(x)[:, 0]
        if live is None:
            return self.norm(x[:, 1:].mean(dim=1))
        h = at_least_fp32(x[:, 1:])
        keep = key_mask(live, x.shape[1]).view(x.shape[0], -1, 1)[:, 1:].to(h.dtype)
        return self.norm(((h * keep).sum(1) / keep.sum(1)).to(x.dtype))

    def forward_features(self, images):
        plan = self.prompt_plan(len(images))
        return self.pool(self.run_blocks(images, plan)[0], plan[-1].live)

    def forward(self, images):
        return self.head(self.forward_features(images))

    @torch.no_grad()
    def attention_maps(self, images, blocks=(3, 7, 12)):
        """{block: [B, heads, T, T]} softmax attention (T = 1 + prompts + registers + patches), for Figure 5;
        blocks are numbered 1..L."""
        return self.forward_intermediates(images, tuple(blocks), attention=True)[1]

    def _check_blocks(self, blocks, what):
        bad = [b for b in blocks if b not in range(1, len(self.blocks) + 1)]
        if bad:
            raise ValueError(f"{what}={tuple(blocks)}: blocks are numbered 1..{len(self.blocks)}, got {bad}")

    def save_pack(self, path, class_names=None, ssl=None, **info):
        """This model's trained prompt side as a prompt pack file (see save_pack below)."""
        return save_pack(self, path, class_names, ssl, **info)


def load_exactly(module, expected, state):
    """Copy `state` into the entries `expected` (a subset of module.state_dict()) names: a ValueError on any
    missing, unexpected or mis-shaped key."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"missing {missing}, unexpected {unexpected}, wrong shapes {wrong}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])
    return module


def classification_head(dim, num_classes):
    """The official head: one Linear, weight kaiming_normal_(mode="fan_out") (std sqrt(2 / num_classes)),
    bias -log((1 - 0.01) / 0.01) = -4.595 (VPT's MLP head with special_bias=True). With weight decay 0 this
    initialisation persists through training."""
    head = nn.Linear(dim, num_classes)
    nn.init.kaiming_normal_(head.weight, mode="fan_out")
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    return head

# -----------------------------------------------------------------------------
# Gates and temperatures: Eq. 6 (hard variant of Table 4), Eq. 8, 10, 11, and Eq. 9's projection


def hard_gates(gate_logits, sample):
    """Table 4: binary gates. Training: Gumbel-sigmoid sample, straight-through gradient; eval: threshold."""
    if not sample:
        return (gate_logits > 0).float()
    u = torch.rand_like(gate_logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid(gate_logits + torch.log(u) - torch.log1p(-u))  # logistic noise = Gumbel - Gumbel
    return (soft > 0.5).float() + (soft - soft.detach())  # forward value exactly binary


def gate_aggregation_weights(gates, insert_at=1):
    """Eq. 8: Z_P^{L-1} = w_P * P + sum_l g~_l Z~_P^l. Returns (w_P, g~ [L-1]); g~_l = 0 before insert_at."""
    g = gates.detach().cpu().double()
    g_tilde = torch.zeros_like(g)
    keep = torch.ones((), dtype=torch.float64)  # prod_{m>l} (1 - g_m), from the last gated block down
    for l in reversed(range(insert_at - 1, len(g))):
        g_tilde[l] = g[l] * keep                 # Eq. 10
        keep = keep * (1 - g[l])
    return keep, g_tilde


def gate_selection_ratio(gates, insert_at=1):
    """Eq. 11: r_l = g~_l / sum_m g~_m, blocks 1..L-1. When no block contributes (every gate closed, as hard
    gates are at init, or insert_at = L so that no block is gated), the prompts reach block L unchanged and every
    r_l is 0 (instead of 0/0)."""
    _, g_tilde = gate_aggregation_weights(gates, insert_at)
    total = g_tilde.sum()
    return (g_tilde / total if total > 0 else torch.zeros_like(g_tilde)).float()


def project_temperatures(model):
    """Clamp the temperatures of every VisionTransformer inside `model` (a wrapper, DDP, a compiled module) into
    TEMPERATURE_RANGE: call it right after each optimizer.step() (projected SGD, as the official code)."""
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            module.project_temperatures()
    return model


def param_groups(model, weight_decay):
    """The trainable parameters of `model` (a VisionTransformer or a module holding some) as optimizer groups:
    weight decay on prompts and weight matrices, none on gate logits, temperatures, biases (every 0- or 1-d
    tensor). Decay pulls what it touches toward 0 with no gradient asking for it: with AdamW (lr 1e-3, decay
    0.05) 2,000 steps take a tau of 1 to 0.905 and open closed gates. The paper trains with SGD and no decay.

        opt = torch.optim.AdamW(gp.param_groups(model, weight_decay=0.05), lr=1e-3)"""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

# -----------------------------------------------------------------------------
# One call: architecture, pretraining, method, checkpoint


def build_model(arch="vit_base", ssl="mae", method="gated+temp", num_classes=1000, checkpoint=None,
                img_size=224, vit_overrides=None, verbose=False, trust_pickle=False, **prompt_overrides):
    """Architecture + what the pretraining fixes (pooling, patch, LayerScale) + method (+ checkpoint, whose
    register-token count and position grid it reads), backbone frozen. img_size is the default input size only:
    the model runs on any multiple of the patch size and stores the checkpoint's own position grid, so models
    built at different sizes share state dicts and packs. vit_overrides: other ViTConfig fields (e.g.
    pos_embed_interpolation, or a small width for tests). trust_pickle: see read_checkpoint."""
    vit = dict(vit_overrides or {})
    raw, name = None, None
    if checkpoint is not None:
        raw, name = open_checkpoint(checkpoint, trust_pickle)
        for field, value in checkpoint_layout(raw, name).items():
            vit.setdefault(field, value)
    model = VisionTransformer(vit_config(arch, ssl, img_size=img_size, **vit),
                              prompt_config(method, num_classes=num_classes, **prompt_overrides))
    if raw is not None:
        report = load_backbone(model, raw, name=name)
        if verbose:
            print(report)
    return model

# -----------------------------------------------------------------------------
# Checkpoints: each format's names -> ours. "{i}" is the block index; a tuple of sources is
# concatenated (q, k, v -> qkv). Every backbone key must be found with the right shape, except what a
# format does not store: ZEROS (a zero bias, or its zero part) and COMPUTED (DINOv3's RoPE periods,
# computed from the config as timm does).

ZEROS, COMPUTED = "<not stored: zeros>", "<not stored: computed from the config>"


def _hf_table(layer, q, k, v, attn_out, fc1, fc2, norm1, norm2):
    return {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.{p}": "embeddings.patch_embeddings.projection.{p}",
        "blocks.{i}.norm1.{p}": f"{layer}.{norm1}.{{p}}",
        "blocks.{i}.attn.qkv.{p}": tuple(f"{layer}.{name}.{{p}}" for name in (q, k, v)),
        "blocks.{i}.attn.proj.{p}": f"{layer}.{attn_out}.{{p}}",
        "blocks.{i}.norm2.{p}": f"{layer}.{norm2}.{{p}}",
        "blocks.{i}.mlp.fc1.{p}": f"{layer}.{fc1}.{{p}}",
        "blocks.{i}.mlp.fc2.{p}": f"{layer}.{fc2}.{{p}}",
        "norm.{p}": "layernorm.{p}",
    }


_NPZ_BLOCK, QKV = "Transformer/encoderblock_{i}", ("query", "key", "value")
NAME_TABLES = {  # a name a table does not list is read unchanged
    "timm": {},  # our names are timm's: MAE .pth, MoCo v3 .pth.tar and DINO files (after the prefix), DeiT, timm
    "dinov2": {"reg_token": "register_tokens"},  # the official DINOv2 hub files (their mask_token is dropped)
    # the official DINOv3 release files (mask_token dropped; the qkv bias is stored with a bias_mask that zeroes
    # its K third, applied by convert_state_dict), and timm's Eva state dicts of them (_qkvb: q and v biases)
    "dinov3": {"reg_token": "storage_tokens", "rope_periods": "rope_embed.periods"},
    "timm-dinov3": {"blocks.{i}.ls1.gamma": "blocks.{i}.gamma_1", "blocks.{i}.ls2.gamma": "blocks.{i}.gamma_2",
                    "blocks.{i}.attn.qkv.bias": ZEROS, "rope_periods": COMPUTED},
    "timm-dinov3-qkvb": {"blocks.{i}.ls1.gamma": "blocks.{i}.gamma_1", "blocks.{i}.ls2.gamma": "blocks.{i}.gamma_2",
                         "blocks.{i}.attn.qkv.bias": ("blocks.{i}.attn.q_bias", ZEROS, "blocks.{i}.attn.v_bias"),
                         "rope_periods": COMPUTED},
    "hf-dinov2": {**_hf_table("encoder.layer.{i}", "attention.attention.query", "attention.attention.key",
                              "attention.attention.value", "attention.output.dense", "mlp.fc1", "mlp.fc2",
                              "norm1", "norm2"),
                  "blocks.{i}.ls1.gamma": "encoder.layer.{i}.layer_scale1.lambda1",
                  "blocks.{i}.ls2.gamma": "encoder.layer.{i}.layer_scale2.lambda1",
                  "reg_token": "embeddings.register_tokens"},   # Dinov2Model, Dinov2WithRegistersModel
    "hf": _hf_table("encoder.layer.{i}", "attention.attention.query", "attention.attention.key",
                    "attention.attention.value", "attention.output.dense", "intermediate.dense",
                    "output.dense", "layernorm_before", "layernorm_after"),
    "hf-v5": _hf_table("layers.{i}", "attention.q_proj", "attention.k_proj", "attention.v_proj",
                       "attention.o_proj", "mlp.fc1", "mlp.fc2", "layernorm_before", "layernorm_after"),
    "npz": {  # Google big_vision / vit_jax: HWIO conv, [in, out] dense, q/k/v [D, H, Dh], out [H, Dh, D]
        "cls_token": "cls",
        "pos_embed": "Transformer/posembed_input/pos_embedding",
        "patch_embed.proj.weight": "embedding/kernel",
        "patch_embed.proj.bias": "embedding/bias",
        "blocks.{i}.norm1.weight": _NPZ_BLOCK + "/LayerNorm_0/scale",
        "blocks.{i}.norm1.bias": _NPZ_BLOCK + "/LayerNorm_0/bias",
        "blocks.{i}.attn.qkv.weight": tuple(_NPZ_BLOCK + f"/MultiHeadDotProductAttention_1/{n}/kernel" for n in QKV),
        "blocks.{i}.attn.qkv.bias": tuple(_NPZ_BLOCK + f"/MultiHeadDotProductAttention_1/{n}/bias" for n in QKV),
        "blocks.{i}.attn.proj.weight": _NPZ_BLOCK + "/MultiHeadDotProductAttention_1/out/kernel",
        "blocks.{i}.attn.proj.bias": _NPZ_BLOCK + "/MultiHeadDotProductAttention_1/out/bias",
        "blocks.{i}.norm2.weight": _NPZ_BLOCK + "/LayerNorm_2/scale",
        "blocks.{i}.norm2.bias": _NPZ_BLOCK + "/LayerNorm_2/bias",
        "blocks.{i}.mlp.fc1.weight": _NPZ_BLOCK + "/MlpBlock_3/Dense_0/kernel",
        "blocks.{i}.mlp.fc1.bias": _NPZ_BLOCK + "/MlpBlock_3/Dense_0/bias",
        "blocks.{i}.mlp.fc2.weight": _NPZ_BLOCK + "/MlpBlock_3/Dense_1/kernel",
        "blocks.{i}.mlp.fc2.bias": _NPZ_BLOCK + "/MlpBlock_3/Dense_1/bias",
        "norm.weight": "Transformer/encoder_norm/scale",
        "norm.bias": "Transformer/encoder_norm/bias",
    },
}
# keys that are not backbone: dropped and reported (decoders, projectors, momentum encoders, heads)
IRRELEVANT = ("decoder", "mask_token", "head", "fc_norm", "pre_logits", "pooler", "classifier",
              "momentum_encoder", "predictor", "local_cls_norm")


class CheckpointError(ValueError):
    pass


class PickledCodeError(CheckpointError):
    """A checkpoint whose unpickling would run code other than the allowed extras (read_checkpoint's trust_pickle)."""


def _npz_to_torch(ours, arrays, embed_dim):
    """Layout changes from flax to torch for one of our keys (arrays: the sources, in table order)."""
    t = [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays]
    if ours == "patch_embed.proj.weight":
        return t[0].permute(3, 2, 0, 1)                            # HWIO -> OIHW
    if ours.endswith("attn.qkv.weight"):
        return torch.cat([a.reshape(embed_dim, -1).T for a in t])  # [D,H,Dh] -> [H*Dh, D]
    if ours.endswith("attn.qkv.bias"):
        return torch.cat([a.reshape(-1) for a in t])
    if ours.endswith("attn.proj.weight"):
        return t[0].reshape(-1, embed_dim).T                       # [H,Dh,D] -> [D, H*Dh]
    if ours.endswith(("fc1.weight", "fc2.weight")):
        return t[0].T                                              # [in, out] -> [out, in]
    return t[0]


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_safetensors(path):
    """Hugging Face model.safetensors: 8-byte header length, JSON header, raw little-endian data."""
    import json
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        out[name] = torch.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"]).clone()
    return out


def _safe_globals():
    """What real checkpoints pickle besides tensors and containers, allowed without running code: the training
    arguments (argparse.Namespace in MAE / DINO / DeiT training files) and numpy scalars (e.g. a stored metric)."""
    import argparse
    try:
        from numpy._core.multiarray import scalar   # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [argparse.Namespace, np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar"), *dtypes]


def read_checkpoint(path, trust_pickle=False):
    """Open a .pth / .pth.tar / .bin torch file, a .safetensors or a Google .npz (or the weights file of a Hugging
    Face model folder); returns (raw dict, "npz" or None).
    Torch files are unpickled with weights_only=True plus _safe_globals(): loading runs no code from the file.
    A file that pickles anything else is a CheckpointError naming the type; trust_pickle=True unpickles it in
    full (which runs whatever code the file carries: only for files you trust)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = weights_in_folder(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(64)
    # torch files are zip archives (or, before torch 1.6, pickles: protocol byte 0x80), npz is a zip,
    # safetensors starts with an 8-byte header length and then '{'
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or head[8:9] == b"{"):
        looks = "an HTML page (a failed download?)" if b"<" in head[:16] and b"html" in head.lower() else \
            "text" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "no known format"
        raise CheckpointError(f"{path} is not a checkpoint file: it is {looks} (first bytes {head[:24]!r}); "
                              "expected a .pth/.pth.tar/.bin torch file, .safetensors or .npz")
    try:
        if path.endswith(".safetensors"):
            return _read_safetensors(path), None
        if zipfile.is_zipfile(path) and not any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist()):
            with np.load(path) as npz:
                raw, fmt = {k: npz[k] for k in npz.files}, "npz"
        elif trust_pickle:
            raw, fmt = torch.load(path, map_location="cpu", weights_only=False), None
        else:   # torch < 2.5 has no safe_globals: extras then fail with a CheckpointError naming them
            allow = getattr(torch.serialization, "safe_globals", lambda _: contextlib.nullcontext())
            with allow(_safe_globals()):
                raw, fmt = torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):
            raise CheckpointError(f"{path}: not a readable checkpoint: {type(e).__name__}: {str(e)[:200]}") from None
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        raise PickledCodeError(f"{path}: the file pickles {', '.join(names)}, which loading would have to run; "
                              "refused. Only if you trust the file: trust_pickle=True (read_checkpoint, "
                              "load_backbone, build_model)") from None
    except Exception as e:  # truncated, not a checkpoint, text file, ...
        raise CheckpointError(f"{path}: not a readable checkpoint (expected a .pth/.pth.tar/.bin torch file, "
                              f".safetensors or .npz): {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(raw).__name__}")
    return raw, fmt


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")   # what a Hugging Face model folder keeps its weights in


def weights_in_folder(folder):
    """The weights file of a Hugging Face model folder (save_pretrained, a hub snapshot); a CheckpointError says
    what the folder holds instead."""
    found = [name for name in HF_WEIGHTS if os.path.isfile(os.path.join(folder, name))]
    if found:
        return os.path.join(folder, found[0])
    files = sorted(os.listdir(folder))
    sharded = [f for f in files if f.endswith(".index.json")]
    raise CheckpointError(f"{folder} is a folder, not a checkpoint file, and holds no {' or '.join(HF_WEIGHTS)}" + (
        f" but a sharded checkpoint ({sharded[0]}): pass one merged weights file" if sharded else
        f" (it holds: {', '.join(files[:8]) or 'nothing'}): pass the weights file itself"))


def open_checkpoint(checkpoint, trust_pickle=False):
    """(raw dict, name for messages) of a path (a file, or a Hugging Face model folder: its weights file) or of
    an already-loaded state dict."""
    if isinstance(checkpoint, dict):
        return checkpoint, "<state dict>"
    path = weights_in_folder(checkpoint) if os.path.isdir(checkpoint) else os.fspath(checkpoint)
    return read_checkpoint(path, trust_pickle)[0], path


def detect_format(raw, name="<state dict>"):
    """Unwrap and name the layout of a raw checkpoint dict; returns (state dict, format, key prefix)."""
    for prefix in ("", "opt/target/"):  # big_vision files keep the params under opt/target/
        if f"{prefix}Transformer/encoder_norm/scale" in raw:
            return raw, "npz (Google ViT)", prefix
    # MAE, DeiT: {'model': sd}; MoCo v3: {'state_dict': sd, ...}; DINO training files: {'teacher': sd, ...}
    for wrapper in ("model", "state_dict", "teacher"):
        if isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    keys = list(raw)
    dinov3 = "storage_tokens" in raw or "blocks.0.gamma_1" in raw
    swiglu = [k for k in keys if k.endswith(("mlp.w12.weight", "mlp.weights_in.weight", "mlp.w1.weight",
                                             "mlp.fc1_g.weight"))]
    if swiglu and dinov3:
        width = np.shape(raw.get("cls_token", np.zeros(0)))[-1]
        variant = {384: "ViT-S+/16", 1280: "ViT-H+/16", 4096: "ViT-7B/16"}.get(width, f"{width}-wide ViT")
        raise CheckpointError(f"{name}: DINOv3 {variant} (SwiGLU MLP, {swiglu[0]}) is not supported; DINOv3 "
                              "ViT-S/16, B/16 and L/16 are")
    if swiglu:
        raise CheckpointError(f"{name}: ViT-g/14 (DINOv2's SwiGLU MLP, {swiglu[0]}) is not supported")
    for prefix, fmt in (("module.base_encoder.", "MoCo v3 pretrain"), ("module.", "MoCo v3 linear-probe / DDP"),
                        ("backbone.", "DINO training checkpoint (teacher)"), ("", "timm / MAE")):
        if f"{prefix}blocks.0.attn.qkv.weight" in raw:
            if "storage_tokens" in raw:
                fmt = "DINOv3 (official)"
            elif "blocks.0.gamma_1" in raw:
                fmt = "timm DINOv3" + (" (_qkvb)" if "blocks.0.attn.q_bias" in raw else "")
            elif "register_tokens" in raw or ("mask_token" in raw and "blocks.0.ls1.gamma" in raw):
                fmt = "DINOv2 (official)"
            return raw, fmt, prefix
    for fmt, probe in (("Hugging Face DINOv2", "encoder.layer.0.layer_scale1.lambda1"),
                       ("Hugging Face ViT", "encoder.layer.0.attention.attention.query.weight"),
                       ("Hugging Face ViT (transformers 5)", "layers.0.attention.q_proj.weight")):
        hit = [k for k in keys if k.endswith(probe)]
        if hit:
            return raw, fmt, hit[0][: -len(probe)]
    raise CheckpointError(f"{name}: no ViT backbone keys of a known format (MAE, MoCo v3, DINO, DINOv2, DINOv3, "
                          f"timm, Hugging Face, Google npz); first keys: {keys[:8]}")


FORMAT_TABLES = {"npz (Google ViT)": "npz", "Hugging Face ViT (transformers 5)": "hf-v5", "Hugging Face ViT": "hf",
                 "Hugging Face DINOv2": "hf-dinov2", "DINOv2 (official)": "dinov2", "DINOv3 (official)": "dinov3",
                 "timm DINOv3": "timm-dinov3", "timm DINOv3 (_qkvb)": "timm-dinov3-qkvb"}   # any other: "timm"


def _table_for(fmt):
    return NAME_TABLES[FORMAT_TABLES.get(fmt, "timm")]


def checkpoint_layout(raw, name="<state dict>"):
    """The ViTConfig fields a checkpoint fixes beyond its architecture, for build_model: num_reg_tokens (timm
    `reg_token`, DINOv2 `register_tokens`, HF `embeddings.register_tokens`: [1, R, D] -> R) and pos_grid (the side
    of its stored position grid; CLS entry or not)."""
    sd, fmt, prefix = detect_format(raw, name)
    table = _table_for(fmt)
    found = {}
    for ours, field in (("reg_token", "num_reg_tokens"), ("pos_embed", "pos_grid")):
        tensor = sd.get(prefix + table.get(ours, ours))
        if tensor is not None:
            shape = np.shape(tensor)
            found[field] = shape[-2] if ours == "reg_token" else math.isqrt(shape[-2])
    found.setdefault("num_reg_tokens", 0)
    return found


def convert_state_dict(raw, fmt, prefix, model):
    """Map a raw checkpoint onto our backbone names. Returns (state dict, missing, used source keys)."""
    table = _table_for(fmt)
    converted, missing, used = {}, [], set()
    for ours, target in model.backbone_state_dict().items():
        parts = ours.split(".")
        i = parts[1] if parts[0] == "blocks" else None
        p = parts[-1]
        template = next((t for t in table if t.format(i=i, p=p) == ours), None)
        src = table[template] if template else ours
        if src in (ZEROS, COMPUTED):
            converted[ours] = torch.zeros(target.shape) if src == ZEROS else rope_periods(model.cfg)
            continue
        sources = tuple(s if s == ZEROS else prefix + s.format(i=i, p=p)
                        for s in (src if isinstance(src, tuple) else (src,)))
        stored = [s for s in sources if s != ZEROS]
        if not all(s in raw for s in stored):
            missing.append(f"{ours} (from {', '.join(s for s in stored if s not in raw)})")
            continue
        used.update(stored)
        if fmt.startswith("npz"):
            converted[ours] = _npz_to_torch(ours, [raw[s] for s in sources], model.cfg.embed_dim)
        else:
            part = torch.as_tensor(raw[stored[0]])
            tensors = [torch.zeros_like(part) if s == ZEROS else torch.as_tensor(raw[s]) for s in sources]
            converted[ours] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        mask = f"{prefix}blocks.{i}.attn.qkv.bias_mask"
        if fmt == "DINOv3 (official)" and ours.endswith("qkv.bias") and mask in raw:   # their LinearKMaskedBias
            converted[ours] = converted[ours] * torch.as_tensor(raw[mask])
            used.add(mask)
        if ours in ("cls_token", "pos_embed") and converted[ours].dim() == 2:
            converted[ours] = converted[ours][None]
        n = converted[ours].shape[1] if ours == "pos_embed" else 0
        if n > 1 and math.isqrt(n) ** 2 == n:  # no CLS entry (timm _reg4_: CLS position folded into cls_token)
            converted[ours] = torch.cat([converted[ours][:, :1] * 0, converted[ours]], dim=1)
    return converted, missing, used


def _guess_arch(raw, fmt, prefix):
    """The architecture a checkpoint holds, read through its format's table: width and patch from the patch
    embedding (torch OIHW, Google HWIO), depth from the block indices."""
    table = _table_for(fmt)
    patch_key = table.get("patch_embed.proj.{p}", table.get("patch_embed.proj.weight", "patch_embed.proj.{p}"))
    block_key = table.get("blocks.{i}.norm1.{p}", table.get("blocks.{i}.norm1.weight", "blocks.{i}.norm1.{p}"))
    w = raw.get(prefix + patch_key.format(p="weight"))
    if w is None:
        return "unknown"
    shape = np.shape(w)
    width, patch = (shape[-1], shape[0]) if fmt.startswith("npz") else (shape[0], shape[-1])
    pattern = re.escape(prefix + block_key.replace("{p}", "weight")).replace(re.escape("{i}"), r"(\d+)")
    depth = 1 + max((int(m.group(1)) for m in map(re.compile(pattern).fullmatch, raw) if m), default=-1)
    for name, (arch_patch, dim, d, _) in ARCHS.items():
        if (dim, d) == (width, depth):
            return name + ("" if patch == arch_patch else f" with patch {patch}")
    return f"ViT with width {width}, depth {depth}, patch {patch}"


def _summarise(keys, shown=6):
    """The first few keys, plus which block indices are involved (e.g. a deeper checkpoint's extra blocks)."""
    blocks = sorted({int(k.split(".")[i + 1]) for k in keys for i, part in enumerate(k.split(".")[:-1])
                     if part in ("blocks", "layer", "layers") and k.split(".")[i + 1].isdigit()})
    text = "; ".join(keys[:shown]) + (" ..." if len(keys) > shown else "")
    return text + (f" [blocks {blocks[0]}-{blocks[-1]}]" if blocks else "")


def load_backbone(model, checkpoint, trust_pickle=False, name=None):
    """Load a backbone from a path (or an already-loaded state dict in any format below) into `model`.
    Detects: MAE .pth, MoCo v3 linear-probe / pretrain .pth.tar, DINO (plain and training checkpoints: the
    teacher), DINOv2 hub files, timm state dicts (DeiT, DINO, DINOv2 and _reg4_ included), Hugging Face ViT /
    ViTMAE / DINOv2 (hub names and transformers 5 ViT names), Google .npz. Returns a one-paragraph report;
    raises CheckpointError on anything missing or of the wrong shape. The stored pos_embed is always used:
    build_model makes the model's grid the file's; a model built with another grid gets it resized to its own.
    trust_pickle: see read_checkpoint."""
    raw, opened_name = open_checkpoint(checkpoint, trust_pickle)
    name = name or opened_name
    raw, fmt, prefix = detect_format(raw, name)
    sd, missing, used = convert_state_dict(raw, fmt, prefix, model)
    target = model.backbone_state_dict()
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape \
            and sd["pos_embed"].shape[-1] == target["pos_embed"].shape[-1]:
        grid = math.isqrt(target["pos_embed"].shape[1] - 1)
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], (grid, grid), model.cfg.pos_embed_interpolation)
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
             for k, v in sd.items() if v.shape != target[k].shape]
    extra = [k for k in raw if k not in used]
    dropped = [k for k in extra if any(s in k for s in IRRELEVANT)]
    unknown = [k for k in extra if k not in dropped]
    if missing or wrong or unknown:
        lines = [f"{name}: cannot load as {model.cfg.embed_dim}-wide, {model.cfg.depth}-block "
                 f"ViT/{model.cfg.patch_size} (detected format: {fmt}; checkpoint looks like: "
                 f"{_guess_arch(raw, fmt, prefix)})"]
        for label, keys in (("missing backbone keys", missing), ("wrong shapes", wrong),
                            ("unexpected backbone keys", unknown)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + _summarise(keys))
        if "DINOv3" in fmt and model.cfg.pos_embed != "rope":
            lines.append("  a DINOv3 file (RoPE, no position table): build the model with ssl='dinov3'")
        registers = checkpoint_layout(raw, name)["num_reg_tokens"]
        if registers != model.cfg.num_reg_tokens:
            lines.append(f"  the file has {registers} register tokens, the model {model.cfg.num_reg_tokens}: "
                         f"build_model(..., checkpoint=...) reads the count, or set num_reg_tokens={registers}")
        if any(k.startswith("norm.") for k in missing) and any(k.startswith(prefix + "fc_norm.") for k in raw):
            lines.append("  the file has fc_norm.* and no norm.*: a classifier fine-tuned with global pooling "
                         "(timm / MAE global_pool), whose final norm is fc_norm after the pooling; load the "
                         "pretrained backbone file instead")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for k, v in sd.items():
            target[k].copy_(v)   # state_dict() tensors share the parameters' and buffers' storage
    model.backbone_file = None if name == "<state dict>" else os.path.basename(name)
    kinds = sorted({next(s for s in IRRELEVANT if s in k) for k in dropped})
    return (f"loaded {len(sd)} backbone tensors from {name} ({fmt}); "
            f"dropped {len(dropped)} non-backbone keys ({', '.join(kinds) or 'none'})")

# -----------------------------------------------------------------------------
# Prompt packs and many tasks in one batch: the method's practical payoff. One frozen backbone serves every
# task; a task is a file of a few hundred thousand numbers (prompts, gates, temperatures, head) that says
# which backbone and settings it belongs to and how its images are prepared.

PACK_FORMAT, PACK_VERSION = "gated-prompt-pack", 2


def backbone_fingerprint(model):
    """"sha256:<hex>" over the backbone's tensors (a VisionTransformer's, or a state dict in our names): names,
    shapes and values rounded to bf16, in sorted name order. The same weights give the same fingerprint
    whatever file format they came from, whatever img_size the model was built for, and also when their frozen
    weights are stored in bf16 on a GPU."""
    state = model.backbone_state_dict() if isinstance(model, VisionTransformer) else model
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.bfloat16).contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _plain(value, where):
    """`value` as data torch.load(weights_only=True) reads: numpy / torch scalars become numbers, paths strings,
    tuples lists; anything else is a TypeError naming `where`."""
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        value = value.item()
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, numbers.Integral, numbers.Real)):   # bool before int, int before float
        return bool(value) if isinstance(value, bool) else int(value) if isinstance(value, numbers.Integral) \
            else float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"save_pack: {where} is {type(value).__name__} {str(value)[:40]!r}; a pack holds numbers, "
                    "strings, paths, lists and dicts with string keys (numpy / torch scalars are converted)")


def default_preprocess(cfg):
    """The input transform a pack records unless told otherwise: resize the shorter side to size * 256 / 224,
    center-crop size x size (size = the model's img_size), ImageNet mean / std (the FGVC evaluation transform)."""
    return {"size": cfg.img_size, "resize": cfg.img_size * 256 // 224, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD)}


def save_pack(model, path, class_names=None, ssl=None, preprocess=None, backbone_url=None, **info):
    """Write the trained prompt side of `model` as a prompt pack: plain tensors, numbers, strings, lists and
    dicts only, so torch.load(path, weights_only=True) reads it and no code runs. Fields: see read_pack.
    ssl: default the model's (vit_config's). preprocess: the input transform, {"size": center crop, "resize":
    shorter side (an int) or [height, width], "mean": [3], "std": [3]}; missing keys from default_preprocess.
    backbone_url: where the backbone file can be downloaded. info: anything else (numbers, strings, paths,
    lists, dicts; numpy / torch scalars are converted)."""
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a list of names, not the string {class_names[:40]!r}")
    if class_names is not None and len(class_names) != model.pcfg.num_classes:
        raise ValueError(f"{len(class_names)} class names for a head of {model.pcfg.num_classes} classes")
    preprocess = _plain(preprocess or {}, "preprocess")
    unknown = sorted(set(preprocess) - set(default_preprocess(model.cfg)))
    if unknown:
        raise ValueError(f"save_pack: preprocess keys {unknown} unknown; expected size, resize, mean, std")
    pack = {"format": PACK_FORMAT, "version": PACK_VERSION,
            "tensors": {k: v.detach().cpu().clone() for k, v in model.prompt_state_dict().items()},
            "vit": asdict(model.cfg), "prompt": asdict(model.pcfg), "ssl": ssl or model.cfg.ssl or None,
            "backbone_fingerprint": backbone_fingerprint(model),
            "backbone_file": model.backbone_file, "backbone_url": _plain(backbone_url, "backbone_url"),
            "preprocess": {**default_preprocess(model.cfg), **preprocess},
            "class_names": None if class_names is None else [str(c) for c in class_names],
            "info": {k: _plain(v, f"info[{k!r}]") for k, v in info.items()}}
    path = os.fspath(path)
    torch.save(pack, path + ".tmp")
    os.replace(path + ".tmp", path)  # readers never see half a file
    return path


# A pack's fields and their types: every one must be there (save_pack writes them all); (X, None): X or None.
PACK_FIELDS = {"format": str, "version": int, "tensors": dict, "vit": dict, "prompt": dict, "ssl": (str, type(None)),
               "backbone_fingerprint": str, "backbone_file": (str, type(None)), "backbone_url": (str, type(None)),
               "preprocess": (dict, type(None)), "class_names": (list, type(None)), "info": dict}
ADDED_IN_VERSION_2 = {"backbone_file": None, "backbone_url": None, "preprocess": None}  # version 1 packs: None


def read_pack(path):
    """The dict save_pack wrote: format, version, tensors (prompt_state_dict), vit (every ViTConfig field), prompt
    (every PromptConfig field), ssl, backbone_fingerprint, backbone_file and backbone_url (or None), preprocess
    (the input transform; None in version 1 packs), class_names (one per class, or None), info (whatever the
    writer added: the harness puts task, recipe, config, metrics, transform, checkpoint). Anything missing or
    of another type is a CheckpointError naming the file and the field."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"prompt pack not found: {path}")
    try:
        with warnings.catch_warnings():   # torch's notes on a foreign pickle: the one line below says it all
            warnings.simplefilter("ignore")
            pack = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of objects, a truncated file, text, ...
        why = ("it pickles Python objects, which a pack never holds (not unpickled: nothing in it ran)"
               if str(e).startswith("Weights only load failed") else "not a file torch.save wrote, or a truncated one")
        raise CheckpointError(f"{path} is not a prompt pack: {why}") from None
    if not isinstance(pack, dict) or pack.get("format") != PACK_FORMAT:
        raw = isinstance(pack, dict) and pack and all(isinstance(v, torch.Tensor) for v in pack.values())
        raise CheckpointError(f"{path} is not a prompt pack" + (
            " (tensors without a pack's settings; a run's .prompts.pt is such a file: load it with "
            "model.load_prompt_state_dict onto a model built with the run's settings)" if raw else ""))
    if pack.get("version") == 1:   # before the fields above and ViTConfig.ssl existed
        pack = {**ADDED_IN_VERSION_2, **pack}
        if isinstance(pack.get("vit"), dict):
            pack["vit"] = {"ssl": pack.get("ssl") or "", **pack["vit"]}
    for field, kind in PACK_FIELDS.items():
        if field not in pack or not isinstance(pack[field], kind) or isinstance(pack[field], bool):
            found = f"{type(pack[field]).__name__} {str(pack[field])[:40]!r}" if field in pack else "missing"
            expected = kind.__name__ if isinstance(kind, type) else f"{kind[0].__name__} or None"
            raise CheckpointError(f"{path}: prompt pack field {field!r} is {found}; expected {expected}")
    if not 1 <= pack["version"] <= PACK_VERSION:
        raise CheckpointError(f"{path}: prompt pack version {pack['version']}; this code reads 1..{PACK_VERSION}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in pack["tensors"].items()):
        raise CheckpointError(f"{path}: prompt pack field 'tensors' must map names to tensors")
    pack["vit"] = asdict(_config(ViTConfig, pack["vit"], path, "vit"))   # pos_grid 0 resolved (version 1)
    classes = _config(PromptConfig, pack["prompt"], path, "prompt").num_classes
    names = pack["class_names"]
    if names is not None and (len(names) != classes or not all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: prompt pack field 'class_names' holds {len(names)} class names for a head "
                              f"of {classes} classes (expected one string per class)")
    return pack


def _config(cls, fields, name, key):
    """ViTConfig / PromptConfig from pack[key]: every field of the dataclass, of its type (an int for a float),
    nothing else; a CheckpointError names the file and the field."""
    where = f"{name}: prompt pack field {key!r}"
    unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"{where} has {cls.__name__} fields unknown to this code: {unknown} (a newer version?)")
    for field in cls.__dataclass_fields__.values():
        value, kind = fields.get(field.name), (int, float) if field.type is float else field.type
        if field.name not in fields or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            found = f"{value!r}" if field.name in fields else "missing"
            raise CheckpointError(f"{where}: {field.name} is {found}; expected {field.type.__name__}")
    try:
        return cls(**fields)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _as_pack(model, backbone, fingerprint):
    """A loaded model's prompt side in pack form (its fingerprint is the backbone's when it shares its tensors)."""
    shared = all(a.data_ptr() == b.data_ptr() for a, b in zip(model.backbone_state_dict().values(),
                                                                backbone.backbone_state_dict().values()))
    return {"vit": asdict(model.cfg), "prompt": asdict(model.pcfg), "tensors": model.prompt_state_dict(),
            "backbone_fingerprint": fingerprint if shared else backbone_fingerprint(model)}


def _backbone_from(checkpoint, cfg):
    """A frozen backbone without prompts or head, loaded from a file or a state dict."""
    backbone = VisionTransformer(cfg, PromptConfig(prompt="none", gates="none", learn_temperature=False,
                                                   num_classes=0))
    load_backbone(backbone, checkpoint)
    return backbone.eval()


# ViTConfig fields that may differ between a pack and its backbone: the default input size (any size runs),
# the attention kernel, the pretraining's name (the weights' fingerprint is compared instead)
FREE_FIELDS = ("img_size", "fused_attention", "ssl")


def _mismatches(pack, backbone, fingerprint):
    """What contradicts between a pack and a backbone: ViTConfig fields (FREE_FIELDS aside) and fingerprint."""
    found = asdict(backbone.cfg)
    wrong = [f"{k}: pack {v!r}, backbone {found.get(k)!r}" for k, v in pack["vit"].items()
             if k not in FREE_FIELDS and found.get(k) != v]
    if fingerprint != pack["backbone_fingerprint"]:
        wrong.append(f"backbone fingerprint: pack {pack['backbone_fingerprint']}, backbone {fingerprint}")
    return wrong


def _attach(pack, backbone, fingerprint, strict, name):
    """A VisionTransformer with the pack's prompt side that shares `backbone`'s tensors (nothing is copied)."""
    wrong = _mismatches(pack, backbone, fingerprint)
    if wrong and strict:
        raise CheckpointError(f"{name} was trained on another backbone or configuration (strict=False loads it "
                              f"anyway): " + "; ".join(wrong))
    if wrong:
        warnings.warn(f"{name}: loading onto another backbone or configuration (strict=False): " + "; ".join(wrong))
    try:
        with torch.device("meta"):  # allocates nothing: every tensor comes from the backbone or the pack
            model = VisionTransformer(replace(_config(ViTConfig, pack["vit"], name, "vit"),
                                              fused_attention=backbone.cfg.fused_attention),
                                      _config(PromptConfig, pack["prompt"], name, "prompt"))
    except ValueError as e:  # settings that contradict each other (insert_at beyond depth)
        raise CheckpointError(f"{name}: {e}") from None
    # the backbone's tensors themselves, fresh prompt-side tensors in the backbone's dtype (fp32, or fp64 after
    # .double()), then the pack's tensors through load_prompt_state_dict: the rule .prompts.pt files load by
    # (every key with its shape, cast to the parameter's dtype, temperatures projected into TEMPERATURE_RANGE)
    like = backbone.cls_token
    fresh = {k: torch.empty_like(v, device=like.device, dtype=like.dtype) for k, v in model.prompt_state_dict().items()}
    try:
        model.load_state_dict({**backbone.backbone_state_dict(), **fresh}, assign=True)
        model.load_prompt_state_dict(pack["tensors"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{name}: its tensors do not fit its own configuration: {str(e)[:300]}") from None
    model.backbone_file = backbone.backbone_file
    return model.freeze_backbone().eval()


def load_pack(path, checkpoint, strict=True):
    """A ready VisionTransformer (eval mode) from a prompt pack and its backbone: `checkpoint` is a backbone file
    in any format load_backbone reads, a state dict, or a VisionTransformer whose backbone tensors are shared.
    A backbone whose fingerprint or configuration differs from the pack's is refused (CheckpointError naming
    both); strict=False loads anyway and warns."""
    pack = read_pack(path)
    backbone = checkpoint if isinstance(checkpoint, VisionTransformer) else \
        _backbone_from(checkpoint, _config(ViTConfig, pack["vit"], os.fspath(path), "vit"))
    return _attach(pack, backbone, backbone_fingerprint(backbone), strict, os.fspath(path))


class MultiTask(nn.Module):
    """Many tasks through one frozen backbone in one batched pass (inference, eval mode). Image b runs with its
    own task's prompts, gates (Eq. 7), temperatures (Eq. 9) and head, through the backbone's own block loop
    (run_blocks) with a per-image PromptStep. Tasks with fewer prompts (or none, or prompts from a later block)
    get padding slots that no token attends to and MAE's mean pooling skips, so every image's logits equal those
    of its task's own model. The prompt side (heads included) is copied at construction; the backbone is shared.

        mt = gp.MultiTask("mae_pretrain_vit_base.pth", {"cub": "cub.pack.pt", "dtd": "dtd.pack.pt"})
        logits = mt(images, ["cub", "dtd", "cub"])   # a list: one [num_classes of its task] tensor per image
    """

    def __init__(self, backbone, packs, strict=True):
        super().__init__()
        if not packs:
            raise ValueError("MultiTask needs at least one pack")
        packs = {name: p if isinstance(p, VisionTransformer) else read_pack(p) for name, p in packs.items()}
        if not isinstance(backbone, VisionTransformer):
            first = next(iter(packs.values()))
            backbone = _backbone_from(backbone, first.cfg if isinstance(first, VisionTransformer)
                                      else _config(ViTConfig, first["vit"], "the first pack", "vit"))
        fingerprint = backbone_fingerprint(backbone)
        models = {name: _attach(p if isinstance(p, dict) else _as_pack(p, backbone, fingerprint), backbone,
                                fingerprint, strict, f"pack {name!r}") for name, p in packs.items()}
        self.backbone, self.names = backbone.eval(), list(models)
        self.heads = nn.ModuleList(m.head if m.head is not None else nn.Identity() for m in models.values())
        self.class_names = {n: p.get("class_names") if isinstance(p, dict) else None for n, p in packs.items()}
        self._tables(list(models.values()))

    @torch.no_grad()
    def _tables(self, models):
        """Per task t and block i: the prompt tokens written before the block (Eq. 4 at insert_at, Eq. 5 after),
        which slots are live, the gate logit (+inf = ungated; hard gates as +-inf, their eval-mode threshold)
        and the temperature (1 = none). The forward takes the sigmoid in at least fp32, as the model does."""
        L, D = self.backbone.cfg.depth, self.backbone.cfg.embed_dim
        self.slots = max(m.num_prompts for m in models)  # prompt slots in every image's sequence
        T, P = len(models), self.slots
        writes, write_at = torch.zeros(T, L, P, D), torch.zeros(T, L, dtype=torch.bool)
        live, taus = torch.zeros(T, L, P, dtype=torch.bool), torch.ones(T, L)
        gates = torch.full((T, L), float("inf"))  # gate logits: sigmoid(+inf) = 1 (ungated)
        for t, m in enumerate(models):
            k, n = m.pcfg.insert_at, m.num_prompts
            if n:
                writes[t, k - 1, :n], write_at[t, k - 1], live[t, k - 1:, :n] = m.prompts[0].float().cpu(), True, True
            if m.deep_prompts is not None:
                writes[t, k:, :n], write_at[t, k:] = m.deep_prompts.float().cpu(), True
            if m.gate_logits is not None:
                logits = m.gate_logits[k - 1:].detach().float().cpu()
                hard = torch.where(logits > 0, float("inf"), -float("inf"))  # hard_gates(sample=False)
                gates[t, k - 1:L - 1] = logits if m.pcfg.gates == "soft" else hard
            if m.temperatures is not None:
                taus[t] = m.temperatures.float().cpu()
        for name, value in (("writes", writes), ("write_at", write_at), ("live", live), ("gate", gates),
                            ("tau", taus)):
            self.register_buffer(name, value, persistent=False)
        # host-side switches: a block with no writes, no padding, no gate or no temperature skips that work;
        # the slots appear at the first block any task writes
        self.block_writes = write_at.any(0).tolist()
        first = self.block_writes.index(True) if P else L
        self.block_masked = [i >= first and bool((~live[:, i]).any()) for i in range(L)]
        self.block_gated = (gates != float("inf")).any(0).tolist()
        self.has_tau = bool((taus != 1).any())

    def plan(self, t):
        """The prompt side of a batch whose image b belongs to task t[b] (a tensor of task indices): one PromptStep
        per block with a row per image."""
        B = len(t)
        return [PromptStep(write=self.writes[t, i] if self.block_writes[i] else None,
                           write_rows=self.write_at[t, i].view(B, 1, 1) if self.block_writes[i] else None,
                           live=self.live[t, i] if self.block_masked[i] else None,
                           tau=self.tau[t, i].view(B, 1, 1, 1) if self.has_tau else None,
                           gate=torch.sigmoid(at_least_fp32(self.gate[t, i])).view(B, 1, 1) if self.block_gated[i]
                           else None)
                for i in range(len(self.block_writes))]

    def forward(self, images, tasks):
        if images.dim() != 4:
            raise ValueError(f"images: [B, 3, H, W] expected, got shape {list(images.shape)}")
        if len(images) == 0 and len(tasks) == 0:
            return []
        unknown = sorted(set(tasks) - set(self.names))
        if unknown or len(tasks) != len(images):
            raise ValueError(f"need one task per image from {self.names}; got {len(tasks)} for {len(images)} "
                             f"images" + (f", unknown {unknown}" if unknown else ""))
        plan = self.plan(torch.tensor([self.names.index(name) for name in tasks], device=images.device))
        features = self.backbone.pool(self.backbone.run_blocks(images, plan)[0], plan[-1].live)
        logits = [None] * len(tasks)
        for name in dict.fromkeys(tasks):
            rows = [b for b, task in enumerate(tasks) if task == name]
            for b, out in zip(rows, self.heads[self.names.index(name)](features[rows])):
                logits[b] = out
        return logits
