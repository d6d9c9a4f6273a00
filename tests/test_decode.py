"""VTAB decoding: the TF1 resize as whole-array ops (byte-equal to the per-image formula on every VTAB-1k source
size) and a streamed test split decoded once per process, reused by every later run of its task."""
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import batches as batching
from harness.data import datasets
import fixtures
from harness import config
from harness import runs
from harness import runtime
from conftest import TINY_VIT
from test_reproduce import write_tiny_mae_checkpoint

TINY = TINY_VIT

# Source sizes (width, height) of the 19 VTAB-1k tasks' images, from the datasets' TFDS definitions and
# documentation (the NOAH / RepAdapter image folders keep the TFDS images as they are):
VTAB_SOURCE_SIZES = {
    "cifar": [(32, 32)],                                   # CIFAR-100, 32x32
    "svhn": [(32, 32)],                                    # SVHN cropped digits, 32x32
    "caltech101": [(300, 197), (213, 300), (300, 300)],   # varied, longer side ~300
    "dtd": [(640, 480), (469, 353), (300, 300), (640, 640)],   # 300x300 to 640x640
    "oxford_flowers102": [(500, 667), (754, 500), (500, 509)],  # shorter side 500
    "oxford_iiit_pet": [(500, 375), (375, 500), (500, 333), (241, 181)],   # varied
    "sun397": [(400, 300), (346, 346), (299, 401)],       # TFDS 'tfds' variant: at most 120,000 pixels
    "patch_camelyon": [(96, 96)],                          # 96x96
    "eurosat": [(64, 64)],                                 # Sentinel-2 RGB, 64x64
    "resisc45": [(256, 256)],                              # 256x256
    "diabetic_retinopathy": [(540, 540), (540, 409)],     # btgraham-300: cropped to 90% of a 300 px radius
    "clevr_count": [(480, 320)],                           # CLEVR renders, 480x320
    "clevr_dist": [(480, 320)],
    "dmlab": [(480, 360)],                                 # TFDS shape (360, 480, 3)
    "kitti": [(1242, 375), (1224, 370), (1238, 374), (1241, 376)],   # the camera's crops vary by drive
    "dsprites_loc": [(64, 64)],                            # 64x64, one channel
    "dsprites_ori": [(64, 64)],
    "smallnorb_azi": [(96, 96)],                           # 96x96, one channel
    "smallnorb_ele": [(96, 96)],
}
ALL_SIZES = sorted({size for sizes in VTAB_SOURCE_SIZES.values() for size in sizes})
# beside them: degenerate and odd shapes (one pixel, one row, primes, just above / below the output size)
ODD_SIZES = [(1, 1), (3, 2), (1, 7), (7, 1), (223, 225), (225, 223), (224, 224), (449, 97), (97, 449)]


def todays_resize_like_tf(image, size):
    """The per-image formula harness used before (uint8 [3, h, w] torch -> uint8 [3, size, size]), kept here as the
    reference the whole-array version must equal byte for byte."""
    out = image.float()
    for dim in (1, 2):
        n = out.shape[dim]
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n / size, dtype=torch.float32)
        low = src.floor().long().clamp(max=n - 1)
        high = (low + 1).clamp(max=n - 1)
        shape = [1, 1, 1]
        shape[dim] = size
        weight = (src - low).view(shape)
        out = out.index_select(dim, low) * (1 - weight) + out.index_select(dim, high) * weight
    return out.round().clamp(0, 255).to(torch.uint8)


