"""The documentation holds together: every relative link and #anchor in README.md, INSTALL.md,
docs/*.md and the package READMEs reaches a file that exists and a heading that file has, README stays
a short guide (at most 300 lines, a table of contents reaching every section, the CI's test command),
and every long page of docs/ opens with its own table of contents. Also: no file of the repository refers
to a specification outside it.

Anchors are computed the way GitHub renders them (a heading's text, lower-cased, punctuation dropped
except '-' and '_', spaces turned into '-', a repeated slug numbered -1, -2, ...), so a link that
passes here also works on the repository's web page."""
import glob
import os
import re
import unicodedata

import pytest

from tests.fixtures import ROOT
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A code span may wrap onto the next line, but never runs across a blank line (a new paragraph).
CODE_SPAN = re.compile(r"`(?:[^`\n]|\n(?![ \t]*\n))*`")
# [text](target) or ![alt](target); the text may hold one level of brackets ("ρ ∈ [0.24, 0.255]")
# and wrap onto the next line; an optional "title" may follow the target.
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def documentation_files(root=ROOT):
    """README.md, INSTALL.md, every page of docs/ and the README of every package folder."""
    files = [os.path.join(root, name) for name in ("README.md", "INSTALL.md")]
    files += sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    files += sorted(glob.glob(os.path.join(root, "*", "README.md")))
    return [f for f in files if os.path.isfile(f)]


def prose(text):
    """The text outside fenced code blocks (those lines blanked, so line numbers stay)."""
    lines, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            lines.append("")
        else:
            lines.append("" if inside else line)
    return "\n".join(lines)


def slug(heading):
    """GitHub's anchor for a heading's markdown text."""
    text = LINK.sub(lambda m: m.group(1), heading)           # a link counts by its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    kept = [ch for ch in text
            if ch.isalnum() or ch in " -_" or unicodedata.category(ch).startswith("M")]
    return "".join(kept).replace(" ", "-")


def headings(text):
    """(level, text, anchor) of every heading outside code blocks, in order."""
    seen, found = {}, []
    for line in prose(text).splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.append((len(m.group(1)), m.group(2), base if n == 0 else f"{base}-{n}"))
    return found


def links(text):
    """(line number, target) of every link outside code, inline code included."""
    text = prose(text)
    text = CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in LINK.finditer(text)]


