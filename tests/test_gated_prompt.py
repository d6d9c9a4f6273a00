"""The method, claim by claim (paper Sections 2 and 4, Eq. 3-11)."""
import math
from functools import partial

import pytest
import torch

import gated_prompt as gp



def tiny(method="gated+temp", depth=4, ssl="mae", **prompt_overrides):
    torch.manual_seed(0)
    cfg = gp.vit_config("vit_base", ssl, embed_dim=32, depth=depth, num_heads=2, img_size=32, patch_size=8)
    overrides = dict(num_classes=5, num_prompts=3, gate_init=1.0)
    overrides.update(prompt_overrides)
    return gp.VisionTransformer(cfg, gp.prompt_config(method, **overrides)).eval()


def copy_shared(src, dst):
    """Same backbone, prompts and head in both models."""
    sd = {k: v for k, v in src.state_dict().items() if k in dst.state_dict()
          and v.shape == dst.state_dict()[k].shape}
    dst.load_state_dict(sd, strict=False)
    return dst


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- the ViT itself ---------------------------------------------------------------

def timm_vit(ours, img_size, **kwargs):
    """timm's VisionTransformer with our backbone's weights (timm and our names agree)."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    c = ours.cfg
    ref = timm_vit.VisionTransformer(img_size=img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                                     num_heads=c.num_heads, qkv_bias=True, num_classes=0,
                                     norm_layer=partial(torch.nn.LayerNorm, eps=c.norm_eps), **kwargs).eval()
    state = ours.backbone_state_dict()
    if ref.pos_embed.shape != state["pos_embed"].shape:   # timm stores the input's grid: resized by timm's code
        from timm.layers import resample_abs_pos_embed
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], ref.patch_embed.grid_size,
                                                    num_prefix_tokens=1, antialias=False)
    if kwargs.get("fc_norm"):
        state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    ref.load_state_dict(state)
    return ref


def test_full_size_vit_b16_matches_timm():
    """The one full-size check: our ViT-B/16 (768 wide, 12 blocks, 12 heads) = timm's with the same weights.
    Both are built on the meta device and given normal random weights (trunc_normal_ init of 86 M weights,
    twice, would cost seconds)."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    with torch.device("meta"):
        ours = gp.build_model("vit_base", ssl="mocov3", method="linear", num_classes=0)
        ref = timm_vit.VisionTransformer(num_classes=0, global_pool="token")
    ours.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():   # in place: a temporary per tensor would triple the cost
            p.normal_(float("norm" in name and name.endswith("weight")), 0.02, generator=g)
    ref.load_state_dict(ours.backbone_state_dict(), assign=True)
    x = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        expected = ref.eval().forward_head(ref.forward_features(x), pre_logits=True)
        assert (ours.forward_features(x) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("img_size", [224, 512, 96])
def test_vit_matches_timm_at_stored_and_resized_grids(img_size):
    """A 2-block, 64-wide ViT/16 with the 14x14 grid of 224 px: equal to timm at 224 px and, with the grid resized
    to the input (bicubic, no antialias, as timm's resample_abs_pos_embed with antialias=False), at 512 and 96 px."""
    torch.manual_seed(0)
    ours = gp.build_model("vit_base", ssl="mocov3", method="linear", num_classes=0,
                          vit_overrides=dict(depth=2, embed_dim=64, num_heads=4)).eval()
    assert ours.pos_embed.shape == (1, 1 + 14 * 14, 64)
    ref = timm_vit(ours, img_size)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert (ours.norm(ours.forward_intermediates(x)[0]) - ref.forward_features(x)).abs().max() < 1e-5


def test_bilinear_resize_of_a_2x2_grid_by_hand():
    """align_corners=False: output pixel c of 4 samples the 2-grid at (c + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75,
    1.25, clamped to [0, 1]: 0, 0.25, 0.75, 1. The grid [[0, 1], [2, 3]] is 2 y + x, so the output is 2 y_r + x_c."""
    pos = torch.tensor([9.0, 0.0, 1.0, 2.0, 3.0]).view(1, 5, 1)   # CLS, then the 2x2 grid row by row
    out = gp.resize_pos_embed(pos, (4, 4), "bilinear")
    s = [0.0, 0.25, 0.75, 1.0]
    assert out[0, 0, 0] == 9.0
    assert out[0, 1:, 0].tolist() == [2 * y + x for y in s for x in s]


@pytest.mark.parametrize("mode,timm_mode,antialias", [("bicubic", "bicubic", False), ("bilinear", "bilinear", False),
                                                      ("bicubic-antialias", "bicubic", True)])
@pytest.mark.parametrize("new", [(32, 32), (4, 4), (6, 9)])
def test_resized_grid_matches_timms_resample(mode, timm_mode, antialias, new):
    """Classification resizes like the official code (bicubic), SETR-PUP's configs bilinearly, DINOv2 with
    registers as timm (antialiased): each equal to timm's resample_abs_pos_embed, CLS position untouched."""
    from timm.layers import resample_abs_pos_embed
    pos = torch.randn(1, 1 + 14 * 14, 8, generator=torch.Generator().manual_seed(0))
    expected = resample_abs_pos_embed(pos, list(new), (14, 14), num_prefix_tokens=1, interpolation=timm_mode,
                                      antialias=antialias)
    out = gp.resize_pos_embed(pos, new, mode)
    assert out.shape == (1, 1 + new[0] * new[1], 8) and torch.equal(out[:, 0], pos[:, 0])
    assert torch.allclose(out, expected, atol=1e-6)


def test_resized_grid_is_what_the_forward_adds_to_the_patches():
    """The model keeps the stored 14x14 grid and adds it, resized to each input's grid (bilinear here), to the
    patch tokens: checked against the patch projection and timm's resample written out in the test."""
    from timm.layers import resample_abs_pos_embed
    tiny_vit = dict(embed_dim=8, depth=1, num_heads=1, pos_embed_interpolation="bilinear")
    source = gp.build_model("vit_base", method="linear", num_classes=0, vit_overrides=tiny_vit)   # 224 px: 14x14
    pos = source.pos_embed.detach()
    model = gp.build_model("vit_base", method="linear", num_classes=0, img_size=64, vit_overrides=tiny_vit,
                           checkpoint=source.backbone_state_dict())
    assert torch.equal(model.pos_embed, pos)   # the file's own grid, not one for 64 px
    x = torch.randn(1, 3, 48, 80)
    resized = resample_abs_pos_embed(pos, [3, 5], (14, 14), num_prefix_tokens=1, interpolation="bilinear",
                                     antialias=False)
    patches = torch.nn.functional.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=16)
    with torch.no_grad():
        tokens = model.embed(x)
    assert torch.allclose(tokens[:, 1:], patches.flatten(2).transpose(1, 2) + resized[:, 1:], atol=1e-6)
    assert torch.allclose(tokens[:, 0], model.cls_token[:, 0] + pos[:, 0])


