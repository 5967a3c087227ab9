"""The agents: one small LLM as four MapCoder roles (retriever, planner, coder, debugger).

    prompts.py      the chat messages each role (and the Direct / CoT baselines) is sent
    parsers.py      answers -> values, or a FormatFailure (counted per role, never raised)
    mapcoder.py     the control flow for one problem; every call and sample-test run recorded
    backends.py     LocalBackend (engine.serving.scheduler.Scheduler, adapter = role) and HTTPBackend (OpenAI-compatible)
    http_server.py  a loopback OpenAI-compatible server in front of any backend

eval/run.py runs a strategy over a benchmark with many problems in flight (`mcl eval`).
"""
