"""Serve trained prompts: `python reproduce.py predict` on the prompt packs finished runs write (runs.run_one).

    python reproduce.py predict --pack results/cub/mae/....pack.pt photos/           # top-5 per image
    python reproduce.py predict --pack cub.pack.pt --pack dtd.pack.pt --checkpoint mae_pretrain_vit_base.pth \\
        photos/ more.jpg --out predictions.csv                                        # or .json

Every (image, pack) pair goes through one gated_prompt.MultiTask: one frozen backbone, each row with its own
pack's prompts, gates, temperatures and head, in batches, on the GPU when there is one, under bf16 autocast
as in training (--fp32 turns it off). Each pack records its task's evaluation transform and the harness
applies it with harness.data.datasets' decoders: FGVC = torchvision Resize(256) + CenterCrop, VTAB = TF1's
bilinear resize to 224 (+ CenterCrop to the model's size when smaller). Unreadable images are reported on stderr and
skipped. Bad input (a missing or foreign pack, no images, an unknown --out type) stops with one line before
the backbone is read, and an --out that cannot be written before anything is computed. Class names come from
whoever trained a pack and file names from whoever named the images: both are shown with control and
direction characters escaped (safe_text), and a CSV cell that a spreadsheet would run as a formula starts
with ' (csv_cell).
"""
import argparse
import csv
import io
import json
import sys
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from tqdm import tqdm

from harness.data import datasets
import gated_prompt as gp
from harness import config
from harness import runtime

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
TOP = 5

# --- predict ---------------------------------------------------------------------------------------


def parse_args(argv):
    p = runtime.ArgumentParser(prog="reproduce.py predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="IMAGES_OR_DIRS", help="image files and folders (searched recursively)")
    p.add_argument("--pack", action="append", default=[], required=True,
                   help="a prompt pack (<run>.pack.pt); repeat for several tasks")
    p.add_argument("--checkpoint", help="the backbone file (default: the one the packs record, if it exists)")
    p.add_argument("--out", help="also write every prediction to this .json or .csv file")
    p.add_argument("--batch-size", type=int, default=64, help="rows (image x pack) per forward pass (default 64)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--fp32", action="store_true", help="disable bf16 autocast on the GPU")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle the backbone file's objects beyond tensors and the safe extras (this runs code "
                        "from the file: only for files you trust)")
    return p.parse_args(argv)


def check_out(out, flag="--out", suffixes=(".json", ".csv")):
    """UserError unless `out` (given with `flag`) names a file of one of `suffixes` (None: any) that this process
    can create: checked before any work, so that nothing computed is lost at the end."""
    if suffixes and not out.endswith(suffixes):
        raise runtime.UserError(f"{flag} {out}: give a {' or '.join(suffixes)} file name")
    target = Path(out)
    if target.is_dir():
        raise runtime.UserError(f"{flag} {out} is a folder: give a file name")
    folder = target.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise runtime.UserError(f"{flag} {out} cannot be written ({err.strerror or err}: {folder})") from None


def safe_text(text):
    """`text` for a terminal or a report: control, format (bidi overrides, zero-width) and separator characters,
    and undecodable bytes of file names, written as their escapes (\\x1b, \\u202e, \\udce9)."""
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") else c for c in str(text))


