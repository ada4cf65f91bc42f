"""The one editor of params.yaml: set dotted keys, keeping every comment and the layout.

    edit_params("params.yaml", {"rollout.group_size": 8, "loss.beta": 0.05})  -> {key: (old, new)} changed
    extend_iterations("params.yaml", 2)                                       -> the new number of iterations

An edit is a ruamel.yaml round trip (comments, key order, quoting and flow style stay as written), checked by
grpo.config.params_from_dict before anything is written, then written with grpo.models.atomic.atomic_write: a bad
value raises grpo.errors.ConfigError (one line: the file, the key, the value, what is allowed) and leaves the
file as it was. train.iterations is written as one line, {"1": 0, "2": 1, ...}, keys quoted (DVC's foreach
skips non-string keys). pipeline.extend and the Prefect flows (flows/grpo_flow.py) edit through this module.
"""

from __future__ import annotations

import difflib
import io
import math
from pathlib import Path
from typing import Any, Mapping

import yaml

from grpo.config import load_params, params_from_dict
from grpo.models.atomic import atomic_write
from grpo.errors import ConfigError
from grpo.variants import check_variant_names

ITERATIONS = "train.iterations"


def iterations_mapping(n: int) -> dict[str, int]:
    """train.iterations for a run of n iterations: {"1": 0, "2": 1, ..., "n": n-1}."""
    return {str(k): k - 1 for k in range(1, n + 1)}


def iteration_keys(path: str | Path) -> list[str]:
    """The iterations of train.iterations, in order, read without validating the rest of the file (a bad
    parameter is check-inputs' to report); [] when the file cannot be read."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        iterations = (data.get("train") or {}).get("iterations") or {}
        return sorted((str(k) for k in iterations if str(k).isdigit()), key=int)
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def edit_params(path: str | Path, changes: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set dotted keys (e.g. {"rollout.group_size": 8}) in the params file; return {key: (old, new)} for the
    keys whose value changed (old is None for a key that was not there). Nothing is written when nothing
    changes, or when the edited file would not pass grpo.config's checks (ConfigError)."""
    path = Path(path)
    y = _yaml()
    doc = _load(path, y)
    changed: dict[str, tuple[Any, Any]] = {}
    for key, value in changes.items():
        parent, leaf = _parent(doc, key, value, path)
        new = _node(key, value)
        if leaf in parent and _same(_plain(parent[leaf]), _plain(new)):
            continue
        changed[key] = (_plain(parent.get(leaf)), _plain(new))
        parent[leaf] = new  # a new key is set, and then rejected by validation with a did-you-mean hint
    if not changed:
        return {}
    buffer = io.StringIO()
    y.dump(doc, buffer)
    text = buffer.getvalue()
    # what check-inputs will accept (types, ranges, registered names): ConfigError
    check_variant_names(params_from_dict(yaml.safe_load(text) or {}, source=str(path)), str(path))
    mode = path.stat().st_mode & 0o777

    def write(tmp: Path) -> None:
        Path(tmp).write_text(text, encoding="utf-8")
        Path(tmp).chmod(mode)  # the temporary is created 0600: keep the file's own mode

    atomic_write(path, write)
    return changed


def extend_iterations(path: str | Path, k: int) -> int:
    """Add k iterations to train.iterations ("N+1": N, ..., "N+k": N+k-1); return the new number of iterations.
    The file must be valid as it is (ConfigError otherwise)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{path}: iterations to add = {k!r} is not allowed; expected an integer >= 1")
    n = load_params(path).train.num_iterations
    edit_params(path, {ITERATIONS: iterations_mapping(n + k)})
    return n + k


# ------------------------------------------------------------------------------------------------ helpers


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: keeps comments, key order, quotes and flow style
    y.preserve_quotes = True
    y.width = 4096  # never wrap a long line

    def null(representer, _):
        return representer.represent_scalar("tag:yaml.org,2002:null", "null")  # not an empty value

    def real(representer, value: float):
        # YAML 1.1 readers (PyYAML, DVC) read 1e-05 as a string: write 1.0e-05, as params.yaml does
        if math.isnan(value) or math.isinf(value):
            text = ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        else:
            text = repr(value)
            mantissa, e, exponent = text.partition("e")
            if e and "." not in mantissa:
                text = f"{mantissa}.0e{exponent}"
        return representer.represent_scalar("tag:yaml.org,2002:float", text)

    y.representer.add_representer(type(None), null)
    y.representer.add_representer(float, real)
    return y


def _load(path: Path, y) -> dict:
    from ruamel.yaml.error import YAMLError

    try:
        doc = y.load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: parameters file not found") from None
    except YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level is {type(doc).__name__}; expected a mapping of sections")
    return doc


def _parent(doc: dict, key: str, value: Any, path: Path) -> tuple[dict, str]:
    """The mapping that holds `key`'s last part, and that part."""
    parts = key.split(".") if isinstance(key, str) else [""]
    if "" in parts:
        raise ConfigError(f"{path}: key {key!r} (= {value!r}) is not allowed; expected dotted names, e.g. rollout.group_size")
    node = doc
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[:i]) or "the top level"
        if part not in node:
            close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
            hint = f" (did you mean {'.'.join(parts[:i] + close)}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {'.'.join(parts[: i + 1])} (in {key} = {value!r}){hint}; "
                              f"allowed keys in {where}: {', '.join(str(k) for k in node)}")
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: {key} = {value!r} is not allowed; {'.'.join(parts[: i + 1])} = "
                              f"{_plain(node)!r} is a value, not a section with keys")
    return node, parts[-1]


def _node(key: str, value: Any) -> Any:
    """The value to store: train.iterations 1..N as the one-line flow mapping, anything else as given."""
    if key == ITERATIONS and isinstance(value, Mapping):
        plain = {str(k): v for k, v in value.items()}
        if plain == iterations_mapping(len(plain)) and all(type(v) is int for v in plain.values()):
            return _iterations_node(len(plain))
    return value


def _iterations_node(n: int):
    """{"1": 0, "2": 1, ..., "n": n-1} as one flow-style line with quoted keys (DVC skips non-string keys)."""
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    node = CommentedMap((DoubleQuotedScalarString(k), v) for k, v in iterations_mapping(n).items())
    node.fa.set_flow_style()
    return node


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type (1 is not 1.0, true is not 1), recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _plain(value: Any) -> Any:
    """ruamel's round-trip types -> plain Python (for comparisons and logs)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value
