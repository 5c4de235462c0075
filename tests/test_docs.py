"""The README and docs/ checked against the code: commands, settings, links and the sections code cites, so they cannot rot."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from apilogd.cli import main as apilogd_main

from apilog import settings
from apilog.cli import main as apilog_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
COMMANDS: dict[str, click.Command] = {"apilog": apilog_main, "apilogd": apilogd_main}
# Every variable apilog reads: settings.py parses each one through this table (it has no public name).
VARIABLES = frozenset(settings._PARSERS)

FIRST_COMMANDS = [
    "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/apilog demo",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest",
]
# Code comments cite docs/reference.md by these section titles.
REFERENCE_SECTIONS = ["Configuration", "The log tree", "Streams", "The call", "Entry format", "The daemon",
                      "Guarantees", "Archiving", "Reading", "In the app", "The web view"]

_FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```\s*$", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
_VARIABLE = re.compile(r"\bAPILOG_[A-Z][A-Z_]*")
_SEPARATORS = re.compile(r"&&|\|\||;|\|")
_ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
_REPO_PATH = re.compile(r"^(?:apilog|daemon|systemd|bench|tests|docs|\.ci)/[\w./-]*$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code: what links and headings are read from."""
    return _INLINE.sub("", _FENCE.sub("", text))


def _slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    title = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def _headings(path: Path) -> list[str]:
    return [match.group(2) for match in _HEADING.finditer(_prose(path.read_text(encoding="utf-8")))]


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for title in _headings(path):
        slug = _slug(title)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _section(path: Path, title: str) -> str:
    """The text under the `## title` heading of a page, up to the next heading of that level or above."""
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^#{{1,2}} |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"{_rel(path)} has no section {title!r}"
    return match.group(1)


def _code(text: str) -> list[str]:
    """Every command line a reader may copy: inline code spans and the lines of shell blocks."""
    found = [m.group(1) for m in _INLINE.finditer(_FENCE.sub("", text))]
    for match in _FENCE.finditer(text):
        if match.group(1) in ("bash", "sh", "shell", "console"):
            found += match.group(2).splitlines()
    return found


def _invocations(code: str) -> list[tuple[str, list[str]]]:
    """The `apilog`/`apilogd` commands in a piece of code: the program and the words after it."""
    found = []
    for part in _SEPARATORS.split(code.replace("\\|", " ")):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:  # an apostrophe in prose
            words = part.split()
        while words and (words[0] in ("sudo", "env") or _ENV_ASSIGNMENT.fullmatch(words[0])):
            words = words[1:]
        if len(words) >= 3 and re.fullmatch(r"(?:.*/)?python3?", words[0]) and words[1] == "-m":
            words = words[2:]
        if words and words[0].rsplit("/", 1)[-1] in COMMANDS:
            found.append((words[0].rsplit("/", 1)[-1], [w.strip("[](),") for w in words[1:]]))
    return found


def _unknown(program: str, words: list[str]) -> list[str]:
    """What in one invocation names no real subcommand or option of the click command."""
    command: click.Command = COMMANDS[program]
    path, wrong = program, []
    for word in words:
        if not word:
            continue
        if word.startswith("-") and word != "-":  # a lone - is a value (stdin)
            option = word.split("=", 1)[0]
            known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            if option not in known | {"--help"}:
                wrong.append(f"`{path}` has no option {option}")
            continue
        if isinstance(command, click.Group):
            sub = command.commands.get(word)
            if sub is None:
                wrong.append(f"`{path}` has no subcommand {word!r}")
                break
            command, path = sub, f"{path} {word}"
        # a command's own arguments (LOCATION, a pattern, a value) are not checked
    return wrong


