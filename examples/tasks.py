"""The contract: task models shared by producers and workers. A producer imports only this."""

from taskframe import Task


class HashFile(Task[str], queue="files"):
    """Compute the SHA-256 of a (generated) file; the result is the hex digest."""

    name: str
    size_kb: int = 256


class SendEmail(Task[None], queue="email"):
    """Send an email through a flaky mail server."""

    to: str
    subject: str
