"""Every checkpoint format of REFERENCE.md section 2, written from a random model in exactly that layout,
loads and gives the source model's features; bad files give an error naming file, format and keys."""
import numpy as np
import pytest
import torch

import gated_prompt as gp

D, DEPTH, HEADS, PATCH = 32, 2, 2, 8
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def small_vit(ssl="mae", width=D, depth=DEPTH, seed=0):
    torch.manual_seed(seed)
    cfg = gp.vit_config("vit_base", ssl, embed_dim=width, depth=depth, num_heads=HEADS, img_size=32, patch_size=PATCH)
    return gp.VisionTransformer(cfg, gp.prompt_config("linear", num_classes=0)).eval()


@pytest.fixture(scope="module")
def source():
    return small_vit(seed=7)


def timm_sd(model):
    return {k: v.clone() for k, v in model.backbone_state_dict().items()}


def features(model):
    with torch.no_grad():
        return model.forward_features(IMAGES)

# --- writers, one per real layout ------------------------------------------------------


def write_mae(model, path):  # mae_pretrain_vit_base.pth: {'model': encoder state dict}
    torch.save({"model": timm_sd(model)}, path)


def write_mae_with_decoder(model, path):  # the MAE "visualize" files also carry the decoder
    sd = timm_sd(model)
    sd.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, D),
               "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_blocks.0.attn.qkv.weight": torch.zeros(48, 16),
               "decoder_pred.weight": torch.zeros(192, 16)})
    torch.save({"model": sd}, path)


def write_mocov3_linear(model, path):  # linear-vit-b-300ep.pth.tar
    sd = {"module." + k: v for k, v in timm_sd(model).items()}
    sd["module.head.weight"], sd["module.head.bias"] = torch.zeros(1000, D), torch.zeros(1000)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1000, D))], lr=0.1, momentum=0.9)
    torch.save({"epoch": 90, "arch": "vit_base", "state_dict": sd, "best_acc1": 76.7,
                "optimizer": opt.state_dict()}, path)


def write_mocov3_pretrain(model, path):  # vit-b-300ep.pth.tar
    sd = {}
    for k, v in timm_sd(model).items():
        sd["module.base_encoder." + k] = v
        sd["module.momentum_encoder." + k] = v + 1
    for enc in ("base_encoder", "momentum_encoder"):  # 3-layer MLP projector in place of the head
        for i, (o, n) in enumerate([(4096, D), (4096, 4096), (256, 4096)]):
            sd[f"module.{enc}.head.{3 * i}.weight"] = torch.zeros(o, n) if o < 4096 or n < 4096 else torch.zeros(1)
    sd["module.predictor.0.weight"] = torch.zeros(4096, 256)
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 0}}, path)


def write_timm(model, path):  # torch.save(timm_model.state_dict()), with a classifier head
    sd = timm_sd(model)
    sd["head.weight"], sd["head.bias"] = torch.zeros(10, D), torch.zeros(10)
    torch.save(sd, path)


def hf_sd(model, v5=False, prefix="vit."):
    """Hugging Face ViTModel / ViTMAEModel names (hub files), or the transformers 5 in-memory names."""
    sd, src = {}, timm_sd(model)
    sd[prefix + "embeddings.cls_token"] = src["cls_token"]
    sd[prefix + "embeddings.position_embeddings"] = src["pos_embed"]
    for p in ("weight", "bias"):
        sd[f"{prefix}embeddings.patch_embeddings.projection.{p}"] = src[f"patch_embed.proj.{p}"]
        sd[f"{prefix}layernorm.{p}"] = src[f"norm.{p}"]
        for i in range(model.cfg.depth):
            b = f"blocks.{i}."
            layer = f"{prefix}layers.{i}." if v5 else f"{prefix}encoder.layer.{i}."
            q, k, v = src[b + f"attn.qkv.{p}"].chunk(3)
            names = (["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"]
                     if v5 else ["attention.attention.query", "attention.attention.key", "attention.attention.value",
                                 "attention.output.dense", "intermediate.dense", "output.dense"])
            for name, t in zip(names, [q, k, v, src[b + f"attn.proj.{p}"], src[b + f"mlp.fc1.{p}"], src[b + f"mlp.fc2.{p}"]]):
                sd[layer + name + "." + p] = t
            sd[layer + f"layernorm_before.{p}"] = src[b + f"norm1.{p}"]
            sd[layer + f"layernorm_after.{p}"] = src[b + f"norm2.{p}"]
    return sd


