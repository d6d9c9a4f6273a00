"""paper_hparams.yaml against the paper itself: every Table 5 hyper-parameter and every reported number is read
from the paper's text (../shared/paper, beside the checkout in CI) and compared with the yaml, so a typo in the
yaml cannot hide behind a test that reads the yaml for its expected values."""
import re
from pathlib import Path

import pytest

from harness import config

PAPER_DIR = Path(__file__).resolve().parents[2] / "shared" / "paper"
TABLE5_NAMES = {
    "CALTECH101": "caltech101", "CIFAR-100": "cifar", "CLEVR DIST": "clevr_dist", "CLEVR COUNT": "clevr_count",
    "RETINOPATHY": "diabetic_retinopathy", "DMLAB": "dmlab", "DSPR ORI": "dsprites_ori", "DSPR LOC": "dsprites_loc",
    "DTD": "dtd", "EUROSAT": "eurosat", "KITTI-D IST": "kitti", "FLOWERS102": "oxford_flowers102",
    "PETS": "oxford_iiit_pet", "CAMELYON": "patch_camelyon", "RESISC45": "resisc45", "SNORB AZIM": "smallnorb_azi",
    "SNORB ELEV": "smallnorb_ele", "SUN397": "sun397", "SVHN": "svhn", "CUB": "cub", "FLOWERS": "flowers",
    "CARS": "cars", "DOGS": "dogs", "NAB IRDS": "nabirds", "ADE20K": "ade20k"}
METHOD = {"VPT-SHALLOW": "vpt-shallow", "VPT-DEEP": "vpt-deep", "OURS": "gated+temp"}
FGVC = ["cub", "flowers", "cars", "dogs", "nabirds", "mean"]


def paper_lines(paper_dir):
    """The lines of the paper's text in paper_dir; skips, saying what is missing and where it goes, without it."""
    files = sorted(Path(paper_dir).glob("*.txt"))
    if not files:
        pytest.skip(f"paper_hparams.yaml is NOT checked against the paper: no paper text (*.txt) in {paper_dir}. "
                    "The paper's text is not part of the repository, so a plain clone skips these tests: put the "
                    "project's plain-text copy of the paper there (CI checks it out as ../shared/paper beside the "
                    "repository) to run them")
    return files[0].read_text(errors="replace").splitlines()


@pytest.fixture(scope="module")
def lines():
    return paper_lines(PAPER_DIR)


def test_the_skip_says_what_is_missing_and_where_it_goes(tmp_path):
    with pytest.raises(pytest.skip.Exception, match=rf"NOT checked against the paper.*\*\.txt.*{tmp_path}.*shared/paper"):
        paper_lines(tmp_path)


def numbers(text):
    return [float(x) for x in re.findall(r"\d+\.\d+|\d+", text)]


def method_rows(lines):
    """(method, numbers) of every 'VPT-SHALLOW ... / VPT-DEEP ... / OURS ...' line, in the paper's order."""
    rows = []
    for line in lines:
        m = re.match(r"^(VPT-SHALLOW|VPT-DEEP|OURS)(?! \(W/)\s+(.*)$", line)
        if m:
            rows.append((METHOD[m.group(1)], numbers(re.sub(r"\([+-][\d.]+\)", "", m.group(2)))))
    return rows


def test_table_5_is_the_papers(lines):
    rows = {}
    for line in lines:
        for name, task in TABLE5_NAMES.items():
            if re.match(rf"^{re.escape(name)} [\d. ]+$", line):
                values = numbers(line[len(name):])
                rows[task] = {"mae": values[:4], "mocov3": values[4:]}
    assert set(rows) == set(config.HPARAMS["table5"]) and len(rows) == 25
    for task, by_ssl in rows.items():
        for ssl, values in by_ssl.items():
            assert [float(v) for v in config.HPARAMS["table5"][task][ssl]] == values, (task, ssl)


def test_tables_1_2_3_4_6_and_8_are_the_papers(lines):
    rows = method_rows(lines)
    assert len(rows) == 35   # Tables 1, 2, 3: 6 each; 4: 2; 6: 6; 7: its 3 OURS rows; 8: 6
    paper = config.HPARAMS["paper"]
    for i, (method, values) in enumerate(rows[0:6]):    # Table 1: TOTAL PARAMS (1.02), 5 datasets, mean
        ssl = "mae" if i < 3 else "mocov3"
        assert [paper["table1"][ssl][method][c] for c in FGVC] == values[1:], (ssl, method)
    for i, (method, values) in enumerate(rows[6:12]):   # Table 2: params, 3 group means, mean
        ssl = "mae" if i < 3 else "mocov3"
        ref = paper["table2"][ssl][method]
        assert [ref[c] for c in ("natural", "specialized", "structured", "mean")] == values[1:], (ssl, method)
    for number, block in (("table3", rows[12:18]), ("table6", rows[20:26])):   # prompts, mIoU SS, mIoU MS
        for i, (method, values) in enumerate(block):
            ref = paper[number]["mae" if i < 3 else "mocov3"][method]
            assert [ref["miou_ss"], ref["miou_ms"]] == values[-2:], (number, method)
    for (method, values) in rows[18:20]:                # Table 4 without its hard-gate row: prompts, CUB, Flowers
        assert [paper["table4"][method][t] for t in ("cub", "flowers")] == values[1:3], method
    for i, (method, values) in enumerate(rows[-6:]):    # Table 8: (a) ViT-L MAE, (b) ViT-S MoCo v3; 48 prompts
        arch = "vit_large" if i < 3 else "vit_small"
        assert [paper["table8"][arch][method][t] for t in ("cub", "flowers")] == values[1:], (arch, method)


def test_table_4_hard_gates_and_table_7_are_the_papers(lines):
    paper = config.HPARAMS["paper"]
    hard = next(line for line in lines if line.startswith("OURS (W/ GH)"))
    assert [paper["table4"]["gated-hard"][t] for t in ("cub", "flowers")] == numbers(
        re.sub(r"\([+-][\d.]+\)", "", hard))[1:]
    deep = [numbers(line) for line in lines if re.match(r"^(24|48|96) VPT-DEEP ", line)]
    ours = [numbers(re.sub(r"\([+-][\d.]+\)", "", line)) for line in lines if re.match(r"^OURS \d+\.\d+ ", line)]
    assert len(deep) == len(ours) == 3
    for values, total in zip(deep, (24, 48, 96)):
        assert [total] + [paper["table7"][total]["vpt-deep"][c] for c in FGVC] == values
    for values, total in zip(ours, (24, 48, 96)):
        assert [paper["table7"][total]["gated+temp"][c] for c in FGVC] == values
