from setuptools import find_packages, setup

setup(
    name="megatie",
    version="0.1.0",
    description="Dynamic layer tying for transformer training on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatie", "megatie.*"]),
    entry_points={"console_scripts": ["megatie=megatie.tools.command:main"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        # The engine integration touches DeepSpeed's ZeRO internals; tests pin the behaviour.
        "deepspeed>=0.19.8,<0.20",
        "transformers>=4.45",
        "datasets>=2.19",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "nvidia-ml-py>=12.0",
        "safetensors>=0.4",
        "protobuf>=3.20",  # reading SentencePiece models when exporting a fast tokenizer
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "scikit-learn>=1.3",  # the handwritten digits ViT trains on offline
        "pillow>=9.0",  # reading image folders
    ],
    extras_require={
        # triton on CPU runs the copy kernel under TRITON_INTERPRET=1 (CUDA builds of torch ship it).
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "hypothesis>=6.90", "triton>=3.0"],
        "triton": ["triton>=3.0"],
    },
)
