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

@pytest.mark.parametrize("img_size", [224, 512])
def test_vit_b16_matches_timm(img_size):
    """From-scratch ViT-B/16 = timm's VisionTransformer with the same weights (also at 512 px, resized grid)."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    ours = gp.build_model("vit_base", ssl="mocov3", method="linear", num_classes=0, img_size=224).eval()
    state = ours.backbone_state_dict()
    if img_size != 224:
        ours = gp.build_model("vit_base", ssl="mocov3", method="linear", num_classes=0, img_size=img_size).eval()
        gp.load_backbone(ours, state)  # resizes the 14x14 position grid to 32x32
        state = ours.backbone_state_dict()
    ref = timm_vit.VisionTransformer(img_size=img_size, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                     qkv_bias=True, num_classes=0,
                                     norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    ref.load_state_dict(state)
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        expected = ref.forward_features(x)
        got = ours.norm(ours.forward_tokens(x)[0])
    assert (got - expected).abs().max() < 1e-4


def test_resized_grid_is_bicubic_of_stored_grid():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = gp.resize_pos_embed(pos, (32, 32))
    assert out.shape == (1, 1 + 32 * 32, 8)
    assert torch.equal(out[:, 0], pos[:, 0])  # CLS position untouched
    grid = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, -1, 8))


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
    assert ours.cfg.num_heads == (12 if arch == "vit_small" else gp.ARCHS[arch][3])  # MoCo v3 ViT-S: 12 heads


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
    _, outs, _ = model.forward_tokens(IMAGES, out_blocks=(1, 2, 3, 4))
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
    _, outs, _ = model.forward_tokens(IMAGES, out_blocks=tuple(range(1, L)))
    outs[0] = torch.cat([model.embed(IMAGES)[:, :1], model.prompts.expand(2, -1, -1), model.embed(IMAGES)[:, 1:]], 1)
    with torch.no_grad():  # Z~_P^l: block l applied to the (gated) input of block l, before gating
        z_tilde = [model.blocks[l - 1](outs[l - 1], model.temperatures[l - 1])[0][:, 1:1 + P] for l in range(1, L)]
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
    x = model.embed(IMAGES)
    blk = model.blocks[0]
    _, attn_1 = blk(x, torch.tensor(1.0), return_attn=True)
    _, attn_half = blk(x, torch.tensor(0.5), return_attn=True)
    logits_1 = attn_1.log()  # log-softmax up to a per-row constant
    logits_half = attn_half.log()
    centred = lambda z: z - z.mean(-1, keepdim=True)
    assert torch.allclose(centred(logits_half), 2 * centred(logits_1), atol=1e-4)


def test_temperatures_are_projected_into_range_and_keep_gradients():
    model = tiny("gated+temp").train()
    with torch.no_grad():
        model.temperatures.copy_(torch.tensor([20.0, 0.001, 1.0, 5.0]))
    model(IMAGES).sum().backward()
    assert model.temperatures.tolist() == pytest.approx([10.0, 0.01, 1.0, 5.0])
    assert (model.temperatures.grad != 0).all()  # the projection is outside the graph


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
    final_with_maps = model.forward_tokens(IMAGES, attn_blocks=(1, 4))[0]
    assert torch.allclose(final_with_maps, model.forward_tokens(IMAGES)[0], atol=1e-5)


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
    model = tiny("vpt-deep", depth=4)
    assert model.deep_prompts.shape == (3, 3, 32)
    with torch.no_grad():
        model.deep_prompts.zero_()
    a = model(IMAGES)
    with torch.no_grad():
        model.deep_prompts[1].normal_()  # the prompts fed to block 3
    assert not torch.allclose(a, model(IMAGES))


@pytest.mark.parametrize("ssl,expected_pool", [("mae", "mean"), ("mocov3", "cls")])
def test_pooling_per_backbone(ssl, expected_pool):
    model = tiny("gated", ssl=ssl)
    tokens = model.forward_tokens(IMAGES)[0]
    if expected_pool == "mean":   # MAE: mean of all non-CLS tokens (prompts included), then the pretrained norm
        expected = model.norm(tokens[:, 1:].mean(1))
    else:                         # MoCo v3: norm, then CLS
        expected = model.norm(tokens)[:, 0]
    assert torch.allclose(model.forward_features(IMAGES), expected)


def test_prompt_init_range_and_dropout_only_in_training():
    model = tiny("vpt-shallow", prompt_dropout=0.5)
    bound = math.sqrt(6 / (3 * 8 * 8 + 32))
    assert model.prompts.abs().max() <= bound
    assert torch.equal(model(IMAGES), model(IMAGES))  # eval: deterministic
    model.train()
    torch.manual_seed(0)
    a = model(IMAGES)
    assert not torch.equal(a, model(IMAGES))


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        gp.prompt_config("vpt-middle")
    with pytest.raises(ValueError, match="insert_at"):
        tiny("gated", insert_at=9)
