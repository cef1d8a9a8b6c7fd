"""The one exception type that front ends turn into a single clear line."""


class LlmrunError(Exception):
    """A problem the user can act on: the message names what is wrong, what was tried,
    and what to do. Front ends print it as one line and exit non-zero."""
