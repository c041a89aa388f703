"""Train a Llama-style decoder from scratch with layer tying: `LlamaForCausalLM` built from a config
(RMSNorm, rotary positions, SwiGLU, grouped-query attention; no weights downloaded), the same flags,
presets, policies, engines and run directory as train_gpt2.py.

    python launchers/train_llama.py                     # tiny preset, embedded corpus, CPU
    deepspeed launchers/train_llama.py --deepspeed ds_configs/zero2.json --train-file my.txt
"""

from megatie.tools.train_cli import exit_process, run_main, train_main

if __name__ == "__main__":
    exit_process(run_main(lambda argv=None: train_main(argv, model="llama")))