def csv_cell(text):
    """safe_text, and a ' before a cell a spreadsheet would read as a formula (=, +, -, @ first: OWASP's rule)."""
    text = safe_text(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def find_images(inputs):
    """Files as given (any name: an unreadable one is reported later) and image files under folders, sorted."""
    if not inputs:
        raise runtime.UserError("no images given: name image files or folders after the options")
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            raise runtime.UserError(f"image or folder not found: {item}")
    if not found:
        raise runtime.UserError(f"no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(inputs)}")
    return found


def pack_names(paths):
    """A short unique name per pack: its file name without .pack.pt / .pt (a run's pack: "...-lr0.1-...")."""
    names = []
    for path in map(Path, paths):
        name = path.name.removesuffix(".pt").removesuffix(".pack")
        names.append(name if name not in names else f"{name}#{len(names) + 1}")
    return names


TRANSFORMS = config.EVAL_RESIZE   # kind -> the resize its decoder applies (the task registry's)
EXPECTED = ("{'kind': 'fgvc', 'resize': %d, 'crop': N} or {'kind': 'vtab', 'resize': %d, 'crop': N}, N a whole "
            "number of pixels" % (datasets.FGVC_RESIZE, datasets.IMAGE_SIZE))


def check_transform(path, pack):
    """UserError unless the pack records a transform predict applies (eval_transform's form)."""
    info = pack["info"]
    transform = info.get("transform")
    if transform is None and info.get("task") == "demo":
        raise runtime.UserError(f"{path} comes from the quick-start demo: it was trained on a random backbone that "
                                "is not saved, on generated images, so it cannot predict; train on a real task")
    if transform is None:
        raise runtime.UserError(f"{path} records no image transform (a pack written outside the harness): pass "
                                f"transform={EXPECTED} to save_pack")
    crop = transform.get("crop") if isinstance(transform, dict) else None
    if not (isinstance(transform, dict) and transform.keys() == {"kind", "resize", "crop"}
            and TRANSFORMS.get(transform["kind"]) == transform["resize"]
            and isinstance(crop, int) and not isinstance(crop, bool) and crop > 0):
        raise runtime.UserError(f"{path}: its image transform is {safe_text(repr(transform))}; expected {EXPECTED}")


def read_packs(paths):
    """{name: pack} with a transform predict can apply; CheckpointError / UserError name the file."""
    packs = {}
    for name, path in zip(pack_names(paths), paths):
        pack = gp.read_pack(path)
        check_transform(path, pack)
        packs[name] = pack
    return packs


def backbone_file(packs, checkpoint):
    if checkpoint:
        return checkpoint
    recorded = sorted({str(p["info"].get("checkpoint")) for p in packs.values()})
    if len(recorded) == 1 and Path(recorded[0]).is_file():
        return recorded[0]
    raise runtime.UserError("pass --checkpoint: the backbone file the packs were trained on (they record "
                            f"{', '.join(recorded)}, not found here)")


def load_image(path, transform):
    """uint8 [3, crop, crop]: the pack's evaluation transform with harness.data.datasets' decoders (DataError if unreadable)."""
    decode = datasets.decode_fgvc if transform["kind"] == "fgvc" else datasets.decode_vtab
    image = torch.from_numpy(np.array(decode(str(path)))).permute(2, 0, 1)
    if min(image.shape[1:]) < transform["crop"]:
        raise datasets.DataError(f"image {path} is smaller than the {transform['crop']}px crop after resizing")
    return TF.center_crop(image, transform["crop"])  # torchvision's CenterCrop, as the loader's offsets


def predict(model, packs, images, device, bf16, batch_size, top=TOP):
    """[{image, pack, top: [{rank, class, name, probability}]}] for every readable image x pack, and the
    skipped (path, reason) pairs."""
    names = list(packs)
    transforms = {n: json.dumps(packs[n]["info"]["transform"], sort_keys=True) for n in names}
    per_chunk = max(1, batch_size // len(names))
    records, skipped = [], []
    bar = tqdm(total=len(images), desc="predict", unit="img", disable=None)
    for start in range(0, len(images), per_chunk):
        rows, tensors = [], []
        for path in images[start:start + per_chunk]:
            try:
                decoded = {t: load_image(path, json.loads(t)) for t in set(transforms.values())}
            except datasets.DataError as err:
                skipped.append((str(path), str(err)))
                tqdm.write(safe_text(f"skipped {path}: {err}"), file=sys.stderr)
                continue
            for n in names:
                rows.append((str(path), n))
                tensors.append(decoded[transforms[n]])
        bar.update(min(per_chunk, len(images) - start))
        if not rows:
            continue
        batch = datasets.imagenet_normalize(torch.stack(tensors).to(device))
        with torch.no_grad(), runtime.autocast(device, bf16):
            logits = model(batch, [n for _, n in rows])
        for (path, n), out in zip(rows, logits):
            prob = out.float().softmax(-1)
            values, indices = prob.topk(min(top, prob.numel()))
            labels = packs[n].get("class_names")
            records.append({"image": path, "pack": n, "top": [
                {"rank": r + 1, "class": int(c), "name": labels[int(c)] if labels else None, "probability": float(v)}
                for r, (v, c) in enumerate(zip(values.tolist(), indices.tolist()))]})
    bar.close()
    return records, skipped


def format_record(record):
    return f"  {safe_text(record['pack'])}: " + "  ".join(
        f"{t['rank']}. {safe_text(t['name']) if t['name'] is not None else 'class ' + str(t['class'])} "
        f"{100 * t['probability']:.1f}%" for t in record["top"])


def write_out(path, records):
    if path.endswith(".json"):
        runtime.write_json(path, records)
        return
    rows = [[csv_cell(r["image"]), csv_cell(r["pack"]), t["rank"], t["class"], csv_cell(t["name"] or ""),
             f"{t['probability']:.6f}"] for r in records for t in r["top"]]
    text = io.StringIO()
    csv.writer(text).writerows([["image", "pack", "rank", "class", "name", "probability"], *rows])
    runtime.write_text(path, text.getvalue())


def main(argv):
    args = parse_args(argv)
    if args.out:
        check_out(args.out)
    if args.batch_size < 1:
        raise runtime.UserError("--batch-size must be >= 1")
    device = runtime.check_device(args.device)
    packs = read_packs(args.pack)
    images = find_images(args.inputs)
    checkpoint = backbone_file(packs, args.checkpoint)
    settings = runtime.Settings.for_device(device, fp32=args.fp32)
    backbone = gp.read_checkpoint(checkpoint, trust_pickle=True)[0] if args.trust_pickle else checkpoint
    try:
        model = gp.MultiTask(backbone, dict(zip(packs, args.pack)))
    except gp.CheckpointError as err:   # its advice is the API's (strict=False): this command's instead
        if "strict=False" not in str(err):
            raise
        recorded = ", ".join(sorted({str(p["info"].get("checkpoint")) for p in packs.values()}))
        raise runtime.UserError(str(err).replace(" (strict=False loads it anyway)", "") + " -- pass --checkpoint "
                                f"with the backbone file the packs were trained on (they record {recorded})") from None
    model.to(settings.device)
    runtime.place_model(model.backbone, settings.device, settings.bf16)
    records, skipped = predict(model, packs, images, settings.device, settings.bf16, args.batch_size)
    current = None
    for record in records:
        if record["image"] != current:
            current = record["image"]
            print(safe_text(current))
        print(format_record(record))
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s): " + ", ".join(safe_text(p) for p, _ in skipped),
              file=sys.stderr)
    if args.out:
        write_out(args.out, records)
        print(f"wrote {safe_text(args.out)}")
    if not records:
        raise runtime.UserError("none of the images could be read")
    return records
