"""Prompt packs (one self-describing file per trained prompt side) and MultiTask (many tasks in one batch through
one frozen backbone): round trips give identical logits, a pack onto another backbone is refused, a mixed batch
equals each task's own model, every finished run writes a pack."""
import json
import pickle
import warnings

import pytest
import torch

from bench import bench
import conftest
import fixtures
import gated_prompt as gp
from harness import config
from harness import results
from harness import runs
from harness import runtime

TINY = conftest.TINY_VIT
IMAGES = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def backbone(ssl="mae", seed=0, **vit):
    torch.manual_seed(seed)
    return gp.build_model("vit_base", ssl, "linear", num_classes=0, img_size=32, vit_overrides=dict(TINY, **vit),
                          verbose=False).eval()


def trained(base, method, num_prompts=4, num_classes=5, seed=1, **prompt):
    """A model on `base`'s weights whose prompt side looks trained: random prompts, gates of both signs, heads,
    temperatures in [0.5, 2]."""
    torch.manual_seed(seed)
    model = gp.VisionTransformer(base.cfg, gp.prompt_config(method, num_classes=num_classes, num_prompts=num_prompts,
                                                            **prompt))
    gp.load_backbone(model, base.backbone_state_dict())
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 0.5)
        if model.temperatures is not None:
            model.temperatures.uniform_(0.5, 2.0)
    return model.eval()


def logits(model, images=IMAGES):
    with torch.no_grad():
        return model(images)