@pytest.mark.parametrize("arch,timm_name", [("vit_small", "vit_small_patch16_224"), ("vit_base", "vit_base_patch16_224"),
                                            ("vit_large", "vit_large_patch16_224"), ("vit_huge", "vit_huge_patch14_224")])
def test_architectures_have_the_published_sizes(arch, timm_name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = gp.build_model(arch, method="linear", num_classes=0)
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref
    published = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16),
                 "vit_huge": (1280, 32, 16)}[arch]   # (width, depth, heads) of timm / DINO / DeiT
    assert (ours.cfg.embed_dim, ours.cfg.depth, ours.cfg.num_heads) == published
    assert ours.cfg.num_heads == ref.blocks[0].attn.num_heads
    mocov3 = gp.vit_config(arch, "mocov3")   # MoCo v3's ViT-S has 12 heads (REFERENCE.md section 2)
    assert mocov3.num_heads == (12 if arch == "vit_small" else published[2])


# --- Eq. 6-7: gates ------------------------------------------------------------------

def test_all_gates_open_and_unit_temperature_is_vpt_shallow():
    """Section 4.3: VPT-shallow is the special case g_l = 1 for all l, tau = 1."""
    gated = tiny("gated+temp")
    with torch.no_grad():
        gated.gate_logits.fill_(float("inf"))
        gated.temperatures.fill_(1.0)
    shallow = copy_shared(gated, tiny("vpt-shallow"))
    assert torch.equal(gated(IMAGES), shallow(IMAGES))


def test_closed_gates_leave_prompts_unchanged_until_the_last_block():
    model = tiny("gated", depth=4)
    with torch.no_grad():
        model.gate_logits.fill_(-float("inf"))
    _, outs = model.forward_intermediates(IMAGES, blocks=(1, 2, 3, 4))
    P = model.num_prompts
    for block in (1, 2, 3):
        assert torch.equal(outs[block][:, 1:1 + P], model.prompts.expand(2, -1, -1))
    assert not torch.allclose(outs[4][:, 1:1 + P], model.prompts.expand(2, -1, -1))  # last block is ungated


