import sys

from qmiss.cli import main

sys.exit(main())
