"""The documentation's examples and links, read from the Markdown files (issue 22: docs that cannot drift).

Owns the convention and everything mechanical about it:

- which files are documentation (`doc_files`: README.md, docs/**/*.md, deploy/*.md);
- which fenced blocks are examples (`parse`, `collect`): a fence whose info string's first
  word is `bash`, `sh` or `shell` (run with `bash -euo pipefail`) or `python` (run with this
  interpreter); any other info string (`text`, `json`, `console`, none...) is not an example;
- the marker that keeps an example from running: an HTML comment on the line directly above
  the opening fence, `<!-- example: gpu -->` or `<!-- example: long (why) -->`. A marker of an
  unknown kind, a malformed one, one not directly above a fence, one above a block that is
  not an example, and an unclosed fence are `Problem`s (file:line and the fix), never ignored;
- running one example (`run_example`) from the repository root with this interpreter's bin
  directory first on PATH, after substituting the live test server's address for
  `localhost:8000` / `127.0.0.1:8000` (what `make serve` listens on) and the test sandbox's
  for `localhost:8080` / `127.0.0.1:8080` (the local sandbox `make serve` uses), in its own
  process group (killed when it ends or times out), and the failure report (`RunResult.report`);
- relative links (`broken_links`): Markdown links and images (inline and reference
  definitions) and HTML `src`/`href` outside code must name a file or directory inside the
  repository that a fresh clone has (exists, not git-ignored), and a `#anchor` must be a
  heading of the target Markdown file under GitHub's slug rules (`github_slug`).

Does not own: the live server (tests/conftest.py's shared `default_server` fixture), the
pytest tests (tests/test_docs_examples.py) or the listing of excluded examples in the test
output (`pytest_terminal_summary` in tests/conftest.py, which calls `excluded_listing`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# info string (first word, lower case) -> how the block runs
EXAMPLE_LANGS: dict[str, str] = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python"}
# marker kinds: an example that needs a GPU, or one that runs too long for the suite
MARKER_KINDS: dict[str, str] = {"gpu": "needs a GPU", "long": "runs too long for the test suite"}
# what `make serve` listens on, and the local sandbox address it uses
SERVER_ADDRESSES = ("localhost:8000", "127.0.0.1:8000")
SANDBOX_ADDRESSES = ("localhost:8080", "127.0.0.1:8080")
DEFAULT_TIMEOUT_S = 120.0

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER_ANY = re.compile(r"^\s*<!--\s*example\b", re.IGNORECASE)  # a marker starts its line
_MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<kind>[A-Za-z0-9_-]+)\s*(?:\((?P<reason>.*)\))?\s*-->\s*$")


@dataclass(frozen=True)
class Marker:
    kind: str  # one of MARKER_KINDS
    reason: str  # "" when the marker gives none
    line: int


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it opens (1-based line of the fence), its info string, its text."""

    path: str  # relative to the repository root, POSIX separators
    line: int
    info: str
    text: str
    marker: Marker | None = None

    @property
    def lang(self) -> str:
        return self.info.split()[0].lower() if self.info.split() else ""

    @property
    def kind(self) -> str | None:
        """`shell` or `python` for an example, None for any other block."""
        return EXAMPLE_LANGS.get(self.lang)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def uses_server(self) -> bool:
        return any(a in self.text for a in SERVER_ADDRESSES)


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Parsed:
    blocks: list[Block]
    problems: list[Problem]

    @property
    def examples(self) -> list[Block]:
        """The blocks that are examples (marked or not)."""
        return [b for b in self.blocks if b.kind is not None]

    @property
    def runnable(self) -> list[Block]:
        return [b for b in self.examples if b.marker is None]

    @property
    def excluded(self) -> list[Block]:
        return [b for b in self.examples if b.marker is not None]