def test_gates_start_at_sigmoid_of_minus_gate_init():
    model = tiny("gated", gate_init=5.0)
    assert model.gate_logits.shape == (model.cfg.depth - 1,)
    assert torch.allclose(model.gates(), torch.full((3,), 1 / (1 + math.exp(5.0))))


def test_eq8_closed_form_equals_recursion():
    """Z_P^{L-1} = prod(1-g) P + sum_l prod_{m>l}(1-g_m) g_l Z~_P^l (Eq. 8, weights of Eq. 10)."""
    model = tiny("gated+temp", depth=5)
    with torch.no_grad():
        model.gate_logits.copy_(torch.tensor([0.3, -1.0, 2.0, -0.5]))
        model.temperatures.copy_(torch.tensor([0.7, 1.3, 1.0, 2.0, 0.5]))
    L, P = 5, model.num_prompts
    _, outs = model.forward_intermediates(IMAGES, blocks=tuple(range(1, L)))
    outs[0] = torch.cat([model.embed(IMAGES)[:, :1], model.prompts.expand(2, -1, -1), model.embed(IMAGES)[:, 1:]], 1)
    with torch.no_grad():  # Z~_P^l: block l applied to the (gated) input of block l, before gating
        z_tilde = [model.blocks[l - 1](outs[l - 1], model.temperatures[l - 1])[:, 1:1 + P] for l in range(1, L)]
    w_p, g_tilde = model.aggregation_weights()
    closed = w_p * model.prompts + sum(g_tilde[l].item() * z_tilde[l] for l in range(L - 1))
    assert torch.allclose(closed, outs[L - 1][:, 1:1 + P], atol=1e-5)


def test_selection_ratios_follow_eq10_11():
    model = tiny("gated", depth=4)
    g = torch.tensor([0.5, 0.25, 0.8])
    with torch.no_grad():
        model.gate_logits.copy_(torch.log(g / (1 - g)))
    # by hand: g~3 = 0.8, g~2 = 0.25 * 0.2 = 0.05, g~1 = 0.5 * 0.75 * 0.2 = 0.075; sum 0.925
    expected = torch.tensor([0.075, 0.05, 0.8]) / 0.925
    r = model.selection_ratio()
    assert torch.allclose(r, expected, atol=1e-6)
    assert abs(r.sum().item() - 1) < 1e-6
    w_p, _ = model.aggregation_weights()
    assert abs(float(w_p) - 0.5 * 0.75 * 0.2) < 1e-6  # the weight of the input prompts P in Eq. 8


def test_hard_gates_are_binary_with_straight_through_gradient():
    model = tiny("gated-hard")
    assert set(model.gates().tolist()) <= {0.0, 1.0}  # eval: deterministic threshold
    model.train()
    torch.manual_seed(0)
    g = model.gates()
    assert set(g.detach().tolist()) <= {0.0, 1.0}
    model(IMAGES).sum().backward()
    assert model.gate_logits.grad is not None and model.gate_logits.grad.abs().sum() > 0


# --- Eq. 9: temperatures ----------------------------------------------------------------

def test_temperature_divides_attention_logits():
    model = tiny("gated+temp")
    x = model.blocks[0].norm1(model.embed(IMAGES))
    attn_1 = model.blocks[0].attn.probabilities(x, torch.tensor(1.0))
    attn_half = model.blocks[0].attn.probabilities(x, torch.tensor(0.5))
    logits_1 = attn_1.log()  # log-softmax up to a per-row constant
    logits_half = attn_half.log()
    centred = lambda z: z - z.mean(-1, keepdim=True)
    assert torch.allclose(centred(logits_half), 2 * centred(logits_1), atol=1e-4)


def test_temperatures_are_projected_into_range_and_keep_gradients():
    model = tiny("gated+temp").train()
    with torch.no_grad():
        model.temperatures.copy_(torch.tensor([20.0, 0.001, 1.0, 5.0]))
    model(IMAGES).sum().backward()
    assert model.temperatures.tolist() == pytest.approx([20.0, 0.001, 1.0, 5.0])  # the forward changes nothing
    assert (model.temperatures.grad != 0).all()  # no clamp inside the graph
    gp.project_temperatures(torch.nn.Sequential(model))   # finds the ViT inside a wrapper
    assert model.temperatures.tolist() == pytest.approx([10.0, 0.01, 1.0, 5.0])


