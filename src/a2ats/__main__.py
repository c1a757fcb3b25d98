import sys

from a2ats.cli import main

sys.exit(main())