def plain(value):
    """Only what weights_only loading allows without registering anything: tensors and plain data."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))


# --- packs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["linear", "vpt-shallow", "vpt-deep", "gated", "gated+temp", "gated-hard"])
def test_a_pack_round_trip_gives_identical_logits_from_a_file_a_state_dict_or_a_live_backbone(method, tmp_path):
    base = backbone()
    torch.save({"model": base.backbone_state_dict()}, tmp_path / "mae.pth")   # the MAE release layout
    model = trained(base, method, insert_at=2 if method == "gated" else 1)
    model.save_pack(tmp_path / "p.pt", class_names=list("abcde"), ssl="mae", task="cub", metrics={"test_acc": 80.5})
    raw = torch.load(tmp_path / "p.pt", weights_only=True)
    assert plain(raw) and raw["version"] == 2 and raw["ssl"] == "mae" and raw["class_names"] == list("abcde")
    assert raw["prompt"]["num_prompts"] == model.pcfg.num_prompts and raw["vit"]["pool"] == "mean"
    assert raw["info"] == {"task": "cub", "metrics": {"test_acc": 80.5}}
    for source in (tmp_path / "mae.pth", base.backbone_state_dict(), base):
        loaded = gp.load_pack(tmp_path / "p.pt", checkpoint=source)
        assert not loaded.training and loaded.pcfg == model.pcfg
        assert torch.equal(logits(loaded), logits(model))
    shared = gp.load_pack(tmp_path / "p.pt", checkpoint=base)
    assert shared.blocks[0].attn.qkv.weight.data_ptr() == base.blocks[0].attn.qkv.weight.data_ptr()  # not copied
    assert not any(p.requires_grad for n, p in shared.named_parameters() if n.startswith(gp.VisionTransformer.BACKBONE))


def test_the_fingerprint_identifies_the_weights_not_the_file_or_the_storage_dtype(tmp_path):
    import test_checkpoints as formats   # the real layouts, written by the checkpoint tests' writers
    base = formats.small_vit(seed=7)
    fingerprint = gp.backbone_fingerprint(base)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64
    for filename in ("model.safetensors", "ViT-B_16.npz", "linear-vit-b-300ep.pth.tar"):
        formats.WRITERS[filename][0](base, tmp_path / filename)
        other = formats.small_vit(seed=1)
        gp.load_backbone(other, tmp_path / filename)
        assert gp.backbone_fingerprint(other) == fingerprint, filename
    assert gp.backbone_fingerprint(formats.small_vit(seed=7).store_frozen_weights(torch.bfloat16)) == fingerprint
    nudged = formats.small_vit(seed=7)
    with torch.no_grad():
        nudged.blocks[1].mlp.fc2.bias[3] += 0.01
    assert gp.backbone_fingerprint(nudged) != fingerprint


def test_a_pack_onto_another_backbone_is_refused_naming_both_fingerprints_unless_strict_is_false(tmp_path):
    base, other = backbone(seed=0), backbone(seed=3)
    trained(base, "gated+temp").save_pack(tmp_path / "p.pt")
    torch.save({"model": other.backbone_state_dict()}, tmp_path / "other.pth")
    for source in (tmp_path / "other.pth", other):
        with pytest.raises(gp.CheckpointError, match="another backbone") as err:
            gp.load_pack(tmp_path / "p.pt", checkpoint=source)
        assert gp.backbone_fingerprint(base) in str(err.value) and gp.backbone_fingerprint(other) in str(err.value)
    with pytest.warns(UserWarning, match="strict=False.*fingerprint"):
        model = gp.load_pack(tmp_path / "p.pt", checkpoint=other, strict=False)
    assert model.blocks[0].attn.qkv.weight.data_ptr() == other.blocks[0].attn.qkv.weight.data_ptr()


def test_a_contradicting_configuration_is_refused_naming_the_field(tmp_path):
    trained(backbone(), "vpt-shallow").save_pack(tmp_path / "p.pt")
    cls_pooled = backbone(ssl="mocov3")   # the same weights, MoCo v3's CLS pooling
    with pytest.raises(gp.CheckpointError, match=r"pool: pack 'mean', backbone 'cls'"):
        gp.load_pack(tmp_path / "p.pt", checkpoint=cls_pooled)
    with pytest.raises(gp.CheckpointError, match="cannot load as 32-wide.*width 64"):   # load_backbone's error
        gp.load_pack(tmp_path / "p.pt", checkpoint=backbone(embed_dim=64).backbone_state_dict())


def test_foreign_and_missing_files_are_not_packs(tmp_path):
    base = backbone()
    torch.save({"model": base.backbone_state_dict()}, tmp_path / "mae.pth")
    torch.save(trained(base, "gated").prompt_state_dict(), tmp_path / "run.prompts.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with open(tmp_path / "objects.pt", "wb") as f:
        pickle.dump({"format": "gated-prompt-pack", "cfg": gp.ViTConfig()}, f, protocol=2)
    for name, message in (("missing.pt", "prompt pack not found"), ("mae.pth", "is not a prompt pack$"),
                          ("run.prompts.pt", "tensors without a pack's settings; a run's .prompts.pt is such a file"),
                          ("notes.txt", r"is not a prompt pack: not a file torch.save wrote, or a truncated one$"),
                          ("objects.pt", r"is not a prompt pack: it pickles Python objects, which a pack never holds "
                                         r"\(not unpickled: nothing in it ran\)$")):
        with pytest.raises(gp.CheckpointError, match=message), warnings.catch_warnings():
            warnings.simplefilter("error")   # one line, not torch's warnings about a foreign pickle before it
            gp.load_pack(tmp_path / name, checkpoint=base)
    with pytest.raises(ValueError, match="3 class names for a head of 5"):
        trained(base, "gated").save_pack(tmp_path / "p.pt", class_names=["a", "b", "c"])
    with pytest.raises(TypeError):   # info must be plain data
        trained(base, "gated").save_pack(tmp_path / "p.pt", when=object())


def test_existing_prompts_files_keep_loading(tmp_path):
    base = backbone()
    model = trained(base, "gated+temp")
    torch.save(model.prompt_state_dict(), tmp_path / "run.prompts.pt")
    fresh = gp.VisionTransformer(base.cfg, model.pcfg)
    gp.load_backbone(fresh, base.backbone_state_dict())
    fresh.load_prompt_state_dict(torch.load(tmp_path / "run.prompts.pt", weights_only=True))
    assert torch.equal(logits(fresh.eval()), logits(model))

def test_models_built_for_other_input_sizes_share_state_dicts_packs_and_fingerprints(tmp_path):
    """img_size is the default input size only: models built at 48 and 224 px from the same file store the file's
    own 4x4 position grid, load each other's whole state dicts and packs (both directions), fingerprint alike and
    give the same logits on any input size."""
    base = backbone()   # built at 32 px: a 4x4 grid, as a file from a 32 px pretraining would have
    torch.save({"model": base.backbone_state_dict()}, tmp_path / "mae.pth")
    small, large = (gp.build_model("vit_base", "mae", "gated+temp", num_classes=5, num_prompts=4, img_size=size,
                                   vit_overrides=TINY, checkpoint=tmp_path / "mae.pth").eval() for size in (48, 224))
    assert small.pos_embed.shape == large.pos_embed.shape == base.pos_embed.shape
    assert gp.backbone_fingerprint(small) == gp.backbone_fingerprint(large) == gp.backbone_fingerprint(base)
    images = torch.randn(2, 3, 64, 40)
    for source, target in ((large, small), (small, large)):
        with torch.no_grad():
            for p in source.trainable_parameters():
                p.normal_(0, 0.5)
        gp.project_temperatures(source)
        target.load_state_dict(source.state_dict())
        assert torch.equal(logits(target, images), logits(source, images))
        path = source.save_pack(tmp_path / "p.pack.pt")
        for backbone_of in (target, tmp_path / "mae.pth"):
            assert torch.equal(logits(gp.load_pack(path, checkpoint=backbone_of), images), logits(source, images))
        mt = gp.MultiTask(target, {"p": path})
        with torch.no_grad():
            assert (mt(images, ["p", "p"])[1] - logits(source, images)[1]).abs().max() <= 1e-5


def test_a_pack_records_ssl_input_transform_and_backbone_file(tmp_path):
    base = backbone()
    torch.save({"model": base.backbone_state_dict()}, tmp_path / "mae_pretrain_vit_base.pth")
    model = gp.build_model("vit_base", "mae", "gated+temp", num_classes=5, img_size=32, vit_overrides=TINY,
                           checkpoint=tmp_path / "mae_pretrain_vit_base.pth")
    pack = gp.read_pack(model.save_pack(tmp_path / "a.pack.pt"))
    assert pack["ssl"] == "mae" and pack["vit"]["ssl"] == "mae" and pack["backbone_url"] is None
    assert pack["backbone_file"] == "mae_pretrain_vit_base.pth"   # the name only: paths differ between machines
    assert pack["preprocess"] == {"size": 32, "resize": 36, "mean": [0.485, 0.456, 0.406],
                                  "std": [0.229, 0.224, 0.225]}   # shorter side 32 * 256 / 224, center crop 32
    url = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
    pack = gp.read_pack(model.save_pack(tmp_path / "b.pack.pt", preprocess={"resize": [32, 32], "mean": [0.5] * 3},
                                        backbone_url=url))
    assert pack["preprocess"] == {"size": 32, "resize": [32, 32], "mean": [0.5] * 3, "std": [0.229, 0.224, 0.225]}
    assert pack["backbone_url"] == url
    assert gp.load_pack(tmp_path / "b.pack.pt", checkpoint=tmp_path / "mae_pretrain_vit_base.pth").backbone_file \
        == "mae_pretrain_vit_base.pth"
    with pytest.raises(ValueError, match=r"preprocess keys \['crop'\] unknown"):
        model.save_pack(tmp_path / "c.pack.pt", preprocess={"crop": 224})


def test_save_pack_takes_numpy_and_torch_scalars_and_paths_and_names_anything_else(tmp_path):
    import numpy as np
    model = trained(backbone(), "gated+temp")
    path = model.save_pack(tmp_path / "p.pack.pt", task="cub", metrics={"test_acc": np.float64(80.5),
                           "epoch": np.int64(99), "loss": torch.tensor(0.25), "best": np.bool_(True)},
                           data_dir=tmp_path / "data", sizes=(224, np.int32(256)))
    info = gp.read_pack(path)["info"]
    assert info == {"task": "cub", "metrics": {"test_acc": 80.5, "epoch": 99, "loss": 0.25, "best": True},
                    "data_dir": str(tmp_path / "data"), "sizes": [224, 256]}
    assert type(info["metrics"]["epoch"]) is int and type(info["metrics"]["best"]) is bool
    for bad, where in (({"metrics": {"confusion": torch.ones(2, 2)}}, r"info\['metrics'\]\['confusion'\] is Tensor"),
                       ({"when": object()}, r"info\['when'\] is object"), ({"ids": {1: "a"}}, r"info\['ids'\] is dict")):
        with pytest.raises(TypeError, match=where) as err:
            model.save_pack(tmp_path / "q.pack.pt", **bad)
        assert "\n" not in str(err.value)


def test_a_version_1_pack_still_loads(tmp_path):
    """Packs written before the input transform, backbone file / URL and ViTConfig.ssl were recorded."""
    base = backbone()
    model = trained(base, "gated+temp")

    def as_version_1(pack):
        for field in ("preprocess", "backbone_file", "backbone_url"):
            del pack[field]
        del pack["vit"]["ssl"]
        pack["vit"]["pos_grid"] = 0   # version 1 wrote 0 for img_size // patch_size
        pack["version"] = 1
    path = rewrite(model.save_pack(tmp_path / "old.pack.pt", ssl="mae"), as_version_1)
    pack = gp.read_pack(path)
    assert (pack["preprocess"], pack["backbone_file"], pack["vit"]["ssl"]) == (None, None, "mae")
    assert torch.equal(logits(gp.load_pack(path, checkpoint=base)), logits(model))

# --- many tasks, one batch ----------------------------------------------------------------------------


def mixed_models(base):
    """Every required method, different prompt counts, class counts and insertion blocks; vpt-deep too."""
    return {"gated+temp": trained(base, "gated+temp", 6, 5, seed=1),
            "gated": trained(base, "gated", 2, 3, seed=2, insert_at=2),
            "vpt-shallow": trained(base, "vpt-shallow", 3, 7, seed=3),
            "linear": trained(base, "linear", 1, 4, seed=4),
            "vpt-deep": trained(base, "vpt-deep", 4, 6, seed=5),
            "gated-hard": trained(base, "gated-hard", 5, 2, seed=6)}


@pytest.mark.parametrize("ssl,fused", [("mae", True), ("mocov3", True), ("mae", False)])
def test_a_mixed_batch_equals_each_tasks_own_model_on_its_images(ssl, fused, tmp_path):
    base = backbone(ssl, fused_attention=fused)
    models = mixed_models(base)
    for name, model in models.items():
        model.save_pack(tmp_path / f"{name}.pt")
    torch.save({"model": base.backbone_state_dict()}, tmp_path / "mae.pth")
    tasks = ["gated+temp", "linear", "gated", "vpt-deep", "vpt-shallow", "gated-hard", "gated", "gated+temp",
             "vpt-deep", "linear", "vpt-shallow", "gated-hard"]
    images = torch.randn(len(tasks), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for source in (base, tmp_path / "mae.pth"):
        mt = gp.MultiTask(source, {name: tmp_path / f"{name}.pt" for name in models})
        with torch.no_grad():
            out = mt(images, tasks)
        for b, task in enumerate(tasks):
            own = logits(models[task], images[b:b + 1])[0]
            assert out[b].shape == own.shape
            assert (out[b] - own).abs().max() <= 1e-5, (task, (out[b] - own).abs().max())


def test_padded_prompts_change_nothing_and_the_batch_order_does_not_matter():
    base = backbone()
    few, many = trained(base, "gated+temp", 1, 3, seed=1), trained(base, "vpt-shallow", 9, 3, seed=2)
    alone = gp.MultiTask(base, {"few": few})
    mixed = gp.MultiTask(base, {"few": few, "many": many})
    with torch.no_grad():
        a = torch.stack(alone(IMAGES, ["few"] * len(IMAGES)))
        tasks = ["many", "few"] * len(IMAGES)
        b = torch.stack(mixed(IMAGES.repeat_interleave(2, 0), tasks)[1::2])
    assert (a - b).abs().max() <= 1e-5 and (a - logits(few)).abs().max() <= 1e-5


def test_multitask_takes_loaded_models_and_refuses_one_on_another_backbone():
    base = backbone()
    # any task name, dots included (a run's pack file name carries its lr: "...-lr0.1-...")
    models = {"a": trained(base, "gated+temp", 3, 4), "cub-lr0.1.v2": trained(base, "vpt-shallow", 2, 6)}
    mt = gp.MultiTask(base, models)
    with torch.no_grad():
        out = mt(IMAGES[:2], ["cub-lr0.1.v2", "a"])
    assert (out[0] - logits(models["cub-lr0.1.v2"], IMAGES[:1])[0]).abs().max() <= 1e-5 and out[1].shape == (4,)
    stranger = trained(backbone(seed=4), "gated", 2, 3)
    with pytest.raises(gp.CheckpointError, match="another backbone.*fingerprint"):
        gp.MultiTask(base, {"a": models["a"], "stranger": stranger})
    with pytest.raises(ValueError, match=r"unknown \['c'\]"):
        mt(IMAGES[:2], ["a", "c"])


def test_under_bf16_autocast_a_mixed_batch_stays_close_to_each_model():
    base = backbone()
    models = mixed_models(base)
    mt = gp.MultiTask(base, models)
    tasks = list(models)
    images = IMAGES[:len(tasks)] if len(IMAGES) >= len(tasks) else IMAGES.repeat(2, 1, 1, 1)[:len(tasks)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = mt(images, tasks)
        for b, task in enumerate(tasks):
            own = models[task](images[b:b + 1])[0]
            assert out[b].dtype == own.dtype and (out[b].float() - own.float()).abs().max() < 0.1

# --- the harness -----------------------------------------------------------------------------------------


def test_every_finished_run_writes_a_pack_that_loads_onto_its_backbone(tmp_path):
    """A tiny CUB run: the pack beside the .prompts.pt holds the same tensors, the run's settings, its metrics,
    the FGVC transform and the class folders' names; it loads onto the run's checkpoint file."""
    fixtures.write_fgvc_fixture(tmp_path / "data" / "CUB_200_2011", "cub", class_ids=(0, 1, 2), per_class=(2, 1, 1))
    torch.manual_seed(0)
    tiny = dict(TINY, patch_size=32)
    source = gp.build_model("vit_base", "mae", "linear", num_classes=0, vit_overrides=tiny, verbose=False)
    torch.save({"model": source.backbone_state_dict()}, tmp_path / "mae.pth")
    cfg = config.resolve("cub", "mae", arch_overrides=tiny, num_classes=3, epochs=1, warmup_epochs=0, num_prompts=2,
                          batch_size=8)   # its 6 training images in one step, not padded to the recipe's 64
    settings = runtime.Settings(results_dir=str(tmp_path / "results"), data_dir=str(tmp_path / "data"), quiet=True,
                                checkpoint=str(tmp_path / "mae.pth"))
    result = runs.run_one(cfg, "final", settings)
    files = results.run_files(settings.results_dir, cfg, "final")
    pack = gp.read_pack(files.pack)
    info = pack["info"]
    assert (info["task"], info["recipe"], info["protocol"], info["checkpoint"]) == ("cub", "paper", "final",
                                                                                  str(tmp_path / "mae.pth"))
    assert info["metrics"] == result["final"] and info["config"] == cfg.identity()
    assert info["transform"] == {"kind": "fgvc", "resize": 256, "crop": 224}
    assert pack["preprocess"] == {"size": 224, "resize": 256, "mean": list(gp.IMAGENET_MEAN), "std": list(gp.IMAGENET_STD)}
    assert pack["backbone_file"] == "mae.pth"
    assert pack["class_names"] == ["000.class_0", "001.class_1", "002.class_2"] and pack["ssl"] == "mae"
    prompts = torch.load(files.prompts, weights_only=True)
    assert prompts.keys() == pack["tensors"].keys() and all(torch.equal(prompts[k], pack["tensors"][k]) for k in prompts)
    model = gp.load_pack(files.pack, checkpoint=tmp_path / "mae.pth")
    rebuilt = config.model_from_config(cfg, 3, tmp_path / "mae.pth", verbose=False)
    rebuilt.load_prompt_state_dict(prompts)
    images = torch.randn(2, 3, 224, 224)
    assert torch.equal(logits(model, images), logits(rebuilt.eval(), images))

# --- the bench row ------------------------------------------------------------------------------------------


def test_bench_times_a_mixed_batch_of_8_packs_against_one_pack(capsys):
    out = bench.main(["--multitask", "--arch", "tiny", "--img-size", "32", "--prompts", "4", "--batch", "8",
                      "--steps", "1", "--warmup", "0", "--repeats", "1"])
    row = out["multitask"]
    assert row["packs"] == 8 and row["batch"] == 8 and row["prompts"] == 4
    assert row["single_images_per_second"] > 0 and row["mixed_images_per_second"] > 0
    assert row["ratio"] == pytest.approx(row["mixed_images_per_second"] / row["single_images_per_second"])
    assert "mixed batch of 8 packs" in capsys.readouterr().out


def test_a_mixed_batch_on_a_dinov2_backbone_with_registers_and_layerscale_equals_each_tasks_own_model():
    base = backbone("dinov2", num_reg_tokens=2)
    with torch.no_grad():   # LayerScale and registers as a trained file has them, not their initial values
        for name, p in base.named_parameters():
            if name.endswith("gamma") or name == "reg_token":
                p.normal_(0, 0.5)
    models = {"gated+temp": trained(base, "gated+temp", 5, 3, seed=1), "vpt-shallow": trained(base, "vpt-shallow", 2, 4),
              "linear": trained(base, "linear", 1, 2, seed=3)}
    mt = gp.MultiTask(base, models)
    tasks = ["linear", "gated+temp", "vpt-shallow", "gated+temp", "linear", "vpt-shallow", "gated+temp"]
    with torch.no_grad():
        out = mt(IMAGES, tasks)
    for b, task in enumerate(tasks):
        assert (out[b] - logits(models[task], IMAGES[b:b + 1])[0]).abs().max() <= 1e-5, task

# --- malformed packs and edge cases ------------------------------------------------------------------------


def rewrite(path, change):
    """The pack at `path`, edited by `change(dict)`, saved back with torch.save."""
    pack = torch.load(path, weights_only=True)
    change(pack)
    torch.save(pack, path)
    return path


def drop(*keys):
    def change(pack):
        where = pack
        for key in keys[:-1]:
            where = where[key]
        del where[keys[-1]]
    return change


@pytest.mark.parametrize("change,field", [
    (drop("vit"), "vit"), (drop("prompt"), "prompt"), (drop("tensors"), "tensors"),
    (drop("backbone_fingerprint"), "backbone_fingerprint"), (drop("version"), "version"),
    (lambda p: p.update(version="1"), "version"), (lambda p: p.update(tensors=list(p["tensors"].values())), "tensors"),
    (lambda p: p.update(vit="mae"), "vit"), (lambda p: p["tensors"].update(head=3), "tensors"),
    (drop("vit", "depth"), "depth"), (drop("prompt", "num_prompts"), "num_prompts"),
    (lambda p: p["vit"].update(depth="12"), "depth"), (lambda p: p["prompt"].update(gates="sometimes"), "gates"),
    (lambda p: p.update(class_names="abcde"), "class_names"), (lambda p: p.update(info=[1]), "info"),
])
def test_a_malformed_pack_is_a_checkpoint_error_naming_the_file_and_the_field(change, field, tmp_path):
    base = backbone()
    path = trained(base, "gated+temp").save_pack(tmp_path / "p.pack.pt", class_names=list("abcde"))
    rewrite(path, change)
    for read in (lambda: gp.read_pack(path), lambda: gp.load_pack(path, checkpoint=base),
                 lambda: gp.MultiTask(base, {"p": path})):
        with pytest.raises(gp.CheckpointError, match=field) as err:
            read()
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_only_the_format_field_is_not_a_pack(tmp_path):
    torch.save({"format": "gated-prompt-pack"}, tmp_path / "p.pt")
    with pytest.raises(gp.CheckpointError, match="p.pt.*version"):
        gp.read_pack(tmp_path / "p.pt")


def test_class_names_must_match_the_head_in_the_file_and_in_save_pack(tmp_path):
    base = backbone()
    model = trained(base, "gated+temp", num_classes=5)
    for names in (list("abc"), list("abcdefg")):
        path = model.save_pack(tmp_path / "p.pack.pt")
        rewrite(path, lambda p: p.update(class_names=names))
        with pytest.raises(gp.CheckpointError, match=rf"p.pack.pt.*{len(names)} class names.*5 classes"):
            gp.load_pack(path, checkpoint=base)
    with pytest.raises(TypeError, match="class_names"):
        model.save_pack(tmp_path / "q.pack.pt", class_names="abcde")   # five letters, not five names


def test_pack_tensors_load_as_prompts_files_do_projected_and_in_the_models_dtype(tmp_path):
    base = backbone()
    model = trained(base, "gated+temp")
    with torch.no_grad():
        model.temperatures.fill_(50.0)   # outside [0.01, 10]: load_prompt_state_dict projects it to 10
    path = model.save_pack(tmp_path / "p.pack.pt")
    loaded = gp.load_pack(path, checkpoint=base)
    assert loaded.temperatures.tolist() == [10.0] * base.cfg.depth
    assert gp.MultiTask(base, {"p": path}).tau.tolist() == [[10.0] * base.cfg.depth]
    half = rewrite(path, lambda p: p.update(
        tensors={k: v.half() for k, v in p["tensors"].items()}))
    loaded = gp.load_pack(half, checkpoint=base)
    assert all(v.dtype == torch.float32 for v in loaded.prompt_state_dict().values())
    assert torch.equal(loaded.prompts, model.prompts.half().float())


def test_multitask_copies_the_heads_of_the_models_it_is_built_from():
    base = backbone()
    model = trained(base, "gated+temp")
    mt = gp.MultiTask(base, {"a": model})
    with torch.no_grad():
        before = mt(IMAGES, ["a"] * len(IMAGES))
        model.head.weight.add_(1.0)
        model.prompts.add_(1.0)
        after = mt(IMAGES, ["a"] * len(IMAGES))
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_multitask_takes_an_empty_batch_refuses_3d_images_and_runs_in_float64():
    base = backbone()
    models = {"g": trained(base, "gated+temp", 3, 4), "v": trained(base, "vpt-shallow", 5, 2, seed=2)}
    mt = gp.MultiTask(base, models)
    assert mt(IMAGES[:0], []) == []
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        mt(IMAGES[0], ["g"])
    mt.double()
    images, tasks = IMAGES.double(), ["g", "v", "v", "g", "g", "v", "g"]
    with torch.no_grad():
        out = mt(images, tasks)
        for b, task in enumerate(tasks):
            own = models[task].double()(images[b:b + 1])[0]
            assert out[b].dtype == torch.float64 and (out[b] - own).abs().max() <= 1e-12, task
