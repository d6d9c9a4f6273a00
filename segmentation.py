"""ADE20K semantic segmentation with SETR-PUP on a prompted, frozen ViT (Table 3 / Table 6 of the paper).

Neither VPT nor the official Gated Prompt Tuning release ships segmentation code, so this module
follows mmsegmentation's SETR-PUP ADE20K config (configs/setr/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py,
_base_/models/setr_pup.py, _base_/datasets/ade20k.py, schedule_160k.py) scaled to ViT-B/16 as the paper
states (aux heads on blocks 5 and 9). See REFERENCE.md section 4.

    import segmentation as seg
    result = seg.train_segmentation(cfg, "data/", "mae_pretrain_vit_base.pth", "runs/ade_mae_gated")
    result["miou_ss"], result["miou_ms"]          # percent, as in Table 3

Layout: model (SETR-PUP heads) -> data (ADE20K, augmentation, fixture) -> metrics -> inference -> training.
Blocks are numbered 1..L as in gated_prompt.py.
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

import data
import gated_prompt as gp
import runtime
from runtime import UserError

NUM_CLASSES = 150
IGNORE_INDEX = 255
MEAN = tuple(255 * m for m in data.IMAGENET_MEAN)  # 0..255 scale, as mmseg's SegDataPreProcessor
STD = tuple(255 * s for s in data.IMAGENET_STD)
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)   # mmseg ade20k.py img_ratios, with flip
ADE_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
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

# Defaults = mmseg's SETR-PUP ADE20K recipe (REFERENCE.md section 4) + the paper's Table 5 ADE20K row.
DEFAULTS = dict(
    task="ade20k", ssl="mae", method="gated+temp", arch="vit_base", arch_overrides={},
    num_prompts=100, gate_init=10.0, prompt_dropout=0.1,
    lr=0.001, batch_size=16, iters=160000, seed=42, bf16=True,
    crop_size=512, aux_blocks=(5, 9), head_channels=256,
    eval_every=0, save_every=2000, num_workers=8,
)
AUX_LOSS_WEIGHT = 0.4      # each aux head (mmseg loss_weight=0.4)
HEAD_LR_MULT = 10.0        # mmseg paramwise_cfg custom_keys={'head': lr_mult=10}
POLY_POWER, POLY_MIN_LR = 0.9, 1e-4   # mmseg PolyLR(power=0.9, eta_min=1e-4), per iteration
LOG_EVERY = 50             # iterations between loss read-outs (host sync + NaN check)
RESUME_FREE_KEYS = ("eval_every", "save_every", "num_workers")  # may change between a run and its resume

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
        """[B, 1 + prompts + patches, D] -> [B, D, H/p, W/p] (CLS and prompt tokens dropped)."""
        p = self.backbone.cfg.patch_size
        h, w = image.shape[-2] // p, image.shape[-1] // p
        patches = tokens[:, 1 + self.backbone.num_prompts:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def forward(self, x):
        """Eval: logits [B, C, H, W]. Training: (logits, [aux logits, one per aux block])."""
        aux_blocks = self.aux_blocks if self.training else ()
        last, outs, _ = self.backbone.forward_tokens(x, out_blocks=aux_blocks)
        logits = _resize_to(self.decode_head(self.patch_grid(last, x)), x.shape[-2:])
        if not self.training:
            return logits
        aux = [_resize_to(head(self.patch_grid(outs[b], x)), x.shape[-2:])
               for b, head in zip(self.aux_blocks, self.aux_heads)]
        return logits, aux

    # --- what trains (the runtime checkpoint helpers call these) ---------------
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def prompt_state_dict(self):
        """Everything training changes: prompts, gates, temperatures and both heads (incl. BN statistics)."""
        frozen = tuple(f"backbone.{name}" for name in gp.VisionTransformer.BACKBONE)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def param_groups(self, lr):
        """SGD groups: prompt side at `lr`, heads at HEAD_LR_MULT * lr (mmseg custom_keys 'head')."""
        prompt_side = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        groups = [{"params": prompt_side, "lr": lr}] if prompt_side else []
        return groups + [{"params": heads, "lr": lr * HEAD_LR_MULT}]


def _resize_to(logits, size):
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_config(cfg):
    """DEFAULTS updated with `cfg`; "img_size" is accepted as another name for "crop_size"."""
    cfg = dict(cfg)
    img_size = cfg.pop("img_size", None)
    if img_size is not None and cfg.setdefault("crop_size", img_size) != img_size:
        raise ValueError(f"img_size {img_size} != crop_size {cfg['crop_size']}: the ViT runs on the crops")
    cfg = {**DEFAULTS, **cfg}
    if cfg["task"] != "ade20k":
        raise ValueError(f"segmentation.py trains ADE20K only, got task {cfg['task']!r}")
    cfg["aux_blocks"] = list(cfg["aux_blocks"])
    return cfg


def build_segmenter(cfg, checkpoint_path=None, verbose=True):
    """SETRPUP from a config dict (keys of DEFAULTS); loads the backbone when a checkpoint is given."""
    cfg = segmentation_config(cfg)
    vit_cfg = gp.vit_config(cfg["arch"], cfg["ssl"], img_size=cfg["crop_size"], **cfg["arch_overrides"])
    prompt_cfg = gp.prompt_config(cfg["method"], num_classes=0, num_prompts=cfg["num_prompts"],
                                  gate_init=cfg["gate_init"], prompt_dropout=cfg["prompt_dropout"])
    backbone = gp.VisionTransformer(vit_cfg, prompt_cfg)
    if checkpoint_path is not None:
        report = gp.load_backbone(backbone, checkpoint_path)  # resizes the 14x14 position grid to 32x32
        if verbose and runtime.is_main():
            print(report)
    return SETRPUP(backbone, NUM_CLASSES, cfg["aux_blocks"], cfg["head_channels"])


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
    for root in (os.path.join(data_root, "ADEChallengeData2016"), data_root):
        if all(os.path.isdir(os.path.join(root, kind, split)) for kind in ("images", "annotations")
               for split in ("training", "validation")):
            return root
    raise UserError(f"ADE20K not found: expected {os.path.join(data_root, 'ADEChallengeData2016')}/"
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


def normalize(image):
    """uint8/float image tensor [..., 3, H, W] in 0..255 -> float, ImageNet mean/std."""
    mean = torch.tensor(MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD, device=image.device).view(3, 1, 1)
    return (image.float() - mean) / std


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
    # RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True); (4c, c) for crop c
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
    # (mmseg Pad(pad_val=0, seg_pad_val=255) after Normalize; SegDataPreProcessor in mmseg 1.x)
    image = normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
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
# Inference (mmseg EncoderDecoder slide mode + aug_test)


@torch.no_grad()
def slide_inference(model, img, num_classes=NUM_CLASSES, crop=512, stride=341, window_batch=8):
    """mmseg slide_inference: logits [B, C, H, W] averaged over crop x crop windows every `stride` pixels
    (the last window of a row/column is shifted back to end at the border). An image smaller than the crop
    is padded bottom/right with 0 (normalised space) and the logits cropped back. `model(x)` must return
    logits for x (eval mode); windows are run `window_batch` at a time."""
    B, _, H, W = img.shape
    padded = F.pad(img, (0, max(crop - W, 0), 0, max(crop - H, 0)))
    h_img, w_img = padded.shape[-2:]
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * stride + crop, h_img), min(j * stride + crop, w_img)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    logits = padded.new_zeros((B, num_classes, h_img, w_img), dtype=torch.float32)
    count = padded.new_zeros((1, 1, h_img, w_img), dtype=torch.float32)
    for k in range(0, len(windows), window_batch):
        chunk = windows[k:k + window_batch]
        out = model(torch.cat([padded[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])).float()
        for n, (y1, y2, x1, x2) in enumerate(chunk):
            logits[:, :, y1:y2, x1:x2] += out[n * B:(n + 1) * B]
            count[:, :, y1:y2, x1:x2] += 1
    return (logits / count)[:, :, :H, :W]


@torch.no_grad()
def predict(model, image, crop=512, stride=341, multi_scale=True, bf16=False, window_batch=8):
    """One image (uint8 [3, H, W] on the model's device) -> (single-scale, multi-scale+flip) label maps [H, W].
    Test scale = mmseg Resize((2048, 512), keep_ratio), i.e. (4c, c) for crop c. Single scale: argmax of the
    slide logits resized to H x W. Multi-scale (mmseg aug_test): softmax averaged over ratios MS_RATIOS x
    {no flip, flip}, each resized to H x W first. Without `multi_scale` the second map is None."""
    H, W = image.shape[-2:]
    device = image.device
    ratios = MS_RATIOS if multi_scale else (1.0,)
    single, prob_sum = None, None
    for ratio in ratios:
        size = rescale_size(H, W, (int(4 * crop * ratio), int(crop * ratio)))
        x = normalize(F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False))
        for flip in ((False, True) if multi_scale else (False,)):
            with runtime.autocast(device, bf16):
                logits = slide_inference(model, x.flip(-1) if flip else x, NUM_CLASSES, crop, stride, window_batch)
            logits = _resize_to(logits.flip(-1) if flip else logits, (H, W))[0]
            if ratio == 1.0 and not flip:
                single = logits.argmax(0)
            if multi_scale:
                prob = logits.softmax(0)
                prob_sum = prob if prob_sum is None else prob_sum + prob
    return single, (prob_sum.argmax(0) if multi_scale else None)


@torch.no_grad()
def confusion_matrices(model, dataset, crop=512, multi_scale=True, bf16=False, num_workers=2, progress=False):
    """(single-scale, multi-scale or None) confusion matrices over `dataset`, each rank evaluating images
    rank, rank + world, ... and the matrices summed across ranks (exact for any number of ranks).
    Sliding-window stride = 2/3 of the crop (mmseg's 341 for 512)."""
    rank, world_size = runtime.world()
    device = next(model.parameters()).device
    model.eval()
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(shard, batch_size=None, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    cm_single = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    cm_multi = torch.zeros_like(cm_single) if multi_scale else None
    for image, label in tqdm(loader, desc="eval", disable=not (progress and rank == 0), dynamic_ncols=True):
        image, label = image.to(device), label.to(device)
        single, multi = predict(model, image, crop, crop * 2 // 3, multi_scale, bf16)
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


def poly_scheduler(optimizer, total_iters):
    """Per-iteration poly decay of every group: lr = (base - min) * (1 - t/T)^0.9 + min, min = 1e-4 (mmseg
    PolyLR eta_min, shared by the groups; capped at the group's base lr so a small lr never rises)."""
    def factor(base):
        floor = min(POLY_MIN_LR, base)
        return lambda t: ((base - floor) * (1 - min(t, total_iters) / max(total_iters, 1)) ** POLY_POWER + floor) / base
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])


def _comparable(cfg):
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in RESUME_FREE_KEYS}))


