"""The exception the command line turns into one sentence and a non-zero exit."""


class UserError(Exception):
    """A problem the operator can fix (config, peer, file); the message says what and how."""