def parse(text: str, path: str) -> Parsed:
    """The fenced blocks of one Markdown text, with their markers, and the problems found.

    Fences follow CommonMark: three or more backticks or tildes (any indentation, so fences in
    list items count), an info string without backticks for a backtick fence, closed by a line
    of the same character at least as long; content lines lose the opening fence's indentation."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[Problem] = []
    pending: tuple[int, str] | None = None  # a marker line (index) waiting for the next line's fence
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE_OPEN.match(line)
        if m and not (m["fence"][0] == "`" and "`" in m["info"]):
            indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
            close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not close.match(lines[j]):
                raw = lines[j]
                strip = len(raw) - len(raw.lstrip(" "))
                body.append(raw[min(indent, strip) :])
                j += 1
            if j == len(lines):
                problems.append(Problem(path, i + 1, f"fence {fence} is never closed: close it with {fence}"))
            marker = None
            if pending is not None and pending[0] == i - 1:
                marker = _read_marker(pending[1], path, i, problems)
                pending = None
            block = Block(path, i + 1, info, "\n".join(body) + ("\n" if body else ""), marker)
            if marker is not None and block.kind is None:
                problems.append(
                    Problem(
                        path,
                        marker.line,
                        f"an `example: {marker.kind}` marker above a `{info or '(no info string)'}` block, which is "
                        f"not an example (only {', '.join(sorted(EXAMPLE_LANGS))} blocks run): remove the marker",
                    )
                )
            blocks.append(block)
            i = j + 1
            continue
        if pending is not None:  # the marker's next line is no fence
            problems.append(
                Problem(
                    path,
                    pending[0] + 1,
                    "an `example:` marker must be on the line directly above a block's opening fence "
                    "(no blank line between): move it there or remove it",
                )
            )
            pending = None
        if _MARKER_ANY.search(line):
            pending = (i, line)
        i += 1
    if pending is not None:
        problems.append(
            Problem(path, pending[0] + 1, "an `example:` marker at the end of the file marks no block: remove it")
        )
    return Parsed(blocks, problems)


def _read_marker(line: str, path: str, fence_index: int, problems: list[Problem]) -> Marker | None:
    number = fence_index  # the marker is the line above the fence: 1-based, that is the fence's index
    m = _MARKER.match(line)
    if m is None:
        problems.append(
            Problem(
                path,
                number,
                f"malformed example marker {line.strip()!r}: write `<!-- example: KIND -->` or "
                f"`<!-- example: KIND (reason) -->` alone on the line, KIND one of {', '.join(MARKER_KINDS)}",
            )
        )
        return None
    kind = m["kind"].lower()
    if kind not in MARKER_KINDS:
        problems.append(
            Problem(
                path,
                number,
                f"unknown example marker kind {m['kind']!r}: the kinds are "
                + ", ".join(f"`{k}` ({why})" for k, why in MARKER_KINDS.items())
                + "; an example without a marker runs",
            )
        )
        return None
    return Marker(kind, (m["reason"] or "").strip(), number)


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, docs/**/*.md and deploy/*.md, sorted."""
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md")), *sorted((root / "deploy").glob("*.md"))]
    return [f for f in files if f.is_file()]


def collect(root: Path = ROOT) -> Parsed:
    """Every documentation file's blocks and problems, in file order."""
    blocks: list[Block] = []
    problems: list[Problem] = []
    for f in doc_files(root):
        parsed = parse(f.read_text(encoding="utf-8"), f.relative_to(root).as_posix())
        blocks += parsed.blocks
        problems += parsed.problems
    return Parsed(blocks, problems)


def excluded_listing(parsed: Parsed) -> list[str]:
    """One line per example not run: `file:line  kind  language  reason`."""
    rows = [(b.id, b.marker.kind, b.lang, b.marker.reason or "(no reason given)") for b in parsed.excluded if b.marker]
    width = max((len(r[0]) for r in rows), default=0)
    return [f"{where:<{width}}  {kind:<4}  {lang:<6}  {reason}" for where, kind, lang, reason in rows]


# --- running an example ----------------------------------------------------------------


def substitute(text: str, server: str | None, sandbox: str | None = None) -> str:
    """The example's text with `host:port` of the live server (and sandbox) for `make serve`'s addresses."""
    for addresses, actual in ((SERVER_ADDRESSES, server), (SANDBOX_ADDRESSES, sandbox)):
        if actual:
            for a in addresses:
                text = re.sub(rf"(?<![\w.-]){re.escape(a)}(?!\d)", actual, text)
    return text


def host_port(url: str) -> str:
    """`http://127.0.0.1:41234/...` -> `127.0.0.1:41234`."""
    netloc = urllib.parse.urlsplit(url).netloc
    if not netloc:
        raise ValueError(f"not a URL with a host and port: {url!r}")
    return netloc


