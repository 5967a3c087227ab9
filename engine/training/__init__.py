"""Training: four role adapters in one mixed-role run (`mcl train`).

    trainer.py      the loop: recipe (TOML) -> mixed-role batches -> the model's forward -> four PEFT adapters
    data.py         the role-tagged SFT file: read, checked, tokenized, sampled per role, collated
    checkpoint.py   resumable checkpoints, written atomically and verified
    distributed.py  data-parallel runs (torchrun)
    chunked_ce.py   the LM head and the cross-entropy in chunks (no (tokens, vocab) logits tensor)
"""