def write_hf_vit_bin(model, path):  # pytorch_model.bin of ViTForImageClassification
    sd = hf_sd(model)
    sd["classifier.weight"], sd["classifier.bias"] = torch.zeros(10, D), torch.zeros(10)
    torch.save(sd, path)


def write_hf_vitmae_safetensors(model, path):  # model.safetensors of ViTMAEForPreTraining
    safetensors = pytest.importorskip("safetensors.torch")
    sd = hf_sd(model)
    sd["decoder.decoder_embed.weight"] = torch.zeros(16, D)
    sd["decoder.mask_token"] = torch.zeros(1, 1, 16)
    safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def write_hf_v5(model, path):  # state_dict() of a live transformers-5 ViTModel (no prefix)
    torch.save(hf_sd(model, v5=True, prefix=""), path)


def write_npz(model, path):
    """Google vit_jax ViT-B_16.npz: flax names, HWIO conv, [in,out] dense, q/k/v [D,H,Dh], out [H,Dh,D]."""
    src, D, H = timm_sd(model), model.cfg.embed_dim, model.cfg.num_heads
    Dh = D // H
    a = {"cls": src["cls_token"], "Transformer/posembed_input/pos_embedding": src["pos_embed"],
         "embedding/kernel": src["patch_embed.proj.weight"].permute(2, 3, 1, 0),
         "embedding/bias": src["patch_embed.proj.bias"],
         "Transformer/encoder_norm/scale": src["norm.weight"], "Transformer/encoder_norm/bias": src["norm.bias"],
         "head/kernel": torch.zeros(D, 10), "head/bias": torch.zeros(10),
         "pre_logits/kernel": torch.zeros(D, D), "pre_logits/bias": torch.zeros(D)}
    for i in range(model.cfg.depth):
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for ln, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            a[g + ln + "/scale"], a[g + ln + "/bias"] = src[b + ours + ".weight"], src[b + ours + ".bias"]
        for name, w, bias in zip(("query", "key", "value"), src[b + "attn.qkv.weight"].chunk(3), src[b + "attn.qkv.bias"].chunk(3)):
            a[g + f"MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(D, H, Dh)
            a[g + f"MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(H, Dh)
        a[g + "MultiHeadDotProductAttention_1/out/kernel"] = src[b + "attn.proj.weight"].T.reshape(H, Dh, D)
        a[g + "MultiHeadDotProductAttention_1/out/bias"] = src[b + "attn.proj.bias"]
        for j, fc in ((0, "fc1"), (1, "fc2")):
            a[g + f"MlpBlock_3/Dense_{j}/kernel"] = src[b + f"mlp.{fc}.weight"].T
            a[g + f"MlpBlock_3/Dense_{j}/bias"] = src[b + f"mlp.{fc}.bias"]
    np.savez(path, **{k: v.numpy() for k, v in a.items()})


def write_npz_opt_target(model, path):  # big_vision / augreg files: the same arrays under opt/target/
    write_npz(model, path)
    arrays = dict(np.load(path))
    np.savez(path, **{"opt/target/" + k: v for k, v in arrays.items()})


WRITERS = {
    "mae_pretrain_vit_base.pth": (write_mae, "timm / MAE"),
    "mae_visualize_vit_base.pth": (write_mae_with_decoder, "timm / MAE"),
    "linear-vit-b-300ep.pth.tar": (write_mocov3_linear, "MoCo v3 linear-probe"),
    "vit-b-300ep.pth.tar": (write_mocov3_pretrain, "MoCo v3 pretrain"),
    "vit_base_patch16_224.mae.pth": (write_timm, "timm / MAE"),
    "pytorch_model.bin": (write_hf_vit_bin, "Hugging Face ViT"),
    "model.safetensors": (write_hf_vitmae_safetensors, "Hugging Face ViT"),
    "vit_transformers5.pth": (write_hf_v5, "Hugging Face ViT (transformers 5)"),
    "ViT-B_16.npz": (write_npz, "npz (Google ViT)"),
    "augreg_ViT-B_16.npz": (write_npz_opt_target, "npz (Google ViT)"),
}


@pytest.mark.parametrize("filename", list(WRITERS))
def test_every_format_loads_and_gives_the_source_features(filename, source, tmp_path):
    write, fmt = WRITERS[filename]
    path = tmp_path / filename
    write(source, path)
    target = small_vit(seed=1)  # different random weights before loading
    report = gp.load_backbone(target, path)
    assert fmt in report and "loaded" in report
    assert torch.allclose(features(target), features(source), atol=1e-6)


def test_irrelevant_keys_are_dropped_and_reported(source, tmp_path):
    write_mocov3_pretrain(source, tmp_path / "vit-b-300ep.pth.tar")
    report = gp.load_backbone(small_vit(), tmp_path / "vit-b-300ep.pth.tar")
    assert "momentum_encoder" in report and "head" in report and "predictor" in report


def test_npz_agrees_with_timms_own_npz_reader(source, tmp_path):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    write_npz(source, tmp_path / "ViT-B_16.npz")
    ref = timm_vit.VisionTransformer(img_size=32, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                     num_classes=10, global_pool="token").eval()
    timm_vit._load_weights(ref, str(tmp_path / "ViT-B_16.npz"))
    ours = small_vit(ssl="mocov3")
    gp.load_backbone(ours, tmp_path / "ViT-B_16.npz")
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(IMAGES), ref.forward_head(ref.forward_features(IMAGES), pre_logits=True), atol=1e-5)


def test_stored_position_embedding_is_used_and_resized(source, tmp_path):
    write_mae(source, tmp_path / "mae.pth")
    cfg = gp.vit_config("vit_base", "mae", embed_dim=D, depth=DEPTH, num_heads=HEADS, img_size=64, patch_size=PATCH)
    big = gp.VisionTransformer(cfg, gp.prompt_config("linear", num_classes=0))
    gp.load_backbone(big, tmp_path / "mae.pth")
    assert torch.equal(big.pos_embed, gp.resize_pos_embed(source.pos_embed, (8, 8)))


# --- bad files: one clear error each --------------------------------------------------------

def test_wider_deeper_checkpoint_into_smaller_model_names_the_problem(tmp_path):
    """A ViT-L file into a ViT-B (here a 64-wide, 4-deep file into a 32-wide, 2-deep model)."""
    write_mae(small_vit(width=64, depth=4), tmp_path / "mae_pretrain_vit_large.pth")
    with pytest.raises(gp.CheckpointError) as e:
        gp.load_backbone(small_vit(), tmp_path / "mae_pretrain_vit_large.pth")
    msg = str(e.value)
    assert "mae_pretrain_vit_large.pth" in msg and "timm / MAE" in msg
    assert "wrong shapes" in msg and "patch_embed.proj.weight" in msg
    assert "unexpected backbone keys" in msg and "[blocks 2-3]" in msg  # the extra depth
    assert "width 64, depth 4" in msg


def test_real_vit_large_shapes_into_vit_base_name_the_arch():
    with torch.device("meta"):
        large = gp.build_model("vit_large", method="linear", num_classes=0)
        base = gp.build_model("vit_base", method="linear", num_classes=0)
    sd = {k: torch.empty(v.shape) for k, v in large.backbone_state_dict().items() if not k.startswith("blocks.") or
          int(k.split(".")[1]) in (0, 23)}  # enough keys to recognise the architecture
    with pytest.raises(gp.CheckpointError, match="vit_large"):
        gp.load_backbone(base.to_empty(device="cpu"), sd)


def test_missing_backbone_key_is_an_error(source, tmp_path):
    sd = timm_sd(source)
    del sd["blocks.1.mlp.fc2.weight"]
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(gp.CheckpointError, match=r"missing backbone keys \(1\): blocks.1.mlp.fc2.weight"):
        gp.load_backbone(small_vit(), tmp_path / "broken.pth")


def test_unknown_extra_key_is_an_error_not_silently_dropped(source, tmp_path):
    sd = timm_sd(source)
    sd["blocks.0.attn.relative_position_bias_table"] = torch.zeros(3)
    torch.save(sd, tmp_path / "beit_like.pth")
    with pytest.raises(gp.CheckpointError, match="unexpected backbone keys.*relative_position_bias_table"):
        gp.load_backbone(small_vit(), tmp_path / "beit_like.pth")


def test_truncated_file_is_a_clear_error(source, tmp_path):
    write_mae(source, tmp_path / "mae.pth")
    data = (tmp_path / "mae.pth").read_bytes()
    (tmp_path / "mae.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(gp.CheckpointError, match="mae.pth: not a readable checkpoint"):
        gp.load_backbone(small_vit(), tmp_path / "mae.pth")


@pytest.mark.parametrize("content,kind", [("<html>404 Not Found</html>\n", "an HTML page"),
                                          ("model weights go here\n", "text")])
def test_text_file_is_not_a_checkpoint_file(tmp_path, content, kind):
    """e.g. a download that saved the server's error page: named as such, not a KeyError from the unpickler"""
    (tmp_path / "vit-b-300ep.pth.tar").write_text(content)
    with pytest.raises(gp.CheckpointError, match=f"vit-b-300ep.pth.tar is not a checkpoint file: it is {kind}"):
        gp.load_backbone(small_vit(), tmp_path / "vit-b-300ep.pth.tar")


def test_missing_file_and_non_vit_file(tmp_path):
    with pytest.raises(gp.CheckpointError, match="not found"):
        gp.load_backbone(small_vit(), tmp_path / "nope.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet50.pth")
    with pytest.raises(gp.CheckpointError, match="resnet50.pth: no ViT backbone keys"):
        gp.load_backbone(small_vit(), tmp_path / "resnet50.pth")


# --- loading runs no code from the file (issue #18, point 2) ------------------------------------

class WritesAMarker:
    """Unpickling this calls open(marker, 'w'): a stand-in for any code a pickled payload can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickled_payload_is_refused_and_never_runs(source, tmp_path, zip_format):
    marker = tmp_path / "payload_ran"
    torch.save({"model": timm_sd(source), "extra": WritesAMarker(marker)}, tmp_path / "mae.pth",
               _use_new_zipfile_serialization=zip_format)
    for load in (lambda: gp.load_backbone(small_vit(), tmp_path / "mae.pth"),
                 lambda: gp.build_model("vit_base", method="linear", num_classes=0, img_size=32,
                                        checkpoint=tmp_path / "mae.pth",
                                        vit_overrides=dict(embed_dim=D, depth=DEPTH, num_heads=HEADS, patch_size=PATCH)),
                 lambda: gp.read_checkpoint(tmp_path / "mae.pth")):
        with pytest.raises(gp.CheckpointError, match=r"mae.pth: the file pickles io.open, .*trust_pickle=True"):
            load()
        assert not marker.exists()
    # the explicit opt-in unpickles everything (so the payload above is a real one)
    target = small_vit(seed=1)
    gp.load_backbone(target, tmp_path / "mae.pth", trust_pickle=True)
    assert marker.exists() and torch.allclose(features(target), features(source), atol=1e-6)


def test_training_checkpoints_with_args_and_numpy_scalars_load_without_trust(source, tmp_path):
    """MAE / DINO / DeiT training files carry the run's argparse.Namespace; some store numpy scalars."""
    import argparse
    torch.save({"model": timm_sd(source), "optimizer": {"state": {}, "param_groups": []}, "epoch": 399,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75,
                                                                         input_size=224, output_dir="./out", resume=None),
                "max_accuracy": np.float64(83.6), "dtype": np.dtype("float32")}, tmp_path / "checkpoint-399.pth")
    target = small_vit(seed=1)
    assert "loaded" in gp.load_backbone(target, tmp_path / "checkpoint-399.pth")
    assert torch.allclose(features(target), features(source), atol=1e-6)


def test_a_fine_tuned_global_pool_file_names_fc_norm(source, tmp_path):
    """timm / MAE fine-tuned with global_pool: fc_norm after the pooling instead of norm."""
    sd = timm_sd(source)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    sd["head.weight"], sd["head.bias"] = torch.zeros(100, D), torch.zeros(100)
    torch.save({"model": sd}, tmp_path / "mae_finetuned_vit_base.pth")
    with pytest.raises(gp.CheckpointError, match=r"missing backbone keys \(2\): norm.weight[\s\S]*fc_norm"):
        gp.load_backbone(small_vit(), tmp_path / "mae_finetuned_vit_base.pth")


# --- what an independent trial hit: a Hugging Face folder, a misfit HF / npz file -------------------------

def test_a_hugging_face_model_folder_reads_the_weights_file_inside(source, tmp_path):
    """save_pretrained / hub snapshots are folders (config.json + model.safetensors or pytorch_model.bin)."""
    for weights, write in (("model.safetensors", write_hf_vitmae_safetensors), ("pytorch_model.bin", write_hf_vit_bin)):
        folder = tmp_path / weights.split(".")[0]
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "vit_mae"}')
        write(source, folder / weights)
        target = small_vit(seed=1)
        report = gp.load_backbone(target, folder)
        assert str(folder / weights) in report and "Hugging Face ViT" in report
        assert torch.allclose(features(target), features(source), atol=1e-6)
        built = gp.build_model("vit_base", method="linear", num_classes=0, img_size=32, checkpoint=folder,
                               vit_overrides=dict(embed_dim=D, depth=DEPTH, num_heads=HEADS, patch_size=PATCH))
        assert built.backbone_file == weights and torch.allclose(features(built.eval()), features(source), atol=1e-6)


