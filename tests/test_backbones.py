"""DINO, DINOv2 (LayerScale, registers, a 518-px position grid), DeiT and the MoCo v3 ViT-S: every file layout
people have, written from a timm model with random weights, gives timm's own features (issue #18, points 3-5).
Expected values come from timm (forward_features, resample_abs_pos_embed); file layouts from REFERENCE.md
section 2 and the Hugging Face Dinov2 / Dinov2WithRegisters parameter names."""
import argparse
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import gated_prompt as gp

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402


def randomize(model, seed=0):
    """Every parameter random (LayerScale gammas too, not ones), timm model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    return model.eval()


@functools.lru_cache(maxsize=None)
def named(name):
    """A timm model by its registry name with NAMED_DEPTH of its blocks (random weights); DINOv2 ones resize their
    grid to the input."""
    kwargs = dict(dynamic_img_size=True) if "dinov2" in name else {}
    return randomize(timm.create_model(name, pretrained=False, num_classes=0, depth=NAMED_DEPTH, **kwargs))


@functools.lru_cache(maxsize=None)
def small_dinov2(registers):
    """DINOv2's layout at width 32: patch 14, 37x37 grid (518 px), LayerScale, timm's _reg4_ conventions."""
    kwargs = dict(reg_tokens=4, no_embed_class=True) if registers else {}
    return randomize(TimmViT(img_size=518, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=1e-5,
                             num_classes=0, dynamic_img_size=True, **kwargs), seed=int(registers))


def timm_features(ref, x):
    with torch.no_grad():
        return ref.forward_features(x)[:, 0]   # CLS after the final norm


def ours_features(path, arch, ssl, x, **vit):
    model = gp.build_model(arch, ssl=ssl, method="linear", num_classes=0, checkpoint=path,
                           vit_overrides=vit or None).eval()
    with torch.no_grad():
        return model.forward_features(x)


# --- writers: the layouts of the files people download ------------------------------------------

def write_timm(ref, path):   # torch.save(timm_model.state_dict())
    torch.save(ref.state_dict(), path)


def write_dino_plain(ref, path):   # dino_deitsmall16_pretrain.pth: the teacher backbone, timm names
    torch.save({k: v for k, v in ref.state_dict().items()}, path)


def write_dino_training(ref, path):
    """dino_vitbase16_pretrain_full_checkpoint.pth: student (DDP) and teacher, each backbone + DINOHead, plus
    optimizer, epoch, the argparse Namespace of the run, the loss centre."""
    sd = ref.state_dict()
    D = sd["cls_token"].shape[-1]
    head = {"head.mlp.0.weight": torch.zeros(64, D), "head.last_layer.weight_g": torch.ones(16, 1)}
    torch.save({"student": {**{"module.backbone." + k: v + 1 for k, v in sd.items()},
                            **{"module." + k: v for k, v in head.items()}},
                "teacher": {**{"backbone." + k: v for k, v in sd.items()}, **head},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
                "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005,
                                           output_dir="/checkpoint/dino", local_crops_scale=(0.05, 0.4)),
                "dino_loss": {"center": torch.zeros(1, 16)}}, path)


def official_dinov2_sd(ref):
    """dinov2_vits14(_reg4)_pretrain.pth: timm names, but registers are `register_tokens`, there is a
    `mask_token`, and the position table always has a CLS entry (timm's _reg4_ folds it into cls_token)."""
    sd = dict(ref.state_dict())
    if "reg_token" in sd:
        cls_pos = 0.1 * torch.randn(1, 1, sd["cls_token"].shape[-1], generator=torch.Generator().manual_seed(9))
        sd["register_tokens"] = sd.pop("reg_token")
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - cls_pos
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return sd


def write_dinov2_official(ref, path):
    torch.save(official_dinov2_sd(ref), path)


def write_hf_dinov2(ref, path):
    """model.safetensors of Dinov2Model / Dinov2WithRegistersModel (Hugging Face names)."""
    safetensors = pytest.importorskip("safetensors.torch")
    src, sd = official_dinov2_sd(ref), {}
    sd["embeddings.cls_token"], sd["embeddings.mask_token"] = src["cls_token"], src["mask_token"]
    sd["embeddings.position_embeddings"] = src["pos_embed"]
    if "register_tokens" in src:
        sd["embeddings.register_tokens"] = src["register_tokens"]
    depth = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("blocks."))
    for p in ("weight", "bias"):
        sd[f"embeddings.patch_embeddings.projection.{p}"] = src[f"patch_embed.proj.{p}"]
        sd[f"layernorm.{p}"] = src[f"norm.{p}"]
        for i in range(depth):
            b, h = f"blocks.{i}.", f"encoder.layer.{i}."
            for name, t in zip(("query", "key", "value"), src[b + f"attn.qkv.{p}"].chunk(3)):
                sd[h + f"attention.attention.{name}.{p}"] = t
            sd[h + f"attention.output.dense.{p}"] = src[b + f"attn.proj.{p}"]
            for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                sd[h + f"{theirs}.{p}"] = src[b + f"{ours}.{p}"]
    for i in range(depth):
        sd[f"encoder.layer.{i}.layer_scale1.lambda1"] = src[f"blocks.{i}.ls1.gamma"]
        sd[f"encoder.layer.{i}.layer_scale2.lambda1"] = src[f"blocks.{i}.ls2.gamma"]
    safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def write_mocov3_linear(ref, path):   # linear-vit-s-300ep.pth.tar
    torch.save({"epoch": 90, "arch": "vit_small", "best_acc1": 73.2,
                "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)


def write_deit(ref, path):   # deit_small_patch16_224-cd65a155.pth: {'model': sd with head}
    sd = dict(ref.state_dict())
    sd["head.weight"], sd["head.bias"] = torch.zeros(1000, 384), torch.zeros(1000)
    torch.save({"model": sd}, path)


# --- named configs at their real width at 224 px, one per file layout --------------------------------
# 2 of their 12 blocks: every block is loaded by the same name table (the full depths' names and shapes are checked
# on the meta device: test_every_named_config_has_our_names_and_shapes)
NAMED_DEPTH = 2


@pytest.mark.parametrize("timm_name,arch,ssl,write,fmt", [
    ("vit_small_patch16_224.dino", "vit_small", "dino", write_timm, "timm / MAE"),
    ("vit_small_patch14_reg4_dinov2", "vit_small", "dinov2", write_dinov2_official, "DINOv2 (official)"),
    ("deit_small_patch16_224", "vit_small", "supervised", write_deit, "timm / MAE"),
])
def test_named_backbone_files_give_timms_features(timm_name, arch, ssl, write, fmt, tmp_path):
    ref = named(timm_name)
    path = tmp_path / (timm_name + (".safetensors" if write is write_hf_dinov2 else ".pth"))
    write(ref, path)
    assert gp.detect_format(gp.read_checkpoint(path)[0])[1].startswith(fmt)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert (ours_features(path, arch, ssl, x, depth=NAMED_DEPTH) - timm_features(ref, x)).abs().max() < 1e-5


@pytest.mark.parametrize("write,fmt", [(write_dino_plain, "timm / MAE"),
                                       (write_dino_training, "DINO training checkpoint (teacher)")])
def test_dino_files_give_timms_features(write, fmt, tmp_path):
    """DINO v1's layout at width 32 (patch 16, no LayerScale, CLS after the final norm): the plain file and the
    training checkpoint (its teacher; the argparse Namespace in it loads without trust_pickle)."""
    ref = randomize(TimmViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)), seed=4)
    write(ref, tmp_path / "dino.pth")
    assert gp.detect_format(gp.read_checkpoint(tmp_path / "dino.pth")[0])[1] == fmt
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    model = gp.build_model("vit_small", ssl="dino", method="linear", num_classes=0, img_size=64,
                           checkpoint=tmp_path / "dino.pth", vit_overrides=dict(embed_dim=32, depth=2, num_heads=2))
    with torch.no_grad():
        assert (model.eval().forward_features(x) - timm_features(ref, x)).abs().max() < 1e-5