@dataclass(frozen=True)
class RunResult:
    block: Block
    script: str  # the text that ran (after substitution)
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float
    timeout_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def report(self, extra: str = "") -> str:
        """What a failing example's test says: where, the block, how it ended, the output's tails."""
        how = (
            f"was killed after {self.timeout_s:.0f} s (mark it `<!-- example: long (why) -->` if it must run long)"
            if self.returncode is None
            else f"exited with {self.returncode} after {self.seconds:.1f} s"
        )
        numbered = "\n".join(
            f"{self.block.line + n:>5} | {text}" for n, text in enumerate(self.script.splitlines(), start=1)
        )
        parts = [
            f"{self.block.id}: the `{self.block.info}` example {how}",
            f"--- the block as run (file line numbers) ---\n{numbered}",
            f"--- stdout (tail) ---\n{tail(self.stdout)}",
            f"--- stderr (tail) ---\n{tail(self.stderr)}",
        ]
        if extra:
            parts.append(extra)
        parts.append(
            "Fix the example (or the code it documents); an example that needs a GPU or a long run gets "
            "`<!-- example: gpu -->` / `<!-- example: long (reason) -->` on the line above its fence."
        )
        return "\n".join(parts)


def tail(text: str, chars: int = 3000) -> str:
    text = text.rstrip()
    if not text:
        return "(empty)"
    return text if len(text) <= chars else "[...]\n" + text[-chars:]


