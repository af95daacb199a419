from setuptools import setup

setup(
    name="modeling-transfusion",
    version="0.1.0",
    description="Transfusion (one transformer, next-token loss on text, diffusion on image latents) for Hugging Face",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "modeling_transfusion",
        "modeling_transfusion.processing",
        "modeling_transfusion.conversion",
        "modeling_transfusion.recipes",
    ],
    # processing/, conversion/ and recipes/ live at the top of the repository but install inside the package.
    package_dir={
        "modeling_transfusion": "modeling_transfusion",
        "modeling_transfusion.processing": "processing",
        "modeling_transfusion.conversion": "conversion",
        "modeling_transfusion.recipes": "recipes",
    },
    entry_points={
        "console_scripts": [
            "transfusion = modeling_transfusion.recipes.cli:main",
            "transfusion-convert = modeling_transfusion.conversion.cli:main",
        ]
    },
    # The range each dependency is tested on: the lower bound is the oldest release CI installs (`.ci/run`, stage 3),
    # the upper bound the next minor release, not yet tested. Widen a bound only together with a CI run on it.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<5.25",
        "diffusers>=0.42,<0.43",
        "peft>=0.21,<0.22",
        "accelerate>=1.14,<1.16",
        "safetensors>=0.8",
        "huggingface-hub>=1.32",
        "tokenizers>=0.23",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # datasets: the collator and TransfusionTrainer are tested on real `datasets.Dataset`s (tested range, as above).
        "dev": ["pytest>=8", "hypothesis>=6", "scikit-learn>=1.3", "ruff", "datasets>=5.2,<5.3"],
    },
)
