"""The errors a user can act on. A stage prints them as one line, `error: <message>`, and exits with status
USER_ERROR_EXIT; anything else is a bug and keeps its traceback. They recur on a retry (the same input
gives the same error), so the flows do not retry them.

    UserError                  base class
      ConfigError              a bad parameter (grpo.config)
      ContractError            a Parquet table that breaks its contract (grpo.contracts)
      InputError               a bad input file or model source: names the file, the line or row, the column
      NonFiniteError           the loss or a gradient is NaN/Inf: the update stops, no checkpoint is written
"""

from __future__ import annotations

USER_ERROR_EXIT = 2  # exit status of a stage stopped by a UserError


class UserError(Exception):
    """An error in what the user gave (parameters, files, a diverged run); str(e) is the whole message."""


class ConfigError(UserError, ValueError):
    """A bad parameter. str(e) is one line naming the file, the key, the value and what is allowed."""


class ContractError(UserError, ValueError):
    """A table that does not meet its contract. str(e) names the file (when known) and the column."""


class InputError(UserError, ValueError):
    """A bad input file or model source. str(e) names the file and, where it applies, line/row and column."""


class NonFiniteError(UserError, RuntimeError):
    """The loss or a gradient is NaN/Inf: the update stops and no checkpoint is written."""
