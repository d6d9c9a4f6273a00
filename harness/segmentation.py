"""ADE20K semantic segmentation with SETR-PUP on a prompted, frozen ViT (Tables 3 and 6 of the paper).

Neither VPT nor the official Gated Prompt Tuning release ships segmentation code. This module follows
mmsegmentation 0.x's SETR-PUP ADE20K config -- the version of the paper's time: configs/setr/
setr_pup_512x512_160k_b16_ade20k.py with _base_/models/setr_pup.py, _base_/datasets/ade20k.py and
_base_/schedules/schedule_160k.py -- scaled to ViT-B/16 as the paper states (aux heads on blocks 5 and 9).
The recipe's numbers live in paper_hparams.yaml (`segmentation:`) and reach this module through the config.

    cfg = config.resolve("ade20k", "mae")
    body, model = segmentation.train_segmentation(cfg, runtime.Settings.for_device(), "ade.state.pt", checkpoint)
    body["final"]["miou_ss"], body["final"]["miou_ms"]          # percent, as in Table 3

Layout: model (SETR-PUP heads) -> data (ADE20K, augmentation) -> metrics -> inference -> training.
Blocks are numbered 1..L as in gated_prompt.py.
"""
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from harness.data import datasets
import gated_prompt as gp
from harness import config
from harness import runtime
from harness.data.releases import ADE_URL  # where each dataset comes from is written in releases.py
from harness.runtime import UserError

