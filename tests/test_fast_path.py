"""The fast path (bf16 autocast + fused SDPA attention, as runtime.make_train_step trains) computes the same
model as the reference path (fp32, explicit softmax attention: the official code's numerics).

Tolerances:
  * SDPA vs explicit softmax, both fp32: the same math in another order, so only rounding differs
    (~1e-7 relative): 1e-5 of the logit scale.
  * bf16 vs fp32 logits: bf16 keeps 8 mantissa bits, a relative rounding error of 2^-9 ~ 0.2% per
    operation; through a few blocks of matmuls, norms and softmax this grows to ~1% of the logit scale
    (measured ~0.7% here), so 5e-2 of the logit scale leaves a wide margin while still catching a
    wrong kernel, a missing temperature or a lost gate (those change logits by O(1)).
  * training curves: the same function and optimizer, so losses agree to bf16 rounding step by step.
torch.compile stays out of these tests (minutes on a small CPU); it only fuses the same operations.
"""
import torch

import gated_prompt as gp
from harness import runtime
from harness import classification

CPU = torch.device("cpu")


def build(fused, state=None, num_prompts=4, gate_init=0.0):
    """A small random ViT (D = 32, 2 blocks, 16 patches) with weights at a realistic O(1) activation
    scale (the default 0.02 init makes attention almost uniform and hides attention bugs). gate_init 0
    gives gates of 0.5, so gates, temperatures and prompts all matter to the output. No prompt dropout,
    so both paths compute the same deterministic function."""
    torch.manual_seed(0)
    cfg = gp.vit_config("vit_small", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                        fused_attention=fused)
    model = gp.VisionTransformer(cfg, gp.prompt_config("gated+temp", num_classes=10, num_prompts=num_prompts,
                                                       gate_init=gate_init, prompt_dropout=0.0))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
        model.pos_embed.normal_(0, 1)
        model.prompts.normal_(0, 1)
        model.temperatures.copy_(torch.tensor([0.7, 1.5]))
    if state is not None:
        model.load_state_dict(state)
    return model


def pair():
    fast = build(True)
    return fast, build(False, state=fast.state_dict())


def images(n=8, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_sdpa_matches_explicit_softmax_fp32():
    fast, ref = pair()
    fast.eval(), ref.eval()
    x = images()
    assert rel_err(fast(x), ref(x)) < 1e-5
    attn = fast.blocks[0].attn   # one layer with a temperature, both kernels
    tokens = torch.randn(2, 7, 32)
    tau = torch.tensor(0.3)
    fused_out, _ = attn(tokens, tau)
    attn.fused = False
    explicit_out, _ = attn(tokens, tau)
    attn.fused = True
    assert rel_err(fused_out, explicit_out) < 1e-5


@torch.no_grad()
def test_bf16_fast_path_logits_match_fp32_reference():
    fast, ref = pair()
    fast.eval(), ref.eval()
    x = images()
    reference = ref(x)
    with runtime.autocast(CPU, bf16=True):
        logits = fast(x)
    assert logits.dtype == torch.bfloat16          # the fast path really ran in bf16
    assert reference.abs().max() > 0.5             # logits are not trivially small
    assert rel_err(logits, reference) < 5e-2
    assert rel_err(logits, reference) > 0          # ...and really differ from fp32


@torch.no_grad()
def test_residual_stream_stays_bf16_under_autocast():
    """Only the patch embedding's output decides the stream's dtype: after the first block and after a gate it
    is bf16, while gates, temperatures and LayerNorm parameters stay fp32."""
    fast, _ = pair()
    fast.eval()
    seen = {}
    fast.blocks[0].register_forward_hook(lambda m, args, out: seen.__setitem__("after block 1", out[0]))
    fast.blocks[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("after gate 1", args[0]))
    with runtime.autocast(CPU, bf16=True):
        fast(images())
    assert seen["after block 1"].dtype == seen["after gate 1"].dtype == torch.bfloat16
    assert fast.gates().dtype == fast.temperatures.dtype == fast.blocks[0].norm1.weight.dtype == torch.float32


@torch.no_grad()
def test_frozen_weights_stored_in_bf16_give_bit_identical_logits():
    """Storing the frozen Linear / patch-embedding weights in bf16 feeds autocast's matmuls exactly the bf16
    values it would cast to itself: the logits are bit-identical, with half the weight memory."""
    fast, _ = pair()
    stored = build(True, state=fast.state_dict()).store_frozen_weights(torch.bfloat16)
    fast.eval(), stored.eval()
    assert stored.blocks[0].attn.qkv.weight.dtype == stored.patch_embed.proj.bias.dtype == torch.bfloat16
    assert stored.blocks[0].norm1.weight.dtype == stored.pos_embed.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in stored.trainable_parameters())
    x = images()
    with runtime.autocast(CPU, bf16=True):
        assert torch.equal(fast(x), stored(x))


def test_training_curves_match():
    """30 SGD steps on one fixed batch through runtime.make_train_step: bf16 + SDPA vs fp32 + explicit."""
    x, y = images(16), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    fast, ref = pair()
    curves = {}
    for name, model, bf16 in (("fast", fast, True), ("reference", ref, False)):
        model.train()
        optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9)
        step = runtime.make_train_step(model, optimizer, classification.classification_loss, CPU, bf16=bf16, compile=False)
        curves[name] = torch.stack([step(x, y)[0] for _ in range(30)]).tolist()
    fast, ref = curves["fast"], curves["reference"]
    for i, (f, r) in enumerate(zip(fast, ref)):
        assert abs(f - r) <= 0.02 + 0.03 * r, f"step {i}: fast {f:.4f} vs reference {r:.4f}"
    for curve in (fast, ref):   # both actually learn the batch
        assert curve[-1] < 0.5 * curve[0]
