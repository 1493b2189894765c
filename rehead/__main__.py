import sys

from rehead.app.cli import main

sys.exit(main())
