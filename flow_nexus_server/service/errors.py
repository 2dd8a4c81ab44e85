"""Errors the caller can act on. The tool layer turns them into ToolError sentences."""


class ServiceError(Exception):
    """What went wrong and what to do next, in one or two sentences."""


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    pass