def _percent(values):
    return [None if v != v else 100 * v for v in values]  # NaN (class absent) -> null in JSON


def train_segmentation(cfg, data_root, checkpoint_path, out_dir, resume=False, progress=True):
    """Train SETR-PUP + prompts on ADE20K, then evaluate single- and multi-scale on the validation set.
    cfg: keys of DEFAULTS (missing ones take the defaults). checkpoint_path: backbone file for
    gated_prompt.load_backbone (None: random backbone, for tests). Writes out_dir/train_state.pt every
    cfg["save_every"] iterations and at the end, and out_dir/result.json. Returns the result dict."""
    cfg = segmentation_config(cfg)
    rank, world_size = runtime.world()
    device = runtime.pick_device()
    crop, iters = cfg["crop_size"], cfg["iters"]
    if cfg["batch_size"] % world_size:
        raise UserError(f"batch_size {cfg['batch_size']} is not divisible by the {world_size} processes")
    per_rank_batch = cfg["batch_size"] // world_size

    train_set = ADE20KTrain(data_root, crop, cfg["seed"])
    val_set = ADE20K(data_root, "validation")
    runtime.seed_everything(cfg["seed"])
    model = sync_batchnorm_if_distributed(build_segmenter(cfg, checkpoint_path).to(device))
    optimizer = torch.optim.SGD(model.param_groups(cfg["lr"]), lr=cfg["lr"], momentum=0.9, weight_decay=0.0)
    scheduler = poly_scheduler(optimizer, iters)
    params = model.trainable_parameters()

    state_path = os.path.join(out_dir, "train_state.pt")
    step, history = 0, []
    if resume and os.path.isfile(state_path):
        state = runtime.load_training_state(state_path, model, optimizer, scheduler)
        if _comparable(state["extra"].get("cfg", {})) != _comparable(cfg):
            raise UserError(f"{state_path} was written with another configuration; use a new out_dir or the "
                            f"same settings ({_comparable(state['extra'].get('cfg', {}))})")
        step, history = state["step"], state["history"]
        if runtime.is_main():
            print(f"resuming from {state_path} at iteration {step}")

    def save():
        if runtime.is_main():
            runtime.save_training_state(state_path, model, optimizer, scheduler, step, history, {"cfg": cfg})

    loader = DataLoader(train_set, batch_size=per_rank_batch, num_workers=cfg["num_workers"],
                        sampler=TrainSampleStream(len(train_set), per_rank_batch, cfg["seed"], step),
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(cfg["seed"]))  # keeps the global RNG untouched
    start_step, last_log, start_time = step, step, time.time()
    running = torch.zeros((), device=device)
    model.train()
    bar = tqdm(total=iters, initial=step, desc="train", disable=not (progress and rank == 0), dynamic_ncols=True)
    batches = iter(loader) if step < iters else None
    while step < iters:
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with runtime.autocast(device, cfg["bf16"]):
            logits, aux = model(images)
        loss = seg_loss(logits, labels) + AUX_LOSS_WEIGHT * sum(seg_loss(a, labels) for a in aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        runtime.all_reduce_gradients(params)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        running += loss.detach()
        saving = step == iters or (cfg["save_every"] and step % cfg["save_every"] == 0)
        if step % LOG_EVERY == 0 or saving:  # never save a state that has gone non-finite
            runtime.check_finite(running, f"iteration {step}")
            history.append({"step": step, "loss": running.item() / (step - last_log), "lr": scheduler.get_last_lr()[0]})
            running.zero_()
            last_log = step
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", lr=f"{history[-1]['lr']:.2e}")
        if cfg["eval_every"] and step % cfg["eval_every"] == 0 and step < iters:
            cm, _ = confusion_matrices(model, val_set, crop, False, cfg["bf16"], cfg["num_workers"])
            history.append({"step": step, "miou_ss": 100 * segmentation_metrics(cm)["miou"]})
            model.train()
        if saving:
            save()
    bar.close()
    train_time = time.time() - start_time

    start_eval = time.time()
    cm_single, cm_multi = confusion_matrices(model, val_set, crop, True, cfg["bf16"], cfg["num_workers"], progress)
    single, multi = segmentation_metrics(cm_single), segmentation_metrics(cm_multi)
    vit = model.backbone
    result = {
        "task": "ade20k", "method": cfg["method"], "ssl": cfg["ssl"], "num_prompts": vit.num_prompts,
        "checkpoint": os.fspath(checkpoint_path) if checkpoint_path is not None else None,
        "miou_ss": 100 * single["miou"], "miou_ms": 100 * multi["miou"],
        "aacc_ss": 100 * single["aacc"], "aacc_ms": 100 * multi["aacc"],
        "macc_ss": 100 * single["macc"], "macc_ms": 100 * multi["macc"],
        "per_class_iou_ss": dict(zip(ADE_CLASSES, _percent(single["iou"]))),
        "per_class_iou_ms": dict(zip(ADE_CLASSES, _percent(multi["iou"]))),
        "gates": vit.gates().detach().cpu().tolist() if vit.gate_logits is not None else None,
        "selection_ratio": vit.selection_ratio().tolist() if vit.gate_logits is not None else None,
        "temperatures": vit.temperatures.detach().cpu().tolist() if vit.temperatures is not None else None,
        "iters": step, "history": history,
        "train_time_s": train_time, "train_iters_per_s": (step - start_step) / max(train_time, 1e-9),
        "eval_time_s": time.time() - start_eval, "num_val_images": len(val_set),
        "device": runtime.device_name(device), "world_size": world_size, "cfg": cfg,
        "code_version": runtime.code_version(),
    }
    if runtime.is_main():
        runtime.write_json(os.path.join(out_dir, "result.json"), result)
    return result
