"""Judge every series of the shared corpus with every shipped model and write docs/model-domains.md."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.model_domains import CORPUS, TABLE, judge_corpus, render, shipped_models  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=TABLE, help="table path (default: docs/model-domains.md)")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="corpus root with MANIFEST.tsv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    started = time.monotonic()
    verdicts = judge_corpus(shipped_models(), args.corpus)
    args.out.write_text(render(verdicts), encoding="utf-8")
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
