"""Serving: the model steps, the one decode loop, generation and the OpenAI-compatible server.

    steps.py        sample -> prefill -> decode_one (and SamplingParams)
    scheduler.py    Scheduler: continuous batching, mixed adapters per batch, prefix cache, n samples per prompt
    generate.py     generate() over a batch of prompts (through the Scheduler); `mcl generate`, `mcl chat`
    backend.py      LocalBackend: the engine as a chat / completion backend (role -> adapter)
    http_server.py  a loopback OpenAI-compatible server in front of a backend (`mcl serve`)
"""
