"""``python -m trainer``: the command line (``trainer.cli.main``; installed as ``finetune``)."""

import sys

from trainer.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
