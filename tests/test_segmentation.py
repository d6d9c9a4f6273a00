"""Tests for segmentation.py (CPU, tiny ViTs, fixture data in the real ADE20K layout)."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fixtures  # noqa: E402
import runtime  # noqa: E402
import segmentation as seg  # noqa: E402

TINY = dict(method="gated+temp", arch_overrides=dict(embed_dim=32, depth=4, num_heads=2), num_prompts=4,
            gate_init=5.0, crop_size=64, aux_blocks=(2, 3), head_channels=16)
TRAIN = dict(TINY, lr=0.01, batch_size=2, seed=0, bf16=False, num_workers=0, save_every=0, eval_every=0)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    fixtures.write_ade_fixture(root, n_train=6, n_val=2, size=(64, 96), seed=0)
    return root

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
    torch.manual_seed(0)
    model = seg.build_segmenter(TINY)
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
    groups = model.param_groups(0.001)
    assert [g["lr"] for g in groups] == [0.001, pytest.approx(0.01)]
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_parameters())


def test_config_checks():
    with pytest.raises(ValueError, match="aux_blocks"):
        seg.build_segmenter(dict(TINY, aux_blocks=(2, 9)))
    assert seg.segmentation_config({"img_size": 64})["crop_size"] == 64
    assert seg.segmentation_config({})["crop_size"] == 512 and seg.segmentation_config({})["aux_blocks"] == [5, 9]
    with pytest.raises(ValueError, match="img_size"):
        seg.segmentation_config({"img_size": 64, "crop_size": 512})


def test_sliding_window_equals_whole_image_for_one_window():
    torch.manual_seed(0)
    model = seg.build_segmenter(TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
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


def test_predict_returns_single_and_multi_scale_maps_at_label_size():
    torch.manual_seed(0)
    model = seg.build_segmenter(TINY).eval()
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    single, multi = seg.predict(model, image, crop=64, stride=42)
    assert single.shape == multi.shape == (50, 70)
    assert seg.predict(model, image, crop=64, stride=42, multi_scale=False)[1] is None


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
    torch.manual_seed(0)
    model = seg.build_segmenter(TINY)
    val = seg.ADE20K(fixture_root, "validation")
    whole, _ = seg.confusion_matrices(model, val, crop=64, multi_scale=False, num_workers=0)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(runtime, "world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(runtime, "all_reduce_sum", lambda t: t)
        parts.append(seg.confusion_matrices(model, val, crop=64, multi_scale=False, num_workers=0)[0])
    assert torch.equal(parts[0] + parts[1], whole)
    assert int(whole.sum()) == sum(int((val[i][1] != 255).sum()) for i in range(len(val)))

# --- training --------------------------------------------------------------------


def test_poly_schedule_matches_mmseg():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.001}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.01}])
    sched = seg.poly_scheduler(opt, 100)
    for _ in range(50):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([(0.001 - 1e-4) * 0.5 ** 0.9 + 1e-4, (0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4])
    for _ in range(50):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([1e-4, 1e-4])


def test_tiny_run_overfits_fixture(fixture_root, tmp_path):
    """Train on the fixture's training images and evaluate on the same distribution: mIoU must rise far
    above that of the untrained model (iters=0 evaluates the initial model)."""
    start = seg.train_segmentation(dict(TRAIN, iters=0), fixture_root, None, tmp_path / "start", progress=False)
    end = seg.train_segmentation(dict(TRAIN, iters=100, num_workers=2), fixture_root, None, tmp_path / "end",
                                 progress=False)
    assert start["miou_ss"] < 20
    assert end["miou_ss"] > start["miou_ss"] + 40 and end["miou_ms"] > start["miou_ms"] + 40
    assert end["history"][-1]["loss"] < end["history"][0]["loss"]
    assert len(end["gates"]) == 3 and len(end["selection_ratio"]) == 3 and len(end["temperatures"]) == 4
    saved = __import__("json").load(open(tmp_path / "end" / "result.json"))
    assert saved["miou_ss"] == pytest.approx(end["miou_ss"]) and saved["iters"] == 100
    assert set(saved["per_class_iou_ss"]) == set(seg.ADE_CLASSES)
    assert saved["per_class_iou_ss"]["flag"] is None or saved["per_class_iou_ss"]["flag"] == 0.0


def test_non_finite_loss_stops_before_saving(fixture_root, tmp_path, monkeypatch):
    monkeypatch.setattr(seg, "seg_loss", lambda logits, labels: logits.float().mean() * float("nan"))
    with pytest.raises(runtime.NonFiniteLoss):
        seg.train_segmentation(dict(TRAIN, iters=2), fixture_root, None, tmp_path, progress=False)
    assert not (tmp_path / "train_state.pt").exists()


class Interrupted(Exception):
    pass


def test_resume_matches_uninterrupted_run(fixture_root, tmp_path, monkeypatch):
    cfg = dict(TRAIN, iters=8, save_every=3, num_workers=2)
    full = seg.train_segmentation(cfg, fixture_root, None, tmp_path / "full", progress=False)
    full_state = torch.load(tmp_path / "full" / "train_state.pt", weights_only=False)

    save = runtime.save_training_state

    def save_then_crash(path, model, optimizer, scheduler, step, history, extra=None):
        save(path, model, optimizer, scheduler, step, history, extra)
        if step == 6:
            raise Interrupted
    monkeypatch.setattr(runtime, "save_training_state", save_then_crash)
    with pytest.raises(Interrupted):
        seg.train_segmentation(cfg, fixture_root, None, tmp_path / "cut", progress=False)
    monkeypatch.setattr(runtime, "save_training_state", save)
    resumed = seg.train_segmentation(cfg, fixture_root, None, tmp_path / "cut", resume=True, progress=False)
    cut_state = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=False)

    assert cut_state["step"] == full_state["step"] == 8
    assert set(cut_state["model"]) == set(full_state["model"])
    for name, tensor in full_state["model"].items():
        assert torch.equal(cut_state["model"][name], tensor), name
    assert resumed["history"] == full["history"]
    assert resumed["miou_ms"] == full["miou_ms"]
    with pytest.raises(runtime.UserError, match="another configuration"):
        seg.train_segmentation(dict(cfg, lr=0.5), fixture_root, None, tmp_path / "cut", resume=True, progress=False)
