import sys

from obsdiff.cli import main

sys.exit(main())