# --- attention paths and training -------------------------------------------------------

def test_fused_and_explicit_attention_agree_fp32():
    fused = tiny("gated+temp")
    with torch.no_grad():
        fused.temperatures.copy_(torch.tensor([0.5, 1.5, 1.0, 3.0]))
    explicit = gp.VisionTransformer(gp.replace(fused.cfg, fused_attention=False), fused.pcfg).eval()
    explicit.load_state_dict(fused.state_dict())
    assert (fused(IMAGES) - explicit(IMAGES)).abs().max() < 1e-5


def test_attention_maps_are_row_stochastic_and_match_the_forward():
    model = tiny("gated+temp")
    maps = model.attention_maps(IMAGES, blocks=(1, 4))
    T = 1 + model.num_prompts + 16
    assert set(maps) == {1, 4} and maps[4].shape == (2, 2, T, T)
    assert torch.allclose(maps[1].sum(-1), torch.ones(2, 2, T), atol=1e-5)
    final_with_maps = model.forward_intermediates(IMAGES, blocks=(1, 4), attention=True)[0]
    assert torch.allclose(final_with_maps, model.forward_intermediates(IMAGES)[0], atol=1e-5)
    # Eq. 9 by hand for block 1: softmax(q k^T / (sqrt(d) tau)) over [CLS, prompts, patches]
    with torch.no_grad():
        model.temperatures[0] = 0.5
        maps = model.attention_maps(IMAGES, blocks=(1,))[1]
        x = torch.cat([model.embed(IMAGES)[:, :1], model.prompts.expand(2, -1, -1), model.embed(IMAGES)[:, 1:]], 1)
        blk = model.blocks[0]
        h = torch.nn.functional.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        q, k, _ = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(2, T, 3, 2, 16).permute(2, 0, 3, 1, 4)
        expected = (q @ k.transpose(-2, -1) / (math.sqrt(16) * 0.5)).softmax(-1)
    assert torch.allclose(maps, expected, atol=1e-6)


@pytest.mark.parametrize("method,trainable", [
    ("linear", {"head.weight", "head.bias"}),
    ("vpt-shallow", {"prompts", "head.weight", "head.bias"}),
    ("vpt-deep", {"prompts", "deep_prompts", "head.weight", "head.bias"}),
    ("gated+temp", {"prompts", "gate_logits", "temperatures", "head.weight", "head.bias"}),
])
def test_only_prompt_side_parameters_receive_gradients(method, trainable):
    model = tiny(method).train()
    torch.nn.functional.cross_entropy(model(IMAGES), torch.tensor([0, 1])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not model.blocks.training and model.training  # backbone stays in eval mode


def test_vpt_deep_replaces_prompts_before_every_later_block():
    """Eq. 5: block l sees [CLS, P^{l-1}, patches] -- the previous block's prompt outputs are dropped, not kept."""
    model = tiny("vpt-deep", depth=4)
    with torch.no_grad():
        model.deep_prompts.normal_()
    P = model.num_prompts
    assert model.deep_prompts.shape == (3, P, 32)
    _, outs = model.forward_intermediates(IMAGES, blocks=(1, 2, 3, 4))
    assert {t.shape[1] for t in outs.values()} == {1 + P + 16}   # the sequence never grows
    with torch.no_grad():
        for l in (2, 3, 4):
            prev = outs[l - 1]
            fed = torch.cat([prev[:, :1], model.deep_prompts[l - 2].expand(2, -1, -1), prev[:, 1 + P:]], dim=1)
            assert torch.equal(model.blocks[l - 1](fed), outs[l])


@pytest.mark.parametrize("ssl,timm_pool", [("mae", "avg"), ("mocov3", "token")])
def test_pooling_per_backbone(ssl, timm_pool):
    """Without prompts, timm's own pooling: MAE = timm global_pool='avg' with fc_norm (the mean of every token but
    CLS, then the pretrained norm), MoCo v3 = global_pool='token' (norm, then CLS)."""
    model = tiny("linear", ssl=ssl, num_classes=0)
    ref = timm_vit(model, 32, global_pool=timm_pool, fc_norm=timm_pool == "avg")
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(IMAGES), pre_logits=True)
        assert torch.allclose(model.forward_features(IMAGES), expected, atol=1e-5)


