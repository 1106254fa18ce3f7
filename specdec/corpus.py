"""The demo models' corpus: the Python sources every machine has, those of the running interpreter.

No model hub is reachable where the project trains, so it learns from the standard library (and, for
larger models, the installed packages). A manifest of paths, sizes and hashes says exactly what was
read, and a fixed list of modules, present in every CPython >= 3.10, is held out for evaluation.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELD_OUT = (
    "bisect.py", "colorsys.py", "fnmatch.py", "graphlib.py", "heapq.py", "json/decoder.py", "shlex.py",
    "textwrap.py",
)
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# Larger files are generated tables or documentation strings (pydoc_data/topics.py), not code.
MAX_FILE_BYTES = 512 * 1024


@dataclass(frozen=True)
class Source:
    root: str  # the sysconfig path name ("stdlib" or "purelib") that ``path`` is relative to
    path: str
    size: int
    sha256: str
    text: str

    def entry(self) -> dict:
        return {"root": self.root, "path": self.path, "bytes": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Corpus:
    train: tuple[Source, ...]
    held_out: tuple[Source, ...]
    roots: dict[str, str]

    def manifest(self) -> dict:
        return {
            "roots": self.roots,
            "train": [s.entry() for s in self.train],
            "held_out": [s.entry() for s in self.held_out],
        }

    @property
    def manifest_hash(self) -> str:
        """Hash of what was read, not where: equal on two machines with the same sources."""
        m = self.manifest()
        body = json.dumps([m["train"], m["held_out"]], sort_keys=True).encode()
        return hashlib.sha256(body).hexdigest()

    def save_manifest(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"sha256": self.manifest_hash, **self.manifest()}, indent=1))

    def held_out_prompts(self, n: int, prompt_chars: int = 200) -> list[str]:
        """``n`` prefixes of held-out functions (see ``function_prefixes``), spread evenly over all of them, so
        always the same ones."""
        return _spread([c for s in self.held_out for c in function_prefixes(s, prompt_chars)], n,
                       f"the held-out modules have {{}} functions with a statement end within prompt_chars={prompt_chars}")

    def train_prompts(self, n: int, prompt_chars: int = 200, per_file: int = 4) -> list[str]:
        """``n`` prefixes of training functions, at most ``per_file`` from each file taken in the corpus's fixed
        sha256 order (spread over all packages), for the target to continue when heads are self-distilled."""
        prompts = []
        for source in sorted(self.train, key=lambda s: s.sha256):
            if len(prompts) >= n:
                break
            found = function_prefixes(source, prompt_chars)
            prompts += found[:: max(1, len(found) // per_file)][:per_file]
        return prompts[:n]


def directory_prompts(path: str | os.PathLike, n: int, prompt_chars: int = 200) -> list[str]:
    """``n`` function prefixes spread evenly over the Python files under ``path``: prompts from code that no
    recipe reads (a checkout beside the project, say), as a second held-out set."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"No directory at {str(root)!r} to take prompts from.")
    sources = [s for p in _walk(root) if (s := _read("prompts", root, p))]
    return _spread([c for s in sources for c in function_prefixes(s, prompt_chars)], n,
                   f"{str(root)!r} has {{}} functions with a statement end within prompt_chars={prompt_chars}")


def _spread(candidates: list[str], n: int, has: str) -> list[str]:
    if not 0 < n <= len(candidates):
        raise ValueError(f"n={n}: {has.format(len(candidates))}; ask for 1..{len(candidates)}.")
    return [candidates[i * len(candidates) // n] for i in range(n)]


def function_prefixes(source: Source, prompt_chars: int) -> list[str]:
    """Code prefixes of at most ``prompt_chars``, one per function of ``source`` that has one: from its first
    line (decorators included) up to the end of a statement, never inside a string, with more of the function
    left to complete. In source order; none for a file this interpreter cannot parse."""
    try:
        tree = ast.parse(source.text)
    except (SyntaxError, ValueError):
        return []
    starts = [0, 0, *itertools.accumulate(len(line) + 1 for line in source.text.split("\n"))]  # 1-based
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        ends = [st.end_lineno for st in ast.walk(node) if isinstance(st, ast.stmt) and st is not node
                and st.end_lineno < node.end_lineno
                and starts[st.end_lineno + 1] - starts[first] <= prompt_chars]
        if ends:
            found.append((first, source.text[starts[first]:starts[max(ends) + 1]]))
    return [text for _, text in sorted(found)]


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath, name)


def _read(root_name: str, root: Path, path: Path) -> Source | None:
    data = path.read_bytes()
    if len(data) > MAX_FILE_BYTES:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return Source(root_name, path.relative_to(root).as_posix(), len(data), hashlib.sha256(data).hexdigest(), text)


def collect(include_site_packages: bool = False, max_bytes: int | None = None, stdlib: str | None = None) -> Corpus:
    """Every ``*.py`` of the standard library (``stdlib`` overrides its path), and of ``purelib`` when
    ``include_site_packages``, minus tests, copies (by hash) and the held-out modules.

    With ``max_bytes``, training keeps the files that come first in sha256 order until the budget is
    spent: a fixed sample spread over all packages, where path order would keep only the first few.
    """
    paths = sysconfig.get_paths()
    roots = {"stdlib": stdlib or paths["stdlib"]}
    if include_site_packages:
        roots["purelib"] = paths["purelib"]
    held_out = _held_out(Path(roots["stdlib"]))
    seen = {s.sha256 for s in held_out}
    train = []
    for name, root in roots.items():
        for path in _walk(Path(root)):
            source = _read(name, Path(root), path)
            if source and source.sha256 not in seen:
                seen.add(source.sha256)
                train.append(source)
    if not train:
        raise FileNotFoundError(
            f"no Python sources under {list(roots.values())}: this interpreter ships compiled modules only. "
            "Install its sources (e.g. Debian's libpython3.X-stdlib) or pass stdlib=<a directory holding them>")
    if not held_out:
        raise FileNotFoundError(_NO_HELD_OUT.format(base=roots["stdlib"]))
    if max_bytes is not None:
        kept, total = set(), 0
        for s in sorted(train, key=lambda s: s.sha256):
            if total + s.size <= max_bytes:
                kept.add(s.sha256)
                total += s.size
        if not kept:
            raise ValueError(f"max_bytes={max_bytes} is smaller than every source file; raise it")
        train = [s for s in train if s.sha256 in kept]
    return Corpus(tuple(train), held_out, roots)


def held_out_modules(stdlib: str | None = None) -> Corpus:
    """The held-out modules alone (no training files), for prompts the demo models never trained on."""
    base = Path(stdlib or sysconfig.get_paths()["stdlib"])
    held_out = _held_out(base)
    if not held_out:
        raise FileNotFoundError(_NO_HELD_OUT.format(base=base))
    return Corpus((), held_out, {"stdlib": str(base)})


_NO_HELD_OUT = f"none of the held-out modules {HELD_OUT} is under {{base}}; pass stdlib=<the standard library's directory>"


def _held_out(base: Path) -> tuple[Source, ...]:
    return tuple(s for name in HELD_OUT if (base / name).is_file() and (s := _read("stdlib", base, base / name)))
