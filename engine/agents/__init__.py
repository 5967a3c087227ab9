"""The agents: one small LLM as four MapCoder roles (retriever, planner, coder, debugger).

    prompts.py      the chat messages each role (and the Direct / CoT baselines) is sent
    parsers.py      answers -> values, or a FormatFailure (counted per role, never raised)
    mapcoder.py     the control flow for one problem; every call and sample-test run recorded
    backends.py     HTTPBackend (an OpenAI-compatible endpoint); the local engine is engine/serving/backend.py's
                    LocalBackend (adapter = role), and engine/serving/http_server.py serves either

eval/run.py runs a strategy over a benchmark with many problems in flight (`mcl eval`).
"""
