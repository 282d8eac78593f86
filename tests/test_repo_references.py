"""Every repository path that the code, the configs and the docs cite exists, the repository cites
nothing outside itself, and its text speaks of the product, not of how it was made.

Scanned: *.py, *.md, *.yaml, *.yml, *.toml, Makefile, .ci/run, slurm/*.sh, tools/*.sh (not .venv,
runs, .git, caches). Two kinds of reference are checked:
- tokens that look like repo-relative paths, starting with a top-level entry (`selfsup/...`,
  `configs/...`, `docs/...`, `README.md`, ...), resolved from the repository root;
- markdown links `[text](relative/path#anchor)` in *.md files, resolved from the file's folder (an
  anchor must name a heading of the target page).
A placeholder (`<method>`, `NAME`, `{group}`, `*`) turns a token into a glob that must match
something. Plain text only: no torch, no selfsup import, well under a second.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "venv", "runs", ".git", "__pycache__", ".pytest_cache", "build", "dist", ".cache",
             "node_modules"}
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml"}
TOP_LEVEL_DIRS = ("selfsup", "configs", "tests", "benchmarks", "docs", "slurm", ".ci", "tools")
TOP_LEVEL_FILES = ("README.md", "BENCHMARKS.md", "Makefile", "pyproject.toml")
# a path token: a top-level folder and what follows (placeholders included), or a top-level file;
# not when it continues another path or word (`~/.cache/selfsup/...`, `my_docs/...`)
PATH_TOKEN = re.compile(
    r"(?<![\w./~$-])("
    + "|".join(re.escape(d) + r"/[\w./<>{}*,-]*" for d in TOP_LEVEL_DIRS)
    + "|" + "|".join(re.escape(f) + r"(?![\w.-])" for f in TOP_LEVEL_FILES)
    + ")"
)
MARKDOWN_LINK = re.compile(r"\[[^\]\n]*\]\(([^()\s]+)\)")
PLACEHOLDER = re.compile(r"<[^<>/]*>|\{[^{}/]*\}")
CAPS_SEGMENT = re.compile(r"^[A-Z][A-Z0-9_]+$")
REAL_CAPS_NAMES = {"README", "BENCHMARKS", "LICENSE", "CHANGELOG", "CONTRIBUTING"}
# what the repository must never cite: notes that live outside it (built in pieces, so that this
# file does not cite them either)
OUTSIDE_NOTES = re.compile("|".join([
    re.escape("specs" + "/methods"),
    re.escape("specs" + " §"),
    re.escape("DESIGN" + ".md"),
    re.escape(".." + "/shared"),
    re.escape("/work" + "/shared"),
]))
# words about how the project was made rather than about the product (built in pieces, like the above)
MAKING_OF = re.compile("|".join([
    r"\b" + "stop" + r" [0-9]+\b",
    r"\b" + "this" + r" stop\b",
    r"\b" + "issue" + r" [0-9]+\b",
    r"\b(this|a|each|per) " + "session" + r"\b",
    r"\b" + "le" + "nt" + r"\b",
    r"\b" + "helper" + r".s\b",
]), re.IGNORECASE)


@functools.cache
def scanned_files() -> tuple[Path, ...]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        parent = Path(folder).relative_to(ROOT).as_posix()
        for name in sorted(names):
            path = Path(folder) / name
            if (path.suffix in SUFFIXES or name == "Makefile" or (parent, name) == (".ci", "run")
                    or (path.suffix == ".sh" and parent in ("slurm", "tools"))):
                files.append(path)
    return tuple(files)


@functools.cache
def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _lines(path: Path):
    return enumerate(_text(path).splitlines(), start=1)


def _as_glob(token: str) -> str:
    """`configs/method/<m>.yaml` -> `configs/method/*.yaml`; `slurm/profiles/NAME.yaml` -> `slurm/profiles/*.yaml`."""
    pattern = PLACEHOLDER.sub("*", token)
    parts = []
    for part in pattern.split("/"):
        stem, dot, ext = part.partition(".")
        if CAPS_SEGMENT.match(stem) and stem not in REAL_CAPS_NAMES:
            part = "*" + dot + ext
        parts.append(part)
    return "/".join(parts)


def _exists(base: Path, target: str) -> bool:
    if (base / target).exists():
        return True
    pattern = _as_glob(target)
    if pattern == target and not any(c in target for c in "*?["):
        return False
    return bool(glob.glob(str(base / pattern)))


def _clean(token: str) -> str:
    return token.rstrip(".,:;")


def path_token_problems(files) -> list[str]:
    problems = []
    for path in files:
        rel = path.relative_to(ROOT)
        for number, line in _lines(path):
            for match in PATH_TOKEN.finditer(line):
                token = _clean(match.group(1))
                if token and not _exists(ROOT, token):
                    problems.append(f"{rel}:{number}: {token}")
    return problems


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, fenced = set(), False
    for _, line in _lines(page):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def markdown_link_problems(files) -> list[str]:
    problems = []
    for path in files:
        if path.suffix != ".md":
            continue
        rel = path.relative_to(ROOT)
        for number, line in _lines(path):
            for match in MARKDOWN_LINK.finditer(line):
                target = match.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                    continue
                file_part, _, anchor = target.partition("#")
                page = (path.parent / file_part) if file_part else path
                if file_part and not _exists(path.parent, file_part):
                    problems.append(f"{rel}:{number}: link {target}")
                elif anchor and page.suffix == ".md" and page.is_file() and anchor not in _anchors(page):
                    problems.append(f"{rel}:{number}: link {target} (no such heading)")
    return problems


def matching_lines(files, pattern) -> list[str]:
    """`file:line: text` of every line of `files` that `pattern` finds something in."""
    problems = []
    for path in files:
        rel = path.relative_to(ROOT)
        for number, line in _lines(path):
            if pattern.search(line):
                problems.append(f"{rel}:{number}: {line.strip()[:120]}")
    return problems


def outside_citation_problems(files) -> list[str]:
    return matching_lines(files, OUTSIDE_NOTES)


def making_of_problems(files) -> list[str]:
    return matching_lines(files, MAKING_OF)


def test_cited_repository_paths_exist():
    problems = path_token_problems(scanned_files())
    assert not problems, "repository paths cited but missing:\n" + "\n".join(problems)


def test_markdown_links_resolve():
    problems = markdown_link_problems(scanned_files())
    assert not problems, "markdown links that lead nowhere:\n" + "\n".join(problems)


def test_nothing_outside_the_repository_is_cited():
    problems = outside_citation_problems(scanned_files())
    assert not problems, "citations of notes outside the repository:\n" + "\n".join(problems)


def test_the_docs_speak_of_the_product_only():
    problems = making_of_problems(scanned_files())
    assert not problems, "words about how the project was made:\n" + "\n".join(problems)


def test_the_checks_catch_a_bad_reference(tmp_path):
    """The checks themselves: a missing path, a broken link and an outside citation are all found."""
    page = ROOT / "docs" / "testing.md"
    bad = tmp_path / "bad.md"
    missing = "selfsup/" + "no_such_module.py"  # in pieces: this file must pass the scan itself
    bad.write_text(f"see {missing} and configs/method/<m>.yaml\n"
                   f"[gone](no/such/page.md) [here]({page}) [anchor]({page}#no-such-heading)\n"
                   "as " + "DESIGN" + ".md says\n")
    # resolved against the repository root, as the scan does for repo files
    tokens = [_clean(m.group(1)) for m in PATH_TOKEN.finditer(bad.read_text())]
    assert tokens == [missing, "configs/method/<m>.yaml"]
    assert [_exists(ROOT, t) for t in tokens] == [False, True]
    links = MARKDOWN_LINK.findall(bad.read_text())
    assert not _exists(bad.parent, links[0]) and _exists(bad.parent, links[1])
    assert "no-such-heading" not in _anchors(page) and "the-learning-tests" in _anchors(page)
    assert OUTSIDE_NOTES.search(bad.read_text())
    assert MAKING_OF.search("measured in " + "stop" + " 7") and not MAKING_OF.search('scope="session"')
