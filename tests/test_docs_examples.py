"""Docs that cannot drift (issue 22): every example in README.md, docs/**/*.md and deploy/*.md runs,
and every relative link resolves.

Each `bash`/`sh`/`shell`/`python` fenced block is one test (id `file:line`), run from the
repository root against the live server (`default_server`: `make serve`'s flags on the default
model, shared with other modules) with its address substituted for `localhost:8000`. Blocks
marked `<!-- example: gpu -->` / `<!-- example: long (why) -->` are not run; the test output
lists them (tests/conftest.py's terminal summary). The convention and the parser live in
tests/support/docs_examples.py; the parser's own tests here keep a parser bug from making the
suite pass with nothing checked. One example: `pytest -k README.md:42 tests/test_docs_examples.py`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import docs_examples as dx
from tests.support.sandbox_service import SandboxService
from tests.support.thor_server import ThorServer

DOCS = dx.collect()
TIMEOUT_S = dx.DEFAULT_TIMEOUT_S


# --- the parser on small in-memory documents --------------------------------------------

SAMPLE = """\
# Title

```bash
echo one
```

<!-- example: long (trains 40 min) -->
```python
print("long")
```

```json
{"not": "an example"}
```

- a list item:

  ```sh
  echo indented
  ```

<!-- example: gpu -->
~~~shell
nvidia-smi
~~~

````text
```python
print("inside a text block")
```
````

Text with ```` ```output ```` in it is no fence.

```
no info string
```
"""


def test_parser_finds_blocks_lines_languages_and_markers() -> None:
    parsed = dx.parse(SAMPLE, "doc.md")
    assert parsed.problems == []
    got = [(b.line, b.lang, b.kind, b.marker.kind if b.marker else None) for b in parsed.blocks]
    assert got == [
        (3, "bash", "shell", None),
        (8, "python", "python", "long"),
        (12, "json", None, None),
        (18, "sh", "shell", None),
        (23, "shell", "shell", "gpu"),
        (27, "text", None, None),
        (35, "", None, None),
    ]
    by_line = {b.line: b for b in parsed.blocks}
    assert by_line[3].text == "echo one\n"
    assert by_line[18].text == "echo indented\n"  # the fence's indentation removed
    assert by_line[8].marker == dx.Marker("long", "trains 40 min", 7)
    assert by_line[23].marker == dx.Marker("gpu", "", 22)
    assert by_line[27].text == '```python\nprint("inside a text block")\n```\n'
    assert [b.id for b in parsed.runnable] == ["doc.md:3", "doc.md:18"]
    assert [b.id for b in parsed.excluded] == ["doc.md:8", "doc.md:23"]
    assert dx.excluded_listing(parsed) == [
        "doc.md:8   long  python  trains 40 min",
        "doc.md:23  gpu   shell   (no reason given)",
    ]


@pytest.mark.parametrize(
    ("markdown", "line", "says"),
    [
        ("<!-- example: slow -->\n```bash\ntrue\n```\n", 1, "unknown example marker kind 'slow'"),
        ("<!-- example long -->\n```bash\ntrue\n```\n", 1, "malformed example marker"),
        ("<!-- example: long -->\n\n```bash\ntrue\n```\n", 1, "directly above"),
        ("text\n<!-- example: gpu -->\n", 2, "marks no block"),
        ("<!-- example: long -->\n```json\n{}\n```\n", 1, "not an example"),
        ("# x\n\n```bash\ntrue\n", 3, "never closed"),
    ],
)
def test_parser_reports_marker_and_fence_mistakes(markdown: str, line: int, says: str) -> None:
    parsed = dx.parse(markdown, "doc.md")
    assert len(parsed.problems) == 1, parsed.problems
    assert parsed.problems[0].line == line
    assert says in parsed.problems[0].message, parsed.problems[0]
    assert str(parsed.problems[0]).startswith(f"doc.md:{line}: ")


def test_an_unknown_marker_does_not_exclude_the_block() -> None:
    parsed = dx.parse("<!-- example: slow -->\n```bash\ntrue\n```\n", "doc.md")
    assert [b.id for b in parsed.runnable] == ["doc.md:2"]


def test_a_marker_named_in_prose_is_no_marker() -> None:
    """Docs that explain the convention mention `<!-- example: gpu -->` inside a sentence."""
    parsed = dx.parse("A block marked `<!-- example: gpu -->` is listed.\n\n```bash\ntrue\n```\n", "doc.md")
    assert parsed.problems == []
    assert [b.id for b in parsed.runnable] == ["doc.md:3"]


def test_substitution_of_the_server_and_sandbox_addresses() -> None:
    text = (
        "curl http://localhost:8000/v1/models; OpenAI(base_url='http://127.0.0.1:8000/v1')\ncurl 127.0.0.1:8080/health"
    )
    out = dx.substitute(text, "127.0.0.1:41234", "127.0.0.1:5555")
    assert out == (
        "curl http://127.0.0.1:41234/v1/models; OpenAI(base_url='http://127.0.0.1:41234/v1')\n"
        "curl 127.0.0.1:5555/health"
    )
    assert dx.substitute("http://localhost:80001 and 10.127.0.0.1:8000", "h:1") == (
        "http://localhost:80001 and 10.127.0.0.1:8000"
    )


