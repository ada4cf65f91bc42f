"""The environments a model learns in, each a source of prompts and a way to score what the model answers:

    datasets         synthetic arithmetic, GSM8K-format and other prompt files (prompts.py, prompt_files.py),
                     scored by verifiers of the final answer (rewards.py)
    Python           programs run against unit tests in a bubblewrap sandbox (code_tasks.py, sandbox.py)
    reasoning-gym    procedural generators with their own verifiers (reasoning_gym_tasks.py)

scoring.py runs the weighted rewards over a table of completions, whichever environment made them."""
