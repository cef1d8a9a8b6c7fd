import sys

from llmrun.cli import main

sys.exit(main())
