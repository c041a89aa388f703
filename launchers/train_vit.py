"""Train a Vision Transformer from scratch with layer tying: `ViTForImageClassification` built from a
config (no weights downloaded), on the handwritten digits scikit-learn ships (offline), a folder with one
sub-directory per class, or a Hugging Face image dataset; the same flags, presets, policies, engines and
run directory as train_gpt2.py, with top-1 accuracy.

    python launchers/train_vit.py                       # tiny preset, digits, CPU
    deepspeed launchers/train_vit.py --deepspeed ds_configs/zero2.json --image-dir photos/
"""

from megatie.tools.train_cli import exit_process, run_main, train_main

if __name__ == "__main__":
    exit_process(run_main(lambda argv=None: train_main(argv, model="vit")))
