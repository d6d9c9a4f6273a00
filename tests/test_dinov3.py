"""DINOv3 ViT-S/16, B/16, L/16 (ssl="dinov3"): 2-D RoPE on the patch tokens, 4 storage tokens, LayerScale,
LayerNorm eps 1e-5, CLS after the final norm. Expected values come from timm's Eva (vit_*_patch16_dinov3 with
global_pool='token', random weights, every LayerScale value random) and from the RoPE formula written out here.
File layouts: timm state dicts (with and without _qkvb) and the official release files (storage_tokens,
rope_embed.periods, mask_token, a qkv bias whose K third a bias_mask zeroes), as facebookresearch/dinov3 names them."""
import functools
import math

import pytest
import torch

import gated_prompt as gp

timm = pytest.importorskip("timm")
from test_backbones import randomize  # noqa: E402  (every parameter random, LayerScale gammas included)


@functools.lru_cache(maxsize=None)
def timm_dinov3(name, depth=None):
    kwargs = dict(depth=depth) if depth else {}
    return randomize(timm.create_model(name, pretrained=False, num_classes=0, global_pool="token", **kwargs))


def official_sd(ref):
    """The official release layout of a timm DINOv3 model's weights: storage_tokens, rope_embed.periods,
    mask_token, ls1/ls2.gamma, one qkv bias [3D] with a bias_mask; the K third of the stored bias is not zero
    (the mask removes it), the q and v thirds are timm's q_bias / v_bias (zero without _qkvb)."""
    src, sd = ref.state_dict(), {}
    D = src["cls_token"].shape[-1]
    sd["cls_token"], sd["storage_tokens"], sd["mask_token"] = src["cls_token"], src["reg_token"], torch.zeros(1, D)
    sd["rope_embed.periods"] = ref.rope.periods.clone()
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"):
        sd[key] = src[key]
    for i in range(len(ref.blocks)):
        b = f"blocks.{i}."
        for key in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight", "attn.proj.weight",
                    "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            sd[b + key] = src[b + key]
        sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = src[b + "gamma_1"], src[b + "gamma_2"]
        q, v = (src.get(b + f"attn.{n}_bias", torch.zeros(D)) for n in "qv")
        sd[b + "attn.qkv.bias"] = torch.cat([q, torch.full((D,), 7.0), v])   # K part: masked out
        sd[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    return sd


def features(model, x):
    with torch.no_grad():
        return model.forward_features(x)


# --- equal to timm -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,arch,depth", [
    ("vit_small_patch16_dinov3", "vit_small", 2), ("vit_small_patch16_dinov3_qkvb", "vit_small", 2),
    ("vit_base_patch16_dinov3", "vit_base", 1), ("vit_base_patch16_dinov3_qkvb", "vit_base", 1)])
def test_features_equal_timms_from_timm_and_official_files(name, arch, depth, tmp_path):
    """ViT-S/16 and ViT-B/16 at full width (heads, RoPE periods, storage tokens as named), ViT-S on 2 of its 12
    blocks, ViT-B on 1 (the full depths' names and shapes are checked on the meta device, below); 224 px and
    176 x 240 px; from timm's state dict and from the official release layout."""
    ref = timm_dinov3(name, depth)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    torch.save(official_sd(ref), tmp_path / "dinov3_official.pth")
    vit = dict(depth=depth) if depth else None
    expected = {}
    for path, fmt, sizes in ((tmp_path / "timm.pth", "timm DINOv3", ((224, 224), (176, 240))),
                             (tmp_path / "dinov3_official.pth", "DINOv3 (official)", ((176, 240),))):
        assert gp.detect_format(gp.read_checkpoint(path)[0])[1].startswith(fmt)
        model = gp.build_model(arch, ssl="dinov3", method="linear", num_classes=0, checkpoint=path, vit_overrides=vit)
        assert model.reg_token.shape[1] == 4 and model.pos_embed is None and model.cfg.norm_eps == 1e-5
        for size in sizes:
            x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[1]))
            if size not in expected:
                with torch.no_grad():
                    expected[size] = ref.forward_features(x)[:, 0]
            assert (features(model.eval(), x) - expected[size]).abs().max() < 1e-5, (path.name, size)


@pytest.mark.parametrize("size", ["small", "base", "large"])
@pytest.mark.parametrize("qkvb", [False, True])
def test_every_named_config_has_our_names_and_shapes(size, qkvb):
    """timm's full-size configs on the meta device: heads, width, depth, storage tokens and parameter counts
    (ours stores a qkv bias of 3 D per block; timm stores q and v biases with _qkvb and none without)."""
    name = f"vit_{size}_patch16_dinov3" + ("_qkvb" if qkvb else "")
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False, num_classes=0)
        model = gp.build_model(f"vit_{size}", ssl="dinov3", method="linear", num_classes=0, checkpoint=ref.state_dict())
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads) == (ref.embed_dim, len(ref.blocks),
                                                                           ref.blocks[0].attn.num_heads)
    D, L = model.cfg.embed_dim, model.cfg.depth
    ours = sum(p.numel() for p in model.parameters())
    assert ours == sum(p.numel() for p in ref.parameters()) + L * D * (1 if qkvb else 3)


