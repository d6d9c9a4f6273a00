"""Figures 2 and 9: Deep Image Prior (Ulyanov et al. 2018) inversion of a frozen ViT block's tokens.

    recon = dip_reconstruct(model, image, block=7)   # an image whose block-7 tokens match those of `image`
    psnr(recon, image), ssim(recon, image)           # Figure 9's scores of one reconstruction
    figure_dip([("MAE", model), ...], images, blocks=(1, 4, 7, 10, 12), out_dir="figures")

A conv generator fed fixed noise is optimised until the frozen backbone's tokens after `block` (CLS + patches,
no prompts or temperatures) for its output match those of the image; PSNR and SSIM score the reconstruction
against the image. figure_dip writes the reconstruction grid (Figure 2), the scores per block and backbone
(Figure 9) and the numbers behind them (JSON, CSV). The paper gives no DIP settings: the generator and optimiser
are ours (Adam at lr 0.01 on an hourglass fed uniform noise, DIP's own defaults).
Command line: `python reproduce.py figure 2 ...` (analysis.py's parser; figure 9 is the same analysis).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from harness import results
from harness.data.datasets import imagenet_normalize
from harness.figures.common import (check_blocks, eval_and_frozen, model_device, new_figure, save_figure,
                       to_image_tensor, write_csv)
from harness.runtime import UserError, write_json

# -----------------------------------------------------------------------------
# Image quality: PSNR and SSIM (Wang et al. 2004), in torch


def _as_batch(a, b):
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    single = a.dim() == 3
    a, b = (a[None], b[None]) if single else (a, b)
    if a.dim() != 4:
        raise ValueError(f"expected [C,H,W] or [B,C,H,W], got {tuple(a.shape)}")
    return a.double(), b.double(), single


def psnr(a, b, data_range=1.0):
    """Peak signal-to-noise ratio in dB, 10 log10(range^2 / MSE); inf for identical images.
    [C,H,W] -> 0-d tensor, [B,C,H,W] -> [B]."""
    a, b, single = _as_batch(a, b)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    out = 10 * torch.log10(data_range ** 2 / mse)
    return out[0] if single else out


def gaussian_window(size=11, sigma=1.5, dtype=torch.float64):
    """The normalised 1-D Gaussian of SSIM (the 2-D window is its outer product)."""
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, data_range=1.0, window_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity (Wang et al. 2004): local statistics under an 11x11 Gaussian window
    (sigma 1.5) at every position where the window fits, C1 = (K1 R)^2, C2 = (K2 R)^2, SSIM map averaged
    per channel, then over channels. [C,H,W] -> 0-d tensor, [B,C,H,W] -> [B]."""
    a, b, single = _as_batch(a, b)
    channels, height, width = a.shape[1:]
    if min(height, width) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {height}x{width}")
    g = gaussian_window(window_size, sigma).to(a.device)
    window = torch.outer(g, g).expand(channels, 1, window_size, window_size)
    filt = lambda x: F.conv2d(x, window, groups=channels)  # noqa: E731  ('valid': no padding)
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    out = ssim_map.mean(dim=(2, 3)).mean(dim=1)
    return out[0] if single else out

# -----------------------------------------------------------------------------
# The generator and the inversion


def _conv_bn_relu(c_in, c_out, kernel=3, stride=1):
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]


class DIPGenerator(nn.Module):
    """DIP's hourglass: strided-conv encoder, bilinear-upsampling decoder with thin skip connections,
    sigmoid output in [0,1]. Fed a fixed noise tensor [1, noise_channels, H, W]."""

    def __init__(self, noise_channels=32, widths=(128, 128, 128, 128, 128), skip_channels=4):
        super().__init__()
        self.down, self.skip, self.up = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c = noise_channels
        for w in widths:
            self.skip.append(nn.Sequential(*_conv_bn_relu(c, skip_channels, kernel=1)))
            self.down.append(nn.Sequential(*_conv_bn_relu(c, w, stride=2), *_conv_bn_relu(w, w)))
            c = w
        for w in reversed(widths):
            self.up.append(nn.Sequential(nn.BatchNorm2d(c + skip_channels), *_conv_bn_relu(c + skip_channels, w),
                                         *_conv_bn_relu(w, w, kernel=1)))
            c = w
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, noise):
        x, skips = noise, []
        for down, skip in zip(self.down, self.skip):
            skips.append(skip(x))
            x = down(x)
        for up, s in zip(self.up, reversed(skips)):
            x = F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, s], dim=1))
        return torch.sigmoid(self.out(x))


