"""What every figure shares: images into a frozen backbone, and figure files out.

Images in: a path, PIL image or tensor -> a [3,H,W] tensor in [0,1] at the model's size (to_image_tensor), ImageNet
normalisation, a check of the block numbers a user asked for, and a context that runs a model in eval mode without
parameter gradients. Files out: a matplotlib figure on the Agg canvas (no global pyplot state) saved atomically as
PNG, and CSV tables. analysis.py (Figures 1, 4, 5, 7) and dip.py (Figures 2, 9) build on these; matplotlib is
imported only when a figure is drawn.
"""
import csv
import io
import os
from contextlib import contextmanager

import torch
import torchvision.transforms.functional as TF

from harness.runtime import UserError, atomic_write, write_text

# -----------------------------------------------------------------------------
# Images into a frozen backbone


def to_image_tensor(image, size=None):
    """A path, PIL image or [3,H,W] / [1,3,H,W] tensor -> float [3,H,W] in [0,1]; with size, resized
    (shorter side) and centre-cropped to size x size."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image
        with Image.open(image) as im:
            image = im.convert("RGB")
    if not isinstance(image, torch.Tensor):
        image = TF.to_tensor(image.convert("RGB"))
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3,H,W], got shape {tuple(image.shape)}")
    image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    if size is not None and tuple(image.shape[-2:]) != (size, size):
        image = TF.center_crop(TF.resize(image, size, antialias=True), size).clamp(0, 1)
    return image


def model_device(model):
    return next(model.parameters()).device


def check_blocks(model, blocks):
    """A UserError naming the blocks (1-based) that the model does not have."""
    depth = len(model.blocks)
    bad = [b for b in blocks if not 1 <= int(b) <= depth]
    if bad:
        raise UserError(f"blocks {bad} out of range: this model has blocks 1..{depth}")


@contextmanager
def eval_and_frozen(model):
    """Eval mode (no prompt dropout) and no parameter gradients, restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)

# -----------------------------------------------------------------------------
# Figure files out


def write_csv(path, header, rows):
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, text.getvalue())


def new_figure(nrows, ncols, panel_size=(4.0, 3.2), **kw):
    """A matplotlib Figure on the Agg canvas with an [nrows, ncols] array of axes; a UserError without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("drawing figures needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained", **kw)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig, path, title=None, dpi=120):
    if title:
        fig.suptitle(title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    return path
