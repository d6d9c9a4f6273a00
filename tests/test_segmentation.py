"""Tests for segmentation.py (CPU, tiny ViTs, fixture data and a checkpoint in the real layouts)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_VIT as SMALL, settings
import fixtures
import gated_prompt as gp
from harness import config
from harness import runtime
from harness import segmentation as seg

TINY_VIT = dict(SMALL, depth=4, patch_size=16)
TINY = config.resolve("ade20k", "mae", num_prompts=4, gate_init=5.0, arch_overrides=TINY_VIT, img_size=64,
                       aux_blocks=[2, 3], head_channels=16, lr=0.01, batch_size=2, seed=0)
# The training tests' crop: SETR-PUP's heads and loss work on 150-class maps of the whole crop, so 32 px (a 2x2 token
# grid; the scales of training and testing follow the crop) makes an iteration ~3x cheaper than 64 px.
TRAIN = TINY.replace(img_size=32)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    fixtures.write_ade_fixture(root, n_train=6, n_val=2, size=(64, 96), seed=0)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random backbone of TINY's size in the MAE .pth layout, with a 224 px (14x14) position grid."""
    path = tmp_path_factory.mktemp("ckpt") / "mae_tiny.pth"
    torch.manual_seed(0)
    backbone = gp.build_model("vit_base", "mae", "linear", num_classes=0, vit_overrides=TINY_VIT)
    torch.save({"model": backbone.backbone_state_dict()}, path)
    return path


def tiny_model(**changes):
    torch.manual_seed(0)
    return seg.build_segmenter(TINY.replace(**changes))

# --- metrics ---------------------------------------------------------------------


def test_metrics_hand_computed_with_ignore_and_absent_classes():
    label = torch.tensor([0, 0, 1, 1, 255, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 3, 0, 0])
    m = seg.segmentation_metrics(seg.confusion_matrix(pred, label, num_classes=4))
    # class 0: TP 1, gt 2, pred 2 -> 1/3; class 1: TP 2, gt 2, pred 3 -> 2/3; class 2: TP 0, gt 1 -> 0;
    # class 3 is predicted only on an ignored pixel -> union 0 -> NaN, not in the mean
    assert m["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert np.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx(1 / 3)
    assert m["aacc"] == pytest.approx(3 / 5)
    assert m["macc"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_metrics_perfect_and_all_wrong():
    label = torch.tensor([[0, 1], [2, 255]])
    assert seg.segmentation_metrics(seg.confusion_matrix(label.clamp(max=2), label, 3))["miou"] == 1.0
    wrong = seg.segmentation_metrics(seg.confusion_matrix((label + 1) % 3, label, 3))
    assert wrong["miou"] == 0.0 and wrong["aacc"] == 0.0


def test_confusion_matrix_matches_numpy_loop():
    rng = np.random.default_rng(0)
    C = 7
    label = rng.integers(0, C, size=(3, 20, 30))
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, C, size=label.shape)
    expected = np.zeros((C, C), np.int64)
    for l, p in zip(label.ravel(), pred.ravel()):
        if l != 255:
            expected[l, p] += 1
    cm = seg.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), C)
    assert cm.dtype == torch.int64
    np.testing.assert_array_equal(cm.numpy(), expected)

# --- model -----------------------------------------------------------------------


def test_head_shapes_and_trainable_parts():
    model = tiny_model()
    x = torch.randn(2, 3, 64, 96)
    model.train()
    logits, aux = model(x)
    assert logits.shape == (2, seg.NUM_CLASSES, 64, 96)
    assert len(aux) == 2 and all(a.shape == (2, seg.NUM_CLASSES, 64, 96) for a in aux)
    model.eval()
    assert model(x).shape == (2, seg.NUM_CLASSES, 64, 96)
    assert not model.backbone.blocks.training  # frozen backbone stays in eval mode
    # trainable = prompt side + heads; the backbone is frozen and not in the resume state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"backbone.prompts", "backbone.gate_logits", "backbone.temperatures"} <= trainable
    assert not any(n.startswith(("backbone.blocks", "backbone.patch_embed", "backbone.norm")) for n in trainable)
    state = model.prompt_state_dict()
    assert "decode_head.up_convs.1.running_mean" in state and "aux_heads.1.conv_seg.weight" in state
    assert not any(k.startswith("backbone.blocks") for k in state)
    assert trainable <= set(state)
    groups = model.param_groups(0.001, 10.0)
    assert [g["lr"] for g in groups] == [0.001, pytest.approx(0.01)]
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_parameters())