def backbone_tokens(model, images, block):
    """Tokens [B, 1+N, D] (CLS + patches) after block `block` (1-based) of the frozen backbone alone:
    no prompts, no temperatures. Runs only blocks 1..block. images: ImageNet-normalised."""
    return model.run_blocks(images, blocks=(block,), stop_early=True)[1][block]


def dip_reconstruct(model, image, block, steps=1000, lr=0.01, seed=0, widths=(128, 128, 128, 128, 128),
                    noise_channels=32, progress=True, return_losses=False):
    """Deep Image Prior inversion (Figure 2): optimise a conv generator fed fixed noise so that the frozen
    backbone's tokens after `block` (CLS + patches, no prompts or temperatures) for its output match those
    of `image` (MSE). image: [3,H,W] in [0,1]. Returns the reconstruction [3,H,W] in [0,1] (on the CPU),
    and with return_losses=True also the loss before each step plus the loss of the returned image.
    The paper gives no DIP settings; Adam at lr 0.01 on an hourglass fed uniform noise follows DIP's
    own defaults (Ulyanov et al. 2018) and is our choice."""
    check_blocks(model, (block,))
    device = model_device(model)
    image = image.to(device)
    levels = max(1, int(math.log2(min(image.shape[-2:]) / 4)))   # keep the bottleneck >= 4x4 (BatchNorm)
    with torch.random.fork_rng(devices=[]):   # seeded without touching the caller's random state
        torch.manual_seed(seed)
        generator = DIPGenerator(noise_channels, tuple(widths)[:levels])
        noise = torch.rand(1, noise_channels, *image.shape[-2:]) * 0.1   # DIP's input: uniform noise x 1/10
    generator, noise = generator.to(device).train(), noise.to(device)
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    losses = []
    with eval_and_frozen(model):
        with torch.no_grad():
            target = backbone_tokens(model, imagenet_normalize(image[None], max_value=1.0), block)

        def feature_loss(out):   # MSE between the block's tokens of the generated image and of the image
            return F.mse_loss(backbone_tokens(model, imagenet_normalize(out, max_value=1.0), block), target)

        for _ in tqdm(range(steps), desc=f"DIP block {block}", leave=False, disable=not progress):
            optimizer.zero_grad(set_to_none=True)
            loss = feature_loss(generator(noise))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            reconstruction = generator(noise)
            losses.append(feature_loss(reconstruction).item())
    reconstruction = reconstruction[0].detach().cpu()
    return (reconstruction, losses) if return_losses else reconstruction

# -----------------------------------------------------------------------------
# Figures 2 and 9: reconstructions, their scores, and the files


def figure_dip(models, images, blocks, out_dir, steps=1000, lr=0.01, seed=0, max_grid_images=4, **dip_options):
    """Figures 2 and 9: DIP reconstruction of every image from the tokens after every block of every
    backbone. models: list of (label, model) (e.g. supervised / MoCo v3 / MAE); images: paths, PIL images
    or [3,H,W] tensors in [0,1] (resized to the model's input size). Writes the reconstruction grid
    (Figure 2, first max_grid_images images) and PSNR / SSIM per block per backbone (Figure 9)."""
    blocks = [int(b) for b in blocks]
    scores, grid = dip_scores(models, images, blocks, steps, lr, seed, max_grid_images, **dip_options)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "figure9_dip_scores.json"),
             "csv": os.path.join(out_dir, "figure9_dip_scores.csv"),
             "png": os.path.join(out_dir, "figure2_dip_reconstructions.png"),
             "scores_png": os.path.join(out_dir, "figure9_dip_scores.png")}
    summary = _write_dip_numbers(paths, scores, blocks, len(images), steps=steps, lr=lr, seed=seed)
    _draw_figure2(grid, blocks, paths["png"])
    _draw_figure9(summary, blocks, paths["scores_png"])
    return paths


