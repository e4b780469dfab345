"""cosmos: a from-scratch PyTorch toolkit for COSMOS vision-language pre-training and zero-shot evaluation."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="cosmos-vlp",
    version="0.1.0",
    description="COSMOS (CVPR 2025) cross-modality self-distillation for CLIP models: train, load, evaluate.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Typer app lives in the top-level cli/ folder but is installed as `cosmos_cli`, so the package does
    # not take the generic import name `cli` in site-packages.
    packages=find_packages(include=["cosmos", "cosmos.*"]) + ["cosmos_cli", "cosmos.weights"],
    package_dir={"cosmos_cli": "cli", "cosmos.weights": "weights"},
    # weights/ (the CLIP BPE merges, see weights/README.md for its licence, and the shipped tiny model) is installed
    # as package data of `cosmos.weights`, so every install layout (wheel, --user, --target, editable) carries it.
    package_data={"cosmos.weights": ["*.txt.gz", "*.pt", "*.md"], "cosmos.zeroshot": ["classnames/*.txt",
                                                                                   "classnames/*.md"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pillow",
        "regex",
        "ftfy",
        "typer>=0.12,<0.30",  # the CLI's help panels and option handling were designed and tested on this range
        "rich",  # comes with typer; named because the CLI imports it directly
    ],
    extras_require={
        # References for parity tests only; the library never imports them.
        "test": ["pytest", "open-clip-torch==3.3.0", "webdataset"],
    },
    entry_points={"console_scripts": ["cosmos=cosmos_cli.main:main"]},
)