@torch.no_grad()
def test_aux_heads_read_blocks_5_and_9_and_the_decode_head_the_last():
    """(Here blocks 2 and 3 of 4.) Changing a block changes exactly the heads that read it or a later block."""
    model = tiny_model().train()
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(1)
    logits, (aux2, aux3) = model(x)
    for block, changed in ((4, (True, False, False)), (3, (True, False, True))):
        model.backbone.blocks[block - 1].mlp.fc2.weight.mul_(3)
        torch.manual_seed(1)   # the same prompt-dropout masks
        after = model(x)
        outs = (after[0], after[1][0], after[1][1])
        assert [not torch.equal(a, b) for a, b in zip(outs, (logits, aux2, aux3))] == list(changed), block
        logits, (aux2, aux3) = after


@torch.no_grad()
def test_setr_up_head_norms_tokens_and_upsamples_by_two_per_stage():
    """mmseg's SETRUPHead: its own LayerNorm over channels per token (so a token's scale does not matter), then
    num_convs x (3x3 conv, BN, ReLU, bilinear x up_scale), then a 1x1 classifier."""
    head = seg.SETRUPHead(32, 16, 5, num_convs=4, up_scale=2).eval()
    grid = torch.randn(2, 32, 3, 4)
    out = head(grid)
    assert out.shape == (2, 5, 48, 64)   # x16: four stages of x2
    scale = torch.rand(2, 1, 3, 4) + 0.5  # each token scaled by its own positive factor
    torch.testing.assert_close(head(grid * scale), out, atol=1e-4, rtol=1e-4)
    aux = seg.SETRUPHead(32, 16, 5, num_convs=2, up_scale=4).eval()
    assert aux(grid).shape == (2, 5, 48, 64)   # the aux heads: two stages of x4


def test_resolved_config_reaches_the_segmenter():
    """Every setting of an ADE20K config reaches the model: arch, prompts, gate init, insertion block, dropout,
    crop size and SETR's bilinear position-grid interpolation; Table 5's ADE20K row by default."""
    cfg = config.resolve("ade20k", "mocov3", insert_at=5, num_prompts=7, gate_init=3.0, prompt_dropout=0.2)
    with torch.device("meta"):
        model = seg.build_segmenter(cfg, verbose=False)
    vit = model.backbone
    assert (vit.cfg.embed_dim, vit.cfg.depth, vit.cfg.img_size, vit.cfg.pool) == (768, 12, 512, "cls")
    assert vit.cfg.pos_embed_interpolation == "bilinear" and vit.pos_embed.shape[1] == 1 + 32 * 32
    assert (vit.pcfg.insert_at, vit.num_prompts, vit.pcfg.gate_init, vit.pcfg.prompt_dropout) == (5, 7, 3.0, 0.2)
    assert model.aux_blocks == (5, 9) and model.decode_head.conv_seg.in_channels == 256
    default = config.resolve("ade20k", "mae")
    assert (default.batch_size, default.num_prompts, default.lr, default.gate_init, default.iters) \
        == (16, 100, 0.001, 10, 160000)


def test_config_checks():
    with pytest.raises(ValueError, match="aux_blocks"):
        tiny_model(aux_blocks=[2, 9])
    with pytest.raises(runtime.UserError, match="--epochs does not apply to ADE20K"):
        config.resolve("ade20k", epochs=3)


@torch.no_grad()
def test_sliding_window_equals_whole_image_for_one_window():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    whole = model(x)
    slid = seg.slide_inference(model, x, seg.NUM_CLASSES, crop=64, stride=42)
    torch.testing.assert_close(slid, whole)