def test_readme_opens_with_the_two_commands_and_stays_short() -> None:
    """README.md starts with its title and the two copy-paste commands (install + demo, tests), and is under 200 lines."""
    text = README.read_text(encoding="utf-8")
    assert text.startswith("# apilog\n")
    blocks = [match.group(2).strip() for match in _FENCE.finditer(text)][:2]
    assert blocks == FIRST_COMMANDS
    first = _FENCE.search(text)
    assert first is not None and first.start() < text.index("\n## ")
    assert len(text.splitlines()) < 200


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    """.ci/run runs the README's second command exactly as printed."""
    assert FIRST_COMMANDS[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_every_command_named_exists() -> None:
    """Each `apilog ...` and `apilogd ...` in backticks or shell blocks names a real subcommand and real options."""
    wrong, seen = [], 0
    for page in PAGES:
        for code in _code(page.read_text(encoding="utf-8")):
            for program, words in _invocations(code):
                seen += 1
                wrong += [f"{_rel(page)}: {problem} (in `{code.strip()}`)" for problem in _unknown(program, words)]
    assert seen > 20, "the docs name the commands: the parser lost them"
    assert wrong == []


def test_every_subcommand_is_documented() -> None:
    """Each subcommand of `apilog` and `apilogd` appears in docs/reference.md."""
    named = {(program, words[0]) for code in _code((DOCS / "reference.md").read_text(encoding="utf-8"))
             for program, words in _invocations(code) if words}
    missing = [f"{program} {name}" for program, command in COMMANDS.items()
               for name in command.commands  # type: ignore[attr-defined]  # both are click groups
               if (program, name) not in named]
    assert missing == []


def test_every_variable_named_exists() -> None:
    """Each APILOG_ variable the README and docs/ name is one that apilog/settings.py reads."""
    wrong = [f"{_rel(page)}: {name}" for page in PAGES
             for name in sorted(set(_VARIABLE.findall(page.read_text(encoding="utf-8"))))
             if name.rstrip("_") not in VARIABLES]
    assert wrong == []


@pytest.mark.parametrize(("page", "title"), [("README.md", "Settings"), ("docs/reference.md", "Configuration")])
def test_every_setting_is_in_the_tables(page: str, title: str) -> None:
    """Every variable settings.py reads has a row in README.md's settings table and in docs/reference.md's."""
    rows = re.findall(r"^\|\s*`(APILOG_[A-Z_]+)`\s*\|", _section(ROOT / page, title), re.MULTILINE)
    assert sorted(VARIABLES - set(rows)) == []
    assert sorted(set(rows) - VARIABLES) == []
    assert len(rows) == len(set(rows)), "a variable has two rows"


def test_every_relative_link_resolves() -> None:
    """Each relative link of README.md and docs/ reaches an existing file, and an existing heading when it has an #anchor."""
    wrong, seen = [], 0
    for page in PAGES:
        for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            seen += 1
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.is_file() or not linked.is_relative_to(ROOT):
                wrong.append(f"{_rel(page)}: {target}: no such file in the repository")
            elif anchor and (linked.suffix != ".md" or anchor not in _anchors(linked)):
                wrong.append(f"{_rel(page)}: {target}: no heading #{anchor} in {_rel(linked)}")
    assert seen > 10
    assert wrong == []


def test_the_readme_links_every_docs_page() -> None:
    """Every page of docs/ is reachable from README.md."""
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for target in _LINK.findall(_prose(README.read_text(encoding="utf-8")))}
    assert sorted(_rel(page) for page in DOCS.glob("*.md") if page.resolve() not in linked) == []


def test_repository_paths_named_exist() -> None:
    """A repository path in backticks (`systemd/...`, `bench/run.py`, `daemon/commit/`) names a file or folder that exists."""
    wrong = [f"{_rel(page)}: {code}" for page in PAGES
             for code in (m.group(1) for m in _INLINE.finditer(page.read_text(encoding="utf-8")))
             if _REPO_PATH.match(code) and "<" not in code and not (ROOT / code).exists()]
    assert wrong == []


def test_reference_keeps_the_sections_and_labels_code_cites() -> None:
    """docs/reference.md has the section titles code comments cite, and the guarantees D1-D8 under "Guarantees"."""
    assert [title for title in REFERENCE_SECTIONS if title not in _headings(DOCS / "reference.md")] == []
    guarantees = _section(DOCS / "reference.md", "Guarantees")
    assert [n for n in range(1, 9) if f"**D{n}**" not in guarantees] == []


def test_every_citation_in_the_code_resolves() -> None:
    """Each `docs/<page>.md, "Section"` or `docs/reference.md, D<n>` cited in apilog/, daemon/, tests/ or bench/ exists."""
    wrong = []
    sources = sorted(p for folder in ("apilog", "daemon", "tests", "bench") for p in (ROOT / folder).rglob("*.py"))
    for source in [p for p in sources if p.name != Path(__file__).name]:  # this file names the forms, not sections
        text = source.read_text(encoding="utf-8")
        for page, rest in re.findall(r"docs/([\w-]+\.md)(,?\s*\"[^\"\n]+\"|,?\s+(?:\d+\s+)?D\d(?:\s*[-,]\s*D\d)*)?", text):
            target = DOCS / page
            if not target.is_file():
                wrong.append(f"{_rel(source)}: docs/{page} does not exist")
                continue
            title = re.search(r"\"([^\"]+)\"", rest)
            if title and title.group(1) not in _headings(target):
                wrong.append(f"{_rel(source)}: docs/{page} has no section {title.group(1)!r}")
            page_text = target.read_text(encoding="utf-8")
            wrong += [f"{_rel(source)}: docs/{page} has no guarantee {label}"
                      for label in re.findall(r"D\d", rest) if f"**{label}**" not in page_text]
    assert wrong == []
