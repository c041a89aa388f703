"""Train GPT-2 from scratch with dynamic layer tying.

    python launchers/train_gpt2.py                       # tiny preset, embedded corpus, CPU
    python launchers/train_gpt2.py --train-file my.txt --tie-policy conventional
"""

import sys

from megatie.cli import run_main, train_main

if __name__ == "__main__":
    sys.exit(run_main(train_main))