def test_mocov3_vit_small_has_12_heads_and_loads_exactly(tmp_path):
    """The paper's MoCo v3 ViT-S/16 (Table 8): 384 wide, 12 heads (here 2 of its 12 blocks); the same file read as
    a 6-head ViT-S differs."""
    ref = randomize(TimmViT(embed_dim=384, depth=NAMED_DEPTH, num_heads=12, num_classes=0,
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)))
    path = tmp_path / "linear-vit-s-300ep.pth.tar"
    write_mocov3_linear(ref, path)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = timm_features(ref, x)
    assert (ours_features(path, "vit_small", "mocov3", x, depth=NAMED_DEPTH) - expected).abs().max() < 1e-5
    six = ours_features(path, "vit_small", "dino", x, depth=NAMED_DEPTH)   # 6 heads
    assert (six - expected).abs().max() > 1e-2


@pytest.mark.parametrize("timm_name,arch", [
    ("vit_base_patch16_224.dino", "vit_base"), ("vit_small_patch14_dinov2", "vit_small"),
    ("vit_base_patch14_dinov2", "vit_base"), ("vit_large_patch14_dinov2", "vit_large"),
    ("vit_base_patch14_reg4_dinov2", "vit_base"), ("vit_large_patch14_reg4_dinov2", "vit_large"),
])
def test_every_named_config_has_our_names_and_shapes(timm_name, arch):
    """The remaining timm configs, on the meta device (names, shapes, heads; no arithmetic)."""
    ssl = "dinov2" if "dinov2" in timm_name else "dino"
    with torch.device("meta"):
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
        sd = ref.state_dict()
        model = gp.build_model(arch, ssl=ssl, method="linear", num_classes=0, checkpoint=sd)
    assert model.cfg.num_heads == ref.blocks[0].attn.num_heads
    assert model.cfg.patch_size == ref.patch_embed.patch_size[0]
    assert (model.reg_token is not None) == ("reg4" in timm_name)
    extra = model.cfg.embed_dim if "reg4" in timm_name else 0   # our table keeps a CLS entry (0 for _reg4_ files)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters()) + extra


