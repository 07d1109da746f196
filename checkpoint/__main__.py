"""``python -m checkpoint ...`` is ``kintsugi ckpt ...``."""
import sys

from checkpoint.cli import main

sys.exit(main(sys.argv[1:]))
