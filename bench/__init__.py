"""Benchmark harness comparing task frameworks against raw nats-py JetStream.

Run with ``python -m bench`` from the repository root; see ``bench/README.md``.
"""
