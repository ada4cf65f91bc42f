"""The environments a model learns in, each a source of prompts and a way to score what the model answers:

    datasets         synthetic arithmetic, GSM8K-format and other prompt files (prompts.py, prompt_files.py),
                     their answers stated as '#### N' (answers.py) and checked by the verifiers in rewards.py
    Python           programs run against unit tests in a bubblewrap sandbox (code_tasks.py, sandbox.py)
    reasoning-gym    procedural generators with their own verifiers (reasoning_gym_tasks.py)

scoring.py runs the weighted rewards over a table of completions, whichever environment made them;
evaluation.py scores a checkpoint's held-out answers for the evaluate stage.
"""