# --- DINOv2 at 518 px and 224 px, with and without registers -----------------------------------------

def official_dinov2_resize(pos_embed, rows, cols):
    """The official DINOv2 code's interpolate_pos_encoding without registers, written out: bicubic, no
    antialiasing, the output grid set by the scale factors (rows + 0.1) / M and (cols + 0.1) / M (M = stored side),
    which also set where output pixels sample the grid; the CLS entry kept."""
    M = math.isqrt(pos_embed.shape[1] - 1)
    grid = pos_embed[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / M, (cols + 0.1) / M), mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (rows, cols)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


def timm_at(ref, size, pos_embed):
    """timm's model at a fixed input size, with its position table replaced by `pos_embed` (no resizing inside)."""
    fixed = TimmViT(img_size=size, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=1e-5, num_classes=0)
    fixed.load_state_dict({**ref.state_dict(), "pos_embed": pos_embed})
    return fixed.eval()


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("write", [write_timm, write_dinov2_official, write_hf_dinov2])
@pytest.mark.parametrize("size", [(518, 518), (224, 224), (224, 294)])
def test_dinov2_layout_matches_timm_at_stored_and_resized_grids(registers, write, size, tmp_path):
    """timm resizes both kinds of model with antialiasing; the official code does so with registers only, and
    without registers resizes as official_dinov2_resize, which we follow: that case is compared with timm given
    the grid so resized."""
    ref = small_dinov2(registers)
    path = tmp_path / ("dinov2.safetensors" if write is write_hf_dinov2 else "dinov2.pth")
    write(ref, path)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    got = ours_features(path, "vit_small", "dinov2", x, embed_dim=32, depth=2, num_heads=2)
    if not registers and size != (518, 518):
        ref = timm_at(ref, size, official_dinov2_resize(ref.pos_embed.detach(), size[0] // 14, size[1] // 14))
    assert (got - timm_features(ref, x)).abs().max() < 1e-5


def test_registers_are_detected_and_prompts_sit_after_cls(tmp_path):
    ref = small_dinov2(True)
    write_dinov2_official(ref, tmp_path / "dinov2_reg4.pth")
    plain = gp.build_model("vit_small", ssl="dinov2", method="linear", num_classes=0,
                           vit_overrides=dict(embed_dim=32, depth=2, num_heads=2))
    with pytest.raises(gp.CheckpointError, match=r"4 register tokens.*num_reg_tokens=4"):
        gp.load_backbone(plain, tmp_path / "dinov2_reg4.pth")   # a model built without reading the file
    model = gp.build_model("vit_small", ssl="dinov2", method="gated+temp", num_classes=3, num_prompts=5,
                           checkpoint=tmp_path / "dinov2_reg4.pth",
                           vit_overrides=dict(embed_dim=32, depth=2, num_heads=2)).eval()
    assert model.reg_token.shape == (1, 4, 32) and torch.equal(model.reg_token, ref.reg_token)
    x = torch.randn(2, 3, 56, 56)
    tokens = model.forward_intermediates(x, blocks=(1,))[1][1]
    assert tokens.shape == (2, 1 + 5 + 4 + 16, 32)
    # [CLS, prompts, registers, patches] and [CLS, registers, prompts, patches] are the same model
    with torch.no_grad():
        e = model.embed(x)
        p = model.prompts.expand(2, -1, -1)
        a, b = torch.cat([e[:, :1], p, e[:, 1:]], 1), torch.cat([e[:, :5], p, e[:, 5:]], 1)
        a, b = model.blocks[1](model.blocks[0](a)), model.blocks[1](model.blocks[0](b))
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5)


# --- position-grid resizing (point 5) ---------------------------------------------------------

@pytest.mark.parametrize("old,new", [(37, 16), (14, 32), (14, 24)])
@pytest.mark.parametrize("mode,antialias", [("bicubic-antialias", True), ("bicubic", False)])
def test_resize_matches_timms_resample_abs_pos_embed(old, new, mode, antialias):
    pos = torch.randn(1, 1 + old * old, 8, generator=torch.Generator().manual_seed(old))
    expected = resample_abs_pos_embed(pos, (new, new), (old, old), num_prefix_tokens=1, antialias=antialias)
    assert torch.allclose(gp.resize_pos_embed(pos, (new, new), mode), expected, atol=1e-6)


def test_interpolation_defaults_per_backbone(tmp_path):
    """As each official code resizes: DINOv2 with registers antialiased, without registers with the 0.1 offset
    (also when build_model reads the register count from the file); MAE, MoCo v3, DINO, DeiT plain bicubic."""
    assert gp.vit_config("vit_base", "dinov2").pos_embed_interpolation == "bicubic-offset"
    assert gp.vit_config("vit_base", "dinov2", num_reg_tokens=4).pos_embed_interpolation == "bicubic-antialias"
    assert gp.vit_config("vit_base", "dinov2", pos_embed_interpolation="bilinear").pos_embed_interpolation == "bilinear"
    for registers in (False, True):
        write_dinov2_official(small_dinov2(registers), tmp_path / "dinov2.pth")
        model = gp.build_model("vit_small", ssl="dinov2", method="linear", num_classes=0, checkpoint=tmp_path / "dinov2.pth",
                               vit_overrides=dict(embed_dim=32, depth=2, num_heads=2))
        assert model.cfg.pos_embed_interpolation == ("bicubic-antialias" if registers else "bicubic-offset")
    for ssl in ("mae", "mocov3", "dino", "supervised"):   # the official code's plain bicubic
        assert gp.vit_config("vit_base", ssl).pos_embed_interpolation == "bicubic"


@pytest.mark.parametrize("rows,cols", [(16, 16), (16, 21), (40, 30)])
def test_the_dinov2_offset_resize_is_the_official_formula(rows, cols):
    """518 px -> 224 px (16 x 16), a non-square input and an upsampling; the offset form differs from the
    antialiased one by several percent of the table at 224 px."""
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(rows + cols))
    expected = official_dinov2_resize(pos, rows, cols)
    assert torch.allclose(gp.resize_pos_embed(pos, (rows, cols), "bicubic-offset"), expected, atol=1e-6)
    if (rows, cols) == (16, 16):
        antialiased = gp.resize_pos_embed(pos, (16, 16), "bicubic-antialias")
        assert (antialiased - expected).norm() / antialiased.norm() > 0.02


# --- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["blocks.0.mlp.w12.weight", "encoder.layer.0.mlp.weights_in.weight"])
def test_vit_giant_swiglu_file_is_refused_by_name(key):
    sd = {"cls_token": torch.zeros(1, 1, 8), key: torch.zeros(4, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    with pytest.raises(gp.CheckpointError, match=r"ViT-g/14 \(DINOv2's SwiGLU MLP"):
        gp.build_model("vit_large", ssl="dinov2", method="linear", num_classes=0, checkpoint=sd)