def dip_scores(models, images, blocks, steps=1000, lr=0.01, seed=0, max_grid_images=4, **dip_options):
    """DIP-reconstruct every image from every block of every model and score it against the image. Returns
    (scores: {label: {"psnr": [blocks][images], "ssim": ...}}, grid: [(image index, label, original,
    {block: reconstruction})] for the first max_grid_images images)."""
    if not models or not images:
        raise UserError("figure 2/9: need at least one model and one image")
    for _, model in models:
        check_blocks(model, blocks)
    scores, grid = {}, []
    jobs = tqdm(total=len(models) * len(images) * len(blocks), desc="DIP reconstructions",
                disable=not dip_options.get("progress", True))
    for label, model in models:
        scores[label] = {"psnr": [[None] * len(images) for _ in blocks], "ssim": [[None] * len(images) for _ in blocks]}
        for i, image in enumerate(images):
            original = to_image_tensor(image, model.cfg.img_size)
            recons = {}
            for j, block in enumerate(blocks):
                recon = dip_reconstruct(model, original, block, steps=steps, lr=lr, seed=seed, **dip_options)
                scores[label]["psnr"][j][i] = float(psnr(recon, original))
                scores[label]["ssim"][j][i] = float(ssim(recon, original))
                recons[block] = recon
                jobs.update()
            if i < max_grid_images:
                grid.append((i, label, original, recons))
    jobs.close()
    return scores, grid


def _write_dip_numbers(paths, scores, blocks, num_images, **settings):
    """Figure 9's numbers: per-image scores (JSON, CSV) and their mean / std per block over the images with a
    finite score (PSNR is infinite for an exact reconstruction). Returns the summary."""
    def stats(per_block):
        return results.summary([v for v in per_block if math.isfinite(v)] or [math.inf])
    summary = {label: {f"{m}_{stat}": [stats(per_block)[k] for per_block in s[m]]
                       for m in ("psnr", "ssim") for stat, k in (("mean", 0), ("std", 1))}
               for label, s in scores.items()}
    write_json(paths["json"], {"figures": [2, 9], "blocks": blocks, "num_images": num_images, **settings,
                               "summary": summary, "per_image": scores})
    write_csv(paths["csv"], ["model", "block", "image", "psnr_db", "ssim"],
               [(label, b, i, round(s["psnr"][j][i], 4), round(s["ssim"][j][i], 6))
                for label, s in scores.items() for j, b in enumerate(blocks) for i in range(num_images)])
    return summary


def _draw_figure2(grid, blocks, path):
    """Figure 2: per (image, backbone) a row: the original, then the reconstruction from each block."""
    fig, axes = new_figure(len(grid), 1 + len(blocks), panel_size=(2.2, 2.2))
    for r, (i, label, original, recons) in enumerate(grid):
        axes[r, 0].imshow(original.permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(f"{label}\nimage {i}", fontsize=8)
        for c, b in enumerate(blocks, start=1):
            axes[r, c].imshow(recons[b].permute(1, 2, 0).clamp(0, 1).numpy())
            if r == 0:
                axes[r, c].set_title(f"block {b}")
        if r == 0:
            axes[r, 0].set_title("original")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    save_figure(fig, path, "Figure 2: Deep Image Prior reconstructions from block tokens")


def _draw_figure9(summary, blocks, path):
    """Figure 9: (a) PSNR and (b) SSIM per block, one line per backbone."""
    fig, axes = new_figure(1, 2)
    for ax, metric, unit in ((axes[0, 0], "psnr", "(a) PSNR (dB)"), (axes[0, 1], "ssim", "(b) SSIM")):
        for label, s in summary.items():
            ax.errorbar(blocks, s[f"{metric}_mean"], yerr=s[f"{metric}_std"], marker="o", capsize=2, label=label)
        ax.set_title(unit)
        ax.set_xlabel("block whose tokens are inverted")
        ax.set_ylabel(unit.split(" ", 1)[1])
        ax.set_xticks(blocks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, "Figure 9: quality of the DIP reconstructions")


