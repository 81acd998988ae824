"""The adapter workbench in the browser: `python app.py [--port 7860] [--workspace DIR]`.

Binds 127.0.0.1 by default; see `python app.py --help` and workbench/ui/launch.py for the
security defaults (password, public addresses, uploads, files).
"""

import sys

from workbench.ui.launch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="app.py"))