NUM_CLASSES = config.TASKS["ade20k"].num_classes   # 150
IGNORE_INDEX = 255
ADE_CLASSES = (  # mmseg's ADE20KDataset order; index = training label
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")
assert len(ADE_CLASSES) == NUM_CLASSES

SAVE_EVERY = 2000          # iterations between resumable states
LOG_EVERY = 50             # iterations between loss read-outs (host sync + NaN check)

# -----------------------------------------------------------------------------
# Model: SETR-PUP (Zheng et al., 2021) heads on a prompted ViT


class SETRUPHead(nn.Module):
    """mmseg SETRUPHead: LayerNorm on the tokens, `num_convs` x [3x3 conv, BN, ReLU, bilinear x`up_scale`],
    then a 1x1 classifier. The LayerNorm is the head's own (fresh, trainable), as in mmseg, whose ViT
    backbone returns un-normed block outputs (final_norm=False)."""

    def __init__(self, in_dim, channels, num_classes, num_convs, up_scale):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        stages, c_in = [], in_dim
        for _ in range(num_convs):
            conv = nn.Conv2d(c_in, channels, 3, padding=1, bias=False)  # mmcv ConvModule: no bias before a norm
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv kaiming_init
            stages += [conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False)]
            c_in = channels
        self.up_convs = nn.Sequential(*stages)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg BaseDecodeHead init
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, grid):
        """grid: [B, D, h, w] patch features -> [B, num_classes, h * up^n, w * up^n]."""
        x = self.norm(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_seg(self.up_convs(x))


class SETRPUP(nn.Module):
    """A gated_prompt.VisionTransformer (frozen backbone + prompts) with the SETR-PUP decode head on the last
    block's patch tokens and auxiliary heads on blocks `aux_blocks`. Trainable: prompt side + heads."""

    def __init__(self, backbone: gp.VisionTransformer, num_classes=NUM_CLASSES, aux_blocks=(5, 9), channels=256):
        super().__init__()
        depth, dim = backbone.cfg.depth, backbone.cfg.embed_dim
        if any(not 1 <= b <= depth for b in aux_blocks):
            raise ValueError(f"aux_blocks {tuple(aux_blocks)} must lie in 1..{depth}")
        self.backbone = backbone
        self.aux_blocks = tuple(aux_blocks)
        # SETR-PUP decode head: 4 x (conv, up x2) = x16, back to the input resolution
        self.decode_head = SETRUPHead(dim, channels, num_classes, num_convs=4, up_scale=2)
        # aux heads as mmseg's ADE20K SETR-PUP config: num_convs=2 with SETRUPHead's default up_scale=4
        self.aux_heads = nn.ModuleList(SETRUPHead(dim, channels, num_classes, num_convs=2, up_scale=4)
                                       for _ in self.aux_blocks)

    def patch_grid(self, tokens, image):
        """[B, 1 + prompts + patches, D] -> [B, D, H/p, W/p]: the patch tokens are the last h*w (CLS and any
        prompts -- none before the insertion block -- come first)."""
        p = self.backbone.cfg.patch_size
        h, w = image.shape[-2] // p, image.shape[-1] // p
        patches = tokens[:, tokens.shape[1] - h * w:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def forward(self, x):
        """Eval: logits [B, C, H, W]. Training: (logits, [aux logits, one per aux block]). An input whose sides
        are not multiples of the patch size is zero-padded bottom/right first (mmseg ViT's corner padding) and
        the logits are resized back to the input's size, as mmseg's encode_decode does."""
        p = self.backbone.cfg.patch_size
        size = x.shape[-2:]
        padded = F.pad(x, (0, -size[1] % p, 0, -size[0] % p))
        aux_blocks = self.aux_blocks if self.training else ()
        last, outs = self.backbone.forward_intermediates(padded, blocks=aux_blocks)
        logits = _resize_to(self.decode_head(self.patch_grid(last, padded)), size)
        if not self.training:
            return logits
        aux = [_resize_to(head(self.patch_grid(outs[b], padded)), size)
               for b, head in zip(self.aux_blocks, self.aux_heads)]
        return logits, aux

    # --- what trains (the runtime checkpoint helpers call these) ---------------
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def prompt_state_dict(self):
        """Everything training changes: prompts, gates, temperatures and both heads (incl. BN statistics)."""
        frozen = tuple(f"backbone.{name}" for name in gp.VisionTransformer.BACKBONE)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def load_prompt_state_dict(self, state):
        return gp.load_exactly(self, self.prompt_state_dict(), state)

    def store_frozen_weights(self, dtype):
        """The backbone's frozen weights in `dtype` (gated_prompt.VisionTransformer.store_frozen_weights); the
        heads train and stay fp32."""
        self.backbone.store_frozen_weights(dtype)
        return self

    def param_groups(self, lr, head_lr_mult):
        """SGD groups: prompt side at `lr`, heads at head_lr_mult * lr (mmseg custom_keys={'head': lr_mult})."""
        prompt_side = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        groups = [{"params": prompt_side, "lr": lr}] if prompt_side else []
        return groups + [{"params": heads, "lr": lr * head_lr_mult}]


def _resize_to(logits, size):
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def build_segmenter(cfg, checkpoint=None, verbose=True, trust_pickle=False):
    """SETRPUP of a resolved ADE20K config (config.model_from_config's backbone, no classification head); loads
    the backbone when a checkpoint is given, resizing its position grid to the crop's (14x14 -> 32x32)."""
    backbone = config.model_from_config(cfg, 0, checkpoint, verbose=verbose and runtime.is_main(),
                                        trust_pickle=trust_pickle)
    return SETRPUP(backbone, NUM_CLASSES, cfg.aux_blocks, cfg.head_channels)


def sync_batchnorm_if_distributed(model):
    """BatchNorm on one process; SyncBatchNorm across torchrun ranks (mmseg norm_cfg=SyncBN), so the
    statistics are over the global batch of 16 either way."""
    if runtime.world()[1] > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model

# -----------------------------------------------------------------------------
# Data: ADEChallengeData2016/{images,annotations}/{training,validation}/<stem>.{jpg,png}


def ade20k_root(data_root):
    """The ADEChallengeData2016 folder: `data_root` itself or `data_root/ADEChallengeData2016`."""
    data_root = os.fspath(data_root)
    folder = config.TASKS["ade20k"].folders[0]   # ADEChallengeData2016
    for root in (os.path.join(data_root, folder), data_root):
        if all(os.path.isdir(os.path.join(root, kind, split)) for kind in ("images", "annotations")
               for split in ("training", "validation")):
            return root
    raise UserError(f"ADE20K not found: expected {os.path.join(data_root, folder)}/"
                    f"{{images,annotations}}/{{training,validation}}. Download and unzip {ADE_URL} "
                    f"into {data_root}.")


def reduce_zero_label(label):
    """ADE20K PNG -> training labels (mmseg reduce_zero_label): 0 (other) -> 255 (ignored), k -> k - 1."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    return out.astype(np.uint8)


def rescale_size(height, width, scale):
    """mmcv.rescale_size with keep_ratio: largest size whose long side <= max(scale) and short side <=
    min(scale). Scale (2048, 512) gives short side 512 for all but very elongated images."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image, size):
    """uint8 HxWx3 -> uint8 resized, bilinear without antialiasing (cv2 INTER_LINEAR, as mmcv)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_label(label, size):
    """Nearest neighbour (cv2 INTER_NEAREST picks floor(dst * scale), as torch 'nearest')."""
    t = torch.from_numpy(np.ascontiguousarray(label))[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy()


class ADE20K(Dataset):
    """One split ("training" / "validation"). Items: (uint8 image [3, H, W], int64 label [H, W]) with labels
    0..149 and 255 = ignore, at the original resolution."""

    def __init__(self, data_root, split):
        self.root = ade20k_root(data_root)
        image_dir = os.path.join(self.root, "images", split)
        label_dir = os.path.join(self.root, "annotations", split)
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.endswith(".jpg"))
        if not stems:
            raise UserError(f"no .jpg images in {image_dir}")
        self.images = [os.path.join(image_dir, s + ".jpg") for s in stems]
        self.labels = [os.path.join(label_dir, s + ".png") for s in stems]
        missing = [(i, a) for i, a in zip(self.images, self.labels) if not os.path.isfile(a)]
        if missing:
            raise UserError(f"{len(missing)} image(s) in {image_dir} have no annotation; e.g. {missing[0][0]} "
                            f"needs {missing[0][1]}")

    def __len__(self):
        return len(self.images)

    def load(self, i):
        """(uint8 HxWx3 RGB, uint8 HxW training labels); checks the pair."""
        with Image.open(self.images[i]) as im, Image.open(self.labels[i]) as lb:
            if im.size != lb.size:
                raise UserError(f"annotation {self.labels[i]} is {lb.size[0]}x{lb.size[1]} but its image "
                                f"{self.images[i]} is {im.size[0]}x{im.size[1]}")
            image, label = np.array(im.convert("RGB")), np.array(lb)
        if label.ndim != 2 or label.max(initial=0) > NUM_CLASSES:
            raise UserError(f"annotation {self.labels[i]}: expected a single-channel PNG with values 0..{NUM_CLASSES}, "
                            f"found shape {label.shape} max {label.max(initial=0)}")
        return image, reduce_zero_label(label)

    def __getitem__(self, i):
        image, label = self.load(i)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label.astype(np.int64))


class ADE20KTrain(ADE20K):
    """Training split with mmseg's augmentation. Items are addressed by (image index, sample number): the
    random choices come from (seed, sample number) only, so the stream is the same with any worker count
    and after a resume."""

    def __init__(self, data_root, crop_size, seed):
        super().__init__(data_root, "training")
        self.crop_size, self.seed = crop_size, seed

    def __getitem__(self, key):
        index, sample_number = key
        rng = np.random.default_rng([self.seed, sample_number])
        return train_augment(*self.load(index), self.crop_size, rng)


def train_augment(image, label, crop, rng):
    """mmseg ADE20K train pipeline -> (normalised float [3, crop, crop], int64 labels [crop, crop])."""
    # Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0)), keep_ratio; (4c, c) for crop c
    ratio = rng.uniform(0.5, 2.0)
    size = rescale_size(*label.shape, (int(4 * crop * ratio), int(crop * ratio)))
    image, label = resize_image(image, size), resize_label(label, size)
    # RandomCrop(crop, cat_max_ratio=0.75): redraw up to 10 times while one class covers >= 75% of the crop
    y, x = random_crop_offset(label.shape, crop, rng)
    for _ in range(10):
        classes, counts = np.unique(label[y:y + crop, x:x + crop], return_counts=True)
        counts = counts[classes != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
            break
        y, x = random_crop_offset(label.shape, crop, rng)
    image, label = image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]
    if rng.random() < 0.5:  # RandomFlip(prob=0.5), horizontal
        image, label = image[:, ::-1], label[:, ::-1]
    image = photometric_distortion(image, rng)
    # normalise, then pad bottom/right to the crop: image with 0 (after normalisation), label with 255
    # (mmseg Pad(size=crop_size, pad_val=0, seg_pad_val=255) after Normalize)
    image = datasets.imagenet_normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    label = torch.from_numpy(label.astype(np.int64))
    pad = (0, crop - label.shape[1], 0, crop - label.shape[0])
    return F.pad(image, pad, value=0.0), F.pad(label, pad, value=IGNORE_INDEX)


def random_crop_offset(shape, crop, rng):
    return int(rng.integers(0, max(shape[0] - crop, 0) + 1)), int(rng.integers(0, max(shape[1] - crop, 0) + 1))


def photometric_distortion(image, rng):
    """mmseg PhotoMetricDistortion: each step with probability 1/2, results clipped to uint8 after each:
    brightness +-32; contrast x[0.5, 1.5] before or after (random order); saturation x[0.5, 1.5];
    hue +-18 of 180 degrees-units. HSV via PIL (H in 0..255) instead of cv2 (H in 0..179)."""
    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        image = convert(image, beta=rng.uniform(-32, 32))
    contrast_first = rng.integers(2)
    if contrast_first and rng.integers(2):
        image = convert(image, alpha=rng.uniform(0.5, 1.5))
    saturation, hue = rng.integers(2), rng.integers(2)
    if saturation or hue:
        hsv = np.array(Image.fromarray(np.ascontiguousarray(image)).convert("HSV"))
        if saturation:
            hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        if hue:
            shift = int(round(rng.integers(-18, 19) * 256 / 180))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + shift) % 256).astype(np.uint8)
        image = np.array(Image.merge("HSV", [Image.fromarray(hsv[..., c]) for c in range(3)]).convert("RGB"))
    if not contrast_first and rng.integers(2):
        image = convert(image, alpha=rng.uniform(0.5, 1.5))
    return image


class TrainSampleStream(Sampler):
    """Endless (image index, sample number) keys for one rank. Global sample s = iteration * global_batch +
    rank * per_rank + j; epoch s // n is a seeded permutation of the images. Starts at `start_iteration`."""

    def __init__(self, num_images, per_rank_batch, seed, start_iteration=0):
        self.n, self.per_rank, self.seed, self.start = num_images, per_rank_batch, seed, start_iteration
        self.rank, self.world_size = runtime.world()

    def __iter__(self):
        global_batch, epoch, order = self.per_rank * self.world_size, -1, None
        iteration = self.start
        while True:
            for j in range(self.per_rank):
                s = iteration * global_batch + self.rank * self.per_rank + j
                if s // self.n != epoch:
                    epoch = s // self.n
                    order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                yield int(order[s % self.n]), s
            iteration += 1


# -----------------------------------------------------------------------------
# Metrics: one exact confusion matrix, mmseg's definitions


def confusion_matrix(pred, label, num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX):
    """int64 [C, C], rows = ground truth, columns = prediction, over pixels whose label is not ignored."""
    valid = label != ignore_index
    index = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(confusion):
    """mmseg's total_area_* metrics from a confusion matrix: IoU_c = TP / (gt + pred - TP), NaN where the
    class is in neither (union 0) and left out of the mean; aAcc = sum TP / labelled pixels; Acc_c = TP / gt.
    Returns fractions: {"miou", "aacc", "macc", "iou" [C], "acc" [C]}."""
    cm = confusion.double().cpu()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    return {"miou": float(iou.nanmean()), "aacc": float(tp.sum() / gt.sum().clamp(min=1)),
            "macc": float(acc.nanmean()), "iou": iou.tolist(), "acc": acc.tolist()}

# -----------------------------------------------------------------------------
# Inference (mmseg 0.x EncoderDecoder: slide mode, aug_test)


@torch.no_grad()
def slide_inference(model, img, num_classes=NUM_CLASSES, crop=512, stride=341, window_batch=8):
    """mmseg slide_inference: logits [B, C, H, W] averaged over windows every `stride` pixels (the last window
    of a row/column is shifted back to end at the border). Windows are crop x crop, or the whole side where the
    image is smaller than the crop: such images are not padded (the model pads to its patch size itself).
    `model(x)` must return logits for x (eval mode); windows run `window_batch` at a time."""
    B, _, H, W = img.shape
    h_grids = max(H - crop + stride - 1, 0) // stride + 1
    w_grids = max(W - crop + stride - 1, 0) // stride + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * stride + crop, H), min(j * stride + crop, W)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    logits = img.new_zeros((B, num_classes, H, W), dtype=torch.float32)
    count = img.new_zeros((1, 1, H, W), dtype=torch.float32)
    for k in range(0, len(windows), window_batch):
        chunk = windows[k:k + window_batch]
        out = model(torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])).float()
        for n, (y1, y2, x1, x2) in enumerate(chunk):
            logits[:, :, y1:y2, x1:x2] += out[n * B:(n + 1) * B]
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def test_scales(height, width, crop, ratios):
    """The sizes an image is evaluated at: mmseg 0.x MultiScaleFlipAug(img_scale=(2048, 512), img_ratios) rescales
    the image (keep_ratio) to fit (int(2048 r), int(512 r)) for each ratio r; (4c, c) for crop c."""
    return [rescale_size(height, width, (int(4 * crop * r), int(crop * r))) for r in ratios]


