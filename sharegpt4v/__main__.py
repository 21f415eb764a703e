import sys

from sharegpt4v.cli import main

sys.exit(main())
