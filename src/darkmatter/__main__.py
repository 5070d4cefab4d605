import sys

from darkmatter.cli import main

sys.exit(main())
