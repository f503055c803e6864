import sys

from tenancy_operator.plugin.cli import main

sys.exit(main())