def run_example(
    block: Block,
    *,
    server_url: str | None,
    sandbox_url: str | None,
    workdir: Path,
    root: Path = ROOT,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RunResult:
    """Run one example as a reader would from the repository root, against the given server.

    Shell blocks run with `bash -euo pipefail`, Python blocks with this interpreter; both with
    this interpreter's bin directory (the venv's) first on PATH, TMPDIR in `workdir`, no
    OPENAI_API_KEY / OPENAI_BASE_URL from the environment, stdout and stderr to files (so a
    background child cannot hold the test), in a new session whose process group is killed
    when the example ends or at the timeout."""
    if block.kind is None:
        raise ValueError(f"{block.id}: a `{block.info}` block is not an example")
    script = substitute(
        block.text, host_port(server_url) if server_url else None, host_port(sandbox_url) if sandbox_url else None
    )
    workdir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]", "_", block.id)
    if block.kind == "shell":
        path = workdir / f"{name}.sh"
        cmd = ["bash", "-euo", "pipefail", str(path)]
    else:
        path = workdir / f"{name}.py"
        cmd = [sys.executable, str(path)]
    path.write_text(script, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    bindir = str(Path(sys.executable).parent)  # not resolved: the venv's bin, not the base interpreter's
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env["TMPDIR"] = str(workdir)
    env["PYTHONUNBUFFERED"] = "1"
    out_path, err_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _kill_group(proc)
    seconds = time.monotonic() - start
    read = lambda p: p.read_text(encoding="utf-8", errors="replace")  # noqa: E731
    return RunResult(block, script, returncode, read(out_path), read(err_path), seconds, timeout_s)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the example's process group (whatever it left running in the background too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# --- links -------------------------------------------------------------------------------

_INLINE_LINK = re.compile(
    r"(?P<bang>!?)\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(?P<target><[^<>\n]*>|[^\s()]+(?:\([^\s()]*\)[^\s()]*)*)"
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
_REF_DEF = re.compile(r"^[ ]{0,3}\[[^\]]+\]:[ \t]*(?P<target><[^<>\n]*>|\S+)", re.MULTILINE)
_HTML_ATTR = re.compile(r"<(?:img|a|source|video)\b[^>]*?\b(?:src|href)\s*=\s*[\"'](?P<target>[^\"']+)[\"']", re.I)
_CODE_SPAN = re.compile(r"(?<!`)(?P<ticks>`+)(?!`)(?P<body>.*?)(?<!`)(?P=ticks)(?!`)", re.S)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^[ ]{0,3}(?P<hashes>#{1,6})(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*$")
_HTML_ID = re.compile(r"<[^>]*\b(?:id|name)\s*=\s*[\"'](?P<id>[^\"']+)[\"']", re.I)


@dataclass(frozen=True)
class Link:
    path: str  # the document it is in
    line: int
    target: str


def prose(text: str) -> str:
    """The text with fenced blocks and inline code spans blanked (same length, same line breaks)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i].rstrip("\r\n"))
        if m and not (m["fence"][0] == "`" and "`" in m["info"]):
            fence = m["fence"]
            close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
            j = i + 1
            while j < len(lines) and not close.match(lines[j].rstrip("\r\n")):
                j += 1
            for k in range(i, min(j + 1, len(lines))):
                out.append(_blank(lines[k]))
            i = j + 1
            continue
        out.append(lines[i])
        i += 1
    return _CODE_SPAN.sub(lambda m: _blank(m.group(0)), "".join(out))


def _blank(s: str) -> str:
    return re.sub(r"[^\n]", " ", s)


def links(text: str, path: str) -> list[Link]:
    """Every link target in the prose of one Markdown text (not in code), with its line."""
    body = prose(text)
    found: list[Link] = []
    for pattern in (_INLINE_LINK, _REF_DEF, _HTML_ATTR):
        for m in pattern.finditer(body):
            target = m["target"].strip()
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1].strip()
            found.append(Link(path, body.count("\n", 0, m.start("target")) + 1, target))
    return sorted(found, key=lambda link: link.line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's rendered text: lower case, punctuation dropped, each space a hyphen."""
    text = heading.strip().lower()
    return "".join(ch for ch in text if ch.isalnum() or ch in "-_ ").replace(" ", "-")


def heading_text(raw: str) -> str:
    """A heading's rendered text: code spans, emphasis, links and HTML reduced to their text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)  # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)  # _emphasis_ (snake_case stays)
    return text


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text: its ATX headings' slugs (duplicates get -1, -2, ...) and HTML ids."""
    body = prose(text)  # a `# comment` in a code block is no heading; heading code spans are read from `text`
    raw_lines = text.splitlines()
    seen: dict[str, int] = {}
    out: set[str] = set()
    for n, line in enumerate(body.splitlines()):
        if _HEADING.match(line) is None:
            continue
        m = _HEADING.match(raw_lines[n])
        if m is None:
            continue
        slug = github_slug(heading_text(m["text"] or ""))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    out.update(m["id"] for m in _HTML_ID.finditer(body))
    return out


def broken_links(root: Path = ROOT, files: list[Path] | None = None) -> list[Problem]:
    """Every relative link of the documentation that a reader of a fresh clone would find broken."""
    files = doc_files(root) if files is None else files
    texts = {f.resolve(): f.read_text(encoding="utf-8") for f in files}
    anchor_cache: dict[Path, set[str]] = {}
    problems: list[Problem] = []
    checked: list[tuple[Link, Path]] = []
    for f, text in texts.items():
        rel = f.relative_to(root.resolve()).as_posix()
        for link in links(text, rel):
            if not link.target or _SCHEME.match(link.target) or link.target.startswith("//"):
                continue  # an absolute URL (http:, mailto:, ...): not a file of this repository
            raw_path, _, anchor = link.target.partition("#")
            raw_path = urllib.parse.unquote(raw_path)
            if raw_path.startswith("/"):
                target = (root / raw_path.lstrip("/")).resolve()
            elif raw_path:
                target = (f.parent / raw_path).resolve()
            else:
                target = f
            where = f"link to {link.target!r}"
            if not target.is_relative_to(root.resolve()):
                problems.append(Problem(rel, link.line, f"{where} leaves the repository: link inside it"))
                continue
            if not target.exists():
                problems.append(
                    Problem(rel, link.line, f"{where}: {target.relative_to(root.resolve())} does not exist")
                )
                continue
            if anchor and target.is_file() and target.suffix.lower() == ".md":
                if target not in anchor_cache:
                    anchor_cache[target] = anchors(texts.get(target) or target.read_text(encoding="utf-8"))
                if urllib.parse.unquote(anchor).lower() not in anchor_cache[target]:
                    problems.append(
                        Problem(
                            rel,
                            link.line,
                            f"{where}: no heading of {target.relative_to(root.resolve())} has the anchor "
                            f"#{anchor} (GitHub slug: lower case, punctuation dropped, spaces as hyphens)",
                        )
                    )
                    continue
            checked.append((link, target))
    for link, target in _ignored(root, checked):
        problems.append(
            Problem(
                link.path,
                link.line,
                f"link to {link.target!r}: {target.relative_to(root.resolve())} is git-ignored, so a fresh "
                "clone does not have it: link a committed file",
            )
        )
    return sorted(problems, key=lambda p: (p.path, p.line))


def _ignored(root: Path, checked: list[tuple[Link, Path]]) -> list[tuple[Link, Path]]:
    """The links whose target git ignores (`git check-ignore`, tracked files never count as ignored)."""
    if not checked:
        return []
    rels = sorted({t.relative_to(root.resolve()).as_posix() for _, t in checked})
    proc = subprocess.run(
        ["git", "-C", str(root), "check-ignore", "--stdin"],
        input="\n".join(rels) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode not in (0, 1):  # 1: none ignored
        raise RuntimeError(f"`git check-ignore` failed ({proc.returncode}): {proc.stderr.strip()}")
    ignored = set(proc.stdout.split("\n")) - {""}
    return [(link, t) for link, t in checked if t.relative_to(root.resolve()).as_posix() in ignored]