def broken_links(path, root=ROOT):
    """One line per relative link or anchor of `path` that leads nowhere."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    problems, anchors_of = [], {}
    root = os.path.realpath(root)
    for line, target in links(text):
        if SCHEME.match(target):
            continue                                          # web addresses are not checked offline
        file_part, _, anchor = target.partition("#")
        dest = os.path.realpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        where = f"{os.path.relpath(os.path.realpath(path), root)}:{line}: ({target})"
        if os.path.commonpath([root, dest]) != root:
            problems.append(f"{where} leaves the repository")
        elif not os.path.exists(dest):
            problems.append(f"{where} no such file")
        elif anchor:
            if not dest.endswith(".md") or os.path.isdir(dest):
                problems.append(f"{where} an anchor into a file that is not markdown")
                continue
            if dest not in anchors_of:
                with open(dest, encoding="utf-8") as f:
                    anchors_of[dest] = {a for _, _, a in headings(f.read())}
            if anchor not in anchors_of[dest]:
                problems.append(f"{where} no heading with anchor #{anchor}")
    return problems


def missing_from_contents(text):
    """The `##` sections not linked from the part before the first one (a `## Contents` section
    counts as that part), or None when the page has fewer than three sections and needs no contents."""
    sections = [(title, anchor) for level, title, anchor in headings(text) if level == 2]
    body = [(title, anchor) for title, anchor in sections if title.strip().lower() != "contents"]
    if len(body) < 3:
        return None
    start = prose(text).splitlines().index(f"## {body[0][0]}")
    head = "\n".join(text.splitlines()[:start])
    listed = {target[1:] for _, target in links(head) if target.startswith("#")}
    return [title for title, anchor in body if anchor not in listed]


# ---- the checker itself, on hand-made pages ----------------------------------------------------

@pytest.mark.parametrize("heading, anchor", [
    ("Testing the paper's claims (`scripts/claims.sh`)", "testing-the-papers-claims-scriptsclaimssh"),
    ("Theory: the sharpness–diversity trade-off, simulated", "theory-the-sharpnessdiversity-trade-off-simulated"),
    ("cuDNN algorithms (`--cudnn`)", "cudnn-algorithms---cudnn"),
    ("The GPU check (`gpu_check.sh`)", "the-gpu-check-gpu_checksh"),
    ("Training an ensemble: `main.py`", "training-an-ensemble-mainpy"),
    ("measure_diversity.py — `--mode predict,disagreement,KL`", "measure_diversitypy----mode-predictdisagreementkl"),
    ("Bad data are refused, **unusual** data are [flagged](x.md)", "bad-data-are-refused-unusual-data-are-flagged"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_checker_finds_exactly_the_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "README.md").write_text("# Pkg\n\n## Setup\n\n## Setup\n", encoding="utf-8")
    (tmp_path / "outside.md").write_text("# Outside\n", encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.write_text("\n".join([
        "# Page",                                                                          # line 1
        "[file](../pkg/README.md) [anchor](../pkg/README.md#setup) [twice](../pkg/README.md#setup-1)",
        "[own](#a-b) [wrapped",                                                            # line 3
        "text](../pkg/README.md#setup-2) ![img](missing.png) [web](https://example.org/x#y)",
        "`[in code](nowhere.md)` [up](../outside.md) [far](../../far.md) [dir](../pkg) [dir anchor](../pkg#x)",
        "```",
        "[in a block](nowhere.md)",
        "```",
        "## A, b!",
    ]) + "\n", encoding="utf-8")
    # The whole tmp_path as the repository: the wrapped link's third "Setup", the image, the link
    # above the repository and the anchor into a folder are broken; nothing else is.
    found = broken_links(str(page), root=str(tmp_path))
    assert found == [
        "docs/page.md:3: (../pkg/README.md#setup-2) no heading with anchor #setup-2",
        "docs/page.md:4: (missing.png) no such file",
        "docs/page.md:5: (../../far.md) leaves the repository",
        "docs/page.md:5: (../pkg#x) an anchor into a file that is not markdown",
    ]
    # docs/ alone as the repository: every link out of it is reported, whether or not its file exists.
    found = broken_links(str(page), root=str(tmp_path / "docs"))
    assert [p.split(": ", 1)[1] for p in found] == [
        "(../pkg/README.md) leaves the repository",
        "(../pkg/README.md#setup) leaves the repository",
        "(../pkg/README.md#setup-1) leaves the repository",
        "(../pkg/README.md#setup-2) leaves the repository",
        "(missing.png) no such file",
        "(../outside.md) leaves the repository",
        "(../../far.md) leaves the repository",
        "(../pkg) leaves the repository",
        "(../pkg#x) leaves the repository",
    ]


def test_the_contents_check_finds_what_hand_made_pages_miss():
    page = "# T\n\nIntro. [One](#one) · [Two](#two)\n\n## One\n\n## Two\n\n## Three, too\n\n[Three](#three-too)\n"
    assert missing_from_contents(page) == ["Three, too"]          # linked only below the first section
    assert missing_from_contents(page.replace("· [Two](#two)", "· [Two](#two) · [3](#three-too)")) == []
    assert missing_from_contents("# T\n\n## One\n\n## Two\n") is None
    readme = "# T\n\n## Contents\n\n[A](#a) [B](#b) [C](#c)\n\n## A\n\n## B\n\n## C\n\n## D\n"
    assert missing_from_contents(readme) == ["D"]


# ---- the repository's pages ---------------------------------------------------------------------

def test_the_pages_exist():
    names = {os.path.relpath(f, ROOT) for f in documentation_files()}
    assert {"README.md", "INSTALL.md", "docs/training.md", "docs/gpu.md", "docs/differences.md",
            "docs/data.md", "measure/README.md", "training/README.md"} <= names


@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


def test_readme_is_a_short_guide_with_contents():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "## Contents" in prose(text).splitlines()
    assert missing_from_contents(text) == []
    linked = {os.path.normpath(t.partition("#")[0]) for _, t in links(text)}
    pages = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    assert pages <= linked, sorted(pages - linked)


def test_readme_gives_the_test_command_ci_runs():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if line.strip().startswith("python -m pytest")]
    assert len(ci) == 1
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    assert ci[0] in commands


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_long_docs_pages_open_with_their_contents(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert missing_from_contents(text) in (None, [])


def test_no_reference_to_a_spec_file_outside_the_repository():
    needle = "SPEC " + "§"
    hits = []
    for folder, _, files in os.walk(ROOT):
        if "/." in folder[len(ROOT):]:
            continue
        for name in files:
            if name.endswith((".py", ".md", ".sh", ".ipynb")):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    hits += [f"{name}:{i}" for i, line in enumerate(f, 1) if needle in line]
    assert not hits
