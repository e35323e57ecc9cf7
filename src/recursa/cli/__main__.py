import sys

from recursa.cli import main

sys.exit(main())