def test_runner_exit_codes_path_substitution_and_timeout(tmp_path: Path) -> None:
    """The runner itself: a failing block fails, the venv's bin leads PATH, addresses are substituted,
    a block past its timeout is killed with what it started in the background."""
    shell = dx.parse(
        '```bash\necho "$(command -v python)" http://localhost:8000/v1\nfalse\necho not reached\n```\n', "d.md"
    ).blocks[0]
    r = dx.run_example(shell, server_url="http://127.0.0.1:4321", sandbox_url=None, workdir=tmp_path / "a")
    assert r.returncode == 1 and not r.ok
    assert r.stdout == f"{Path(sys.executable).parent / 'python'} http://127.0.0.1:4321/v1\n", r.stdout
    assert "d.md:1: the `bash` example exited with 1" in r.report()
    assert "    3 | false" in r.report()  # the block's lines numbered as in the file

    py = dx.parse("```python\nimport tests.support.docs_examples as m\nprint(m.__name__)\n```\n", "d.md").blocks[0]
    r = dx.run_example(py, server_url=None, sandbox_url=None, workdir=tmp_path / "b")
    assert (r.returncode, r.stdout) == (0, "tests.support.docs_examples\n"), r.report()

    marker = tmp_path / "child-alive"
    slow = dx.parse(f"```sh\n(sleep 3; touch {marker}) &\nsleep 30\n```\n", "d.md").blocks[0]
    r = dx.run_example(slow, server_url=None, sandbox_url=None, workdir=tmp_path / "c", timeout_s=1)
    assert r.returncode is None and "was killed after 1 s" in r.report()
    time.sleep(3)
    assert not marker.exists(), "the example's background child outlived its process group"


def test_links_slugs_and_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "out.md").write_text("# Out\n")
    (tmp_path / ".gitignore").write_text("build/\n")
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Evaluation (`python -m trainer.evaluate`)\n\n## Setup\n")
    (tmp_path / "README.md").write_text(
        "# Top\n\n## Setup\n\n## Setup\n\n"
        "[ok](docs/guide.md) [ok](docs/guide.md#evaluation-python--m-trainerevaluate) [ok](#setup-1)\n"
        "[dir](docs/) ![img](docs/missing.png) [web](https://example.com/x.md) [multi\nline](#nope)\n"
        "`[in code](nowhere.md)`\n\n"
        "```bash\n# a comment, no heading\necho '[x](nowhere.md)'\n```\n\n"
        '<img src="docs/guide.md"> [up](../outside.md) [anchor](docs/guide.md#setup-1)\n'
        "[ref]: docs/nothing.md\n"
        "[generated](build/out.md)\n"
    )
    assert dx.github_slug(dx.heading_text("Logprobs, structured output and function tools (THOR off)")) == (
        "logprobs-structured-output-and-function-tools-thor-off"
    )
    assert dx.anchors((tmp_path / "README.md").read_text()) == {"top", "setup", "setup-1"}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    got = [(p.path, p.line, p.message.split(":")[0]) for p in dx.broken_links(tmp_path)]
    assert got == [
        ("README.md", 8, "link to 'docs/missing.png'"),
        ("README.md", 9, "link to '#nope'"),
        ("README.md", 17, "link to '../outside.md' leaves the repository"),
        ("README.md", 17, "link to 'docs/guide.md#setup-1'"),
        ("README.md", 18, "link to 'docs/nothing.md'"),
        ("README.md", 19, "link to 'build/out.md'"),
    ], got
    assert "git-ignored" in dx.broken_links(tmp_path)[-1].message


# --- the documentation itself -----------------------------------------------------------


def test_docs_follow_the_example_convention() -> None:
    """No unknown or misplaced marker, no unclosed fence: each problem named by file:line."""
    assert DOCS.problems == [], "documentation problems:\n" + "\n".join(map(str, DOCS.problems))


def test_docs_have_examples_that_run_against_the_server() -> None:
    """A parser that finds nothing, or docs with every example marked, must not pass."""
    assert dx.doc_files(), "no documentation files found (README.md, docs/**/*.md, deploy/*.md)"
    assert DOCS.runnable, "no runnable examples found in the documentation: the parser or the docs are broken"
    assert any(b.uses_server for b in DOCS.runnable), (
        "no runnable example talks to the server (localhost:8000): at least one must, unmarked"
    )


def test_every_relative_link_resolves() -> None:
    broken = dx.broken_links()
    assert broken == [], f"{len(broken)} broken links:\n" + "\n".join(map(str, broken))


@pytest.mark.vllm
@pytest.mark.sandbox
@pytest.mark.parametrize("block", DOCS.runnable, ids=[b.id for b in DOCS.runnable])
def test_example_runs(block: dx.Block, default_server: ThorServer, sandbox: SandboxService, tmp_path: Path) -> None:
    """One example, killed after TIMEOUT_S (the suite's 600 s pytest timeout also covers the server's start)."""
    result = dx.run_example(
        block, server_url=default_server.url, sandbox_url=sandbox.url, workdir=tmp_path, timeout_s=TIMEOUT_S
    )
    if not result.ok:
        extra = ""
        if block.uses_server:
            extra = f"--- server log (tail) ---\n{dx.tail(default_server.log(), 2000)}"
        pytest.fail(result.report(extra), pytrace=False)
