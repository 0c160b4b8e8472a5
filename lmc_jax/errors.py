"""User-facing errors: one clear line that names the problem and the fix.

`lmc_jax.main` catches `UserError` and prints `error: <message>` without a traceback, then
exits with status 2. Library callers get an ordinary exception.
"""


class UserError(ValueError):
    """Bad input from the user (config, prompt, path, shape): the message says how to fix it."""
