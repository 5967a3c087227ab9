"""The four MapCoder roles, one adapter each; defined once, here, for the trainer, the server and the agents.

    from engine.roles import ROLES     # ("retriever", "planner", "coder", "debugger")
"""
ROLES = ("retriever", "planner", "coder", "debugger")