def test_mae_pooling_averages_the_prompts_too():
    """With prompts, MAE's mean runs over prompts and patches (not CLS): 3 prompts + 16 patches, by hand."""
    model = tiny("gated", ssl="mae")
    with torch.no_grad():
        tokens = model.forward_intermediates(IMAGES)[0]
        assert tokens.shape[1] == 1 + 3 + 16
        mean = tokens[:, 1:].sum(1) / 19
        expected = torch.nn.functional.layer_norm(mean, (32,), model.norm.weight, model.norm.bias, 1e-6)
        assert torch.allclose(model.forward_features(IMAGES), expected, atol=1e-6)


def test_prompt_init_range_and_dropout_only_in_training():
    model = tiny("vpt-shallow", prompt_dropout=0.5)
    bound = math.sqrt(6 / (3 * 8 * 8 + 32))
    assert model.prompts.abs().max() <= bound
    assert torch.equal(model(IMAGES), model(IMAGES))  # eval: deterministic
    model.train()
    torch.manual_seed(0)
    a = model(IMAGES)
    assert not torch.equal(a, model(IMAGES))


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_prompt_dropout_draws_a_mask_per_image(method):
    """The official code expands the prompts to the batch, then applies dropout: identical images in one batch
    get different prompt tokens while training (shallow prompts and every deep set), equal ones in eval mode."""
    model = tiny(method, prompt_dropout=0.5)
    P, seen = model.num_prompts, {}
    blocks = (1, 2, 3, 4) if method == "vpt-deep" else (1,)
    for l in blocks:   # what each block receives at the prompt positions
        model.blocks[l - 1].register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(l, args[0][:, 1:1 + P]))
    same = IMAGES[:1].expand(4, -1, -1, -1)
    model.train()
    torch.manual_seed(0)
    model(same)
    for l in blocks:
        assert not torch.equal(seen[l][0], seen[l][1]) and not torch.equal(seen[l][2], seen[l][3]), l
    model.eval()
    model(same)
    for l in blocks:
        assert all(torch.equal(seen[l][0], seen[l][i]) for i in (1, 2, 3)), l
    assert torch.equal(seen[1][0], model.prompts[0])


def test_head_is_initialised_as_the_official_head():
    """One Linear; weight kaiming_normal_(fan_out): std sqrt(2 / classes); bias -log(0.99 / 0.01) = -4.595."""
    torch.manual_seed(0)
    head = gp.classification_head(768, 5)
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (5, 768)
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 5), rel=0.05)
    assert head.weight.mean().abs().item() < 0.05
    assert torch.allclose(head.bias, torch.full((5,), -4.59512), atol=1e-4)
    model = tiny("gated+temp", num_classes=5)   # the model's head is that head
    assert torch.allclose(model.head.bias, torch.full((5,), -math.log(0.99 / 0.01)))
    assert 0.3 < model.head.weight.std().item() / math.sqrt(2 / 5) < 1.7   # 160 weights: a loose check