# --- RoPE and the token layout ------------------------------------------------------------------------------

def test_rope_by_hand():
    """A 2 x 2 grid, head width 8: periods 100^(2j/4) = 1, 10; patch centres -0.5, 0.5 per axis; channels [row
    angles, column angles] twice; a channel pair (j, j + 4) turns by its angle."""
    cfg = gp.vit_config("vit_small", "dinov3", embed_dim=8, num_heads=1, depth=1)
    periods = gp.rope_periods(cfg)
    assert periods.tolist() == pytest.approx([1.0, 10.0])
    sin, cos = gp.rope_sincos(periods, (2, 2))
    for n, (r, c) in enumerate([(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)]):   # row-major
        angles = [2 * math.pi * r / 1, 2 * math.pi * r / 10, 2 * math.pi * c / 1, 2 * math.pi * c / 10]
        assert sin[n].tolist() == pytest.approx([math.sin(a) for a in angles] * 2, abs=1e-6)
        assert cos[n].tolist() == pytest.approx([math.cos(a) for a in angles] * 2, abs=1e-6)
    t = torch.arange(1.0, 1 + 3 * 8).view(1, 1, 3, 8)      # CLS + 2 patch tokens: only the last 2 turn
    out = gp.apply_rope(t, sin[:2], cos[:2])
    assert torch.equal(out[0, 0, 0], t[0, 0, 0])
    a = 2 * math.pi * 0.5 / 10   # token 2 (row -0.5, column 0.5), channel 3 (column, period 10): pair (3, 7)
    x3, x7 = t[0, 0, 2, 3].item(), t[0, 0, 2, 7].item()
    assert out[0, 0, 2, 3].item() == pytest.approx(x3 * math.cos(a) - x7 * math.sin(a), rel=1e-6)
    assert out[0, 0, 2, 7].item() == pytest.approx(x7 * math.cos(a) + x3 * math.sin(a), rel=1e-6)


def test_an_official_files_stored_periods_are_used(tmp_path):
    """The official code loads rope_embed.periods from the file (stored in bf16 during training); timm recomputes
    them. We follow the official code: the file's periods are the model's."""
    ref = timm_dinov3("vit_small_patch16_dinov3", 2)
    sd = official_sd(ref)
    sd["rope_embed.periods"] = sd["rope_embed.periods"].bfloat16()
    model = gp.build_model("vit_small", ssl="dinov3", method="linear", num_classes=0, checkpoint=sd,
                           vit_overrides=dict(depth=2))
    assert torch.equal(model.rope_periods, sd["rope_embed.periods"].float())
    assert not torch.equal(model.rope_periods, gp.rope_periods(model.cfg))


def dinov3_model(method="gated+temp", seed=1, trained=True, **prompt):
    """A 2-block DINOv3 ViT-S/16 with prompts; trained=True: a random prompt side, as training leaves it."""
    torch.manual_seed(seed)
    ref = timm_dinov3("vit_small_patch16_dinov3_qkvb", 2)
    model = gp.build_model("vit_small", ssl="dinov3", method=method, num_classes=4, num_prompts=3, img_size=64,
                           checkpoint=official_sd(ref), vit_overrides=dict(depth=2), **prompt)
    with torch.no_grad():
        for p in model.trainable_parameters() if trained else ():
            p.normal_(0, 0.5)
    return gp.project_temperatures(model).eval()


def test_prompts_join_the_unrotated_prefix_and_carry_no_position():
    """Prompts sit after CLS and before the storage tokens and are not rotated: permuting them changes nothing,
    and [CLS, prompts, storage, patches] equals [CLS, storage, prompts, patches]."""
    model = dinov3_model()
    x = torch.randn(2, 3, 64, 48)
    tokens = model.forward_intermediates(x, blocks=(1,))[1][1]
    assert tokens.shape == (2, 1 + 3 + 4 + 12, 384)
    before = features(model, x)
    with torch.no_grad():
        model.prompts.copy_(model.prompts[:, [2, 0, 1]])
    assert torch.allclose(features(model, x), before, atol=1e-5)
    with torch.no_grad():
        e, rope, p = model.embed(x), model.rope(x), model.prompts.expand(2, -1, -1)
        a, b = torch.cat([e[:, :1], p, e[:, 1:]], 1), torch.cat([e[:, :5], p, e[:, 5:]], 1)
        for blk, tau in zip(model.blocks, model.temperatures):
            a, b = blk(a, tau, rope=rope), blk(b, tau, rope=rope)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5)


