"""The ``qmiss`` command: ``qmiss plan ...`` (memory planner) and ``qmiss train ...`` (= ``qmiss-train``)."""

from __future__ import annotations

import sys
from typing import Optional

USAGE = """usage: qmiss {plan,train} ...

  qmiss plan --config CONFIG [--bits 4] [--r 64] [--gpu-gb 8] ...   GPU memory of a fine-tune, per item
  qmiss train [qmiss-train flags]                                    fine-tune (the same as qmiss-train)

'qmiss plan --help' and 'qmiss train --help' list the flags."""


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else None
    if command == "plan":
        from qmiss.plan import main as plan

        return plan(argv)
    if command == "train":
        from qmiss.train import main as train

        return train(argv) or 0
    print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
