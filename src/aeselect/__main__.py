import sys

from aeselect.cli import main

sys.exit(main())
