"""``lm-eval-bh models``: list the embedded models; ``--path NAME`` prints one's folder (last line of
stdout), building it on first use."""

from __future__ import annotations

import sys
import time

from ..embedded import MODELS, cached_dir, is_built, missing, model_dir


def add_arguments(parser) -> None:
    parser.add_argument("--path", default=None, metavar="NAME",
                        help=f"print the folder of this model ({', '.join(MODELS)}), building it on first use")


def run(args) -> int:
    if args.path is None:
        for name, what in MODELS.items():
            if is_built(name):
                state = f"built: {cached_dir(name)}"
            else:  # what building it needs, only where that is not installed
                needs = missing(name)
                state = "not built yet" + (f"; needs: {needs}" if needs else "")
            print(f"{name:11s} {what} [{state}]")
        return 0
    built = is_built(args.path)
    t0 = time.time()
    path = model_dir(args.path)
    if not built:
        print(f"models: built {args.path} in {time.time() - t0:.0f}s", file=sys.stderr)
    print(path)
    return 0
