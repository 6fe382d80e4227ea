import sys

from medvl.cli import main

sys.exit(main())
