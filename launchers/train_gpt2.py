"""Train GPT-2 from scratch with layer tying (default policy: `split`, which unties where gradients disagree).

    python launchers/train_gpt2.py                       # tiny preset, embedded corpus, CPU
    python launchers/train_gpt2.py --train-file my.txt --tie-policy qlearning   # the paper's agent
    python launchers/train_gpt2.py --train-file my.txt --tie-policy conventional
"""

from megatie.tools.train_cli import exit_process, run_main, train_main

if __name__ == "__main__":
    exit_process(run_main(train_main))