def test_sliding_window_averaging_is_exact_for_a_pointwise_model():
    """A 1x1 conv gives the same logits in every window, so the count-averaged map must equal it
    everywhere: checks window placement (incl. the shifted last window) and the count map."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 1)
    for h, w in ((100, 150), (64, 64), (40, 50)):  # several windows, exactly one, smaller than the crop
        x = torch.randn(1, 3, h, w)
        out = seg.slide_inference(conv, x, 5, crop=64, stride=42, window_batch=3)
        assert out.shape == (1, 5, h, w)
        torch.testing.assert_close(out, conv(x).detach())


def test_small_images_run_as_one_unpadded_window():
    """mmseg's slide_inference runs an image smaller than the crop as one smaller window, not zero-padded to the
    crop; the ViT pads it to a multiple of its patch size (bottom/right) and the logits are resized back."""
    seen = []
    model = tiny_model().eval()

    def recording(x):
        seen.append(tuple(x.shape[-2:]))
        return model(x)
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        out = seg.slide_inference(recording, x, seg.NUM_CLASSES, crop=64, stride=42)
        assert seen == [(40, 50)]
        torch.testing.assert_close(out, model(x))
        patch_padded = F.pad(x, (0, 14, 0, 8))   # 48 x 64: multiples of the 16 px patch
        expected = F.interpolate(model(patch_padded), size=(40, 50), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), expected)
        crop_padded = seg.slide_inference(model, F.pad(x, (0, 14, 0, 24)), seg.NUM_CLASSES, crop=64, stride=42)
    assert not torch.allclose(out, crop_padded[..., :40, :50], atol=1e-3)   # what padding to the crop would give


def test_multi_scale_sizes_follow_mmseg_0x():
    """MultiScaleFlipAug(img_scale=(2048, 512), img_ratios) rescales the original image to fit (2048 r, 512 r)
    (mmseg 1.x would scale the original size by r instead: 188x250 ... 656x875 for this image)."""
    ratios = config.resolve("ade20k").ms_ratios
    assert seg.test_scales(375, 500, 512, ratios) == [(256, 341), (384, 512), (512, 683), (640, 853), (768, 1024),
                                                      (896, 1195)]


@torch.no_grad()
def test_predict_returns_single_and_multi_scale_maps_at_label_size():
    model = tiny_model().eval()
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    single, multi = seg.predict(model, image, crop=64, stride=42, ms_ratios=[0.5, 1.0])
    assert single.shape == multi.shape == (50, 70)
    assert seg.predict(model, image, crop=64, stride=42)[1] is None


def test_rescale_size_follows_mmcv_keep_ratio():
    assert seg.rescale_size(375, 500, (2048, 512)) == (512, 683)     # short side -> 512
    assert seg.rescale_size(512, 512, (1024, 256)) == (256, 256)
    assert seg.rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side capped at 2048

# --- data ------------------------------------------------------------------------


def test_label_mapping():
    label = np.array([[0, 1, 2], [150, 7, 0]], np.uint8)
    np.testing.assert_array_equal(seg.reduce_zero_label(label), [[255, 0, 1], [149, 6, 255]])


def test_dataset_items_and_label_range(tmp_path):
    ade = fixtures.write_ade_fixture(tmp_path, n_train=2, n_val=1, size=(48, 40), seed=1)
    ds = seg.ADE20K(tmp_path, "training")
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 40) and label.shape == (48, 40)
    raw = np.array(Image.open(ds.labels[0]))
    np.testing.assert_array_equal(label.numpy(), np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    assert seg.ADE20K(ade, "validation").root == ade  # the ADEChallengeData2016 folder itself works too
    Image.fromarray(np.full((48, 40), 151, np.uint8)).save(ds.labels[1])
    with pytest.raises(runtime.UserError, match=os.path.basename(ds.labels[1])):
        ds[1]


def test_missing_folder_error_names_path_and_url(tmp_path):
    with pytest.raises(runtime.UserError) as e:
        seg.ADE20K(tmp_path, "training")
    assert os.path.join(str(tmp_path), "ADEChallengeData2016") in str(e.value)
    assert seg.ADE_URL in str(e.value)


def test_missing_annotation_error_names_both_files(tmp_path):
    fixtures.write_ade_fixture(tmp_path, n_train=2, n_val=1, size=(32, 32))
    ann = tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000001.png"
    ann.unlink()
    with pytest.raises(runtime.UserError) as e:
        seg.ADE20K(tmp_path, "training")
    assert "ADE_train_00000001.jpg" in str(e.value) and str(ann) in str(e.value)


def test_size_mismatch_error_names_both_files(tmp_path):
    fixtures.write_ade_fixture(tmp_path, n_train=2, n_val=1, size=(32, 32))
    ds = seg.ADE20K(tmp_path, "training")
    Image.fromarray(np.ones((30, 32), np.uint8)).save(ds.labels[0])
    with pytest.raises(runtime.UserError) as e:
        ds.load(0)
    assert ds.labels[0] in str(e.value) and ds.images[0] in str(e.value)


def test_training_samples_are_padded_crops_and_reproducible(fixture_root):
    train = seg.ADE20KTrain(fixture_root, crop_size=128, seed=3)  # crop bigger than some resized images
    images, labels = zip(*(train[(i % len(train), i)] for i in range(8)))
    assert all(im.shape == (3, 128, 128) and im.dtype == torch.float32 for im in images)
    assert all(lb.shape == (128, 128) and lb.dtype == torch.int64 for lb in labels)
    values = torch.cat([lb.unique() for lb in labels]).unique().tolist()
    assert set(values) <= {0, 1, 2, 3, 255} and 255 in values  # fixture classes 1..4 -> 0..3; pad/ignore 255
    again = train[(1, 1)]
    torch.testing.assert_close(again[0], images[1])
    assert torch.equal(again[1], labels[1])


def test_sample_stream_shards_the_global_batch(monkeypatch):
    def keys(rank, world, start=0):
        monkeypatch.setattr(runtime, "world", lambda: (rank, world))
        it = iter(seg.TrainSampleStream(5, 2, seed=0, start_iteration=start))
        return [next(it) for _ in range(6)]
    single = keys(0, 1)
    assert [s for _, s in single] == list(range(6))
    assert sorted(i for i, _ in single[:5]) == list(range(5))  # one epoch = a permutation
    two = keys(0, 2)[:2] + keys(1, 2)[:2]  # iteration 0 of a 2-rank run = samples 0..3
    assert sorted(s for _, s in two) == [0, 1, 2, 3] and [i for i, _ in sorted(two, key=lambda k: k[1])] == [
        i for i, _ in single[:4]]
    assert keys(0, 1, start=2)[0] == single[4]  # resuming at iteration 2 continues the stream


def test_sharded_evaluation_sums_to_the_whole(monkeypatch, fixture_root):
    model = tiny_model()
    val = seg.ADE20K(fixture_root, "validation")
    whole, _ = seg.confusion_matrices(model, val, TINY, multi_scale=False, loader_workers=0)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(runtime, "world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(runtime, "all_reduce_sum", lambda t: t)
        parts.append(seg.confusion_matrices(model, val, TINY, multi_scale=False, loader_workers=0)[0])
    assert torch.equal(parts[0] + parts[1], whole)
    assert int(whole.sum()) == sum(int((val[i][1] != 255).sum()) for i in range(len(val)))

# --- training --------------------------------------------------------------------


def test_poly_schedule_matches_mmseg():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.001}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.01}])
    sched = seg.poly_scheduler(opt, 100, 0.9, 1e-4)
    for _ in range(50):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([(0.001 - 1e-4) * 0.5 ** 0.9 + 1e-4, (0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4])
    for _ in range(50):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([1e-4, 1e-4])


def test_tiny_run_overfits_fixture(fixture_root, checkpoint, tmp_path):
    """Train on the fixture's training images and evaluate on the same distribution: mIoU must rise far
    above that of the untrained model (the initial model evaluated as train_segmentation evaluates). It loads in
    this process (test_resume_matches_uninterrupted_run trains with the loader's worker processes)."""
    run = settings(tmp_path, data_dir=str(fixture_root))
    start = seg.evaluate_and_report(seg.Training(TRAIN, run, checkpoint), seg.ADE20KData(TRAIN, run.data_dir, 0),
                                    TRAIN, run)
    end, model = seg.train_segmentation(TRAIN.replace(iters=100), run, tmp_path / "end.pt", checkpoint,
                                        loader_workers=0)
    prompts = model.prompt_state_dict()
    assert start["final"]["miou_ss"] < 20
    assert end["final"]["miou_ss"] > start["final"]["miou_ss"] + 40
    assert end["final"]["miou_ms"] > start["final"]["miou_ms"] + 40
    assert end["history"][-1]["loss"] < end["history"][0]["loss"] and end["iters"] == 100
    assert len(end["gates"]) == 3 and len(end["selection_ratio"]) == 3 and len(end["temperatures"]) == 4
    assert set(end["per_class_iou_ss"]) == set(seg.ADE_CLASSES)
    assert end["per_class_iou_ss"]["flag"] in (None, 0.0)   # a class the fixture never shows
    assert "backbone.prompts" in prompts and "decode_head.conv_seg.weight" in prompts
    json.dumps(end)   # the result body is JSON as it is


def test_non_finite_loss_stops_before_saving(fixture_root, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(seg, "seg_loss", lambda logits, labels: logits.float().mean() * float("nan"))
    with pytest.raises(runtime.NonFiniteLoss, match="loss became nan at iteration") as err:
        seg.train_segmentation(TRAIN.replace(iters=2), settings(tmp_path, data_dir=str(fixture_root)),
                               tmp_path / "s.pt", checkpoint, loader_workers=0)
    assert not err.value.state_saved and not (tmp_path / "s.pt").exists()


class Interrupted(Exception):
    pass


def test_resume_matches_uninterrupted_run(fixture_root, checkpoint, tmp_path, monkeypatch):
    cfg = TRAIN.replace(iters=8)
    run = settings(tmp_path, data_dir=str(fixture_root))
    full, model = seg.train_segmentation(cfg, run, tmp_path / "full.pt", checkpoint, save_every=3, loader_workers=2)
    full_prompts = model.prompt_state_dict()
    save = runtime.save_training_state

    def save_then_crash(path, state, *args, **kwargs):
        save(path, state, *args, **kwargs)
        if state["step"] == 6:
            raise Interrupted
    monkeypatch.setattr(runtime, "save_training_state", save_then_crash)
    with pytest.raises(Interrupted):
        seg.train_segmentation(cfg, run, tmp_path / "cut.pt", checkpoint, save_every=3, loader_workers=2)
    monkeypatch.setattr(runtime, "save_training_state", save)
    with pytest.raises(runtime.UserError, match="another configuration"):
        seg.train_segmentation(cfg.replace(lr=0.5), dataclasses.replace(run, resume=True), tmp_path / "cut.pt",
                               checkpoint)
    resumed, model = seg.train_segmentation(cfg, dataclasses.replace(run, resume=True), tmp_path / "cut.pt",
                                            checkpoint, save_every=3, loader_workers=2)
    resumed_prompts = model.prompt_state_dict()
    assert set(resumed_prompts) == set(full_prompts)
    for name, tensor in full_prompts.items():
        assert torch.equal(resumed_prompts[name], tensor), name
    assert resumed["history"] == full["history"]
    assert resumed["final"] == full["final"]
    assert resumed["wall_seconds"] > resumed["wall_seconds_this_session"]   # both segments are counted


def test_a_stale_state_is_announced_and_replaced_without_resume(fixture_root, checkpoint, tmp_path, capsys):
    """A state left by an interrupted run is not silently overwritten: without --resume the run says it starts
    over (as the classification trainer does: one runtime.resume_or_start), and its first save replaces it."""
    state = tmp_path / "s.pt"
    state.write_bytes(b"an interrupted run's state")
    seg.train_segmentation(TRAIN.replace(iters=1), settings(tmp_path, data_dir=str(fixture_root)), state, checkpoint,
                           loader_workers=0)
    assert f"{state} holds an interrupted run; starting over (pass --resume to continue it)" in capsys.readouterr().out
    assert torch.load(state, weights_only=False)["step"] == 1
