"""The benchmark commands, apart from the product: `mcl bench generate|serve|train|agents` (and `lora`, which
lives with its kernel in kernels/bench.py). Each module's `main(args)` runs one side-by-side comparison and prints
one JSON object as its last line; results/ holds the committed measurements.

    mcl bench generate --json --out bench/results/
"""