@torch.no_grad()
def predict(model, image, crop=512, stride=341, ms_ratios=None, bf16=False, window_batch=8):
    """One image (uint8 [3, H, W] on the model's device) -> (single-scale, multi-scale+flip) label maps [H, W].
    Single scale: the image rescaled to fit (4c, c), argmax of the slide logits resized to H x W. Multi-scale
    (mmseg aug_test): softmax averaged over `ms_ratios` x {no flip, flip}, each resized to H x W first.
    Without ms_ratios the second map is None."""
    H, W = image.shape[-2:]
    device = image.device
    single, prob_sum = None, None
    ratios = list(ms_ratios) if ms_ratios else [1.0]
    for ratio, size in zip(ratios, test_scales(H, W, crop, ratios)):
        resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
        x = datasets.imagenet_normalize(resized.round().clamp(0, 255))   # mmcv resizes the uint8 image
        for flip in ((False, True) if ms_ratios else (False,)):
            with runtime.autocast(device, bf16):
                logits = slide_inference(model, x.flip(-1) if flip else x, NUM_CLASSES, crop, stride, window_batch)
            logits = _resize_to(logits.flip(-1) if flip else logits, (H, W))[0]
            if ratio == 1.0 and not flip:
                single = logits.argmax(0)
            if ms_ratios:
                prob = logits.softmax(0)
                prob_sum = prob if prob_sum is None else prob_sum + prob
    return single, (prob_sum.argmax(0) if ms_ratios else None)


