"""Git: one command, and many commits' files in one process; the one place that runs `git`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import NamedTuple


class GitError(RuntimeError):
    """A git command failed; the message carries the command and git's stderr, `output` what
    git said (its stderr, else its stdout)."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def git(
    repo: Path,
    *args: str,
    input: str | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> str:
    """`git ARGS` in `repo`, its stdout; a failure (with `check`) is a GitError with git's."""
    result = subprocess.run(
        ["git", *args], cwd=repo, text=True, capture_output=True, input=input, env=env
    )
    if check and result.returncode != 0:
        raise GitError(
            f"`git {' '.join(args)}` failed in {repo}: {result.stderr.strip()}",
            (result.stderr or result.stdout).strip(),
        )
    return result.stdout


class GitObject(NamedTuple):
    oid: str
    content: bytes


def read_objects(repo: Path, names: list[str]) -> dict[str, GitObject | None]:
    """`REV:PATH` (or any object name) -> its object id and content, None where it does not
    exist; all of them from one `git cat-file --batch`, however many commits they span."""
    unique = list(dict.fromkeys(names))
    if any("\n" in name for name in unique):
        raise GitError(f"a Git object name holds a newline: {unique!r}")
    result = subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=repo,
        input="".join(f"{name}\n" for name in unique).encode(),
        capture_output=True,
    )
    if result.returncode != 0:
        raise GitError(f"`git cat-file --batch` failed in {repo}: {result.stderr.decode()}")
    out, found, at = result.stdout, {}, 0
    for name in unique:
        end = out.index(b"\n", at)
        header = out[at:end].decode()
        at = end + 1
        if header.endswith((" missing", " ambiguous")):
            found[name] = None
            continue
        oid, _, size = header.split(" ")
        found[name] = GitObject(oid, out[at : at + int(size)])
        at += int(size) + 1  # the content, then a newline
    return found
