"""What a newcomer reads and runs first: the README and docs/ (short enough, every link and repository path they
name exists), the demo's word on its loss jump, and the quick start in a copy without git."""
import re
from pathlib import Path

import pytest

import reproduce
from harness import runtime

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TRACKED_FOLDERS = ("harness/", "bench/", "tests/", "docs/", ".ci/")


def slug(heading):
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_under_15_kb():
    assert (ROOT / "README.md").stat().st_size < 15_000


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name} links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            assert anchor in map(slug, headings), f"{doc.name} links to {target}: no such heading"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_named_exists(doc):
    """`harness/...`, `tests/...py::test_name` and bare file names such as `gated_prompt.py` name files of this
    repository: after a move they must follow. Files of other repositories are named with their repository."""
    other_repositories = {"tune_fgvc.py", "tune_vtab.py"}   # KMnP/vpt's tuners
    ours = {p.name for p in ROOT.iterdir()}
    ours |= {p.name for folder in TRACKED_FOLDERS for p in (ROOT / folder).rglob("*")}
    for token in re.findall(r"`([^`\s]+)`", doc.read_text()):
        path, _, test = token.partition("::")
        if path.startswith(TRACKED_FOLDERS) and "<" not in path and "*" not in path:
            assert (ROOT / path).exists(), f"{doc.name} names {path}: no such file"
            if test:
                assert f"def {test}(" in (ROOT / path).read_text(), f"{doc.name} names {token}: no such test"
        elif re.fullmatch(r"[\w.-]+\.(py|yaml|yml|md|cff)", path) and path not in other_repositories:
            assert path in ours, f"{doc.name} names {path}: no such file in the repository"


def test_the_demo_says_why_its_loss_jumps_after_the_warm_up(monkeypatch, tmp_path, cli):
    """The demo's schedule (paper_hparams.yaml: lr 0.5, 1 warm-up epoch) trains epoch 1 at lr 0 and epoch 2 at
    lr 0.5; its output says so before the results."""
    from harness import runs
    finished = {"final": {"test_acc": 50.0}, "history": [{"images_per_second": 10.0, "seconds": 1.0}],
                "selection_ratio": []}
    monkeypatch.setattr(runs, "run_demo", lambda cfgs, settings, source="recipe": ([finished] * len(cfgs), tmp_path))
    out = cli("--demo", "--results-dir", tmp_path).stdout
    assert "epoch 1 trains at lr 0 and epoch 2 is the first at the full lr 0.5" in out
    assert out.index("lr 0.5") < out.index("DEMO RESULTS")
    out = cli("--demo", "--warmup-epochs", "0", "--results-dir", tmp_path).stdout
    assert "warms up" not in out and "DEMO RESULTS" in out   # no warm-up, no jump to explain


def test_a_copy_without_git_still_names_its_code_version(monkeypatch):
    """The quick start in a downloaded archive (no .git, or no git program): every result records a version of the
    code, here a hash of the sources."""
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(runtime.subprocess, "run", no_git)
    assert re.fullmatch(r"src-[0-9a-f]{10}", runtime.code_version())