@torch.no_grad()
def confusion_matrices(model, dataset, cfg, multi_scale=True, bf16=False, loader_workers=2, progress=False):
    """(single-scale, multi-scale or None) confusion matrices over `dataset`, each rank evaluating images
    rank, rank + world, ... and the matrices summed across ranks (exact for any number of ranks). Crop, stride
    and ratios come from the config (mmseg's test_cfg: slide, 512, stride 341)."""
    rank, world_size = runtime.world()
    device = next(model.parameters()).device
    model.eval()
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(shard, batch_size=None, num_workers=loader_workers,
                        generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    cm_single = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    cm_multi = torch.zeros_like(cm_single) if multi_scale else None
    for image, label in tqdm(loader, desc="eval", disable=not (progress and rank == 0), dynamic_ncols=True):
        image, label = image.to(device), label.to(device)
        single, multi = predict(model, image, cfg.img_size, cfg.slide_stride, cfg.ms_ratios if multi_scale else None,
                                bf16)
        cm_single += confusion_matrix(single, label)
        if multi_scale:
            cm_multi += confusion_matrix(multi, label)
    runtime.all_reduce_sum(cm_single)
    if multi_scale:
        runtime.all_reduce_sum(cm_multi)
    return cm_single, cm_multi

# -----------------------------------------------------------------------------
# Training (mmseg SETR-PUP ADE20K schedule)


def seg_loss(logits, labels):
    """mmseg CrossEntropyLoss(avg_non_ignore=False): per-pixel CE, ignored pixels count 0, mean over ALL pixels."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none").mean()


def setr_loss(aux_loss_weight):
    """The decode head's loss plus aux_loss_weight x each aux head's, as runtime.make_train_step's loss_fn."""
    def loss_fn(outputs, labels):
        logits, aux = outputs
        return seg_loss(logits, labels) + aux_loss_weight * sum(seg_loss(a, labels) for a in aux), None
    return loss_fn


def poly_scheduler(optimizer, total_iters, power, min_lr):
    """Per-iteration poly decay of every group: lr = (base - min) * (1 - t/T)^power + min (mmseg PolyLR, min_lr
    shared by the groups; capped at the group's base lr so a small lr never rises)."""
    def factor(base):
        floor = min(min_lr, base)
        return lambda t: ((base - floor) * (1 - min(t, total_iters) / max(total_iters, 1)) ** power + floor) / base
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])