@pytest.mark.parametrize("make,message", [
    (lambda: gp.prompt_config("vpt-middle"), "method='vpt-middle' is not one of 'linear', 'vpt-shallow'"),
    (lambda: gp.PromptConfig(gates="hrad"), "gates='hrad' is not one of 'none', 'soft', 'hard'"),
    (lambda: gp.PromptConfig(prompt="deeep", gates="none"), "prompt='deeep' is not one of 'none', 'shallow', 'deep'"),
    (lambda: gp.PromptConfig(prompt="deep", gates="soft"), "gates act on prompts inserted once"),
    (lambda: gp.vit_config("vit_base", pool="avg"), "pool='avg' is not one of 'cls', 'mean'"),
    (lambda: gp.vit_config("vit_base", pos_embed_interpolation="nearest"), "pos_embed_interpolation='nearest'"),
    (lambda: gp.vit_config("vit_gaint"), "arch='vit_gaint' is not one of 'vit_small'"),
    (lambda: gp.vit_config("vit_giant", "dinov2"), "ViT-g/14 .DINOv2's SwiGLU MLP. is not supported"),
    (lambda: gp.vit_config("vit_base", "dinov4"), "ssl='dinov4' is not one of 'mae'"),
    (lambda: gp.vit_config("vit_base", pos_embed="sincos"), "pos_embed='sincos' is not one of 'learned', 'rope'"),
    (lambda: tiny("gated", insert_at=9), "insert_at must be in 1..4"),
])
def test_bad_configuration_is_refused(make, message):
    """Every enumerated option is checked: a typo raises, naming the allowed values, instead of running."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        make()


# --- a forward changes nothing (issue #18, point 1) -----------------------------------------

ALL_METHODS = list(gp.METHODS)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_two_forwards_then_one_backward(method):
    """Two augmented views and a consistency loss, or a validation forward / attention maps between forward and
    backward: the graph of the first forward must still be intact."""
    model = tiny(method).train()
    with torch.no_grad():
        if model.temperatures is not None:
            model.temperatures.copy_(torch.tensor([50.0, 0.001, 1.0, 2.0]))   # outside the range on purpose
    a = model(IMAGES)
    b = model(IMAGES.flip(-1))
    model.attention_maps(IMAGES, blocks=(1, 4))
    with torch.no_grad():
        model.eval()(IMAGES)
    model.train()
    ((a - b) ** 2).sum().add(a.sum()).backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_forward_leaves_the_state_dict_unchanged(method, mode):
    model = tiny(method).train(mode == "train")
    with torch.no_grad():
        if model.temperatures is not None:
            model.temperatures.copy_(torch.tensor([50.0, 0.001, 1.0, 2.0]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(IMAGES)
    model.attention_maps(IMAGES, blocks=(2,))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_temperatures_stay_in_range_through_training_steps():
    """The harness's one training step projects after optimizer.step(); SGD with a huge lr pushes every tau
    far outside [0.01, 10] each step."""
    from harness import runtime
    model = tiny("gated+temp").train()
    opt = torch.optim.SGD([{"params": [model.temperatures], "lr": 1e4},   # huge: every step leaves the range
                           {"params": [p for p in model.trainable_parameters() if p is not model.temperatures],
                            "lr": 0.1}], momentum=0.9)
    loss = lambda out, y: (torch.nn.functional.cross_entropy(out.float(), y), {})
    step = runtime.make_train_step(model, opt, loss, torch.device("cpu"), bf16=False)
    seen = []
    for _ in range(4):
        step(IMAGES, torch.tensor([0, 1]))
        seen.append(model.temperatures.detach().clone())
    seen = torch.stack(seen)
    assert seen.min() >= 0.01 and seen.max() <= 10.0
    assert ((seen == 0.01) | (seen == 10.0)).any()   # the lr did push some tau to a bound
    assert torch.isfinite(model(IMAGES)).all()


def test_loading_prompts_projects_the_temperatures():
    model = tiny("gated+temp")
    state = {k: v.clone() for k, v in model.prompt_state_dict().items()}
    state["temperatures"] = torch.tensor([50.0, 0.001, 1.0, 2.0])
    model.load_prompt_state_dict(state)
    assert model.temperatures.tolist() == pytest.approx([10.0, 0.01, 1.0, 2.0])


# --- what an adopter hits (point 6) -----------------------------------------------------------

def test_num_classes_0_is_an_identity_head_returning_features():
    model = tiny("gated+temp", num_classes=0)
    assert torch.equal(model(IMAGES), model.forward_features(IMAGES)) and model(IMAGES).shape == (2, 32)
    assert not any(k.startswith("head") for k in model.prompt_state_dict())


@pytest.mark.parametrize("method", ["linear", "vpt-shallow", "vpt-deep"])
def test_selection_ratio_of_a_method_without_gates_says_so(method):
    model = tiny(method)
    for call in (model.selection_ratio, model.aggregation_weights):
        with pytest.raises(ValueError, match=f"method '{method}' has no gates"):
            call()


def test_selection_ratio_is_zero_not_nan_when_no_block_contributes():
    """All gates closed (hard gates at init: logits < 0 -> g = 0 in eval) or insert_at = L (no gated block):
    the prompts reach block L unchanged, every r_l = 0 (documented in selection_ratio)."""
    hard = tiny("gated-hard", gate_init=5.0)
    assert hard.selection_ratio().tolist() == [0.0, 0.0, 0.0]
    last = tiny("gated+temp", insert_at=4)
    assert last.selection_ratio().tolist() == [0.0, 0.0, 0.0]
    w_p, _ = last.aggregation_weights()
    assert float(w_p) == 1.0


@pytest.mark.parametrize("blocks", [(13,), (0,), (1, 5)])
def test_attention_maps_of_a_block_that_does_not_exist_is_an_error(blocks):
    with pytest.raises(ValueError, match=r"blocks are numbered 1\.\.4"):
        tiny("gated+temp").attention_maps(IMAGES, blocks=blocks)


def test_double_precision_model_runs_in_float64():
    model = tiny("gated+temp").double()
    out = model(IMAGES.double())
    assert out.dtype == torch.float64
    ref = tiny("gated+temp")   # same seed, fp32
    assert (out - ref(IMAGES).double()).abs().max() < 1e-4
    ln = model.blocks[0].norm1
    x = torch.randn(3, 32, dtype=torch.float64) * 1e4 + 1e8   # fp32 statistics would lose this
    expected = torch.nn.functional.layer_norm(x, (32,), ln.weight, ln.bias, ln.eps)
    assert torch.allclose(ln(x), expected, atol=1e-9)


@pytest.mark.parametrize("size", [(30, 32), (32, 36), (4, 4)])
def test_image_size_not_a_multiple_of_the_patch_is_an_error(size):
    with pytest.raises(ValueError, match=rf"images of {size[0]}x{size[1]} px: .* multiples of the patch size 8"):
        tiny("gated+temp")(torch.randn(1, 3, *size))


def test_build_model_prints_nothing_by_default(capsys, tmp_path):
    model = gp.build_model("vit_base", method="linear", num_classes=0, img_size=32,
                           vit_overrides=dict(embed_dim=16, depth=1, num_heads=2, patch_size=8))
    torch.save(model.backbone_state_dict(), tmp_path / "sd.pth")
    gp.build_model("vit_base", method="linear", num_classes=0, img_size=32, checkpoint=tmp_path / "sd.pth",
                   vit_overrides=dict(embed_dim=16, depth=1, num_heads=2, patch_size=8))
    assert capsys.readouterr().out == ""


def test_public_names():
    assert {"build_model", "VisionTransformer", "load_backbone", "project_temperatures", "CheckpointError"} \
        <= set(gp.__all__)
    assert all(hasattr(gp, name) for name in gp.__all__)


# --- claims of the paper not covered above (point 7) --------------------------------------

def test_eq10_11_with_prompts_inserted_after_block_1():
    """insert_at k = 3 of L = 5: g~_l = 0 for l < k; g~_4 = g_4, g~_3 = g_3 (1 - g_4), by hand."""
    model = tiny("gated", depth=5, insert_at=3)
    g = torch.tensor([0.9, 0.7, 0.5, 0.25])
    with torch.no_grad():
        model.gate_logits.copy_(torch.log(g / (1 - g)))
    w_p, g_tilde = model.aggregation_weights()
    assert g_tilde.tolist() == pytest.approx([0.0, 0.0, 0.5 * 0.75, 0.25])
    assert float(w_p) == pytest.approx(0.5 * 0.75)
    assert model.selection_ratio().tolist() == pytest.approx([0, 0, 0.375 / 0.625, 0.25 / 0.625], abs=1e-6)
    # and the forward agrees: blocks 1..2 see no prompts, so closing their gates changes nothing
    other = copy_shared(model, tiny("gated", depth=5, insert_at=3))
    with torch.no_grad():
        other.gate_logits[:2] = -float("inf")
    assert torch.equal(other(IMAGES), model(IMAGES))


def test_gate_logits_before_insert_at_get_no_gradient():
    model = tiny("gated+temp", depth=5, insert_at=3).train()
    model(IMAGES).sum().backward()
    grad = model.gate_logits.grad
    assert torch.equal(grad[:2], torch.zeros(2)) and (grad[2:] != 0).all()


def test_vpt_deep_with_insert_at_k_has_L_minus_k_prompt_sets():
    """Figure 1 with VPT-deep: blocks before k see no prompts; k gets P, k+1..L get fresh sets (L - k of them)."""
    model = tiny("vpt-deep", depth=5, insert_at=2)
    P = model.num_prompts
    assert model.deep_prompts.shape == (5 - 2, P, 32)
    with torch.no_grad():
        model.deep_prompts.normal_()
    _, outs = model.forward_intermediates(IMAGES, blocks=(1, 2, 3, 4, 5))
    assert outs[1].shape[1] == 1 + 16 and outs[2].shape[1] == 1 + P + 16
    with torch.no_grad():
        fed = torch.cat([outs[1][:, :1], model.prompts.expand(2, -1, -1), outs[1][:, 1:]], dim=1)
        assert torch.equal(model.blocks[1](fed), outs[2])
        for l in (3, 4, 5):   # block l gets set l - k - 1 = l - 3
            fed = torch.cat([outs[l - 1][:, :1], model.deep_prompts[l - 3].expand(2, -1, -1), outs[l - 1][:, 1 + P:]], 1)
            assert torch.equal(model.blocks[l - 1](fed), outs[l])


def test_hard_gates_open_with_probability_sigmoid_gamma():
    """Gumbel-sigmoid: P(g = 1) = sigmoid(gamma). 20000 draws per logit: 4 standard errors < 0.015."""
    gamma = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    torch.manual_seed(0)
    draws = gp.hard_gates(gamma.expand(20000, -1), sample=True)   # element-wise: 20000 independent draws each
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(gamma)
    assert (draws.mean(0) - p).abs().max() < 4 * math.sqrt(0.25 / 20000)


def test_hard_gate_straight_through_gradient_is_sigmoid_prime_times_upstream():
    """Straight-through: d g / d gamma = sigmoid'(gamma + noise); with the noise fixed by the seed, recompute the
    noise as hard_gates draws it (torch.rand_like) and compare with the gradient for an upstream vector."""
    gamma = torch.tensor([-1.0, 0.3, 2.0], requires_grad=True)
    upstream = torch.tensor([0.5, -2.0, 3.0])
    torch.manual_seed(5)
    (gp.hard_gates(gamma, sample=True) * upstream).sum().backward()
    torch.manual_seed(5)
    u = torch.rand(3).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid(gamma.detach() + torch.log(u) - torch.log(1 - u))
    assert torch.allclose(gamma.grad, s * (1 - s) * upstream, atol=1e-6)


def test_the_block_loop_runs_a_prompt_side_per_image_with_gradients():
    """The per-image form of the one block loop (what MultiTask uses): two runs on one backbone, each with its own
    prompts, gates and temperatures, stacked and indexed per image, give each run's own features in one batch,
    and the gradient of each image reaches its own run's parameters only."""
    a = tiny("gated+temp")
    b = copy_shared(a, tiny("gated+temp"))
    with torch.no_grad():
        b.prompts.normal_()
        b.gate_logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
        b.temperatures.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))
    run = torch.tensor([0, 1, 1])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    prompts = torch.stack([a.prompts[0], b.prompts[0]])[run]       # [B, P, D]
    gates = torch.stack([a.gates(), b.gates()])[run]                # [B, L - 1]
    taus = torch.stack([a.temperatures, b.temperatures])[run]       # [B, L]
    plan = [gp.PromptStep(write=prompts if l == 1 else None, tau=taus[:, l - 1].view(3, 1, 1, 1),
                          gate=gates[:, l - 1].view(3, 1, 1) if l < 4 else None) for l in range(1, 5)]
    features = a.pool(a.run_blocks(images, plan)[0])
    with torch.no_grad():
        assert torch.allclose(features[:1], a.forward_features(images[:1]), atol=1e-6)
        assert torch.allclose(features[1:], b.forward_features(images[1:]), atol=1e-6)
    features[1:].sum().backward()
    assert a.prompts.grad is None or not a.prompts.grad.any()
    assert b.prompts.grad.abs().sum() > 0 and (b.gate_logits.grad != 0).all() and (b.temperatures.grad != 0).all()