def test_a_gated_temp_model_trains():
    model = dinov3_model("gated+temp", trained=False, gate_init=1.0).train()
    frozen = {k: v.clone() for k, v in model.backbone_state_dict().items()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert model.gate_logits.grad.abs().sum() > 0 and model.temperatures.grad.abs().sum() > 0
        opt.step()
        gp.project_temperatures(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[k], v) for k, v in model.backbone_state_dict().items())


def test_packs_round_trip_and_mix_in_multitask(tmp_path):
    ref = timm_dinov3("vit_small_patch16_dinov3_qkvb", 2)
    torch.save(official_sd(ref), tmp_path / "dinov3_vits16_pretrain.pth")
    models = {"gated+temp": dinov3_model("gated+temp", 1), "vpt-deep": dinov3_model("vpt-deep", 2),
              "gated": dinov3_model("gated", 3, insert_at=2), "linear": dinov3_model("linear", 4)}
    paths = {name: m.save_pack(tmp_path / f"{name}.pack.pt") for name, m in models.items()}
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    pack = gp.read_pack(paths["gated+temp"])
    assert pack["ssl"] == "dinov3" and pack["vit"]["pos_embed"] == "rope"
    loaded = gp.load_pack(paths["gated+temp"], checkpoint=tmp_path / "dinov3_vits16_pretrain.pth")
    with torch.no_grad():
        assert torch.equal(loaded(x), models["gated+temp"](x))
    mt = gp.MultiTask(tmp_path / "dinov3_vits16_pretrain.pth", paths)
    tasks = ["linear", "gated+temp", "vpt-deep", "gated", "gated+temp", "vpt-deep"]
    with torch.no_grad():
        out = mt(x, tasks)
        for b, task in enumerate(tasks):
            assert (out[b] - models[task](x[b:b + 1])[0]).abs().max() <= 1e-5, task


# --- refusals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,variant", [("vit_small_plus", "ViT-S+/16"), ("vit_huge_plus", "ViT-H+/16"),
                                          ("vit_7b", "ViT-7B/16")])
def test_swiglu_variants_are_refused_by_name(arch, variant):
    with pytest.raises(ValueError, match=f"DINOv3 {variant.replace('+', '.')} .SwiGLU MLP"):
        gp.vit_config(arch, "dinov3")


@pytest.mark.parametrize("name,variant", [("vit_small_plus_patch16_dinov3", "ViT-S+/16"),
                                          ("vit_huge_plus_patch16_dinov3_qkvb", "ViT-H+/16")])
def test_swiglu_files_are_refused_by_name(name, variant):
    with torch.device("meta"):
        sd = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    with pytest.raises(gp.CheckpointError, match=f"DINOv3 {variant.replace('+', '.')} .SwiGLU MLP, blocks.0.mlp"):
        gp.build_model("vit_small", ssl="dinov3", method="linear", num_classes=0, checkpoint=sd)
    official_7b = {"cls_token": torch.zeros(1, 1, 4096), "storage_tokens": torch.zeros(1, 4, 4096),
                   "blocks.0.attn.qkv.weight": torch.zeros(3, 4096), "blocks.0.mlp.w1.weight": torch.zeros(2, 4096)}
    with pytest.raises(gp.CheckpointError, match=r"DINOv3 ViT-7B/16 \(SwiGLU MLP, blocks.0.mlp.w1.weight\)"):
        gp.build_model("vit_large", ssl="dinov3", method="linear", num_classes=0, checkpoint=official_7b)


def test_a_dinov3_file_in_a_model_with_a_position_table_says_which_ssl(tmp_path):
    ref = timm_dinov3("vit_small_patch16_dinov3", 2)
    torch.save(official_sd(ref), tmp_path / "dinov3.pth")
    with pytest.raises(gp.CheckpointError, match=r"(?s)DINOv3 \(official\).*build the model with ssl='dinov3'"):
        gp.build_model("vit_small", ssl="dinov2", method="linear", num_classes=0, checkpoint=tmp_path / "dinov3.pth",
                       vit_overrides=dict(depth=2, patch_size=16))


def test_dinov3_at_a_size_it_was_not_released_in_is_refused_everywhere(cli):
    """DINOv3 is ViT-S/16, B/16 and L/16 here; its larger releases (H+/16, 7B/16) have SwiGLU MLPs. vit_huge with
    ssl dinov3 is refused by the API, a run and download alike, without advising a --checkpoint."""
    with pytest.raises(ValueError, match="DINOv3 is vit_small, vit_base, vit_large"):
        gp.build_model("vit_huge", ssl="dinov3")
    for argv in (["--task", "cub", "--ssl", "dinov3", "--arch", "vit_huge", "--print-config"],
                 ["download", "--ssl", "dinov3", "--arch", "vit_huge"]):
        out = cli(*argv)
        assert out.returncode == 2 and "SwiGLU" in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert "--checkpoint" not in out.stderr and out.stdout == ""