def _percent(values):
    return [None if v != v else 100 * v for v in values]  # NaN (class absent) -> null in JSON


def default_loader_workers():
    """Decoding processes per rank: the CPU count shared by the ranks on this node, at most 8."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, (os.cpu_count() or 2) // per_node - 1))


class ADE20KData:
    """The data of one ADE20K run: the augmented training stream and the validation set, decoded by
    `loader_workers` processes per rank (default_loader_workers() when None)."""

    def __init__(self, cfg, data_dir, loader_workers=None):
        world_size = runtime.world()[1]
        if cfg.batch_size % world_size:
            raise UserError(f"batch_size {cfg.batch_size} is not divisible by the {world_size} processes")
        self.per_rank_batch = cfg.batch_size // world_size
        self.loader_workers = default_loader_workers() if loader_workers is None else loader_workers
        self.train_set = ADE20KTrain(data_dir, cfg.img_size, cfg.seed)
        self.val_set = ADE20K(data_dir, "validation")

    def batches(self, cfg, start_iteration, device):
        loader = DataLoader(self.train_set, batch_size=self.per_rank_batch, num_workers=self.loader_workers,
                            sampler=TrainSampleStream(len(self.train_set), self.per_rank_batch, cfg.seed,
                                                      start_iteration),
                            pin_memory=device.type == "cuda", drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.seed))  # the global RNG stays untouched
        return iter(loader)


class Training:
    """Model, optimizer, poly schedule and the compiled step of one run -- no data: bench builds it on random
    batches. The model comes from `checkpoint` (None: random backbone); seeded with the config's seed."""

    def __init__(self, cfg, settings, checkpoint=None, verbose=True):
        self.device = settings.device
        if settings.compile:
            runtime.reset_compiler()
        runtime.seed_everything(cfg.seed)
        model = build_segmenter(cfg, checkpoint, verbose=verbose, trust_pickle=settings.trust_pickle)
        model = runtime.place_model(model, self.device, settings.bf16, settings.kernels)
        self.model = sync_batchnorm_if_distributed(model)
        self.optimizer = runtime.make_optimizer(self.model.param_groups(cfg.lr, cfg.head_lr_mult), cfg.lr,
                                                cfg.momentum, cfg.weight_decay, self.device)
        self.scheduler = poly_scheduler(self.optimizer, cfg.iters, cfg.poly_power, cfg.min_lr)
        self.step = runtime.make_train_step(self.model, self.optimizer, setr_loss(cfg.aux_loss_weight),
                                            self.device, settings.bf16, settings.compile)

    def iteration(self, images, labels):
        """One training iteration: the step, then the per-iteration lr decay. Returns the detached loss."""
        loss, _ = self.step(images, labels)
        self.scheduler.step()
        return loss