@pytest.mark.parametrize("files,message", [
    (["config.json", "preprocessor_config.json"], r"is a folder, not a checkpoint file, and holds no model.safetensors "
                                                  r"or pytorch_model.bin \(it holds: config.json, preprocessor"),
    ([], r"\(it holds: nothing\)"),
    (["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"], r"a sharded checkpoint "
                                                                                           r"\(model.safetensors.index.json\)")])
def test_a_folder_without_weights_says_it_is_a_folder(tmp_path, files, message):
    folder = tmp_path / "dinov2-base"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}")
    for load in (lambda: gp.load_backbone(small_vit(), folder), lambda: gp.read_checkpoint(folder)):
        with pytest.raises(gp.CheckpointError, match=message) as err:
            load()
        assert str(folder) in str(err.value) and "not found" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin", "vit_transformers5.pth", "ViT-B_16.npz",
                                      "augreg_ViT-B_16.npz"])
def test_a_hugging_face_or_npz_file_of_another_size_names_its_architecture(filename, tmp_path):
    """A 64-wide, 4-block file (patch 8) into the 32-wide, 2-block model: the guess reads the format's own names
    (HF embeddings.patch_embeddings / encoder.layer.N, Google HWIO embedding/kernel and encoderblock_N)."""
    WRITERS[filename][0](small_vit(width=64, depth=4), tmp_path / filename)
    with pytest.raises(gp.CheckpointError, match=r"checkpoint looks like: ViT with width 64, depth 4, patch 8\)"):
        gp.load_backbone(small_vit(), tmp_path / filename)
