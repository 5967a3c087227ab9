"""Driver for subprocess tests: train the tiny random model with the byte tokenizer from a recipe file.

    python tests/train/run_tiny.py RECIPE.toml [table.key=value ...] [--resume]
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train/run_tiny.py RECIPE.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine.training.trainer import load_recipe, train  # noqa: E402
from tiny_setup import byte_tokenizer, tiny_model       # noqa: E402

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--resume"]
    recipe = load_recipe(args[0], args[1:])
    train(recipe, model=tiny_model(seed=0), tokenizer=byte_tokenizer(), resume="--resume" in sys.argv)
