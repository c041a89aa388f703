"""Train a BERT encoder from scratch with layer tying: `BertForMaskedLM` built from a config (no weights
downloaded), the masked-LM objective (15% of tokens chosen: 80% [MASK], 10% random, 10% kept) on the
same token shards and with the same flags, presets, policies, engines and run directory as train_gpt2.py.

    python launchers/train_bert.py                      # tiny preset, embedded corpus, CPU
    deepspeed launchers/train_bert.py --deepspeed ds_configs/zero2.json --train-file my.txt
"""

from megatie.tools.train_cli import exit_process, run_main, train_main

if __name__ == "__main__":
    exit_process(run_main(lambda argv=None: train_main(argv, model="bert")))
