"""Send the whole shared corpus through a real node with dcmtk storescu and write docs/corpus-report.md."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.corpus import CORPUS, REPORT, render_report, run_corpus  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPORT, help="report path (default: docs/corpus-report.md)")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="corpus root with MANIFEST.tsv")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the node's data and log here")
    parser.add_argument("--jobs", type=int, default=4, help="storescu runs at a time")
    args = parser.parse_args(argv)
    import pydicom  # noqa: F401  (its import sets its logger's level; ours must come after)

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # reading odd corpus headers for their UIDs
    warnings.simplefilter("ignore", UserWarning)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the raw sender's own association chatter
    started = time.monotonic()
    run = run_corpus(args.corpus, args.workdir, jobs=args.jobs)
    args.out.write_text(render_report(run), encoding="utf-8")
    kinds = Counter(outcome.kind for outcome in run.outcomes)
    print(
        f"{len(run.outcomes)} files in {time.monotonic() - started:.0f} s: "
        + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
        + f"; node crashes {len(run.crashes)}; silent refusals {len(run.silent())}; "
        f"spool {run.spool_files} for {run.distinct_accepted} distinct accepted instances; wrote {args.out}"
    )
    healthy = not run.crashes and not run.silent() and run.spool_files == run.distinct_accepted
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