def numpy_resize(image, size):
    """TF1 bilinear (half_pixel_centers False) in numpy float32, per output pixel from its four source pixels:
    the rows' lerp at the two source columns, then the lerp of those; rounded half to even. uint8 [h, w, 3]."""
    def taps(n):
        x = np.arange(size, dtype=np.float32) * np.float32(n / size)
        low = np.minimum(np.floor(x).astype(np.int64), n - 1)
        t = x - low.astype(np.float32)
        return low, np.minimum(low + 1, n - 1), t, np.float32(1) - t
    y0, y1, ty, ry = taps(image.shape[0])
    x0, x1, tx, rx = taps(image.shape[1])
    p = image.astype(np.float32)

    def rows_at(xs):   # [size, size, 3]: the rows' lerp at source columns xs
        return p[y0][:, xs] * ry[:, None, None] + p[y1][:, xs] * ty[:, None, None]
    out = rows_at(x0) * rx[None, :, None] + rows_at(x1) * tx[None, :, None]
    assert out.dtype == np.float32
    return np.rint(out).astype(np.uint8)


def test_resize_of_a_worked_example():
    """2x3 -> 4x4 by hand: rows sample 0, .5, 1, 1.5 (-> 1), columns 0, .75, 1.5, 2.25 (-> 2); every product is
    exact, and 150.5 rounds to the even 150."""
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[:, :, 0] = [[0, 101, 200], [40, 60, 80]]
    image[:, :, 1] = 255
    expected = np.array([[0, 76, 150, 200],      # 101 * .75 = 75.75; 101 * .5 + 200 * .5 = 150.5
                         [20, 65, 110, 140],     # the rows' mean (20, 80.5, 140): 5 + 60.375, 40.25 + 70
                         [40, 55, 70, 80],
                         [40, 55, 70, 80]])      # row 1.5 is clamped to the last row
    out = datasets.resize_like_tf_batch(image[None], 4)[0]
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.array_equal(out[:, :, 0], expected) and (out[:, :, 1] == 255).all() and (out[:, :, 2] == 0).all()
    planar = datasets.resize_like_tf(torch.from_numpy(image).permute(2, 0, 1), 4)
    assert planar.shape == (3, 4, 4) and torch.equal(planar[0], torch.from_numpy(expected).to(torch.uint8))


@pytest.mark.parametrize("width, height", ALL_SIZES + ODD_SIZES)
def test_resize_is_byte_equal_to_the_per_image_formula_on_every_vtab_source_size(width, height):
    """Random pixels, all-255 (the largest values: nothing may round past 255) and a 0/255 checkerboard (the
    steepest edges), resized to 224 and to a few other sizes, as one batch and one image at a time."""
    rng = np.random.default_rng(width * 1000 + height)
    images = np.stack([rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                       np.full((height, width, 3), 255, dtype=np.uint8),
                       (255 * ((np.arange(height)[:, None] + np.arange(width)) % 2)).astype(np.uint8)[..., None]
                       .repeat(3, axis=2)])
    for size in (224, 7) if (width, height) in ODD_SIZES else (224,):
        batch = datasets.resize_like_tf_batch(images, size)
        assert batch.shape == (3, size, size, 3) and batch.dtype == np.uint8
        for image, out in zip(images, batch):
            today = todays_resize_like_tf(torch.from_numpy(image).permute(2, 0, 1), size).permute(1, 2, 0).numpy()
            assert np.array_equal(out, today)
            assert np.array_equal(out, numpy_resize(image, size))
            assert np.array_equal(datasets.resize_like_tf_batch(image[None], size)[0], out)


def test_decode_vtab_of_real_jpeg_files_of_every_size(tmp_path):
    """JPEG files as the fixtures write them (RGB) and one-channel ones (dsprites / smallnorb are grey): decode_vtab =
    the reference resize of the file's RGB pixels."""
    rng = np.random.default_rng(0)
    for width, height in ALL_SIZES:
        for mode in ("RGB", "L"):
            path = tmp_path / f"{width}x{height}{mode}.jpg"
            shape = (height, width, 3) if mode == "RGB" else (height, width)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, quality=90)
            decoded = datasets.decode_vtab(str(path))
            assert decoded.shape == (224, 224, 3) and decoded.flags.c_contiguous
            assert np.array_equal(decoded, numpy_resize(np.asarray(Image.open(path).convert("RGB")), 224))


