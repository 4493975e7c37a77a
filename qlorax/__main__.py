import sys

from qlorax.cli import main

sys.exit(main())
