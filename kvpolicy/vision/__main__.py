import sys

from kvpolicy.vision.cli import main

sys.exit(main())
