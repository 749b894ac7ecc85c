import sys

from saeflow.cli.main import main

sys.exit(main())