def train_segmentation(cfg, settings, state_path, checkpoint=None, save_every=SAVE_EVERY, loader_workers=None):
    """Train SETR-PUP + prompts on ADE20K (a resolved config) from the backbone file `checkpoint` (None: random),
    then evaluate single- and multi-scale on the validation set. Saves a resumable state at `state_path` every
    `save_every` iterations (--resume continues it; the result writer removes it). Returns (result body, trained
    model)."""
    with runtime.flush_denormals(settings.device):
        data_ = ADE20KData(cfg, settings.data_dir, loader_workers)
        run = Training(cfg, settings, checkpoint)
        state = runtime.resume_or_start(state_path, cfg.identity(), run.model, run.optimizer, run.scheduler,
                                        settings.resume)
        step, history, elapsed_before = (0, [], 0.0) if state is None else (
            state["step"], state["history"], state["extra"]["elapsed"])
        tic = time.perf_counter()
        start = step
        step = train_loop(run, data_, cfg, settings, state_path, step, history, elapsed_before, tic, save_every)
        train_seconds = time.perf_counter() - tic
        body = evaluate_and_report(run, data_, cfg, settings)
    body.update(history=history, iters=step, train_seconds=train_seconds,
                train_iters_per_second=(step - start) / max(train_seconds, 1e-9),
                wall_seconds=elapsed_before + time.perf_counter() - tic,
                wall_seconds_this_session=time.perf_counter() - tic,
                compiled=runtime.compile_record(settings.compile, train=run.step.compiled))
    return body, run.model


