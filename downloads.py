"""Interim: the checkpoint table and lookup (replaced by the verified downloader)."""
from pathlib import Path

from runtime import UserError

CHECKPOINTS = {  # (arch, ssl): (file name, where to download it)
    ("vit_base", "mae"): ("mae_pretrain_vit_base.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"),
    ("vit_large", "mae"): ("mae_pretrain_vit_large.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth"),
    ("vit_huge", "mae"): ("mae_pretrain_vit_huge.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth"),
    ("vit_base", "mocov3"): ("linear-vit-b-300ep.pth.tar", "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar"),
    ("vit_small", "mocov3"): ("linear-vit-s-300ep.pth.tar", "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/linear-vit-s-300ep.pth.tar"),
}


def checkpoint_path(arch, ssl, checkpoint_dir="checkpoints", *, download=False, mirror=None):
    name, url = CHECKPOINTS.get((arch, ssl), (None, None))
    if name is None:
        raise UserError(f"no official {ssl} checkpoint for {arch}; pass --checkpoint FILE")
    path = Path(checkpoint_dir) / name
    if not path.is_file():
        raise UserError(f"backbone checkpoint not found: {path}\n  download: {url}")
    return path
