"""The README and docs/: links that resolve, every public name in the API reference, every result file
indexed, and the first-run facts a new user needs (install lines, the test setup, the CPU baseline)."""

from __future__ import annotations

import glob
import importlib
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
#: the documents this test keeps honest (docs/design.md is checked for links only)
DOCS = ["README.md", "benchmarks/results/README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
)
#: modules whose ``__all__`` docs/api.md documents name by name
PUBLIC_MODULES = [
    "deep_ep",
    "deep_ep.ops",
    "deep_ep.layout",
    "deep_ep.reference",
    "deep_ep.compress",
    "deep_ep.codecs",
    "deep_ep.wire",
    "deep_ep.calls",
    "deep_ep.transport",
    "deep_ep.transport.nvlink",
    "deep_ep.settings",
    "deep_ep.moe",
    "deep_ep.experts",
    "deep_ep.integrations",
    "deep_ep.balance",
    "deep_ep.elastic",
    "deep_ep.utils",
    "deep_ep.tools",
]


def _read(rel: str) -> str:
    with open(os.path.join(REPO, rel)) as f:
        return f.read()


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(rel: str) -> set:
    text = re.sub(r"```.*?```", "", _read(rel), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ +(.+)$", text, flags=re.M)}


def _links(rel: str):
    text = re.sub(r"```.*?```", "", _read(rel), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            yield target


@pytest.mark.parametrize("doc", DOCS + ["docs/design.md"])
def test_relative_links_resolve(doc):
    """Every relative link of the README and docs/ names a file (and a heading) that exists."""
    base = os.path.dirname(os.path.join(REPO, doc))
    for target in _links(doc):
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(REPO, doc)
        assert os.path.exists(full), f"{doc}: link to missing {target}"
        if anchor and full.endswith(".md"):
            assert anchor in _anchors(os.path.relpath(full, REPO)), f"{doc}: no heading for #{anchor}"


@pytest.mark.parametrize("doc", DOCS)
def test_no_reference_to_contract_files_outside_the_repo(doc):
    """The contract documents (API.md, BENCH.md, DESIGN.md) live outside the repository: docs name
    docs/api.md, docs/bench.md, docs/design.md instead."""
    text = _read(doc)
    assert not re.search(r"(?<![\w/])(API|BENCH|DESIGN)\.md", text), doc


def test_every_result_file_is_indexed():
    index = _read("benchmarks/results/README.md")
    listed = set(re.findall(r"\]\(([^)/]+)\)", index))
    files = {f for f in os.listdir(RESULTS) if f != "README.md"}
    assert files == listed, (files - listed, listed - files)
    assert not [f for f in files if "before-cumsum-fix" in f]


def test_api_reference_names_every_public_name():
    """docs/api.md mentions every name in ``__all__`` of the public modules (add a line there with a
    new public name)."""
    api = _read("docs/api.md")
    missing = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", []):
            if public.startswith("__"):
                continue
            if not re.search(rf"(?<![\w]){re.escape(public)}(?![\w])", api):
                missing.append(f"{name}.{public}")
    assert not missing, missing


def test_readme_first_run_facts():
    """What a new user needs from the README: the two commands, both CPU-torch install lines, the
    Triton pin and the interpreter, what the CPU baseline is, and where every other figure went."""
    readme = _read("README.md")
    assert 'pip install -e ".[test]" && deep-ep bench' in readme and "\npytest" in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert re.search(r"pip install torch==<version>", readme)
    assert "Triton 3.6" in readme and "triton==3.6.*" in readme and "TRITON_INTERPRET=1" in readme
    gloo_raw = readme[readme.index("**`gloo-raw`**") :][:400]
    assert "all_to_all_single" in gloo_raw and "floor" in gloo_raw
    assert "benchmarks/results/2026-12-01-nvidia-h200-normal.json" in readme  # the performance table's source
    for doc in ("api", "bench", "design", "multinode", "compression", "balance", "low-latency", "moe", "hf"):
        assert f"docs/{doc}.md" in readme, doc
    assert len(readme.splitlines()) < 250  # an overview; the details live in docs/