# --- a streamed split decoded once per process ------------------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch):
    """Paths decode_vtab decoded (from the decoding threads), with the kept splits emptied before and after."""
    seen, lock, decode = [], threading.Lock(), datasets.decode_vtab

    def counting(path):
        with lock:
            seen.append(path)
        return decode(path)
    monkeypatch.setattr(datasets, "decode_vtab", counting)
    datasets.forget_kept_splits()
    yield seen
    datasets.forget_kept_splits()


def streamed(tmp_path, task="dtd", chunk=4):
    """The test split of a VTAB fixture under tmp_path (written on first use: 15 images of 48x40) as load_splits
    streams it, in chunks of `chunk`: a new StreamedSplit each call, as each run makes its own."""
    root = tmp_path / "vtab-1k"
    if not (root / task).is_dir():
        fixtures.write_vtab_fixture(root, task, num_classes=3, per_class=(1, 1, 5), image_size=(48, 40))
    split = datasets.load_splits(task, root, ["test"], stream=("test",))["test"]
    split.chunk = chunk
    return split


def batches_of(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_a_streamed_split_is_decoded_once_and_read_back_byte_equal(tmp_path, decodes, monkeypatch):
    """First pass: decoded chunk by chunk (as today) into one buffer that is kept; second pass: no decoding, the same
    batches byte for byte; with nothing kept (budget 0, today's streaming) every pass decodes, same batches."""
    split = streamed(tmp_path)
    loader = batching.StreamedBatchLoader(split, 8, crop_size=224)
    first = batches_of(loader)
    assert len(decodes) == 15 and len(set(decodes)) == 15
    again = batches_of(batching.StreamedBatchLoader(streamed(tmp_path), 8, crop_size=224))   # a new run's split object
    assert len(decodes) == 15
    datasets.forget_kept_splits()
    monkeypatch.setattr(datasets, "KEEP_DECODED_BYTES", 0)
    today = [batches_of(loader) for _ in range(2)]
    assert len(decodes) == 15 + 2 * 15
    for other in (again, *today):
        assert len(other) == len(first) == 4
        assert all(torch.equal(x, xo) and torch.equal(y, yo) for (x, y), (xo, yo) in zip(first, other))
    whole = datasets.load_splits("dtd", tmp_path / "vtab-1k", ["test"])["test"]   # decoded at once, as a cached split
    reference = batches_of(batching.BatchLoader(whole, 8, train=False, crop_size=224))
    rows = lambda bs: torch.cat([x[y != batching.PAD_LABEL] for x, y in bs])   # noqa: E731
    assert torch.equal(rows(first), rows(reference))


def test_kept_splits_stay_within_the_byte_budget_least_recently_read_dropped_first(tmp_path, decodes, monkeypatch):
    one_split = 15 * 224 * 224 * 3
    monkeypatch.setattr(datasets, "KEEP_DECODED_BYTES", 2 * one_split)
    a, b, c = (streamed(tmp_path / name, task) for name, task in (("a", "dtd"), ("b", "eurosat"), ("c", "svhn")))
    for split in (a, b, a, c):   # a read again before c arrives: b is the least recently read
        list(split.chunks())
    assert len(decodes) == 45
    assert datasets.kept_bytes() == 2 * one_split
    list(a.chunks()), list(c.chunks())
    assert len(decodes) == 45
    list(b.chunks())            # dropped for c: decoded again, and now a (read before c) is dropped
    assert len(decodes) == 60
    list(c.chunks())
    assert len(decodes) == 60
    monkeypatch.setattr(datasets, "KEEP_DECODED_BYTES", one_split - 1)   # a split larger than the budget: streamed
    datasets.forget_kept_splits()
    list(a.chunks()), list(a.chunks())
    assert len(decodes) == 90 and datasets.kept_bytes() == 0


def test_a_split_is_kept_only_if_it_fits_in_half_the_available_memory(tmp_path, decodes, monkeypatch):
    split = streamed(tmp_path)
    monkeypatch.setattr(datasets, "_available_memory", lambda: 2 * 15 * 224 * 224 * 3 - 2)
    list(split.chunks()), list(split.chunks())
    assert len(decodes) == 30 and datasets.kept_bytes() == 0
    monkeypatch.setattr(datasets, "_available_memory", lambda: 2 * 15 * 224 * 224 * 3)
    list(split.chunks()), list(split.chunks())
    assert len(decodes) == 45


def test_a_pass_left_early_keeps_nothing_and_a_changed_file_is_decoded_again(tmp_path, decodes):
    split = streamed(tmp_path)
    parts = split.chunks()
    next(parts)
    parts.close()                                  # evaluation stopped (an error, ^C) after one chunk
    assert datasets.kept_bytes() == 0
    list(split.chunks())
    list(split.chunks())
    assert len(decodes) == 8 + 15
    changed = split.paths[3]
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(changed, quality=95)   # a re-downloaded file
    parts = list(split.chunks())
    assert len(decodes) == 8 + 30 and (parts[0].image(3) < 8).all()
    assert datasets.kept_bytes() == 15 * 224 * 224 * 3            # the version before the change is dropped


def test_a_kept_split_carries_the_labels_of_the_list_read_now(tmp_path, decodes):
    """Pixels are keyed by the image files; the labels come from each run's own split list."""
    first = [part.labels for part in streamed(tmp_path).chunks()]
    listing = tmp_path / "vtab-1k" / "dtd" / "test.txt"
    listing.write_text("".join(f"{line.rsplit(maxsplit=1)[0]} {(int(line.rsplit(maxsplit=1)[1]) + 1) % 3}\n"
                               for line in listing.read_text().splitlines()))
    relabelled = [part.labels for part in streamed(tmp_path).chunks()]
    assert len(decodes) == 15
    assert all(torch.equal(b, (a + 1) % 3) for a, b in zip(first, relabelled))


def test_each_rank_keeps_its_own_shard(tmp_path, decodes):
    split = streamed(tmp_path)
    for _ in range(2):
        for rank in range(2):
            list(batching.StreamedBatchLoader(split, 8, crop_size=224, rank=rank, world_size=2))
    assert sorted(decodes) == sorted(split.paths) and datasets.kept_bytes() == 15 * 224 * 224 * 3


def test_two_runs_of_a_task_in_one_process_decode_its_test_split_once(tmp_path, decodes, monkeypatch):
    """The queue's path (runs.run_queue -> run_one -> run_classification): two seeds of a VTAB cell decode each
    test image once (train800val200 once too: it is cached on disk), and their results equal those of runs that
    stream the split again (today's path)."""
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd", num_classes=3, per_class=(3, 1, 5))
    test_paths = set(datasets.read_split("dtd", tmp_path / "data" / "vtab-1k", "test")[0])
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    cfg = config.resolve("dtd", "mae", arch_overrides=dict(TINY, patch_size=32), epochs=1, warmup_epochs=0,
                          num_prompts=4, batch_size=16)   # the 12 training images in one step, not padded to 128

    def two_seeds(results_dir):
        settings = runtime.Settings(results_dir=str(results_dir), data_dir=str(tmp_path / "data"), quiet=True,
                                    checkpoint=str(ckpt))
        done = runs.run_queue([(cfg.replace(seed=seed), "final", "recipe") for seed in (42, 43)], settings)
        return [r["final"] for r in done]
    kept = two_seeds(tmp_path / "kept")
    decoded_test = [p for p in decodes if p in test_paths]
    assert sorted(decoded_test) == sorted(test_paths)            # 15 test images, each decoded once for two runs
    assert len(decodes) - len(decoded_test) == 12                 # train800val200, decoded into the disk cache once
    datasets.forget_kept_splits()
    monkeypatch.setattr(datasets, "KEEP_DECODED_BYTES", 0)
    streamed_again = two_seeds(tmp_path / "streamed")
    assert sum(p in test_paths for p in decodes) == 15 + 2 * 15
    assert streamed_again == kept
