"""The one exception type riha_model raises for problems a user can fix."""


class RihaModelError(Exception):
    """A bad checkpoint, dataset, image or option: the message names the thing and the fix."""
