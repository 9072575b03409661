"""Fault injection for tests, in every Python process started with this folder on PYTHONPATH (so in Ray's
workers too): with SKIPENGINE_TEST_KILL_ON set, a Ray worker's process exits at once when it is asked to
generate a batch holding a prompt with that text, as a process killed by the OS for memory would."""

import os
import sys

TEXT = os.environ.get("SKIPENGINE_TEST_KILL_ON")

if TEXT and any("default_worker.py" in arg for arg in sys.argv):
    from skipengine.engine import Engine

    _generate = Engine.generate

    def generate(self, prompts, *args, **kwargs):
        if any(TEXT in (p if isinstance(p, str) else self.tokenizer.decode(p)) for p in prompts):
            os._exit(1)
        return _generate(self, prompts, *args, **kwargs)

    Engine.generate = generate