def test_param_groups_keep_weight_decay_off_gates_temperatures_and_biases():
    """AdamW (lr 1e-2, decay 0.05) for 200 steps with zero gradients: decay alone multiplies what it touches by
    (1 - 1e-2 * 0.05)^200 = 0.9048 (by hand; the trial's lr 1e-3 took 2,000 steps). With gp.param_groups tau
    stays 1 and the gate logits and biases stay where they were, while the prompts and the head weight decay;
    with plain trainable_parameters tau drifts 1 -> 0.905."""
    model = tiny("gated+temp")
    groups = gp.param_groups(torch.nn.Sequential(model), weight_decay=0.05)   # finds the ViT inside a wrapper
    name = {id(p): n for n, p in model.named_parameters()}
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert {name[id(p)] for p in groups[0]["params"]} == {"prompts", "head.weight"}
    assert {name[id(p)] for p in groups[1]["params"]} == {"gate_logits", "temperatures", "head.bias"}
    plain = tiny("gated+temp")
    for params in (groups, plain.trainable_parameters()):
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
        for p in model.trainable_parameters() + plain.trainable_parameters():
            p.grad = torch.zeros_like(p)
        for _ in range(200):
            opt.step()
    fresh = dict(tiny("gated+temp").named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, fresh[n] * (0.9048 if n in ("prompts", "head.weight") else 1.0), rtol=2e-4), n
    assert plain.temperatures.tolist() == pytest.approx([0.9048] * 4, abs=1e-4)
