"""The two kinds of user-facing error llama32 raises."""


class InvalidRequest(ValueError):
    """A request (or a LoRA adapter named by one) that cannot be served.

    Raised before any compute; the message names the offending field and what is allowed.
    """


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files, bad config, wrong or corrupt tensors, hub trouble.

    The message names the file, tensor or field at fault and, where the user can fix it, says how.
    """
