"""The repository stands on its own: no tracked file cites a design document or note that lives outside
it. What such a citation pointed to is written in docs/, which files cite instead (docs/README.md lists
the pages). The check reads every tracked text file, docs/ and this one included."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A design document by its upper-case name, anything in the parent folder's shared tree, a Markdown file
# of a notes folder, section references into the notes, and the notes by name. (The pattern and its
# examples below are spelled in pieces, so that this file does not itself cite what it forbids.)
NOTE_NAMES = ("kernel-" + "landscape", "official-" + "implementation", "peer-" + "systems", "sm90-" + "audit",
              "official-" + "checkpoints")
OUTSIDE_CITATION = re.compile(
    r"\bDE" r"SIGN\b|\.\./sha" r"red|\bno" r"tes/[a-z-]+\.md|\bno" r"tes §"
    r"|\b(?:" + "|".join(NOTE_NAMES) + r")\b")
EXEMPT = ()


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"needs a git checkout to list the tracked files ({error})")
    names = [name for name in listed.decode().split("\0") if name]
    return [ROOT / name for name in names if not name.startswith(EXEMPT)]


def text_of(path: Path) -> str | None:
    """The file's text, or None for binary files (and tracked files deleted in the work tree)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_citations() -> list[str]:
    found = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_CITATION.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_the_pattern_catches_each_form_of_citation():
    design, shared, notes = "DE" + "SIGN", "../" + "shared", "no" + "tes"
    for cited in (f"see {design}.md §6", f"({design} §4)", f"{shared}/paper/x.md",
                  f"{notes}/official-" + "implementation.md", f"({notes} §3.1.2)", "the kernel-" + "landscape measurement"):
        assert OUTSIDE_CITATION.search(cited), cited
    for fine in ("docs/sampling-stream.md", "the design of the kernel", "official code", "footnotes §2"):
        assert not OUTSIDE_CITATION.search(fine), fine


def test_no_tracked_file_cites_a_document_outside_the_repository():
    found = outside_citations()
    assert not found, ("cite the docs/ page that holds the content instead:\n" + "\n".join(found))
