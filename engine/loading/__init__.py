"""Loading: files on disk -> a model and its tokenizer (and back: a GGUF of adapters).

    hub.py           load_model(name | HF directory | .gguf, weights=fp32|bf16|q4): the one entry; embedded models
    weights.py       HF safetensors / GGUF -> ModelConfig + state dict; `mcl convert`
    gguf_header.py   a GGUF's metadata and tensor index, read without the tensors
    tokenizer.py     the byte-level BPE tokenizer and the model's chat template
    packed_model.py  a model holding packed weights (weights=q4 / bf16), built through engine/cpu/'s modules
    export_gguf.py   LoRA adapters -> a GGUF adapter file (`mcl export`)
"""
