"""The teacher gateway: an HTTP service in front of the teacher model.

``app`` builds the Starlette application; ``server`` runs it with uvicorn and starts it as a
child process for the demo, the evaluation and the tests. Needs the ``gateway`` extra.
"""