def train_loop(run, data_, cfg, settings, state_path, step, history, elapsed_before, tic, save_every):
    """Iterations step+1 .. iters; a loss read-out (and NaN check) every LOG_EVERY, a saved state every save_every."""
    running, last_log = torch.zeros((), device=run.device), step
    run.model.train()
    bar = tqdm(total=cfg.iters, initial=step, desc="train", dynamic_ncols=True,
               disable=settings.quiet or not runtime.is_main())
    batches = runtime.step_points(data_.batches(cfg, step, run.device)) if step < cfg.iters else None
    while step < cfg.iters:
        images, labels = next(batches)
        running += run.iteration(images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True))
        step += 1
        bar.update(1)
        saving = step == cfg.iters or (save_every and step % save_every == 0) or runtime.stop_requested()
        if step % LOG_EVERY == 0 or saving:  # never save a state that has gone non-finite
            mean_loss = running.item() / (step - last_log)
            runtime.check_finite(mean_loss, f"iteration {step}", state_saved=os.path.isfile(state_path))
            history.append({"step": step, "loss": mean_loss, "lr": run.scheduler.get_last_lr()[0]})
            running.zero_()
            last_log = step
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{history[-1]['lr']:.2e}")
        if saving and runtime.is_main():
            state = runtime.to_host(runtime.training_state(run.model, run.optimizer, run.scheduler, step))
            runtime.save_training_state(state_path, state, history, cfg.identity(),
                                        elapsed_before + time.perf_counter() - tic)
    bar.close()
    return step


def evaluate_and_report(run, data_, cfg, settings):
    """Single- and multi-scale mIoU on the validation set, per-class IoU and the learned gates."""
    tic = time.perf_counter()
    cm_single, cm_multi = confusion_matrices(run.model, data_.val_set, cfg, True, settings.bf16,
                                             data_.loader_workers, progress=not settings.quiet)
    single, multi = segmentation_metrics(cm_single), segmentation_metrics(cm_multi)
    return {
        "final": {"miou_ss": 100 * single["miou"], "miou_ms": 100 * multi["miou"],
                  "aacc_ss": 100 * single["aacc"], "aacc_ms": 100 * multi["aacc"],
                  "macc_ss": 100 * single["macc"], "macc_ms": 100 * multi["macc"]},
        "per_class_iou_ss": dict(zip(ADE_CLASSES, _percent(single["iou"]))),
        "per_class_iou_ms": dict(zip(ADE_CLASSES, _percent(multi["iou"]))),
        **runtime.learned_gates(run.model.backbone),
        "eval_seconds": time.perf_counter() - tic, "num_val_images": len(data_.val_set),
    }
