import sys

from kvpolicy.rl.cli import main

sys.exit(main())
