"""What README.md shows is what poolkeeper does: the curl answer and every `$ ...poolkeeper`
command of its console examples, run and compared."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from app.config import Settings
from app.factory import create_app
from app.namespaces.file import FileNamespaces
from app.rules import SHIPPED_RULES, RuleStore
from app.watch import FileWatcher

from .support import ROOT, TESTDATA

README = (ROOT / "README.md").read_text()


def test_readme_curl_answer_is_what_the_webhook_sends(tmp_path):
    curl = re.search(r"curl --cacert .*?--data @(\S+) https://localhost:8443(/\S+)", README,
                     re.S)
    assert curl, "README lost its curl example"
    review, path = curl.group(1), curl.group(2)
    shown = re.search(r"```json\n(\{\"apiVersion\":\"admission.k8s.io/v1\".*?)\n```", README,
                      re.S)
    assert shown, "README lost the curl example's answer"
    watcher = FileWatcher()
    client = create_app(Settings(cert_dir=str(tmp_path)),
                        source=FileNamespaces(TESTDATA / "namespaces.yaml", watcher=watcher),
                        rules=RuleStore(SHIPPED_RULES, watcher=watcher),
                        watcher=watcher).test_client()
    answer = client.post(path, data=(ROOT / review).read_bytes(),
                         headers={"Content-Type": "application/json"})
    assert answer.data.decode() == shown.group(1)


def console_examples() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each `$ .venv/bin/poolkeeper ...` in README's sh
    blocks; a line "  ..." ends what is compared of the output, `$ echo $?` the exit status."""
    examples = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        lines = block.splitlines()
        for index, line in enumerate(lines):
            if line.startswith("$ .venv/bin/poolkeeper "):
                output = []
                for follow in lines[index + 1:]:
                    if follow.startswith("$ ") and follow != "$ echo $?":
                        break
                    output.append(follow)
                examples.append((line[2:], output))
    return examples


EXAMPLES = console_examples()


def test_readme_has_console_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("command, expected", EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_readme_console_example_prints_what_it_shows(command, expected):
    args = shlex.split(command)[1:]
    result = subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    printed = (result.stdout + result.stderr).splitlines()
    shown = []
    status = None
    for line in expected:
        if line == "$ echo $?":
            continue
        if re.fullmatch(r"\d+", line) and expected[expected.index(line) - 1] == "$ echo $?":
            status = int(line)
            continue
        shown.append(line)
    cut = [i for i, line in enumerate(shown) if line.strip() == "..."]
    head = shown[:cut[0]] if cut else shown
    tail = shown[cut[0] + 1:] if cut else []
    assert printed[:len(head)] == head
    if tail:
        assert printed[-len(tail):] == tail
    assert result.returncode == (status if status is not None else 0)


def test_readme_contents_list_every_section():
    headings = re.findall(r"^## (.+)$", README, re.M)
    listed = re.findall(r"^- \[(.+?)\]\(#([^)]+)\)$",
                        README.split("## Contents", 1)[1].split("\n## ", 1)[0], re.M)
    assert [title for title, _ in listed] == [h for h in headings if h != "Contents"]
    for title, anchor in listed:  # GitHub's anchors: lowercase, punctuation dropped, '-' for ' '
        assert anchor == re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")
